"""``FusedMixedOp``: a drop-in replacement for the DARTS ``MixedOp`` that runs the edge through
the TopoNAS simplification and the fused kernels.

    op = FusedMixedOp(C, stride)                      # DARTS space, mode="topo"
    y = op(x, weights)                                # weights: the edge's softmaxed row [K]
    y = op(x, weights, mask)                          # mask: bool [K]; masked ops never run
    op = FusedMixedOp.wrap(mixed._ops)                # the user's own candidates (docs/DROPIN.md)

Modes (``mode=``):

* ``"plain"``: the reference MixedOp, ``sum_k w_k op_k(x)`` over the unmasked ops (zero
  included, as ``x * 0``): same outputs and gradients as DARTS for the same parameters.
* ``"pms"``, ``"fms"``, ``"pms+fms"``: the graph of ``simplify.py`` with those rewrites, run
  module by module (shared modules run once; no merging, so no kernel normalization).
* ``"topo"``: PMS, FMS and reparameterization: every weighted sum of conv units becomes one conv
  whose kernel ``ops.merge_kernels`` computes inside forward from the candidate kernels and the
  derived weights, with kernel normalization (``normalize=True``, per output channel).

Exactness (what the tests check). Sharing a leading module is exact. Sharing a trailing module
is exact only when it is linear: BN in eval mode with equal running statistics is, BN in train
mode is not (BN of a sum is not the sum of BNs). FMS is an approximation except for one-hot
weights. Merging is exact (a conv is linear in its kernel) when ``normalize=False``; kernel
normalization changes the function on purpose (paper Sec. 3.5). With one-hot weights every mode
with ``normalize=False`` equals plain.

Merging a depthwise+pointwise unit (docs/DESIGN.md section 5): the unit's exact dense kernel is
``W[o, c] = P[o, c] * D[c]`` ([C, C, k, k]). How a merged group is evaluated is its *form*
(``merge=``, ``forms.py``): ``dense`` merges the dense kernels into one dense conv (exact; cost
grows with C^2 k^2); ``stacked`` runs each candidate's depthwise conv and ONE 1x1 conv over the
stacked outputs with the coefficients and normalization in its weights (exact; cost grows with
C^2 + C k^2 per candidate); ``separable`` merges the depthwise kernels and the pointwise kernels
separately (one depthwise + one 1x1 conv whatever the number of candidates), which is NOT the
weighted sum, since ``sum_i q_i P_i D_i != (sum_i q_i P_i)(sum_i q_i D_i)``, except for one-hot
weights. ``"auto"`` (default) picks the exact form with the lowest modelled cost per group and
device. Kernel normalization standardizes each candidate's dense kernel in every form, so a
candidate is invariant to rescaling its depthwise or pointwise kernel and (dense groups) to
shifting its dense kernel (not to shifting only its depthwise kernel, which is not a shift of
the dense kernel).

Memory. Merged kernels and normalization statistics are never stored: a merged conv is one
autograd Function (``_autograd.merged_conv``) that keeps the conv input, the coefficients and the
candidates' kernels (parameters) and rebuilds the merged kernel in backward, a few small
kernel-sized ops instead of C_out x C_in x k x k tensors per merged conv for the whole step. A
coefficient in front of a merged conv goes into its kernel (c * conv(h, K) = conv(h, c * K)),
also through nested sums, so sums of merged convs are plain additions that save nothing; only
the sums with other branches go through ``mixed_sum``, which saves its inputs for the weight
gradient. With ``recompute`` (topo's default) the parameter-free ends of the weighted branches
(pools with their BN, identity, a group's trailing BN) keep nothing either: they run again in
backward from their input, which is kept anyway: one op each way with a C++ backward where
the kernels are compiled (``_autograd.light_sum``), else ``_autograd.recompute``. Kept for backward by the
DARTS edge at stride 1, in units of |x| (saved-tensor hooks;
``test_memory_kept_for_backward_by_a_darts_edge``): 30 in plain, 24 in pms, 25 in pms+fms (FMS
without merging adds a sum per stage), 12 in topo without recompute and 5 with it, and no
kernel-sized tensor.

Host work. The derived weights an edge applies (``coefficients.py``) come from one small
computation per step for all edges of a cell type (the supernets pass each edge its share as
``coefficients=``; a lone edge computes its own), and a merged conv's backward rebuilds its
kernel and applies the conv's and the kernel's backward formulas directly (``forms.py``), in
a fixed handful of ops per group, without an autograd graph over the kernel build.

Parameters. All modes hold the same parameters: one ``OpChain`` per candidate in ``_ops`` (the
name DARTS uses), in the order of the primitives; a wrapped op (``wrap``) holds the user's own
candidate modules there instead, and runs views of their modules (``wrap.py``). The rewritten modes run the modules of those
chains: a shared module runs as the instance of its lowest-index (unmasked) candidate, so only
that BN's running statistics advance (and with ``affine=True`` only its affine parameters are
used), and a merged conv reads the kernels of its candidates. So ``b.load_state_dict(a.state_dict())`` copies between
modes, and ``load_plain_state`` copies from a DARTS-style MixedOp. The BN running statistics do
not carry over between modes (a merged, normalized conv feeds its BN outputs of another scale):
the state records its mode (``_extra_state``), a load across kernel normalizations (topo with
normalization vs. any other mode) resets the statistics with a warning, and ``recalibrate_bn(model, batches)`` re-estimates them before evaluation.

Where the parts live: this module builds the op, checks its inputs, caches a plan (simplified
graph and coefficient layout) per mask and derives the chosen operation; ``run_graph.py`` runs a
plan's graph; ``_autograd.py`` holds the memory-saving autograd (merged convs, recomputed
tails); ``bn_state.py`` the BN statistics across modes; ``coefficients.py`` and ``forms.py`` the
derived weights and the forms of a merged group.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .. import ops
from ..backend import BACKENDS
from . import forms as Fm
from . import spaces as S
from ._autograd import channels_last_on_cpu, light_sum, light_tail, recompute
from .bn_state import ModeState, _after_load, recalibrate_bn
from .coefficients import EdgeCoefficients, Layout, Masses, intern_signature, table_for
from .operations import OpChain, build_op, chosen_module
from .simplify import Choice, Graph, Merged, Seq, rewrites_for, simplify
from .run_graph import GraphRunner, _promoted

__all__ = ["FusedMixedOp", "recalibrate_bn", "recompute"]

_NORMALIZE = {True: "channel", False: "none", "channel": "channel", "tensor": "tensor", "none": "none"}


class FusedMixedOp(GraphRunner, ModeState, nn.Module):
    """One edge of a DARTS-style cell: the weighted sum of its candidate operations.

    Args:
        C: channels in and out.
        stride: 1, or 2 on reduction edges.
        primitives: operation names of ``space`` (default: all of it, e.g. DARTS' 8 PRIMITIVES
            in their usual order), or a ``SearchSpace``, or a built-in space's name.
        space: the space the names come from (``"darts"``, ``"nb201"``, ``"exaggerated"`` or a
            ``SearchSpace``). Ignored when ``primitives`` is a space. None (default): the
            built-in space that has every name of ``primitives`` (DARTS first; DARTS when
            ``primitives`` is None), e.g. NAS-Bench-201's names need no ``space=``.
        mode: ``"plain"``, ``"pms"``, ``"fms"``, ``"pms+fms"`` or ``"topo"`` (module docstring).
        normalize: kernel normalization of merged kernels in ``"topo"``: True (= ``"channel"``),
            False (= ``"none"``), ``"channel"`` or ``"tensor"``.
        partial_channels: PC-DARTS' k: only the first C/k channels go through the edge, the rest
            bypass it (2x2 max-pooled on stride-2 edges), then channel shuffle with k groups.
        affine: BN affine parameters (False in search, as DARTS).
        track_running_stats: the BNs keep running statistics (True, as DARTS; xautodl's NB201
            search uses False: BN always normalizes with the batch's statistics, keeps no buffers).
        bias: the convs carry a bias (xautodl builds its convs with ``bias = not affine``); the
            pointwise conv of a separable unit, both convs of FactorizedReduce. A merged conv
            adds its candidates' biases weighted by their coefficients (a conv is affine in
            (kernel, bias): exact); kernel normalization standardizes the kernels only, not
            the biases. Before a train-mode BN a bias is cancelled by the BN anyway.
        eps: kernel normalization epsilon.
        backend: kernel backend for ``toponas_kernels.ops`` (None: automatic).
        merge: how ``"topo"`` evaluates each merged conv group (``forms.py``): ``"auto"`` (the
            exact form with the lowest modelled cost for the group and device), ``"dense"`` (one
            dense conv, exact), ``"stacked"`` (depthwise convs + one 1x1 conv, exact) or
            ``"separable"`` (one depthwise + one 1x1 conv; an approximation, exact for one-hot
            weights). Groups of dense convs always run dense.
        recompute: in the rewritten modes, run the parameter-free ends of the weighted branches
            (pooling, BN without affine, identity) without keeping their activations, and
            recompute them in backward from their input (kept anyway), and so the 2x2 max pool
            of a partial-channel bypass on a stride-2 edge. Same values and gradients; BN running
            statistics advance once. Default: on for ``"topo"``, off
            otherwise; never used in ``"plain"``.
    """

    def __init__(
        self,
        C: int,
        stride: int = 1,
        *,
        primitives: Sequence[str] | S.SearchSpace | str | None = None,
        space: S.SearchSpace | str | None = None,
        mode: str = "topo",
        normalize: bool | str = True,
        partial_channels: int | None = None,
        affine: bool = False,
        track_running_stats: bool = True,
        bias: bool = False,
        eps: float = 1e-5,
        backend: str | None = None,
        recompute: bool | None = None,
        merge: str = "auto",
    ):
        super().__init__()
        _check_options(mode, normalize, eps, backend, recompute, merge)
        k = 1 if partial_channels is None else partial_channels
        if not _is_int(k) or k < 1:
            raise ValueError(f"partial_channels: expected a positive int, got {partial_channels!r}")
        if not _is_int(C) or C < 1:
            raise ValueError(f"C: expected a positive int, got {C!r}")
        if C % k:
            raise ValueError(f"partial_channels: C = {C} is not divisible by partial_channels = {k}")
        if not _is_int(stride) or stride not in (1, 2):
            raise ValueError(f"stride: expected 1 (normal edge) or 2 (reduction edge), got {stride!r}")
        for name, value in (("affine", affine), ("track_running_stats", track_running_stats), ("bias", bias)):
            if not isinstance(value, bool):
                raise ValueError(f"{name}: expected True or False, got {value!r}")

        if isinstance(primitives, (S.SearchSpace, str)):
            space = S.get_space(primitives)
        else:
            base = S.get_space(_space_for(primitives) if space is None else space)
            space = base if primitives is None else base.subset(primitives, argument="primitives")
        ops = nn.ModuleList(build_op(op, C // k, stride, affine, track_running_stats, bias) for op in space)
        self._setup(space, ops, [list(op) for op in ops], C, stride, mode, normalize, k, affine, eps, backend,
                    recompute, merge)

    def _setup(self, space, ops, parts, C, stride, mode, normalize, k, affine, eps, backend, recompute, merge):
        self.rewrites = rewrites_for(mode)
        self.merge = merge
        self.space = space
        self.C, self.stride, self.mode, self.partial_channels = C, stride, mode, k
        self.normalize = _NORMALIZE[normalize]
        self.affine, self.eps, self.backend = affine, eps, backend
        self.recompute = (mode == "topo") if recompute is None else bool(recompute)
        self._ops = ops
        # The module each chain position runs (a plain list, not registered: for the built-in
        # candidates the OpChain's children, for wrapped ones views of the user's modules).
        self._parts = parts
        self.unrecognized: list[tuple[str, str]] = []
        self._wrapped = False
        self.mp = nn.MaxPool2d(2, 2) if k > 1 and stride > 1 else None
        self._plans: dict[tuple[bool, ...], _Plan] = {}
        self._forms: dict[tuple[Merged, str], tuple[str, str]] = {}
        self._groups: dict[tuple[Merged, str], object] = {}
        self._loaded_from: tuple[str, str] | None = None
        self.register_load_state_dict_post_hook(_after_load)

    @classmethod
    def wrap(
        cls,
        candidates,
        *,
        mode: str = "topo",
        primitives: Sequence[str] | None = None,
        C: int | None = None,
        stride: int | None = None,
        normalize: bool | str = True,
        eps: float = 1e-5,
        backend: str | None = None,
        recompute: bool | None = None,
        merge: str = "auto",
        _report: bool = True,
    ) -> "FusedMixedOp":
        """An edge over the user's own candidate modules (``docs/DROPIN.md``).

        ``candidates``: a list or ``nn.ModuleList`` of modules, or an ``nn.ModuleDict`` (its
        values in order; its keys name them), in the order of the architecture weights. The
        op holds those modules (registered under ``_ops``, in order), not copies: their
        parameters and buffers are the op's, an optimizer built before the wrap keeps training
        them, and ``forward(x, weights)`` in ``"plain"`` mode is ``sum(w_i * op_i(x))``.

        Each candidate is recognized by structure (``nas.wrap``: conv chains, separable and
        dilated convs, pools with or without BN, identity, zero, factorized reduce), and the
        rewritten modes share and merge those; a candidate that is not recognized runs as it is
        in every mode (exact, left out of the rewrites), is listed in ``op.unrecognized`` and
        reported once in a warning.

        ``primitives``: names for the candidates (default: the ModuleDict's keys, else the
        built-in name whose chain a candidate has, e.g. ``sep_conv_3x3``, else its class name).
        ``C`` and ``stride``: default from the recognized convs, BNs, pools and zeros. Other
        options as for the constructor (BN and conv options are the user's modules' own).
        """
        from . import wrap as W

        _check_options(mode, normalize, eps, backend, recompute, merge)
        if isinstance(candidates, nn.ModuleDict):
            if primitives is None:
                primitives = list(candidates.keys())
            modules = list(candidates.values())
        elif isinstance(candidates, (list, tuple, nn.ModuleList)):
            modules = list(candidates)
        else:
            raise ValueError(f"candidates: expected a list, ModuleList or ModuleDict of modules, got {type(candidates).__name__}")
        if not modules or not all(isinstance(m, nn.Module) for m in modules):
            raise ValueError("candidates: expected one or more nn.Module candidates")
        if primitives is not None:
            primitives = list(primitives)
            if len(primitives) != len(modules) or len(set(primitives)) != len(primitives) or not all(isinstance(n, str) for n in primitives):
                raise ValueError(f"primitives: expected {len(modules)} distinct names, one per candidate, got {primitives!r}")
        if C is not None and (not _is_int(C) or C < 1):
            raise ValueError(f"C: expected None or a positive int, got {C!r}")
        if stride is not None and (not _is_int(stride) or stride not in (1, 2)):
            raise ValueError(f"stride: expected None, 1 or 2, got {stride!r}")
        edge = W.recognize_edge(modules, primitives, C, stride)
        ops = candidates if isinstance(candidates, nn.ModuleList) else nn.ModuleList(modules)
        bns = [m for op in modules for m in op.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        op = cls.__new__(cls)
        nn.Module.__init__(op)
        op._setup(edge.space, ops, edge.parts, edge.C, edge.stride, mode, normalize, 1,
                  bool(bns) and all(b.affine for b in bns), eps, backend, recompute, merge)
        op._wrapped = True
        op.unrecognized = edge.opaque
        if edge.opaque and _report:
            W.report_once(W.opaque_message(edge.opaque))
        return op

    @property
    def primitives(self) -> tuple[str, ...]:
        return self.space.names

    def extra_repr(self) -> str:
        return (
            f"C={self.C}, stride={self.stride}, mode={self.mode!r}, normalize={self.normalize!r}, "
            f"merge={self.merge!r}, partial_channels={self.partial_channels}, primitives={list(self.primitives)}"
        )

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: Tensor,
        weights: Tensor,
        mask: Tensor | Sequence[bool] | None = None,
        *,
        edge_weight: Tensor | None = None,
        coefficients: EdgeCoefficients | None = None,
    ) -> Tensor:
        """``x`` [B, C, H, W]; ``weights`` [K], the edge's softmaxed (or Gumbel) row, used as
        given at the top level; ``mask`` [K] bool or None: masked candidates are left out of the
        computation (never called) and their weights ignored. The mask is read on the host (a
        device sync for a CUDA mask) and the simplified graph is cached per distinct mask.

        ``edge_weight``: a scalar tensor that multiplies the whole output (PC-DARTS edge
        normalization). It is folded into ``weights`` (the output is linear in them: the
        rewrites' inner weights are ratios) and into the partial-channel bypass, so the output
        need not be kept for its gradient, as it would be by ``edge_weight * op(x, weights)``.

        ``coefficients``: this edge's derived weights for these weights (and ``edge_weight``),
        computed once per step for many edges (``coefficient_layout``, ``coefficients.Table``;
        the supernets do this); None computes them here. Ignored in plain mode, and when they
        were computed for another graph."""
        if x.dim() != 4 or (self.C is not None and x.shape[1] != self.C):
            raise ValueError(f"x: expected [B, {self.C or 'C'}, H, W], got {tuple(x.shape)}")
        weights = self._check_weights(weights, x.dtype)
        active = self._check_mask(mask)
        if edge_weight is not None:
            if not isinstance(edge_weight, Tensor) or edge_weight.numel() != 1:
                raise ValueError(f"edge_weight: expected a scalar tensor, got {_shape(edge_weight) if isinstance(edge_weight, Tensor) else type(edge_weight).__name__}")
            edge_weight = edge_weight.reshape(()).to(x.dtype)
        if self.partial_channels == 1:
            return self._edge(x, weights, active, coefficients, edge_weight)
        if self.mp is not None and (x.shape[2] % 2 or x.shape[3] % 2):
            raise ValueError(
                f"x: partial_channels on a stride-{self.stride} edge needs even H and W (the bypass "
                f"is 2x2 max-pooled), got {tuple(x.shape[2:])}"
            )
        c = self.C // self.partial_channels
        processed = self._edge(x[:, :c], weights, active, coefficients, edge_weight)
        bypass = x[:, c:]
        if self.recompute and self.mp is not None:
            # Pooled again in backward: keeps no indices and no pooled copy for the edge weight.
            # Where the kernels are compiled, one op with a C++ backward (as the tails' sums).
            tail = light_tail(self.mp, None, channels_last=x.device.type == "cpu")
            w = x.new_ones(1) if edge_weight is None else edge_weight.reshape(1)
            fused = None if tail is None else light_sum([tail], w, [bypass], self.backend)
            if fused is not None:
                bypass = fused
            elif edge_weight is None:
                bypass = recompute(lambda b: channels_last_on_cpu(self.mp, b), self.mp, bypass)
            else:
                bypass = recompute(lambda b, e: channels_last_on_cpu(self.mp, b) * e, self.mp, bypass, edge_weight)
        else:
            if self.mp is not None:
                bypass = self.mp(bypass)
            if edge_weight is not None:
                bypass = bypass * edge_weight
        return ops.partial_channel_shuffle(processed, bypass, self.partial_channels, backend=self.backend)

    def _edge(self, x: Tensor, weights: Tensor, active: tuple[bool, ...], coefficients: EdgeCoefficients | None,
              edge_weight: Tensor | None) -> Tensor:
        """The edge; ``edge_weight`` scales ``weights`` where they are read (precomputed
        ``coefficients`` carry it already, so the common path multiplies nothing)."""
        if self.mode == "plain":
            if edge_weight is not None:
                weights = weights * edge_weight
            idx = tuple(i for i, a in enumerate(active) if a)
            outputs = [self._ops[i](x) for i in idx]
            # A cached index tensor: weights[list] would copy a new index to the device per call.
            w = weights if len(idx) == len(active) else weights.index_select(0, self._plan(active).index(idx, weights.device))
            return ops.mixed_sum(*_promoted(outputs, w), backend=self.backend)
        plan = self._plan(active)
        root = plan.graph.root
        if not root.branches:  # only zero candidates are active
            s = self.stride
            return x[:, :, ::s, ::s].mul(0.0)
        layout = self._layout(plan)
        if coefficients is None or coefficients.signature != layout.signature:
            w = weights if edge_weight is None else weights * edge_weight
            coefficients = table_for(plan, [layout], len(active)).compute(w.unsqueeze(0))[0]
        return self._choice(root, x, (layout, coefficients.pieces))

    # ------------------------------------------------------------------ graph execution
    def form_of(self, node: Merged, device_type: str = "cpu") -> tuple[str, str]:
        """The form a merged group runs in on ``device_type``, and why (cached)."""
        key = (node, device_type)
        got = self._forms.get(key)
        if got is None:
            c = self.C // self.partial_channels
            got = self._forms[key] = Fm.choose_form(node, self.merge, c, c, device_type, self.normalize != "none")
        return got

    def merge_forms(self, mask=None, device_type: str = "cpu") -> list[tuple[Merged, str, str]]:
        """Every merged group of the graph (for ``mask``) with its form on ``device_type`` and why."""
        out = []

        def visit(node):
            if isinstance(node, Merged):
                out.append((node, *self.form_of(node, device_type)))
                self._group(node, device_type)
            elif isinstance(node, Seq):
                for item in node.items:
                    visit(item)
            elif isinstance(node, Choice):
                for b in node.branches:
                    visit(b.node)

        if self.rewrites.reparam:
            visit(self.simplified_graph(mask).root)
        return out

    # ------------------------------------------------------------------ helpers
    def _check_weights(self, weights: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        n = len(self._ops)
        if not isinstance(weights, Tensor):
            raise ValueError(f"weights: expected a Tensor of shape [{n}], got {type(weights).__name__}")
        if weights.shape != (n,):
            raise ValueError(f"weights: expected shape [{n}] (one per primitive), got {tuple(weights.shape)}")
        return weights if dtype is None or weights.dtype == dtype else weights.to(dtype)

    def _check_mask(self, mask) -> tuple[bool, ...]:
        n = len(self._ops)
        if mask is None:
            return (True,) * n
        values = mask.detach().cpu().tolist() if isinstance(mask, Tensor) else list(mask)
        if len(values) != n or any(isinstance(v, list) for v in values):
            raise ValueError(f"mask: expected {n} booleans (one per primitive), got shape {_shape(mask)}")
        active = tuple(bool(v) for v in values)
        if not any(active):
            raise ValueError("mask: every candidate is masked; at least one must stay active")
        return active

    def _layout(self, plan: "_Plan") -> Layout:
        """The coefficient layout of ``plan``'s graph for this op (cached on the plan)."""
        layout = plan.layout
        if layout is None:
            if torch.compiler.is_compiling():  # a traced forward only reads what prepare_host made
                raise RuntimeError(
                    "FusedMixedOp: no coefficient layout for this mask under torch.compile; call "
                    "op.coefficient_layout(mask) eagerly first, or the supernet's prepare_host(device_type) "
                    "(nas.compile.compile_step does)"
                )
            signature = intern_signature(
                (tuple(self.space.chains(self.stride)), self.rewrites, plan.active, self.recompute, self.affine)
            )
            layout = plan.layout = Layout(plan.graph.root, signature, self.recompute, self._free_tail)
        return layout

    def coefficient_layout(self, mask=None) -> Layout | None:
        """The layout of the derived weights this op consumes for ``mask`` (None in plain mode
        or when only zero candidates are active): what a ``coefficients.Table`` for many edges
        is built from."""
        if self.mode == "plain":
            return None
        plan = self._plan(self._check_mask(mask))
        return self._layout(plan) if plan.graph.root.branches else None

    def _plan(self, active: tuple[bool, ...]) -> "_Plan":
        plan = self._plans.get(active)
        if plan is None:
            pms, fms, reparam = self.rewrites
            graph = simplify(
                self.space.chains(self.stride),
                pms=pms,
                fms=fms,
                reparam=reparam,
                active=active,
                names=self.primitives,
                stride=self.stride,
            )
            plan = self._plans[active] = _Plan(graph, active)
        return plan

    # ------------------------------------------------------------------ public helpers
    def simplified_graph(self, mask: Tensor | Sequence[bool] | None = None) -> Graph:
        """The graph this op runs in its mode (for ``mask``); ``print(op.simplified_graph().format())``.
        (In plain mode: the unsimplified edge, zero candidates listed apart.)"""
        return self._plan(self._check_mask(mask)).graph

    def derived_weights(self, weights: Tensor, mask=None) -> list[tuple[tuple[str, ...], Tensor]]:
        """For every weighted sum of the graph (depth first): the names of its scope and its
        branch coefficients, merged convs contributing the sum of their parts. Inside a group
        they sum to 1; at the top to the sum of the non-zero candidates' weights."""
        weights = self._check_weights(weights)
        plan = self._plan(self._check_mask(mask))
        masses = Masses(weights)
        out = []

        def visit(node):
            if isinstance(node, Seq):
                for item in node.items:
                    visit(item)
            elif isinstance(node, Choice):
                coefs = masses.coefficients(node)
                values = [c.sum() if b.folded else c for b, c in zip(node.branches, coefs)]
                out.append((tuple(self.primitives[i] for i in node.scope), torch.stack(values)))
                for b in node.branches:
                    visit(b.node)

        if plan.graph.root.branches:
            visit(plan.graph.root)
        return out

    def derive(self, weights: Tensor, *, exclude: Sequence[str] = (), mask=None, affine: bool = True) -> OpChain:
        """The plain reference module of the operation with the largest weight (among those not
        in ``exclude`` and not masked), freshly initialized at C channels, for retraining.
        DARTS' genotype uses ``exclude=("none",)``. A wrapped op returns a copy of the user's
        candidate with its parameters reset (``affine`` is then the candidate's own)."""
        weights = self._check_weights(weights).detach()
        active = self._check_mask(mask)
        unknown = set(exclude) - set(self.primitives)
        if unknown:
            raise ValueError(f"exclude: unknown primitives {sorted(unknown)}")
        candidates = [i for i, n in enumerate(self.primitives) if active[i] and n not in exclude]
        if not candidates:
            raise ValueError("exclude: every candidate is excluded or masked")
        best = max(candidates, key=lambda i: float(weights[i]))
        if self._wrapped:  # the user's candidate, copied and re-initialized
            module = copy.deepcopy(self._ops[best])
            for m in module.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            return module
        return chosen_module(self.primitives[best], self.C, self.stride, affine, self.space)


class _Plan:
    """A simplified graph, cached per mask."""

    def __init__(self, graph: Graph, active: tuple[bool, ...]):
        self.graph, self.active = graph, active
        self.layout: Layout | None = None
        self._index: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}

    def index(self, members: tuple[int, ...], device: torch.device) -> Tensor:
        if torch.compiler.is_compiling():  # a constant of the graph; a cache would be guarded on
            return torch.tensor(members, dtype=torch.long, device=device)
        key = (members, device)
        idx = self._index.get(key)
        if idx is None:
            idx = self._index[key] = torch.tensor(members, dtype=torch.long, device=device)
        return idx


