"""Zero-One-Shot search-space masks (Rumiantsev & Coates, "Half Search Space is All You Need"):
a binary mask over (edge, operation) fixed before the one-shot search; masked operations are
never built into the computation of any step.

* ``random_masks``: each entry kept with probability xi (the pruning level); an edge left
  without an operation the derivation can choose (``choosable``: not ``none``, not excluded)
  also keeps one choosable operation drawn uniformly.
* ``zero_shot_masks``: Algorithm 1 of the paper, prune-based search with a training-free
  ranking. Each round scores every active operation of every edge by
  ``s = mean_r (r(N) - r(N without it)) / r(N)`` over the ranking functions r, then removes the
  lowest-scored operation of every edge that still has more than one, never an edge's last
  choosable operation; rounds repeat while the kept share exceeds xi.

Why choosable. The paper keeps "at least one operation per edge"; when that one is ``none``,
the edge is cut before the search starts: a DARTS-space node with two incoming edges must then
derive ``none`` on one of them, an NB201 edge is fixed to ``none`` whatever the method learns, and
ROME, which samples without ``none``, has nothing to sample. At xi = 0.5 in the DARTS space an
edge keeps nothing but ``none`` with probability 0.5^8 (1 + 1/8), about 0.44 %; the first node of
each cell has only two edges, so about 2 % of random-mask searches derived ``none`` there.
* The ranking (ETENAS, as the paper uses it): the Frobenius norm of the correlation matrix, over
  samples, of the logits of a tiny proxy supernet at initialization (kaiming-normal convs, BN with
  its initial statistics, i.e. eval mode) on 3 batches of 128 training images; one ranking
  function per initialization, 3 of them.

The kept share. Algorithm 1 states its loop condition as a ratio of architecture counts,
prod_i |E_i(t)| / prod_i |E_i(0)| > xi. With one operation removed per edge per round, that
ratio is (7/8)^28 = 0.024 after the first round of the DARTS space, so at xi = 0.5 the literal
rule prunes one operation per edge, not half the space; the paper's title and its measured halving
of memory (DARTS-RND and Zero-One-Shot at xi = 0.5) fit the share of operations kept. So
``rule="operations"`` (default) continues while the kept share of operations exceeds xi, and
``rule="architectures"`` runs the literal condition.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

Masks = dict[str, Tensor]


class MaskError(ValueError):
    """A mask file or mask option that cannot be used."""


def choosable_ops(primitives, exclude=()) -> list[bool]:
    """Per operation: can a derivation choose it (not ``none``, not in ``exclude``)."""
    return [p != "none" and p not in exclude for p in primitives]


def _choosable(choosable, k: int) -> torch.Tensor:
    if choosable is None:
        return torch.ones(k, dtype=torch.bool)
    c = torch.tensor([bool(x) for x in choosable], dtype=torch.bool)
    if c.numel() != k or not bool(c.any()):
        raise MaskError(f"choosable: expected {k} flags, one per operation, at least one true; got {list(choosable)}")
    return c


# ---------------------------------------------------------------------------------- random
def random_masks(shapes: dict[str, tuple[int, int]], level: float, generator: torch.Generator,
                 choosable=None) -> Masks:
    """Bernoulli(level) per entry; an edge without a ``choosable`` operation (per-operation
    flags, ``choosable_ops``; default: every operation) also keeps one drawn uniformly from
    the choosable ones."""
    _check_level(level)
    out = {}
    for name, (edges, k) in shapes.items():
        c = _choosable(choosable, k)
        pool = c.nonzero().flatten()
        m = torch.rand(edges, k, generator=generator) < level
        for e in range(edges):
            if not bool((m[e] & c).any()):
                m[e, int(pool[int(torch.randint(len(pool), (1,), generator=generator))])] = True
        out[name] = m
    return out


# ---------------------------------------------------------------------------------- Algorithm 1
def kept_share(masks: Masks, initial: Masks, rule: str) -> float:
    if rule == "operations":
        return sum(int(m.sum()) for m in masks.values()) / sum(int(m.sum()) for m in initial.values())
    if rule == "architectures":
        log_ratio = sum(
            math.log(int(row.sum())) - math.log(int(row0.sum()))
            for name in masks
            for row, row0 in zip(masks[name], initial[name])
        )
        return math.exp(log_ratio)
    raise MaskError(f"rule: expected 'operations' or 'architectures', got {rule!r}")


def prune(
    masks: Masks,
    rankings: Iterable[Callable[[Masks], float]],
    level: float,
    *,
    rule: str = "operations",
    choosable=None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Masks, list[dict]]:
    """Algorithm 1: prune ``masks`` with the ranking functions until the kept share (``rule``)
    is at most ``level``, never removing an edge's last ``choosable`` operation (per-operation
    flags, ``choosable_ops``; default: every operation). Returns the pruned masks and one record
    per round (scores and what was removed)."""
    _check_level(level)
    rankings = list(rankings)
    if not rankings:
        raise MaskError("rankings: Algorithm 1 needs at least one ranking function")
    initial = {n: m.clone() for n, m in masks.items()}
    current = {n: m.clone() for n, m in masks.items()}
    keep = {n: _choosable(choosable, m.shape[1]) for n, m in masks.items()}
    rounds = []
    while kept_share(current, initial, rule) > level:
        candidates = [
            (name, e, j)
            for name, m in current.items()
            for e in range(m.shape[0])
            if int(m[e].sum()) > 1
            for j in m[e].nonzero().flatten().tolist()
            if not (keep[name][j] and int((m[e] & keep[name]).sum()) == 1)
        ]
        if not candidates:
            break
        scores = {c: 0.0 for c in candidates}
        for r in rankings:
            base = float(r(current))
            if not math.isfinite(base) or base == 0:
                raise MaskError(f"ranking gave {base} for the current supernet; cannot score relative changes")
            for name, e, j in candidates:
                current[name][e, j] = False
                scores[(name, e, j)] += (base - float(r(current))) / base
                current[name][e, j] = True
        removed = []
        for name, m in current.items():
            for e in range(m.shape[0]):
                edge = [(c, s) for c, s in scores.items() if c[0] == name and c[1] == e]
                if not edge:
                    continue
                (_, _, j), _ = min(edge, key=lambda cs: (cs[1], cs[0][2]))
                removed.append((name, e, j))
        for name, e, j in removed:
            current[name][e, j] = False
        rounds.append({
            "scores": {f"{n}[{e}][{j}]": s / len(rankings) for (n, e, j), s in scores.items()},
            "removed": [[n, e, j] for n, e, j in removed],
            "kept_share": kept_share(current, initial, rule),
        })
        if progress is not None:
            progress(f"zero-shot round {len(rounds)}: removed {len(removed)}, kept share {rounds[-1]['kept_share']:.3f}")
    return current, rounds


# ---------------------------------------------------------------------------------- ETENAS ranking
def nngp_frobenius(logits: Tensor) -> float:
    """Frobenius norm of the sample-by-sample correlation matrix of ``logits`` [N, classes]."""
    corr = torch.corrcoef(logits.double())
    corr = torch.nan_to_num(corr, nan=0.0)
    return float(torch.linalg.matrix_norm(corr, "fro"))


def kaiming_init_(model: nn.Module, generator: torch.Generator) -> None:
    """Kaiming-normal (fan in) convolution and linear weights, drawn from ``generator``."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                std = math.sqrt(2.0 / fan_in)
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * std)
                if m.bias is not None:
                    m.bias.zero_()


