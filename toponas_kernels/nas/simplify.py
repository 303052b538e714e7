"""The topological simplification engine (TopoNAS Sec. 3.2-3.4, docs/DESIGN.md sections 2-5).

Input: the candidate operations of one edge as chains of basic modules (``spaces.py``).
Output: a ``Graph``, a tree of weighted sums (``Choice``), chains (``Seq``), modules (``Leaf``)
and merged convolutions (``Merged``) that computes the edge with fewer modules. The engine works
on module descriptions only; nothing in it knows an operation's name.

Weights. There is ONE set of weights w (the edge's softmaxed architecture row). Every weighted
sum below the top is a conditional choice inside a group S of candidates, with weights derived
from w (paper Eq. 6-10):

    W_S = sum_{i in S} w_i              (probability that the group is chosen)
    q_i = w_i / W_S                     (conditional probability inside the group)

A branch of a ``Choice`` carries the probability mass of its ``members``: its coefficient is
``W_members`` at the top and ``W_members / W_scope`` inside a group (so the q of one weighted sum
add up to 1). Nothing is learned per group.

Rewrites, applied to a weighted sum and then recursively to the sums they create until no
shareable module is left (paper Alg. 1):

* PMS (partial module sharing, Eq. 2-10). A set S of branches whose chains start with the same
  module h and/or end with the same module g becomes one branch
  ``W_S * g( sum_{i in S} q_i f_i(h(x)) )``. Choice of S: greedily the largest set of branches
  that share a first or a last module; ties go to the set that shares both ends, then to a
  shared first module, then to the earliest candidate. Sharing h is exact (every f_i sees the
  same h(x)); sharing g is exact only when g is linear, e.g. BN in eval mode with equal
  statistics, and an approximation otherwise (train-mode BN, ReLU): that is the method.
* FMS (floating module sharing, Eq. 11-13). A set F of branches of the form ``f2_i . m . f1_i``
  with the same run m of shareable modules strictly inside (f1_i and f2_i not empty) becomes
  ``z = sum_{i in F} q_i f1_i(x);  W_F * sum_{i in F} q_i f2_i(m(z))``: two weighted sums in
  series with the same q (q_i = w_i / W_F, renormalised inside F), m run once. It is an
  approximation (cross terms q_i q_j f2_i m f1_j appear) except for one-hot weights. Choice of
  F and m: the largest number of modules saved, (|F| - 1) * len(m); each chain is split at the
  first occurrence of m, the rest is simplified recursively. Branches that are not in F keep
  their own weights in the same sum, so for DARTS' conv group {sep3, sep5, dil3, dil5} the
  inner sum becomes ``q_dil3 dil3(x) + q_dil5 dil5(x) + Q_sep * FMS_{sep3,sep5}(x)`` with
  Q_sep = (w_sep3 + w_sep5) / W_conv, and inside the FMS q_sep3 = w_sep3 / (w_sep3 + w_sep5).
* Reparameterization (Sec. 3.4), after all sharing. In every weighted sum, the branches that are
  exactly one linear conv unit with the same stride and the same groups of their equivalent
  single conv become one ``Merged`` conv whose kernel is ``sum_i c_i embed(normalize(K_i))``
  computed by ``ops.merge_kernels``; the coefficients c_i move into the kernel (exact: a conv is
  linear in its kernel; only the optional kernel normalization changes the function). A lone
  conv unit in a weighted sum is folded the same way (a "merge" of one), so it is normalized
  too. Pools, identity and FactorizedReduce are never merged.

Zero candidates (``Zero`` in the chain) add exactly 0 and are left out of the graph (their
weight still counts in the top-level sum's weights, which are used as given). ``Identity``
modules are dropped from chains (an empty chain is the identity).

Counting (docs/DESIGN.md section 4): a conv unit, FactorizedReduce or merged conv is one "conv";
ReLU, BN and (atomic) pools are "non_conv"; identity and zero are not counted.
"""

from __future__ import annotations

import math

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Union

from .spaces import Conv, Identity, Module, SearchSpace, Zero

__all__ = [
    "Leaf",
    "Seq",
    "Branch",
    "Choice",
    "Merged",
    "Graph",
    "Rewrites",
    "Counts",
    "MODES",
    "STAGES",
    "rewrites_for",
    "simplify",
    "simplify_space",
    "stages",
    "count",
    "format_graph",
]

Owner = tuple[int, int]  # (candidate index, position of the module in that candidate's chain)


