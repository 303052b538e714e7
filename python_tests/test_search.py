"""The searcher: every method end to end on tiny supernets, and each method's defining
computation against a direct computation of what its paper defines."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from toponas_kernels import ops
from toponas_kernels.nas.networks import DartsSearchNetwork, NB201SearchNetwork, gumbel_top_k
from toponas_kernels.search import (
    GDAS,
    ROME,
    BetaDarts,
    ConfigError,
    Darts,
    Darts2,
    MaskError,
    SearchConfig,
    beta_decay,
    load_masks,
    prune,
    random_masks,
    run,
)
from toponas_kernels.search import masks as M
from toponas_kernels.search import runner as search_runner
from utils import Killed, kill_after

METHODS = ("darts", "darts2", "pc-darts", "beta-darts", "gdas", "rome")

# Tiny settings: a search epoch of a step or two on the synthetic set.
TINY = dict(dataset="synthetic", epochs=1, batch_size=8, train_size=16, steps_per_epoch=2, init_channels=4,
            progress=False, plots=False, mask_batches=1, mask_batch_size=8, mask_inits=1)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny supernets: one thread is faster and immune to a busy machine."""


def tiny(space, method, tmp_path, **kw):
    layers = 1 if space == "nb201" else 3
    return SearchConfig(space=space, method=method, layers=layers, out=str(tmp_path / "run"), **{**TINY, **kw})


def quiet(_msg):
    pass


