"""FusedMixedOp (toponas_kernels/nas/mixed_op.py): plain mode is the DARTS / PC-DARTS MixedOp;
the rewritten modes equal plain wherever the rewrite is exact (fp64, tight tolerances) and keep
the properties that must hold where it is an approximation; masks, stride 2, derive, errors."""

import pytest
import torch
from torch import nn

import toponas_kernels
from toponas_kernels import FusedMixedOp, ops
from toponas_kernels.nas import forms
from toponas_kernels.nas import spaces as S
from toponas_kernels.nas.operations import OpChain
from utils import dilations_space, saved_bytes

DT = torch.float64
TIGHT = dict(atol=1e-10, rtol=1e-10)
MODES = ["plain", "pms", "fms", "pms+fms", "topo"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- references
# Written from the facts in docs/REFERENCE.md (DARTS / PC-DARTS definitions), independent of the
# package's modules.
def _sep(C, k, stride, affine):
    p = k // 2
    return nn.Sequential(
        nn.ReLU(inplace=False),
        nn.Conv2d(C, C, k, stride, p, groups=C, bias=False),
        nn.Conv2d(C, C, 1, bias=False),
        nn.BatchNorm2d(C, affine=affine),
        nn.ReLU(inplace=False),
        nn.Conv2d(C, C, k, 1, p, groups=C, bias=False),
        nn.Conv2d(C, C, 1, bias=False),
        nn.BatchNorm2d(C, affine=affine),
    )


def _dil(C, k, stride, affine):
    return nn.Sequential(
        nn.ReLU(inplace=False),
        nn.Conv2d(C, C, k, stride, (k - 1), dilation=2, groups=C, bias=False),
        nn.Conv2d(C, C, 1, bias=False),
        nn.BatchNorm2d(C, affine=affine),
    )


class _RefZero(nn.Module):
    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        return x.mul(0.0) if self.stride == 1 else x[:, :, :: self.stride, :: self.stride].mul(0.0)


class _RefFR(nn.Module):
    def __init__(self, C, affine):
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C, C // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(C, C // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(C, affine=affine)

    def forward(self, x):
        x = self.relu(x)
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))


def _ref_op(name, C, stride, affine=False):
    if name == "none":
        return _RefZero(stride)
    if name == "max_pool_3x3":
        return nn.Sequential(nn.MaxPool2d(3, stride, 1), nn.BatchNorm2d(C, affine=False))
    if name == "avg_pool_3x3":
        return nn.Sequential(nn.AvgPool2d(3, stride, 1, count_include_pad=False), nn.BatchNorm2d(C, affine=False))
    if name == "skip_connect":
        return nn.Identity() if stride == 1 else _RefFR(C, affine)
    if name.startswith("sep_conv"):
        return _sep(C, int(name[-1]), stride, affine)
    if name.startswith("dil_conv"):
        return _dil(C, int(name[-1]), stride, affine)
    raise KeyError(name)


class RefMixedOp(nn.Module):
    """The DARTS MixedOp."""

    def __init__(self, C, stride):
        super().__init__()
        self._ops = nn.ModuleList(_ref_op(n, C, stride) for n in S.DARTS_PRIMITIVES)

    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self._ops))


class RefPCMixedOp(nn.Module):
    """The PC-DARTS MixedOp with k partial channels."""

    def __init__(self, C, stride, k):
        super().__init__()
        self.k = k
        self.mp = nn.MaxPool2d(2, 2)
        self._ops = nn.ModuleList(_ref_op(n, C // k, stride) for n in S.DARTS_PRIMITIVES)

    def forward(self, x, weights):
        c = x.shape[1] // self.k
        xa, xb = x[:, :c], x[:, c:]
        out = sum(w * op(xa) for w, op in zip(weights, self._ops))
        xb = xb if out.shape[2] == x.shape[2] else self.mp(xb)
        y = torch.cat([out, xb], dim=1)
        b, n, h, w = y.shape
        return y.view(b, self.k, n // self.k, h, w).transpose(1, 2).reshape(b, n, h, w)


# ----------------------------------------------------------------------------- helpers
def _pair(mode="topo", C=8, stride=1, seed=0, **kw):
    """A plain op and a ``mode`` op with the same parameters (fp64)."""
    torch.manual_seed(seed)
    plain = FusedMixedOp(C, stride, mode="plain", **kw).to(DT)
    other = FusedMixedOp(C, stride, mode=mode, **kw).to(DT)
    other.load_state_dict(plain.state_dict())
    return plain, other


def _run(op, x, alpha, mask=None, probe=None):
    """Output and the grads wrt x, the weights and alpha of ``sum(y * probe)``, with weights
    softmax(alpha)."""
    x = x.detach().clone().requires_grad_(True)
    alpha = alpha.detach().clone().requires_grad_(True)
    w = torch.softmax(alpha, 0)
    w.retain_grad()
    y = op(x, w) if mask is None else op(x, w, mask)
    if probe is None:
        probe = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(7))
    (y * probe).sum().backward()
    w_grad = w.grad if w.grad is not None else torch.zeros_like(w)
    return y.detach(), x.grad, w_grad, alpha.grad


def _run_weights(op, x, w):
    x = x.detach().clone().requires_grad_(True)
    y = op(x, w)
    probe = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(7))
    (y * probe).sum().backward()
    return y.detach(), x.grad


def _same_bn_stats(*mods, C):
    g = torch.Generator().manual_seed(3)
    mean, var = torch.randn(C, generator=g, dtype=DT), torch.rand(C, generator=g, dtype=DT) + 0.5
    for mod in mods:
        for m in mod.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)


