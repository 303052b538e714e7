"""The search supernets: shapes, gradients to every architecture parameter, masks, PC-DARTS edge
normalization, Gumbel sampling, genotypes; and the search-step benchmark end to end."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toponas_kernels.nas.networks import DartsSearchNetwork, NB201SearchNetwork

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def _train_step(model, x):
    out = model(x)
    out.logsumexp(1).sum().backward()
    return out


@pytest.mark.parametrize("mode", ["plain", "topo"])
def test_darts_network_forward_backward(mode):
    model = DartsSearchNetwork(C=4, layers=3, mode=mode)
    out = _train_step(model, torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 10)
    assert model.alphas_normal.shape == (14, 8) and model.alphas_reduce.shape == (14, 8)
    for p in model.arch_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert len(model.arch_parameters()) + len(model.weight_parameters()) == len(list(model.parameters()))


def test_darts_network_genotype():
    model = DartsSearchNetwork(C=4, layers=3)
    with torch.no_grad():
        model.alphas_normal.zero_()
        model.alphas_normal[:, 0] = 5.0  # 'none' dominates everywhere: it must still be ignored
        model.alphas_normal[0, 4] = 3.0  # edge 0 (node 0 <- input 0): sep_conv_3x3
        model.alphas_normal[1, 7] = 2.0  # edge 1 (node 0 <- input 1): dil_conv_5x5
    g = model.genotype()
    assert g.normal_concat == [2, 3, 4, 5] and g.reduce_concat == [2, 3, 4, 5]
    assert len(g.normal) == 8 and len(g.reduce) == 8
    assert g.normal[0] == ("sep_conv_3x3", 0) and g.normal[1] == ("dil_conv_5x5", 1)
    assert all(op != "none" for op, _ in g.normal + g.reduce)
    # node i keeps two distinct inputs among its 2 + i predecessors
    for i in range(4):
        inputs = [j for _, j in g.normal[2 * i : 2 * i + 2]]
        assert len(set(inputs)) == 2 and all(0 <= j < 2 + i for j in inputs)


def test_darts_network_masks_switch_ops_off():
    model = DartsSearchNetwork(C=4, layers=3, mode="topo")
    normal = torch.ones(14, 8, dtype=torch.bool)
    normal[:, 4:] = False  # no conv candidates in normal cells
    model.set_masks(normal, torch.ones(14, 8, dtype=torch.bool))
    calls = []
    for cell in model.cells:
        if not cell.reduction:
            for edge in cell.edges:
                for chain in edge._ops[4:]:
                    chain.register_forward_hook(lambda *a: calls.append(1))
    _train_step(model, torch.randn(2, 3, 8, 8))
    assert calls == []
    assert torch.all(model.alphas_normal.grad[:, 4:] == 0)
    with pytest.raises(ValueError, match="normal mask switches off every candidate"):
        model.set_masks(torch.zeros(14, 8, dtype=torch.bool), normal)
    with pytest.raises(ValueError, match="must be a bool tensor of shape"):
        model.set_masks(normal[:, :5], normal)


def test_pc_darts_edge_normalization():
    model = DartsSearchNetwork(C=8, layers=3, mode="topo", partial_channels=4)
    assert model.betas_normal.shape == (14,)
    _train_step(model, torch.randn(2, 3, 8, 8))
    assert model.betas_normal.grad.abs().sum() > 0 and model.betas_reduce.grad.abs().sum() > 0
    # the per-node softmax of the betas sums to one per node
    e = model._edge_weights(model.betas_normal)
    sums = [e[0:2].sum(), e[2:5].sum(), e[5:9].sum(), e[9:14].sum()]
    torch.testing.assert_close(torch.stack(sums), torch.ones(4))


@pytest.mark.parametrize("mode", ["plain", "topo"])
def test_gumbel_sampler_runs_one_op_per_edge(mode):
    model = DartsSearchNetwork(C=4, layers=3, mode=mode, sampler="gumbel")
    w_normal, w_reduce = model.arch_weights()
    assert torch.all(w_normal.detach().sum(1) == 1) and set(w_normal.detach().unique().tolist()) <= {0.0, 1.0}
    ran = {}  # (cell, edge) -> candidates any of whose modules ran (topo runs them one by one)
    for c, cell in enumerate(model.cells):
        for e, edge in enumerate(cell.edges):
            for k, chain in enumerate(edge._ops):
                for module in chain:
                    module.register_forward_hook(lambda *a, key=(c, e), k=k: ran.setdefault(key, set()).add(k))
    _train_step(model, torch.randn(2, 3, 8, 8))
    # one candidate per edge ran at most ('none' sampled: nothing runs)
    assert ran and max(len(ks) for ks in ran.values()) == 1
    assert model.alphas_normal.grad.abs().sum() > 0 and model.alphas_reduce.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["plain", "topo"])
def test_nb201_network(mode):
    model = NB201SearchNetwork(C=4, N=1, mode=mode)
    out = _train_step(model, torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 10) and model.alphas.shape == (6, 5)
    assert model.alphas.grad.abs().sum() > 0
    arch = model.genotype()
    assert re.fullmatch(r"\|\w+~0\|\+\|\w+~0\|\w+~1\|\+\|\w+~0\|\w+~1\|\w+~2\|", arch), arch
    with torch.no_grad():
        model.alphas.zero_()
        model.alphas[:, 3] = 1.0  # nor_conv_3x3 everywhere
    assert model.genotype() == "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|"


def test_search_step_benchmark_json():
    """bench/search_step.py end to end on a tiny supernet: one JSON line with the issue's fields."""
    cmd = [sys.executable, str(ROOT / "bench" / "search_step.py"), "--space", "darts", "--mode", "topo",
           "--C", "4", "--cells", "3", "--batch", "2", "--repeats", "1", "--threads", "1", "--json"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("peak_bytes", "saved_bytes", "step_seconds", "device"):
        assert key in record
    assert record["mode"] == "topo" and record["space"] == "darts" and record["batch"] == 2
    assert record["saved_bytes"] > 0 and record["step_seconds"] > 0 and record["peak_bytes"] > 0
