"""The search supernets: shapes, gradients to every architecture parameter, masks, PC-DARTS edge
normalization, Gumbel sampling, genotypes; and the search-step benchmark end to end."""

import json
import os
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


def _search_step(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, str(ROOT / "bench" / "search_step.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.parametrize("mode", ["topo", "fms"])
def test_search_step_benchmark_json(mode):
    """bench/search_step.py end to end on a tiny supernet: one JSON line with the issue's fields,
    in every FusedMixedOp mode (fms included), with the CPU contention of the timing."""
    result = _search_step("--space", "darts", "--mode", mode, "--C", "4", "--cells", "3", "--batch", "2",
                          "--repeats", "1", "--threads", "1", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("peak_bytes", "saved_bytes", "step_seconds", "device", "others_cpu"):
        assert key in record
    # The record names the code it measured: here the checkout, which _search_step puts first
    # on PYTHONPATH (a plain `python bench/search_step.py` would measure the installed package).
    assert record["package"] == str((ROOT / "toponas_kernels").resolve())
    assert "bench: measuring the toponas_kernels at" not in result.stderr
    assert record["mode"] == mode and record["space"] == "darts" and record["batch"] == 2
    assert record["saved_bytes"] > 0 and record["step_seconds"] > 0 and record["peak_bytes"] > 0
    assert 0 <= record["others_cpu"] <= 1.5
    if record["others_cpu"] > record["busy_limit"]:
        assert "unreliable" in result.stderr


def test_search_step_profile():
    """--profile: one more step's self time per op type, largest first, adding up to the total."""
    result = _search_step("--space", "darts", "--mode", "topo", "--C", "4", "--cells", "2", "--batch", "2",
                          "--repeats", "1", "--threads", "1", "--profile", "5", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    prof = json.loads(result.stdout.strip().splitlines()[-1])["profile"]
    top = prof["top"]
    assert len(top) == 5 and [r["self_cpu_ms"] for r in top] == sorted((r["self_cpu_ms"] for r in top), reverse=True)
    total = sum(r["self_cpu_ms"] for r in top) + prof["rest"]["self_cpu_ms"]
    assert abs(total - prof["total_cpu_ms"]) <= 1e-6 * max(1.0, prof["total_cpu_ms"])
    assert prof["total_calls"] == sum(r["calls"] for r in top) + prof["rest"]["calls"] > 0


def test_search_step_without_gpu_answers_in_one_line():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    result = _search_step("--device", "cuda", "--quick")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == ["--device cuda: no CUDA device is visible here; use --device cpu"]


# ----------------------------------------------------------------------------- structure pins
# The supernets against the reference networks' facts (docs/REFERENCE.md), counted independently of
# the package: a network built with one reduction cell, wrong widths or wrong edges fails here.
def _darts_reference_params(C=16, layers=8, classes=10, steps=4, multiplier=4):
    """Weight parameters of the DARTS CIFAR search network, from its definition: stem conv and
    affine BN; per cell two 1x1 preprocess convs (FactorizedReduce has the same count); per edge
    sep_conv 3x3/5x5 (twice depthwise + pointwise), dil_conv 3x3/5x5 (once), BN affine=False,
    pools and none without parameters, and a FactorizedReduce for skip_connect on the stride-2
    edges of reduction cells; Linear."""
    total = 3 * 3 * C * 9 + 2 * 3 * C
    C_pp, C_p, c = 3 * C, 3 * C, C
    edges = sum(2 + i for i in range(steps))
    for i in range(layers):
        reduction = i in (layers // 3, 2 * layers // 3)
        c = 2 * c if reduction else c
        edge = 2 * (9 * c + c * c) + 2 * (25 * c + c * c) + (9 * c + c * c) + (25 * c + c * c)
        total += C_pp * c + C_p * c + edges * edge + (2 * steps * c * c if reduction else 0)
        C_pp, C_p = C_p, multiplier * c
    return total + C_p * classes + classes


def test_darts_network_structure_matches_the_reference():
    model = DartsSearchNetwork()  # the documented defaults: C=16, 8 cells, 10 classes
    assert len(model.cells) == 8
    assert [i for i, cell in enumerate(model.cells) if cell.reduction] == [2, 5]
    widths = [cell.edges[0].C for cell in model.cells]
    assert widths == [16, 16, 32, 32, 32, 64, 64, 64]
    assert model.stem[0].out_channels == 48 and model.classifier.in_features == 4 * 64
    for i, cell in enumerate(model.cells):
        assert len(cell.edges) == 14
        strides = [e.stride for e in cell.edges]
        expected = [2 if cell.reduction and j < 2 else 1 for n in range(4) for j in range(2 + n)]
        assert strides == expected, i
        # after a reduction cell preprocess0 halves the map (FactorizedReduce: two 1x1 stride-2 convs)
        convs = [m for m in cell.preprocess0.modules() if isinstance(m, torch.nn.Conv2d)]
        assert [m.stride for m in convs] == ([(2, 2)] * 2 if i in (3, 6) else [(1, 1)]), i
        assert all(e.primitives == model.space.names and len(e.primitives) == 8 for e in cell.edges)
    assert model.alphas_normal.shape == model.alphas_reduce.shape == (14, 8)
    n = sum(p.numel() for p in model.weight_parameters())
    assert n == _darts_reference_params() == 1930618  # DARTS' search model: 1.930618 MB
    # A smaller instance: the count follows the definition, not one memorised number.
    small = DartsSearchNetwork(C=8, layers=5, num_classes=7)
    assert [i for i, cell in enumerate(small.cells) if cell.reduction] == [1, 3]
    assert sum(p.numel() for p in small.weight_parameters()) == _darts_reference_params(8, 5, 7)


def test_nb201_network_structure_matches_the_reference():
    model = NB201SearchNetwork()  # C=16, N=5
    kinds = [type(c).__name__ for c in model.cells]
    assert kinds == ["ModuleList"] * 5 + ["ResNetBasicBlock"] + ["ModuleList"] * 5 + ["ResNetBasicBlock"] + ["ModuleList"] * 5
    widths = [c[0].C for c in model.cells if isinstance(c, torch.nn.ModuleList)]
    assert widths == [16] * 5 + [32] * 5 + [64] * 5
    assert all(len(c) == 6 and all(e.stride == 1 for e in c) for c in model.cells if isinstance(c, torch.nn.ModuleList))
    assert model.alphas.shape == (6, 5) and model.classifier.in_features == 64

    def reference(C=16, N=5, classes=10):
        total, c = 3 * C * 9 + 2 * C, C
        for stage in range(3):
            if stage:  # ResNet block: two ReLUConvBN 3x3 with affine BN, 1x1 shortcut conv
                total += 9 * c * 2 * c + 9 * (2 * c) ** 2 + 2 * (2 * 2 * c) + c * 2 * c
                c *= 2
            total += N * 6 * (c * c + 9 * c * c)  # nor_conv_1x1 and 3x3 (BN affine=False)
        return total + 2 * c + c * classes + classes

    assert sum(p.numel() for p in model.weight_parameters()) == reference()
    small = NB201SearchNetwork(C=4, N=2, num_classes=3)
    assert sum(p.numel() for p in small.weight_parameters()) == reference(4, 2, 3)


def test_network_defaults_are_documented_ones():
    import inspect

    d = {k: v.default for k, v in inspect.signature(DartsSearchNetwork).parameters.items()}
    assert (d["C"], d["num_classes"], d["layers"], d["steps"], d["multiplier"], d["stem_multiplier"]) == (16, 10, 8, 4, 4, 3)
    assert (d["mode"], d["normalize"], d["partial_channels"], d["sampler"]) == ("plain", True, None, "softmax")
    n = {k: v.default for k, v in inspect.signature(NB201SearchNetwork).parameters.items()}
    assert (n["C"], n["N"], n["num_classes"], n["mode"]) == (16, 5, 10, "plain")
    # normalize=True means per output channel on every edge
    model = DartsSearchNetwork(C=4, layers=3, mode="topo")
    assert {e.normalize for cell in model.cells for e in cell.edges} == {"channel"}
    assert model.betas_normal is None
    pc = DartsSearchNetwork(C=4, layers=3, partial_channels=2)
    assert pc.betas_normal is not None  # PC-DARTS: edge normalization on with partial channels


# ----------------------------------------------------------------------------- host syncs
class _SyncCounter:
    """Counts the calls that read a tensor back to the host (a device-to-host sync on a GPU)
    and list indexing (a host-to-device index copy), through hooks on torch.Tensor."""

    READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch):
        self.calls = []
        for name in self.READS:
            self._hook(monkeypatch, name)
        real_getitem = torch.Tensor.__getitem__

        def getitem(t, index):
            if isinstance(index, list) or (isinstance(index, tuple) and any(isinstance(i, list) for i in index)):
                self.calls.append("__getitem__[list]")
            return real_getitem(t, index)

        monkeypatch.setattr(torch.Tensor, "__getitem__", getitem)

    def _hook(self, monkeypatch, name):
        real = getattr(torch.Tensor, name)

        def counted(t, *a, **k):
            self.calls.append(name)
            return real(t, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize(
    "make",
    [
        lambda: DartsSearchNetwork(C=4, layers=3, mode="topo"),
        lambda: DartsSearchNetwork(C=4, layers=3, mode="plain"),
        lambda: DartsSearchNetwork(C=8, layers=3, mode="topo", partial_channels=2),
        lambda: NB201SearchNetwork(C=4, N=1, mode="topo"),
    ],
    ids=["darts-topo", "darts-plain", "pc-darts-topo", "nb201-topo"],
)
def test_search_step_makes_no_host_sync(make, monkeypatch):
    """After the first step (which reads the search-space masks once), a forward + backward
    step reads nothing back from the device: no per-call mask checks, no retried noise, no
    index lists."""
    model = make()
    if isinstance(model, DartsSearchNetwork):
        mask = torch.ones_like(model.mask_normal)
        mask[:, 3] = False  # a masked candidate: the plain edges index the weights
        model.set_masks(mask, mask.clone())
    x = torch.randn(2, 3, 8, 8)
    _train_step(model, x)
    counter = _SyncCounter(monkeypatch)
    for _ in range(2):
        model.zero_grad()
        _train_step(model, x)
    monkeypatch.undo()
    assert counter.calls == [], counter.calls
    # A new mask is picked up (the cached host copy follows the buffer).
    if isinstance(model, DartsSearchNetwork):
        model.mask_normal[:, 5] = False
        assert model._host_masks([None], ["mask_normal"])[0][0][5] is False
