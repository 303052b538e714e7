"""Known-answer checks of the sampling methods: on a task that exactly one candidate can solve,
GDAS and ROME, driven through their real ``step()`` with a tau that anneals, must derive it.

The task: each image is a stack of rows (every row a random value, plus a little noise); class 1
is the transpose of such an image (columns). The one-edge supernet is an NB201 edge followed by
ReLU, global average pooling and a linear layer. ``none``, ``skip_connect``, ``nor_conv_1x1`` and
``avg_pool_3x3`` commute with the transpose (BN normalises each channel over batch and space), and
so do ReLU and the pooling after them: the features of an image and of its transpose are the
same, and the two classes have the same distribution of features, so any of these candidates
leaves the classifier at chance. Only ``nor_conv_3x3`` (a kernel that need not be symmetric) can
tell rows from columns. A flipped straight-through sign makes both methods derive a wrong
candidate on every seed; the right one derives ``nor_conv_3x3`` after 80 steps (the budget of
the small NB201 quality benchmark) by a margin about ten times the initial spread of the alphas.

ROME's topology has a known answer of its own: a node with three incoming edges of which two
carry the label; Gumbel top-2 sampling driven by ROME's step must rank those two edges first.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from toponas_kernels.nas.mixed_op import FusedMixedOp
from toponas_kernels.nas.networks import _ArchMixin, gumbel_top_k
from toponas_kernels.nas.spaces import get_space
from toponas_kernels.search.gdas import GDAS
from toponas_kernels.search.rome import ROME


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: more threads only contend with each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class OneEdgeNet(nn.Module, _ArchMixin):
    """One NB201 edge with the supernets' sampling (``_ArchMixin``), then ReLU, global average
    pooling and a linear classifier: only the sampled candidate runs."""

    def __init__(self, C: int, mode: str, exclude: tuple[str, ...]):
        super().__init__()
        self.space = get_space("nb201")
        self._set_sampling("gumbel", exclude)
        self.edge = FusedMixedOp(C, 1, primitives=self.space, mode=mode)
        self.head = nn.Linear(C, 2)
        self.alphas = nn.Parameter(1e-3 * torch.randn(1, len(self.space)))
        self.register_buffer("mask", torch.ones(1, len(self.space), dtype=torch.bool))

    def _edges_and_masks(self):
        yield from zip([self.edge], self._mask_rows("mask"))

    def arch_weights(self):
        return self._arch_rows(self.alphas, self.mask)

    def forward(self, x):
        w = self.arch_weights()
        (rows,) = self._host_masks([w], ["mask"])
        return self.head(torch.relu(self.edge(x, w[0], rows[0])).mean((2, 3)))

    def derived(self) -> str:
        """The derived operation: the largest alpha among the selectable candidates (not
        ``exclude``), the rule of the supernets' ``genotype()``."""
        keep = self._selectable_mask(self.mask)[0]
        alphas = self.alphas.detach()[0].masked_fill(~keep, float("-inf"))
        return self.space.names[int(alphas.argmax())]


def rows_or_columns(n: int, C: int, g: torch.Generator, size: int = 6):
    rows = torch.randn(n, C, size, 1, generator=g).expand(n, C, size, size)
    x = rows + 0.2 * torch.randn(n, C, size, size, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    return torch.where(y[:, None, None, None] == 1, x.transpose(2, 3), x), y


def search(method_cls, model, seed: int, epochs: int, steps: int, **hparams):
    g = torch.Generator().manual_seed(seed)
    method = method_cls(model, epochs=epochs, space="nb201", **hparams)
    taus = []
    for epoch in range(epochs):
        method.begin_epoch(epoch)
        taus.append(model.tau)
        for _ in range(steps):
            method.step(rows_or_columns(32, 4, g), rows_or_columns(32, 4, g))
        method.end_epoch(epoch)
    return taus


@pytest.mark.parametrize("mode", ["plain", "topo"])
@pytest.mark.parametrize("seed", [0, 1])
def test_gdas_derives_the_only_operation_that_can_solve_the_task(mode, seed):
    torch.manual_seed(seed)
    model = OneEdgeNet(4, mode, exclude=())
    start = model.alphas.detach().clone()
    taus = search(GDAS, model, seed, epochs=5, steps=16)
    assert taus[0] == 10.0 and taus[-1] == pytest.approx(0.1)  # the schedule anneals to its end
    alphas = model.alphas.detach()[0]
    names = list(model.space.names)
    assert names[int(alphas.argmax())] == "nor_conv_3x3", alphas.tolist()
    # a clear winner, not a coin toss among alphas that barely moved from their initial spread
    others = torch.cat([alphas[: names.index("nor_conv_3x3")], alphas[names.index("nor_conv_3x3") + 1 :]])
    assert float(alphas.max() - others.max()) > 3 * float(start.std())


@pytest.mark.parametrize("seed", [0, 1])
def test_rome_derives_the_only_operation_that_can_solve_the_task(seed):
    torch.manual_seed(seed)
    model = OneEdgeNet(4, "plain", exclude=("none",))
    search(ROME, model, seed, epochs=4, steps=10, rome_samples=3)
    assert model.derived() == "nor_conv_3x3", model.alphas.tolist()


class OneNodeTopology(nn.Module):
    """A node with three incoming edges (linear maps of three inputs), two of which are kept per
    forward by Gumbel top-2 on the topology logits (``gumbel_top_k``, as ROME's DARTS cells).
    Inputs 0 and 2 carry the label, input 1 is noise: the known answer is edges {0, 2}."""

    sampler = "gumbel"
    tau = 1.0

    def __init__(self):
        super().__init__()
        self.edges = nn.ModuleList(nn.Linear(4, 2) for _ in range(3))
        self.betas = nn.Parameter(1e-3 * torch.randn(3))

    def arch_parameters(self):
        return [self.betas]

    def weight_parameters(self):
        return list(self.edges.parameters())

    def forward(self, x):
        w = gumbel_top_k(self.betas, 2, self.tau)
        on = (w.detach() != 0).tolist()
        return sum(w[e] * self.edges[e](x[:, e]) for e in range(3) if on[e])


def label_on_inputs_0_and_2(n: int, g: torch.Generator):
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 3, 4, generator=g)
    signal = (2.0 * y - 1.0)[:, None]
    x[:, 0, 0] += signal[:, 0]
    x[:, 2, 1] += signal[:, 0]
    return x, y


@pytest.mark.parametrize("seed", [0, 1])
def test_rome_topology_keeps_the_two_edges_that_carry_the_label(seed):
    torch.manual_seed(seed)
    model = OneNodeTopology()
    g = torch.Generator().manual_seed(seed)
    method = ROME(model, epochs=4, space="darts", rome_samples=3)
    for epoch in range(4):
        method.begin_epoch(epoch)
        for _ in range(20):
            method.step(label_on_inputs_0_and_2(32, g), label_on_inputs_0_and_2(32, g))
        method.end_epoch(epoch)
    betas = model.betas.detach()
    assert set(betas.topk(2).indices.tolist()) == {0, 2}, betas.tolist()