def _x(C=8, H=7, stride=1):
    if stride == 2 and H % 2:
        H += 1  # FactorizedReduce (skip at stride 2) needs even sizes, as in DARTS
    return torch.randn(2, C, H, H + 2, dtype=DT)


def _close(a, b, **tol):
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, **(tol or TIGHT))


# ----------------------------------------------------------------------------- plain == DARTS
@pytest.mark.parametrize("stride", [1, 2])
def test_plain_matches_reference_darts_mixed_op(stride):
    torch.manual_seed(0)
    ref = RefMixedOp(6, stride).to(DT)
    op = FusedMixedOp(6, stride, mode="plain").to(DT)
    op.load_plain_state(ref)
    x, alpha = _x(6, 7, stride), torch.randn(8, dtype=DT)
    _close(_run(op, x, alpha), _run(ref, x, alpha))
    # BN running statistics advanced identically
    for a, b in zip(op.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, **TIGHT)


@pytest.mark.parametrize("stride", [1, 2])
def test_plain_partial_channels_matches_pc_darts(stride):
    torch.manual_seed(0)
    ref = RefPCMixedOp(8, stride, 4).to(DT)
    op = FusedMixedOp(8, stride, mode="plain", partial_channels=4).to(DT)
    op.load_plain_state(ref._ops)
    x, alpha = _x(8, 6, stride), torch.randn(8, dtype=DT)
    _close(_run(op, x, alpha), _run(ref, x, alpha))


def test_state_is_shared_between_modes():
    keys = {m: set(FusedMixedOp(8, 1, mode=m).state_dict()) for m in MODES}
    assert all(k == keys["plain"] for k in keys.values())
    # nothing computed in forward (merged kernels, statistics) is kept on the module
    op = FusedMixedOp(8, 1, mode="topo")
    before = {k: v.clone() for k, v in op.state_dict().items()}
    op.eval()(torch.randn(2, 8, 5, 5), torch.softmax(torch.randn(8), 0))
    assert set(op.state_dict()) == set(before)
    tensors = [n for n, v in vars(op).items() if isinstance(v, torch.Tensor)]
    assert tensors == []


# ----------------------------------------------------------------------------- exact rewrites
def _leading_only_space():
    """Every op starts with ReLU and ends in a conv: sharing the ReLU is exact and all convs
    merge into one exactly (without normalization)."""
    return S.SearchSpace(
        "leading",
        [
            S.OpDef("c3", [S.ReLU(), S.Conv(3)]),
            S.OpDef("s5", [S.ReLU(), S.Conv(5, separable=True)]),
            S.OpDef("d3", [S.ReLU(), S.Conv(3, dilation=2, separable=True)]),
            S.OpDef("c1", [S.ReLU(), S.Conv(1)]),
            S.OpDef("max", [S.Pool("max", 3)]),
            S.OpDef("g5", [S.ReLU(), S.Conv(5, groups=2)]),
            S.OpDef("skip", [S.Identity()], reduce=[S.ReLU(), S.FactorizedReduce(), S.BN()]),
        ],
    )


@pytest.mark.parametrize("mode", ["pms", "pms+fms", "topo"])
@pytest.mark.parametrize("stride", [1, 2])
def test_exact_user_space_leading_sharing(mode, stride):
    space = _leading_only_space()
    plain, op = _pair(mode, C=6, stride=stride, primitives=space, normalize=False)
    if mode == "topo":
        g = op.simplified_graph()
        # one merged conv of groups 1, one (folded) of groups 2, + FactorizedReduce at stride 2
        assert g.counts().conv == 2 + (stride == 2)
    x, alpha = _x(6, 7, stride), torch.randn(len(space), dtype=DT)
    _close(_run(op, x, alpha), _run(plain, x, alpha))