def etenas_rankings(
    build_proxy: Callable[[], nn.Module], images: Tensor, inits: int, seed: int, batch_size: int = 128
) -> list[Callable[[Masks], float]]:
    """One ranking function per initialization of the proxy: masks -> Frobenius norm of the
    NNGP correlation of the proxy's logits on ``images`` (run in batches of ``batch_size``)."""
    fns = []
    for i in range(inits):
        proxy = build_proxy()
        kaiming_init_(proxy, torch.Generator().manual_seed(seed * 1000 + i))
        proxy.eval()
        device = images.device
        proxy.to(device)

        def rank(masks: Masks, proxy=proxy) -> float:
            for name, m in masks.items():
                proxy.get_buffer(name).copy_(m)
            with torch.no_grad():
                logits = torch.cat([proxy(images[s : s + batch_size]) for s in range(0, images.shape[0], batch_size)])
            return nngp_frobenius(logits)

        fns.append(rank)
    return fns


def zero_shot_masks(
    build_proxy: Callable[[], nn.Module],
    shapes: dict[str, tuple[int, int]],
    images: Tensor,
    level: float,
    *,
    inits: int = 3,
    seed: int = 0,
    rule: str = "operations",
    batch_size: int = 128,
    choosable=None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Masks, dict]:
    """Algorithm 1 with the ETENAS ranking on ``images`` (3 x 128 in the paper), keeping a
    ``choosable`` operation on every edge (see ``prune``). Returns the masks and a record
    (rounds, seconds)."""
    start = time.perf_counter()
    full = {name: torch.ones(edges, k, dtype=torch.bool) for name, (edges, k) in shapes.items()}
    rankings = etenas_rankings(build_proxy, images, inits, seed, batch_size)
    masks, rounds = prune(full, rankings, level, rule=rule, choosable=choosable, progress=progress)
    return masks, {"rounds": rounds, "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------- files
def mask_record(masks: Masks, *, space: str, primitives: list[str], info: dict) -> dict:
    return {
        "format": "toponas-mask/1",
        "space": space,
        "primitives": list(primitives),
        "masks": {name: m.to(torch.int64).tolist() for name, m in masks.items()},
        **info,
    }


def load_masks(path: str, shapes: dict[str, tuple[int, int]], primitives: list[str],
               exclude=()) -> tuple[Masks, dict]:
    """Read a mask file (``mask.json`` of an earlier run, or the ``mask`` field of its
    ``result.json``) and check it fits this supernet: every edge keeps an operation that a
    derivation can choose (not ``none``, not in ``exclude``)."""
    if not os.path.isfile(path):
        raise MaskError(f"--mask: no mask file at {path} (expected 'random', 'zero-shot' or the path of a mask.json/result.json)")
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise MaskError(f"--mask: {path} is not a JSON mask file ({exc})") from None
    if isinstance(record, dict) and isinstance(record.get("mask"), dict):
        record = record["mask"]  # a result.json
    if not isinstance(record, dict) or not isinstance(record.get("masks"), dict):
        raise MaskError(f"--mask: {path} has no 'masks' object (write one with `toponas search --mask ...`)")
    prims = record.get("primitives")
    if prims is not None and list(prims) != list(primitives):
        raise MaskError(f"--mask: {path} is for operations {prims}, this search has {list(primitives)}")
    out = {}
    for name, (edges, k) in shapes.items():
        rows = record["masks"].get(name)
        try:
            m = torch.tensor(rows, dtype=torch.int64)
        except (TypeError, ValueError):
            m = None
        if m is None or tuple(m.shape) != (edges, k) or not bool(((m == 0) | (m == 1)).all()):
            raise MaskError(f"--mask: {path}: '{name}' must be a {edges} x {k} list of 0/1, got {_describe(rows)}")
        m = m.bool()
        if not bool(m.any(dim=1).all()):
            raise MaskError(f"--mask: {path}: '{name}' switches off every operation of some edge; keep one per edge")
        dead = (~(m & _choosable(choosable_ops(primitives, exclude), k)).any(dim=1)).nonzero().flatten().tolist()
        if dead:
            raise MaskError(f"--mask: {path}: '{name}' leaves edge(s) {dead} only {sorted({'none', *exclude})}; "
                            "keep an operation a derivation can choose on every edge")
        out[name] = m
    extra = set(record["masks"]) - set(shapes)
    if extra:
        raise MaskError(f"--mask: {path} has masks {sorted(extra)} that this supernet does not have ({sorted(shapes)})")
    return out, record


def _describe(rows) -> str:
    if rows is None:
        return "nothing"
    try:
        return f"shape {tuple(torch.tensor(rows).shape)}"
    except (TypeError, ValueError):
        return type(rows).__name__


def _check_level(level: float) -> None:
    if not (isinstance(level, (int, float)) and 0.0 < float(level) < 1.0):
        raise MaskError(f"--mask-level: the pruning level must lie strictly between 0 and 1, got {level!r}")
