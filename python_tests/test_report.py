"""The run's reports (toponas_kernels/report.py): every picture is a readable PNG with every op
label placed, the CSV round-trips, writes are atomic, bad input is refused by name, and a
missing matplotlib gives ReportError while the package still imports."""

import gc
import json
import math
import os
import random
import subprocess
import sys
from collections import Counter

import pytest

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import FancyArrowPatch  # noqa: E402

from toponas_kernels import report as R  # noqa: E402
from toponas_kernels.nas.nb201_arch import parse_nb201  # noqa: E402
from toponas_kernels.nas.networks import Genotype  # noqa: E402
from toponas_kernels.nas.spaces import DARTS_PRIMITIVES, NB201_PRIMITIVES  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Liu et al., DARTS (second order), the published CIFAR-10 cell
DARTS_V2 = {
    "normal": [["sep_conv_3x3", 0], ["sep_conv_3x3", 1], ["sep_conv_3x3", 0], ["sep_conv_3x3", 1],
               ["sep_conv_3x3", 1], ["skip_connect", 0], ["skip_connect", 0], ["dil_conv_3x3", 2]],
    "normal_concat": [2, 3, 4, 5],
    "reduce": [["max_pool_3x3", 0], ["max_pool_3x3", 1], ["skip_connect", 2], ["max_pool_3x3", 1],
               ["max_pool_3x3", 0], ["skip_connect", 2], ["skip_connect", 2], ["max_pool_3x3", 1]],
    "reduce_concat": [2, 3, 4, 5],
}

NB201_ARCHS = [
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|none~2|",
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|",
    "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|",
    "|avg_pool_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|nor_conv_1x1~0|skip_connect~1|skip_connect~2|",
]


def assert_png(path, min_w=300, min_h=150):
    """A PNG by its signature that matplotlib reads back at a plausible size, with something drawn."""
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE, f"{path} is not a PNG"
    img = matplotlib.image.imread(path)
    h, w = img.shape[:2]
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert min_w <= w <= 6000 and min_h <= h <= 6000, f"{path}: {w}x{h} pixels"
    rgb = img[..., :3]
    assert (rgb < 0.5).mean() > 0.002, f"{path} is almost blank"
    assert (rgb > 0.9).mean() > 0.3, f"{path} has no white background"
    return w, h


def texts(fig):
    return [t.get_text() for t in fig.findobj(matplotlib.text.Text) if t.get_text()]


def softmax(v):
    m = max(v)
    e = [math.exp(x - m) for x in v]
    return [x / sum(e) for x in e]


def darts_history(epochs, n_ops=8, seed=0):
    rnd = random.Random(seed)
    drift = [[rnd.gauss(0, 1) for _ in range(n_ops)] for _ in range(14)]
    return [{"alphas_normal": [softmax([0.3 * e * d for d in row]) for row in drift],
             "alphas_reduce": [softmax([-0.2 * e * d for d in row]) for row in drift],
             "betas_normal": softmax([0.1 * e * row[0] for row in drift])} for e in range(epochs)]


def no_temp_files(folder):
    left = [n for n in os.listdir(folder) if n.endswith(".tmp")]
    assert not left, f"temporary files left behind: {left}"


# --------------------------------------------------------------------------- architecture weights


def test_default_edge_labels_darts_nb201_other():
    darts = R._default_edge_labels(14)
    assert darts[:3] == ["2<-0", "2<-1", "3<-0"] and darts[-1] == "5<-4"
    assert R._default_edge_labels(6) == ["1<-0", "2<-0", "2<-1", "3<-0", "3<-1", "3<-2"]
    assert R._default_edge_labels(7) == [f"edge {k}" for k in range(7)]