# ----------------------------------------------------------------------------- graph nodes
@dataclass(frozen=True)
class Leaf:
    """One module run once. ``owners`` are the (candidate, position) it stands for: one for an
    unshared module, several for a shared one (the first owner's instance is the one that runs)."""

    module: Module
    owners: tuple[Owner, ...]

    @property
    def shared(self) -> bool:
        return len(self.owners) > 1


@dataclass
class Seq:
    """Modules / sub-graphs applied in series (an empty Seq is the identity)."""

    items: list["Node"] = field(default_factory=list)


@dataclass
class Branch:
    """One term of a weighted sum. ``members``: the candidates whose probability it carries.
    ``folded``: the node is a ``Merged`` conv that already has its coefficients in its kernel."""

    members: tuple[int, ...]
    node: "Node"
    folded: bool = False


@dataclass
class Choice:
    """A weighted sum over ``branches``. ``scope``: the candidates it chooses among. At the top
    (``top=True``) the coefficients are the edge weights as given; below, they are conditional
    probabilities ``W_members / W_scope``."""

    scope: tuple[int, ...]
    branches: list[Branch]
    top: bool = False


@dataclass(frozen=True)
class Merged:
    """Reparameterized conv: ``conv(x, sum_i c_i embed(normalize(K_i)))`` with the c_i the
    coefficients its ``parts`` (single-owner ``Conv`` leaves) had in the enclosing weighted sum."""

    parts: tuple[Leaf, ...]

    @property
    def stride(self) -> int:
        return self.parts[0].module.stride

    @property
    def groups(self) -> int:
        return self.parts[0].module.merge_groups

    @property
    def size(self) -> int:
        """The merged kernel's span (the receptive field of the largest part)."""
        return max(p.module.span for p in self.parts)

    @property
    def dilation(self) -> int:
        """The dilation the merged conv runs at: the greatest common divisor of the parts'
        dilations (1 x 1 parts, the centre tap at any dilation, do not count). Every part's taps
        lie on that lattice, so the merged kernel is stored at ``lattice`` x ``lattice`` and run
        dilated, which is the same conv as the zero-filled ``size`` x ``size`` one: DARTS' two
        dilated convs merge into a 5 x 5 kernel at dilation 2 (25 taps) instead of 9 x 9 (81)."""
        return math.gcd(*(p.module.dilation for p in self.parts if p.module.kernel > 1)) or 1

    @property
    def lattice(self) -> int:
        """Side of the stored merged kernel: ``(size - 1) / dilation + 1``."""
        return (self.size - 1) // self.dilation + 1

    def lattice_dilations(self) -> list[int]:
        """Each part's dilation on the merged kernel's lattice (``merge_kernels``' argument)."""
        g = self.dilation
        return [p.module.dilation // g if p.module.kernel > 1 else 1 for p in self.parts]


Node = Union[Leaf, Seq, Choice, Merged]


@dataclass
class Graph:
    """The simplified edge. ``root`` is the top-level weighted sum; ``zeros`` the candidates
    left out because they are zero; ``names`` the candidate names (for printing only)."""

    root: Choice
    names: tuple[str, ...]
    zeros: tuple[int, ...]
    stride: int
    rewrites: "Rewrites"

    def counts(self) -> "Counts":
        return count(self)

    def format(self) -> str:
        return format_graph(self)


class Rewrites(NamedTuple):
    """Which rewrites to apply."""

    pms: bool = True
    fms: bool = True
    reparam: bool = True


class Counts(NamedTuple):
    conv: int
    non_conv: int

    @property
    def total(self) -> int:
        return self.conv + self.non_conv


#: FusedMixedOp modes -> rewrites. "fms" alone is the Table VI ablation row; "topo" is all.
MODES = {
    "plain": Rewrites(False, False, False),
    "pms": Rewrites(True, False, False),
    "fms": Rewrites(False, True, False),
    "pms+fms": Rewrites(True, True, False),
    "topo": Rewrites(True, True, True),
}

#: The stages of paper Table II (cumulative), as printed by ``toponas simplify``.
STAGES = (
    ("original", MODES["plain"]),
    ("pms", MODES["pms"]),
    ("fms", MODES["pms+fms"]),
    ("reparam", MODES["topo"]),
)


def rewrites_for(mode: str) -> Rewrites:
    """The rewrites of a mode name (see ``MODES``); ValueError naming ``mode`` otherwise."""
    if mode not in MODES:
        raise ValueError(f"mode: unknown mode {mode!r}; expected one of {list(MODES)}")
    return MODES[mode]


# ----------------------------------------------------------------------------- entry points
def simplify(
    chains: Sequence[Sequence[Module]],
    *,
    pms: bool = True,
    fms: bool = True,
    reparam: bool = True,
    active: Sequence[bool] | None = None,
    names: Sequence[str] | None = None,
    stride: int = 1,
) -> Graph:
    """Simplify the edge whose candidate ``chains`` are given (index = weight index).

    ``active`` (a mask) leaves inactive candidates out entirely. ``names`` and ``stride`` are
    only recorded for printing.
    """
    n = len(chains)
    if active is None:
        active = [True] * n
    if len(active) != n:
        raise ValueError(f"mask: expected {n} entries, got {len(active)}")
    names = tuple(names) if names is not None else tuple(f"op{i}" for i in range(n))
    branches, zeros = [], []
    for i, chain in enumerate(chains):
        if not active[i]:
            continue
        if any(isinstance(m, Zero) for m in chain):
            zeros.append(i)
            continue
        leaves = [Leaf(m, ((i, pos),)) for pos, m in enumerate(chain) if not isinstance(m, Identity)]
        branches.append(Branch((i,), Seq(leaves)))
    rewrites = Rewrites(pms, fms, reparam)
    root = Choice(tuple(b.members[0] for b in branches), branches, top=True)
    _simplify_choice(root, rewrites)
    if reparam:
        _reparam(root)
    return Graph(root, names, tuple(zeros), stride, rewrites)


def simplify_space(space: SearchSpace, stride: int = 1, mode: str = "topo", active=None) -> Graph:
    """``simplify`` for a search space at ``stride`` with the rewrites of ``mode``."""
    pms, fms, reparam = rewrites_for(mode)
    return simplify(
        space.chains(stride), pms=pms, fms=fms, reparam=reparam, active=active, names=space.names, stride=stride
    )


def stages(space: SearchSpace, stride: int = 1) -> list[tuple[str, Graph, Counts]]:
    """The paper's Table II for ``space``: (stage name, graph, counts) for original, pms, fms
    (= PMS then FMS) and reparam (= everything)."""
    out = []
    for name, (pms, fms, reparam) in STAGES:
        graph = simplify(
            space.chains(stride), pms=pms, fms=fms, reparam=reparam, names=space.names, stride=stride
        )
        out.append((name, graph, count(graph)))
    return out


# ----------------------------------------------------------------------------- the rewrites
def _flat_items(branch: Branch) -> list[Leaf] | None:
    """The leaves of a branch that is still one candidate's plain chain, else None."""
    if branch.folded or len(branch.members) != 1 or not isinstance(branch.node, Seq):
        return None
    if not all(isinstance(item, Leaf) for item in branch.node.items):
        return None
    return list(branch.node.items)


def _shared_leaf(leaves: Sequence[Leaf]) -> Leaf:
    owners = tuple(sorted(o for leaf in leaves for o in leaf.owners))
    return Leaf(leaves[0].module, owners)


def _common(items: Sequence[list[Leaf]], end: int) -> bool:
    """All non-empty and their module at ``end`` (0 or -1) is the same shareable module."""
    if not all(items):
        return False
    first = items[0][end].module
    return first.shareable and all(chain[end].module == first for chain in items)


def _strip(items: list[list[Leaf]]):
    """Strip the shared first module, then the shared last one: (lead, trail, inner chains)."""
    lead = trail = None
    if _common(items, 0):
        lead = _shared_leaf([chain[0] for chain in items])
        items = [chain[1:] for chain in items]
    if _common(items, -1):
        trail = _shared_leaf([chain[-1] for chain in items])
        items = [chain[:-1] for chain in items]
    return lead, trail, items


def _union(branches: Sequence[Branch]) -> tuple[int, ...]:
    return tuple(sorted(i for b in branches for i in b.members))


def _as_items(choice: Choice) -> list["Node"]:
    """A sub-sum as chain items: a sum with one branch that carries its whole scope is just that
    branch (coefficient 1), spliced in; anything else stays a weighted sum."""
    if len(choice.branches) == 1:
        b = choice.branches[0]
        if not b.folded and b.members == choice.scope:
            return list(b.node.items) if isinstance(b.node, Seq) else [b.node]
    return [choice]


def _replace(choice: Choice, picked: Sequence[int], new: Branch) -> None:
    """Put ``new`` where the first picked branch was and drop the picked ones."""
    first = min(picked)
    out = []
    for j, b in enumerate(choice.branches):
        if j == first:
            out.append(new)
        elif j not in picked:
            out.append(b)
    choice.branches = out


def _pms_step(choice: Choice, rewrites: Rewrites) -> bool:
    """One partial module sharing on ``choice``; False when no two branches share an end."""
    flat = [(j, items) for j, b in enumerate(choice.branches) if (items := _flat_items(b)) is not None]
    best = None
    for end in (0, -1):
        groups: dict[Module, list[int]] = {}
        for j, items in flat:
            if items and items[end].module.shareable:
                groups.setdefault(items[end].module, []).append(j)
        for js in groups.values():
            if len(js) < 2:
                continue
            lead, trail, _ = _strip([_flat_items(choice.branches[j]) for j in js])
            key = (len(js), (lead is not None) + (trail is not None), end == 0, -js[0])
            if best is None or key > best[0]:
                best = (key, js)
    if best is None:
        return False
    js = best[1]
    picked = [choice.branches[j] for j in js]
    lead, trail, inner_items = _strip([_flat_items(b) for b in picked])
    scope = _union(picked)
    inner = Choice(scope, [Branch(b.members, Seq(items)) for b, items in zip(picked, inner_items)])
    _simplify_choice(inner, rewrites)
    items = ([lead] if lead else []) + _as_items(inner) + ([trail] if trail else [])
    _replace(choice, js, Branch(scope, Seq(items)))
    return True


def _fms_step(choice: Choice, rewrites: Rewrites) -> bool:
    """One floating module sharing on ``choice``; False when no two chains share an inner run."""
    runs: dict[tuple[Module, ...], list[tuple[int, int, int]]] = {}
    for j, b in enumerate(choice.branches):
        items = _flat_items(b)
        if items is None:
            continue
        seen = set()
        for start in range(1, len(items) - 1):
            for stop in range(start + 1, len(items)):  # f2 = items[stop:] stays non-empty
                if not items[stop - 1].module.shareable:
                    break
                key = tuple(leaf.module for leaf in items[start:stop])
                if key not in seen:  # first occurrence only
                    seen.add(key)
                    runs.setdefault(key, []).append((j, start, stop))
    best = None
    for key, hits in runs.items():
        if len(hits) < 2:
            continue
        rank = ((len(hits) - 1) * len(key), len(hits), len(key), -hits[0][0])
        if best is None or rank > best[0]:
            best = (rank, key, hits)
    if best is None:
        return False
    _, key, hits = best
    picked = [choice.branches[j] for j, _, _ in hits]
    chains = [_flat_items(b) for b in picked]
    scope = _union(picked)
    stage1 = Choice(scope, [Branch(b.members, Seq(c[:s])) for b, c, (_, s, _) in zip(picked, chains, hits)])
    stage2 = Choice(scope, [Branch(b.members, Seq(c[e:])) for b, c, (_, _, e) in zip(picked, chains, hits)])
    middle = [_shared_leaf([c[s + t] for c, (_, s, _) in zip(chains, hits)]) for t in range(len(key))]
    _simplify_choice(stage1, rewrites)
    _simplify_choice(stage2, rewrites)
    _replace(choice, [j for j, _, _ in hits], Branch(scope, Seq(_as_items(stage1) + middle + _as_items(stage2))))
    return True


def _simplify_choice(choice: Choice, rewrites: Rewrites) -> None:
    """PMS, then FMS, until neither finds anything (each creates and simplifies its sub-sums)."""
    while (rewrites.pms and _pms_step(choice, rewrites)) or (rewrites.fms and _fms_step(choice, rewrites)):
        pass


def _single_conv(branch: Branch) -> Leaf | None:
    """The branch's only module when it is one linear, centred conv unit."""
    node = branch.node
    if branch.folded or not isinstance(node, Seq) or len(node.items) != 1:
        return None
    leaf = node.items[0]
    if isinstance(leaf, Leaf) and isinstance(leaf.module, Conv) and not leaf.shared:
        return leaf
    return None


def _reparam(node: "Node") -> None:
    """Merge, in every weighted sum, the single-conv branches of equal stride and groups."""
    if isinstance(node, Seq):
        for item in node.items:
            _reparam(item)
        return
    if not isinstance(node, Choice):
        return
    groups: dict[tuple[int, int], list[int]] = {}
    for j, b in enumerate(node.branches):
        leaf = _single_conv(b)
        if leaf is None:
            _reparam(b.node)
        else:
            groups.setdefault((leaf.module.stride, leaf.module.merge_groups), []).append(j)
    merged_at = {}  # first branch index of a group -> its merged branch
    for js in groups.values():
        picked = [node.branches[j] for j in js]
        merged_at[js[0]] = Branch(_union(picked), Merged(tuple(_single_conv(b) for b in picked)), folded=True)
    grouped = {j for js in groups.values() for j in js}
    node.branches = [
        merged_at[j] if j in merged_at else b for j, b in enumerate(node.branches) if j in merged_at or j not in grouped
    ]


# ----------------------------------------------------------------------------- counting
def _count(node: "Node") -> tuple[int, int]:
    if isinstance(node, Leaf):
        cat = node.module.category
        return (cat == "conv", cat == "non_conv")
    if isinstance(node, Merged):
        return (1, 0)
    parts = node.items if isinstance(node, Seq) else [b.node for b in node.branches]
    conv = non_conv = 0
    for part in parts:
        c, n = _count(part)
        conv += c
        non_conv += n
    return conv, non_conv


def count(graph: Graph | Choice) -> Counts:
    """Module counts of a graph (docs/DESIGN.md section 4 convention)."""
    root = graph.root if isinstance(graph, Graph) else graph
    return Counts(*_count(root))


# ----------------------------------------------------------------------------- printing
def _set(members: Sequence[int], names: Sequence[str]) -> str:
    return "{" + ", ".join(names[i] for i in members) + "}"


def _leaf_text(leaf: Leaf, names: Sequence[str]) -> str:
    text = leaf.module.describe()
    if leaf.shared:
        text += f" (shared by {len(leaf.owners)})"
    return text


def _merged_text(node: Merged, names: Sequence[str], coef: str) -> str:
    parts = ", ".join(f"{coef}[{names[p.owners[0][0]]}]*{p.module.describe()}" for p in node.parts)
    kind = "merged" if len(node.parts) > 1 else "folded"
    stride = f" s{node.stride}" if node.stride != 1 else ""
    groups = f" g{node.groups}" if node.groups != 1 else ""
    return f"{kind} {merged_shape(node)}{stride}{groups} = conv(x, {parts})"


def merged_shape(node: Merged) -> str:
    """``conv9x9`` for a merged kernel, ``conv5x5 d2`` for one stored on a dilated lattice."""
    k = node.lattice
    return f"conv{k}x{k}" + (f" d{node.dilation}" if node.dilation != 1 else "")


def _format_seq(items: Sequence["Node"], names, indent: int, lines: list[str], head: str) -> None:
    pad = "  " * indent
    if all(isinstance(i, Leaf) for i in items):
        chain = " -> ".join(_leaf_text(i, names) for i in items) or "identity"
        lines.append(f"{pad}{head}{chain}")
        return
    lines.append(f"{pad}{head}chain:")
    for item in items:
        if isinstance(item, Leaf):
            lines.append(f"{pad}  {_leaf_text(item, names)}")
        elif isinstance(item, Choice):
            _format_choice(item, names, indent + 1, lines)
        else:
            lines.append(f"{pad}  {_merged_text(item, names, '?')}")


def _format_choice(choice: Choice, names, indent: int, lines: list[str]) -> None:
    pad = "  " * indent
    if choice.top:
        coef = "w"
        lines.append(f"{pad}weighted sum, w = the edge's weights:")
    else:
        coef = "q"
        lines.append(f"{pad}weighted sum, q = w / W{_set(choice.scope, names)}:")
    for b in choice.branches:
        if isinstance(b.node, Merged):
            lines.append(f"{pad}  {_merged_text(b.node, names, coef)}")
            continue
        if len(b.members) == 1:
            head = f"{coef}[{names[b.members[0]]}] * "
        else:
            head = f"{coef.upper()}{_set(b.members, names)} * "
        items = b.node.items if isinstance(b.node, Seq) else [b.node]
        _format_seq(items, names, indent + 1, lines, head)


def format_graph(graph: Graph) -> str:
    """The simplified edge, one module or weighted sum per line, for a person to read.

    ``w[op]``: the edge weight of op; ``W{...}``: the sum of the edge weights of a set; ``q``:
    the conditional weights of a sub-sum; ``conv(x, c1*K1, c2*K2)``: one conv whose kernel is the
    weighted sum of the (normalized) candidate kernels.
    """
    c = count(graph)
    lines = [
        f"edge at stride {graph.stride}, {len(graph.names)} candidates; "
        f"{c.conv} conv + {c.non_conv} non-conv = {c.total} modules"
    ]
    _format_choice(graph.root, graph.names, 0, lines)
    if graph.zeros:
        lines.append("left out (zero): " + ", ".join(graph.names[i] for i in graph.zeros))
    return "\n".join(lines)
