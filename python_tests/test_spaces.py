"""Search spaces as data (toponas_kernels/nas/spaces.py) and the plain modules built from them
(nas/operations.py): the chains match docs/REFERENCE.md, stride placement, structural equality,
user-declared spaces, errors."""

import pytest
import torch
import torch.nn.functional as F

from toponas_kernels.nas import operations as O
from toponas_kernels.nas import spaces as S
from toponas_kernels.ops.reference import embed_ref


pytestmark = pytest.mark.usefixtures("one_thread")


def test_darts_space_order_and_chains():
    sp = S.DARTS_SPACE
    assert sp.names == S.DARTS_PRIMITIVES == (
        "none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
        "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5",
    )
    sep = (S.ReLU(), S.Conv(3, separable=True), S.BN())
    assert sp["sep_conv_3x3"].chain(1) == sep + sep
    assert sp["dil_conv_5x5"].chain(1) == (S.ReLU(), S.Conv(5, dilation=2, separable=True), S.BN())
    # pools carry their search-time BN as one atomic module
    assert sp["max_pool_3x3"].chain(1) == (S.Pool("max", 3, bn=True),)
    assert sp["avg_pool_3x3"].chain(1) == (S.Pool("avg", 3, bn=True),)
    assert sp["skip_connect"].chain(1) == (S.Identity(),)
    assert sp["none"].chain(1) == (S.Zero(),)


def test_stride_goes_to_first_strideable_module_only():
    sp = S.DARTS_SPACE
    sep2 = sp["sep_conv_5x5"].chain(2)
    assert sep2[1] == S.Conv(5, stride=2, separable=True)
    assert sep2[4] == S.Conv(5, stride=1, separable=True)  # second depthwise: no stride
    assert sp["dil_conv_3x3"].chain(2)[1] == S.Conv(3, stride=2, dilation=2, separable=True)
    assert sp["max_pool_3x3"].chain(2) == (S.Pool("max", 3, stride=2, bn=True),)
    assert sp["none"].chain(2) == (S.Zero(2),)
    assert sp["skip_connect"].chain(2) == (S.ReLU(), S.FactorizedReduce(), S.BN())


def test_nb201_space():
    sp = S.NB201_SPACE
    assert sp.names == S.NB201_PRIMITIVES
    assert sp["nor_conv_1x1"].chain(1) == (S.ReLU(), S.Conv(1), S.BN())
    assert sp["nor_conv_3x3"].chain(1) == (S.ReLU(), S.Conv(3), S.BN())
    assert sp["avg_pool_3x3"].chain(1) == (S.Pool("avg", 3),)  # no BN after NB201's pool


def test_exaggerated_space_defaults_and_sizes():
    sp = S.exaggerated_space()
    assert len(sp) == 3 + 5 + 7
    assert sp.names[:3] == ("skip_connect", "max_pool_3x3", "avg_pool_3x3")
    assert sp.names[3:8] == tuple(f"dil_conv_{k}x{k}" for k in (3, 5, 7, 9, 11))
    assert sp.names[8:] == tuple(f"sep_conv_{k}x{k}" for k in (3, 5, 7, 9, 11, 13, 15))
    small = S.exaggerated_space([3, 7], [5])
    assert small.names == ("skip_connect", "max_pool_3x3", "avg_pool_3x3", "dil_conv_3x3", "dil_conv_7x7", "sep_conv_5x5")
    assert S.get_space("exaggerated", num_sep_dil=1, num_double_sep=2).names[3:] == (
        "dil_conv_3x3", "sep_conv_3x3", "sep_conv_5x5",
    )


def test_structural_equality_not_names():
    assert S.Conv(3, separable=True) == S.Conv(3, separable=True)
    assert S.Conv(3, separable=True) != S.Conv(3, dilation=2, separable=True)
    assert S.Conv(3) != S.Conv(3, separable=True)
    assert S.Conv(3) != S.Conv(3, groups=2)
    assert S.ReLU() == S.ReLU() and S.BN() != S.ReLU()
    assert S.Pool("max", 3, bn=True) != S.Pool("max", 3)
    assert hash(S.Conv(5, stride=2)) == hash(S.Conv(5, stride=2))


