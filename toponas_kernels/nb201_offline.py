"""NAS-Bench-201 ground truth that needs no download: the CIFAR-10 test accuracies that the
``analog-nasbench`` package ships for all 15,625 cells of the NB201 space.

    pip install --no-deps analog-nasbench
    toponas lookup --arch '|nor_conv_3x3~0|+|...|' --table analog-nasbench
    toponas search --space nb201 ... --lookup analog-nasbench

What it is, and what it is not (every output carries ``LABEL``): the package's authors retrained
every cell once for 200 epochs on CIFAR-10 and recorded the test accuracy (``baseline_accuracy``;
the package's other fields are analog-hardware measurements). One run per cell, no validation
split, no other dataset: it is not NAS-Bench-201's table, whose numbers are means over up to three
seeds. Its ranking agrees with NAS-Bench-201's CIFAR-10 numbers closely, and functionally
identical cells (same cell once ``skip_connect`` is read as the identity and unreachable edges are
dropped) differ by about 0.6 points: that is the size of its retrain noise.

The file. ``analognasbench/data.anb`` is a pickle of a dict from 6-tuples to
``analognasbench.data.Architecture`` objects. It is found through the installed distribution's
file list (``importlib.metadata``), never by importing the package (whose module pulls in pandas),
and read by a restricted unpickler that builds only two inert stand-in classes for the package's
two classes and refuses every other global: a tampered file cannot run code.

The encoding (proved against the data in ``python_tests/test_offline_table.py``):

* tuple position p is the edge ``EDGES[p]`` = (node, input): node 1 <- 0, node 2 <- 0,
  node 3 <- 0, node 2 <- 1, node 3 <- 1, node 3 <- 2 (inputs before outputs, then by output);
* integer c is the op ``OPS[c]``: 0 skip_connect, 1 none, 2 nor_conv_3x3, 3 nor_conv_1x1,
  4 avg_pool_3x3.

The evidence: exactly the cells whose output no path of non-``none`` ops reaches score 10 %
(341 cells; no other (op, edge) assignment gives that set); cells that are the same function
under that reading agree to retrain noise, and the reading with ``avg_pool_3x3`` as the identity
does not; a 3x3 convolution beats a 1x1 on the same edge in most cells; NAS-Bench-201's best
CIFAR-10 cell is among the table's top three.
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
import pickle
import statistics

from .nas.spaces import NB201_PRIMITIVES
from .nas.nb201_arch import canonical_nb201, parse_nb201

__all__ = [
    "EDGES", "INSTALL", "LABEL", "OPS", "TABLE", "OfflineTableError", "check_offline", "decode", "encode",
    "is_offline", "load_table", "offline_lookup", "output_cut_off", "table_stats",
]

TABLE = "analog-nasbench"  # the name users pass to --table / --lookup
LABEL = "analog-nasbench: one 200-epoch retrain, CIFAR-10 test accuracy only, not NAS-Bench-201's table"
INSTALL = "pip install --no-deps analog-nasbench"
DATA_FILE = "analognasbench/data.anb"  # inside the distribution
EDGES = ((1, 0), (2, 0), (3, 0), (2, 1), (3, 1), (3, 2))  # tuple position -> (node, input)
OPS = ("skip_connect", "none", "nor_conv_3x3", "nor_conv_1x1", "avg_pool_3x3")  # code -> op
CELLS = len(OPS) ** len(EDGES)  # 15,625
assert sorted(OPS) == sorted(NB201_PRIMITIVES)


class OfflineTableError(ValueError):
    """The offline table cannot be found or read, or cannot answer; the message is one line."""


# ---------------------------------------------------------------------------------- encoding
def encode(arch: str) -> tuple[int, ...]:
    """The table's key for a NAS-Bench-201 string ``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|``
    (entries within a node in any order)."""
    try:
        nodes = parse_nb201(canonical_nb201(arch, NB201_PRIMITIVES))
    except ValueError as exc:
        raise OfflineTableError(str(exc)) from None
    ops = {(n, j): op for n, inputs in enumerate(nodes, 1) for op, j in inputs}
    return tuple(OPS.index(ops[edge]) for edge in EDGES)


def decode(code) -> str:
    """The NAS-Bench-201 string of a table key (inverse of ``encode``)."""
    code = tuple(code)
    if len(code) != len(EDGES) or not all(isinstance(c, int) and 0 <= c < len(OPS) for c in code):
        raise OfflineTableError(f"code: expected {len(EDGES)} integers in 0..{len(OPS) - 1}, got {code!r}")
    ops = {edge: OPS[c] for edge, c in zip(EDGES, code)}
    return "+".join("|" + "|".join(f"{ops[(n, j)]}~{j}" for j in range(n)) + "|" for n in (1, 2, 3))


def output_cut_off(arch: str) -> bool:
    """True when no path of non-``none`` ops leads from the cell's input to its output: the cell
    outputs zeros whatever its input (the network then guesses, 10 % on CIFAR-10)."""
    nodes = parse_nb201(arch)
    reached = {0}
    for n, inputs in enumerate(nodes, 1):
        if any(op != "none" and j in reached for op, j in inputs):
            reached.add(n)
    return len(nodes) not in reached


# ---------------------------------------------------------------------------------- reading
class _Architecture:
    """Stand-in for ``analognasbench.data.Architecture``: a bare attribute holder."""


class _DriftMeasurement:
    """Stand-in for ``analognasbench.data.DriftMeasurement``: a bare attribute holder."""


_ALLOWED = {
    ("analognasbench.data", "Architecture"): _Architecture,
    ("analognasbench.data", "DriftMeasurement"): _DriftMeasurement,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds plain containers, numbers, strings and the two stand-ins; any other global (a
    function to call, a class with its own code) is refused."""

    def find_class(self, module, name):
        cls = _ALLOWED.get((module, name))
        if cls is None:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: an analog-nasbench table holds only "
                f"{' and '.join(f'{m}.{n}' for m, n in _ALLOWED)}")
        return cls

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing a persistent id: an analog-nasbench table has none")