def check_result(result, cfg, out):
    on_disk = json.load(open(os.path.join(out, "result.json")))
    assert on_disk["genotype"] == result["genotype"]
    for key in ("genotype", "space", "method", "topo", "mask", "dataset", "epochs", "seed", "batch_size",
                "peak_memory_bytes", "search_seconds", "step_seconds", "alphas", "device", "torch", "version"):
        assert key in on_disk, key
    assert on_disk["method"] == cfg.method and on_disk["topo"] == cfg.topo
    assert on_disk["peak_memory_bytes"] >= 0 and on_disk["step_seconds"] > 0
    g = on_disk["genotype"]
    if cfg.space == "nb201":
        groups = g.split("+")
        assert len(groups) == 3
        for i, group in enumerate(groups, start=1):
            ops_i = group.strip("|").split("|")
            assert [int(o.split("~")[1]) for o in ops_i] == list(range(i))
            assert all(o.split("~")[0] in ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3") for o in ops_i)
        assert set(on_disk["alphas"]) == {"alphas"}
    else:
        for cell in ("normal", "reduce"):
            genes = g[cell]
            assert len(genes) == 8 and g[f"{cell}_concat"] == [2, 3, 4, 5]
            for i in range(4):
                (op1, j1), (op2, j2) = genes[2 * i], genes[2 * i + 1]
                assert j1 != j2 and 0 <= j1 < 2 + i and 0 <= j2 < 2 + i
                assert op1 != "none" and op2 != "none"
        assert {"alphas_normal", "alphas_reduce"} <= set(on_disk["alphas"])
    if cfg.mask is not None:
        mask = on_disk["mask"]
        for name, rows in mask["masks"].items():
            assert all(any(r) for r in rows)
        # no genotype operation is a masked one
        names = mask["primitives"]
        if cfg.space == "darts":
            for cell in ("normal", "reduce"):
                rows = mask["masks"][f"mask_{cell}"]
                offsets = [0, 2, 5, 9]
                for i in range(4):
                    for op, j in g[cell][2 * i : 2 * i + 2]:
                        assert rows[offsets[i] + j][names.index(op)] == 1
        else:
            rows = mask["masks"]["mask"]
            edges = [(1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2)]
            for i, group in enumerate(g.split("+"), start=1):
                for o in group.strip("|").split("|"):
                    op, j = o.split("~")
                    assert rows[edges.index((i, int(j)))][names.index(op)] == 1
    for f in ("search_log.csv", "checkpoint.pt", "mask.json" if cfg.mask else "result.json"):
        assert os.path.exists(os.path.join(out, f)), f


# ------------------------------------------------------------------------------ end to end
# Each method on both spaces: plain, TopoNAS, TopoNAS with a random mask, plain with a zero-shot
# mask. The zero-shot mask does not depend on the method (its proxy is a plain supernet), so on
# the DARTS space, where Algorithm 1 costs a minute here, darts computes it and the other methods
# reuse its file.
CASES = [(space, method, topo, mask) for space in ("nb201", "darts") for method in METHODS
         for topo, mask in (("plain", None), ("topo", None), ("topo", "random"), ("plain", "zero-shot"))]


@pytest.fixture(scope="module")
def darts_zero_shot(tmp_path_factory):
    """darts with a zero-shot mask on the DARTS space (level 0.9: one round of Algorithm 1)."""
    cfg = tiny("darts", "darts", tmp_path_factory.mktemp("zs"), mask="zero-shot", mask_level=0.9, threads=1)
    return cfg, run(cfg, log=quiet)


# The DARTS-space zero-shot cases (Algorithm 1 runs once for all of them) run under -m slow.
@pytest.mark.parametrize("space,method,topo,mask", [
    pytest.param(*c, id="-".join(str(v) for v in c),
                 marks=[pytest.mark.slow] if c[0] == "darts" and c[3] == "zero-shot" else [])
    for c in CASES])
def test_search_end_to_end(space, method, topo, mask, tmp_path, request):
    if mask == "zero-shot" and space == "darts":
        cfg, first = request.getfixturevalue("darts_zero_shot")
        if method == "darts":
            result = first
        else:  # the other methods reuse its mask file
            cfg = tiny(space, method, tmp_path, topo=topo, mask=os.path.join(cfg.out, "mask.json"))
            result = run(cfg, log=quiet)
    else:
        cfg = tiny(space, method, tmp_path, topo=topo, mask=mask, mask_level=0.9 if mask == "zero-shot" else 0.5)
        result = run(cfg, log=quiet)
    check_result(result, cfg, cfg.out)
    if cfg.mask == "zero-shot":
        # level 0.9 stops after one round of Algorithm 1: one operation fewer on every edge
        assert result["mask"]["kind"] == "zero-shot" and result["mask"]["rounds"] == 1
        assert result["mask"]["kept_share"] == pytest.approx(7 / 8 if space == "darts" else 24 / 30)
    elif cfg.mask not in (None, "random"):
        assert result["mask"]["source_kind"] == "zero-shot"
        assert result["mask"]["masks"] == json.load(open(cfg.mask))["masks"]


def test_search_exaggerated_space_and_reused_mask(tmp_path):
    cfg = tiny("exaggerated", "darts", tmp_path, topo="topo", mask="random", steps_per_epoch=1, batch_size=4)
    first = run(cfg, log=quiet)
    check_result(first, SearchConfig(space="darts", method="darts", topo="topo", mask="random"), cfg.out)
    # the mask is saved with the result and reused through --mask FILE
    again = tiny("exaggerated", "darts", tmp_path / "b", topo="topo", mask=os.path.join(cfg.out, "result.json"),
                 steps_per_epoch=1, batch_size=4)
    second = run(again, log=quiet)
    assert second["mask"]["masks"] == first["mask"]["masks"]


def test_user_declared_space(tmp_path):
    from toponas_kernels.nas import spaces as S

    space = S.DARTS_SPACE.subset(["none", "skip_connect", "sep_conv_3x3", "dil_conv_5x5"])
    cfg = tiny("darts", "darts", tmp_path, topo="topo")
    cfg.space = space
    result = run(cfg, log=quiet)
    assert len(result["alphas"]["alphas_normal"][0]) == 4
    assert {op for op, _ in result["genotype"]["normal"]} <= {"skip_connect", "sep_conv_3x3", "dil_conv_5x5"}


def test_same_seed_same_result(tmp_path):
    kw = dict(steps_per_epoch=None, train_size=16, batch_size=4)
    a = run(tiny("darts", "rome", tmp_path / "a", **kw), log=quiet)
    b = run(tiny("darts", "rome", tmp_path / "b", **kw), log=quiet)
    assert a["alphas"] == b["alphas"] and a["genotype"] == b["genotype"]
    c = run(tiny("darts", "rome", tmp_path / "c", **kw, seed=1), log=quiet)
    assert c["alphas"] != a["alphas"]


def test_val_batches_differ_from_step_to_step(tmp_path, monkeypatch):
    """The architecture step reads a new batch every step (the bug of a fresh iter() per step
    would show the first batch again and again), and cycles into a new pass."""
    seen = []
    orig = Darts.arch_step

    def spy(self, x, y):
        seen.append(x.clone())
        return orig(self, x, y)

    monkeypatch.setattr(Darts, "arch_step", spy)
    # 24 images: 12 per half, batch 4 -> 3 batches per pass; 2 epochs = 6 arch steps = 2 passes
    run(tiny("nb201", "darts", tmp_path, train_size=24, batch_size=4, steps_per_epoch=None, epochs=2), log=quiet)
    assert len(seen) == 6
    for i in range(6):
        for j in range(i):
            assert not torch.equal(seen[i], seen[j])


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    base = dict(steps_per_epoch=None, train_size=32, batch_size=4, epochs=2, checkpoint_every=2)
    full = run(tiny("nb201", "gdas", tmp_path / "full", **base), log=quiet)
    cut = tiny("nb201", "gdas", tmp_path / "cut", **base)
    with monkeypatch.context() as patch:
        kill_after(patch, GDAS, "step", 7)  # killed in epoch 2, step 4: the last checkpoint is at step 2
        with pytest.raises(Killed):
            run(cut, log=quiet)
    with pytest.raises(ConfigError, match="--resume"):
        run(cut, log=quiet)
    cut.resume = True
    resumed = run(cut, log=quiet)
    assert resumed["alphas"] == full["alphas"]
    assert resumed["genotype"] == full["genotype"]
    with open(os.path.join(cut.out, "search_log.csv")) as f:
        assert len(f.read().strip().splitlines()) == 3  # header + 2 epochs
    # resuming with other options is refused
    other = tiny("nb201", "gdas", tmp_path / "cut", **{**base, "seed": 3}, resume=True)
    with pytest.raises(ConfigError, match="seed"):
        run(other, log=quiet)


# ------------------------------------------------------------------------------ method definitions
class TinySupernet(nn.Module):
    """Two mixed edges of linear candidates and a nonlinearity, float64: small enough for exact
    second derivatives, no custom ops (so autograd can differentiate twice)."""

    def __init__(self, d=5, k=3, classes=4):
        super().__init__()
        self.cand1 = nn.ModuleList(nn.Linear(d, d) for _ in range(k))
        self.cand2 = nn.ModuleList(nn.Linear(d, d) for _ in range(k))
        self.head = nn.Linear(d, classes)
        self.alphas = nn.Parameter(0.3 * torch.randn(2, k))

    def arch_parameters(self):
        return [self.alphas]

    def weight_parameters(self):
        return [p for n, p in self.named_parameters() if n != "alphas"]

    def named_arch_parameters(self):
        return [("alphas", self.alphas)]

    def masks(self):
        return {}

    def forward(self, x, params=None):
        w = torch.softmax(self.alphas, -1)
        h = sum(w[0, i] * torch.tanh(c(x)) for i, c in enumerate(self.cand1))
        h = sum(w[1, i] * torch.tanh(c(h)) for i, c in enumerate(self.cand2))
        return self.head(h)


def _functional_loss(model, weights, alphas, x, y):
    """L(w, alpha) with the weights given as tensors (for autograd through the virtual step)."""
    params = dict(zip([n for n, p in model.named_parameters() if n != "alphas"], weights))
    params["alphas"] = alphas
    logits = torch.func.functional_call(model, params, (x,))
    return nn.functional.cross_entropy(logits, y)


def test_darts2_matches_exact_hypergradient():
    torch.manual_seed(1)
    model = TinySupernet().double()
    method = Darts2(model, epochs=10, lr=0.1, momentum=0.9, weight_decay=3e-4)
    xt, yt = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 4, (16,))
    xv, yv = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 4, (16,))
    # one weight step first, so the momentum buffer takes part in the virtual step
    method.weight_step(xt, yt)
    grads, _, _ = method.unrolled_arch_grads(xt, yt, xv, yv)

    W = [p.detach().clone().requires_grad_(True) for p in method.weight_params]
    alpha = model.alphas.detach().clone().requires_grad_(True)
    eta, mu, wd = method.lr, 0.9, 3e-4
    bufs = [method.w_optimizer.state[p]["momentum_buffer"] for p in method.weight_params]
    loss_t = _functional_loss(model, W, alpha, xt, yt)
    g = torch.autograd.grad(loss_t, W, create_graph=True)
    W1 = [w - eta * (mu * b + gi + wd * w) for w, b, gi in zip(W, bufs, g)]
    exact = torch.autograd.grad(_functional_loss(model, W1, alpha, xv, yv), alpha)[0]

    # weights untouched by the virtual steps
    for p, w in zip(method.weight_params, W):
        assert torch.equal(p.detach(), w.detach())
    err = (grads[0] - exact).abs().max()
    # the central difference is O(eps^2) accurate with eps = 0.01 / ||v||: far below the gradient
    assert err <= 1e-6 * exact.abs().max(), (err, exact)
    # and both parts matter: the gradient at w' with w' held fixed (first order through the
    # virtual step) and the gradient at w (plain first order) are both far off
    W1_fixed = [w.detach() for w in W1]
    partial = torch.autograd.grad(_functional_loss(model, W1_fixed, alpha, xv, yv), alpha)[0]
    naive = torch.autograd.grad(_functional_loss(model, W, alpha, xv, yv), alpha)[0]
    assert (partial - exact).abs().max() > 1000 * err
    assert (naive - exact).abs().max() > 1000 * err