@pytest.mark.parametrize("stride", [1, 2])
def test_exact_darts_pms_with_eval_bn(stride):
    """BN in eval mode with equal statistics is one affine map: sharing it is exact."""
    plain, op = _pair("pms", C=6, stride=stride)
    _same_bn_stats(plain, op, C=6)
    plain.eval(), op.eval()
    x, alpha = _x(6, 7, stride), torch.randn(8, dtype=DT)
    _close(_run(op, x, alpha), _run(plain, x, alpha))


@pytest.mark.parametrize("space", ["darts", "nb201", "exaggerated", "triples", "dilations"])
@pytest.mark.parametrize("stride", [1, 2])
def test_reparameterization_is_exact_without_normalization(space, stride):
    """topo(normalize=False) computes the pms+fms graph exactly (train-mode BN); "dilations"
    merges on a dilated lattice."""
    if space == "dilations":
        space = dilations_space()
    elif space == "exaggerated":
        space = S.exaggerated_space(2, 3)
    elif space == "triples":  # nested FMS: the coefficient goes two sums deep into merged convs
        unit = lambda k: (S.ReLU(), S.Conv(k, separable=True), S.BN())  # noqa: E731
        space = S.SearchSpace(
            "triples",
            [S.OpDef(f"t{k}", unit(k) * 3) for k in (3, 5)] + [S.OpDef("skip", [S.Identity()], [S.Zero(2)])],
        )
    torch.manual_seed(0)
    ref = FusedMixedOp(6, stride, primitives=space, mode="pms+fms").to(DT)
    op = FusedMixedOp(6, stride, primitives=space, mode="topo", normalize=False).to(DT)
    op.load_state_dict(ref.state_dict())
    x, alpha = _x(6, 7, stride), torch.randn(len(op.primitives), dtype=DT)
    _close(_run(op, x, alpha), _run(ref, x, alpha))


def test_exact_nb201_eval_bn_topo_equals_plain():
    plain, op = _pair("topo", C=6, primitives="nb201", normalize=False)
    _same_bn_stats(plain, op, C=6)
    plain.eval(), op.eval()
    x, alpha = _x(6, 7), torch.randn(5, dtype=DT)
    _close(_run(op, x, alpha), _run(plain, x, alpha))


@pytest.mark.parametrize("mode", MODES[1:])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("chosen", S.DARTS_PRIMITIVES)
def test_one_hot_weights_equal_plain(mode, stride, chosen):
    """With one-hot weights every rewrite is exact, train-mode BN included (the other terms are
    multiplied by exactly 0): outputs and input gradients equal plain."""
    plain, op = _pair(mode, C=4, stride=stride, normalize=False)
    w = torch.zeros(8, dtype=DT)
    w[S.DARTS_PRIMITIVES.index(chosen)] = 1.0
    x = _x(4, 5, stride)
    _close(_run_weights(op, x, w), _run_weights(plain, x, w))


def test_one_hot_partial_channels_equal_plain():
    plain, op = _pair("topo", C=8, stride=2, normalize=False, partial_channels=2)
    w = torch.zeros(8, dtype=DT)
    w[5] = 1.0
    x = _x(8, 6, 2)
    _close(_run_weights(op, x, w), _run_weights(plain, x, w))


def test_fms_is_an_approximation():
    """Sanity: with soft weights pms+fms is not plain even in eval mode (FMS cross terms)."""
    plain, op = _pair("pms+fms", C=6)
    _same_bn_stats(plain, op, C=6)
    plain.eval(), op.eval()
    x, alpha = _x(6, 7), torch.randn(8, dtype=DT)
    assert not torch.allclose(_run(op, x, alpha)[0], _run(plain, x, alpha)[0], atol=1e-6)


# ----------------------------------------------------------------------------- approximate modes
@pytest.mark.parametrize("mode", MODES[1:])
@pytest.mark.parametrize("space", ["darts", "nb201", "exaggerated"])
def test_derived_weights_sum_to_one(mode, space):
    kw = dict(primitives=S.exaggerated_space(2, 3)) if space == "exaggerated" else dict(primitives=space)
    op = FusedMixedOp(4, 1, mode=mode, **kw)
    K = len(op.primitives)
    w = torch.softmax(torch.randn(K, dtype=DT), 0)
    sums = op.derived_weights(w)
    assert sums, "no weighted sum"
    top_scope, top = sums[0]
    zero = [i for i, n in enumerate(op.primitives) if n == "none"]
    torch.testing.assert_close(top.sum(), 1 - w[zero].sum(), **TIGHT)
    for scope, q in sums[1:]:
        torch.testing.assert_close(q.sum(), torch.tensor(1.0, dtype=DT), **TIGHT)
        assert (q >= 0).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stride", [1, 2])