def data_file(table: str = TABLE) -> str:
    """The path of the table: ``table`` itself when it is a path, else ``analognasbench/data.anb``
    of the installed ``analog-nasbench`` distribution (found through its file list; the package's
    module is never imported)."""
    table = os.fspath(table)
    if table != TABLE:
        if not os.path.isfile(table):
            raise OfflineTableError(f"table {table}: no such file (the analog-nasbench table is its package's "
                                    f"{DATA_FILE}; {INSTALL}, then name the table {TABLE!r})")
        return table
    try:
        dist = importlib.metadata.distribution(TABLE)
    except importlib.metadata.PackageNotFoundError:
        raise OfflineTableError(f"table {TABLE}: the analog-nasbench package is not installed; "
                                f"{INSTALL} (its data file is read, its module is never imported)") from None
    for f in dist.files or ():
        if f.as_posix() == DATA_FILE:
            path = str(dist.locate_file(f))
            if os.path.isfile(path):
                return path
    raise OfflineTableError(f"table {TABLE}: the installed analog-nasbench {dist.version} has no {DATA_FILE}; "
                            f"reinstall it ({INSTALL})")


def check_offline(table: str = TABLE) -> str:
    """The table's path, found without reading it (milliseconds): a search checks this before it
    starts."""
    return data_file(table)


def is_offline(table) -> bool:
    """Whether ``table`` names the offline table: ``'analog-nasbench'`` or a ``.anb`` file."""
    table = os.fspath(table)
    return table == TABLE or table.endswith(".anb")


_TABLES: dict[tuple, dict[tuple[int, ...], float]] = {}
_STATS: dict[tuple, dict] = {}


def _file_key(path: str) -> tuple:
    """A table file as a cache key: a file rewritten on disk is read again."""
    st = os.stat(path)
    return (os.path.realpath(path), st.st_mtime_ns, st.st_size)