@pytest.mark.parametrize("epochs", [1, 12])
def test_plot_arch_weights_darts(tmp_path, epochs):
    history = darts_history(epochs)
    fig = R.arch_weights_figure(history, list(DARTS_PRIMITIVES), title="search")
    t = texts(fig)
    for label in R._default_edge_labels(14):  # one panel per edge, in each of the two alpha grids
        assert t.count(label) >= 2, label
    assert "alphas_normal" in t and "alphas_reduce" in t and "betas_normal" in t
    assert len(fig.legends) == 1
    assert [x.get_text() for x in fig.legends[0].get_texts()] == list(DARTS_PRIMITIVES)
    # every op of every edge is one line with one point per epoch, coloured as in the legend
    panel = next(ax for ax in fig.findobj(matplotlib.axes.Axes) if ax.get_title() == "4<-2")
    lines = panel.get_lines()
    assert len(lines) == 8 and all(len(line.get_xdata()) == epochs for line in lines)
    legend_colors = [h.get_color() for h in fig.legends[0].legend_handles]
    assert [line.get_color() for line in lines] == legend_colors
    assert [line.get_ydata()[-1] for line in lines] == pytest.approx(history[-1]["alphas_normal"][7])
    assert all(line.get_marker() == "o" for line in lines) == (epochs <= 20)  # a single epoch shows
    if epochs == 1:
        return
    path = R.plot_arch_weights(history, list(DARTS_PRIMITIVES), tmp_path / "w" / "arch.png", title="search")
    assert path == os.fspath(tmp_path / "w" / "arch.png")
    assert_png(path, min_w=600, min_h=800)
    no_temp_files(tmp_path / "w")


def test_plot_arch_weights_nb201_edge_labels(tmp_path):
    rnd = random.Random(1)
    history = [{"alphas": [softmax([rnd.random() for _ in NB201_PRIMITIVES]) for _ in range(6)]} for _ in range(3)]
    labels = [f"edge{k}" for k in range(6)]
    fig = R.arch_weights_figure(history, list(NB201_PRIMITIVES), edge_labels={"alphas": labels})
    assert all(texts(fig).count(lab) == 1 for lab in labels)
    assert_png(R.plot_arch_weights(history, list(NB201_PRIMITIVES), tmp_path / "nb.png"))


def test_plot_arch_weights_takes_tensors():
    import torch

    history = [{"alphas": torch.softmax(torch.randn(6, 5), -1), "betas": torch.softmax(torch.randn(6), -1)}
               for _ in range(2)]
    fig = R.arch_weights_figure(history, list(NB201_PRIMITIVES))
    panel = next(ax for ax in fig.findobj(matplotlib.axes.Axes) if ax.get_title() == "3<-1")
    assert [line.get_ydata()[1] for line in panel.get_lines()] == pytest.approx(history[1]["alphas"][4].tolist())
    betas = next(ax for ax in fig.findobj(matplotlib.axes.Axes) if len(ax.get_lines()) == 6 and not ax.get_title())
    assert [line.get_label() for line in betas.get_lines()] == R._default_edge_labels(6)


def test_plot_arch_weights_errors(tmp_path):
    ops = list(DARTS_PRIMITIVES)
    good = darts_history(3)
    with pytest.raises(ValueError, match="op_names.*8 ops per edge.*7"):
        R.plot_arch_weights(good, ops[:7], tmp_path / "a.png")
    bad = darts_history(3)
    bad[2]["alphas_normal"] = bad[2]["alphas_normal"][:13]
    with pytest.raises(ValueError, match=r"history\[2\]\['alphas_normal'\].*\[13, 8\].*\[14, 8\]"):
        R.plot_arch_weights(bad, ops, tmp_path / "a.png")
    bad = darts_history(3)
    del bad[1]["alphas_reduce"]
    with pytest.raises(ValueError, match=r"history\[1\]: expected a dict with the params"):
        R.plot_arch_weights(bad, ops, tmp_path / "a.png")
    bad = darts_history(2)
    bad[1]["alphas_normal"][3] = bad[1]["alphas_normal"][3][:5]
    with pytest.raises(ValueError, match=r"history\[1\]\['alphas_normal'\]: rows of different lengths"):
        R.plot_arch_weights(bad, ops, tmp_path / "a.png")
    bad = darts_history(2)
    bad[0]["alphas_normal"][0][0] = "x"
    with pytest.raises(ValueError, match=r"history\[0\]\['alphas_normal'\]: expected numbers"):
        R.plot_arch_weights(bad, ops, tmp_path / "a.png")
    with pytest.raises(ValueError, match="history: expected a non-empty list"):
        R.plot_arch_weights([], ops, tmp_path / "a.png")
    with pytest.raises(ValueError, match="op_names: names must be distinct"):
        R.plot_arch_weights(good, ops[:7] + ["none"], tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"edge_labels\['alphas_normal'\]: expected 14 labels"):
        R.plot_arch_weights(good, ops, tmp_path / "a.png", edge_labels={"alphas_normal": ["a"]})
    with pytest.raises(ValueError, match="edge_labels: 'alphas' is not a param"):
        R.plot_arch_weights(good, ops, tmp_path / "a.png", edge_labels={"alphas": ["a"]})
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- DARTS cells


