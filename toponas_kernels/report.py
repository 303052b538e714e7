"""What a search or training run leaves next to its result.json for a person to look at.

Pictures (PNG, drawn with matplotlib's Agg canvas, never through pyplot, so no figure outlives
its call and nothing depends on a display):

* ``plot_arch_weights``: the softmaxed architecture weights of every edge over the epochs;
* ``draw_darts_cell`` / ``draw_nb201_cell``: the derived cells as small DAGs, one label per edge
  (laid out here, no graphviz);
* ``plot_curves``: learning curves from per-epoch rows.

Tables: ``write_csv`` / ``read_csv`` for those per-epoch rows.

Every writer creates the parent folder, writes a temporary file in the same folder and moves it
into place with ``os.replace``: a reader never sees half a file, and a failed write leaves the old
one as it was. matplotlib is imported only inside the drawing functions; without it they raise
``ReportError`` saying what to install, while the CSV functions work without it.
"""

from __future__ import annotations

import csv
import math
import numbers
import re
from collections.abc import Mapping, Sequence

from ._io import atomic_write
from .nas.nb201_arch import parse_nb201

__all__ = [
    "ReportError",
    "plot_arch_weights",
    "draw_darts_cell",
    "draw_nb201_cell",
    "plot_curves",
    "arch_weights_figure",
    "darts_cell_figure",
    "nb201_cell_figure",
    "curves_figure",
    "write_csv",
    "read_csv",
]

_MIN_MATPLOTLIB = (3, 7)  # 'outside' legend locations with the constrained layout
_DPI = 120


class ReportError(RuntimeError):
    """A picture cannot be drawn because matplotlib is missing or too old."""


# --------------------------------------------------------------------------- writing files




def write_csv(path, rows: list[dict]) -> None:
    """Write ``rows`` (dicts of column -> value) as a CSV file, atomically.

    The header is the union of the rows' keys in first-seen order; a row without a column gets an
    empty cell there; None is written as an empty cell too."""
    if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)):
        raise ValueError(f"rows: expected a list of dicts, got {type(rows).__name__}")
    header: dict[str, None] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"rows[{i}]: expected a dict of column -> value, got {type(row).__name__}")
        for key in row:
            if not isinstance(key, str) or not key:
                raise ValueError(f"rows[{i}]: column names must be non-empty strings, got {key!r}")
            header.setdefault(key)

    def write(f):
        w = csv.DictWriter(f, fieldnames=list(header), lineterminator="\n")
        if header:
            w.writeheader()
        for row in rows:
            w.writerow({k: "" if v is None else v for k, v in row.items()})

    atomic_write(path, write, text=True)


_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*([eE][+-]?[0-9]+)?|\.[0-9]+([eE][+-]?[0-9]+)?|nan|inf)")


def _cell(text: str):
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    return text


def read_csv(path) -> list[dict]:
    """Read a CSV written by ``write_csv``: cells that spell an integer come back as int, other
    numbers (nan and inf included) as float, the rest as str; empty cells are left out of the row
    dict, so a column that only later rows have is absent from the earlier ones."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: _cell(v) for k, v in row.items() if v not in ("", None) and k is not None}
                for row in csv.DictReader(f)]


# --------------------------------------------------------------------------- matplotlib


def _matplotlib():
    """matplotlib, checked: a ReportError saying what to install when it is missing or too old.
    Every drawing path goes through here before it touches matplotlib."""
    try:
        import matplotlib
    except ImportError as e:
        raise ReportError(
            "drawing the run's pictures needs matplotlib: pip install 'matplotlib>=3.7' "
            "(a declared dependency of toponas_kernels; reinstall the package to get it)"
        ) from e
    if tuple(matplotlib.__version_info__[:2]) < _MIN_MATPLOTLIB:
        raise ReportError(f"drawing the run's pictures needs matplotlib >= 3.7, found {matplotlib.__version__}: "
                          "pip install -U matplotlib")
    return matplotlib


def _figure(width: float, height: float):
    """A Figure on its own Agg canvas (no pyplot: nothing global keeps it alive)."""
    _matplotlib()
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # a broken or partial matplotlib
        raise ReportError(f"drawing the run's pictures needs matplotlib: pip install 'matplotlib>=3.7' ({e})") from e

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def draw_pictures(drawings, log) -> list[str]:
    """Run each ``drawing()`` (a callable that writes one picture and returns its path); a picture
    that cannot be drawn, for whatever reason, costs one line through ``log`` and never the run:
    a run's results are written before its pictures. Returns the paths drawn."""
    done = []
    for draw in drawings:
        try:
            done.append(draw())
        except ReportError as exc:
            log(f"no pictures: {exc}")
            return done  # matplotlib is missing or too old: the next ones would say the same
        except Exception as exc:  # a picture is never worth a run: one line, and go on
            log(f"a picture was not drawn ({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})")
    return done