def test_every_alpha_gets_gradient(mode, stride):
    torch.manual_seed(0)
    op = FusedMixedOp(4, stride, mode=mode).to(DT)
    y, gx, _, galpha = _run(op, _x(4, 6, stride), torch.randn(8, dtype=DT))
    assert torch.isfinite(y).all() and torch.isfinite(gx).all()
    assert (galpha.abs() > 0).all(), galpha
    for p in op.parameters():  # every candidate kernel is trained too
        assert p.grad is not None and p.grad.abs().sum() > 0


def _output(op, x, w):
    with torch.no_grad():
        return op(x, w)


@pytest.mark.parametrize("how", ["channel", "tensor"])
def test_kernel_normalization_invariance_dense(how):
    """Scaling and shifting a candidate's kernel leaves the topo output unchanged."""
    torch.manual_seed(0)
    op = FusedMixedOp(6, 1, primitives="nb201", mode="topo", normalize=how, eps=1e-14).to(DT)
    raw = FusedMixedOp(6, 1, primitives="nb201", mode="topo", normalize=False).to(DT)
    raw.load_state_dict(op.state_dict())
    x, w = _x(6, 7), torch.softmax(torch.randn(5, dtype=DT), 0)
    y0, r0 = _output(op, x, w), _output(raw, x, w)
    conv3 = op._ops[op.primitives.index("nor_conv_3x3")][1].conv
    with torch.no_grad():
        conv3.weight.mul_(3.7).add_(0.2)
    raw.load_state_dict(op.state_dict())
    torch.testing.assert_close(_output(op, x, w), y0, atol=1e-9, rtol=1e-9)
    assert not torch.allclose(_output(raw, x, w), r0, atol=1e-3)  # the test can see a change


def test_kernel_normalization_invariance_separable():
    """For a dw+pw unit the normalized kernel is its dense kernel P*D: invariant to rescaling
    the depthwise or the pointwise kernel."""
    torch.manual_seed(0)
    op = FusedMixedOp(6, 1, mode="topo", eps=1e-14).to(DT)
    x, w = _x(6, 7), torch.softmax(torch.randn(8, dtype=DT), 0)
    y0 = _output(op, x, w)
    with torch.no_grad():
        op._ops[S.DARTS_PRIMITIVES.index("dil_conv_3x3")][1].depthwise.weight.mul_(3.7)
        op._ops[S.DARTS_PRIMITIVES.index("sep_conv_5x5")][1].pointwise.weight.mul_(0.4)
        op._ops[S.DARTS_PRIMITIVES.index("sep_conv_3x3")][4].depthwise.weight.mul_(2.5)
    torch.testing.assert_close(_output(op, x, w), y0, atol=1e-9, rtol=1e-9)


def test_topo_uses_the_kernel_ops(monkeypatch):
    calls = {"merge_kernels": 0, "mixed_sum": 0}

    def counting(name):
        real = getattr(ops, name)

        def wrapper(*a, **k):
            calls[name] += 1
            return real(*a, **k)

        return wrapper

    for name in calls:
        monkeypatch.setattr(ops, name, counting(name))
    # the Python path of merged groups (the fused group op merges inside C++: test_merged_conv.py)
    monkeypatch.setattr(forms, "_MERGED_CONV", None)
    op = FusedMixedOp(4, 1, mode="topo", recompute=False)
    op(torch.randn(2, 4, 5, 5), torch.softmax(torch.randn(8), 0))
    # three merged convs; one weighted sum (the edge's): in the conv group both branches end
    # in a merged conv that took its coefficient (plain addition, nothing saved)
    assert calls == {"merge_kernels": 3, "mixed_sum": 1}
    # With recomputation (topo's default) the parameter-free branches (pools, skip) form a
    # weighted sum of their own: on the Python path a second mixed_sum, recomputed in backward...
    from toponas_kernels.nas import _autograd

    calls.update(merge_kernels=0, mixed_sum=0)
    with monkeypatch.context() as m:
        m.setattr(_autograd, "_LIGHT_SUM", None)
        FusedMixedOp(4, 1, mode="topo")(torch.randn(2, 4, 5, 5), torch.softmax(torch.randn(8), 0))
    assert calls == {"merge_kernels": 3, "mixed_sum": 2}
    # ...and where the kernels are compiled, one light_sum op (its weighted sum inside, in C++)
    if _autograd._LIGHT_SUM is not None:
        calls.update(merge_kernels=0, mixed_sum=0)
        light = []
        monkeypatch.setattr(_autograd, "_LIGHT_SUM", lambda *a, _f=_autograd._LIGHT_SUM: light.append(1) or _f(*a))
        FusedMixedOp(4, 1, mode="topo")(torch.randn(2, 4, 5, 5), torch.softmax(torch.randn(8), 0))
        assert calls == {"merge_kernels": 3, "mixed_sum": 1} and light == [1]