def op_label_counts(fig, names):
    return Counter(t for t in texts(fig) if t in names)


@pytest.mark.parametrize("as_namedtuple", [False, True])
def test_draw_darts_cell_v2(tmp_path, as_namedtuple):
    genotype = Genotype(**{k: [tuple(g) for g in v] if k in ("normal", "reduce") else v
                           for k, v in DARTS_V2.items()}) if as_namedtuple else DARTS_V2
    fig = R.darts_cell_figure(genotype, title="DARTS_V2")
    expected = Counter(op for key in ("normal", "reduce") for op, _ in DARTS_V2[key])
    assert op_label_counts(fig, set(DARTS_PRIMITIVES)) == expected  # every edge labelled once
    t = texts(fig)
    assert t.count("$c_{k-2}$") == 2 and t.count("$c_{k-1}$") == 2 and t.count("$c_{k}$") == 2
    assert all(t.count(str(i)) == 2 for i in range(4))
    assert "normal cell" in t and "reduction cell" in t and "DARTS_V2" in t
    arrows = fig.findobj(FancyArrowPatch)
    assert len(arrows) == 2 * (8 + 4)  # op edges plus the concat edges into c_{k}, per cell
    path = R.draw_darts_cell(genotype, tmp_path / "cells" / "genotype.png", title="DARTS_V2")
    w, h = assert_png(path, min_w=800, min_h=200)
    assert w > 2 * h  # two cells side by side


def test_draw_darts_cell_any_steps_and_default_concat(tmp_path):
    genotype = {"normal": [["skip_connect", 0], ["sep_conv_5x5", 1], ["avg_pool_3x3", 2], ["none", 0],
                           ["sep_conv_3x3", 3], ["dil_conv_5x5", 2]],
                "reduce": [["max_pool_3x3", 0], ["max_pool_3x3", 1]]}
    fig = R.darts_cell_figure(genotype)
    assert op_label_counts(fig, set(DARTS_PRIMITIVES)) == Counter(
        ["skip_connect", "sep_conv_5x5", "avg_pool_3x3", "none", "sep_conv_3x3", "dil_conv_5x5",
         "max_pool_3x3", "max_pool_3x3"])
    arrows = fig.findobj(FancyArrowPatch)
    assert len(arrows) == (6 + 3) + (2 + 1)  # concat defaults to every intermediate node
    assert sum(a.get_linestyle() == "--" for a in arrows) == 1  # the 'none' edge is dashed
    assert_png(R.draw_darts_cell(genotype, tmp_path / "g.png"), min_w=400, min_h=100)


