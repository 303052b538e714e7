"""The recomputed parameter-free tails of a TopoNAS edge as one op (``toponas::light_sum_fused``,
csrc/light_sum.cpp, used by ``FusedMixedOp._recomputed_sum``): in float64 its values, gradients
and BN running statistics equal the Python path's (``_Recomputed``), in training and in eval
mode; no Python ``_Recomputed`` runs in a DARTS topo step's backward; it keeps no more for
backward; the op passes opcheck and gradcheck on odd, non-contiguous inputs; bad specs are
refused."""

import pytest
import torch
from torch import nn

from toponas_kernels import FusedMixedOp
from toponas_kernels.nas import _autograd as A
from toponas_kernels.nas import run_graph as MO
from toponas_kernels.nas.networks import DartsSearchNetwork
from test_forms import _run, _x
from utils import kept_bytes_fused_and_python

pytestmark = pytest.mark.skipif(A._LIGHT_SUM is None, reason="the C++ extension lacks light_sum_fused")

DT = torch.float64


def _python_path(monkeypatch):
    monkeypatch.setattr(A, "_LIGHT_SUM", None)


def _buffers(module):
    return [b.clone() for b in module.buffers()]


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_fused_tails_equal_the_python_path(stride, training, track, monkeypatch):
    results = []
    for python in (False, True):
        torch.manual_seed(0)
        op = FusedMixedOp(6, stride, mode="topo", track_running_stats=track).to(DT).train(training)
        x = _x(6, 7, stride)
        w = torch.softmax(torch.randn(len(op.primitives), dtype=DT), 0)
        with monkeypatch.context() as m:
            if python:
                _python_path(m)
            got = _run(op, x, w)
        results.append((got, _buffers(op)))
    (fused, fused_bufs), (python, python_bufs) = results
    assert len(fused_bufs) == len(python_bufs)
    for a, b in zip(fused + fused_bufs, python + python_bufs):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("edge_weight", [None, 0.7])