def test_shared_modules_run_once(monkeypatch):
    # module hooks see the Python path of the recomputed tails (the fused tail op runs the pools
    # and the BN inside one C++ op, as a merged group runs its convs)
    from toponas_kernels.nas import _autograd

    monkeypatch.setattr(_autograd, "_LIGHT_SUM", None)
    op = FusedMixedOp(4, 1, mode="topo")
    calls = {}
    for i, chain in enumerate(op._ops):
        for pos, m in enumerate(chain):
            m.register_forward_hook(lambda *_, key=(i, pos): calls.__setitem__(key, calls.get(key, 0) + 1))
    op(torch.randn(2, 4, 5, 5), torch.softmax(torch.randn(8), 0))
    # pools, group ReLU and BN (as sep_conv_3x3's), FMS middle BN (as sep_conv_3x3's); the
    # ReLU after that BN runs in place on its output (torch.relu_), not through its module
    assert calls == {(1, 0): 1, (2, 0): 1, (4, 0): 1, (4, 5): 1, (4, 2): 1}


def test_gumbel_hard_weights_run():
    op = FusedMixedOp(4, 1, mode="topo")
    alpha = torch.randn(8, requires_grad=True)
    w = ops.gumbel_softmax(alpha, tau=1.0, hard=True, generator=torch.Generator().manual_seed(0))
    op(torch.randn(2, 4, 5, 5), w).sum().backward()
    assert torch.isfinite(alpha.grad).all()


# ----------------------------------------------------------------------------- masks
@pytest.mark.parametrize("mode", MODES)
def test_masked_candidates_never_run(mode):
    op = FusedMixedOp(4, 2, mode=mode)
    mask = torch.tensor([False, True, False, True, True, False, False, True])
    calls = []
    for i in (~mask).nonzero().flatten().tolist():
        for m in op._ops[i].modules():
            m.register_forward_hook(lambda *_, i=i: calls.append(i))
    w = torch.softmax(torch.randn(8), 0)
    w_nan = w.clone()
    w_nan[~mask] = float("nan")  # weights of masked candidates are ignored
    y = op(torch.randn(2, 4, 6, 6), w_nan, mask)
    assert calls == [] and torch.isfinite(y).all()


@pytest.mark.parametrize("mode", ["plain", "pms"])
def test_mask_equals_sum_over_active(mode):
    """Masked plain (and pms, exact in eval mode) = the reference sum over the active ops."""
    torch.manual_seed(0)
    ref = RefMixedOp(6, 1).to(DT).eval()
    op = FusedMixedOp(6, 1, mode=mode).to(DT)
    op.load_plain_state(ref)
    _same_bn_stats(ref, op, C=6)
    op.eval()
    mask = torch.tensor([True, False, True, False, True, False, True, True])
    x, w = _x(6, 7), torch.softmax(torch.randn(8, dtype=DT), 0)
    expected = sum(w[i] * ref._ops[i](x) for i in range(8) if mask[i])
    torch.testing.assert_close(op(x, w, mask).detach(), expected.detach(), **TIGHT)


@pytest.mark.parametrize("mode", MODES)
def test_mask_zero_only(mode):
    op = FusedMixedOp(4, 2, mode=mode)
    mask = [n == "none" for n in S.DARTS_PRIMITIVES]
    y = op(torch.randn(2, 4, 6, 6), torch.softmax(torch.randn(8), 0), mask)
    assert y.shape == (2, 4, 3, 3) and (y == 0).all()