@pytest.mark.parametrize("key, value, match", [
    ("normal", DARTS_V2["normal"][:7], r"genotype\['normal'\]: .*even count"),
    ("normal", [], r"genotype\['normal'\]: expected a non-empty list"),
    ("normal", "sep_conv_3x3", r"genotype\['normal'\]: expected a non-empty list"),
    ("normal", DARTS_V2["normal"][:2] + [["sep_conv_3x3", 0, 1], ["skip_connect", 1]],
     r"genotype\['normal'\]\[2\]: expected \[op name, input index\]"),
    ("normal", DARTS_V2["normal"][:3] + [[3, 1]], r"genotype\['normal'\]\[3\]: expected \[op name"),
    ("normal", DARTS_V2["normal"][:3] + [["skip_connect", "1"]], r"genotype\['normal'\]\[3\]: expected \[op name"),
    ("normal", DARTS_V2["normal"][:3] + [["skip_connect", True]], r"genotype\['normal'\]\[3\]: expected \[op name"),
    ("reduce", [["max_pool_3x3", 2]] + DARTS_V2["reduce"][1:],
     r"genotype\['reduce'\]\[0\]: intermediate node 0 can read inputs 0..1.*got input 2 \(a later node\)"),
    ("reduce", DARTS_V2["reduce"][:6] + [["skip_connect", 5], ["max_pool_3x3", 1]],
     r"genotype\['reduce'\]\[6\]: intermediate node 3 can read inputs 0..4.*got input 5"),
    ("reduce", [["max_pool_3x3", -1]] + DARTS_V2["reduce"][1:], r"genotype\['reduce'\]\[0\].*got input -1"),
    ("normal_concat", [2, 3, 6], r"genotype\['normal_concat'\]: expected distinct node indices in 0..5"),
    ("reduce_concat", [2, 2], r"genotype\['reduce_concat'\]: expected distinct node indices"),
    ("normal_concat", [], r"genotype\['normal_concat'\]"),
])
def test_draw_darts_cell_errors(tmp_path, key, value, match):
    genotype = {**DARTS_V2, key: value}
    with pytest.raises(ValueError, match=match):
        R.draw_darts_cell(genotype, tmp_path / "g.png")
    assert not (tmp_path / "g.png").exists()


def test_draw_darts_cell_not_a_genotype(tmp_path):
    with pytest.raises(ValueError, match="genotype: expected a dict"):
        R.draw_darts_cell([["sep_conv_3x3", 0]], tmp_path / "g.png")
    with pytest.raises(ValueError, match=r"genotype\['reduce'\]: expected a non-empty list"):
        R.draw_darts_cell({"normal": DARTS_V2["normal"]}, tmp_path / "g.png")


# --------------------------------------------------------------------------- NAS-Bench-201


def test_parse_nb201_real_strings():
    assert parse_nb201(NB201_ARCHS[0]) == [
        [("nor_conv_3x3", 0)],
        [("nor_conv_3x3", 0), ("avg_pool_3x3", 1)],
        [("skip_connect", 0), ("nor_conv_3x3", 1), ("none", 2)],
    ]
    for arch in NB201_ARCHS:
        nodes = parse_nb201(arch)
        assert [len(n) for n in nodes] == [1, 2, 3]
        assert all(op in NB201_PRIMITIVES for n in nodes for op, _ in n)
        rebuilt = "+".join("|" + "|".join(f"{op}~{j}" for op, j in n) + "|" for n in nodes)
        assert rebuilt == arch


@pytest.mark.parametrize("arch, match", [
    ("", "arch: expected a NAS-Bench-201 string"),
    (None, "arch: expected a NAS-Bench-201 string"),
    ("nor_conv_3x3~0|+|none~0|none~1|", r"node 1's part 'nor_conv_3x3~0\|'"),
    ("|nor_conv_3x3~0|+|none~0|none~1", r"node 2's part '\|none~0\|none~1'"),
    ("|nor_conv_3x3~0|+||+|none~0|", r"node 2's part '\|\|'"),
    ("|nor_conv_3x3|+|none~0|none~1|", r"node 1's entry 'nor_conv_3x3'"),
    ("|nor_conv_3x3~0|+|none~0|none~b|", r"node 2's entry 'none~b'"),
    ("|~0|+|none~0|none~1|", r"node 1's entry '~0'"),
    ("|nor_conv_3x3~0|+|none~0||", r"node 2's entry ''"),
    ("|nor_conv_3x3~1|+|none~0|none~1|", r"node 1's entry 'nor_conv_3x3~1' reads node 1"),
    ("|nor_conv_3x3~0|+|none~0|none~3|", r"node 2's entry 'none~3' reads node 3"),
    ("|nor_conv_3x3~0|+|none~0|skip_connect~0|", r"node 2 reads node 0 twice"),
])
def test_parse_nb201_errors(arch, match):
    with pytest.raises(ValueError, match=match):
        parse_nb201(arch)


