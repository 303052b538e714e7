"""Loads the compiled extension if it is there, and says what is available.

The package works without the extension: the reference and Triton backends do not need it.
A missing or broken extension is reported once (``load_error``), never raised at import.

What was built and installed is fixed for the life of the process, so it is decided once, here,
as constants (``HAS_CPP``, ``CUDA_BUILT``, ``HAS_TRITON``, ``TRITON_INTERPRET``): the backend
choice made on every op call then reads plain Python values, which ``torch.compile`` folds into
the graph and guards on. A dispatcher query such as ``torch._C._dispatch_has_kernel_for_dispatch_key``
returns a non-tensor that dynamo cannot trace; made per call it would break the graph at every
fused op on CUDA tensors. Whether a GPU is visible is asked per call
(``torch.cuda.is_available()``, which dynamo evaluates while tracing) so that importing the
package does not initialize CUDA.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent

load_error: str | None = None
try:
    from . import _C  # noqa: F401  (registers the toponas::*_kernel ops with the dispatcher)

    HAS_CPP = True
except Exception as exc:  # ImportError, or an undefined symbol from a mismatched torch
    HAS_CPP = False
    load_error = f"{type(exc).__name__}: {exc}"
    if (_HERE.parent / "setup.py").exists() and not any(_HERE.glob("_C*.so")):
        load_error = (
            f"toponas_kernels was imported from its source tree ({_HERE}), which has no compiled "
            "_C: run from another directory to use the installed package, or build in place with "
            "`pip install --no-build-isolation -e .`"
        )


def build_config() -> dict:
    """The configuration recorded by setup.py when the package was built ({} if unknown)."""
    path = _HERE / "_build_config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# The extension carries CUDA kernels (whether or not a GPU is present).
CUDA_BUILT: bool = HAS_CPP and torch._C._dispatch_has_kernel_for_dispatch_key("toponas::mixed_sum_kernel", "CUDA")

# Triton is optional: without it the triton backend is unavailable, nothing else changes.
try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401  (what the kernels are written in: both or neither)

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the installation
    HAS_TRITON = False

# Triton's CPU interpreter: Triton reads the variable when its kernels are defined, at import.
TRITON_INTERPRET: bool = os.environ.get("TRITON_INTERPRET") == "1"


def cuda_built() -> bool:
    """True when the compiled extension carries CUDA kernels (whether or not a GPU is present);
    ``CUDA_BUILT``, for callers that want a function."""
    return CUDA_BUILT


def triton_available() -> bool:
    """Triton can run here: an NVIDIA GPU is visible, or the CPU interpreter is switched on.
    Traceable by ``torch.compile`` (no import, no dispatcher query)."""
    return HAS_TRITON and (TRITON_INTERPRET or torch.cuda.is_available())


def available_backends() -> list[str]:
    """Backends usable on this machine, now."""
    names = ["reference"]
    if triton_available():
        names.append("triton")
    if HAS_CPP:
        names.append("cpp")
    if CUDA_BUILT and torch.cuda.is_available():
        names.append("cuda")
    return names
