"""``FusedMixedOp.wrap`` and ``wrap_supernet``: a user's own supernet run through TopoNAS with its
own parameters. Two real supernets: xautodl's NAS-Bench-201 ``TinyNetworkDarts`` (all four
combinations of ``affine`` and ``track_running_stats``) and one laid out as the DARTS reference
``model_search.py`` (``bench/darts_reference.py``). For each: float64 logits and every gradient
in ``plain`` equal the unwrapped network's; each wrapped edge equals the package's built-in edge
of the same space in every mode (so recognition found the right chains); every rewritten mode
runs with alpha gradients; the user's tensors, optimizer, training loop, genotype and
checkpoints keep working."""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from toponas_kernels.nas import NB201_PRIMITIVES, FusedMixedOp, wrap_supernet
from toponas_kernels.nas import spaces as S
from toponas_kernels.nas.wrap import Opaque, recognize

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import darts_reference as D  # noqa: E402

try:
    from xautodl.models.cell_operations import OPS as XOPS
    from xautodl.models.cell_searchs.search_model_darts import TinyNetworkDarts
except ImportError:  # pragma: no cover - CI installs xautodl
    TinyNetworkDarts = None
needs_xautodl = pytest.mark.skipif(TinyNetworkDarts is None, reason="xautodl is not installed (pip install xautodl --no-deps)")

MODES = ("pms", "fms", "pms+fms", "topo")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest)
SETTINGS = [(False, False), (False, True), (True, False), (True, True)]  # (affine, track_running_stats)
TIGHT = dict(atol=1e-12, rtol=1e-12)


def _xautodl(affine, track, C=4, N=1):
    torch.manual_seed(0)
    return TinyNetworkDarts(C, N, 4, 10, list(NB201_PRIMITIVES), affine, track).double()


def _darts(steps=2, layers=3, C=4):
    torch.manual_seed(0)
    return D.Network(C, 10, layers, nn.CrossEntropyLoss(), steps=steps, multiplier=steps).double()


def darts_edit(model, **options):
    """The user's edit of a DARTS-layout supernet, as the docs show it."""
    for cell in model.cells:
        for i, mixed in enumerate(cell._ops):
            cell._ops[i] = FusedMixedOp.wrap(mixed._ops, **options)
    return model


def _logits(model, x):
    out = model(x)
    return out[1] if isinstance(out, tuple) else out


def _randomize_bn(model):
    """Affine BN parameters away from (1, 0), so a mixed-up parameter would show."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


def _assert_same_net(ref, wrapped, x):
    a, b = _logits(ref, x), _logits(wrapped, x)
    torch.testing.assert_close(b, a, **TIGHT)
    (a.square().sum()).backward()
    (b.square().sum()).backward()
    got = dict(wrapped.named_parameters())
    for name, p in ref.named_parameters():
        q = got[name if name in got else _wrapped_key(name)]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, **TIGHT, msg=name)


def _wrapped_key(name):
    """xautodl's edge keys gain ``_ops.``: cells.0.edges.1<-0.2.op... -> cells.0.edges.1<-0._ops.2.op..."""
    head, _, rest = name.partition(".edges.")
    edge, _, tail = rest.partition(".")
    return f"{head}.edges.{edge}._ops.{tail}"


# ----------------------------------------------------------------------------- options
@needs_xautodl
@pytest.mark.parametrize("affine,track", SETTINGS)
def test_builtin_constructor_takes_xautodl_options(affine, track):
    """``track_running_stats`` and ``bias`` on the constructor: load_plain_state takes xautodl's
    candidates in each setting, and plain mode is xautodl's edge."""
    torch.manual_seed(1)
    xs = nn.ModuleList(XOPS[n](6, 6, 1, affine, track) for n in NB201_PRIMITIVES).double()
    _randomize_bn(xs)
    op = FusedMixedOp(6, 1, primitives=NB201_PRIMITIVES, mode="plain", affine=affine,
                      track_running_stats=track, bias=not affine).double()
    op.load_plain_state(xs)
    x, w = torch.randn(2, 6, 5, 5, dtype=torch.float64), torch.softmax(torch.randn(5, dtype=torch.float64), 0)
    torch.testing.assert_close(op(x, w), sum(m(x) * wi for m, wi in zip(xs, w)), **TIGHT)
    assert all(b.track_running_stats == track for b in op.modules() if isinstance(b, nn.BatchNorm2d))


