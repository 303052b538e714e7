"""Test setup. Without a GPU the Triton kernels run in the CPU interpreter: TRITON_INTERPRET
must then be set before toponas_kernels (and triton) are imported. With a GPU it is left alone,
so the CUDA-marked "triton" cases run the compiled kernels at their GPU block sizes. Compile
caches stay in one folder."""

import os
import tempfile

import torch  # importing torch does not import triton

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "toponas_inductor"))

import pytest  # noqa: E402

import toponas_kernels  # noqa: E402
from toponas_kernels import _lib  # noqa: E402


def pytest_report_header(config):
    return (
        f"toponas_kernels {toponas_kernels.__version__} from {os.path.dirname(toponas_kernels.__file__)}; "
        f"backends {_lib.available_backends()}; cuda_built={_lib.cuda_built()}; "
        f"extension load error: {_lib.load_error}"
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "cuda_kernels: needs the compiled CUDA kernels (skipped in a build without them, e.g. TOPONAS_NO_CUDA=1)",
    )


def pytest_sessionstart(session):
    # CI sets this: a broken build must fail the run, not quietly skip every C++ test.
    if os.environ.get("TOPONAS_REQUIRE_EXT") == "1" and not _lib.HAS_CPP:
        raise pytest.UsageError(f"TOPONAS_REQUIRE_EXT=1 but the extension did not load: {_lib.load_error}")


def pytest_collection_modifyitems(config, items):
    """``cuda`` tests skip without a GPU; ``cuda_kernels`` tests skip in a build without the CUDA
    kernels, GPU or not (that reason first: it is the one a GPU owner must act on)."""
    why = _lib.load_error or _lib.build_config().get("reason") or "TOPONAS_NO_CUDA=1 or no CUDA toolkit at build time"
    no_kernels = pytest.mark.skip(reason=f"this build has no CUDA kernels ({why})")
    no_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU")
    kernels, gpu = _lib.cuda_built(), torch.cuda.is_available()
    for item in items:
        if "cuda_kernels" in item.keywords and not kernels:
            item.add_marker(no_kernels)
        elif "cuda" in item.keywords and not gpu:
            item.add_marker(no_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and immune to a loaded machine (two OpenMP
    threads on a busy 2-core box turn a 20 us conv into 100 ms)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