def _save(fig, path, *, crop: bool = False) -> str:
    # crop: trim the margins (the cell drawings' equal-aspect axes leave some); it draws the
    # figure twice, so the plots, already fitted by the constrained layout, skip it
    extra = dict(bbox_inches="tight", pad_inches=0.15) if crop else {}
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=_DPI, facecolor="white", **extra),
                        text=False)


def _op_colors(n: int) -> list:
    _matplotlib()
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _number(v) -> float | None:
    """v as a finite float, or None when it is missing, not a number, NaN or infinite."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, str):
        v = _cell(v.strip())
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # numpy / torch scalars
        v = v.item()
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    return None


# --------------------------------------------------------------------------- architecture weights


def _epoch_axis(ax, xs: list[float]) -> None:
    """Integer ticks for integer x (epochs), and a visible range around a single x."""
    _matplotlib()
    from matplotlib.ticker import MaxNLocator

    if xs and all(float(v).is_integer() for v in xs):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if xs and min(xs) == max(xs):
        ax.set_xlim(xs[0] - 1, xs[0] + 1)


def _as_list(v):
    return v.tolist() if hasattr(v, "tolist") else v


def _weights(value, where: str) -> list:
    """A param's weights as [edges][ops] or [edges] floats; ValueError naming ``where`` otherwise."""
    value = _as_list(value)
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) == 0:
        raise ValueError(f"{where}: expected a non-empty list [num_edges][num_ops] (or [num_edges]) of numbers")
    if all(isinstance(_as_list(r), Sequence) and not isinstance(r, str) for r in value):
        rows = [list(_as_list(r)) for r in value]
        if any(len(r) != len(rows[0]) or not r for r in rows):
            raise ValueError(f"{where}: rows of different lengths {[len(r) for r in rows]}; expected one per edge, "
                             "each with one weight per op")
        flat = [x for r in rows for x in r]
    else:
        rows, flat = list(value), list(value)
    for x in flat:
        if isinstance(x, bool) or not isinstance(_as_list(x), (int, float)):
            raise ValueError(f"{where}: expected numbers, got {x!r}")
    return [[float(x) for x in r] for r in rows] if isinstance(rows[0], list) else [float(x) for x in rows]


def _shape(w: list) -> tuple:
    return (len(w), len(w[0])) if isinstance(w[0], list) else (len(w),)


def _default_edge_labels(num_edges: int) -> list[str]:
    """'i<-j' labels: DARTS-style cells (two inputs 0, 1; node 2+i reads 0..1+i) have
    2, 5, 9, 14, ... edges, NB201-style cells (one input 0; node i reads 0..i-1) 1, 3, 6, 10, ...;
    the two sequences never meet. Any other count gets 'edge k'."""
    for first_node in (2, 1):
        labels, node = [], first_node
        while len(labels) < num_edges:
            labels += [f"{node}<-{j}" for j in range(node)]
            node += 1
        if len(labels) == num_edges:
            return labels
    return [f"edge {k}" for k in range(num_edges)]


def _edge_rows(labels: list[str]) -> list[list[int]]:
    """Panels grouped one row per target node when the labels say 'i<-j', else rows of 5."""
    targets = [lab.split("<-")[0] if "<-" in lab else None for lab in labels]
    if None not in targets:
        rows: dict[str, list[int]] = {}
        for k, t in enumerate(targets):
            rows.setdefault(t, []).append(k)
        if max(len(r) for r in rows.values()) <= 6:
            return list(rows.values())
    return [list(range(k, min(k + 5, len(labels)))) for k in range(0, len(labels), 5)]