@pytest.mark.parametrize("space", ["nb201", "darts"])
def test_merging_biased_convs_is_exact(space):
    """A conv is affine in (kernel, bias): topo without kernel normalization equals the graph
    without merging (pms+fms: the same sharing), biases included, in every exact form."""
    torch.manual_seed(2)
    ref = FusedMixedOp(6, 1, primitives=space, mode="pms+fms", bias=True, affine=True).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(-1, 1)  # biases and BN away from 0 and 1
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    w = torch.softmax(torch.randn(len(ref.primitives), dtype=torch.float64), 0)
    for merge in ("dense", "stacked"):
        topo = FusedMixedOp(6, 1, primitives=space, mode="topo", normalize=False, bias=True, affine=True, merge=merge).double()
        topo.load_state_dict(ref.state_dict())
        torch.testing.assert_close(topo(x, w), ref(x, w), **TIGHT)


def test_space_is_inferred_from_the_names():
    op = FusedMixedOp(4, 1, primitives=NB201_PRIMITIVES)
    assert op.space.name == "nb201" and op.primitives == NB201_PRIMITIVES
    assert FusedMixedOp(4, 1, primitives=["sep_conv_3x3", "none"]).space.name == "darts"
    with pytest.raises(ValueError, match="primitives"):
        FusedMixedOp(4, 1, primitives=["sep_conv_3x3", "nor_conv_3x3"])  # no one space has both


def test_bn_reset_warns_once_per_model():
    plain = nn.ModuleList(FusedMixedOp(4, 1, mode="plain") for _ in range(6))
    topo = nn.ModuleList(FusedMixedOp(4, 1, mode="topo") for _ in range(6))
    for _ in range(2):  # each load warns once
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            topo.load_state_dict(plain.state_dict())
        assert len([w for w in got if "recalibrate_bn" in str(w.message)]) == 1


# ----------------------------------------------------------------------------- recognition
def _conv(C, k, s=1, d=1, groups=1, bias=False):
    return nn.Conv2d(C, C, k, s, (k - 1) * d // 2, d, groups=groups, bias=bias)


CATALOGUE = {
    "relu-conv-bn": (lambda C: nn.Sequential(nn.ReLU(), _conv(C, 3), nn.BatchNorm2d(C)),
                     (S.ReLU(), S.Conv(3), S.BN())),
    "conv 5x5 s2 d2 g2 bias": (lambda C: nn.Sequential(nn.ReLU(), _conv(C, 5, 2, 2, 2, True), nn.BatchNorm2d(C, affine=False, track_running_stats=False)),
                               (S.ReLU(), S.Conv(5, 2, 2, groups=2), S.BN())),
    "separable, biases": (lambda C: nn.Sequential(nn.ReLU(), _conv(C, 3, groups=C, bias=True), _conv(C, 1, bias=True), nn.BatchNorm2d(C)),
                          (S.ReLU(), S.Conv(3, separable=True), S.BN())),
    "sep_conv_5x5": (lambda C: D.SepConv(C, C, 5, 1, 2, affine=False), S.DARTS_SPACE["sep_conv_5x5"].chain(1)),
    "dil_conv_3x3 s2": (lambda C: D.DilConv(C, C, 3, 2, 2, 2, affine=False), S.DARTS_SPACE["dil_conv_3x3"].chain(2)),
    "max pool + BN": (lambda C: nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.BatchNorm2d(C, affine=False)), (S.Pool("max", 3, bn=True),)),
    "avg pool": (lambda C: nn.AvgPool2d(3, 2, 1, count_include_pad=False), (S.Pool("avg", 3, 2),)),
    "identity": (lambda C: D.Identity(), (S.Identity(),)),
    "zero s2": (lambda C: D.Zero(2), (S.Zero(2),)),
    "factorized reduce": (lambda C: D.FactorizedReduce(C, C, affine=False), S.DARTS_SPACE["skip_connect"].chain(2)),
    "functional relu": (lambda C: _FunctionalRelu(C), (S.ReLU(), S.Conv(1), S.BN())),
}


