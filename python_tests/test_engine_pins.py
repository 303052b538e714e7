"""Pins of the simplification engine and of the documented defaults, on user-declared spaces
that exercise what the built-in spaces do not: convs of different strides on one edge, equal
parametric modules at a shareable position, a candidate that is a prefix of another. Each
rewritten mode must still compute what plain computes wherever the rewrite is exact (fp64)."""

import inspect

import pytest
import torch

from toponas_kernels import FusedMixedOp, ops
from toponas_kernels.nas import spaces as S
from toponas_kernels.nas.simplify import Merged, count, simplify_space

pytestmark = pytest.mark.usefixtures("one_thread")
DT = torch.float64


def _merged_nodes(node):
    if isinstance(node, Merged):
        yield node
    for child in getattr(node, "items", ()):
        yield from _merged_nodes(child)
    for b in getattr(node, "branches", ()):
        yield from _merged_nodes(b.node)


def _equal_to_plain(space, modes, H=6, stride=1):
    """Every mode (merging without normalization) gives plain's output and gradients."""
    torch.manual_seed(1)
    plain = FusedMixedOp(4, stride, primitives=space, mode="plain").to(DT)
    x = torch.randn(2, 4, H, H, dtype=DT, requires_grad=True)
    alpha = torch.randn(len(space), dtype=DT, requires_grad=True)

    def run(op):
        out = op(x, torch.softmax(alpha, 0))
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=DT).view_as(out)).sum(), [x, alpha])
        return out, *grads

    expected = run(plain)
    for mode in modes:
        op = FusedMixedOp(4, stride, primitives=space, mode=mode, normalize=False).to(DT)
        op.load_state_dict(plain.state_dict())
        for a, e in zip(run(op), expected):
            torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10, msg=lambda m: f"{mode}: {m}")


def test_convs_of_different_strides_are_never_merged():
    space = S.SearchSpace(
        "strides",
        [
            S.OpDef("c3s2", [S.ReLU(), S.Conv(3, stride=2)]),
            S.OpDef("c3", [S.ReLU(), S.Conv(3)]),
            S.OpDef("c5s2", [S.ReLU(), S.Conv(5, stride=2)]),
        ],
    )
    graph = simplify_space(space, mode="topo")
    merged = list(_merged_nodes(graph.root))
    for node in merged:
        assert len({p.module.stride for p in node.parts}) == 1, node
    assert sorted(len(m.parts) for m in merged) == [1, 2]  # {c3s2, c5s2} and c3 alone
    assert count(graph).conv == 2
    # On a 1x1 map every stride gives a 1x1 output, so the sum is defined and must match plain.
    _equal_to_plain(space, ["pms", "topo"], H=1)


def test_equal_parametric_modules_are_not_shared():
    """Two candidates start with equal convs (equal descriptions, different weights): only
    parameter-free modules may be shared."""
    space = S.SearchSpace(
        "equal_convs",
        [
            S.OpDef("conv_relu", [S.Conv(3), S.ReLU()]),
            S.OpDef("conv_bn", [S.Conv(3), S.BN()]),
            S.OpDef("conv_pool", [S.Conv(3), S.Pool("max", 3)]),
        ],
    )
    for mode in ("pms", "pms+fms", "topo"):
        assert count(simplify_space(space, mode=mode)).conv == 3, mode
    _equal_to_plain(space, ["pms", "fms", "pms+fms", "topo"])


def test_candidate_that_is_a_prefix_of_another():
    space = S.SearchSpace(
        "prefix",
        [
            S.OpDef("relu_pool", [S.ReLU(), S.Pool("max", 3)]),
            S.OpDef("relu_pool_conv", [S.ReLU(), S.Pool("max", 3), S.Conv(1), S.BN()]),
            S.OpDef("relu_conv", [S.ReLU(), S.Conv(3)]),
        ],
    )
    # ReLU shared by all three, the pool by the first two: one ReLU and one pool remain.
    assert count(simplify_space(space, mode="pms")) == (2, 3)
    _equal_to_plain(space, ["pms", "pms+fms", "topo"])