def test_user_declared_space_and_subset():
    mine = S.SearchSpace(
        "mine",
        [
            S.OpDef("a", [S.ReLU(), S.Conv(3), S.BN()]),
            S.OpDef("b", [S.Pool("avg", 5)]),
        ],
    )
    assert mine.names == ("a", "b") and "a" in mine
    assert mine.chains(2)[1] == (S.Pool("avg", 5, stride=2),)
    assert S.DARTS_SPACE.subset(["dil_conv_3x3", "none"]).names == ("dil_conv_3x3", "none")


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="primitives"):
        S.DARTS_SPACE.subset(["sep_conv_7x7"])
    with pytest.raises(ValueError, match="space"):
        S.get_space("resnet")
    with pytest.raises(ValueError, match="kernel"):
        S.Conv(4)
    with pytest.raises(ValueError, match="unique"):
        S.SearchSpace("dup", [S.OpDef("a", [S.ReLU()]), S.OpDef("a", [S.BN()])])
    with pytest.raises(ValueError, match="stride"):
        S.OpDef("relu_only", [S.ReLU()]).chain(2)
    with pytest.raises(TypeError, match="basic module"):
        S.OpDef("bad", [torch.nn.ReLU()])
    with pytest.raises(ValueError, match="num_double_sep"):
        S.exaggerated_space(2, [3, 3])
    with pytest.raises(ValueError, match="exaggerated"):
        S.get_space("darts", num_sep_dil=3)


@pytest.mark.parametrize("space", [S.DARTS_SPACE, S.NB201_SPACE, S.exaggerated_space(2, 2)], ids=lambda s: s.name)
@pytest.mark.parametrize("stride", [1, 2])
def test_every_op_builds_and_runs(space, stride):
    x = torch.randn(2, 6, 8, 8)
    for op in space:
        m = O.build_op(op, 6, stride)
        assert isinstance(m, O.OpChain) and len(m) == len(op.chain(stride)) and m.op_name == op.name
        assert m(x).shape == (2, 6, 8 // stride, 8 // stride)


@pytest.mark.parametrize("spec", [S.Conv(3, separable=True), S.Conv(5, dilation=2, separable=True, stride=2), S.Conv(3, groups=2)])
def test_dense_kernel_is_exact(spec):
    """A conv unit equals one conv with its dense kernel (embedded with its dilation)."""
    torch.manual_seed(1)
    unit = O.ConvUnit(4, 4, spec).double()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    k = unit.dense_kernel()
    kernel = embed_ref(k, spec.dilation, spec.span)
    y = F.conv2d(x, kernel, None, spec.stride, spec.span // 2, 1, spec.merge_groups)
    torch.testing.assert_close(y, unit(x), atol=1e-12, rtol=1e-12)


def test_named_reference_ops():
    assert O.SepConv(4, 3, 2).chain == S.DARTS_SPACE["sep_conv_3x3"].chain(2)
    assert O.DilConv(4, 5).chain == S.DARTS_SPACE["dil_conv_5x5"].chain(1)
    rcb = O.ReLUConvBN(4, 8, 1)
    assert rcb(torch.randn(1, 4, 5, 5)).shape == (1, 8, 5, 5)
    fr = O.FactorizedReduce(4, 6, affine=True)
    assert fr(torch.randn(1, 4, 6, 6)).shape == (1, 6, 3, 3)
    m = O.chosen_module("nor_conv_3x3", 4, space="nb201")
    assert m[2].affine and m.chain == (S.ReLU(), S.Conv(3), S.BN())
    with pytest.raises(ValueError, match="name"):
        O.chosen_module("nor_conv_3x3", 4)  # not a DARTS op