def arch_weights_figure(history, op_names, *, title="", edge_labels=None):
    """``plot_arch_weights``' picture as a matplotlib ``Figure`` (to show in a notebook or
    draw further), nothing written."""
    if not isinstance(history, Sequence) or isinstance(history, str) or not history:
        raise ValueError("history: expected a non-empty list with one dict {param_name: weights} per epoch")
    if (not isinstance(op_names, Sequence) or isinstance(op_names, str) or not op_names
            or not all(isinstance(o, str) and o for o in op_names)):
        raise ValueError(f"op_names: expected a non-empty list of op names (str), got {op_names!r}")
    if len(set(op_names)) != len(op_names):
        raise ValueError(f"op_names: names must be distinct, got {list(op_names)}")
    if not isinstance(history[0], Mapping) or not history[0]:
        raise ValueError("history[0]: expected a non-empty dict {param_name: weights}")
    params = list(history[0])
    series: dict[str, list] = {p: [] for p in params}  # param -> per-epoch weights
    for e, epoch in enumerate(history):
        if not isinstance(epoch, Mapping) or set(epoch) != set(params):
            got = list(epoch) if isinstance(epoch, Mapping) else type(epoch).__name__
            raise ValueError(f"history[{e}]: expected a dict with the params of history[0] {params}, got {got}")
        for p in params:
            w = _weights(epoch[p], f"history[{e}][{p!r}]")
            if e == 0 and len(_shape(w)) == 2 and _shape(w)[1] != len(op_names):
                raise ValueError(f"op_names: {p!r} has {_shape(w)[1]} ops per edge but op_names lists "
                                 f"{len(op_names)}: {list(op_names)}")
            if e and _shape(w) != _shape(series[p][0]):
                raise ValueError(f"history[{e}][{p!r}]: shape {list(_shape(w))} differs from epoch 0's "
                                 f"{list(_shape(series[p][0]))}")
            series[p].append(w)
    edge_labels = dict(edge_labels or {})
    for p, labels in edge_labels.items():
        if p not in series:
            raise ValueError(f"edge_labels: {p!r} is not a param of history (params: {params})")
        if len(labels) != _shape(series[p][0])[0]:
            raise ValueError(f"edge_labels[{p!r}]: expected {_shape(series[p][0])[0]} labels (one per edge), "
                             f"got {len(labels)}")

    epochs = list(range(len(history)))
    marker = "o" if len(epochs) <= 20 else None
    colors = _op_colors(len(op_names))
    layout = {}  # param -> panel rows
    for p in params:
        n = _shape(series[p][0])[0]
        labels = [str(s) for s in edge_labels.get(p) or _default_edge_labels(n)]
        edge_labels[p] = labels
        layout[p] = _edge_rows(labels) if len(_shape(series[p][0])) == 2 else [[0]]
    ncols = max(len(r) for rows in layout.values() for r in rows)
    heights = [len(layout[p]) + 0.4 for p in params]
    fig = _figure(max(2.3 * ncols, 6.0), 1.7 * sum(heights) + 0.8)
    subfigs = fig.subfigures(len(params), 1, height_ratios=heights, squeeze=False)[:, 0]
    for sub, p in zip(subfigs, params):
        sub.suptitle(p, fontsize=11, fontweight="bold")
        data, labels = series[p], edge_labels[p]
        axes = sub.subplots(len(layout[p]), ncols, squeeze=False, sharex=True, sharey=True)
        for ax in axes.flat:
            ax.set_visible(False)
        if len(_shape(data[0])) == 1:  # per-edge weights (e.g. betas): one panel, one line per edge
            ax = axes[0, 0]
            ax.set_visible(True)
            edge_colors = _op_colors(len(labels))
            for k, lab in enumerate(labels):
                ax.plot(epochs, [w[k] for w in data], marker=marker, ms=3, lw=1.2, color=edge_colors[k], label=lab)
            ax.set_xlabel("epoch", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            _epoch_axis(ax, epochs)
            ax.legend(fontsize=6, ncols=2 if len(labels) > 6 else 1, loc="upper left",
                      bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
            continue
        for r, row in enumerate(layout[p]):
            for c, k in enumerate(row):
                ax = axes[r, c]
                ax.set_visible(True)
                for o in range(len(op_names)):
                    ax.plot(epochs, [w[k][o] for w in data], marker=marker, ms=3, lw=1.2, color=colors[o])
                ax.set_title(labels[k], fontsize=8, pad=2)
                ax.tick_params(labelsize=7)
                ax.grid(alpha=0.3)
                _epoch_axis(ax, epochs)
        for ax in axes[-1]:
            ax.set_xlabel("epoch", fontsize=8)
            ax.xaxis.set_tick_params(labelbottom=True)
    if any(len(_shape(series[p][0])) == 2 for p in params):
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=colors[o], marker=marker, ms=4, lw=2) for o in range(len(op_names))]
        fig.legend(handles, list(op_names), loc="outside lower center", ncols=min(len(op_names), 8), fontsize=8)
    fig.suptitle(title or "architecture weights (softmax) per edge", fontsize=12)
    return fig


