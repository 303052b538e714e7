"""What the build script decides, without building: the refusal of a setuptools too old for the
project's metadata, the CUDA decision (toolkit missing, nvcc/torch CUDA major mismatch, CUDA
demanded or not) and the reason it records for ``python -m toponas_kernels.info --json``.

setup.py sits at the root of a source checkout; it is imported here under another name, so its
``if __name__ == "__main__"`` build does not run."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

SETUP_PY = Path(__file__).resolve().parent.parent / "setup.py"
pytestmark = pytest.mark.skipif(not SETUP_PY.exists(), reason="no setup.py beside python_tests (not a source checkout)")

DEMANDS = ["TORCH_CUDA_ARCH_LIST", "FORCE_CUDA", "TOPONAS_FORCE_CUDA"]
ALL_FLAGS = DEMANDS + ["TOPONAS_NO_CUDA", "TOPONAS_NO_EXT"]


@pytest.fixture(scope="module")
def setup_module_():
    spec = importlib.util.spec_from_file_location("toponas_setup_under_test", SETUP_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_nvcc(root: Path, release: str) -> Path:
    """A toolkit folder whose bin/nvcc prints what a real nvcc of that release prints."""
    (root / "bin").mkdir(parents=True)
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(
        "#!/bin/sh\n"
        "echo 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
        f"echo 'Cuda compilation tools, release {release}, V{release}.88'\n"
        f"echo 'Build cuda_{release}.r{release}/compiler.36424714_0'\n"
    )
    nvcc.chmod(0o755)
    return root


# ------------------------------------------------------------------------------ setuptools


@pytest.mark.parametrize("version", ["65.5.0", "70.3.0", "76.1.0"])
def test_old_setuptools_is_refused_in_one_line_naming_the_fix(setup_module_, version):
    line = setup_module_.setuptools_too_old(version)
    assert line is not None and "\n" not in line
    assert version in line and "pip install 'setuptools>=77'" in line


@pytest.mark.parametrize("version", ["77.0.0", "80.9.0", "84.2.1", "100.0.0.post1"])
def test_new_setuptools_passes(setup_module_, version):
    assert setup_module_.setuptools_too_old(version) is None


def test_refusal_comes_before_setuptools_reads_the_metadata(tmp_path):
    """setup.py run as a build runs it: a setuptools 70 whose setup() would read pyproject.toml
    (here: fail loudly) is never called, torch is never imported, and one line is printed."""
    fake = tmp_path / "fake"
    (fake / "setuptools").mkdir(parents=True)
    (fake / "setuptools" / "__init__.py").write_text(
        textwrap.dedent(
            """
            __version__ = "70.3.0"
            def setup(**kwargs):
                raise AssertionError("setup() read the metadata before the version check")
            """
        )
    )
    (fake / "torch.py").write_text("raise AssertionError('torch imported before the version check')\n")
    env = {k: v for k, v in os.environ.items() if k not in ALL_FLAGS}
    env["PYTHONPATH"] = str(fake)
    result = subprocess.run(
        [sys.executable, str(SETUP_PY), "--name"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "toponas_kernels: setuptools 70.3.0 is too old to read this project's pyproject.toml (PEP 639 license)"
        " - run: pip install 'setuptools>=77'"
    ], result.stderr
    assert "AssertionError" not in result.stdout + result.stderr


# ------------------------------------------------------------------------------ nvcc


def test_nvcc_version_is_read_from_the_toolkit(setup_module_, tmp_path):
    assert setup_module_.nvcc_version(str(_fake_nvcc(tmp_path / "cuda", "12.8"))) == "12.8"
    assert setup_module_.nvcc_version(str(tmp_path / "nowhere")) is None
    assert setup_module_.nvcc_version(None) is None
    odd = tmp_path / "odd" / "bin"
    odd.mkdir(parents=True)
    (odd / "nvcc").write_text("#!/bin/sh\necho 'not a compiler'\n")
    (odd / "nvcc").chmod(0o755)
    assert setup_module_.nvcc_version(str(odd.parent)) is None


# ------------------------------------------------------------------------------ the CUDA decision

CASES = {  # name: (torch_cuda, cuda_home, nvcc, expected cuda, words in the reason)
    "match": ("13.0", "/usr/local/cuda", "13.0", True, ["13.0", "/usr/local/cuda"]),
    "minor-differs": ("13.2", "/usr/local/cuda", "13.0", True, ["13.2", "nvcc 13.0"]),
    "mismatch": ("13.0", "/opt/cuda-12", "12.8", False, ["nvcc 12.8", "torch's CUDA 13.0", "CUDA 13 toolkit"]),
    "no-toolkit": ("13.0", None, None, False, ["no CUDA toolkit found", "CUDA_HOME", "CUDA 13 toolkit"]),
    "no-nvcc": ("12.8", "/opt/broken", None, False, ["no nvcc in CUDA_HOME=/opt/broken", "CUDA 12 toolkit"]),
    "cpu-torch": (None, None, None, False, ["CPU-only build", "2.99.0"]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("demand", [None] + DEMANDS)
def test_cuda_decision(setup_module_, case, demand):
    torch_cuda, cuda_home, nvcc, expected, words = CASES[case]
    env = {demand: "8.0;9.0" if demand == "TORCH_CUDA_ARCH_LIST" else "1"} if demand else {}
    cuda, reason, error = setup_module_.cuda_decision(env, "2.99.0", torch_cuda, cuda_home, nvcc)
    assert cuda is expected
    assert reason and "\n" not in reason
    for word in words:
        assert word in reason, (word, reason)
    if expected or demand is None:
        assert error is None
        if not expected:
            assert "CPU and Triton kernels only" in reason  # the package still installs
    else:
        assert error and "\n" not in error and "demanded" in error, error
        for word in words[:1]:
            assert word in error


def test_no_cuda_wins_over_a_demand(setup_module_):
    env = {"TOPONAS_NO_CUDA": "1", "TOPONAS_FORCE_CUDA": "1"}
    cuda, reason, error = setup_module_.cuda_decision(env, "2.99.0", "13.0", None, None)
    assert (cuda, error) == (False, None) and "TOPONAS_NO_CUDA=1" in reason


def test_empty_or_false_flags_demand_nothing(setup_module_):
    for env in ({"TORCH_CUDA_ARCH_LIST": ""}, {"FORCE_CUDA": "0"}, {"TOPONAS_FORCE_CUDA": "no"}):
        assert not setup_module_.cuda_demanded(env), env


# ------------------------------------------------------------------------------ _config wiring


@pytest.fixture
def toolkit_12(tmp_path, monkeypatch):
    """A torch that says CUDA 13.0 and a CUDA_HOME whose nvcc says 12.8, no flags set."""
    import torch.utils.cpp_extension as cpp_extension

    home = _fake_nvcc(tmp_path / "cuda-12", "12.8")
    for name in ALL_FLAGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CUDA_HOME", str(home))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(home))
    return home


def test_config_records_the_mismatch_and_builds_without_cuda(setup_module_, toolkit_12, capsys):
    cfg = setup_module_._config()
    assert cfg["cuda"] is False and cfg["ext"] is True
    assert cfg["nvcc"] == "12.8" and cfg["cuda_home"] == str(toolkit_12)
    assert "nvcc 12.8" in cfg["reason"] and "torch's CUDA 13.0" in cfg["reason"]
    assert capsys.readouterr().err.strip() == f"toponas_kernels: {cfg['reason']}"
    json.dumps(cfg)  # what _build_config.json takes


def test_config_stops_in_one_line_when_cuda_was_demanded(setup_module_, toolkit_12, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    with pytest.raises(SystemExit) as stop:
        setup_module_._config()
    message = str(stop.value.code)
    assert message.startswith("toponas_kernels: CUDA kernels demanded") and "\n" not in message
    assert "nvcc 12.8" in message and "TOPONAS_NO_CUDA=1" in message


def test_config_without_extension(setup_module_, monkeypatch):
    monkeypatch.setenv("TOPONAS_NO_EXT", "1")
    cfg = setup_module_._config()
    assert cfg["ext"] is False and cfg["cuda"] is False and "TOPONAS_NO_EXT=1" in cfg["reason"]


# ------------------------------------------------------------------------------ what info reports


def test_info_reports_the_recorded_build_reason():
    from toponas_kernels import _lib, info

    build = info.collect()["build"]
    if not build:
        pytest.skip(f"no _build_config.json beside the package ({_lib.__file__})")
    assert isinstance(build.get("reason"), str) and build["reason"], build
    assert build["cuda"] == _lib.cuda_built() or not _lib.HAS_CPP, (build, _lib.cuda_built())
