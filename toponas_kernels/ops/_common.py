"""What every op module shares: argument checks that name the argument, the optional Triton
import, and launch sizes for the GPU and for the CPU interpreter."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _lib

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Triton is optional (``_lib.HAS_TRITON``, decided once): without it the triton backend is
# unavailable, nothing else changes.
HAS_TRITON = _lib.HAS_TRITON
if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - depends on the installation
    triton = None
    tl = None

INTERPRET = _lib.TRITON_INTERPRET
HAS_CPP = _lib.HAS_CPP


def check_tensor(name: str, t, *, dim: int | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} has dtype {t.dtype}; expected one of float16, bfloat16, float32, float64"
        )
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dims, got shape {tuple(t.shape)}")
    return t


def check_like(name: str, t: Tensor, ref_name: str, ref: Tensor, *, shape: bool = True) -> None:
    """``t`` must match ``ref`` in device, dtype and (optionally) shape."""
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; put them on one device")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; use one dtype")
    if shape and t.shape != ref.shape:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)} but {ref_name} has {tuple(ref.shape)}; they must match"
        )


def check_same(name: str, tensors: list[Tensor], *, dim: int | None = None) -> Tensor:
    """Every entry a tensor of a supported dtype, with the first one's dtype, device and shape
    (and ``dim`` dims when given); returns the first. One cheap pass when all is well (this runs
    on every call of an op); the detailed checks, naming the entry, only to report a failure."""
    first = tensors[0]
    if isinstance(first, Tensor) and first.dtype in SUPPORTED_DTYPES and (dim is None or first.dim() == dim):
        dtype, device, shape = first.dtype, first.device, first.shape
        for t in tensors:
            if not (isinstance(t, Tensor) and t.dtype == dtype and t.shape == shape and t.device == device):
                break
        else:
            return first
    check_tensor(f"{name}[0]", first, dim=dim)
    for k, t in enumerate(tensors[1:], start=1):
        check_tensor(f"{name}[{k}]", t, dim=dim)
        check_like(f"{name}[{k}]", t, f"{name}[0]", first)
    return first


def as_tensor_list(name: str, tensors) -> list[Tensor]:
    """A sequence of tensors, or one stacked tensor split along dim 0 (views, no copy)."""
    if isinstance(tensors, Tensor):
        if tensors.dim() < 1:
            raise ValueError(f"{name} as one stacked tensor needs a leading K dim, got a scalar")
        return list(tensors.unbind(0))
    if not isinstance(tensors, Sequence):
        raise TypeError(f"{name} must be a sequence of tensors or a stacked tensor, got {type(tensors).__name__}")
    out = list(tensors)
    if len(out) == 0:
        raise ValueError(f"{name} is empty: at least one candidate (K >= 1) is needed")
    return out


def block_size(n: int, gpu_block: int) -> int:
    """Elements per Triton program. The interpreter runs programs one by one at ~2 ms each, so
    there a program takes (almost) everything."""
    if INTERPRET:
        return min(max(triton.next_power_of_2(max(n, 1)), 16), 1 << 16)
    return gpu_block


def register_kernel_fake(name: str):
    """register_fake for a compiled ``toponas::<name>`` op, only when the loaded extension has it
    (a stale build may lack newer ops: those then fail when called, not at import)."""

    def wrap(fn):
        if HAS_CPP and hasattr(torch.ops.toponas, name):
            torch.library.register_fake(f"toponas::{name}")(fn)
        return fn

    return wrap


def empty_contiguous(t: Tensor) -> Tensor:
    """A fake's result like ``t``: every backend's outputs are contiguous."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def empty_grads(tensors: list[Tensor], weights: Tensor) -> list[Tensor]:
    """A fake's result for the backward of a weighted sum: K gradients like ``tensors``, then one
    like ``weights``."""
    return [empty_contiguous(t) for t in tensors] + [torch.empty_like(weights)]


# Backends on which the eager path calls a ``*_fused`` op whose autograd node is in C++ (next to
# its family's kernels: csrc/mixed_sum.cpp, csrc/channel_shuffle.cpp, csrc/merged_conv.cpp).
FUSED_BACKENDS = ("cpp", "cuda")


def fused_op(name: str):
    """``torch.ops.toponas.<name>.default`` (a ``*_fused`` op, its autograd in C++), or None when
    the extension is missing or predates it."""
    return getattr(torch.ops.toponas, name).default if HAS_CPP and hasattr(torch.ops.toponas, name) else None


def device_guard(t: Tensor):
    """Triton launches go to the current CUDA device: run them under the device of ``t``
    (tensors on cuda:1 while cuda:0 is current). A no-op for CPU tensors."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def fast_path() -> bool:
    """Whether a public op may run as a thin ``torch.autograd.Function`` around its kernels.

    The ``toponas::`` custom ops cost tens of microseconds of Python dispatch per call
    (``custom_op`` + ``register_autograd``), more than a fused kernel takes on a GPU at NAS
    shapes, and a search step makes hundreds of calls. In eager mode the public functions skip
    that dispatch and call the same kernels through an autograd.Function; under
    ``torch.compile``/export and functorch transforms they use the custom ops, which carry the
    fake (meta) implementations those need. Traceable: under compilation the first test decides,
    and the functorch query (which dynamo could not trace) is never reached."""
    return not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active())