def plot_arch_weights(history: list[dict[str, list[list[float]]]], op_names: list[str], path, *, title: str = "",
                      edge_labels: dict[str, list[str]] | None = None) -> str:
    """Plot how each edge's softmaxed architecture weights move over the epochs; returns ``path``.

    ``history[e]`` maps each param name (``alphas_normal``, ``alphas_reduce``, ``alphas``...) to
    its weights after epoch ``e``: ``[num_edges][num_ops]`` (one column per entry of ``op_names``)
    or ``[num_edges]`` (per-edge weights such as PC-DARTS' betas, drawn as one panel with a line
    per edge). Each 2-D param gets a grid of panels, one per edge, one row per target node when
    the edge count matches a DARTS (2 inputs) or NB201 (1 input) cell, labelled ``i<-j`` unless
    ``edge_labels[param]`` gives the labels; every op keeps one colour in all panels."""
    return _save(arch_weights_figure(history, op_names, title=title, edge_labels=edge_labels), path)


# --------------------------------------------------------------------------- cell drawings

_NODE_W, _NODE_H = 0.9, 0.46  # node ellipse size, in data units
_UNIT_IN = 1.0  # inches per data unit (equal aspect), used to estimate label sizes
_LABEL_PT = 7.5
_RADS = (0.0, 0.25, -0.25, 0.45, -0.45, 0.65, -0.65, 0.85, -0.85)


def _label_box(text: str) -> tuple[float, float]:
    """Rough width and height of an edge label, in data units."""
    char_in = 0.55 * _LABEL_PT / 72
    return (len(text) * char_in + 0.12) / _UNIT_IN, (1.5 * _LABEL_PT / 72 + 0.06) / _UNIT_IN


def _control(p, q, rad: float):
    """The control point of matplotlib's "arc3" connection style (the same in data and display
    coordinates when the axes have an equal aspect)."""
    return (p[0] + q[0]) / 2 + rad * (q[1] - p[1]), (p[1] + q[1]) / 2 - rad * (q[0] - p[0])


def _bezier(p, q, rad: float, t: float):
    cx, cy = _control(p, q, rad)
    return ((1 - t) ** 2 * p[0] + 2 * (1 - t) * t * cx + t * t * q[0],
            (1 - t) ** 2 * p[1] + 2 * (1 - t) * t * cy + t * t * q[1])


def _angle(p, q, rad: float, t: float) -> float:
    """Direction of the curve at t in degrees, turned to read left to right (-90, 90]."""
    cx, cy = _control(p, q, rad)
    dx = (1 - t) * (cx - p[0]) + t * (q[0] - cx)
    dy = (1 - t) * (cy - p[1]) + t * (q[1] - cy)
    a = math.degrees(math.atan2(dy, dx))
    return a - 180 if a > 90 else a + 180 if a <= -90 else a


def _rotated(size, angle: float) -> tuple[float, float]:
    """Width and height of the upright box around a label box turned by ``angle`` degrees."""
    w, h = size
    c, s = abs(math.cos(math.radians(angle))), abs(math.sin(math.radians(angle)))
    return w * c + h * s, w * s + h * c