class _FunctionalRelu(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.conv, self.bn = _conv(C, 1), nn.BatchNorm2d(C)

    def forward(self, x):
        return self.bn(self.conv(F.relu(x)))


class _Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


@pytest.mark.parametrize("case", list(CATALOGUE))
def test_recognizes_by_structure(case):
    make, chain = CATALOGUE[case]
    C = 4
    module = make(C)
    found = recognize(module, C)
    assert found.reason is None and found.chain == tuple(chain)
    # The views hold the user's tensors, and a wrapped single candidate with one-hot weight is
    # the module itself in every mode (exact: folded conv and bias, no normalization).
    ptrs = {p.data_ptr() for part in found.parts for p in part.parameters()}
    assert ptrs == {p.data_ptr() for p in module.parameters()}
    module = module.double()
    x = torch.randn(2, C, 8, 8, dtype=torch.float64)
    w = torch.ones(1, dtype=torch.float64)
    want = module(x)
    for mode in ("plain", *MODES):
        op = FusedMixedOp.wrap([module], mode=mode, normalize=False)
        torch.testing.assert_close(op(x, w), want, **TIGHT)


def test_unrecognized_candidates_run_as_they_are_and_are_reported_once():
    torch.manual_seed(3)
    model = _darts()
    for cell in model.cells:  # a user's own candidate in place of avg_pool_3x3 on the stride-1 edges
        for mixed in cell._ops:
            if mixed._ops[0].stride == 1:
                mixed._ops[2] = _Swish()
    model.double()
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        wrap_supernet(model, mode="topo")
    reports = [w for w in got if "not recognized" in str(w.message)]
    assert len(reports) == 1 and "_Swish" in str(reports[0].message)
    op = model.cells[0]._ops[0]
    assert [n for n, _ in op.unrecognized] == ["_Swish"]
    assert isinstance(op.space.chains(1)[2][0], Opaque)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    one_hot = F.one_hot(torch.tensor(2), 8).double()
    torch.testing.assert_close(op(x, one_hot), _Swish()(x), **TIGHT)
    _logits(model, torch.randn(2, 3, 8, 8, dtype=torch.float64)).sum().backward()
    assert model.alphas_normal.grad[:, 2].abs().sum() > 0  # its weight gets a gradient


def test_wrap_checks_its_arguments():
    with pytest.raises(ValueError, match="candidates"):
        FusedMixedOp.wrap(nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match="candidates"):
        FusedMixedOp.wrap([])
    with pytest.raises(ValueError, match="primitives"):
        FusedMixedOp.wrap([D.Identity(), D.Zero(1)], primitives=["a"])
    with pytest.raises(ValueError, match="mode"):
        FusedMixedOp.wrap([D.Identity()], mode="fast")
    with pytest.raises(ValueError, match="model"):
        wrap_supernet(nn.Sequential(nn.Conv2d(3, 3, 1)))


def test_module_dict_keys_name_the_candidates():
    cands = nn.ModuleDict({"skip": D.Identity(), "conv": nn.Sequential(nn.ReLU(), _conv(4, 3), nn.BatchNorm2d(4))})
    op = FusedMixedOp.wrap(cands)
    assert op.primitives == ("skip", "conv") and op._ops[1] is cands["conv"]


# ----------------------------------------------------------------------------- DARTS layout
def test_darts_layout_plain_is_the_network():
    ref = _darts()
    model = darts_edit(copy.deepcopy(ref), mode="plain")
    assert all(not op.unrecognized for cell in model.cells for op in cell._ops)
    keys = {k for k in model.state_dict() if not k.endswith("_extra_state")}
    assert keys == set(ref.state_dict())  # the user's state_dict keys
    _assert_same_net(ref, model, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    torch.testing.assert_close(model.alphas_normal.grad, ref.alphas_normal.grad, **TIGHT)
    torch.testing.assert_close(model.alphas_reduce.grad, ref.alphas_reduce.grad, **TIGHT)
    model.load_state_dict(ref.state_dict(), strict=True)  # an unwrapped checkpoint loads
    assert model.genotype() == ref.genotype()


EDGE_MODES = ["plain", "topo"] + [pytest.param(m, marks=pytest.mark.slow) for m in ("pms", "fms", "pms+fms")]


@pytest.mark.filterwarnings("ignore:FusedMixedOp. loaded a state")  # the built-in edge's BN reset
@pytest.mark.parametrize("mode", EDGE_MODES)
@pytest.mark.parametrize("stride", [1, 2])
def test_darts_edge_is_the_builtin_edge_in_every_mode(stride, mode):
    """The wrapped DARTS-reference MixedOp has the built-in DARTS chains: the same graph (Table
    II's counts) and the same outputs as FusedMixedOp(C, stride) with its weights, every mode."""
    torch.manual_seed(4)
    mixed = D.MixedOp(6, stride).double()
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    w = torch.softmax(torch.randn(8, dtype=torch.float64), 0)
    for merge in ("auto", "separable") if mode == "topo" else ("auto",):
        op = FusedMixedOp.wrap(mixed._ops, mode=mode, merge=merge)
        assert op.primitives == tuple(D.PRIMITIVES) and op.stride == stride and not op.unrecognized
        builtin = FusedMixedOp(6, stride, mode=mode, merge=merge).double()
        builtin.load_plain_state(mixed._ops)
        assert op.simplified_graph().counts() == builtin.simplified_graph().counts()
        torch.testing.assert_close(op(x, w), builtin(x, w), **TIGHT)


FAST_MODE = [("topo", "auto")]
SLOW_MODES = [(m, g) for m in MODES for g in ("auto", "separable") if (m, g) not in FAST_MODE]
EVERY_MODE = FAST_MODE + [pytest.param(*mg, marks=pytest.mark.slow) for mg in SLOW_MODES]


@pytest.mark.parametrize("mode,merge", EVERY_MODE)
def test_darts_layout_every_mode_runs(mode, merge):
    model = darts_edit(_darts(), mode=mode, merge=merge)
    _logits(model, torch.randn(2, 3, 8, 8, dtype=torch.float64)).sum().backward()
    for a in model.arch_parameters():
        assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


def test_optimizer_built_before_the_wrap_keeps_training_the_users_tensors():
    model = _darts().float()
    params = list(model.parameters())
    ptrs = [p.data_ptr() for p in params]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    kernel = model.cells[0]._ops[0]._ops[4].op[1].weight  # sep_conv_3x3's first depthwise kernel
    darts_edit(model, mode="topo")
    assert model.cells[0]._ops[0]._ops[4].op[1].weight is kernel
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert all(a is b for a, b in zip(model.parameters(), params))
    before = kernel.detach().clone()
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    for _ in range(1):  # the user's loop, unchanged
        optimizer.zero_grad()
        loss = model._loss(x, y)
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(kernel, before)


# ----------------------------------------------------------------------------- xautodl
@needs_xautodl
@pytest.mark.parametrize("affine,track", SETTINGS)
def test_xautodl_plain_is_the_network(affine, track):
    ref = _xautodl(affine, track)
    _randomize_bn(ref)
    model = wrap_supernet(copy.deepcopy(ref), mode="plain")
    edges = [e for cell in model.cells if hasattr(cell, "edges") for e in cell.edges.values()]
    assert len(edges) == 18 and all(isinstance(e, FusedMixedOp) and not e.unrecognized for e in edges)
    assert edges[0].primitives == NB201_PRIMITIVES
    _assert_same_net(ref, model, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    torch.testing.assert_close(model.arch_parameters.grad, ref.arch_parameters.grad, **TIGHT)
    model.load_state_dict(ref.state_dict(), strict=True)  # an unwrapped checkpoint loads
    assert model.genotype().tostr() == ref.genotype().tostr()


@needs_xautodl
@pytest.mark.filterwarnings("ignore:FusedMixedOp. loaded a state")  # the built-in edge's BN reset
@pytest.mark.parametrize("mode", EDGE_MODES)
@pytest.mark.parametrize("affine,track", SETTINGS)
def test_xautodl_edge_is_the_builtin_edge_in_every_mode(affine, track, mode):
    torch.manual_seed(5)
    xs = nn.ModuleList(XOPS[n](6, 6, 1, affine, track) for n in NB201_PRIMITIVES).double()
    _randomize_bn(xs)
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    w = torch.softmax(torch.randn(5, dtype=torch.float64), 0)
    op = FusedMixedOp.wrap(xs, mode=mode, primitives=NB201_PRIMITIVES)
    builtin = FusedMixedOp(6, 1, primitives=NB201_PRIMITIVES, mode=mode, affine=affine,
                           track_running_stats=track, bias=not affine).double()
    builtin.load_plain_state(xs)
    torch.testing.assert_close(op(x, w), builtin(x, w), **TIGHT)


@needs_xautodl
@pytest.mark.parametrize("mode,merge", EVERY_MODE)
@pytest.mark.parametrize("affine,track", [SETTINGS[0]] + [pytest.param(*s, marks=pytest.mark.slow) for s in SETTINGS[1:]])
def test_xautodl_every_mode_runs(affine, track, mode, merge):
    model = wrap_supernet(_xautodl(affine, track), mode=mode, merge=merge)
    _logits(model, torch.randn(2, 3, 8, 8, dtype=torch.float64)).sum().backward()
    g = model.arch_parameters.grad
    assert torch.isfinite(g).all() and g.abs().sum() > 0


@needs_xautodl
def test_xautodl_training_loop_unchanged():
    """xautodl's own search loop (weights and alphas with their own optimizers) on the wrapped net."""
    torch.manual_seed(6)
    model = TinyNetworkDarts(4, 1, 4, 10, list(NB201_PRIMITIVES), False, False)
    w_optimizer = torch.optim.SGD(model.get_weights(), lr=0.05, momentum=0.9)
    a_optimizer = torch.optim.Adam(model.get_alphas(), lr=3e-4)
    wrap_supernet(model, mode="topo")
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    before = model.arch_parameters.detach().clone()
    for _ in range(1):
        w_optimizer.zero_grad()
        _, logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        w_optimizer.step()
        a_optimizer.zero_grad()
        _, logits = model(x)
        F.cross_entropy(logits, y).backward()
        a_optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(model.arch_parameters, before)
    assert "|" in model.genotype().tostr()


@pytest.mark.slow
def test_full_darts_network_plain_and_topo():
    """The DARTS layout at its real cell size (4 steps, 14 edges per cell)."""
    ref = _darts(steps=4, layers=3)
    _assert_same_net(ref, darts_edit(copy.deepcopy(ref), mode="plain"), torch.randn(2, 3, 8, 8, dtype=torch.float64))
    model = darts_edit(copy.deepcopy(ref), mode="topo")
    _logits(model, torch.randn(2, 3, 8, 8, dtype=torch.float64)).sum().backward()
    assert torch.isfinite(model.alphas_normal.grad).all()
