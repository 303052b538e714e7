"""Host work of a TopoNAS step: the derived weights of many edges come out of one small
computation (``nas/coefficients.py``) equal to the per-sum definition, and a topo edge makes a
bounded number of op calls (a count through the dispatcher: deterministic, unlike a time)."""

import sys
from pathlib import Path

import pytest
import torch

from toponas_kernels.nas import FusedMixedOp
from toponas_kernels.nas.coefficients import Masses, Table
from toponas_kernels.nas.simplify import Choice, Seq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import _harness as H  # noqa: E402  (the benchmarks' op counter)

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(op, weights, mask):
    """Every coefficient the op's layout holds, from the per-sum definition (``Masses``: the
    masses of the weights and their ratios), scaled through absorbing sums as the edge does."""
    plan = op._plan(op._check_mask(mask))
    layout = op._layout(plan)
    masses = Masses(weights)
    pieces = [None] * len(layout.pieces)

    def visit(node, scale):
        if isinstance(node, Seq):
            for item in node.items:
                visit(item, None)
        elif isinstance(node, Choice):
            spec = layout.choices[id(node)]
            coefs = masses.coefficients(node)
            light, weighted = [], []
            for b, c, (kind, piece, head, tail) in zip(node.branches, coefs, spec.branches):
                c = None if (not b.folded and not node.top and b.members == node.scope) else c
                if scale is not None:
                    c = scale if c is None else c * scale
                if kind == "light":
                    light.append(c)
                    for item in head:
                        visit(item, None)
                elif kind == "merged":
                    pieces[piece] = c
                elif kind == "absorb":
                    for item in b.node.items[:-1]:
                        visit(item, None)
                    visit(b.node.items[-1], c)
                elif kind == "weighted":
                    weighted.append(c)
                    visit(b.node, None)
                else:
                    visit(b.node, None)
            if spec.weighted is not None:
                pieces[spec.weighted] = torch.stack(weighted)
            if spec.light is not None:
                pieces[spec.light] = torch.stack(light)

    visit(plan.graph.root, None)
    return layout, pieces


@pytest.mark.parametrize("space", ["darts", "exaggerated", "nb201"])
@pytest.mark.parametrize("recompute", [True, False])
def test_table_equals_the_per_sum_coefficients(space, recompute):
    """One Table over edges with different masks and strides gives every edge the coefficients
    of the per-sum definition, in float64 to rounding; a masked candidate's weight (NaN here) is
    never read, and a group of mass exactly 0 gets coefficients 0, not NaN."""
    torch.manual_seed(0)
    ops_, rows, masks = [], [], []
    K = len(FusedMixedOp(4, 1, primitives=space).primitives)
    for e, stride in enumerate([1, 2, 1, 1] if space != "nb201" else [1, 1, 1]):
        op = FusedMixedOp(4, stride, primitives=space, mode="topo", recompute=recompute)
        mask = [True] * K if e == 0 else [bool(v) for v in torch.rand(K).lt(0.7).tolist()]
        mask[-1] = True
        w = torch.softmax(torch.randn(K, dtype=torch.float64), 0)
        if e == 2:  # a group of mass 0: its conditional weights are 0
            w = w.clone()
            w[-2:] = 0.0
        w = torch.where(torch.tensor(mask), w, torch.full_like(w, float("nan")))
        ops_.append(op)
        rows.append(w)
        masks.append(mask)
    layouts = [op._layout(op._plan(tuple(m))) for op, m in zip(ops_, masks)]
    got = Table(layouts, K).compute(torch.stack(rows))
    for op, w, m, c in zip(ops_, rows, masks, got):
        layout, expected = _reference(op, w, m)
        assert c.signature == layout.signature and len(c.pieces) == len(expected)
        for a, b in zip(c.pieces, expected):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b.reshape(a.shape), atol=1e-15, rtol=1e-13)


def _edge_calls(op, C):
    torch.manual_seed(0)
    x = torch.randn(2, C, 8, 8, requires_grad=True)
    alpha = torch.randn(len(op.primitives), requires_grad=True)
    op(x, torch.softmax(alpha, 0)).sum().backward()  # warm-up: plans, layouts, forms
    with H.OpCounter() as count:
        op(x, torch.softmax(alpha, 0)).sum().backward()
    return count.total


def test_a_dense_topo_edge_makes_few_op_calls():
    """A DARTS edge in topo with dense merged convs, forward + backward, in op calls through
    the dispatcher: its merged convs rebuild their kernels in backward with a fixed handful of
    ops (no autograd graph), and its derived weights are one small computation (which a
    supernet shares between edges and cells; a lone edge pays it alone). Plain's edge makes
    about 120 calls; topo made 2.5 times as many when every merged conv ran autograd over its
    kernel build again in backward, and 1.6 times with the analytic backward."""
    plain = _edge_calls(FusedMixedOp(16, 1, mode="plain"), 16)
    topo = _edge_calls(FusedMixedOp(16, 1, mode="topo", merge="dense"), 16)
    assert plain <= 130
    assert topo <= 1.65 * plain, (topo, plain)