def _check_options(mode, normalize, eps, backend, recompute, merge) -> None:
    """The options the constructor and ``wrap`` share: a ValueError naming a bad one."""
    rewrites_for(mode)
    Fm.check_merge(merge)
    if normalize not in _NORMALIZE:
        raise ValueError(f"normalize: expected True, False, 'channel', 'tensor' or 'none', got {normalize!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < float("inf")):
        raise ValueError(f"eps: expected a positive finite number, got {eps!r}")
    if backend is not None and (not isinstance(backend, str) or backend.strip().lower() not in ("auto", *BACKENDS)):
        raise ValueError(f"backend: expected None or one of {('auto', *BACKENDS)}, got {backend!r}")
    if recompute is not None and not isinstance(recompute, bool):
        raise ValueError(f"recompute: expected None, True or False, got {recompute!r}")


def _space_for(primitives) -> str:
    """The built-in space that has every name of ``primitives`` (DARTS first)."""
    if primitives is None:
        return "darts"
    names = list(primitives)
    for space in (S.DARTS_SPACE, S.NB201_SPACE):
        if all(n in space for n in names):
            return space.name
    return "darts"  # subset() names the unknown primitive


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shape(mask) -> tuple:
    return tuple(mask.shape) if isinstance(mask, Tensor) else (len(mask),)
