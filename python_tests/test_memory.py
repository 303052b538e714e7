"""The public memory meter (``toponas_kernels.memory_meter``): exact peak bytes of a block and
bytes autograd keeps for backward, each storage once."""

from __future__ import annotations

import pytest
import torch

import toponas_kernels as tk
from toponas_kernels import measure_memory, memory_meter
from toponas_kernels.nas.networks import DartsSearchNetwork


def test_exported_from_the_package():
    assert "memory_meter" in tk.__all__ and "measure_memory" in tk.__all__


def test_a_tensor_saved_for_backward_counts_its_bytes_exactly():
    a = torch.randn(1000, requires_grad=True)  # a leaf that requires grad: a parameter
    with memory_meter("cpu") as m:
        b = a * 2  # a scalar factor: mul saves nothing of b
        c = b.exp()  # exp saves its result
    assert m.saved_bytes == c.nelement() * c.element_size() == 4000
    assert m.saved_param_bytes == 0
    with memory_meter("cpu") as m:
        (a * a).sum()  # mul saves both operands: the parameter, once
    assert m.saved_bytes == 0 and m.saved_param_bytes == 4000


def test_views_of_one_storage_count_once():
    a = torch.randn(1000, dtype=torch.float64, requires_grad=True)
    with memory_meter("cpu") as m:
        b = a * 2
        outs = [b.sin(),  # saves b
                b[:500].cos(),  # saves a view of b: the same storage
                b[500:].view(10, 50).tanh()]  # saves its own result, a new storage of 500 doubles
    assert m.saved_bytes == 8000 + 4000
    del outs


def test_params_argument_sets_what_counts_as_a_parameter():
    lin = torch.nn.Linear(16, 8, bias=False)
    x = torch.randn(4, 16, requires_grad=True)  # a leaf that requires grad, but not a parameter of lin
    with memory_meter("cpu", params=lin) as m:
        y = lin(x)  # saves the input and the weight (each needed for the other's gradient)
    assert m.saved_bytes == x.nelement() * 4 and m.saved_param_bytes == lin.weight.nelement() * 4
    with memory_meter("cpu", params=[]) as m:
        y = lin(x)
    del y
    assert m.saved_bytes == (x.nelement() + lin.weight.nelement()) * 4 and m.saved_param_bytes == 0


def test_saved_bytes_drop_after_backward_so_steps_do_not_add_up():
    a = torch.randn(256, requires_grad=True)
    with memory_meter("cpu") as once:
        (a * 2).exp().sum().backward()
    with memory_meter("cpu") as thrice:
        for _ in range(3):
            (a * 2).exp().sum().backward()
    assert once.saved_bytes == thrice.saved_bytes == 1024
    with memory_meter("cpu") as kept:  # graphs kept alive: every step's storage is held
        losses = [(a * 2).exp().sum() for _ in range(3)]
    assert kept.saved_bytes == 3 * 1024
    del losses


def test_backward_still_correct_under_the_meter():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    net = net.double()
    net(x).square().sum().backward()
    ref = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    with memory_meter("cpu", params=net) as m:
        net(x).square().sum().backward()
    assert m.saved_bytes > 0
    for p, g in zip(net.parameters(), ref):
        assert torch.equal(p.grad, g)


def test_cpu_peak_is_exact_and_counts_frees():
    with memory_meter("cpu", saved=False) as m:
        a = torch.empty(1_000_000, dtype=torch.uint8)
        b = torch.empty(500_000, dtype=torch.uint8)
        del a
        c = torch.empty(300_000, dtype=torch.uint8)  # fits where a was: the peak stays 1.5 MB
    assert m.peak_bytes == 1_500_000
    assert m.saved_bytes is None
    del b, c


def test_cpu_peak_is_the_same_on_every_run_of_a_step():
    """The resident high-water mark would read the second run near 0 (the heap freed by the
    first is reused); allocator events give the same bytes each time."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(8 * 14 * 14, 10))
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))

    def step():
        net.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()

    step()
    first = measure_memory(step, "cpu", params=net)
    second = measure_memory(step, "cpu", params=net)
    assert first.peak_bytes == second.peak_bytes > 0
    assert first.saved_bytes == second.saved_bytes > 0


def test_a_network_that_recomputes_keeps_fewer_bytes_for_backward():
    torch.manual_seed(0)
    net = DartsSearchNetwork(C=4, layers=3, mode="topo")
    x = torch.randn(2, 3, 8, 8)
    keep = measure_memory(lambda: net(x).sum(), "cpu", params=net, peak=False)
    net.recompute = True
    rerun = measure_memory(lambda: net(x).sum(), "cpu", params=net, peak=False)
    assert 0 < rerun.saved_bytes < keep.saved_bytes / 4
    assert keep.peak_bytes is None


def test_bad_arguments_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="device"):
        memory_meter("tpu")
    with pytest.raises(ValueError, match="device"):
        memory_meter(3.5)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            memory_meter("cuda")
    with memory_meter("cpu"):
        with pytest.raises(RuntimeError, match="do not nest"):
            with memory_meter("cpu"):
                pass
        # the refused meter left no saved-tensor hooks of its own behind (the outer one's are on)
        outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
    assert outer is not None and torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    with memory_meter("cpu") as m:
        with pytest.raises(RuntimeError, match="GPU only"):
            m.current_peak_bytes()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_peak_is_the_allocated_delta():
    keep = torch.empty(1 << 20, device="cuda")  # allocated before: not counted
    with memory_meter("cuda", saved=False) as m:
        a = torch.empty(1 << 20, device="cuda")
        b = torch.empty(1 << 19, device="cuda")
        del a
        c = torch.empty(1 << 18, device="cuda")
    assert m.peak_bytes == 4 * ((1 << 20) + (1 << 19))
    del keep, b, c