@pytest.mark.parametrize("arch", NB201_ARCHS[:3])
def test_draw_nb201_cell(tmp_path, arch):
    nodes = parse_nb201(arch)
    fig = R.nb201_cell_figure(arch, title="best")
    ops = [op for n in nodes for op, _ in n]
    assert op_label_counts(fig, set(NB201_PRIMITIVES)) == Counter(ops)
    assert all(texts(fig).count(str(i)) == 1 for i in range(4))
    arrows = fig.findobj(FancyArrowPatch)
    assert len(arrows) == 6
    assert sum(a.get_linestyle() == "--" for a in arrows) == ops.count("none")
    assert_png(R.draw_nb201_cell(arch, tmp_path / "nb201.png", title="best"), min_w=400, min_h=100)


# --------------------------------------------------------------------------- learning curves


def test_default_groups():
    cols = ["train_loss", "val_loss", "train_acc", "val_acc", "test_acc", "lr", "tau", "arch_lr", "epoch_time_s"]
    assert R._default_groups(cols) == {
        "loss": ["train_loss", "val_loss"], "accuracy": ["train_acc", "val_acc", "test_acc"],
        "lr": ["lr", "arch_lr"], "tau": ["tau"], "epoch_time_s": ["epoch_time_s"],
    }


def test_plot_curves(tmp_path):
    rows = [{"epoch": e, "train_loss": 2.0 / (e + 1), "val_loss": 2.5 / (e + 1), "train_acc": 40.0 + 5 * e,
             "val_acc": 35.0 + 5 * e, "lr": 0.025 * (1 - e / 8), "genotype": "Genotype(...)"} for e in range(8)]
    rows[3]["val_acc"] = "n/a"  # skipped, not plotted as 0
    rows[5]["val_loss"] = float("nan")
    del rows[6]["val_loss"]
    rows[7]["test_acc"] = 70.5  # only the last row has it
    fig = R.curves_figure(rows, title="train")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["loss", "accuracy", "lr"]
    lines = {line.get_label(): line for ax in axes for line in ax.get_lines()}
    assert set(lines) == {"train_loss", "val_loss", "train_acc", "val_acc", "test_acc", "lr"}
    assert list(lines["val_acc"].get_xdata()) == [0, 1, 2, 4, 5, 6, 7]
    assert list(lines["val_loss"].get_xdata()) == [0, 1, 2, 3, 4, 7]
    assert list(lines["test_acc"].get_ydata()) == [70.5]
    assert all(ax.get_xlabel() == "epoch" for ax in axes)
    assert_png(R.plot_curves(rows, tmp_path / "curves.png", title="train"), min_w=600, min_h=200)
    # chosen groups, any x column
    fig = R.curves_figure(rows, x="lr", groups={"acc": ["train_acc"]})
    (ax,) = [ax for ax in fig.axes if ax.get_visible()]
    assert ax.get_xlabel() == "lr" and [line.get_label() for line in ax.get_lines()] == ["train_acc"]


def test_plot_curves_one_row_and_no_x_column(tmp_path):
    assert_png(R.plot_curves([{"epoch": 0, "train_loss": 1.5, "lr": 0.1}], tmp_path / "one.png"), min_w=400)
    fig = R.curves_figure([{"loss": 3.0}, {"loss": 2.0}, {"loss": 1.0}])
    (ax,) = [ax for ax in fig.axes if ax.get_visible()]
    assert ax.get_xlabel() == "row" and list(ax.get_lines()[0].get_xdata()) == [0, 1, 2]


