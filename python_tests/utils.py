"""Shared test helpers: which (backend, device) pairs to run, per-dtype tolerances, inputs of
awkward layout, and a comparison that names the worst element."""

from __future__ import annotations

import pytest
import torch

from toponas_kernels import _lib
from toponas_kernels.ops._common import INTERPRET

# Per-dtype tolerances for kernel vs reference (both accumulate in float32/float64; half types
# differ by the rounding of the output and of the reduction order).
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


# A test (or case) that runs the compiled CUDA kernels on a GPU.
CUDA_KERNELS = [pytest.mark.cuda, pytest.mark.cuda_kernels]


def backend_cases():
    """(backend, device) pairs: every backend against the reference, on CPU, and on a GPU when
    there is one (marked ``cuda`` so they skip without; the CUDA backend also ``cuda_kernels``, so
    it skips in a build without CUDA kernels while the compiled Triton cases still run)."""
    cases = []
    if _lib.HAS_CPP:
        cases.append(pytest.param("cpp", "cpu", id="cpp-cpu"))
    if _lib.triton_available() and INTERPRET:
        cases.append(pytest.param("triton", "cpu", id="triton-interp"))
    cases.append(pytest.param("reference", "cpu", id="reference-cpu"))
    cases.append(pytest.param("cuda", "cuda", id="cuda", marks=CUDA_KERNELS))
    cases.append(pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.cuda))
    return cases


def dtypes_for(device: str):
    """fp32, fp16 and fp64 everywhere; bf16 on the GPU (bf16 is broken in the Triton interpreter)."""
    out = [torch.float32, torch.float64, torch.float16]
    if device == "cuda":
        out.append(torch.bfloat16)
    return out


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (every other element of a doubled last dim)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    view = wide[..., ::2]
    assert not view.is_contiguous() or t.numel() <= 1
    return view


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, what: str = ""):
    """Like torch.testing.assert_close with the TOL table, naming the worst index on failure."""
    tol = TOL[dtype or expected.dtype]
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    err = (a - e).abs()
    bound = tol["atol"] + tol["rtol"] * e.abs()
    bad = ~(err <= bound)
    if bad.any():
        excess = torch.where(bad, err - bound, torch.zeros_like(err))
        idx = tuple(int(i) for i in torch.unravel_index(excess.argmax(), a.shape)) if a.dim() else ()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} elements out of tolerance {tol}; worst at "
            f"{idx}: got {a[idx].item():.8g}, expected {e[idx].item():.8g}"
        )


def half_masks(net, seed):
    """Random masks keeping about half the candidates of a DARTS search network, every edge
    keeping at least sep_conv_3x3, set on ``net``."""
    gen = torch.Generator().manual_seed(seed)
    masks = [torch.rand(net.mask_normal.shape, generator=gen) < 0.5 for _ in range(2)]
    for m in masks:
        m[:, 4] = True
    net.set_masks(*masks)


def saved_bytes(run, exclude) -> int:
    """Bytes autograd keeps for backward while ``run()`` executes, each storage once, the
    storages of the tensors in ``exclude`` (parameters, buffers) apart: the public meter's
    ``saved_bytes`` (``toponas_kernels.memory_meter``)."""
    from toponas_kernels import measure_memory

    return measure_memory(run, "cpu", params=list(exclude), peak=False).saved_bytes


def kept_bytes_fused_and_python(op, x, w, monkeypatch, owner, name: str) -> tuple[int, int]:
    """Bytes ``op(x, w)`` keeps for backward (``saved_bytes``, the op's parameters and buffers
    apart) with a fused op, and on the Python path (``owner.name`` set to None)."""

    def kept():
        return saved_bytes(lambda: op(x, w), [*op.parameters(), *op.buffers()])

    fused = kept()
    with monkeypatch.context() as m:
        m.setattr(owner, name, None)
        python = kept()
    return fused, python


def dilations_space():
    """A user space whose separable convs merge on a dilated lattice: dilations 2, 4 and 2 (gcd
    2) plus a 1x1 unit (its one tap is on every lattice), and a skip."""
    from toponas_kernels.nas import spaces as S

    unit = lambda k, d: (S.ReLU(), S.Conv(k, dilation=d, separable=True), S.BN())  # noqa: E731
    return S.SearchSpace(
        "dilations",
        [S.OpDef(f"k{k}d{d}", unit(k, d)) for k, d in ((3, 2), (3, 4), (5, 2), (1, 1))]
        + [S.OpDef("skip", [S.Identity()], [S.Zero(2)])],
    )


class Killed(BaseException):
    """What ``kill_after`` raises in place of a kill (a BaseException, as KeyboardInterrupt is, so
    no ``except Exception`` in a run can swallow it)."""


def kill_after(monkeypatch, cls, name: str, calls: int) -> None:
    """Make the ``calls + 1``-th call of method ``cls.name`` raise ``Killed`` before it does
    anything: a run killed mid-step, after ``calls`` whole steps (and the checkpoints they wrote).
    The run's own code has no hook for this."""
    original = getattr(cls, name)
    done = [0]

    def killing(self, *args, **kwargs):
        if done[0] == calls:
            raise Killed(f"killed in call {calls + 1} of {cls.__name__}.{name}")
        done[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, killing)