def test_beta_darts_regularizer_is_the_papers(tmp_path):
    model = DartsSearchNetwork(4, layers=3, mode="plain")
    mask = torch.ones(14, 8, dtype=torch.bool)
    mask[3, [0, 5]] = False
    model.set_masks(mask, torch.ones(14, 8, dtype=torch.bool))
    direct = 0.0
    for a, m in ((model.alphas_normal, mask), (model.alphas_reduce, torch.ones(14, 8, dtype=torch.bool))):
        rows = [math.log(sum(math.exp(float(a.detach()[e, o])) for o in range(8) if m[e, o])) for e in range(14)]
        direct += sum(rows) / 14
    assert float(beta_decay(model).detach()) == pytest.approx(direct, rel=1e-6)

    method = BetaDarts(model, epochs=50)
    for epoch, lam in ((0, 0.0), (1, 0.5), (10, 5.0)):
        method.begin_epoch(epoch)
        assert method.coefficient() == lam
    assert method.regularizer() is not None
    # gradient of the regularizer: lambda * softmax(alpha_e) / E on every unmasked entry
    reg = method.regularizer()
    grad = torch.autograd.grad(reg, model.alphas_normal)[0]
    expected = 5.0 * ops.masked_softmax(model.alphas_normal.detach(), mask) / 14
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-9)