def test_kernel_normalization_is_per_output_channel_by_default():
    """Checked against the definition, not the reference implementation: each output channel of
    a normalized kernel has mean 0 and population std s / (s + eps)."""
    k = torch.randn(5, 3, 3, 3, dtype=DT) * torch.arange(1, 6, dtype=DT).view(5, 1, 1, 1) + torch.arange(5, dtype=DT).view(5, 1, 1, 1)
    out = ops.merge_kernels([k], torch.ones(1, dtype=DT))
    flat, src = out.flatten(1), k.flatten(1)
    s = src.std(dim=1, unbiased=False)
    torch.testing.assert_close(flat.mean(1), torch.zeros(5, dtype=DT), atol=1e-12, rtol=0)
    torch.testing.assert_close(flat.std(1, unbiased=False), s / (s + 1e-5), atol=1e-12, rtol=0)
    assert FusedMixedOp(4).normalize == "channel"


def _defaults(fn):
    return {k: v.default for k, v in inspect.signature(fn).parameters.items() if v.default is not inspect.Parameter.empty}


def test_documented_defaults():
    assert _defaults(ops.merge_kernels) == {"dilations": None, "normalize": "channel", "eps": 1e-5, "backend": None}
    assert _defaults(ops.masked_softmax) == {"mask": None, "tau": 1.0, "backend": None}
    assert _defaults(ops.gumbel_softmax) == {"mask": None, "tau": 1.0, "hard": True, "generator": None, "backend": None}
    d = _defaults(FusedMixedOp)
    assert d == {
        "stride": 1, "primitives": None, "space": None, "mode": "topo", "normalize": True,
        "partial_channels": None, "affine": False, "track_running_stats": True, "bias": False, "eps": 1e-5,
        "backend": None, "recompute": None, "merge": "auto",
    }  # fmt: skip
    op = FusedMixedOp(8)  # space None: inferred from the primitives, DARTS' without them
    assert op.primitives == S.DARTS_PRIMITIVES and op.recompute and op.partial_channels == 1
    assert all(m.track_running_stats for m in op.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not any(m.bias is not None for m in op.modules() if isinstance(m, torch.nn.Conv2d))
    assert not FusedMixedOp(8, mode="pms").recompute
    assert not any(m.affine for m in op.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_merged_kernels_live_on_the_dilated_lattice():
    """A group of dilated convs stores its merged kernel at the gcd of the dilations: DARTS'
    dil convs (d2, spans 5 and 9) as 5 x 5 at d2, the sep convs (d1) as 5 x 5; d2 + d4 + a 1x1
    (whose centre tap is on any lattice) at d2; d2 + d3 at d1. The conv run is the same
    (exactness: test_reparameterization_is_exact_without_normalization)."""
    from utils import dilations_space

    def groups(space):
        return list(_merged_nodes(simplify_space(space, mode="topo").root))

    darts = sorted((m.size, m.dilation, m.lattice, m.lattice_dilations()) for m in groups(S.DARTS_SPACE))
    assert darts == [(5, 1, 5, [1, 1]), (5, 1, 5, [1, 1]), (9, 2, 5, [1, 1])]
    [node] = groups(dilations_space())
    assert (node.size, node.dilation, node.lattice, node.lattice_dilations()) == (9, 2, 5, [1, 2, 1, 1])
    unit = lambda k, d: (S.ReLU(), S.Conv(k, dilation=d, separable=True), S.BN())  # noqa: E731
    coprime = S.SearchSpace("coprime", [S.OpDef("a", unit(3, 2)), S.OpDef("b", unit(3, 3))])
    [node] = groups(coprime)
    assert (node.size, node.dilation, node.lattice, node.lattice_dilations()) == (7, 1, 7, [2, 3])
    text = simplify_space(S.DARTS_SPACE, mode="topo").format()
    assert "merged conv5x5 d2 = " in text and "merged conv5x5 = " in text
