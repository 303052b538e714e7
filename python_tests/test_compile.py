"""``torch.compile`` of a whole search step (``nas.compile.compile_step``) on the topo DARTS
network: with a softmax sampler and fixed masks it captures in one graph and gives eager's loss,
gradients and BN statistics; GDAS compiles a bounded number of graphs. Tiny networks, float64,
``aot_eager`` (AOTAutograd's forward and backward graphs, no code generation) or a backend that
only counts dynamo's graphs."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.backends.registry import lookup_backend

from toponas_kernels.nas.compile import compile_step
from toponas_kernels.nas.networks import DartsSearchNetwork
from utils import half_masks

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts from no compiled code (the networks' own frames, e.g. GDAS' resumed
    forward, are shared by every compiled step of the process)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()

DT = torch.float64
TIGHT = dict(rtol=1e-7, atol=1e-10)


def _net(masked=False, seed=1, **kw):
    torch.manual_seed(0)
    net = DartsSearchNetwork(C=4, layers=2, mode="topo", **kw).to(DT)
    if masked:
        half_masks(net, seed)
    return net


class _Counting:
    """A dynamo backend that counts the graphs it is given and runs them with ``inner``
    (None: the captured FX graph as it is)."""

    def __init__(self, inner=None):
        self.graphs = 0
        self.inner = None if inner is None else lookup_backend(inner)

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward if self.inner is None else self.inner(gm, example_inputs)


def _data():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 8, 8, dtype=DT, generator=gen), torch.tensor([1, 3])


@pytest.mark.parametrize(
    "kw, masked",
    [
        # all slow (about two minutes each on two cores); the default run compiles a topo step in
        # test_forms.py::test_compile_step_matches_eager and traces one on CUDA in test_compile_cuda_trace.py
        pytest.param(dict(), False, marks=pytest.mark.slow),
        pytest.param(dict(), True, marks=pytest.mark.slow),
        pytest.param(dict(partial_channels=2), False, marks=pytest.mark.slow),  # PC-DARTS: edge normalization, bypass pools
        pytest.param(dict(partial_channels=2, recompute=True), True, marks=pytest.mark.slow),  # and cell recomputation
    ],
    ids=["darts", "darts-mask", "pc", "pc-mask-recompute"],
)
def test_topo_step_is_one_graph_with_eager_values(kw, masked):
    """No graph break (``fullgraph=True`` raises at one), one graph over two steps (nothing
    host-side the first trace fills in makes it recompile), and the eager network's loss,
    gradients of every parameter (weights, alphas, betas) and BN running statistics."""
    net = _net(masked, **kw)
    ref = copy.deepcopy(net)
    backend = _Counting("aot_eager")
    step = compile_step(net, backend=backend, fullgraph=True)
    x, y = _data()
    for _ in range(2):
        loss = step(x, y)
        loss.backward()
        expected = F.cross_entropy(ref(x), y)
        expected.backward()
        torch.testing.assert_close(loss, expected, **TIGHT)
    assert backend.graphs == 1
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, **TIGHT, msg=name)
    for (name, b), r in zip(net.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, r, **TIGHT, msg=name)


@pytest.mark.slow
def test_a_new_mask_is_a_new_graph():
    """Masks are read through their host copy, which ``compile_step`` refreshes before every
    step: a new mask gives a new graph, computing with the new mask."""
    net = _net(masked=True)
    ref = copy.deepcopy(net)
    backend = _Counting()
    step = compile_step(net, backend=backend, fullgraph=True)
    x, y = _data()
    step(x, y)
    for m in (net, ref):
        half_masks(m, seed=2)
    torch.testing.assert_close(step(x, y), F.cross_entropy(ref(x), y), **TIGHT)
    assert backend.graphs == 2


@pytest.mark.slow
def test_gdas_step_compiles_a_bounded_number_of_graphs():
    """GDAS' sampled sub-network is known only after the sample is read back (a graph break):
    the rest of the step compiles once per new sub-network up to ``max_graphs`` and then runs
    eagerly, so the number of graphs stops growing."""
    net = DartsSearchNetwork(C=4, layers=2, mode="topo", sampler="gumbel")
    backend = _Counting()
    max_graphs = 2
    step = compile_step(net, backend=backend, max_graphs=max_graphs)
    x, y = (t.float() if t.is_floating_point() else t for t in _data())
    counts = []
    for i in range(6):
        torch.manual_seed(i)  # another sample each step
        loss = step(x, y)
        loss.backward()
        assert torch.isfinite(loss)
        counts.append(backend.graphs)
    # The first step: the sampling, the read of the sample (which dynamo splits in pieces) and
    # the rest of the step in one graph (before: 10, the edges broke it); then one graph per
    # new sub-network up to the cap, then none.
    # torch 2.11's dynamo splits the read of the sample into more pieces (7 graphs in the first
    # step, docs/TORCH_VERSIONS.md); still bounded, which is what the last two lines check.
    assert counts[0] <= (4 if torch.__version__ >= (2, 14) else 8), counts
    assert counts[-1] <= counts[0] + max_graphs - 1, counts
    assert counts[max_graphs:] == [counts[-1]] * (len(counts) - max_graphs), counts
