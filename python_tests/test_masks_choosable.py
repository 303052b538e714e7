"""Masks never leave an edge with nothing a derivation can choose, and the DARTS derivation never
derives 'none' (search/masks.py, DartsSearchNetwork.genotype): random and zero-shot masks over
many seeds and levels, mask files, and the genotype of every DARTS-space sampler/ranking."""

import json

import pytest
import torch
from torch import nn

from toponas_kernels.nas import spaces as S
from toponas_kernels.nas.networks import DartsSearchNetwork
from toponas_kernels.search import masks as M

DARTS = list(S.get_space("darts").names)
NB201 = list(S.get_space("nb201").names)
SHAPES = {"mask_normal": (14, len(DARTS)), "mask_reduce": (14, len(DARTS))}
LEVELS = (0.02, 0.1, 0.3, 0.5, 0.8)
NODE_EDGES = [slice(0, 2), slice(2, 5), slice(5, 9), slice(9, 14)]


def dead_edges(masks, choosable):
    c = torch.tensor(choosable)
    return {name: (~(m & c).any(dim=1)).nonzero().flatten().tolist() for name, m in masks.items()}


@pytest.mark.parametrize("primitives, exclude", [(DARTS, ()), (NB201, ()), (NB201, ("none",))])
def test_random_masks_keep_a_choosable_operation_on_every_edge(primitives, exclude):
    choosable = M.choosable_ops(primitives, exclude)
    assert choosable == [p != "none" for p in primitives]
    shapes = {"a": (14, len(primitives)), "b": (6, len(primitives))}
    unguarded = 0
    for level in LEVELS:
        kept = []
        for seed in range(150):
            masks = M.random_masks(shapes, level, torch.Generator().manual_seed(seed), choosable)
            assert not any(dead_edges(masks, choosable).values()), (level, seed)
            kept += [float(m.float().mean()) for m in masks.values()]
            old = M.random_masks(shapes, level, torch.Generator().manual_seed(seed))
            unguarded += any(dead_edges(old, choosable).values())
        # the guard adds one operation to an edge that kept nothing choosable (probability
        # (1 - level)^(k - 1), the k - 1 choosable columns all dropped)
        k = len(primitives)
        assert abs(sum(kept) / len(kept) - (level + (1 - level) ** (k - 1) / k)) < 0.015, level
    assert unguarded > 0  # without the guard some of these masks cut an edge


def test_random_mask_of_the_reported_repro_keeps_node_0_of_the_reduction_cell():
    # --mask random --mask-level 0.1 --seed 1 on the DARTS space: the unguarded mask left edge 1
    # of the reduction cell (node 0's second input) only 'none'
    old = M.random_masks(SHAPES, 0.1, torch.Generator().manual_seed(1))
    assert 1 in dead_edges(old, M.choosable_ops(DARTS))["mask_reduce"]
    new = M.random_masks(SHAPES, 0.1, torch.Generator().manual_seed(1), M.choosable_ops(DARTS))
    assert not any(dead_edges(new, M.choosable_ops(DARTS)).values())
    # the first cell's Bernoulli draw is kept; only its edges without a choosable one gained one
    drawn = torch.rand(14, len(DARTS), generator=torch.Generator().manual_seed(1)) < 0.1
    fine = drawn[:, 1:].any(dim=1)
    assert torch.equal(new["mask_normal"][fine], drawn[fine])
    assert torch.equal((new["mask_normal"][~fine] & ~drawn[~fine]).sum(dim=1), torch.ones(int((~fine).sum()), dtype=torch.long))


def test_choosable_flags_are_checked():
    with pytest.raises(M.MaskError, match="choosable"):
        M.random_masks({"a": (3, 4)}, 0.5, torch.Generator(), [False] * 4)
    with pytest.raises(M.MaskError, match="choosable"):
        M.random_masks({"a": (3, 4)}, 0.5, torch.Generator(), [True] * 3)


def test_algorithm1_never_prunes_an_edges_last_choosable_operation():
    # the ranking loves column 0 ('none'): removing it costs the most, every other operation
    # nothing, so the unguarded prune keeps only 'none' on some edges
    choosable = M.choosable_ops(DARTS)
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        v = torch.rand(14, len(DARTS), generator=g)
        v[:, 0] += 1.0  # above every other operation of its edge
        r = lambda masks, v=v: 1.0 + float((v * masks["m"]).sum())  # noqa: E731
        start = {"m": torch.ones(14, len(DARTS), dtype=torch.bool)}
        for level in (0.1, 0.5):
            pruned, rounds = M.prune(start, [r], level, choosable=choosable)
            assert not dead_edges(pruned, choosable)["m"], (seed, level)
            # the guard removes 'none' instead where it would have cut the edge
            unguarded, _ = M.prune(start, [r], level)
            if level == 0.1:
                assert dead_edges(unguarded, choosable)["m"] == list(range(14))
                assert torch.equal(pruned["m"].sum(dim=1), torch.ones(14, dtype=torch.long))
                assert not bool(pruned["m"][:, 0].any())