def test_partial_channel_bypass_equals_the_python_path(edge_weight, monkeypatch):
    """PC-DARTS' bypass on a stride-2 edge (2x2 max pool, times the edge weight)."""
    results = []
    for python in (False, True):
        torch.manual_seed(0)
        op = FusedMixedOp(8, 2, mode="topo", partial_channels=4).to(DT)
        x = _x(8, 6, 2).requires_grad_()
        w = torch.softmax(torch.randn(len(op.primitives), dtype=DT), 0).requires_grad_()
        e = None if edge_weight is None else torch.tensor(edge_weight, dtype=DT, requires_grad=True)
        with monkeypatch.context() as m:
            if python:
                _python_path(m)
            y = op(x, w, edge_weight=e)
            probe = torch.randn(y.shape, dtype=DT, generator=torch.Generator().manual_seed(3))
            wrt = [x, w] + ([e] if e is not None else [])
            results.append([y.detach(), *torch.autograd.grad((y * probe).sum(), wrt)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def _recomputed_backwards(monkeypatch):
    calls = []
    original = A._Recomputed.backward

    def spy(ctx, grad):
        calls.append(1)
        return original(ctx, grad)

    monkeypatch.setattr(A._Recomputed, "backward", staticmethod(spy))
    return calls


@pytest.mark.parametrize("partial_channels", [None, 4])
def test_no_python_backward_for_the_tails_of_a_darts_step(partial_channels, monkeypatch):
    torch.manual_seed(0)
    net = DartsSearchNetwork(C=8, num_classes=10, layers=3, mode="topo", partial_channels=partial_channels).to(DT)
    calls = _recomputed_backwards(monkeypatch)
    fused = []
    monkeypatch.setattr(MO, "light_sum", lambda *a, _f=A.light_sum: fused.append(1) or _f(*a))
    out = net(torch.randn(2, 3, 8, 8, dtype=DT))
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    assert fused and not calls
    # the Python path, for contrast, runs one _Recomputed backward per recomputed sum
    monkeypatch.setattr(MO, "light_sum", lambda *a: None)
    out = net(torch.randn(2, 3, 8, 8, dtype=DT))
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    assert len(calls) == len(fused)


def test_keeps_no_more_for_backward_than_the_python_path(monkeypatch):
    op = FusedMixedOp(6, 1, mode="topo").to(DT)
    x = _x(6, 9, 1).requires_grad_()
    w = torch.softmax(torch.randn(len(op.primitives), dtype=DT), 0).requires_grad_()
    fused, python = kept_bytes_fused_and_python(op, x, w, monkeypatch, A, "_LIGHT_SUM")
    assert 0 < fused <= python


def _tails(C, stride, training=True):
    """A max pool + BN with running statistics, an average pool + BN without, a BN alone."""
    bns = [nn.BatchNorm2d(C, affine=False).to(DT), nn.BatchNorm2d(C, affine=False, track_running_stats=False).to(DT),
           nn.BatchNorm2d(C, affine=False, momentum=0.3, eps=1e-3).to(DT)]
    g = torch.Generator().manual_seed(1)  # the same statistics on every call
    for bn in bns:
        bn.train(training)
        if bn.running_mean is not None:
            bn.running_mean.uniform_(-1, 1, generator=g)
            bn.running_var.uniform_(0.5, 2, generator=g)
    tails = [A.light_tail(nn.MaxPool2d(3, stride, 1), bns[0], True),  # channels-last
             A.light_tail(nn.AvgPool2d(3, stride, 1, count_include_pad=False), bns[1], False),
             A.light_tail(None, bns[2], False)]
    return tails, bns


def _op_args(tails, inputs, w, training):
    spec = [v for s, _, _ in tails for v in s]
    floats = [v for _, f, _ in tails for v in f]
    stats = [bn for _, _, bn in tails if bn is not None]
    return (w, inputs, [b.running_mean for b in stats], [b.running_var for b in stats],
            [b.num_batches_tracked for b in stats], spec, floats, training)


def _odd_inputs(C, stride, requires_grad=False):
    # non-contiguous inputs of odd sizes: a channel slice, a transposed view, a strided view
    a = torch.randn(2, C + 2, 5, 7, dtype=DT)[:, 1:C + 1]
    b = torch.randn(2, C, 7, 5, dtype=DT).transpose(2, 3)
    c = torch.randn(2, C, 5, 14, dtype=DT)[..., ::2]
    if stride == 2:  # the BN-alone tail's input has the pooled size
        c = c[:, :, ::2, ::2]
    return [t.requires_grad_(requires_grad) for t in (a, b, c)]


@pytest.mark.parametrize("stride", [1])
@pytest.mark.parametrize("training", [True, False])
def test_opcheck_and_gradcheck(stride, training):
    C = 2
    tails, _ = _tails(C, stride, training)
    w = torch.rand(3, dtype=DT)
    inputs = _odd_inputs(C, stride)
    torch.library.opcheck(torch.ops.toponas.light_sum_fused.default, _op_args(tails, inputs, w.clone().requires_grad_(), training))

    def f(w, *xs):
        tails_, _ = _tails(C, stride, training)  # fresh statistics: every call sees the same
        return torch.ops.toponas.light_sum_fused(*_op_args(tails_, list(xs), w, training))

    args = (w.requires_grad_(), *_odd_inputs(C, stride, requires_grad=True))
    assert torch.autograd.gradcheck(f, args, atol=1e-7, rtol=1e-5)


def test_the_op_advances_running_statistics_as_the_modules_do():
    C = 4
    tails, bns = _tails(C, 1)
    ref_bns = [nn.BatchNorm2d(C, affine=False).to(DT), nn.BatchNorm2d(C, affine=False, momentum=0.3, eps=1e-3).to(DT)]
    for ref, bn in zip(ref_bns, (bns[0], bns[2])):
        ref.running_mean.copy_(bn.running_mean)
        ref.running_var.copy_(bn.running_var)
    inputs = _odd_inputs(C, 1)
    w = torch.rand(3, dtype=DT)
    y = torch.ops.toponas.light_sum_fused(*_op_args(tails, inputs, w, True))
    mp, ap = nn.MaxPool2d(3, 1, 1), nn.AvgPool2d(3, 1, 1, count_include_pad=False)
    expected = w[0] * ref_bns[0](mp(inputs[0])) + w[1] * bns[1](ap(inputs[1])) + w[2] * ref_bns[1](inputs[2])
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=1e-10)
    for ref, bn in zip(ref_bns, (bns[0], bns[2])):
        for a, b in zip(ref.buffers(), bn.buffers()):  # the first tail ran channels-last: rounding
            torch.testing.assert_close(a, b, atol=1e-14, rtol=1e-12)
        assert int(bn.num_batches_tracked) == 1


def test_light_tail_refuses_what_the_op_cannot_run():
    assert A.light_tail(nn.MaxPool2d(3, 1, 1, ceil_mode=True), None, False) is None
    assert A.light_tail(nn.MaxPool2d(3, 1, 2), None, False) is None  # padding over half the window
    assert A.light_tail(nn.MaxPool2d(3, 1, dilation=2), None, False) is None
    assert A.light_tail(nn.AvgPool2d(3, 1, 1), None, False) is None  # counts the padding
    assert A.light_tail(None, nn.BatchNorm2d(3), False) is None  # affine: has parameters
    assert A.light_tail(None, nn.BatchNorm2d(3, affine=False, momentum=None), False) is None
    assert A.light_tail(nn.Identity(), None, False) is None


def test_bad_spec_is_refused():
    tails, _ = _tails(3, 1)
    args = list(_op_args(tails, _odd_inputs(3, 1), torch.rand(3, dtype=DT), True))
    args[5] = args[5][:-1]
    with pytest.raises(RuntimeError, match="spec must hold 6 ints"):
        torch.ops.toponas.light_sum_fused(*args)
    args = list(_op_args(tails, _odd_inputs(3, 1), torch.rand(2, dtype=DT), True))
    with pytest.raises(RuntimeError, match="one weight per input"):
        torch.ops.toponas.light_sum_fused(*args)