def test_gdas_runs_one_op_and_reaches_every_alpha():
    from toponas_kernels.nas.spaces import NB201_SPACE

    # without 'none': a sampled 'none' has a zero output, so its weight (and its row) gets no gradient
    space = NB201_SPACE.subset(["skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"])
    model = NB201SearchNetwork(4, 1, space=space, mode="plain", sampler="gumbel")
    method = GDAS(model, epochs=10, space="nb201")
    method.begin_epoch(9)
    assert model.tau == pytest.approx(0.1)
    method.begin_epoch(0)
    assert model.tau == 10.0
    calls = {}
    for cell in model.cells:
        if isinstance(cell, nn.ModuleList):
            for e, edge in enumerate(cell):
                for k, op in enumerate(edge._ops):
                    op.register_forward_hook(lambda m, i, o, key=(id(edge), k): calls.__setitem__(key, calls.get(key, 0) + 1))
    x = torch.randn(2, 3, 32, 32)
    loss = model(x).sum()
    edges = [edge for cell in model.cells if isinstance(cell, nn.ModuleList) for edge in cell]
    for edge in edges:
        ran = [k for k in range(4) if calls.get((id(edge), k))]
        assert len(ran) == 1  # only the sampled operation of each edge runs
    loss.backward()
    g = model.alphas.grad
    assert g is not None and bool((g != 0).all())  # straight-through reaches every alpha


