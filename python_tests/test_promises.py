"""Promises a search or a retraining run makes that an end-to-end run does not show by itself:
each test here fails when its promise is broken (the data halves, the averaged data-parallel
gradients, the learning-rate schedules, GDAS's order and straight-through sign, the genotype
rules, the random mask's level, the merge groups and the candidates' own parameters, the
auxiliary loss weight, the DARTS macro structure and the kernel normalization's default).
Tiny networks and synthetic data: seconds each. The checkpoints' promises are in
``test_checkpoints.py``."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from toponas_kernels import FusedMixedOp, ops
from toponas_kernels import data as D
from toponas_kernels.nas import spaces as S
from toponas_kernels.nas.networks import DartsSearchNetwork, NB201SearchNetwork
from toponas_kernels.nas.simplify import Merged, simplify
from toponas_kernels.search import GDAS, ROME, Darts, SearchConfig, random_masks, run
from toponas_kernels.search.base import SearchMethod
from toponas_kernels.train import TrainConfig, train

from utils import backend_cases

QUIET = dict(progress=False, plots=False, threads=1)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny networks: one thread is faster and immune to a busy machine."""


def quiet(_msg):
    pass


def _search(tmp_path, name="run", **kw):
    base = dict(space="nb201", method="darts", dataset="synthetic", epochs=1, layers=1, init_channels=4, batch_size=4,
                train_size=16, steps_per_epoch=None)
    return run(SearchConfig(out=str(tmp_path / name), **{**base, **QUIET, **kw}), log=quiet)


def _cosine(lr: float, lr_min: float, epoch: int, epochs: int) -> float:
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * epoch / epochs))


