"""What the TopoNAS DARTS search network keeps for backward: recomputing the stem and the cells
in backward (``DartsSearchNetwork(recompute=True)``, opt-in) changes the memory and nothing
else."""

import pytest
import torch

from toponas_kernels.nas.networks import DartsSearchNetwork
from utils import half_masks, saved_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(**kw):
    """The same float64 topo network twice: keeping its activations, and recomputing."""
    torch.manual_seed(0)
    keep = DartsSearchNetwork(C=4, layers=3, mode="topo", recompute=False, **kw).double()
    redo = DartsSearchNetwork(C=4, layers=3, mode="topo", recompute=True, **kw).double()
    redo.load_state_dict(keep.state_dict())
    assert redo.recompute and not keep.recompute
    return keep, redo


@pytest.mark.parametrize(
    "kw, masked",
    [
        (dict(), False),
        (dict(), True),
        (dict(partial_channels=2), False),  # PC-DARTS: edge normalization, bypass pools
        (dict(partial_channels=2), True),
        (dict(sampler="gumbel"), False),  # GDAS: hard samples drawn outside the cells
    ],
    ids=["darts", "darts-mask", "pc", "pc-mask", "gdas"],
)
def test_recomputing_network_equals_keeping_one(kw, masked):
    """Outputs, input and parameter gradients (weights and architecture) and BN running
    statistics are those of the same network keeping its activations, over two steps (the
    statistics advance once per step, not once more in backward)."""
    keep, redo = _pair(**kw)
    if masked:
        half_masks(keep, 1)
        half_masks(redo, 1)
    before = [b.clone() for b in keep.buffers()]
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for step in range(2):
        results = []
        for net in (keep, redo):
            torch.manual_seed(10 + step)  # the same Gumbel draws in both
            xi = x.clone().requires_grad_()
            out = net(xi)
            params = list(net.parameters())
            grads = torch.autograd.grad(out.sin().sum(), [xi, *params], allow_unused=True)
            results.append((out, grads, [b.clone() for b in net.buffers()]))
        (y0, g0, b0), (y1, g1, b1) = results
        torch.testing.assert_close(y1, y0, atol=0, rtol=0)
        assert len(g1) == len(g0)
        for a, b in zip(g1, g0):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
        for a, b in zip(b1, b0):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    tracked = [b for n, b in redo.named_buffers() if n.endswith("num_batches_tracked")]
    assert max(int(t) for t in tracked) == 2  # two steps, each counted once
    assert any(not torch.equal(a, b) for a, b in zip(before, redo.buffers()))


def test_recompute_default_and_plain_reference():
    """Off by default in every mode (the faster step; plain stays the DARTS reference)."""
    for mode in ("plain", "pms", "pms+fms", "topo"):
        assert not DartsSearchNetwork(C=4, layers=3, mode=mode).recompute
    assert DartsSearchNetwork(C=4, layers=3, mode="topo", recompute=True).recompute
    with pytest.raises(ValueError, match="recompute"):
        DartsSearchNetwork(C=4, layers=3, recompute="yes")


def test_recompute_refuses_dropout():
    """A rerun in backward must draw the same values: dropout inside a recomputed cell is refused."""
    net = DartsSearchNetwork(C=4, layers=3, mode="topo", recompute=True)
    net.cells[0].preprocess1.append(torch.nn.Dropout(0.1))
    with pytest.raises(ValueError, match="Dropout"):
        net(torch.randn(2, 3, 8, 8))


def _saved_bytes(net, x):
    """Bytes saved for backward by one forward, each storage once, parameters and buffers apart
    (as bench/search_step.py's count_saved_bytes)."""
    return saved_bytes(lambda: net(x).sum(), [*net.parameters(), *net.buffers()])


@pytest.mark.parametrize("pc", [None, 4])
def test_topo_network_keeps_only_the_cell_inputs(pc):
    """With recomputation a topo DARTS network keeps the image, the stem output and each cell's
    output but the last (the inputs of the next cells), plus a few small tensors (architecture
    weights, pooled features): at C 8, 5 cells, batch 2, 16x16 and half the candidates masked,
    205 kB, 4.8 % of what it keeps without (10 % with PC 4, whose edges keep less). The bound is
    what those inputs cost, with 8 kB of room; the code before recomputation exceeds it."""
    torch.manual_seed(0)
    net = DartsSearchNetwork(C=8, layers=5, mode="topo", partial_channels=pc)
    half_masks(net, 2)
    x = torch.randn(2, 3, 16, 16)
    acts = [x.nelement(), net.stem[0].out_channels * 16 * 16 * 2]
    hw = 16 * 16
    for cell in net.cells[:-1]:
        hw //= 4 if cell.reduction else 1
        acts.append(2 * net.multiplier * cell.edges[0].C * hw)
    bound = 4 * sum(acts) + 8192  # float32; the rest: weights, softmaxes, pooled features
    net.recompute = False
    kept_before = _saved_bytes(net, x)
    net.recompute = True
    kept = _saved_bytes(net, x)
    assert kept <= bound, (kept, bound)
    assert kept_before > 5 * bound  # what the network kept before cells were recomputed