def test_gumbel_top2_against_direct_computation():
    logits = torch.tensor([0.3, -1.2, 0.8, 0.1], requires_grad=True)
    gen = torch.Generator().manual_seed(5)
    w = gumbel_top_k(logits, 2, tau=0.7, generator=gen)
    gen = torch.Generator().manual_seed(5)
    g = -torch.empty(4).exponential_(generator=gen).log()
    perturbed = torch.log_softmax(logits.detach(), -1) + g
    top = set(perturbed.topk(2).indices.tolist())
    assert {i for i in range(4) if w[i] == 1} == top and float(w.detach().sum()) == pytest.approx(2.0)
    soft = torch.softmax(perturbed / 0.7, -1)
    (w * torch.arange(4.0)).sum().backward()
    jac = torch.diag(soft) - soft[:, None] * soft[None, :]
    expected = (jac @ torch.arange(4.0)) / 0.7  # d soft / d logits (log_softmax shifts cancel)
    torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-7)
    # two draws without replacement: P(i in top 2) by Plackett-Luce, by hand for 3 edges
    p = torch.softmax(torch.tensor([1.0, 0.0, -1.0]), -1).tolist()
    pin = [p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(3) if j != i) for i in range(3)]
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    n = 20000
    for _ in range(n):
        counts += gumbel_top_k(torch.tensor([1.0, 0.0, -1.0]), 2, 1.0, generator=gen).detach()
    for i in range(3):
        assert abs(float(counts[i]) / n - pin[i]) < 4 * math.sqrt(pin[i] * (1 - pin[i]) / n)
    # a node with two incoming edges keeps both
    assert torch.equal(gumbel_top_k(torch.zeros(2), 2, 1.0), torch.ones(2))


def test_rome_topology_runs_two_edges_per_node():
    model = DartsSearchNetwork(4, layers=3, mode="plain", sampler="gumbel", exclude=("none",), topology=True)
    ran = []
    for cell in model.cells:
        for e, edge in enumerate(cell.edges):
            edge.register_forward_hook(lambda m, i, o, e=e, c=cell: ran.append((id(c), e)))
    model(torch.randn(2, 3, 32, 32))
    for cell in model.cells:
        per_node = [sum(1 for c, e in ran if c == id(cell) and sl.start <= e < sl.stop) for sl in model._node_slices()]
        assert per_node == [2, 2, 2, 2]
    # 'none' is never sampled
    for _ in range(20):
        w_n, w_r = model.arch_weights()
        assert float(w_n.detach()[:, 0].abs().sum()) == 0 and float(w_r.detach()[:, 0].abs().sum()) == 0


def test_rome_accumulation_is_the_mean_of_k_gradients():
    torch.manual_seed(0)
    model = NB201SearchNetwork(4, 1, mode="plain", sampler="gumbel", exclude=("none",)).double()
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (4,))
    method = ROME(model, epochs=5, space="nb201", rome_samples=3, arch_lr=1e-9)
    method.begin_epoch(1)
    torch.manual_seed(7)
    method.a_optimizer.zero_grad(set_to_none=True)
    method._accumulated(method.arch_params, x, y, True)
    accumulated = model.alphas.grad.clone()
    torch.manual_seed(7)
    separate = []
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x), y)
        separate.append(torch.autograd.grad(loss, model.alphas)[0])
    torch.testing.assert_close(accumulated, sum(separate) / 3, rtol=1e-10, atol=1e-14)
    assert not torch.allclose(separate[0], separate[1])  # the samples do differ


