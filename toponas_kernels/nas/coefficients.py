"""The derived weights of the TopoNAS edges (paper Eq. 6-10, docs/DESIGN.md sections 2-3),
computed per step for many edges at once.

Every coefficient a simplified edge applies is a product of ratios of masses of the edge's
weights w: ``W_members`` at the top, ``W_members / W_scope`` inside a group, times the
coefficient of an enclosing branch that a sum of merged convs absorbs (``W_S = sum_{i in S}
w_i``; a group whose mass is exactly 0 divides by 1, so its conditional weights are 0, not NaN).
Which coefficients an edge needs, and how its graph consumes them, depends only on the graph
(the space, stride, rewrites and mask) and on what the edge recomputes: a ``Layout``, built once
per graph. A ``Table`` stacks the layouts of many edges (e.g. the 14 edges of a DARTS cell
type, whose weights rows every cell of that type shares) and computes all their coefficients
from the ``[E, K]`` weights in a fixed dozen ops: one product with a constant 0/1 membership
matrix, a guarded division, a product over the factors, and one split into the pieces the
edges consume (a vector per weighted sum and per merged conv). So the derived weights cost a
step the same few ops however many edges and cells share them, in forward and in backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .simplify import Choice, Seq

__all__ = ["Layout", "Table", "EdgeCoefficients", "Masses", "absorbs", "edge_coefficients", "table_for"]

#: The constant factor 1 (a top-level coefficient has no denominator; short products are padded).
_ONE = None

_TABLES_KEPT = 64  # tables cached per owner (GDAS samples a new sub-network per step)


def absorbs(choice: Choice) -> bool:
    """Every branch of the sum is linear at its end in a merged conv, so a factor in front of
    the sum can go into the merged kernels."""
    for b in choice.branches:
        if b.folded:
            continue
        items = b.node.items if isinstance(b.node, Seq) else [b.node]
        if not (items and isinstance(items[-1], Choice) and absorbs(items[-1])):
            return False
    return True


@dataclass
class ChoiceLayout:
    """How one weighted sum consumes its coefficients. ``branches``: per branch ``(kind, piece,
    head, tail)``, kind one of ``"merged"`` (a merged conv with its coefficient vector
    ``pieces[piece]``), ``"whole"`` (coefficient exactly 1: run and add), ``"absorb"`` (ends in a
    sum of merged convs that took the coefficient in), ``"weighted"`` (goes through
    ``mixed_sum`` with the vector ``pieces[weighted]``) or ``"light"`` (a parameter-free ``tail``
    after ``head``, recomputed in backward, weighted by ``pieces[light]``)."""

    branches: list[tuple]
    weighted: int | None
    light: int | None


class Layout:
    """The coefficients one simplified graph needs and where each goes.

    ``pieces``: the vectors the graph consumes, each a list of coefficients, each coefficient a
    list of factors ``(numerator set, denominator set or None)``; ``choices``: per weighted sum
    of this graph (by ``id``) its ``ChoiceLayout``; ``signature``: equal for graphs whose pieces
    are the same (so one edge may consume coefficients computed for another)."""

    def __init__(self, root: Choice, signature, recompute: bool, free_tail):
        self.signature = signature
        self.pieces: list[list[list[tuple]]] = []
        self.choices: dict[int, ChoiceLayout] = {}
        self._recompute, self._free_tail = recompute, free_tail
        self._visit_choice(root, None)
        del self._free_tail

    def _add(self, piece) -> int:
        self.pieces.append(piece)
        return len(self.pieces) - 1

    def _visit(self, node) -> None:
        if isinstance(node, Seq):
            for item in node.items:
                self._visit(item)
        elif isinstance(node, Choice):
            self._visit_choice(node, None)

    def _visit_choice(self, choice: Choice, scale) -> None:
        den = None if choice.top else choice.scope
        light, weighted, branches = [], [], []
        for b in choice.branches:
            vector = b.folded
            if vector:
                coef = [[((p.owners[0][0],), den)] for p in b.node.parts]
            elif not choice.top and b.members == choice.scope:
                coef = None  # exactly 1
            else:
                coef = [(b.members, den)]
            if scale is not None:
                coef = scale if coef is None else ([c + scale for c in coef] if vector else coef + scale)
            if self._recompute and coef is not None and not vector:
                head, tail = self._free_tail(b.node)
                if tail:
                    light.append(coef)
                    branches.append(("light", None, head, tail))
                    for item in head:
                        self._visit(item)
                    continue
            if vector:
                branches.append(("merged", self._add(coef), None, None))
                continue
            if coef is None:
                branches.append(("whole", None, None, None))
                self._visit(b.node)
                continue
            items = b.node.items if isinstance(b.node, Seq) else [b.node]
            if items and isinstance(items[-1], Choice) and absorbs(items[-1]):
                branches.append(("absorb", None, None, None))
                for item in items[:-1]:
                    self._visit(item)
                self._visit_choice(items[-1], coef)
                continue
            weighted.append(coef)
            branches.append(("weighted", None, None, None))
            self._visit(b.node)
        self.choices[id(choice)] = ChoiceLayout(
            branches, self._add(weighted) if weighted else None, self._add(light) if light else None
        )


class EdgeCoefficients:
    """The pieces one edge consumes (``Layout.pieces`` order), computed by a ``Table``."""

    __slots__ = ("signature", "pieces")

    def __init__(self, signature, pieces):
        self.signature, self.pieces = signature, pieces


class Table:
    """The coefficients of E edges (``layouts``, one per row of the weights) as one
    computation: the mass of every set any coefficient uses, gathered from the weights and
    summed (a masked candidate's weight is never read, so it may be anything, NaN included);
    then each coefficient's factors gathered from the masses (numerators) and from the masses
    with 0 replaced by 1 (denominators), divided, multiplied, and split into the edges' pieces."""

    def __init__(self, layouts: list[Layout], K: int):
        self.layouts = layouts
        sets: list[tuple[int, tuple[int, ...]]] = []  # (edge, members) per mass
        columns: dict[tuple[int, tuple[int, ...]], int] = {}
        for e, layout in enumerate(layouts):
            for piece in layout.pieces:
                for coef in piece:
                    for num, den in coef:
                        for s in (num, den):
                            if s is not _ONE and (e, s) not in columns:
                                columns[(e, s)] = len(sets)
                                sets.append((e, s))
        S = len(sets)
        width = max((len(s) for _, s in sets), default=1)
        # Flat indices into the weights padded with a zero column ([E, K + 1]).
        self.members = [[e * (K + 1) + i for i in s] + [e * (K + 1) + K] * (width - len(s)) for e, s in sets]
        L = max((len(c) for layout in layouts for piece in layout.pieces for c in piece), default=1)
        num, den = [[] for _ in range(L)], [[] for _ in range(L)]
        self.sizes = []
        for e, layout in enumerate(layouts):
            for piece in layout.pieces:
                self.sizes.append(len(piece))
                for coef in piece:
                    factors = list(coef) + [(_ONE, _ONE)] * (L - len(coef))
                    for f, (n, d) in enumerate(factors):
                        num[f].append(S if n is _ONE else columns[(e, n)])  # index S: the constant 1
                        den[f].append(S if d is _ONE else columns[(e, d)])
        self.num = [i for row in num for i in row]
        self.den = [i for row in den for i in row]
        self.L = L
        self._constants: dict = {}

    def _tensors(self, device):
        if torch.compiler.is_compiling():  # constants of the graph; a cache would be guarded on
            return self._make(device)
        got = self._constants.get(device)
        if got is None:
            got = self._constants[device] = self._make(device)
        return got

    def _make(self, device):
        return tuple(torch.tensor(v, dtype=torch.long, device=device) for v in (self.members, self.num, self.den))

    def compute(self, weights: Tensor) -> list[EdgeCoefficients]:
        """``weights`` [E, K]: every edge's coefficients, in the weights' dtype."""
        members, num, den = self._tensors(weights.device)
        masses = F.pad(weights, (0, 1)).take(members).sum(-1)  # [S]
        masses = F.pad(masses, (0, 1), value=1.0)  # the constant 1 at index S
        safe = masses + (masses == 0)  # a mass of exactly 0 divides by 1
        ratios = masses.take(num) / safe.take(den)
        if self.L == 1:
            coefs = ratios
        else:
            factors = ratios.view(self.L, -1).unbind(0)
            coefs = factors[0]
            for f in factors[1:]:
                coefs = coefs * f
        pieces = coefs.split(self.sizes) if len(self.sizes) > 1 else (coefs,)
        out, start = [], 0
        for layout in self.layouts:
            n = len(layout.pieces)
            out.append(EdgeCoefficients(layout.signature, pieces[start : start + n]))
            start += n
        return out


def table_for(owner, layouts: list[Layout], K: int) -> Table:
    """The ``Table`` of these layouts, cached on ``owner`` (any object with a ``__dict__``)."""
    cache = owner.__dict__.get("_coefficient_tables")
    key = tuple(id(layout) for layout in layouts)
    table = None if cache is None else cache.get(key)
    if table is None:
        table = Table(layouts, K)
        # Traced code never writes to a cache (dynamo would have to rebuild the objects in
        # bytecode): ``prepare_host`` fills it eagerly before a compiled step.
        if not torch.compiler.is_compiling():
            if cache is None:
                cache = owner.__dict__["_coefficient_tables"] = {}
            if len(cache) >= _TABLES_KEPT:
                cache.clear()
            cache[key] = table
    return table


class Masses:
    """The derived weights of one edge as separate tensors, for reading them
    (``FusedMixedOp.derived_weights``): ``W_S = sum_{i in S} w_i`` for the sets the graph uses,
    and each branch's coefficient ``W_members`` (top) or ``W_members / W_scope`` (inside a
    group)."""

    def __init__(self, weights: Tensor):
        self.weights = weights
        self._mass: dict[tuple[int, ...], Tensor] = {}

    def mass(self, members: tuple[int, ...]) -> Tensor:
        m = self._mass.get(members)
        if m is None:
            m = self._mass[members] = self.weights[list(members)].sum()
        return m

    def coefficients(self, choice: Choice) -> list[Tensor]:
        """Per branch: a scalar coefficient, or for a merged conv the vector of its parts'."""
        denom = None
        if not choice.top:
            m = self.mass(choice.scope)
            denom = torch.where(m == 0, torch.ones_like(m), m)
        out = []
        for b in choice.branches:
            if b.folded:
                c = torch.stack([self.mass((p.owners[0][0],)) for p in b.node.parts])
            else:
                c = self.mass(b.members)
            out.append(c if denom is None else c / denom)
        return out


_SIGNATURES: dict = {}


def intern_signature(signature) -> int:
    """A small int per distinct signature, so that layouts compare cheaply (and traceably)."""
    return _SIGNATURES.setdefault(signature, len(_SIGNATURES))


def _layouts(edges, masks) -> tuple[list, list[int]]:
    """Each edge's coefficient layout for its host mask row, and the edges that take one."""
    layouts = [edge.coefficient_layout(None if masks is None else masks[e]) for e, edge in enumerate(edges)]
    return layouts, [e for e, layout in enumerate(layouts) if layout is not None]


def warm_table(owner, edges, masks, K: int) -> None:
    """Make, eagerly, the ``Table`` that ``edge_coefficients(owner, edges, ...)`` uses for the
    host ``masks`` rows, so that a traced forward finds it and only reads it."""
    layouts, rows = _layouts(edges, masks)
    if rows:
        table_for(owner, [layouts[e] for e in rows], K)


def edge_coefficients(owner, edges, weights: Tensor, masks=None, edge_weights: Tensor | None = None) -> list:
    """The derived weights of ``edges`` (``FusedMixedOp``s; row e of ``weights`` [E, K] and of
    the host ``masks`` is edge e's, ``edge_weights`` [E] their PC-DARTS edge weights) as one
    ``Table`` computation: a list with each edge's ``EdgeCoefficients``, None for an edge that
    takes none (plain mode, or only zero candidates active). Any other edge with the same graph
    (the same edge of another cell of the same type) may consume an edge's entry."""
    layouts, rows = _layouts(edges, masks)
    out = [None] * len(layouts)
    if not rows:
        return out
    w = weights if edge_weights is None else weights * edge_weights.to(weights.dtype)[:, None]
    if len(rows) < len(layouts):
        w = w[rows]
    got = table_for(owner, [layouts[e] for e in rows], weights.shape[1]).compute(w)
    for e, c in zip(rows, got):
        out[e] = c
    return out