def _route(p, q, others, labels, label_size):
    """Where an edge p -> q goes: (arc3 curvature, label position t along the curve). The
    straightest curve that keeps clear of the other nodes and has a spot for its label that
    covers no node and no label placed before; failing that, the one with the fewest clashes."""
    best = None
    a, b = _NODE_W / 2 + 0.1, _NODE_H / 2 + 0.1
    for rad in _RADS:
        pts = [_bezier(p, q, rad, t / 20) for t in range(2, 19)]
        gap = min((math.hypot((x - nx) / a, (y - ny) / b) - 1 for x, y in pts for nx, ny in others), default=1.0)
        for t in (0.5, 0.4, 0.6, 0.3, 0.7) if label_size is not None else (0.5,):
            clashes = 0
            if label_size is not None:
                mx, my = _bezier(p, q, rad, t)
                w, h = _rotated(label_size, _angle(p, q, rad, t))
                boxes = labels + [(nx, ny, _NODE_W - 0.2, _NODE_H - 0.1) for nx, ny in [p, q, *others]]
                clashes = sum(abs(mx - lx) < (w + lw) / 2 and abs(my - ly) < (h + lh) / 2 for lx, ly, lw, lh in boxes)
            if gap > 0 and clashes == 0:
                return rad, t
            score = (gap > 0, -clashes, gap)
            if best is None or score > best[0]:
                best = (score, (rad, t))
    return best[1]


def _draw_graph(ax, nodes: dict, edges: list, outputs: list, title: str):
    """Draw a DAG on ``ax``: nodes {key: (x, y, text, colour)}, labelled edges
    [(src, dst, op)] routed shortest first, then unlabelled grey ``outputs`` [(src, dst)]."""
    from matplotlib.patches import Ellipse, FancyArrowPatch

    patches = {}
    for key, (x, y, text, color) in nodes.items():
        patches[key] = Ellipse((x, y), _NODE_W, _NODE_H, facecolor=color, edgecolor="black", lw=1, zorder=3)
        ax.add_patch(patches[key])
        ax.text(x, y, text, ha="center", va="center", fontsize=10, zorder=4)
    xs = [x for x, *_ in nodes.values()]
    ys = [y for _, y, *_ in nodes.values()]
    bounds = [min(xs) - _NODE_W / 2, max(xs) + _NODE_W / 2, min(ys) - _NODE_H / 2, max(ys) + _NODE_H / 2]
    placed = []  # label boxes (x, y, w, h)
    # short edges first: they stay straight, the long ones bend around them
    todo = sorted(edges, key=lambda e: abs(nodes[e[1]][0] - nodes[e[0]][0])) + [(s, d, None) for s, d in outputs]
    for src, dst, op in todo:
        p, q = nodes[src][:2], nodes[dst][:2]
        others = [v[:2] for key, v in nodes.items() if key not in (src, dst)]
        size = _label_box(op) if op is not None else None
        rad, t_label = _route(p, q, others, placed, size)
        none = op == "none"
        style = dict(color="0.6" if none or op is None else "0.15", lw=1.0 if op is None else 1.3,
                     linestyle="--" if none else "-")
        ax.add_patch(FancyArrowPatch(p, q, connectionstyle=f"arc3,rad={rad}", arrowstyle="-|>", mutation_scale=11,
                                     patchA=patches[src], patchB=patches[dst], zorder=2, **style))
        for t in range(11):
            x, y = _bezier(p, q, rad, t / 10)
            bounds = [min(bounds[0], x), max(bounds[1], x), min(bounds[2], y), max(bounds[3], y)]
        if op is not None:
            mx, my = _bezier(p, q, rad, t_label)
            angle = _angle(p, q, rad, t_label)
            size = _rotated(size, angle)
            placed.append((mx, my, *size))
            ax.text(mx, my, op, ha="center", va="center", fontsize=_LABEL_PT, zorder=5, rotation=angle,
                    rotation_mode="anchor",
                    color="0.45" if none else "black",
                    bbox=dict(boxstyle="round,pad=0.2", facecolor="white", edgecolor="0.75" if none else "0.5", lw=0.6))
            bounds = [min(bounds[0], mx - size[0] / 2), max(bounds[1], mx + size[0] / 2),
                      min(bounds[2], my - size[1] / 2), max(bounds[3], my + size[1] / 2)]
    ax.set_xlim(bounds[0] - 0.15, bounds[1] + 0.15)
    ax.set_ylim(bounds[2] - 0.15, bounds[3] + 0.15)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title, fontsize=11)
    return bounds[1] - bounds[0] + 0.3, bounds[3] - bounds[2] + 0.3


