"""What ``toponas train --genotype G`` accepts, read into an ``Arch`` (space + cell):

- a ``result.json`` of ``toponas search`` (its ``genotype`` and ``space``);
- a DARTS ``Genotype(normal=[...], normal_concat=..., reduce=[...], reduce_concat=...)`` string
  as printed by the DARTS family's code (concat as a list or ``range(2, 6)``; AutoDL-style
  per-node pairs are flattened), read with ``ast`` (literals only, never ``eval``);
- the name of a published genotype (``PUBLISHED``: DARTS_V1, DARTS_V2, PC_DARTS, GDAS, BETA_DARTS);
- a NAS-Bench-201 architecture string ``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|``.

Where the published genotypes come from (copied as data, gene by gene):

- DARTS_V1, DARTS_V2: ``cnn/genotypes.py`` of github.com/quark0/darts (DARTS, ICLR 2019; V2 is the
  second-order cell of the paper's Table 1); the same genes are in AutoDL-Projects'
  ``nas_infer_model/DXYs/genotypes.py``.
- PC_DARTS: ``PC_DARTS_cifar`` in ``genotypes.py`` of github.com/yuhuixu1993/PC-DARTS.
- GDAS (GDAS_V1): ``GDAS_V1`` in AutoDL-Projects (github.com/D-X-Y/AutoDL-Projects,
  ``xautodl/nas_infer_model/DXYs/genotypes.py``; GDAS, CVPR 2019), per-node pairs flattened.
- BETA_DARTS: the CIFAR-10 cell of github.com/Sunshine-Ye/Beta-DARTS, ``sota/cnn/genotypes.py``
  (the ``genotype`` that file names ``DARTS``, which its ``train.py`` retrains). UNVERIFIED as the
  paper's cell: at C 36 / 20 cells it has 2.57 M parameters, while the beta-DARTS paper reports
  3.78 M for its CIFAR-10 cell; check it against the paper's figure before quoting results.
"""

from __future__ import annotations

import ast
import json
import os
from dataclasses import dataclass

from ..nas import spaces as S
from ..nas.nb201_arch import parse_nb201
from ..nas.networks import Genotype


class GenotypeError(ValueError):
    """A genotype that cannot be read; the message names what is wrong."""


@dataclass(frozen=True)
class Arch:
    """A cell to retrain: ``space`` "darts" (or another DARTS-macro space such as "exaggerated")
    with a ``Genotype``, or "nb201" with an architecture string."""

    space: str
    genotype: Genotype | str
    source: str = ""

    @property
    def macro(self) -> str:
        return "nb201" if self.space == "nb201" else "darts"


def _g(normal, reduce, concat=(2, 3, 4, 5)) -> Genotype:
    return Genotype(normal=list(normal), normal_concat=list(concat), reduce=list(reduce), reduce_concat=list(concat))