def test_mask_errors():
    op = FusedMixedOp(4, 1)
    x, w = torch.randn(1, 4, 5, 5), torch.softmax(torch.randn(8), 0)
    with pytest.raises(ValueError, match="mask"):
        op(x, w, torch.zeros(8, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        op(x, w, torch.ones(7, dtype=torch.bool))


# ----------------------------------------------------------------------------- stride 2, spaces
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pc", [None, 2])
def test_stride2_all_modes(mode, pc):
    op = FusedMixedOp(8, 2, mode=mode, partial_channels=pc)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    y = op(x, torch.softmax(torch.randn(8), 0))
    assert y.shape == (2, 8, 3, 3)
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("mode", MODES)
def test_exaggerated_space_runs(mode):
    op = FusedMixedOp(4, 1, primitives=S.exaggerated_space(2, 2), mode=mode)
    assert op(torch.randn(1, 4, 7, 7), torch.softmax(torch.randn(7), 0)).shape == (1, 4, 7, 7)


def test_primitive_subset():
    op = FusedMixedOp(4, 1, primitives=["sep_conv_3x3", "skip_connect", "dil_conv_5x5"])
    assert op.primitives == ("sep_conv_3x3", "skip_connect", "dil_conv_5x5")
    assert op(torch.randn(1, 4, 5, 5), torch.softmax(torch.randn(3), 0)).shape == (1, 4, 5, 5)


def test_exported_from_package():
    assert toponas_kernels.FusedMixedOp is FusedMixedOp


# ----------------------------------------------------------------------------- derive
def test_derive_returns_plain_module():
    op = FusedMixedOp(8, 2, mode="topo")
    w = torch.tensor([0.5, 0.0, 0.0, 0.05, 0.0, 0.3, 0.15, 0.0])
    m = op.derive(w)
    assert isinstance(m, OpChain) and m.op_name == "none"
    m = op.derive(w, exclude=("none",))
    assert m.op_name == "sep_conv_5x5" and m.chain == S.DARTS_SPACE["sep_conv_5x5"].chain(2)
    assert all(b.affine for b in m.modules() if isinstance(b, nn.BatchNorm2d))
    assert m(torch.randn(1, 8, 6, 6)).shape == (1, 8, 3, 3)
    mask = torch.ones(8, dtype=torch.bool)
    mask[5] = False
    assert op.derive(w, exclude=("none",), mask=mask).op_name == "dil_conv_3x3"
    pc = FusedMixedOp(8, 1, partial_channels=4)
    assert pc.derive(w, exclude=("none",))[1].pointwise.weight.shape[0] == 8  # full C for retraining
    # A pool is retrained without the BN the search network puts after it (DARTS' eval network).
    pool_w = torch.tensor([0.0, 0.6, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05])
    for stride in (1, 2):
        pool = FusedMixedOp(8, stride).derive(pool_w)
        assert pool.op_name == "max_pool_3x3"
        assert not any(isinstance(b, nn.BatchNorm2d) for b in pool.modules())
        x = torch.randn(2, 8, 6, 6)
        torch.testing.assert_close(pool(x), nn.MaxPool2d(3, stride, 1)(x), atol=0, rtol=0)


# ----------------------------------------------------------------------------- errors
def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="primitives"):
        FusedMixedOp(4, 1, primitives=["sep_conv_3x3", "conv_7x1_1x7"])
    with pytest.raises(ValueError, match="mode"):
        FusedMixedOp(4, 1, mode="fast")
    with pytest.raises(ValueError, match="partial_channels"):
        FusedMixedOp(6, 1, partial_channels=4)
    with pytest.raises(ValueError, match="normalize"):
        FusedMixedOp(4, 1, normalize="batch")
    op = FusedMixedOp(4, 1)
    with pytest.raises(ValueError, match="weights"):
        op(torch.randn(1, 4, 5, 5), torch.softmax(torch.randn(7), 0))
    with pytest.raises(ValueError, match="weights"):
        op(torch.randn(1, 4, 5, 5), torch.softmax(torch.randn(2, 8), 0))
    with pytest.raises(ValueError, match="x"):
        op(torch.randn(1, 5, 5, 5), torch.softmax(torch.randn(8), 0))
    with pytest.raises(ValueError, match="x"):
        FusedMixedOp(8, 2, partial_channels=2)(torch.randn(1, 8, 7, 7), torch.softmax(torch.randn(8), 0))
    with pytest.raises(ValueError, match="other"):
        op.load_plain_state(RefMixedOp(6, 1))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(C=16, stride=3), "stride"),  # used to fail later, inside a kernel
        (dict(C=16, stride=0), "stride"),
        (dict(C=16, stride=True), "stride"),
        (dict(C=True), "C"),
        (dict(C=0), "C"),
        (dict(C=16, partial_channels=2.0), "partial_channels"),
        (dict(C=16, affine="yes"), "affine"),
        (dict(C=16, eps=0.0), "eps"),
        (dict(C=16, eps=float("nan")), "eps"),
        (dict(C=16, backend="cuad"), "backend"),
        (dict(C=16, recompute="no"), "recompute"),
        (dict(C=16, space="nope"), "space|nope"),
    ],
)
def test_constructor_checks_every_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        FusedMixedOp(**kwargs)


