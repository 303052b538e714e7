"""Search supernets built from ``FusedMixedOp``: the DARTS CIFAR network and the NAS-Bench-201
network (REFERENCE.md), with one set of architecture parameters each, optional search-space
masks (Zero-One-Shot), partial channels and edge normalization (PC-DARTS), and genotype
derivation.

The architecture weights of a forward pass come from ``arch_weights()``: the masked softmax of
the alphas (DARTS), or hard Gumbel samples (GDAS, ROME) when ``sampler="gumbel"``, in which case
only the sampled operation of each edge runs. ``exclude=("none",)`` keeps named operations out of
sampling and of the derived genotype (ROME). ``topology=True`` (DARTS network, ROME) gives every
edge a topology logit (``betas_normal``/``betas_reduce``); each forward keeps two incoming edges
per node by Gumbel top-2 sampling and the other edges do not run.
"""

from __future__ import annotations

from collections import namedtuple

import torch
from torch import nn

from .. import ops
from ._autograd import recompute
from .coefficients import edge_coefficients, warm_table
from .mixed_op import FusedMixedOp
from .operations import FactorizedReduce, ReLUConvBN
from .spaces import SearchSpace, get_space

Genotype = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")


class _ArchMixin:
    """Architecture weights shared by both supernets."""

    sampler: str = "softmax"
    tau: float = 1.0
    exclude: tuple[str, ...] = ()

    def _set_sampling(self, sampler: str, exclude) -> None:
        if sampler not in ("softmax", "gumbel"):
            raise ValueError(f"sampler: expected 'softmax' or 'gumbel', got {sampler!r}")
        self.sampler = sampler
        self.exclude = tuple(exclude)
        for name in self.exclude:
            if name not in self.space:
                raise ValueError(f"exclude: {name!r} is not an operation of space {self.space.name!r}; known: {list(self.space.names)}")
        if len(self.exclude) >= len(self.space):
            raise ValueError("exclude: leaves no operation to choose from")
        keep = torch.tensor([n not in self.exclude for n in self.space.names])
        self.register_buffer("_selectable", keep, persistent=False)
        self._mask_cache: dict[str, tuple] = {}  # buffer name -> (its state, host rows)

    def _selectable_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """``mask`` less the excluded operations; an edge left with nothing raises."""
        if not self.exclude:
            return mask
        m = mask & self._selectable.to(mask.device)
        if not bool(m.any(dim=-1).all()):
            raise ValueError(f"mask: some edge keeps only excluded operations {list(self.exclude)}")
        return m

    def _arch_rows(self, alpha: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.sampler == "gumbel":
            return ops.gumbel_softmax(alpha, self._selectable_mask(mask), tau=self.tau, hard=True)
        return ops.masked_softmax(alpha, mask)

    def _host_masks(self, weights: list[torch.Tensor], names: list[str]) -> list:
        """Each edge's mask as host rows, for each mask buffer of ``names`` (with the weights
        drawn for it). A search-space mask is read back once and kept until the buffer changes
        (set_masks, load_state_dict or any in-place write bump its version), so a step makes no
        device-to-host sync for it. With GDAS sampling only the sampled op of an edge runs: the
        hard one-hot rows are the masks (their straight-through gradient still reaches every
        alpha of a row), read back each step in one sync, which that sampler needs to know what
        to run (under ``torch.compile``: one graph break, and the rest of the forward compiled
        per sampled sub-network up to the cap of ``nas.compile``)."""
        if self.sampler == "gumbel":
            return torch.stack([w.detach() for w in weights]).ne(0).tolist()
        return [self._mask_rows(name) for name in names]

    def _mask_rows(self, name: str) -> tuple[tuple[bool, ...], ...]:
        """The host copy of mask buffer ``name``, refreshed when the buffer changed. Under
        ``torch.compile`` it is taken as it is, without looking at the buffer (which dynamo
        could only read with a graph break): ``compile_step`` brings it up to date
        (``prepare_host``) before every step, and dynamo guards on its values, so a new mask
        means a new graph."""
        cache = self._mask_cache
        if torch.compiler.is_compiling() and name in cache:
            return cache[name][1]
        mask = getattr(self, name)
        key = (id(mask), mask._version, mask.data_ptr())
        host = cache.get(name)
        if host is None or host[0] != key:
            host = cache[name] = (key, tuple(tuple(row) for row in mask.tolist()))
        return host[1]

    def prepare_host(self, device_type: str) -> None:
        """Bring the host-side state a forward reads up to date, outside ``torch.compile``: the
        masks' host copies, and every edge's simplified graph and merge forms for its mask
        (for GDAS, for each operation the edge can sample), so that a compiled forward only
        looks them up and never traces the simplifier."""
        state = (device_type, *(self._mask_rows(name) for name in self.masks()))
        if state == self.__dict__.get("_prepared"):
            return
        for edge, row in self._edges_and_masks():
            if self.sampler == "gumbel":
                selectable = [a and n not in self.exclude for a, n in zip(row, self.space.names)]
                rows = [tuple(i == k for i in range(len(row))) for k, on in enumerate(selectable) if on]
            else:
                rows = [row]
            for r in rows:
                edge.merge_forms(r, device_type)
                edge.coefficient_layout(r)
        if self.sampler != "gumbel":  # a sampled sub-network's table is made when it is drawn
            self._warm_coefficients()
        self._prepared = state

    def arch_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if name.startswith(("alphas", "betas"))]

    def named_arch_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, p) for name, p in self.named_parameters() if name.startswith(("alphas", "betas"))]

    def masks(self) -> dict[str, torch.Tensor]:
        """The search-space mask buffers by name (``mask_normal``/``mask_reduce``, or ``mask``)."""
        return {name: b for name, b in self.named_buffers() if name.startswith("mask")}

    def weight_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith(("alphas", "betas"))]