def test_plot_curves_errors(tmp_path):
    rows = [{"epoch": 0, "train_loss": 1.0, "note": "warmup"}]
    with pytest.raises(ValueError, match="rows: expected a non-empty list"):
        R.plot_curves([], tmp_path / "c.png")
    with pytest.raises(ValueError, match=r"rows\[1\]: expected a dict"):
        R.plot_curves(rows + [[1, 2]], tmp_path / "c.png")
    with pytest.raises(ValueError, match=r"groups\['loss'\]: no row has a number in column\(s\) \['val_loss'\]"):
        R.plot_curves(rows, tmp_path / "c.png", groups={"loss": ["train_loss", "val_loss"]})
    with pytest.raises(ValueError, match=r"groups\['notes'\]: no row has a number in column\(s\) \['note'\]"):
        R.plot_curves(rows, tmp_path / "c.png", groups={"notes": ["note"]})
    with pytest.raises(ValueError, match=r"groups\['loss'\]: expected a non-empty list of column names"):
        R.plot_curves(rows, tmp_path / "c.png", groups={"loss": "train_loss"})
    with pytest.raises(ValueError, match="rows: no numeric column to plot besides 'epoch'"):
        R.plot_curves([{"epoch": 1, "note": "x"}], tmp_path / "c.png")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- CSV and atomic writes


def test_csv_round_trip(tmp_path):
    rows = [{"epoch": 0, "train_loss": 2.302585092994046, "genotype": "Genotype(normal=[('sep_conv_3x3', 0)])"},
            {"epoch": 1, "train_loss": 1.25, "val_acc": 41.5, "note": "a, \"quoted\"\nline"},
            {"epoch": 2, "train_loss": float("nan"), "val_acc": -3e-7, "lr": 0.025, "step": -12}]
    path = tmp_path / "sub" / "dir" / "log.csv"
    assert R.write_csv(path, rows) is None
    with open(path) as f:
        assert f.readline().strip() == "epoch,train_loss,genotype,val_acc,note,lr,step"
    back = R.read_csv(path)
    assert len(back) == 3
    assert back[0] == rows[0] and back[1] == rows[1]  # val_acc appears only from row 1 on
    assert math.isnan(back[2].pop("train_loss")) and back[2] == {k: v for k, v in rows[2].items() if k != "train_loss"}
    assert type(back[0]["epoch"]) is int and type(back[1]["train_loss"]) is float
    no_temp_files(path.parent)


def test_csv_empty_none_and_bad_rows(tmp_path):
    R.write_csv(tmp_path / "empty.csv", [])
    assert R.read_csv(tmp_path / "empty.csv") == []
    R.write_csv(tmp_path / "none.csv", [{"a": None, "b": 1}])
    assert R.read_csv(tmp_path / "none.csv") == [{"b": 1}]
    with pytest.raises(ValueError, match=r"rows\[1\]: expected a dict"):
        R.write_csv(tmp_path / "bad.csv", [{"a": 1}, (1, 2)])
    with pytest.raises(ValueError, match=r"rows\[0\]: column names must be non-empty strings"):
        R.write_csv(tmp_path / "bad.csv", [{1: 1}])
    with pytest.raises(ValueError, match="rows: expected a list of dicts"):
        R.write_csv(tmp_path / "bad.csv", {"a": 1})
    assert not (tmp_path / "bad.csv").exists()


def test_read_csv_keeps_strings_that_only_look_numeric(tmp_path):
    R.write_csv(tmp_path / "s.csv", [{"a": "1_000", "b": " 7", "c": "1e3", "d": "inf", "e": "sep_conv_3x3"}])
    assert R.read_csv(tmp_path / "s.csv") == [{"a": "1_000", "b": " 7", "c": 1000.0, "d": math.inf,
                                               "e": "sep_conv_3x3"}]


class Boom:
    def __str__(self):
        raise RuntimeError("disk full (simulated)")