# ------------------------------------------------------------------------------ masks
def test_random_masks_keep_the_level_and_one_per_edge():
    g = torch.Generator().manual_seed(0)
    masks = random_masks({"a": (400, 8)}, 0.5, g)
    m = masks["a"]
    assert bool(m.any(dim=1).all())
    assert 0.45 < float(m.float().mean()) < 0.56
    low = random_masks({"a": (400, 8)}, 0.05, torch.Generator().manual_seed(0))["a"]
    assert bool(low.any(dim=1).all())  # edges left empty got one operation back


def test_algorithm1_on_a_ranking_computable_by_hand():
    # r(N) = 1 + sum of the values of the kept entries: removing (e, j) lowers r by v[e, j], so
    # s = v / r, and each round drops the lowest-valued operation of every edge.
    v = {"m": torch.tensor([[5.0, 1.0, 3.0, 2.0], [0.5, 4.0, 6.0, 7.0], [9.0, 8.0, 0.1, 0.2]])}
    r = lambda masks: 1.0 + float((v["m"] * masks["m"]).sum())  # noqa: E731
    start = {"m": torch.ones(3, 4, dtype=torch.bool)}
    pruned, rounds = prune(start, [r, r], 0.5)
    expected = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(pruned["m"], expected)
    assert len(rounds) == 2
    assert rounds[0]["removed"] == [["m", 0, 1], ["m", 1, 0], ["m", 2, 2]]
    assert rounds[0]["scores"]["m[1][0]"] == pytest.approx(0.5 / (1 + float(v["m"].sum())))
    # the literal rule (ratio of architecture counts) stops after one round: (3/4)^3 < 0.5
    literal, rounds = prune(start, [r], 0.5, rule="architectures")
    assert len(rounds) == 1 and int(literal["m"].sum()) == 9
    # a relative ranking: score is (r(N) - r(N \\ e)) / r(N), averaged over the functions
    r2 = lambda masks: 2 * r(masks)  # noqa: E731
    _, rounds2 = prune(start, [r, r2], 0.5)
    assert rounds2[0]["scores"]["m[1][0]"] == pytest.approx(rounds[0]["scores"]["m[1][0]"])


def test_etenas_ranking_is_the_frobenius_norm_of_the_logit_correlation():
    logits = torch.randn(12, 10)
    c = torch.corrcoef(logits.double())
    assert M.nngp_frobenius(logits) == pytest.approx(float((c**2).sum().sqrt()), rel=1e-9)
    same = torch.ones(6, 1) * torch.randn(1, 10)
    assert M.nngp_frobenius(same) == pytest.approx(6.0, rel=1e-6)  # all samples alike: ||1 1^T|| = n


def test_mask_file_errors(tmp_path):
    shapes = {"mask": (6, 5)}
    prims = ["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]
    with pytest.raises(MaskError, match="no mask file"):
        load_masks(str(tmp_path / "nope.json"), shapes, prims)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(MaskError, match="not a JSON mask file"):
        load_masks(str(bad), shapes, prims)
    bad.write_text(json.dumps({"masks": {"mask": [[1, 0]]}}))
    with pytest.raises(MaskError, match="6 x 5"):
        load_masks(str(bad), shapes, prims)
    bad.write_text(json.dumps({"masks": {"mask": [[0] * 5] + [[1] * 5] * 5}}))
    with pytest.raises(MaskError, match="every operation"):
        load_masks(str(bad), shapes, prims)
    bad.write_text(json.dumps({"primitives": prims[::-1], "masks": {"mask": [[1] * 5] * 6}}))
    with pytest.raises(MaskError, match="operations"):
        load_masks(str(bad), shapes, prims)


# ------------------------------------------------------------------------------ CLI
def _cli(*args, cwd=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__import__("toponas_kernels").__file__))), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "toponas_kernels.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