class DartsCell(nn.Module):
    """A DARTS search cell: 2 inputs, ``steps`` nodes, each the sum over all earlier states of a
    mixed edge; output = concat of the last ``multiplier`` nodes (14 edges for 4 steps)."""

    def __init__(self, steps, multiplier, C_pp, C_p, C, reduction, reduction_prev, space, op_kwargs):
        super().__init__()
        self.reduction = reduction
        self.steps, self.multiplier = steps, multiplier
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_pp, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_pp, C, 1, 1, affine=False)
        self.preprocess1 = ReLUConvBN(C_p, C, 1, 1, affine=False)
        self.edges = nn.ModuleList()
        for i in range(steps):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                self.edges.append(FusedMixedOp(C, stride, primitives=space, **op_kwargs))

    def forward(self, s0, s1, weights, masks=None, edge_weights=None, edges_on=None, recompute_preprocess=False, coefficients=None):
        """``edges_on``: host list of bools, one per edge; an edge that is off does not run
        (ROME's sampled topology). ``recompute_preprocess``: the preprocessing keeps only its
        input (the cell input) and runs again in backward. ``coefficients``: the edges' derived
        weights (``coefficients.edge_coefficients``), shared by the cells of one type; None
        computes them here, once for the cell's edges."""
        if coefficients is None:
            coefficients = edge_coefficients(self, self.edges, weights, masks, edge_weights)
        if recompute_preprocess:
            states = [recompute(p, p, s) for p, s in ((self.preprocess0, s0), (self.preprocess1, s1))]
        else:
            states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for i in range(self.steps):
            node = None
            for j, h in enumerate(states):
                e = offset + j
                if edges_on is not None and not edges_on[e]:
                    continue
                # PC-DARTS edge normalization: the edge's weight goes into the edge (exact, and
                # its output need not be kept for the weight's gradient).
                out = self.edges[e](
                    h,
                    weights[e],
                    None if masks is None else masks[e],
                    edge_weight=None if edge_weights is None else edge_weights[e],
                    coefficients=coefficients[e],
                )
                node = out if node is None else node + out
            offset += len(states)
            states.append(node)
        return torch.cat(states[-self.multiplier :], dim=1)