def load_table(table: str = TABLE) -> dict[tuple[int, ...], float]:
    """{code: CIFAR-10 test accuracy in percent} for every cell the table holds (all 15,625 in the
    package's file), read once per process (a file rewritten on disk is read again)."""
    path = data_file(table)
    key = _file_key(path)
    if key not in _TABLES:
        _TABLES[key] = _read(path)
    return _TABLES[key]


def _read(path: str) -> dict[tuple[int, ...], float]:
    try:
        with open(path, "rb") as f:
            data = _RestrictedUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        raise OfflineTableError(f"table {path}: {exc}") from None
    except Exception as exc:  # truncated file, wrong format, a stand-in called with arguments
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise OfflineTableError(f"table {path}: not an analog-nasbench table ({type(exc).__name__}: {msg})") from None
    if not isinstance(data, dict) or not data:
        raise OfflineTableError(f"table {path}: expected a non-empty dict of cells, got {type(data).__name__}")
    out = {}
    for code, record in data.items():
        acc = getattr(record, "baseline_accuracy", None) if isinstance(record, _Architecture) else None
        valid_code = (isinstance(code, tuple) and len(code) == len(EDGES)
                      and all(type(c) is int and 0 <= c < len(OPS) for c in code))
        if not valid_code or type(acc) not in (int, float) or not 0.0 <= acc <= 100.0:
            raise OfflineTableError(f"table {path}: entry {code!r} is not a cell code with a baseline_accuracy "
                                    f"in percent ({len(EDGES)} integers in 0..{len(OPS) - 1} -> Architecture)")
        out[code] = float(acc)
    return out


# ---------------------------------------------------------------------------------- answers
def table_stats(table: str = TABLE) -> dict:
    """The table's best cell and the distribution of a cell drawn uniformly at random (computed
    once per table file)."""
    path = data_file(table)
    key = _file_key(path)
    if key not in _STATS:
        scores = load_table(path)
        best = max(scores, key=lambda c: (scores[c], c))
        values = list(scores.values())
        _STATS[key] = {
            "cells": len(scores),
            "best": {"arch": decode(best), "test_accuracy": scores[best]},
            "random_cell": {"mean": statistics.fmean(values), "median": statistics.median(values)},
        }
    return copy.deepcopy(_STATS[key])


def offline_lookup(arch: str, table: str = TABLE, dataset: str | None = None, hp="200") -> dict:
    """CIFAR-10 test accuracy (percent) of the NB201 cell ``arch`` in the offline table, with the
    table's best cell and the random-cell mean/median. ``dataset`` must be None or 'cifar10' and
    ``hp`` '200': the table has nothing else. The dict has the keys of ``lookup.lookup``'s (train
    and valid accuracies None) plus ``label`` and ``random_cell``."""
    if dataset is not None and str(dataset).lower() != "cifar10":
        raise OfflineTableError(f"dataset: the {TABLE} table has CIFAR-10 test accuracy only ('cifar10'), "
                                f"got {dataset!r}")
    if str(hp) != "200":
        raise OfflineTableError(f"hp: the {TABLE} table has 200-epoch runs only ('200'), got {hp!r}")
    code = encode(arch)
    path = data_file(table)  # found once: the package's file list is read for the name
    scores = load_table(path)
    if code not in scores:
        raise OfflineTableError(f"arch {decode(code)} is not in table {path} ({len(scores)} cells)")
    stats = table_stats(path)
    best = stats["best"]
    return {
        "arch": decode(code),
        "dataset": "cifar10",
        "hp": "200",
        "table": os.path.abspath(path),
        "api": TABLE,
        "label": LABEL,
        "index": None,
        "code": list(code),
        "trials": 1,
        "train_accuracy": None,
        "valid_accuracy": None,
        "test_accuracy": scores[code],
        "valid_split": None,
        "test_split": "test",
        "best": {"arch": best["arch"], "index": None, "valid_accuracy": None, "test_accuracy": best["test_accuracy"],
                 "max_test_accuracy": best["test_accuracy"],
                 "selected_by": "highest test accuracy (the table has no validation split)"},
        "random_cell": stats["random_cell"],
    }