@pytest.mark.parametrize("mode", ["pms", "pms+fms", "topo"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k,edge_weight", [(None, False), (3, False), (3, True)])
def test_recompute_changes_nothing_but_memory(mode, stride, k, edge_weight):
    """Recomputing the parameter-free branches (and a stride-2 partial-channel bypass pool) in
    backward gives the same outputs, gradients (x, alpha, edge weight, every parameter) and BN
    running statistics as keeping their activations."""
    torch.manual_seed(1)
    keep = FusedMixedOp(6, stride, mode=mode, partial_channels=k, recompute=False).double()
    redo = FusedMixedOp(6, stride, mode=mode, partial_channels=k, recompute=True).double()
    redo.load_state_dict(keep.state_dict())
    x = torch.randn(3, 6, 8, 8, dtype=torch.float64, requires_grad=True)
    alpha = torch.randn(8, dtype=torch.float64, requires_grad=True)
    beta = torch.randn((), dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([True, True, False, True, True, True, True, False])
    results = []
    for op in (keep, redo):
        e = torch.sigmoid(beta) if edge_weight else None
        y = op(x, torch.softmax(alpha, 0), mask, edge_weight=e)
        grads = torch.autograd.grad(y.sin().sum(), [x, alpha, *op.parameters()] + ([beta] if edge_weight else []), allow_unused=True)
        results.append((y, grads, [b.clone() for b in op.buffers()]))
    (y0, g0, b0), (y1, g1, b1) = results
    torch.testing.assert_close(y1, y0, atol=1e-12, rtol=1e-12)
    for a, b in zip(g1, g0):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    for a, b in zip(b1, b0):
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # advanced once, not twice


def test_topo_gradcheck_through_merged_conv():
    torch.manual_seed(2)
    op = FusedMixedOp(4, 1, mode="topo").double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    alpha = torch.randn(8, dtype=torch.float64, requires_grad=True)
    dw = op._ops[4][1].depthwise.weight  # sep_conv_3x3's first depthwise kernel
    assert torch.autograd.gradcheck(lambda x, a, d: _with_weight(op, dw, d, x, a), (x, alpha, dw.detach().clone().requires_grad_()))


def _with_weight(op, param, value, x, alpha):
    """op(x, softmax(alpha)) as a function of ``value`` standing in for ``param``."""
    saved = param.data
    param.data = value.detach()
    try:
        from torch.func import functional_call

        names = {id(p): n for n, p in op.named_parameters()}
        return functional_call(op, {names[id(param)]: value}, (x, torch.softmax(alpha, 0)))
    finally:
        param.data = saved


def _saved_units(op, x, w):
    """Bytes kept for backward by one edge, in units of |x|, each storage once, parameters apart."""
    return saved_bytes(lambda: op(x, w), op.parameters()) / (x.numel() * x.element_size())


def test_memory_kept_for_backward_by_a_darts_edge():
    """The point of topo: at stride 1 the DARTS edge keeps 30 |x| in plain and 5 |x| in topo
    (x; the group's ReLU; the first merged conv's output and its BN/ReLU output; the input of
    the group's trailing BN, from which its output is recomputed for the weight gradient); no
    kernel-sized tensor is kept."""
    torch.manual_seed(0)
    x = torch.randn(4, 16, 16, 16, requires_grad=True)  # an activation, as in a supernet
    w = torch.softmax(torch.randn(8, requires_grad=True), 0)
    # approx: the weights and the BN statistics add a few hundred bytes
    assert _saved_units(FusedMixedOp(16, 1, mode="plain"), x, w) == pytest.approx(30.0, abs=0.05)
    assert _saved_units(FusedMixedOp(16, 1, mode="topo"), x, w) == pytest.approx(5.0, abs=0.05)
    assert _saved_units(FusedMixedOp(16, 1, mode="topo", recompute=False), x, w) == pytest.approx(12.0, abs=0.05)
    # PC 4 on a reduction edge: the bypass max pool is recomputed too and keeps no indices
    # (they were 3/8 |x| of the 1.88 |x| this edge kept before).
    assert _saved_units(FusedMixedOp(16, 2, mode="topo", partial_channels=4), x, w) == pytest.approx(1.5, abs=0.05)


@pytest.mark.parametrize("mode", ["plain", "pms+fms", "topo"])
@pytest.mark.parametrize("stride,k", [(1, None), (1, 3), (2, 3)])
def test_edge_weight_is_exact(mode, stride, k):
    """op(x, w, edge_weight=e) == e * op(x, w), values and gradients (PC-DARTS edge normalization
    folded into the edge), with a BN in eval mode so both runs see the same statistics."""
    torch.manual_seed(3)
    op = FusedMixedOp(6, stride, mode=mode, partial_channels=k).double()
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64, requires_grad=True)
    alpha = torch.randn(8, dtype=torch.float64, requires_grad=True)
    beta = torch.randn((), dtype=torch.float64, requires_grad=True)
    results = []
    for folded in (False, True):
        w, e = torch.softmax(alpha, 0), torch.sigmoid(beta)
        y = op(x, w, edge_weight=e) if folded else e * op(x, w)
        results.append((y, torch.autograd.grad(y.sin().sum(), [x, alpha, beta])))
    (y0, g0), (y1, g1) = results
    torch.testing.assert_close(y1, y0, atol=1e-12, rtol=1e-10)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    with pytest.raises(ValueError, match="edge_weight: expected a scalar tensor"):
        op(x, torch.softmax(alpha, 0), edge_weight=torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["plain", "pms", "pms+fms", "topo"])
def test_autocast_bf16(mode):
    """Under autocast the candidates come out in mixed dtypes (convs in bf16, pools and BN in
    fp32): every mode runs forward and backward, like DARTS' promoting sum, and stays within
    bf16 rounding of the fp32 result."""
    torch.manual_seed(4)
    op = FusedMixedOp(8, 1, mode=mode)
    x = torch.randn(2, 8, 8, 8, requires_grad=True)
    alpha = torch.randn(8, requires_grad=True)
    y32 = op(x, torch.softmax(alpha, 0))
    g32 = torch.autograd.grad(y32.sum(), [x, alpha])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = op(x, torch.softmax(alpha, 0))
    g16 = torch.autograd.grad(y16.float().sum(), [x, alpha])
    for a, b, what in ((y16.float(), y32, "output"), (g16[0], g32[0], "grad x"), (g16[1], g32[1], "grad alpha")):
        rel = ((a.float() - b).norm() / b.norm()).item()
        assert rel < 3e-2, f"{mode} {what}: relative error {rel:.3g} vs fp32 (bf16 has 8 mantissa bits)"


# ----------------------------------------------------------------------------- BN across modes
def _bns(op):
    return [m for m in op.modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize("how", ["load_state_dict", "load_plain_state"])
def test_cross_mode_load_keeps_eval_outputs_sane(how):
    """A plain state's BN statistics do not fit a topo edge (merged, normalized convs): the
    load resets them with a warning, and recalibrate_bn makes eval match train-mode BN."""
    from toponas_kernels.nas import recalibrate_bn

    torch.manual_seed(3)
    plain = FusedMixedOp(8, 1, mode="plain")
    for bn in _bns(plain):  # statistics of small conv outputs, as after training in plain mode
        bn.running_var.fill_(1e-12)
    x, w = torch.randn(4, 8, 6, 6), torch.softmax(torch.randn(8), 0)
    topo = FusedMixedOp(8, 1, mode="topo")
    with pytest.warns(UserWarning, match="recalibrate_bn"):
        if how == "load_state_dict":
            topo.load_state_dict(plain.state_dict())
        else:
            topo.load_plain_state(plain)
    assert all(torch.all(bn.running_var == 1) and torch.all(bn.running_mean == 0) for bn in _bns(topo))
    with torch.no_grad():
        train_out = topo.train()(x, w)
        eval_out = topo.eval()(x, w)
    assert torch.isfinite(eval_out).all()
    assert eval_out.abs().max() < 100 * train_out.abs().max()  # was ~1e6 times off without the reset
    assert recalibrate_bn(topo, [(x, w)]) == 1
    assert not topo.training  # train/eval state put back
    with torch.no_grad():
        eval_out = topo(x, w)
    # running var is unbiased (n/(n-1), n = 4*6*6): eval equals train-mode BN to ~1%.
    torch.testing.assert_close(eval_out, train_out, atol=2e-2 * train_out.abs().max().item(), rtol=0)


def test_same_mode_load_keeps_statistics_and_old_states_load():
    a, b = FusedMixedOp(8, 1, mode="topo"), FusedMixedOp(8, 1, mode="topo")
    a(torch.randn(2, 8, 5, 5), torch.softmax(torch.randn(8), 0))
    state = a.state_dict()
    assert state["_extra_state"].tolist() == [4, 1]  # (topo, channel): the mode is recorded
    b.load_state_dict(state)
    for x, y in zip(_bns(a), _bns(b)):
        assert torch.equal(x.running_var, y.running_var)
    del state["_extra_state"]  # a state saved before the mode was recorded still loads strictly
    b.load_state_dict(state)