class DartsSearchNetwork(nn.Module, _ArchMixin):
    """The DARTS CIFAR search network: stem Conv3x3(3, 3C)+BN, ``layers`` cells with reductions
    at 1/3 and 2/3 depth (channels double), global average pool, Linear.

    ``mode``, ``normalize``, ``partial_channels`` and ``merge`` go to every ``FusedMixedOp``;
    ``edge_normalization`` adds PC-DARTS' per-edge betas; ``masks`` (bool [14, K] for normal and
    reduce cells) switch candidates off for good (Zero-One-Shot). ``topology`` adds ROME's
    per-edge topology betas instead (two sampled incoming edges per node; see ``sample_topology``).

    ``recompute`` (default off; any mode): the stem and every cell keep only their inputs for
    backward (the image; the two cell inputs, shared with the neighbouring cells) and run again
    in backward, one at a time, with the BN
    running statistics kept so they advance once per step (``_autograd.recompute``). Same
    values and gradients; what a cell's preprocessing, edges, bypass pools and concatenation
    keep lives only while that cell's backward runs, and there the preprocessing (ReLU, 1x1
    conv or FactorizedReduce, BN) keeps only the cell input, being recomputed once more. It is a
    trade: in topo it cuts the step's peak to about half again (0.15 of plain DARTS instead of
    0.28 on a CPU; with PC 4 and half the candidates masked 0.08 instead of 0.14) for a step
    1.2-1.4x longer (every cell runs twice), so it is opt-in: TopoNAS's default is the faster step.
    """

    def __init__(
        self,
        C: int = 16,
        num_classes: int = 10,
        layers: int = 8,
        *,
        space: str | SearchSpace = "darts",
        steps: int = 4,
        multiplier: int = 4,
        stem_multiplier: int = 3,
        mode: str = "plain",
        normalize: bool = True,
        partial_channels: int | None = None,
        merge: str = "auto",
        edge_normalization: bool | None = None,
        sampler: str = "softmax",
        exclude: tuple[str, ...] = (),
        topology: bool = False,
        in_channels: int = 3,
        recompute: bool = False,
    ):
        super().__init__()
        if not isinstance(recompute, bool):
            raise ValueError(f"recompute: expected True or False, got {recompute!r}")
        self.recompute = recompute
        self.space = get_space(space)
        self.steps, self.multiplier = steps, multiplier
        self._set_sampling(sampler, exclude)
        if edge_normalization is None:
            edge_normalization = partial_channels is not None and not topology
        if edge_normalization and topology:
            raise ValueError("topology: ROME's topology betas and PC-DARTS' edge normalization exclude each other")
        self.topology = bool(topology)
        op_kwargs = dict(mode=mode, normalize=normalize, partial_channels=partial_channels, merge=merge)
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr))
        C_pp, C_p, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            cell = DartsCell(steps, multiplier, C_pp, C_p, C_curr, reduction, reduction_prev, self.space, op_kwargs)
            reduction_prev = reduction
            self.cells.append(cell)
            C_pp, C_p = C_p, multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_p, num_classes)
        num_edges = sum(2 + i for i in range(steps))
        k = len(self.space)
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(num_edges, k))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(num_edges, k))
        if edge_normalization or topology:
            self.betas_normal = nn.Parameter(1e-3 * torch.randn(num_edges))
            self.betas_reduce = nn.Parameter(1e-3 * torch.randn(num_edges))
        else:
            self.betas_normal = self.betas_reduce = None
        self.register_buffer("mask_normal", torch.ones(num_edges, k, dtype=torch.bool))
        self.register_buffer("mask_reduce", torch.ones(num_edges, k, dtype=torch.bool))

    def set_masks(self, normal: torch.Tensor, reduce: torch.Tensor) -> None:
        """Search-space masks: bool [num_edges, K], at least one candidate kept per edge."""
        for name, m in (("normal", normal), ("reduce", reduce)):
            if m.shape != self.mask_normal.shape or m.dtype != torch.bool:
                raise ValueError(f"{name} mask must be a bool tensor of shape {tuple(self.mask_normal.shape)}, got {m.dtype} {tuple(m.shape)}")
            if not bool(m.any(dim=1).all()):
                raise ValueError(f"{name} mask switches off every candidate of some edge; keep at least one per edge")
        self.mask_normal.copy_(normal)
        self.mask_reduce.copy_(reduce)

    def _edges_and_masks(self):
        for cell in self.cells:
            rows = self._mask_rows("mask_reduce" if cell.reduction else "mask_normal")
            yield from zip(cell.edges, rows)

    def _node_slices(self) -> list[slice]:
        """Each node's incoming edges as a slice of the edge index."""
        out, start = [], 0
        for i in range(self.steps):
            out.append(slice(start, start + 2 + i))
            start += 2 + i
        return out

    def _edge_weights(self, betas: torch.Tensor | None) -> torch.Tensor | None:
        """Softmax of the betas over each node's incoming edges."""
        if betas is None:
            return None
        return torch.cat([torch.softmax(betas[sl], dim=-1) for sl in self._node_slices()])

    def sample_topology(self, betas: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        """ROME's Gumbel top-2: per node, perturb log softmax(betas) of its incoming edges with
        Gumbel noise and keep the two largest (two draws without replacement). Returns the edge
        weights (1 on kept edges, 0 elsewhere, with the straight-through gradient of
        softmax(perturbed / tau)) and the kept edges as a host list."""
        weights = torch.cat([gumbel_top_k(betas[sl], 2, self.tau) for sl in self._node_slices()])
        return weights, (weights.detach() != 0).tolist()

    def _warm_coefficients(self) -> None:
        """The coefficient tables a softmax forward reads for the current masks: one per cell
        type on the network, or one per cell when cells are recomputed (each derives its own)."""
        K = len(self.space)
        rows = {False: self._mask_rows("mask_normal"), True: self._mask_rows("mask_reduce")}
        seen = set()
        for cell in self.cells:
            if self.recompute:
                warm_table(cell, cell.edges, rows[cell.reduction], K)
            elif cell.reduction not in seen:
                seen.add(cell.reduction)
                warm_table(self, cell.edges, rows[cell.reduction], K)

    def arch_weights(self):
        return (
            self._arch_rows(self.alphas_normal, self.mask_normal),
            self._arch_rows(self.alphas_reduce, self.mask_reduce),
        )

    def forward(self, x):
        w_normal, w_reduce = self.arch_weights()
        if self.topology:
            e_normal, on_normal = self.sample_topology(self.betas_normal)
            e_reduce, on_reduce = self.sample_topology(self.betas_reduce)
        else:
            e_normal, e_reduce = self._edge_weights(self.betas_normal), self._edge_weights(self.betas_reduce)
            on_normal = on_reduce = None
        m_normal, m_reduce = self._host_masks([w_normal, w_reduce], ["mask_normal", "mask_reduce"])
        s0 = s1 = recompute(self.stem, self.stem, x) if self.recompute else self.stem(x)
        # The derived weights of every edge, once per step per cell type (a recomputed cell
        # derives its own from its weights input, so that their gradient reaches the alphas).
        shared = {}
        for cell in self.cells:
            if cell.reduction:
                w, m, e, on = w_reduce, m_reduce, e_reduce, on_reduce
            else:
                w, m, e, on = w_normal, m_normal, e_normal, on_normal
            w = w.to(s1.dtype)
            if not self.recompute:
                if cell.reduction not in shared:
                    shared[cell.reduction] = edge_coefficients(self, cell.edges, w, m, e)
                out = cell(s0, s1, w, m, e, on, coefficients=shared[cell.reduction])
            elif e is None:
                out = recompute(lambda a, b, w, cell=cell, m=m, on=on: cell(a, b, w, m, None, on, True), cell, s0, s1, w)
            else:
                out = recompute(lambda a, b, w, e, cell=cell, m=m, on=on: cell(a, b, w, m, e, on, True), cell, s0, s1, w, e)
            s0, s1 = s1, out
        return self.classifier(self.global_pooling(s1).flatten(1))

    @torch.no_grad()
    def genotype(self) -> Genotype:
        """The DARTS rule (REFERENCE.md): per node the two incoming edges with the largest
        selectable weight, stronger edge first, and on each the best selectable operation.
        Selectable: unmasked, not 'none', not in ``exclude``; 'none' is never derived. With edge
        normalization (PC-DARTS) an edge's weights are multiplied by its node-softmaxed beta;
        with ``topology`` (ROME) edges are ranked by their topology betas alone. Only edges with
        a selectable operation compete; a node left with fewer than two of them (a mask that
        keeps nothing selectable on its edges) raises ValueError naming the cell and node. Ties
        go to the lower index, as in the reference's stable sort."""
        names = list(self.space.names)
        blocked = torch.tensor([n == "none" or n in self.exclude for n in names])

        def parse(cell, alphas, mask, betas):
            selectable = mask.cpu() & ~blocked
            weights = ops.masked_softmax(alphas, mask).cpu().double()
            weights[~selectable] = -1.0
            edge_w = None if self.topology else self._edge_weights(betas)
            gene = []
            for node, sl in enumerate(self._node_slices()):
                W = weights[sl]
                if edge_w is not None:
                    W = torch.where(W >= 0, W * edge_w[sl].cpu().double()[:, None], W)
                strength = betas[sl].cpu().tolist() if self.topology else [max(row) for row in W.tolist()]
                live = [j for j in range(W.shape[0]) if bool(selectable[sl][j].any())]
                if len(live) < 2:
                    dead = sorted(set(range(W.shape[0])) - set(live))
                    raise ValueError(f"genotype: {cell} cell node {node + 2} has {len(live)} incoming edge(s) with an "
                                     f"operation to derive; the mask leaves edge(s) from {dead} nothing but "
                                     f"{sorted({'none', *self.exclude})}")
                for j in sorted(live, key=lambda j: -strength[j])[:2]:
                    gene.append((names[int(W[j].argmax())], j))
            return gene

        concat = list(range(2 + self.steps - self.multiplier, self.steps + 2))
        return Genotype(
            normal=parse("normal", self.alphas_normal, self.mask_normal, self.betas_normal),
            normal_concat=concat,
            reduce=parse("reduction", self.alphas_reduce, self.mask_reduce, self.betas_reduce),
            reduce_concat=concat,
        )


class ResNetBasicBlock(nn.Module):
    """NAS-Bench-201's reduction block: ReLUConvBN 3x3 stride 2, ReLUConvBN 3x3, plus a shortcut
    AvgPool(2, 2) then 1x1 conv."""

    def __init__(self, C_in: int, C_out: int):
        super().__init__()
        self.conv_a = ReLUConvBN(C_in, C_out, 3, 2, affine=True)
        self.conv_b = ReLUConvBN(C_out, C_out, 3, 1, affine=True)
        self.shortcut = nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(C_in, C_out, 1, bias=False))

    def forward(self, x):
        return self.shortcut(x) + self.conv_b(self.conv_a(x))


