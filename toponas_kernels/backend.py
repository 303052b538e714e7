"""One backend choice for every op: per call (``backend=``), else the ``TOPONAS_BACKEND``
environment variable, else automatic by device.

Automatic: CUDA tensors use the CUDA kernels when they were built, else Triton, else the
reference; CPU tensors use the C++ kernels when they were built, else the reference (Triton on
CPU only runs under ``TRITON_INTERPRET=1`` and is slow, so it is never chosen automatically).
"""

from __future__ import annotations

import os

import torch

from . import _lib

BACKENDS = ("reference", "triton", "cpp", "cuda")
ENV_VAR = "TOPONAS_BACKEND"


# Resolved choices, by (backend argument, environment value, device): every op call resolves,
# and the answer for one key cannot change within a process.
_resolved: dict = {}


def resolve(backend: str | None, device: torch.device) -> str:
    """The backend to run on ``device``: checked, so a kernel is never asked to do what it cannot.

    Traceable by ``torch.compile`` on any device (``fullgraph=True`` included): it reads only
    the constants of ``_lib``, the environment and ``torch.cuda.is_available()``, which dynamo
    evaluates while tracing and guards on, so the choice is folded into the graph."""
    if torch.compiler.is_compiling():  # traced: a memo missed here would make the graph recompile
        return _resolve(backend, device)
    key = (backend, os.environ.get(ENV_VAR), device)
    name = _resolved.get(key)
    if name is None:
        name = _resolved[key] = _resolve(backend, device)
    return name


def _resolve(backend: str | None, device: torch.device) -> str:
    name = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    name = (name or "auto").strip().lower()
    if name == "auto":
        if device.type == "cuda":
            if _lib.CUDA_BUILT:
                return "cuda"
            return "triton" if _lib.triton_available() else "reference"
        if device.type == "cpu" and _lib.HAS_CPP:
            return "cpp"
        return "reference"
    source = "backend=" if backend is not None else f"{ENV_VAR}="
    if name not in BACKENDS:
        raise ValueError(f"{source}{name!r} is not a backend; expected one of {('auto',) + BACKENDS}")
    if name == "cpp":
        if not _lib.HAS_CPP:
            raise RuntimeError(
                f"{source}'cpp' needs the compiled extension, which did not load "
                f"({_lib.load_error}). Reinstall with `pip install --no-build-isolation .` or use "
                "backend='reference'."
            )
        if device.type != "cpu":
            raise ValueError(f"{source}'cpp' runs on CPU tensors; these are on {device}. Use 'cuda'.")
    elif name == "cuda":
        if device.type != "cuda":
            raise ValueError(f"{source}'cuda' runs on CUDA tensors; these are on {device}. Use 'cpp'.")
        if not _lib.CUDA_BUILT:
            raise RuntimeError(
                f"{source}'cuda': the extension was built without CUDA kernels. Rebuild with "
                "CUDA_HOME set (see README) or use backend='triton'."
            )
    elif name == "triton":
        if not _lib.triton_available():
            raise RuntimeError(
                f"{source}'triton' needs triton and an NVIDIA GPU (or TRITON_INTERPRET=1 set "
                "before import, for the slow CPU interpreter)."
            )
        if device.type == "cpu" and not _lib.TRITON_INTERPRET:
            raise ValueError(
                f"{source}'triton' got CPU tensors; Triton runs them only under TRITON_INTERPRET=1."
            )
    return name
