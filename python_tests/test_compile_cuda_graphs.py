"""What a CPU can check of CUDA-graph readiness (``compile_step(cuda_graphs=True)``): after its
first step, a TopoNAS forward + backward with softmax weights and fixed masks reads nothing back
to the host, makes no tensor from Python values and calls no op whose output shape depends on
the data (each of those would end a CUDA-graph capture); ``cuda_graphs`` asks inductor for
``mode="reduce-overhead"`` and marks each step; other backends and modes are refused."""

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from toponas_kernels.nas import compile as C
from toponas_kernels.nas.networks import DartsSearchNetwork, NB201SearchNetwork

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import _harness as H  # noqa: E402

# A host read-back (.item(), bool(tensor), equal), a tensor from Python values (torch.tensor),
# or an output shape that depends on the data.
NOT_CAPTURABLE = (
    "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal", "aten::lift_fresh",
    "aten::lift_fresh_copy", "aten::nonzero", "aten::masked_select", "aten::unique", "aten::_unique2",
)


def _network(kind, merge, masked):
    torch.manual_seed(0)
    if kind == "nb201":
        net = NB201SearchNetwork(C=4, N=1, mode="topo", merge=merge)
    else:
        net = DartsSearchNetwork(C=4, layers=2, mode="topo", merge=merge, partial_channels=2 if kind == "pc" else 1)
    if masked and kind != "nb201":
        g = torch.Generator().manual_seed(1)
        masks = [torch.rand(net.mask_normal.shape, generator=g) < 0.6 for _ in range(2)]
        for m in masks:
            m[:, -1] = True  # a choosable candidate on every edge
        net.set_masks(*masks)
    return net


def _steps(net, n=2):
    x = torch.randn(2, 3, 16, 16)
    y = torch.randint(0, 10, (2,))
    counts = []
    for _ in range(n):
        with H.OpCounter() as c:
            net.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
        counts.append(c.counts)
    return counts


@pytest.mark.parametrize("kind,merge,masked", [
    ("darts", "separable", True), ("nb201", "auto", False),
    pytest.param("darts", "auto", False, marks=pytest.mark.slow), pytest.param("pc", "auto", True, marks=pytest.mark.slow),
])  # fmt: skip
def test_step_after_the_first_is_capturable(kind, merge, masked):
    net = _network(kind, merge, masked)
    first, second = _steps(net)
    bad = Counter({op: n for op, n in second.items() if op in NOT_CAPTURABLE})
    assert not bad, f"a step after the first still calls {dict(bad)}"
    assert sum(second.values()) > 0


def test_the_check_sees_a_host_read_back():
    """The counter does see the ops the test forbids (so an empty result means something)."""
    with H.OpCounter() as c:
        t = torch.randn(3)
        float(t.sum())
        torch.tensor([1.0, 2.0])
    assert c.counts["aten::_local_scalar_dense"] == 1 and c.counts["aten::lift_fresh"] == 1


def test_cuda_graphs_asks_for_reduce_overhead(monkeypatch):
    seen = {}

    def fake_compile(fn, **kwargs):
        seen.update(kwargs)
        return fn

    marks = []
    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    net = DartsSearchNetwork(C=4, layers=1, mode="topo")
    step = C.compile_step(net, cuda_graphs=True)
    assert seen["mode"] == "reduce-overhead" and seen["dynamic"] is False
    step(torch.randn(1, 3, 8, 8), torch.tensor([1]))
    step(torch.randn(1, 3, 8, 8), torch.tensor([1]))
    assert len(marks) == 2
    seen.clear()
    C.compile_step(net)
    assert "mode" not in seen


def test_cuda_graphs_refuses_other_backends_and_modes():
    net = DartsSearchNetwork(C=4, layers=1, mode="topo")
    with pytest.raises(ValueError, match="inductor"):
        C.compile_step(net, cuda_graphs=True, backend="aot_eager")
    with pytest.raises(ValueError, match="reduce-overhead"):
        C.compile_step(net, cuda_graphs=True, mode="max-autotune")
    with pytest.raises(ValueError, match="cuda_graphs"):
        C.compile_step(net, cuda_graphs="yes")


def _cli(*args):
    import os
    import subprocess

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "toponas_kernels.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600)  # fmt: skip


def test_cli_cuda_graphs_refuses_cpu_and_other_backends(tmp_path):
    base = ["search", "--space", "nb201", "--method", "darts", "--dataset", "synthetic", "--epochs", "1",
            "--train-size", "16", "--batch-size", "8", "--init-channels", "4", "--layers", "1", "--no-progress",
            "--threads", "1", "--cuda-graphs"]  # fmt: skip
    p = _cli(*base, "--device", "cpu", "--out", str(tmp_path / "a"))
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and "--cuda-graphs" in p.stderr
    assert "CUDA" in p.stderr
    p = _cli(*base, "--compile", "aot_eager", "--out", str(tmp_path / "b"))
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and "inductor" in p.stderr