def _is_index(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _genes(genotype, key: str) -> tuple[list[tuple[str, int]], list[int]]:
    """The (op, input) genes and the concat list of one cell, checked."""
    genes = genotype.get(key)
    if not isinstance(genes, Sequence) or isinstance(genes, str) or not genes or len(genes) % 2:
        raise ValueError(f"genotype[{key!r}]: expected a non-empty list of [op, input] pairs, two per node "
                         f"(an even count), got {genes!r}")
    steps = len(genes) // 2
    out = []
    for g, gene in enumerate(genes):
        node = g // 2
        if (not isinstance(gene, Sequence) or isinstance(gene, str) or len(gene) != 2
                or not isinstance(gene[0], str) or not gene[0] or not _is_index(gene[1])):
            raise ValueError(f"genotype[{key!r}][{g}]: expected [op name, input index], got {gene!r}")
        if not 0 <= gene[1] < 2 + node:
            raise ValueError(f"genotype[{key!r}][{g}]: intermediate node {node} can read inputs 0..{1 + node} "
                             f"(0 = c_{{k-2}}, 1 = c_{{k-1}}, j >= 2 = node j-2), got input {gene[1]}"
                             + (" (a later node)" if gene[1] >= 2 + node else ""))
        out.append((gene[0], int(gene[1])))
    concat_key = key + "_concat"
    concat = genotype.get(concat_key, list(range(2, 2 + steps)))
    concat = list(_as_list(concat)) if isinstance(_as_list(concat), (Sequence, range)) else concat
    if (not isinstance(concat, list) or not concat or len(set(concat)) != len(concat)
            or not all(_is_index(c) and 0 <= c < 2 + steps for c in concat)):
        raise ValueError(f"genotype[{concat_key!r}]: expected distinct node indices in 0..{1 + steps}, got {concat!r}")
    return out, [int(c) for c in concat]


def darts_cell_figure(genotype, *, title=""):
    """``draw_darts_cell``'s picture as a matplotlib ``Figure``, nothing written."""
    if hasattr(genotype, "_asdict"):  # the Genotype namedtuple
        genotype = genotype._asdict()
    if not isinstance(genotype, Mapping):
        raise ValueError(f"genotype: expected a dict with 'normal', 'normal_concat', 'reduce', 'reduce_concat', "
                         f"got {type(genotype).__name__}")
    cells = [(key, *_genes(genotype, key)) for key in ("normal", "reduce")]
    fig = _figure(8, 3)  # resized below once the layouts' extents are known
    axes = fig.subplots(1, 2, squeeze=True)
    sizes = []
    for ax, (key, genes, concat) in zip(axes, cells):
        steps = len(genes) // 2
        dx = 1.7
        nodes = {0: (0.0, 0.9, "$c_{k-2}$", "#c8e6c9"), 1: (0.0, -0.9, "$c_{k-1}$", "#c8e6c9")}
        for i in range(steps):
            nodes[2 + i] = (dx * (i + 1), 0.55 if i % 2 == 0 else -0.55, str(i), "#bbdefb")
        nodes["out"] = (dx * (steps + 1), 0.0, "$c_{k}$", "#fff59d")
        edges = [(j, 2 + g // 2, op) for g, (op, j) in enumerate(genes)]
        name = "normal cell" if key == "normal" else "reduction cell"
        sizes.append(_draw_graph(ax, nodes, edges, [(c, "out") for c in concat], name))
    fig.set_size_inches(max(sum(w for w, _ in sizes) * _UNIT_IN + 0.6, 6), max(h for _, h in sizes) * _UNIT_IN + 0.9)
    if title:
        fig.suptitle(title, fontsize=12)
    return fig


def draw_darts_cell(genotype: dict, path, *, title: str = "") -> str:
    """Draw a DARTS genotype's normal and reduction cells side by side; returns ``path``.

    ``genotype`` is a dict (or the ``Genotype`` namedtuple) with ``normal`` / ``reduce`` lists of
    ``[op, input]`` genes, node i's two genes at positions 2i and 2i+1 (any number of nodes), input
    0 = c_{k-2}, 1 = c_{k-1}, j >= 2 = intermediate node j-2; ``normal_concat`` / ``reduce_concat``
    name the nodes the output c_{k} concatenates (all intermediate nodes when absent). Every op
    edge carries its op's name; 'none' edges are drawn dashed grey, the concat edges plain grey."""
    return _save(darts_cell_figure(genotype, title=title), path, crop=True)


def nb201_cell_figure(arch: str, *, title=""):
    """``draw_nb201_cell``'s picture as a matplotlib ``Figure``, nothing written."""
    groups = parse_nb201(arch)
    nodes = {i: (1.9 * i, 0.0, str(i), "#c8e6c9" if i == 0 else "#fff59d" if i == len(groups) else "#bbdefb")
             for i in range(len(groups) + 1)}
    edges = [(j, i + 1, op) for i, group in enumerate(groups) for op, j in group]
    fig = _figure(6, 3)
    ax = fig.subplots()
    w, h = _draw_graph(ax, nodes, edges, [], "NAS-Bench-201 cell")
    fig.set_size_inches(max(w * _UNIT_IN + 0.4, 4), h * _UNIT_IN + (1.2 if title else 0.8))
    if title:
        fig.suptitle(title, fontsize=12)
    return fig


def draw_nb201_cell(arch: str, path, *, title: str = "") -> str:
    """Draw a NAS-Bench-201 cell (nodes 0..3 left to right, edge j -> i labelled with its op; 'none'
    edges are drawn dashed grey, with their label, not left out); returns ``path``."""
    return _save(nb201_cell_figure(arch, title=title), path, crop=True)


# --------------------------------------------------------------------------- learning curves


def _default_groups(columns: list[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for c in columns:
        low = c.lower()
        if "loss" in low:
            key = "loss"
        elif "acc" in low:
            key = "accuracy"
        elif low in ("lr", "tau") or low.startswith(("lr_", "tau_")) or low.endswith(("_lr", "_tau")):
            key = "tau" if "tau" in low else "lr"
        else:
            key = c
        groups.setdefault(key, []).append(c)
    return groups


def curves_figure(rows, *, x="epoch", groups=None, title=""):
    """``plot_curves``' picture as a matplotlib ``Figure``, nothing written."""
    if not isinstance(rows, Sequence) or isinstance(rows, str) or not rows:
        raise ValueError("rows: expected a non-empty list of dicts (one per epoch)")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"rows[{i}]: expected a dict of column -> value, got {type(row).__name__}")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    numeric = [c for c in columns if c != x and any(_number(row.get(c)) is not None for row in rows)]
    if groups is None:
        groups = _default_groups(numeric)
    else:
        if not isinstance(groups, Mapping) or not groups:
            raise ValueError(f"groups: expected a non-empty dict of panel title -> column names, got {groups!r}")
        for name, cols in groups.items():
            if isinstance(cols, str) or not isinstance(cols, Sequence) or not cols:
                raise ValueError(f"groups[{name!r}]: expected a non-empty list of column names, got {cols!r}")
            missing = [c for c in cols if c not in numeric]
            if missing:
                raise ValueError(f"groups[{name!r}]: no row has a number in column(s) {missing} "
                                 f"(numeric columns: {numeric})")
    if not groups:
        raise ValueError(f"rows: no numeric column to plot besides {x!r} (columns: {columns})")
    has_x = any(_number(row.get(x)) is not None for row in rows)
    xs = [_number(row.get(x)) if has_x else float(i) for i, row in enumerate(rows)]
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig = _figure(4.2 * ncols, 3.0 * nrows + 0.5)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for ax, (name, cols) in zip(axes.flat, groups.items()):
        for c in cols:
            pts = [(xv, _number(row.get(c))) for xv, row in zip(xs, rows)]
            pts = [(a, b) for a, b in pts if a is not None and b is not None]
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o" if len(pts) <= 20 else None, ms=3.5,
                    lw=1.4, label=c)
        ax.set_title(name, fontsize=10)
        _epoch_axis(ax, [v for v in xs if v is not None])
        ax.set_xlabel(x if has_x else "row", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=12)
    return fig


def plot_curves(rows: list[dict], path, *, x: str = "epoch", groups: dict[str, list[str]] | None = None,
                title: str = "") -> str:
    """Plot learning curves from per-epoch rows (e.g. ``read_csv``'s), one panel per group of
    columns against column ``x`` (the row number when no row has ``x``); returns ``path``.

    By default columns are grouped as 'loss' (names containing 'loss'), 'accuracy' ('acc'), 'lr',
    'tau', and every other numeric column on a panel of its own. Missing, non-numeric and
    non-finite values are skipped point by point; one row is enough (drawn as markers)."""
    return _save(curves_figure(rows, x=x, groups=groups, title=title), path)
