"""``torch.compile`` on CUDA tensors, checked on a machine without a GPU: every fused public op
and a whole TopoNAS search-network forward + loss are traced by dynamo with ``fullgraph=True``
(which raises at the first graph break) on fake tensors of device ``cuda``.

The backend choice is what differs between devices: on CUDA tensors ``backend.resolve`` picks
the CUDA kernels when they were built, else Triton. Both choices are traced, by setting the
import-time constants of ``_lib`` (``CUDA_BUILT``; ``HAS_TRITON`` and ``TRITON_INTERPRET`` so
that Triton counts as available), and every test checks that the captured graph calls the
``toponas::`` custom ops with the backend the choice should give: the trace really took the CUDA
path, it did not fall back to something else. Fake tensors never run a kernel: the custom ops'
fake implementations give the shapes.

What a CPU cannot check: the backward. Tracing it (AOTAutograd's joint graph) runs the autograd
engine on the fake CUDA tensors, which asks the CUDA driver for the streams of device 0 and
fails without one. The forward is where dynamo traces Python (and so where graphs break); the
backward of each custom op is its registered autograd formula, another custom op with a fake.
"""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from toponas_kernels import _lib, ops
from toponas_kernels import backend as _backend
from toponas_kernels.nas.networks import DartsSearchNetwork, NB201SearchNetwork
from utils import half_masks

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(params=[True, False], ids=["cuda-kernels", "triton"])
def choice(request, monkeypatch):
    """The backend ``auto`` must choose on CUDA tensors: the CUDA kernels when they were built,
    else Triton (made available here; a fake trace never launches it)."""
    monkeypatch.setattr(_lib, "CUDA_BUILT", request.param)
    monkeypatch.setattr(_lib, "HAS_TRITON", True)
    monkeypatch.setattr(_lib, "TRITON_INTERPRET", True)
    monkeypatch.setattr(_backend, "_resolved", {})  # the eager memo knows the real constants
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    return "cuda" if request.param else "triton"


