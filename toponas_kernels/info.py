"""``python -m toponas_kernels.info [--json]``: what this installation can do."""

from __future__ import annotations

import argparse
import json
import platform

import torch

from . import _lib
from ._version import __version__


def collect() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {
        "version": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "cpp_loaded": _lib.HAS_CPP,
        "cuda_built": _lib.cuda_built(),
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "backends": _lib.available_backends(),
        "load_error": _lib.load_error,
        "build": _lib.build_config(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toponas_kernels.info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    info = collect()
    if args.json:
        print(json.dumps(info))
        return 0
    for key, value in info.items():
        print(f"{key:15s} {value}")
    if not info["cpp_loaded"]:
        print("\nThe compiled extension is not loaded: reference and Triton backends only.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
