"""Loads the compiled extension if it is there, and says what is available.

The package works without the extension: the reference and Triton backends do not need it.
A missing or broken extension is reported once (``load_error``), never raised at import.
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


def cuda_built() -> bool:
    """True when the compiled extension carries CUDA kernels (whether or not a GPU is present)."""
    if not HAS_CPP:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("toponas::mixed_sum_kernel", "CUDA")


def triton_available() -> bool:
    """Triton can run here: an NVIDIA GPU is visible, or the CPU interpreter is switched on."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def available_backends() -> list[str]:
    """Backends usable on this machine, now."""
    names = ["reference"]
    if triton_available():
        names.append("triton")
    if HAS_CPP:
        names.append("cpp")
    if cuda_built() and torch.cuda.is_available():
        names.append("cuda")
    return names