class _Recording:
    """A dynamo backend that keeps the graphs it is given and runs them as they are."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def toponas_calls(self) -> list[tuple[str, str]]:
        """(op name, backend argument) of every ``toponas::`` op call in the graphs."""
        calls = []
        for gm in self.graphs:
            for node in gm.graph.nodes:
                if node.op == "call_function" and str(node.target).startswith("toponas."):
                    names = [a for a in node.args if isinstance(a, str) and a in _backend.BACKENDS]
                    calls.append((str(node.target).split(".")[1], names[-1] if names else None))
        return calls


def _trace(fn, *args):
    """``fn(*args)`` compiled with ``fullgraph=True`` and run on the fakes; the recorder."""
    rec = _Recording()
    out = torch.compile(fn, backend=rec, fullgraph=True, dynamic=False)(*args)
    assert len(rec.graphs) == 1
    for t in out if isinstance(out, (tuple, list)) else [out]:
        assert isinstance(t, FakeTensor) and t.device.type == "cuda", t
    return rec


def test_resolve_traces_on_cuda(choice):
    """The choice itself, as the issue reproduced it: no tensor at all, fullgraph."""
    dev = torch.device("cuda")
    assert torch.compile(lambda: _backend.resolve(None, dev), fullgraph=True)() == choice
    assert torch.compile(lambda: _backend.resolve(choice, dev), fullgraph=True)() == choice
    assert torch.compile(lambda: (_lib.cuda_built(), _lib.triton_available()), fullgraph=True)() == (
        choice == "cuda",
        True,
    )


def test_cuda_built_is_the_dispatcher_answer():
    """The constant is what the dispatcher says about the loaded extension."""
    expected = _lib.HAS_CPP and torch._C._dispatch_has_kernel_for_dispatch_key("toponas::mixed_sum_kernel", "CUDA")
    assert _lib.CUDA_BUILT is expected and _lib.cuda_built() is expected


# Each fused public op, on named inputs, with the custom ops its graph must call.
_CASES = {
    "mixed_sum": (lambda a: ops.mixed_sum(list(a["ys"]), a["w"]), ["mixed_sum"]),
    "masked_softmax": (lambda a: ops.masked_softmax(a["logits"], a["mask"], tau=0.5), ["masked_softmax"]),
    "gumbel_softmax": (lambda a: ops.gumbel_softmax(a["logits"], a["mask"], tau=0.5), ["masked_softmax"]),
    "merge_kernels": (lambda a: ops.merge_kernels(a["kernels"], a["w"], dilations=[1, 1, 2]), ["merge_kernels"]),
    "channel_shuffle": (lambda a: ops.channel_shuffle(a["x"], 2), ["channel_shuffle"]),
    "partial_channel_shuffle": (lambda a: ops.partial_channel_shuffle(a["p"], a["b"], 4), ["partial_channel_shuffle"]),
}


@pytest.mark.parametrize("name", list(_CASES))
def test_fused_op_traces_on_cuda(name, choice):
    """Each fused public op on fake CUDA tensors that require grad: one graph, no break, one
    call of its custom op with the chosen backend."""
    case, expected_ops = _CASES[name]
    with FakeTensorMode():
        grad = dict(device="cuda", requires_grad=True)
        inputs = {
            "ys": [torch.randn(2, 8, 4, 4, **grad) for _ in range(3)],
            "w": torch.randn(3, **grad),
            "logits": torch.randn(5, 3, **grad),
            "mask": torch.ones(5, 3, dtype=torch.bool, device="cuda"),
            "kernels": [torch.randn(8, 4, k, k, **grad) for k in (3, 5, 3)],
            "x": torch.randn(2, 8, 4, 4, **grad),
            "p": torch.randn(2, 2, 4, 4, **grad),
            "b": torch.randn(2, 6, 4, 4, **grad),
        }
        names = list(inputs)
        rec = _trace(lambda *args: case(dict(zip(names, args))), *inputs.values())
    assert rec.toponas_calls() == [(op, choice) for op in expected_ops]


def _fake_cuda(net: torch.nn.Module, mode: FakeTensorMode) -> torch.nn.Module:
    """``net`` with every parameter and buffer replaced, in place, by a fake tensor on ``cuda``
    of its shape, dtype and requires_grad."""
    def fake(t):
        t = mode.from_tensor(t.detach())
        with mode:
            return t.to("cuda")

    for m in net.modules():
        for key, p in m._parameters.items():
            if p is not None:
                m._parameters[key] = torch.nn.Parameter(fake(p), requires_grad=p.requires_grad)
        for key, b in m._buffers.items():
            if b is not None:
                m._buffers[key] = fake(b)
    return net


def _masked_darts(**kw):
    net = DartsSearchNetwork(**kw)
    half_masks(net, seed=1)
    return net


# Small networks (a trace takes seconds per edge): one node (two edges) per cell, a normal and
# two reduction cells. The backend choice changes only the ops' backend argument, so both choices
# are traced on one network and the variants (merge forms, masks, PC-DARTS, NB201) on the CUDA
# kernels' choice.
_SMALL = dict(C=4, layers=3, steps=1, multiplier=1, mode="topo")


@pytest.mark.parametrize(
    "make, choice",
    [
        pytest.param(lambda: DartsSearchNetwork(**_SMALL), True, id="darts-cuda-kernels"),
        pytest.param(lambda: DartsSearchNetwork(**_SMALL), False, id="darts-triton", marks=pytest.mark.slow),
        pytest.param(lambda: _masked_darts(**_SMALL, merge="separable"), True, id="darts-separable-mask", marks=pytest.mark.slow),
        pytest.param(lambda: DartsSearchNetwork(**_SMALL, partial_channels=2), True, id="pc-darts", marks=pytest.mark.slow),
        pytest.param(lambda: NB201SearchNetwork(C=4, N=1, mode="topo"), True, id="nb201"),
    ],
    indirect=["choice"],
)
def test_topo_network_forward_traces_on_cuda(make, choice):
    """A whole TopoNAS supernet forward and loss, parameters and input fake CUDA tensors (the
    parameters requiring grad, as in a search step): one graph, no break, and every fused op
    in it runs the chosen backend. The host-side plans are made eagerly first, as
    ``nas.compile.compile_step`` does before every step."""
    torch.manual_seed(0)
    net = make()
    net.prepare_host("cuda")
    mode = FakeTensorMode()
    _fake_cuda(net, mode)
    with mode:
        x = torch.randn(2, 3, 8, 8, device="cuda")
        y = torch.tensor([1, 3], device="cuda")
        rec = _trace(lambda x, y: F.cross_entropy(net(x), y), x, y)
    calls = rec.toponas_calls()
    names = {op for op, _ in calls}
    assert "masked_softmax" in names and ("mixed_sum" in names or "merge_kernels" in names), names
    assert all(b == choice for _, b in calls), calls
