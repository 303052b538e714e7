"""Build script for toponas_kernels.

What gets built (printed at the start of every build and recorded in
toponas_kernels/_build_config.json):

* ``TOPONAS_NO_EXT=1``: no compiled extension at all (pure-Python install; the reference and
  Triton backends still work).
* otherwise the C++ extension ``toponas_kernels._C`` with the CPU kernels, plus the CUDA kernels
  when torch is a CUDA build and a CUDA toolkit is found. A GPU need not be present: a machine
  with a compiler and no GPU builds them too. ``TORCH_CUDA_ARCH_LIST``, ``FORCE_CUDA=1`` or
  ``TOPONAS_FORCE_CUDA=1`` demand CUDA (the build fails if no toolkit is found);
  ``TOPONAS_NO_CUDA=1`` skips it.

Without a visible GPU and without ``TORCH_CUDA_ARCH_LIST`` the CUDA kernels are built for
sm_80 and sm_90 (A100, H100/H200).
"""

import json
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _fix_cuda_home():
    """torch guesses CUDA_HOME from the nvcc on PATH; a wrapper script (/usr/local/bin/nvcc)
    makes it guess /usr/local, where there is no libcudart. Prefer a real toolkit."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc:
        guess = Path(nvcc).resolve().parent.parent
        if (guess / "include" / "cuda_runtime.h").exists():
            return
    for candidate in ("/usr/local/cuda", "/opt/cuda"):
        if (Path(candidate) / "bin" / "nvcc").exists():
            os.environ["CUDA_HOME"] = candidate
            return


def _config():
    import torch

    cfg = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "ext": not _flag("TOPONAS_NO_EXT"),
        "cuda": False,
        "cuda_home": None,
        "arch_list": None,
        "reason": "",
    }
    if not cfg["ext"]:
        cfg["reason"] = "TOPONAS_NO_EXT=1: pure-Python install"
        return cfg
    forced = bool(os.environ.get("TORCH_CUDA_ARCH_LIST")) or _flag("FORCE_CUDA") or _flag(
        "TOPONAS_FORCE_CUDA"
    )
    if _flag("TOPONAS_NO_CUDA"):
        cfg["reason"] = "TOPONAS_NO_CUDA=1: CPU kernels only"
        return cfg
    _fix_cuda_home()
    from torch.utils.cpp_extension import CUDA_HOME

    cfg["cuda_home"] = CUDA_HOME
    if torch.version.cuda is None:
        if forced:
            raise RuntimeError(
                "CUDA build requested (TORCH_CUDA_ARCH_LIST/FORCE_CUDA) but the installed torch "
                f"{torch.__version__} is not a CUDA build. Install a CUDA build of torch or unset them."
            )
        cfg["reason"] = "torch is a CPU-only build: CPU kernels only"
        return cfg
    if CUDA_HOME is None or not Path(CUDA_HOME, "bin", "nvcc").exists():
        if forced:
            raise RuntimeError(
                "CUDA build requested but no CUDA toolkit was found. Set CUDA_HOME to the toolkit "
                "(e.g. CUDA_HOME=/usr/local/cuda) or set TOPONAS_NO_CUDA=1 for a CPU-only build."
            )
        cfg["reason"] = "no CUDA toolkit found (set CUDA_HOME): CPU kernels only"
        return cfg
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # torch's arch detection needs a visible GPU; build for Ampere and Hopper instead.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    cfg["cuda"] = True
    cfg["arch_list"] = os.environ.get("TORCH_CUDA_ARCH_LIST", "detected from the visible GPU")
    cfg["reason"] = "CUDA build of torch and a CUDA toolkit found"
    return cfg


def _extensions(cfg):
    if not cfg["ext"]:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    cxx = ["-O3"]  # the C++ standard is left to torch (C++17 up to 2.13, C++20 from 2.14)
    define_macros = []
    if sys.platform != "win32":
        cxx += ["-fopenmp"]
    extra = {"cxx": cxx}
    if cfg["cuda"]:
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
        extra["nvcc"] = ["-O3", "-lineinfo"]
        define_macros.append(("TOPONAS_WITH_CUDA", None))
        ext = CUDAExtension(
            "toponas_kernels._C",
            sources,
            extra_compile_args=extra,
            define_macros=define_macros,
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "toponas_kernels._C",
            sources,
            extra_compile_args=extra,
            define_macros=define_macros,
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


cfg = _config()
print("toponas_kernels build configuration:")
for key, value in cfg.items():
    print(f"  {key:10s} {value}")
(ROOT / "toponas_kernels" / "_build_config.json").write_text(json.dumps(cfg, indent=1) + "\n")
ext_modules, cmdclass = _extensions(cfg)

setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    package_data={"toponas_kernels": ["_build_config.json"]},
)
