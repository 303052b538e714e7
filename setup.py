"""Build script for toponas_kernels.

What gets built (printed at the start of every build and recorded in
toponas_kernels/_build_config.json, which ``python -m toponas_kernels.info --json`` reports):

* ``TOPONAS_NO_EXT=1``: no compiled extension at all (pure-Python install; the reference and
  Triton backends still work).
* otherwise the C++ extension ``toponas_kernels._C`` with the CPU kernels, plus the CUDA kernels
  when torch is a CUDA build and a CUDA toolkit of the same CUDA major version is found. A GPU
  need not be present: a machine with a compiler and no GPU builds them too. Without a toolkit,
  or with one whose major version differs from torch's (torch's extension builder would stop),
  the build says so in one line and goes on with the CPU and Triton kernels.
  ``TORCH_CUDA_ARCH_LIST``, ``FORCE_CUDA=1`` or ``TOPONAS_FORCE_CUDA=1`` demand CUDA: then either
  case stops the build with that line. ``TOPONAS_NO_CUDA=1`` skips CUDA.

Without a visible GPU and without ``TORCH_CUDA_ARCH_LIST`` the CUDA kernels are built for
sm_80 and sm_90 (A100, H100/H200).

The project metadata uses the PEP 639 license field, which setuptools reads from version 77 on;
``pip install --no-build-isolation`` does not install the build requirements, so an older
setuptools is refused here, in one line, before it reads pyproject.toml.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
MIN_SETUPTOOLS = 77


def setuptools_too_old(version: str):
    """The one-line refusal for a setuptools older than ``MIN_SETUPTOOLS``, else None."""
    match = re.match(r"(\d+)", version)
    if match is None or int(match.group(1)) >= MIN_SETUPTOOLS:
        return None
    return (
        f"toponas_kernels: setuptools {version} is too old to read this project's pyproject.toml "
        f"(PEP 639 license) - run: pip install 'setuptools>={MIN_SETUPTOOLS}'"
    )


def _flag(env, name):
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def cuda_demanded(env) -> bool:
    return bool(env.get("TORCH_CUDA_ARCH_LIST", "").strip()) or _flag(env, "FORCE_CUDA") or _flag(
        env, "TOPONAS_FORCE_CUDA"
    )


def nvcc_version(cuda_home):
    """``"13.0"`` from ``CUDA_HOME/bin/nvcc --version``; None if there is no nvcc or it says no release."""
    if not cuda_home:
        return None
    nvcc = Path(cuda_home, "bin", "nvcc")
    if not nvcc.exists():
        return None
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def cuda_decision(env, torch_version, torch_cuda, cuda_home, nvcc):
    """Whether to build the CUDA kernels: ``(cuda, reason, error)``.

    ``torch_cuda`` is ``torch.version.cuda`` (None for a CPU-only torch), ``cuda_home`` the
    toolkit torch found (None: none), ``nvcc`` that toolkit's version (None: no nvcc). ``reason``
    is one line for the build log and ``_build_config.json``; ``error`` is that line when CUDA was
    demanded and cannot be built (the build then stops with it), else None.
    """
    demanded = cuda_demanded(env)
    if _flag(env, "TOPONAS_NO_CUDA"):
        return False, "TOPONAS_NO_CUDA=1: CPU and Triton kernels only", None
    fix = "set TOPONAS_NO_CUDA=1 for a build without them"
    if torch_cuda is None:
        reason = f"torch {torch_version} is a CPU-only build: no CUDA kernels, CPU and Triton kernels only"
        demand = f"CUDA kernels demanded (TORCH_CUDA_ARCH_LIST/FORCE_CUDA/TOPONAS_FORCE_CUDA) but torch {torch_version} is a CPU-only build: install a CUDA build of torch or unset them"
        return False, reason, demand if demanded else None
    if cuda_home is None or nvcc is None:
        where = f"no nvcc in CUDA_HOME={cuda_home}" if cuda_home else "no CUDA toolkit found"
        reason = f"{where}: no CUDA kernels, CPU and Triton kernels only (set CUDA_HOME to a CUDA {torch_cuda.split('.')[0]} toolkit to build them)"
        demand = f"CUDA kernels demanded but {where}: set CUDA_HOME to a CUDA {torch_cuda.split('.')[0]} toolkit, or {fix}"
        return False, reason, demand if demanded else None
    if nvcc.split(".")[0] != torch_cuda.split(".")[0]:
        where = f"nvcc {nvcc} (CUDA_HOME={cuda_home}) does not match torch's CUDA {torch_cuda}"
        reason = f"{where}: no CUDA kernels, CPU and Triton kernels only (point CUDA_HOME at a CUDA {torch_cuda.split('.')[0]} toolkit to build them)"
        demand = f"CUDA kernels demanded but {where}: point CUDA_HOME at a CUDA {torch_cuda.split('.')[0]} toolkit, or {fix}"
        return False, reason, demand if demanded else None
    return True, f"CUDA build of torch ({torch_cuda}) and nvcc {nvcc} ({cuda_home})", None


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

    env = os.environ
    cfg = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "ext": not _flag(env, "TOPONAS_NO_EXT"),
        "cuda": False,
        "cuda_home": None,
        "nvcc": None,
        "arch_list": None,
        "reason": "",
    }
    if not cfg["ext"]:
        cfg["reason"] = "TOPONAS_NO_EXT=1: pure-Python install (reference and Triton kernels)"
        return cfg
    if not _flag(env, "TOPONAS_NO_CUDA") and torch.version.cuda is not None:
        _fix_cuda_home()
        from torch.utils.cpp_extension import CUDA_HOME

        cfg["cuda_home"] = CUDA_HOME
        cfg["nvcc"] = nvcc_version(CUDA_HOME)
    cfg["cuda"], cfg["reason"], error = cuda_decision(
        env, torch.__version__, torch.version.cuda, cfg["cuda_home"], cfg["nvcc"]
    )
    if error:
        sys.exit(f"toponas_kernels: {error}")
    if not cfg["cuda"]:
        print(f"toponas_kernels: {cfg['reason']}", file=sys.stderr)
        return cfg
    if not env.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # torch's arch detection needs a visible GPU; build for Ampere and Hopper instead.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    cfg["arch_list"] = os.environ.get("TORCH_CUDA_ARCH_LIST", "detected from the visible GPU")
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


def main():
    import setuptools

    refusal = setuptools_too_old(setuptools.__version__)
    if refusal:
        sys.exit(refusal)
    cfg = _config()
    print("toponas_kernels build configuration:")
    for key, value in cfg.items():
        print(f"  {key:10s} {value}")
    (ROOT / "toponas_kernels" / "_build_config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    ext_modules, cmdclass = _extensions(cfg)

    setuptools.setup(
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        package_data={"toponas_kernels": ["_build_config.json"]},
    )


# setuptools' build backend and `python setup.py ...` both run this file as __main__; the tests
# import it (as another name) for the functions above, without building.
if __name__ == "__main__":
    main()
