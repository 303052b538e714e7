"""NAS-Bench-201 cell strings, ``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|``: node i (1, 2, 3) lists
its incoming edges as ``op~j``, the operation on the edge from node j. The benchmark tables, the
retraining network, the genotype reader and the cell drawing all read cells through
``parse_nb201``; the look-ups spell a cell the way the tables do with ``canonical_nb201``.
"""

from __future__ import annotations

__all__ = ["canonical_nb201", "parse_nb201"]

NODES = 3  # a NAS-Bench-201 cell: nodes 1..3 after its input node 0


def parse_nb201(arch: str) -> list[list[tuple[str, int]]]:
    """Split a NAS-Bench-201 string, ``|op~0|+|op~0|op~1|+...``, into one list of (op, input)
    per node 1, 2, ...; ValueError naming the malformed part."""
    if not isinstance(arch, str) or not arch.strip():
        raise ValueError(f"arch: expected a NAS-Bench-201 string like '|nor_conv_3x3~0|+|skip_connect~0|none~1|', "
                         f"got {arch!r}")
    nodes = []
    for g, group in enumerate(arch.strip().split("+")):
        node = g + 1
        if len(group) < 3 or not group.startswith("|") or not group.endswith("|"):
            raise ValueError(f"arch: node {node}'s part {group!r} should read '|op~j|op~j|...|'")
        inputs = []
        for token in group[1:-1].split("|"):
            op, sep, j = token.rpartition("~")
            if not sep or not op or "~" in op or not op.strip() or not j.isdigit():
                raise ValueError(f"arch: node {node}'s entry {token!r} (in {group!r}) should read 'op~j' "
                                 "with an op name and an input index j")
            if int(j) >= node:
                raise ValueError(f"arch: node {node}'s entry {token!r} reads node {j}; node {node} can only read "
                                 f"nodes 0..{node - 1}")
            if int(j) in [i for _, i in inputs]:
                raise ValueError(f"arch: node {node} reads node {j} twice ({group!r})")
            inputs.append((op, int(j)))
        nodes.append(inputs)
    return nodes


def canonical_nb201(arch: str, ops) -> str:
    """``arch`` spelled as the benchmark tables spell it: 3 nodes, node i reading every node
    0..i-1 once, in that order, each op one of ``ops``. ValueError naming what is wrong."""
    nodes = parse_nb201(arch)
    for n, inputs in enumerate(nodes, 1):
        for op, _ in inputs:
            if op not in ops:
                raise ValueError(f"arch: node {n}'s op {op!r} is not a NAS-Bench-201 operation; "
                                 f"expected one of {', '.join(ops)}")
    if len(nodes) != NODES or any(sorted(j for _, j in inputs) != list(range(n)) for n, inputs in enumerate(nodes, 1)):
        raise ValueError(f"arch: a NAS-Bench-201 cell has {NODES} nodes, node i reading every node 0..i-1 once "
                         f"('|op~0|+|op~0|op~1|+|op~0|op~1|op~2|'), got {arch.strip()!r}")
    return "+".join("|" + "|".join(f"{op}~{j}" for op, j in sorted(inputs, key=lambda e: e[1])) + "|" for inputs in nodes)