def test_interrupted_csv_write_keeps_old_file(tmp_path):
    path = tmp_path / "log.csv"
    R.write_csv(path, [{"epoch": 0, "loss": 1.0}])
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="simulated"):
        R.write_csv(path, [{"epoch": 0, "loss": 0.5}] * 1000 + [{"epoch": 1, "loss": Boom()}])
    assert path.read_bytes() == before
    no_temp_files(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["log.csv"]


def test_interrupted_png_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "nb201.png"
    R.draw_nb201_cell(NB201_ARCHS[0], path)
    before = path.read_bytes()

    def broken_savefig(self, f, **kwargs):
        f.write(PNG_SIGNATURE + b"half a picture")
        raise OSError("interrupted (simulated)")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="simulated"):
        R.draw_nb201_cell(NB201_ARCHS[1], path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["nb201.png"]


def test_written_files_are_readable_by_others(tmp_path):
    R.write_csv(tmp_path / "a.csv", [{"a": 1}])
    assert os.stat(tmp_path / "a.csv").st_mode & 0o044 == 0o044


def test_figures_are_not_kept(tmp_path):
    def live_figures():
        gc.collect()
        return sum(type(o) is Figure for o in gc.get_objects())

    history = [{"alphas": [softmax([0.1 * e * k for k in range(5)])] * 6} for e in range(2)]
    R.draw_darts_cell(DARTS_V2, tmp_path / "g.png")  # warm up lazily imported modules
    start = live_figures()
    for k in range(2):
        R.draw_darts_cell(DARTS_V2, tmp_path / "g.png")
        R.draw_nb201_cell(NB201_ARCHS[k], tmp_path / "n.png")
        R.plot_arch_weights(history, list(NB201_PRIMITIVES), tmp_path / "w.png")
        R.plot_curves([{"epoch": 0, "loss": 1.0}], tmp_path / "c.png")
    assert live_figures() <= start
    if "matplotlib.pyplot" in sys.modules:  # nothing registered with pyplot either
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []
    no_temp_files(tmp_path)


# --------------------------------------------------------------------------- without matplotlib


def test_missing_matplotlib_raises_report_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    for draw in (lambda: R.draw_darts_cell(DARTS_V2, tmp_path / "g.png"),
                 lambda: R.draw_nb201_cell(NB201_ARCHS[0], tmp_path / "n.png"),
                 lambda: R.plot_arch_weights(darts_history(1), list(DARTS_PRIMITIVES), tmp_path / "w.png"),
                 lambda: R.plot_curves([{"epoch": 0, "loss": 1.0}], tmp_path / "c.png")):
        with pytest.raises(R.ReportError, match="needs matplotlib: pip install"):
            draw()
    R.write_csv(tmp_path / "log.csv", [{"epoch": 0}])  # tables need no matplotlib
    assert os.listdir(tmp_path) == ["log.csv"]


def test_package_imports_without_matplotlib():
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "import toponas_kernels.report as r\n"
            "try:\n    r.draw_nb201_cell('|none~0|', 'x.png')\n"
            "except r.ReportError as e:\n    print('ReportError:', e)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(R.__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ReportError: drawing the run's pictures needs matplotlib" in out.stdout
    assert not os.path.exists(os.path.join(root, "x.png"))


_HIDE = ("import sys, runpy; sys.modules['matplotlib'] = None; sys.modules['tqdm'] = None; "
         "sys.modules['tqdm.auto'] = None; sys.argv = ['toponas'] + sys.argv[1:]; "
         "from toponas_kernels.cli import main; raise SystemExit(main())")


@pytest.mark.parametrize("command", ["search", "train"])
def test_runs_finish_without_matplotlib_and_tqdm(tmp_path, command):
    """Pictures and progress bars are extras of a run: without matplotlib or tqdm, `toponas
    search` and `toponas train` still finish with exit 0 and their result.json, and say once, in
    one line each, what they left out (a search used to die after its work, in the drawing)."""
    out = tmp_path / command
    if command == "search":
        args = ["search", "--space", "nb201", "--method", "darts", "--dataset", "synthetic", "--epochs", "1",
                "--train-size", "16", "--batch-size", "8", "--init-channels", "4", "--layers", "1", "--device", "cpu"]
    else:
        args = ["train", "--genotype", NB201_ARCHS[0], "--dataset", "synthetic", "--epochs", "1",
                "--train-size", "16", "--test-size", "8", "--batch-size", "8", "--init-channels", "4", "--layers", "1",
                "--device", "cpu"]
    p = subprocess.run([sys.executable, "-c", _HIDE, *args, "--out", str(out)], cwd=str(tmp_path),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert json.load(open(out / "result.json"))["genotype"]
    lines = p.stderr.splitlines() + p.stdout.splitlines()
    assert sum("no pictures: drawing the run's pictures needs matplotlib" in line for line in lines) == 1
    assert sum("no progress bars: tqdm is not installed" in line for line in lines) == 1
    assert not list(out.glob("*.png"))