SMALL = ["--dataset", "synthetic", "--epochs", "1", "--train-size", "16", "--batch-size", "8", "--init-channels", "4",
         "--layers", "1", "--no-progress", "--threads", "1"]


def test_cli_search_prints_the_genotype_and_writes_the_result(tmp_path):
    out = tmp_path / "run"
    p = _cli("search", "--space", "nb201", "--method", "darts", "--topo", "topo", *SMALL, "--out", str(out))
    assert p.returncode == 0, p.stderr
    result = json.load(open(out / "result.json"))
    assert p.stdout.strip() == result["genotype"]
    assert "epoch 1/1" in p.stderr
    for picture in ("arch_weights.png", "cell.png"):
        with open(out / picture, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    rows = open(out / "search_log.csv").read().splitlines()
    assert rows[0].startswith("epoch,lr,") and "genotype" in rows[0] and len(rows) == 2
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert not (out / "tensorboard").exists()
    else:
        assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "tensorboard"))


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--space", "foo", "--method", "darts"], "--space"),
        (["--space", "nb201", "--method", "nas"], "--method"),
        (["--space", "nb201", "--method", "darts", "--topo", "fast"], "--topo"),
        (["--space", "nb201", "--method", "gdas", "--partial-channels", "4"], "--partial-channels"),
        (["--space", "nb201", "--method", "darts", "--mask", "random", "--mask-level", "1.5"], "--mask-level"),
        (["--space", "nb201", "--method", "darts", "--mask", "random", "--mask-level", "0"], "--mask-level"),
        (["--space", "nb201", "--method", "darts", "--mask", "/nonexistent/mask.json"], "--mask"),
        (["--space", "nb201", "--method", "darts", "--recompute-cells"], "--recompute-cells"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, needle):
    p = _cli("search", *args, *SMALL, "--out", str(tmp_path / "x"))
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], p.stderr
    assert "Traceback" not in p.stderr


def _choices(command: str) -> dict[str, tuple]:
    from toponas_kernels import cli

    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: tuple(a.choices) for a in sub.choices[command]._actions if a.choices is not None}


@pytest.mark.parametrize("command", ["search", "plan"])
def test_cli_choices_are_the_registries(command):
    """The CLI offers exactly the methods of the registry, the modes of the TopoNAS module and the
    merge forms of the merged-conv module, so a name added to one of them cannot be missed."""
    from toponas_kernels.nas.forms import MERGE_CHOICES
    from toponas_kernels.nas.mixed_op import FusedMixedOp
    from toponas_kernels.nas.simplify import MODES
    from toponas_kernels.nas.spaces import get_space
    from toponas_kernels.search import METHOD_CLASSES, METHODS, TOPO_MODES

    choices = _choices(command)
    assert set(choices["method"]) == set(METHOD_CLASSES) == set(METHODS)
    assert set(choices["topo"]) == set(MODES) == set(TOPO_MODES)
    assert {"plain", "pms", "fms", "pms+fms", "topo"} <= set(MODES)
    if command == "search":
        assert set(choices["merge"]) == set(MERGE_CHOICES)
    for name, cls in METHOD_CLASSES.items():  # the registry's keys are the classes' own names
        assert cls.name == name
    for mode in MODES:  # every mode the CLI offers builds a module
        FusedMixedOp(4, 1, primitives=get_space("nb201"), mode=mode)


@pytest.mark.parametrize("space", ["darts", "nb201"])
def test_method_classes_own_sampler_exclusions_and_topology(space):
    """The supernet of a run takes its sampler, excluded operations and topology logits from the
    method class: softmax mixing for the DARTS family, Gumbel sampling for GDAS and ROME, and ROME
    alone without 'none' and with topology betas (on the DARTS network)."""
    for method in METHODS:
        config = SearchConfig(space=space, method=method, dataset="synthetic", init_channels=4, layers=1, epochs=1)
        model = search_runner.build_supernet(config.resolved(), 10, 3)
        assert model.sampler == ("gumbel" if method in ("gdas", "rome") else "softmax"), method
        assert model.exclude == (("none",) if method == "rome" else ()), method
        topology = getattr(model, "topology", False)
        assert topology == (method == "rome" and space == "darts"), method


