"""A merged conv group as one op (``toponas::merged_conv_fused``, csrc/merged_conv.cpp, used by
``nas/forms.py``): in float64 its values and gradients equal the Python path's (``_MergedConv``
with the forms' hand-written backward) in every form and normalization; it is one dispatcher
call in forward and one in backward, with a C++ autograd node; it keeps for backward what the
Python path keeps; its ops pass opcheck; bad specs are refused naming what is wrong."""

import sys
from pathlib import Path

import pytest
import torch

from toponas_kernels import FusedMixedOp
from toponas_kernels.nas import forms as Fm
from toponas_kernels.nas import spaces as S
from test_forms import _run, _x
from utils import dilations_space, kept_bytes_fused_and_python

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import _harness as H  # noqa: E402

pytestmark = pytest.mark.skipif(Fm._MERGED_CONV is None, reason="the C++ extension lacks merged_conv_fused")

DT = torch.float64


def _op(merge, normalize, stride, space, C=6, seed=0):
    torch.manual_seed(seed)
    primitives = {"exaggerated": S.exaggerated_space(2, 3), "dilations": dilations_space()}.get(space)
    return FusedMixedOp(C, stride, merge=merge, normalize=normalize, primitives=primitives).to(DT)


def _python_path(monkeypatch):
    monkeypatch.setattr(Fm, "_MERGED_CONV", None)


@pytest.mark.parametrize("merge", Fm.FORMS)
@pytest.mark.parametrize("normalize", ["channel", "tensor", "none"])
@pytest.mark.parametrize("stride,space", [(1, "darts"), (2, "darts"), (1, "exaggerated"), (2, "dilations")])
def test_fused_group_equals_the_python_path(merge, normalize, stride, space, monkeypatch):
    op = _op(merge, normalize, stride, space)
    x = _x(6, 7, stride)
    w = torch.softmax(torch.randn(len(op.primitives), dtype=DT), 0)
    fused = _run(op, x, w)
    with monkeypatch.context() as m:
        _python_path(m)
        python = _run(op, x, w)
    for a, b in zip(fused, python):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def _counts(op, x, w):
    x = x.detach().requires_grad_()
    with H.OpCounter() as fwd:
        y = op(x, w)
    with H.OpCounter() as bwd:
        y.sum().backward()
    return fwd.counts, bwd.counts


@pytest.mark.parametrize("merge", Fm.FORMS)
def test_one_dispatcher_call_per_group_each_way(merge):
    """Each merged group is one ``merged_conv_kernel`` call in forward and one
    ``merged_conv_backward_kernel`` call in backward, and nothing else of the group reaches the
    dispatcher (no merge_kernels, statistics or depthwise convs of its own)."""
    op = _op(merge, "channel", 1, "darts")
    x, w = _x(6, 7, 1), torch.softmax(torch.randn(len(op.primitives), dtype=DT), 0)
    groups = len(op.merge_forms())
    assert groups >= 1
    fwd, bwd = _counts(op, x, w)
    assert fwd["toponas::merged_conv_kernel"] == groups
    assert bwd["toponas::merged_conv_backward_kernel"] == groups
    assert "toponas::merge_kernels_kernel" not in fwd and "toponas::merge_kernels_backward_kernel" not in bwd


def test_backward_node_is_cpp():
    """The group's autograd node is the C++ Function, not a Python ``autograd.Function``."""
    x, coefs, tensors, pattern, spec, eps = _group_args("separable")
    x.requires_grad_()
    y = torch.ops.toponas.merged_conv_fused(x, coefs, tensors, pattern, spec, eps)
    assert type(y.grad_fn).__name__ == "CppNode<MergedConvFunction>" or "MergedConv" in y.grad_fn.name()
    assert not isinstance(y.grad_fn, torch.autograd.function.BackwardCFunction)


@pytest.mark.parametrize("merge", Fm.FORMS)
def test_keeps_no_more_for_backward_than_the_python_path(merge, monkeypatch):
    op = _op(merge, "channel", 1, "darts")
    x = _x(6, 9, 1).requires_grad_()
    w = torch.softmax(torch.randn(len(op.primitives), dtype=DT), 0).requires_grad_()
    fused, python = kept_bytes_fused_and_python(op, x, w, monkeypatch, Fm, "_MERGED_CONV")
    assert 0 < fused <= python


def _group_args(merge, normalize="channel"):
    op = _op(merge, normalize, 1, "darts", C=4)
    x = _x(4, 5, 1)
    op(x, torch.softmax(torch.randn(len(op.primitives), dtype=DT), 0))
    group = next(iter(op._groups.values()))
    tensors = [t.detach().clone() for p in group.node.parts for t in op._module(p).kernel_tensors()]
    coefs = torch.rand(len(group.node.parts), dtype=DT)
    pattern = Fm._shift_pattern(group.node, x) if merge != "dense" and normalize != "none" else None
    return x, coefs, tensors, pattern, group.spec("cpu"), group.eps


@pytest.mark.parametrize("merge", Fm.FORMS)
def test_opcheck(merge):
    x, coefs, tensors, pattern, spec, eps = _group_args(merge)
    torch.library.opcheck(torch.ops.toponas.merged_conv_kernel.default, (x, coefs, tensors, pattern, spec, eps))
    y = torch.ops.toponas.merged_conv_kernel(x, coefs, tensors, pattern, spec, eps)
    g = torch.randn_like(y)
    for need_x in (True, False):
        torch.library.opcheck(
            torch.ops.toponas.merged_conv_backward_kernel.default, (g, x, coefs, tensors, pattern, spec, eps, need_x)
        )
    xs = x.clone().requires_grad_()
    ts = [t.clone().requires_grad_() for t in tensors]
    torch.library.opcheck(torch.ops.toponas.merged_conv_fused.default, (xs, coefs.clone().requires_grad_(), ts, pattern, spec, eps))


@pytest.mark.parametrize("merge", Fm.FORMS)
def test_gradcheck(merge):
    x, coefs, tensors, pattern, spec, eps = _group_args(merge)
    x = x[:1, :, :4, :4].clone().requires_grad_()
    n = len(tensors)

    def f(x, coefs, *ts):
        return torch.ops.toponas.merged_conv_fused(x, coefs, list(ts), pattern, spec, eps)

    args = (x, coefs.requires_grad_(), *[t.requires_grad_() for t in tensors])
    assert torch.autograd.gradcheck(f, args, atol=1e-7, rtol=1e-5)
    assert n == len(args) - 2


def test_bad_spec_is_refused():
    x, coefs, tensors, pattern, spec, eps = _group_args("stacked")
    with pytest.raises(RuntimeError, match="spec has"):
        torch.ops.toponas.merged_conv_kernel(x, coefs, tensors, pattern, spec[:-1], eps)
    with pytest.raises(RuntimeError, match="form must be"):
        torch.ops.toponas.merged_conv_kernel(x, coefs, tensors, pattern, [7] + spec[1:], eps)
    with pytest.raises(RuntimeError, match="shift pattern"):
        torch.ops.toponas.merged_conv_kernel(x, coefs, tensors, None, spec, eps)
    with pytest.raises(RuntimeError, match="kernel tensors"):
        torch.ops.toponas.merged_conv_kernel(x, coefs, tensors[:-1], pattern, spec, eps)
    with pytest.raises(RuntimeError, match="coefs"):
        torch.ops.toponas.merged_conv_kernel(x, coefs[:-1], tensors, pattern, spec, eps)
