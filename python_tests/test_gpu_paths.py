"""The GPU launch paths: compiled Triton (not the interpreter) where a GPU is visible, and
launches under the device of the tensors, not the current one."""

from types import SimpleNamespace

import pytest
import torch

from toponas_kernels import ops
from toponas_kernels.ops import _common
from toponas_kernels.ops import reference as R
from utils import assert_close


def test_device_guard_targets_the_tensors_device():
    guard = _common.device_guard(SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(_common.device_guard(torch.zeros(1)), torch.cuda.device)


@pytest.mark.cuda
def test_gpu_runs_compiled_triton():
    """With a GPU visible the tests must not interpret Triton (conftest leaves it off), so the
    "triton-cuda" cases run the compiled kernels at their GPU block sizes."""
    assert not _common.INTERPRET
    assert _common.block_size(10, 1024) == 1024


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.cuda_kernels)])
def test_ops_on_a_second_gpu(backend):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    dev = torch.device("cuda", 1)
    assert torch.cuda.current_device() == 0
    ys = [torch.randn(3, 5, 7, device=dev, requires_grad=True) for _ in range(3)]
    w = torch.randn(3, device=dev, requires_grad=True)
    out = ops.mixed_sum(ys, w, backend=backend)
    out.sum().backward()
    assert_close(out, R.mixed_sum_ref(ys, w), what="mixed_sum on cuda:1")
    ks = [torch.randn(4, 2, k, k, device=dev) for k in (3, 5)]
    assert_close(ops.merge_kernels(ks, w[:2], [1, 1], backend=backend), R.merge_kernels_ref(ks, w[:2], [1, 1]), what="merge")
    x = torch.randn(2, 6, 3, 3, device=dev)
    assert torch.equal(ops.channel_shuffle(x, 3, backend=backend), R.channel_shuffle_ref(x, 3))
    logits = torch.randn(4, 6, device=dev)
    assert_close(ops.masked_softmax(logits, backend=backend), torch.softmax(logits, -1), what="softmax")