def test_cli_data_errors_are_one_line(tmp_path):
    base = ["search", "--space", "nb201", "--method", "darts", "--epochs", "1", "--out", str(tmp_path / "x")]
    p = _cli(*base, "--dataset", "mnist-foo")
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and "mnist-foo" in p.stderr
    p = _cli(*base, "--dataset", "imagenet16-120", "--data-dir", str(tmp_path / "missing"))
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1
    assert str(tmp_path / "missing") in p.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    p = _cli("search", "--space", "nb201", "--method", "darts", *SMALL, "--mask", str(bad), "--out", str(tmp_path / "y"))
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and "bad.json" in p.stderr


# ------------------------------------------------------------------------------ data parallel
@pytest.mark.parametrize("space,method", [("nb201", "darts"), ("nb201", "gdas"), ("darts", "rome")])
def test_data_parallel_two_processes_agree(space, method, tmp_path):
    """torchrun with 2 CPU processes (gloo): each reads its share, gradients are averaged, every
    random draw is the same on both ranks (a mismatch would stop the run), both ranks end with
    the same architecture parameters, and only rank 0 writes."""
    import toponas_kernels

    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.path.dirname(os.path.dirname(toponas_kernels.__file__))}
    layers = "1" if space == "nb201" else "3"
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
         "toponas_kernels.cli", "search", "--space", space, "--method", method, "--dataset", "synthetic",
         "--epochs", "1", "--train-size", "32", "--batch-size", "8", "--init-channels", "4", "--layers", layers,
         "--device", "cpu", "--no-progress", "--no-plots", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.load(open(out / "result.json"))
    assert result["processes"] == {"world_size": 2, "ranks_agree": True}
    assert p.stderr.count("result: ") == 1 and p.stderr.count("epoch 1/1") == 1  # rank 0 alone reports
    assert result["steps"] == 2  # 16 images per half, 8 per step split over 2 ranks


def test_merge_forms_and_compile_reach_the_supernet(tmp_path):
    cfg = tiny("darts", "darts", tmp_path / "sep", topo="topo", merge="separable")
    run(cfg, log=quiet)
    from toponas_kernels.search.runner import build_supernet

    model = build_supernet(cfg.resolved(), 10, 3)
    assert {op.merge for cell in model.cells for op in cell.edges} == {"separable"}
    with pytest.raises(ConfigError, match="--merge"):
        run(tiny("darts", "darts", tmp_path / "bad", merge="fast"), log=quiet)
    # compiled steps (aot_eager: the compiled forward and backward graphs without code generation)
    eager = run(tiny("nb201", "darts", tmp_path / "e"), log=quiet)
    compiled = run(tiny("nb201", "darts", tmp_path / "c", compile="aot_eager"), log=quiet)
    for name in eager["alphas"]:
        torch.testing.assert_close(torch.tensor(compiled["alphas"][name]), torch.tensor(eager["alphas"][name]),
                                   rtol=1e-4, atol=1e-6)


def test_recompute_cells_reaches_the_network_and_changes_nothing_else(tmp_path):
    """--recompute-cells (opt-in) builds the DARTS network that reruns its cells in backward;
    the search it runs gives the architecture weights of the same search without it."""
    from toponas_kernels.search.runner import build_supernet

    cfg = tiny("darts", "pc-darts", tmp_path / "r", topo="topo", recompute_cells=True)
    assert build_supernet(cfg.resolved(), 10, 3).recompute
    assert not build_supernet(tiny("darts", "pc-darts", tmp_path / "k", topo="topo").resolved(), 10, 3).recompute
    redo = run(cfg, log=quiet)
    keep = run(tiny("darts", "pc-darts", tmp_path / "k", topo="topo"), log=quiet)
    for name in keep["alphas"]:
        torch.testing.assert_close(torch.tensor(redo["alphas"][name]), torch.tensor(keep["alphas"][name]),
                                   rtol=1e-5, atol=1e-7)