PUBLISHED: dict[str, Genotype] = {
    "DARTS_V1": _g(
        [("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
         ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)],
        [("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
         ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0)],
    ),
    "DARTS_V2": _g(
        [("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
         ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
        [("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
         ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)],
    ),
    "PC_DARTS": _g(
        [("sep_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 0), ("dil_conv_3x3", 1),
         ("sep_conv_5x5", 0), ("sep_conv_3x3", 1), ("avg_pool_3x3", 0), ("dil_conv_3x3", 1)],
        [("sep_conv_5x5", 1), ("max_pool_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_5x5", 2),
         ("sep_conv_3x3", 0), ("sep_conv_3x3", 3), ("sep_conv_3x3", 1), ("sep_conv_3x3", 2)],
    ),
    "GDAS": _g(
        [("skip_connect", 0), ("skip_connect", 1), ("skip_connect", 0), ("sep_conv_5x5", 2),
         ("sep_conv_3x3", 3), ("skip_connect", 0), ("sep_conv_5x5", 4), ("sep_conv_3x3", 3)],
        [("sep_conv_5x5", 0), ("sep_conv_3x3", 1), ("sep_conv_5x5", 2), ("sep_conv_5x5", 1),
         ("dil_conv_5x5", 2), ("sep_conv_3x3", 1), ("sep_conv_5x5", 0), ("sep_conv_5x5", 1)],
    ),
    "BETA_DARTS": _g(
        [("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2),
         ("skip_connect", 0), ("sep_conv_3x3", 1), ("dil_conv_3x3", 3), ("skip_connect", 0)],
        [("skip_connect", 1), ("max_pool_3x3", 0), ("avg_pool_3x3", 0), ("sep_conv_5x5", 2),
         ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("dil_conv_3x3", 4)],
    ),
}
ALIASES = {"DARTS": "DARTS_V2", "GDAS_V1": "GDAS", "PCDARTS": "PC_DARTS", "PC_DARTS_CIFAR": "PC_DARTS",
           "BETADARTS": "BETA_DARTS"}


# ------------------------------------------------------------------------------------ checks
def check_darts(genotype: Genotype, space: str = "darts", where: str = "genotype") -> Genotype:
    """``genotype`` with plain lists and ints, after checking its genes against ``space``: two
    genes per node, node i (0-based) reads states 0..i+1, known operations, concat in range."""
    sp = S.get_space(space)
    out = {}
    for cell in ("normal", "reduce"):
        genes = getattr(genotype, cell)
        if not isinstance(genes, (list, tuple)) or not genes or len(genes) % 2:
            raise GenotypeError(f"{where}: {cell} must list two (op, input) genes per node, got {genes!r}")
        clean = []
        for k, gene in enumerate(genes):
            if not (isinstance(gene, (list, tuple)) and len(gene) == 2 and isinstance(gene[0], str)
                    and isinstance(gene[1], int) and not isinstance(gene[1], bool)):
                raise GenotypeError(f"{where}: {cell}[{k}] must be an (op name, input index) pair, got {gene!r}")
            op, j = gene
            if op not in sp:
                raise GenotypeError(f"{where}: {cell}[{k}] uses {op!r}, not an operation of the {sp.name} space "
                                    f"({', '.join(sp.names)})")
            node = k // 2
            if not 0 <= j < node + 2:
                raise GenotypeError(f"{where}: {cell}[{k}] reads state {j}; node {node} can read states 0..{node + 1}")
            clean.append((op, j))
        concat = getattr(genotype, f"{cell}_concat")
        steps = len(genes) // 2
        try:
            concat = [int(c) for c in concat]
        except (TypeError, ValueError):
            raise GenotypeError(f"{where}: {cell}_concat must be a list of state indices, got {concat!r}") from None
        if not concat or any(not 0 <= c < steps + 2 for c in concat):
            raise GenotypeError(f"{where}: {cell}_concat must name states 0..{steps + 1}, got {concat!r}")
        out[cell], out[f"{cell}_concat"] = clean, concat
    return Genotype(**out)


def check_nb201(arch: str, where: str = "genotype") -> str:
    """``arch`` stripped, after checking it is a 3-node NAS-Bench-201 cell of known operations."""
    try:
        nodes = parse_nb201(arch)
    except ValueError as exc:
        raise GenotypeError(f"{where}: {str(exc).removeprefix('arch: ')}") from None
    if len(nodes) != 3:
        raise GenotypeError(f"{where}: a NAS-Bench-201 cell has 3 nodes ('+'-separated groups), got {len(nodes)} in {arch!r}")
    for i, node in enumerate(nodes, 1):
        for op, _ in node:
            if op not in S.NB201_SPACE:
                raise GenotypeError(f"{where}: node {i} uses {op!r}, not a NAS-Bench-201 operation "
                                    f"({', '.join(S.NB201_SPACE.names)})")
    return arch.strip()


# ------------------------------------------------------------------------------------ parsing
def _literal(node: ast.AST, what: str):
    """A Python literal (str, int, list, tuple) or ``range(a, b[, c])`` from ``node``."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range" and not node.keywords:
        args = [_literal(a, what) for a in node.args]
        if not 1 <= len(args) <= 3 or not all(isinstance(a, int) for a in args):
            raise GenotypeError(f"genotype: {what}: range() takes 1 to 3 integers")
        return list(range(*args))
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e, what) for e in node.elts]
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int)) and not isinstance(node.value, bool):
        return node.value
    raise GenotypeError(f"genotype: {what}: only names, numbers, lists, tuples and range() are read, "
                        f"got {ast.unparse(node)!r}")


def _flatten(genes: list) -> list:
    """AutoDL writes a node as a pair of genes (and sometimes a weight per gene): flatten."""
    out = []
    for g in genes:
        if isinstance(g, list) and g and all(isinstance(e, list) for e in g):
            out.extend(e[:2] if len(e) == 3 else e for e in g)
        else:
            out.append(g)
    return out


def parse_genotype(text: str, space: str = "darts") -> Genotype:
    """A DARTS ``Genotype(...)`` string (keywords or the four fields in order) -> ``Genotype``."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as exc:
        raise GenotypeError(f"genotype: not a readable Genotype(...) expression ({exc.msg} at column {exc.offset})") from None
    if not (isinstance(tree, ast.Call) and isinstance(tree.func, (ast.Name, ast.Attribute))
            and (tree.func.id if isinstance(tree.func, ast.Name) else tree.func.attr) == "Genotype"):
        raise GenotypeError("genotype: expected Genotype(normal=[...], normal_concat=[...], reduce=[...], reduce_concat=[...])")
    fields = list(Genotype._fields)
    if len(tree.args) > len(fields):
        raise GenotypeError(f"genotype: Genotype takes 4 fields ({', '.join(fields)}), got {len(tree.args)} positional")
    values = {f: _literal(a, f) for f, a in zip(fields, tree.args)}
    for kw in tree.keywords:
        if kw.arg in ("connectN", "connects"):  # AutoDL's extra fields, unused here
            continue
        if kw.arg not in fields:
            raise GenotypeError(f"genotype: unknown field {kw.arg!r}; a Genotype has {', '.join(fields)}")
        values[kw.arg] = _literal(kw.value, kw.arg)
    missing = [f for f in fields if f not in values]
    if missing:
        raise GenotypeError(f"genotype: missing field(s) {', '.join(missing)}")
    for cell in ("normal", "reduce"):
        values[cell] = _flatten(values[cell])
    return check_darts(Genotype(**values), space)


def _from_record(record, space: str, where: str) -> Arch:
    """The ``genotype`` of a result file: an NB201 string, a dict of lists, or a Genotype string."""
    if isinstance(record, str):
        if space == "nb201" or "~" in record:
            return Arch("nb201", check_nb201(record, where), where)
        return Arch(space, parse_genotype(record, space), where)
    if isinstance(record, dict):
        missing = [f for f in Genotype._fields if f not in record]
        if missing:
            raise GenotypeError(f"{where}: its genotype lacks {', '.join(missing)}")
        g = Genotype(**{f: record[f] for f in Genotype._fields})
        g = g._replace(normal=_flatten(list(g.normal)), reduce=_flatten(list(g.reduce)))
        return Arch(space, check_darts(g, space, where), where)
    raise GenotypeError(f"{where}: 'genotype' must be a dict or a string, got {type(record).__name__}")


def load_arch(spec) -> Arch:
    """``--genotype``: a result.json path, a Genotype string, a published name or an NB201 string
    (or a ``Genotype``/``Arch`` object from Python)."""
    if isinstance(spec, Arch):
        return spec
    if isinstance(spec, Genotype):
        return Arch("darts", check_darts(spec), "Genotype")
    if not isinstance(spec, str) or not spec.strip():
        raise GenotypeError(f"--genotype: expected a result.json path, a Genotype(...) string, a published name "
                            f"({', '.join(PUBLISHED)}) or a NAS-Bench-201 string, got {spec!r}")
    text = spec.strip()
    if os.path.isdir(text) and os.path.isfile(os.path.join(text, "result.json")):
        text = os.path.join(text, "result.json")
    if os.path.isfile(text):
        return _load_result(text)
    if text.startswith("Genotype"):
        return Arch("darts", parse_genotype(text), "Genotype string")
    if text.startswith("|"):
        return Arch("nb201", check_nb201(text), "NAS-Bench-201 string")
    key = text.upper().replace("-", "_")
    key = ALIASES.get(key, key)
    if key in PUBLISHED:
        return Arch("darts", PUBLISHED[key], key)
    raise GenotypeError(f"--genotype {spec!r}: not a file, a Genotype(...) string, a NAS-Bench-201 string "
                        f"('|op~0|+...') or a published name ({', '.join(PUBLISHED)})")


def _load_result(path: str) -> Arch:
    where = f"--genotype {path}"
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GenotypeError(f"{where}: cannot read it as JSON ({exc})") from None
    if not isinstance(data, dict) or "genotype" not in data:
        raise GenotypeError(f"{where}: no 'genotype' in this file (expected a toponas search result.json)")
    record = data["genotype"]
    space = str(data.get("space") or ("nb201" if isinstance(record, str) and "~" in record else "darts"))
    if space not in S.SPACE_NAMES:
        raise GenotypeError(f"{where}: searched on space {space!r}; retraining knows {', '.join(S.SPACE_NAMES)}")
    return _from_record(record, space, where)