# ----------------------------------------------------------------------------- the data halves
def test_search_trains_weights_on_one_half_and_the_architecture_on_the_other(tmp_path, monkeypatch):
    """DARTS splits the training set 50/50: every weight step reads the first half, every
    architecture step the second, and one epoch reads each half whole."""
    n = 16
    load = D.load_split
    monkeypatch.setattr(D, "load_split", lambda *a, **kw: load(*a, **{**kw, "augment": "none"}))  # images as stored
    images = load("synthetic", "train", seed=0).with_augment("none")
    index = {images[i][0].numpy().tobytes(): i for i in range(n)}
    assert len(index) == n
    seen = {"weights": [], "architecture": []}
    weight_step, arch_step = SearchMethod.weight_step, SearchMethod.arch_step

    def spy(kind, step):
        def wrapped(self, x, y):
            seen[kind].extend(index[img.numpy().tobytes()] for img in x)
            return step(self, x, y)
        return wrapped

    monkeypatch.setattr(SearchMethod, "weight_step", spy("weights", weight_step))
    monkeypatch.setattr(SearchMethod, "arch_step", spy("architecture", arch_step))
    _search(tmp_path, train_size=n, batch_size=4)
    assert sorted(seen["weights"]) == list(range(n // 2))
    assert sorted(seen["architecture"]) == list(range(n // 2, n))


# ----------------------------------------------------------------------------- data parallel
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mean_grads_rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch.distributed as dist

    from toponas_kernels.runtime import Processes

    procs = Processes()
    procs.start(torch.device("cpu"))
    try:
        params = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(1))]
        params[0].grad = torch.arange(3.0) + 10 * rank
        params[1].grad = torch.full((2, 2), float(rank + 1))
        procs.mean_grads(params)  # params[2] has no gradient on any rank
        torch.save([p.grad for p in params], os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_data_parallel_gradients_are_averaged_over_the_ranks(tmp_path):
    world = 3
    # forked ranks: nothing to import again (a spawned rank spends most of a minute importing on a 2-core machine)
    mp.start_processes(_mean_grads_rank, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True,
                       start_method="fork")
    for rank in range(world):
        g0, g1, g2 = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(g0, torch.arange(3.0) + 10 * (0 + 1 + 2) / world, rtol=0, atol=1e-6)
        torch.testing.assert_close(g1, torch.full((2, 2), (1 + 2 + 3) / world), rtol=0, atol=1e-6)
        assert g2 is None


# ----------------------------------------------------------------------------- schedules
def _record_sgd_lr(monkeypatch) -> list[float]:
    used = []
    step = torch.optim.SGD.step

    def spy(self, *a, **kw):
        used.append(self.param_groups[0]["lr"])
        return step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    return used


def test_search_steps_the_weight_learning_rate_down_its_cosine_every_epoch(tmp_path, monkeypatch):
    used = _record_sgd_lr(monkeypatch)
    result = _search(tmp_path, epochs=3, steps_per_epoch=1)
    cfg = result["config"]
    assert cfg["lr"] > cfg["lr_min"]
    expected = [_cosine(cfg["lr"], cfg["lr_min"], e, 3) for e in range(3)]
    assert used == pytest.approx(expected, rel=1e-12)


def test_retraining_steps_the_learning_rate_down_its_cosine_every_epoch(tmp_path, monkeypatch):
    used = _record_sgd_lr(monkeypatch)
    cfg = TrainConfig(genotype="|nor_conv_3x3~0|+|skip_connect~0|nor_conv_1x1~1|+|skip_connect~0|none~1|avg_pool_3x3~2|",
                      dataset="synthetic", epochs=3, steps_per_epoch=1, layers=1, init_channels=4, batch_size=8,
                      train_size=16, test_size=8, lr=0.1, lr_min=0.01, out=str(tmp_path / "t"), **QUIET)
    train(cfg, log=quiet)
    assert used == pytest.approx([_cosine(0.1, 0.01, e, 3) for e in range(3)], rel=1e-12)


# ----------------------------------------------------------------------------- GDAS
@pytest.mark.parametrize("method_cls,order", [(Darts, ["architecture", "weights"]), (GDAS, ["weights", "architecture"]),
                                              (ROME, ["weights", "architecture"])])
def test_each_method_runs_its_architecture_and_weight_steps_in_its_papers_order(method_cls, order, monkeypatch):
    """DARTS: the architecture step, then the weight step; GDAS and ROME: the weight step, then
    the architecture step (on the weights it just updated)."""
    model = NB201SearchNetwork(4, 1, mode="plain", sampler="gumbel" if method_cls is not Darts else "softmax",
                               exclude=("none",) if method_cls is ROME else ())
    method = method_cls(model, epochs=2, space="nb201", rome_samples=1)
    calls = []
    weight_step, arch_step = method.weight_step, method.arch_step
    monkeypatch.setattr(method, "weight_step", lambda x, y: (calls.append("weights"), weight_step(x, y))[1])
    monkeypatch.setattr(method, "arch_step", lambda x, y: (calls.append("architecture"), arch_step(x, y))[1])
    method.begin_epoch(0)
    batch = (torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    method.step(batch, batch)
    assert calls == order


@pytest.mark.parametrize("backend,device", backend_cases())
def test_gumbel_hard_sample_passes_the_soft_samples_gradient_straight_through(backend, device):
    """GDAS' hard one-hot row has the gradient of the soft row it was drawn from, sign included:
    ``one_hot - probs.detach() + probs``."""
    alpha = torch.randn(6, 5, dtype=torch.float64, device=device, requires_grad=True)
    mask = torch.ones(6, 5, dtype=torch.bool, device=device)
    mask[1, 2] = False
    upstream = torch.randn(6, 5, dtype=torch.float64, device=device)
    hard = ops.gumbel_softmax(alpha, mask, tau=0.7, generator=torch.Generator(device=device).manual_seed(11), backend=backend)
    soft = ops.gumbel_softmax(alpha, mask, tau=0.7, hard=False, generator=torch.Generator(device=device).manual_seed(11),
                              backend=backend)
    assert torch.equal(hard.detach(), torch.zeros_like(soft).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0))
    (g_hard,) = torch.autograd.grad((hard * upstream).sum(), alpha)
    (g_soft,) = torch.autograd.grad((soft * upstream).sum(), alpha)
    assert g_soft.abs().sum() > 0
    torch.testing.assert_close(g_hard, g_soft, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- genotypes
def test_pc_darts_genotype_ranks_edges_by_operation_weight_times_edge_beta():
    """PC-DARTS' edge normalization: an edge's strength is its best non-'none' operation weight
    times its beta softmaxed over the node's incoming edges; the betas can overturn the ranking
    the alphas alone give."""
    model = DartsSearchNetwork(4, layers=3, partial_channels=4)
    names = list(model.space.names)
    none = names.index("none")
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for alphas, betas in ((model.alphas_normal, model.betas_normal), (model.alphas_reduce, model.betas_reduce)):
            alphas.copy_(torch.randn(alphas.shape, generator=g))
            betas.copy_(3 * torch.randn(betas.shape, generator=g))
        # node 3 (edges 2, 3, 4, from nodes 0, 1, 2): the alphas favour nodes 0 and 1, the betas node 2 by far
        model.alphas_normal[2:5] = 0.0
        model.alphas_normal[2:5, names.index("sep_conv_3x3")] = torch.tensor([3.0, 2.5, 1.0], dtype=torch.float64)
        model.betas_normal[2:5] = torch.tensor([0.0, -4.0, 4.0])

    def expected(alphas, betas):
        gene, start = [], 0
        for node in range(4):
            sl = slice(start, start + 2 + node)
            start += 2 + node
            w = torch.softmax(alphas[sl].double(), -1)
            w[:, none] = -1.0
            edge = torch.softmax(betas[sl].double(), -1)
            strength = w.max(-1).values * edge
            for j in sorted(range(2 + node), key=lambda j: -float(strength[j]))[:2]:
                gene.append((names[int(w[j].argmax())], j))
        return gene

    genotype = model.genotype()
    assert genotype.normal == expected(model.alphas_normal.detach(), model.betas_normal.detach())
    assert genotype.reduce == expected(model.alphas_reduce.detach(), model.betas_reduce.detach())
    assert {j for _, j in genotype.normal[2:4]} == {0, 2}  # not the alphas' {0, 1}


def test_nb201_genotype_never_derives_an_excluded_operation():
    names = list(S.get_space("nb201").names)
    model = NB201SearchNetwork(4, 1, sampler="gumbel", exclude=("none",))
    with torch.no_grad():
        model.alphas.copy_(torch.randn(model.alphas.shape, generator=torch.Generator().manual_seed(0)))
        model.alphas[:, names.index("none")] = 10.0  # the largest alpha of every edge
        model.alphas[0, names.index("nor_conv_1x1")] = 9.0
    genotype = model.genotype()
    assert "none" not in genotype
    assert genotype.startswith("|nor_conv_1x1~0|+")
    free = NB201SearchNetwork(4, 1, sampler="gumbel")
    free.load_state_dict(model.state_dict())
    assert free.genotype().count("none~") == 6  # without the exclusion 'none' wins every edge


# ----------------------------------------------------------------------------- masks
@pytest.mark.parametrize("level", [0.2, 0.7])
def test_random_mask_keeps_the_share_its_level_names(level):
    """``--mask-level xi``: each (edge, operation) is kept with probability xi."""
    masks = random_masks({"a": (4000, 8), "b": (1000, 5)}, level, torch.Generator().manual_seed(0))
    kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    # kept with probability xi, plus one op on each edge that drew none: (1 - xi)^k of the edges
    extra = (4000 * (1 - level) ** 8 + 1000 * (1 - level) ** 5) / (4000 * 8 + 1000 * 5)
    assert kept == pytest.approx(level + extra, abs=0.01)


def test_search_with_a_random_mask_keeps_the_share_its_level_names(tmp_path):
    result = _search(tmp_path, steps_per_epoch=1, mask="random", mask_level=0.2)
    rows = [r for m in result["mask"]["masks"].values() for r in m]
    kept = sum(map(sum, rows)) / sum(map(len, rows))
    assert kept == pytest.approx(result["mask"]["kept_share"]) and result["mask"]["level"] == 0.2
    assert 0.1 < kept < 0.45  # 30 entries: 0.2 plus an op on the edges that drew none (about 0.07), never 0.8


# ----------------------------------------------------------------------------- merge groups, parameters
def test_merged_conv_groups_never_mix_strides():
    chains = [(S.Conv(3),), (S.Conv(3, stride=2),), (S.Conv(5),), (S.Conv(5, stride=2),), (S.Conv(3, dilation=2),)]
    graph = simplify(chains)
    merged = [b.node for b in graph.root.branches if isinstance(b.node, Merged)]
    assert sorted(sorted(p.owners[0][0] for p in m.parts) for m in merged) == [[0, 2, 4], [1, 3]]
    for m in merged:
        assert len({p.module.stride for p in m.parts}) == 1


def _twins(C: int) -> S.SearchSpace:
    """Two candidates with the same chain: each must run its own conv."""
    chain = [S.ReLU(), S.Conv(3), S.BN()]
    return S.SearchSpace("twins", [S.OpDef("a", chain), S.OpDef("b", chain), S.OpDef("skip", [S.Identity()])])


def test_candidates_with_equal_chains_each_run_their_own_conv():
    """Sharing is for parameter-free modules only: two candidates with the same conv spec keep
    their own kernels, so the rewritten edge (exact here: BN in eval mode, no normalization)
    equals the plain weighted sum."""
    torch.manual_seed(0)
    plain = FusedMixedOp(4, 1, primitives=_twins(4), mode="plain").double().eval()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    for mode in ("pms", "fms", "pms+fms", "topo"):
        op = FusedMixedOp(4, 1, primitives=_twins(4), mode=mode, normalize=False).double().eval()
        op.load_state_dict(plain.state_dict())
        torch.testing.assert_close(op(x, w), plain(x, w), rtol=1e-10, atol=1e-12, msg=mode)


@pytest.mark.parametrize("space,stride", [("darts", 1), ("darts", 2), ("nb201", 1)])
def test_every_candidate_owns_its_convs_and_affine_bn(space, stride):
    """In every mode an edge holds each candidate's own parameters: as many as the candidates
    built one by one, none of them one tensor under two names."""
    names = S.get_space(space).names
    alone = sum(p.numel() for n in names
                for p in FusedMixedOp(4, stride, primitives=[n], space=space, mode="plain", affine=True).parameters())
    for mode in ("plain", "pms+fms", "topo"):
        op = FusedMixedOp(4, stride, space=space, mode=mode, affine=True)
        params = list(op.parameters())
        assert sum(p.numel() for p in params) == alone, mode
        assert len({p.data_ptr() for p in params}) == len(params), mode
        assert len(list(op.named_parameters(remove_duplicate=False))) == len(params), mode


# ----------------------------------------------------------------------------- retraining
def test_retraining_weighs_the_auxiliary_loss_by_aux_weight(tmp_path):
    """One SGD step (no weight decay, no clipping) moves every weight by -lr (g_main + w g_aux):
    the step is linear in the auxiliary weight w, and not constant."""
    finals = {}
    for w in (0.2, 0.4, 0.8):
        cfg = TrainConfig(genotype="DARTS_V2", dataset="synthetic", epochs=1, steps_per_epoch=1, layers=3, init_channels=4,
                          batch_size=8, train_size=8, test_size=4, aux_weight=w, weight_decay=0.0, grad_clip=0.0,
                          out=str(tmp_path / f"w{w}"), **QUIET)
        train(cfg, log=quiet)
        finals[w] = torch.load(tmp_path / f"w{w}" / "checkpoint.pt", weights_only=True)["model"]
    aux = [k for k, v in finals[0.2].items() if "aux" in k and v.is_floating_point() and v.dim() > 1]
    assert aux
    for k in aux:
        lo = finals[0.4][k].double() - finals[0.2][k].double()
        hi = finals[0.8][k].double() - finals[0.4][k].double()
        assert lo.abs().max() > 1e-6, k
        torch.testing.assert_close(hi, 2 * lo, rtol=1e-3, atol=1e-7, msg=k)


# ----------------------------------------------------------------------------- supernet
@pytest.mark.parametrize("layers", [3, 5])
def test_darts_supernet_halves_the_resolution_in_two_reduction_cells(layers):
    """Reductions at 1/3 and 2/3 of the depth (DARTS' ``i in [layers // 3, 2 * layers // 3]``)."""
    model = DartsSearchNetwork(4, layers=layers)
    sizes = []
    for cell in model.cells:
        cell.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
    model(torch.randn(1, 3, 8, 8))
    halved = [i for i, s in enumerate(sizes) if s < (8 if i == 0 else sizes[i - 1])]
    assert halved == [layers // 3, 2 * layers // 3]
    assert sizes[-1] == 2


def test_kernel_normalization_is_per_output_channel_by_default():
    """Default kernel normalization standardizes each output channel of each candidate kernel:
    rescaling or shifting one output channel of one candidate leaves the edge unchanged. Per
    tensor (an option) it does not."""
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    w = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15], dtype=torch.float64)
    outs = {}
    for normalize in (None, "tensor"):
        torch.manual_seed(0)
        kw = {} if normalize is None else {"normalize": normalize}
        op = FusedMixedOp(4, 1, space="nb201", mode="topo", eps=1e-12, **kw).double()
        before = op(x, w)
        kernels = [p for p in op.parameters() if p.dim() == 4]
        assert sorted(tuple(p.shape[-2:]) for p in kernels) == [(1, 1), (3, 3)]
        with torch.no_grad():
            for p in kernels:
                p[0].mul_(7.0)
                p[1].add_(0.3)
        outs[normalize] = (before, op(x, w))
    before, after = outs[None]
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)
    before, after = outs["tensor"]
    assert (after - before).abs().max() > 1e-2
    assert SearchConfig().kernel_norm is True