def build_nb201_skeleton(net: nn.Module, C: int, N: int, num_classes: int, in_channels: int, make_cell) -> None:
    """NAS-Bench-201's macro skeleton on ``net``: ``stem`` Conv3x3(in, C)+BN; ``cells``: N cells
    at C, a ResNet block to 2C, N cells, a ResNet block to 4C, N cells (``make_cell(channels)``
    builds a cell); ``lastact`` BN+ReLU, ``global_pooling``, ``classifier`` Linear. Shared by the
    search supernet and the retraining network."""
    net.stem = nn.Sequential(nn.Conv2d(in_channels, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
    net.cells = nn.ModuleList()
    c = C
    for stage in range(3):
        if stage > 0:
            net.cells.append(ResNetBasicBlock(c, 2 * c))
            c *= 2
        for _ in range(N):
            net.cells.append(make_cell(c))
    net.lastact = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU())
    net.global_pooling = nn.AdaptiveAvgPool2d(1)
    net.classifier = nn.Linear(c, num_classes)


class NB201SearchNetwork(nn.Module, _ArchMixin):
    """The NAS-Bench-201 supernet: stem Conv3x3(3, C)+BN; N cells at C, a ResNet block to 2C,
    N cells, a ResNet block to 4C, N cells; BN, ReLU, global average pool, Linear. A cell has 4
    nodes and 6 edges "i<-j"; node i sums its incoming mixed edges; the output is node 3."""

    EDGES = [(1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2)]

    def __init__(
        self,
        C: int = 16,
        N: int = 5,
        num_classes: int = 10,
        *,
        space: str | SearchSpace = "nb201",
        mode: str = "plain",
        normalize: bool = True,
        partial_channels: int | None = None,
        merge: str = "auto",
        sampler: str = "softmax",
        exclude: tuple[str, ...] = (),
        in_channels: int = 3,
    ):
        super().__init__()
        self.space = get_space(space)
        self._set_sampling(sampler, exclude)
        op_kwargs = dict(mode=mode, normalize=normalize, partial_channels=partial_channels, merge=merge)
        build_nb201_skeleton(
            self, C, N, num_classes, in_channels,
            lambda c: nn.ModuleList(FusedMixedOp(c, 1, primitives=self.space, **op_kwargs) for _ in self.EDGES),
        )
        self.alphas = nn.Parameter(1e-3 * torch.randn(len(self.EDGES), len(self.space)))
        self.register_buffer("mask", torch.ones(len(self.EDGES), len(self.space), dtype=torch.bool))

    def arch_weights(self):
        return self._arch_rows(self.alphas, self.mask)

    def _edges_and_masks(self):
        rows = self._mask_rows("mask")
        for cell in self.cells:
            if isinstance(cell, nn.ModuleList):
                yield from zip(cell, rows)

    def _warm_coefficients(self) -> None:
        """The coefficient table a softmax forward reads for the current mask (one for all cells)."""
        first = next(cell for cell in self.cells if isinstance(cell, nn.ModuleList))
        warm_table(self, first, self._mask_rows("mask"), len(self.space))

    def _cell(self, edges, x, weights, masks, coefficients):
        nodes = [x]
        for i in range(1, 4):
            total = None
            for e, (dst, src) in enumerate(self.EDGES):
                if dst == i:
                    out = edges[e](nodes[src], weights[e], masks[e], coefficients=coefficients[e])
                    total = out if total is None else total + out
            nodes.append(total)
        return nodes[-1]

    def forward(self, x):
        weights = self.arch_weights()
        (masks,) = self._host_masks([weights], ["mask"])
        x = self.stem(x)
        weights = weights.to(x.dtype)
        first = next(cell for cell in self.cells if isinstance(cell, nn.ModuleList))
        coefficients = edge_coefficients(self, first, weights, masks)  # once per step for every cell
        for cell in self.cells:
            x = self._cell(cell, x, weights, masks, coefficients) if isinstance(cell, nn.ModuleList) else cell(x)
        return self.classifier(self.global_pooling(self.lastact(x)).flatten(1))

    @torch.no_grad()
    def genotype(self) -> str:
        """The NAS-Bench-201 architecture string, argmax per edge over the unmasked operations
        ('none' allowed unless in ``exclude``)."""
        names = list(self.space.names)
        weights = ops.masked_softmax(self.alphas, self._selectable_mask(self.mask)).cpu()
        groups = []
        for i in range(1, 4):
            ops_i = [f"{names[int(weights[e].argmax())]}~{src}" for e, (dst, src) in enumerate(self.EDGES) if dst == i]
            groups.append("|" + "|".join(ops_i) + "|")
        return "+".join(groups)


def gumbel_top_k(logits: torch.Tensor, k: int, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gumbel top-k over a 1-D row: keep the k largest of ``log_softmax(logits) + g`` (g standard
    Gumbel noise), i.e. k draws without replacement from softmax(logits). Returns a 0/1 row with
    the straight-through gradient ``hard - soft.detach() + soft``, soft = softmax((log_softmax +
    g) / tau). With k >= the row length every entry is kept (weight 1, gradient 0)."""
    if logits.dim() != 1:
        raise ValueError(f"logits: expected a 1-D row, got shape {tuple(logits.shape)}")
    if k >= logits.numel():
        return torch.ones_like(logits)
    noise = -torch.empty_like(logits).exponential_(generator=generator).log()
    perturbed = torch.log_softmax(logits, dim=-1) + noise
    soft = torch.softmax(perturbed / tau, dim=-1)
    hard = torch.zeros_like(logits).scatter_(0, perturbed.topk(k).indices, 1.0)
    return hard - soft.detach() + soft