class _Proxy(nn.Module):
    """A 'supernet' whose logits grow with the kept 'none' entries: ETENAS ranks 'none' first."""

    def __init__(self):
        super().__init__()
        for name, (edges, k) in SHAPES.items():
            self.register_buffer(name, torch.ones(edges, k, dtype=torch.bool))
        self.lin = nn.Linear(4, 10)

    def forward(self, x):
        keep = sum(getattr(self, n)[:, 0].float().sum() for n in SHAPES)
        others = sum(getattr(self, n)[:, 1:].float().sum() for n in SHAPES)
        return self.lin(x) * (1.0 + keep) + 1e-3 * others * x.sum(dim=1, keepdim=True)


def test_zero_shot_masks_keep_a_choosable_operation():
    images = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    for level in (0.1, 0.5):
        masks, rec = M.zero_shot_masks(_Proxy, SHAPES, images, level, inits=1, seed=0, batch_size=8,
                                       choosable=M.choosable_ops(DARTS))
        assert not any(dead_edges(masks, M.choosable_ops(DARTS)).values())
        assert rec["rounds"]


def test_mask_file_with_an_edge_of_only_none_is_refused(tmp_path):
    rows = [[1] * len(NB201)] * 6
    rows[3] = [1] + [0] * (len(NB201) - 1)
    path = tmp_path / "mask.json"
    path.write_text(json.dumps({"primitives": NB201, "masks": {"mask": rows}}))
    with pytest.raises(M.MaskError, match=r"leaves edge\(s\) \[3\] only \['none'\]"):
        M.load_masks(str(path), {"mask": (6, len(NB201))}, NB201)
    rows[3] = [1, 1] + [0] * (len(NB201) - 2)
    path.write_text(json.dumps({"primitives": NB201, "masks": {"mask": rows}}))
    masks, _ = M.load_masks(str(path), {"mask": (6, len(NB201))}, NB201)
    assert masks["mask"][3].tolist() == [True, True, False, False, False]


# ---------------------------------------------------------------------------------- genotype
@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return {
        "darts": DartsSearchNetwork(C=4, layers=1),
        "pc-darts": DartsSearchNetwork(C=4, layers=1, partial_channels=2),
        "rome": DartsSearchNetwork(C=4, layers=1, sampler="gumbel", exclude=("none",), topology=True),
    }


def _set(net, masks, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.arch_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 3)
        # the strongest weights on 'none' and on edges with little left: the cases that used to derive it
        net.alphas_normal[:, 0] += 5.0
        net.alphas_reduce[:, 0] += 5.0
    net.set_masks(masks["mask_normal"], masks["mask_reduce"])


@pytest.mark.parametrize("kind", ["darts", "pc-darts", "rome"])
def test_genotype_never_derives_none_over_many_random_masks(nets, kind):
    net = nets[kind]
    choosable = M.choosable_ops(DARTS, net.exclude)
    for level in LEVELS:
        for seed in range(60):
            masks = M.random_masks(SHAPES, level, torch.Generator().manual_seed(seed), choosable)
            _set(net, masks, seed)
            geno = net.genotype()
            for cell, name in (("normal", "mask_normal"), ("reduce", "mask_reduce")):
                gene = getattr(geno, cell)
                assert len(gene) == 8
                for k, (op, j) in enumerate(gene):
                    assert op != "none", (kind, level, seed, cell, gene)
                    edge = NODE_EDGES[k // 2].start + j
                    assert bool(masks[name][edge, DARTS.index(op)])  # an unmasked operation
                for node in range(4):
                    assert gene[2 * node][1] != gene[2 * node + 1][1]  # two distinct edges per node


def test_rome_ranks_only_edges_with_something_to_derive(nets):
    net = nets["rome"]
    masks = {n: torch.ones(14, len(DARTS), dtype=torch.bool) for n in SHAPES}
    masks["mask_reduce"][3] = torch.tensor([True] + [False] * (len(DARTS) - 1))  # node 1's edge from 1
    _set(net, masks, 0)
    with torch.no_grad():
        net.betas_reduce[2:5] = torch.tensor([0.0, 5.0, 1.0])  # the dead edge has the largest topology beta
    gene = net.genotype().reduce
    assert [j for _, j in gene[2:4]] == [2, 0] and all(op != "none" for op, _ in gene)


def test_genotype_with_a_node_left_one_edge_raises_naming_it(nets):
    net = nets["darts"]
    masks = {n: torch.ones(14, len(DARTS), dtype=torch.bool) for n in SHAPES}
    masks["mask_reduce"][1] = torch.tensor([True] + [False] * (len(DARTS) - 1))
    _set(net, masks, 0)
    with pytest.raises(ValueError, match=r"reduction cell node 2 has 1 incoming edge.*\[1\].*'none'"):
        net.genotype()
