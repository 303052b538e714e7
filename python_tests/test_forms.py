"""The forms of a merged conv group (``nas/forms.py``): ``stacked`` equals ``dense`` exactly,
``separable`` only for one-hot weights; gradients by gradcheck; the cost model's choice."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from toponas_kernels import FusedMixedOp
from toponas_kernels.nas import forms as Fm
from toponas_kernels.nas import spaces as S
from toponas_kernels.nas.networks import DartsSearchNetwork, NB201SearchNetwork
from utils import dilations_space

DT = torch.float64
TIGHT = dict(atol=1e-10, rtol=1e-9)
DIL = ["dil_conv_3x3", "dil_conv_5x5"]


def _ops(merges, C=6, stride=1, seed=0, **kw):
    """One op per form, all with the same parameters (fp64)."""
    torch.manual_seed(seed)
    out = {m: FusedMixedOp(C, stride, merge=m, **kw).to(DT) for m in merges}
    state = next(iter(out.values())).state_dict()
    for op in out.values():
        op.load_state_dict(state)
    return out


def _x(C, H, stride):
    """[2, C, H, H + 2] (H even at stride 2: FactorizedReduce needs it; odd sizes at stride 1)."""
    H += stride == 2 and H % 2
    return torch.randn(2, C, H, H + 2, dtype=DT)


def _run(op, x, w):
    """Output and gradients wrt x, w and every parameter of ``sum(y * probe)``."""
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = op(x, w)
    probe = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(7))
    params = [p for p in op.parameters()]
    grads = torch.autograd.grad((y * probe).sum(), [x, w] + params, allow_unused=True)
    return [y.detach()] + [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, [x, w] + params)]


def _close(a, b, **tol):
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, **(tol or TIGHT))


@pytest.mark.parametrize("space", ["darts", "exaggerated", "dilations"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("normalize", ["channel", "tensor", "none"])
def test_stacked_equals_dense(space, stride, normalize):
    """Values and gradients (input, weights, every kernel) of the stacked form equal the dense
    merge's, kernel normalization included (its shift is the box-sum channel), train-mode BN.
    The stacked form runs each candidate at its own dilation, the dense one on the group's
    dilated lattice, so this also checks the lattice."""
    primitives = {"exaggerated": S.exaggerated_space(2, 3), "dilations": dilations_space()}.get(space)
    ops = _ops(["dense", "stacked"], stride=stride, primitives=primitives, normalize=normalize)
    assert {f for _, f, _ in ops["stacked"].merge_forms()} == {"stacked"}
    x = _x(6, 7, stride)
    w = torch.softmax(torch.randn(len(ops["dense"].primitives), dtype=DT), 0)
    _close(_run(ops["stacked"], x, w), _run(ops["dense"], x, w))


@pytest.mark.parametrize("stride", [1, 2])
def test_stacked_equals_plain_where_exact(stride):
    """Without normalization and with eval-mode BN the dil-conv group is an exact rewrite: the
    stacked form equals the plain DARTS sum."""
    ops = _ops(["stacked"], stride=stride, primitives=DIL, normalize=False)
    plain = FusedMixedOp(6, stride, primitives=DIL, mode="plain").to(DT)
    plain.load_state_dict(ops["stacked"].state_dict())
    plain.eval(), ops["stacked"].eval()
    x, w = _x(6, 7, stride), torch.softmax(torch.randn(2, dtype=DT), 0)
    _close(_run(ops["stacked"], x, w), _run(plain, x, w))


@pytest.mark.parametrize("merge", Fm.FORMS)
@pytest.mark.parametrize("normalize", ["channel", "none"])
def test_gradcheck(merge, normalize):
    """Every form's gradients wrt the input, the weights and the kernels, by finite differences."""
    torch.manual_seed(1)
    op = FusedMixedOp(2, 1, primitives=DIL + ["sep_conv_3x3"], merge=merge, normalize=normalize).to(DT).eval()
    names = [n for n, _ in op.named_parameters()]
    x = torch.randn(1, 2, 5, 5, dtype=DT, requires_grad=True)
    w = torch.softmax(torch.randn(3, dtype=DT), 0).requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in op.parameters()]

    def f(x, w, *ps):
        return functional_call(op, dict(zip(names, ps)), (x, w))

    assert torch.autograd.gradcheck(f, (x, w, *params), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("normalize", ["channel", "tensor", "none"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("chosen", ["sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"])
def test_separable_is_exact_for_one_hot_weights(normalize, stride, chosen):
    ops = _ops(["dense", "separable"], stride=stride, normalize=normalize)
    w = torch.zeros(8, dtype=DT)
    w[S.DARTS_PRIMITIVES.index(chosen)] = 1.0
    x = _x(6, 7, stride)
    _close(_run(ops["separable"], x, w)[:2], _run(ops["dense"], x, w)[:2])


def test_separable_is_an_approximation():
    """Sanity: with soft weights the separable form is not the weighted sum."""
    ops = _ops(["dense", "separable"], primitives=DIL, normalize=False)
    x, w = _x(6, 7, 1), torch.tensor([0.4, 0.6], dtype=DT)
    with torch.no_grad():
        gap = (ops["separable"](x, w) - ops["dense"](x, w)).abs().max()
    assert gap > 1e-3


@pytest.mark.parametrize("merge", ["stacked", "separable"])
def test_normalization_invariances(merge):
    """Each candidate's equivalent kernel P*D is standardized in every form: the output is
    invariant to rescaling a candidate's depthwise or pointwise kernel."""
    torch.manual_seed(0)
    op = FusedMixedOp(6, 1, merge=merge, eps=1e-14).to(DT)
    x, w = _x(6, 7, 1), torch.softmax(torch.randn(8, dtype=DT), 0)
    with torch.no_grad():
        y0 = op(x, w)
        op._ops[S.DARTS_PRIMITIVES.index("dil_conv_3x3")][1].depthwise.weight.mul_(3.7)
        op._ops[S.DARTS_PRIMITIVES.index("sep_conv_5x5")][1].pointwise.weight.mul_(0.4)
        op._ops[S.DARTS_PRIMITIVES.index("sep_conv_3x3")][4].depthwise.weight.mul_(2.5)
        torch.testing.assert_close(op(x, w), y0, atol=1e-8, rtol=1e-8)


def test_normalization_affine_matches_the_dense_standardization():
    torch.manual_seed(0)
    P, D = torch.randn(5, 3, 1, 1, dtype=DT), torch.randn(3, 1, 5, 5, dtype=DT) + 0.3
    W = P * D.transpose(0, 1)
    for how in ("channel", "tensor"):
        a, b = Fm.normalization_affine(P, D, how, 1e-5)
        dims = (1, 2, 3) if how == "channel" else (0, 1, 2, 3)
        mean = W.mean(dims, keepdim=True)
        expected = (W - mean) / ((W - mean).pow(2).mean(dims, keepdim=True).sqrt() + 1e-5)
        torch.testing.assert_close(a[:, None, None, None] * W + b[:, None, None, None], expected, **TIGHT)


def test_stacked_keeps_no_more_for_backward_than_dense():
    """The depthwise outputs of the stacked form are recomputed in backward, not kept."""
    kept = {}
    for merge in ("dense", "stacked", "separable"):
        op = FusedMixedOp(16, 1, merge=merge)
        x = torch.randn(2, 16, 8, 8, requires_grad=True)
        w = torch.softmax(torch.randn(8), 0)
        params = {p.untyped_storage().data_ptr() for p in op.parameters()}
        seen = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            op(x, w)
        kept[merge] = sum(seen.values())
    assert kept["stacked"] == kept["dense"] == kept["separable"]


def test_cost_model_chooses_an_exact_form():
    op = FusedMixedOp(16, 1, merge="auto")
    groups = op.merge_forms()
    assert len(groups) == 3
    for node, form, why in groups:
        costs = Fm.form_costs(node, 16, 16, "cpu")
        assert set(costs) == set(Fm.FORMS)
        assert form == min(Fm.EXACT_FORMS, key=lambda f: costs[f].cost)
        assert why.startswith("auto:")
    # The dense kernel's cost grows with C^2 k^2, the stacked form's with C^2 + C k^2: wide
    # groups and big kernels go stacked, narrow ones dense.
    node = groups[-1][0]
    assert Fm.choose_form(node, "auto", 256, 256, "cpu")[0] == "stacked"
    assert Fm.choose_form(node, "auto", 1, 1, "cpu")[0] == "dense"
    # Groups of dense convs have one form, whatever is asked.
    nb = FusedMixedOp(8, 1, primitives="nb201", merge="stacked")
    [(_, form, why)] = nb.merge_forms()
    assert form == "dense" and "depthwise+pointwise groups only" in why


def test_merge_argument_is_checked_and_passed_through():
    with pytest.raises(ValueError, match="merge: expected one of"):
        FusedMixedOp(8, 1, merge="fast")
    net = DartsSearchNetwork(C=4, layers=2, mode="topo", merge="separable")
    assert {m.merge for m in net.modules() if isinstance(m, FusedMixedOp)} == {"separable"}
    net = NB201SearchNetwork(C=4, N=1, mode="topo", merge="dense")
    assert {m.merge for m in net.modules() if isinstance(m, FusedMixedOp)} == {"dense"}
    assert isinstance(net, nn.Module)


def test_compile_step_matches_eager():
    """``compile_step`` computes the eager loss and gradients (dynamo's eager backend: the
    capture and the recompile cap are tested, not Inductor's code generation)."""
    from toponas_kernels.nas.compile import compile_step

    torch.manual_seed(0)
    net = DartsSearchNetwork(C=4, layers=1, mode="topo", merge="stacked").to(DT)
    x, y = torch.randn(2, 3, 8, 8, dtype=DT), torch.tensor([1, 3])
    step = compile_step(net, backend="eager", max_graphs=2)
    params = [p for p in net.parameters()]

    def grads(loss):
        return [g for g in torch.autograd.grad(loss, params, allow_unused=True) if g is not None]

    loss = step(x, y)
    got = grads(loss)
    ref = torch.nn.functional.cross_entropy(net(x), y)
    torch.testing.assert_close(loss, ref, **TIGHT)
    expected = grads(ref)
    assert len(got) == len(expected) > 0
    for g, r in zip(got, expected):
        torch.testing.assert_close(g, r, **TIGHT)
    with pytest.raises(ValueError, match="max_graphs"):
        compile_step(net, max_graphs=0)
