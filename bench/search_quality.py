"""Search quality at a scale a CPU can run: search on NAS-Bench-201 with Fashion-MNIST, retrain
each derived cell briefly, and compare methods with and without TopoNAS over seeds.

    python bench/search_quality.py [--seeds 0,1,2] [--search-epochs 5] [--train-epochs 3] [--quick]
    python bench/search_quality.py --space darts --channels 4 --layers 3 --retrain-layers 3 ...

For darts, pc-darts, gdas and rome, each with ``--topo plain`` and ``--topo topo``, plus darts
with TopoNAS without kernel normalization (the TopoNAS paper's Table V ablation) and, where the
searcher has ``--merge``, darts with TopoNAS in the separable merge: ``toponas search`` on the
NB201 space (same data, batch and schedule for every method), then ``toponas train`` of the
derived cell. ``--space darts`` instead compares darts plain, darts with TopoNAS (exact merge)
and darts with TopoNAS in the separable merge on the DARTS space, where the separable form
changes something (NB201's convs are ReLU-Conv-BN, no depthwise + pointwise pairs). Reports
mean and standard deviation of the retrained test accuracy, the share of parameter-free
operations (skip_connect, none, avg_pool_3x3, max_pool_3x3) in the derived cells (collapse),
and the search cost, as one table in ``bench/RESULTS.md`` with device, commit, date and every
setting.

This is NOT the papers' protocol (CIFAR-10/100 and ImageNet16-120 with the NAS-Bench-201 table
look-up; CIFAR-10 on the DARTS space with 600-epoch retraining). For that, with a GPU and the
data, run for each method::

    toponas search --space nb201 --method M [--topo topo] --dataset cifar10 --data-dir DATA --epochs 50 \\
                   --out runs/M --lookup NAS-Bench-201-v1_1-096897.pth          # gdas: --epochs 250
    toponas search --space darts --method M [--topo topo] --dataset cifar10 --data-dir DATA --epochs 50 \\
                   --out runs/M-darts --then-train --train-epochs 600

The defaults are sized for about 90 minutes on one CPU core (30 runs of about 3 minutes): a
small NB201 supernet (C 8, 1 cell per stage) searched for 5 epochs on 1,024 images, and the
derived cell retrained at the same size for 3 epochs on 4,000 images. Larger settings
(``--channels 16 --layers 5 --retrain-channels 16 --retrain-layers 5``, the NB201 sizes) cost
about 10x per step on a CPU.

Every finished run is kept in ``--work`` (default ``bench/quality_runs``, not tracked) and skipped
when the script is started again, so a killed run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402
from search_cost import record, searcher_flags  # noqa: E402

PARAMETER_FREE = ("skip_connect", "none", "avg_pool_3x3", "max_pool_3x3")


SPACE_NAMES = {"nb201": "NAS-Bench-201", "darts": "DARTS"}


def configurations(merge: bool, space: str = "nb201") -> list[dict]:
    if space == "darts":  # the separable merge's cost in quality: NB201 has no depthwise + pointwise convs
        out = [{"method": "darts", "topo": "plain"}, {"method": "darts", "topo": "topo"}]
        if merge:
            out.append({"method": "darts", "topo": "topo", "merge": "separable"})
        return out
    out = [{"method": m, "topo": t} for m in ("darts", "pc-darts", "gdas", "rome") for t in ("plain", "topo")]
    out.append({"method": "darts", "topo": "topo", "kernel_norm": False})
    if merge:
        out.append({"method": "darts", "topo": "topo", "merge": "separable"})
    return out


def label(c: dict) -> str:
    parts = [c["method"], "TopoNAS" if c["topo"] == "topo" else "plain"]
    if c.get("kernel_norm") is False:
        parts.append("no kernel norm")
    if c.get("merge"):
        parts.append(f"merge {c['merge']}")
    return " / ".join(parts)


def collapse(arch) -> float:
    """Share of parameter-free operations in a cell: an NB201 string, or a DARTS genotype as
    result.json records it ({"normal": [[op, input], ...], "reduce": [...], ...})."""
    if isinstance(arch, dict):
        ops = [op for key in ("normal", "reduce") for op, _ in arch[key]]
    else:
        ops = [o.split("~")[0] for group in arch.split("+") for o in group.strip("|").split("|")]
    return sum(op in PARAMETER_FREE for op in ops) / len(ops)


def _cli(args: list[str]) -> dict:
    p = subprocess.run([sys.executable, "-m", "toponas_kernels.cli", *args], capture_output=True, text=True)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(last)
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_one(c: dict, seed: int, args, work: Path) -> dict:
    prefix = "" if args.space == "nb201" else f"{args.space}-"
    name = re.sub(r"[^a-z0-9]+", "-", f"{prefix}{label(c)}-seed{seed}".lower())
    folder = work / name
    done = folder / "row.json"
    if done.exists():
        return json.loads(done.read_text())
    common = ["--dataset", args.dataset, "--seed", str(seed), "--no-progress", "--no-plots", "--json",
              "--threads", str(args.threads), "--resume"]
    search = ["search", "--space", args.space, "--method", c["method"], "--topo", c["topo"], "--epochs", str(args.search_epochs),
              "--batch-size", str(args.batch), "--train-size", str(args.train_size), "--out", str(folder / "search"),
              "--init-channels", str(args.channels), "--layers", str(args.layers), *common]
    if c.get("kernel_norm") is False:
        search.append("--no-kernel-norm")
    if c.get("merge"):
        search += ["--merge", c["merge"]]
    s = _cli(search)
    train = ["train", "--genotype", str(folder / "search" / "result.json"), "--epochs", str(args.train_epochs),
             "--train-size", str(args.retrain_size), "--test-size", str(args.test_size), "--out", str(folder / "train"),
             "--batch-size", str(args.retrain_batch), "--init-channels", str(args.retrain_channels),
             "--layers", str(args.retrain_layers), *common]
    t = _cli(train)
    row = {**c, "label": label(c), "seed": seed, "genotype": s["genotype"], "collapse": collapse(s["genotype"]),
           "test_accuracy": t["test_accuracy"], "best_accuracy": t["best_accuracy"],
           "search_peak_bytes": s["peak_memory_bytes"], "search_step_seconds": s["step_seconds"],
           "search_seconds": s["search_seconds"], "device": s["device"]}
    done.write_text(json.dumps(row))
    return row


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for lab in dict.fromkeys(r["label"] for r in rows):
        rs = [r for r in rows if r["label"] == lab]
        acc = [r["test_accuracy"] for r in rs]
        out.append({
            "label": lab, "seeds": len(rs), "acc_mean": statistics.mean(acc),
            "acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "collapse": statistics.mean(r["collapse"] for r in rs),
            "peak_mib": statistics.mean(r["search_peak_bytes"] for r in rs) / 2**20,
            "step_s": statistics.mean(r["search_step_seconds"] for r in rs),
            "cells": [r["genotype"] for r in rs],
        })
    return out


def table(summary: list[dict]) -> str:
    lines = ["| search | seeds | retrained test acc. (%) | parameter-free ops | search peak | s / step |",
             "|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['label']} | {s['seeds']} | {s['acc_mean']:.2f} ± {s['acc_std']:.2f} | {100 * s['collapse']:.0f}% "
                     f"| {s['peak_mib']:.0f} MiB | {s['step_s']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--space", default="nb201", choices=("nb201", "darts"),
                    help="nb201 (every method) or darts (darts plain, TopoNAS exact and separable merge)")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--search-epochs", type=int, default=5)
    ap.add_argument("--train-epochs", type=int, default=3)
    ap.add_argument("--train-size", type=int, default=1024, help="training images of the search (half each for weights and architecture)")
    ap.add_argument("--batch", type=int, default=32, help="search batch size")
    ap.add_argument("--channels", type=int, default=8, help="search supernet channels C (NB201: 16)")
    ap.add_argument("--layers", type=int, default=1, help="search supernet cells per stage (NB201: 5)")
    ap.add_argument("--retrain-size", type=int, default=4000, help="training images of the retraining")
    ap.add_argument("--retrain-batch", type=int, default=64)
    ap.add_argument("--retrain-channels", type=int, default=8, help="retraining network channels (NB201: 16)")
    ap.add_argument("--retrain-layers", type=int, default=1, help="retraining network cells per stage (NB201: 5)")
    ap.add_argument("--test-size", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=str(H.REPO / "bench" / "quality_runs"))
    ap.add_argument("--only", default=None, help="comma-separated methods")
    ap.add_argument("--quick", action="store_true", help="synthetic data, tiny supernet, 1 epoch each, darts only (smoke test)")
    ap.add_argument("--no-record", dest="record", action="store_false")
    ap.add_argument("--results", default=str(H.REPO / "bench" / "RESULTS.md"))
    args = ap.parse_args(argv)
    if args.quick:
        args.dataset, args.search_epochs, args.train_epochs = "synthetic", 1, 1
        args.train_size, args.retrain_size, args.test_size, args.batch = 32, 64, 32, 16
        args.channels, args.layers, args.retrain_channels, args.retrain_layers = 4, 1, 4, 1
        args.only = args.only or "darts"
        if args.space == "darts":  # a DARTS network needs 3 cells for its two reduction cells
            args.layers = args.retrain_layers = 3
    H.child_package_source(out=sys.stderr)
    configs = configurations("--merge" in searcher_flags(), args.space)
    if args.only:
        configs = [c for c in configs if c["method"] in args.only.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for c in configs:
        for seed in seeds:
            print(f"{label(c)}, seed {seed}", file=sys.stderr, flush=True)
            rows.append(run_one(c, seed, args, work))
    summary = summarize(rows)
    import torch

    info = H.run_info(torch.device("cpu"), ignore=(args.results,))
    cells = "cell(s) per stage" if args.space == "nb201" else "cells"
    md = "\n".join([
        f"### Search quality, {SPACE_NAMES[args.space]} space on {args.dataset}: {rows[0]['device']}; commit {info['commit']}, {info['date'][:10]}",
        "",
        f"NOT the papers' CIFAR protocol: {args.dataset} (32x32), search {args.search_epochs} epochs of an {SPACE_NAMES[args.space]} supernet with "
        f"C {args.channels} and {args.layers} {cells} on {args.train_size} training images (half weights, half "
        f"architecture), batch {args.batch}, each method's other settings as published; retraining {args.train_epochs} epochs of "
        f"the {SPACE_NAMES[args.space]} network (C {args.retrain_channels}, {args.retrain_layers} {cells}, batch {args.retrain_batch}) on "
        f"{args.retrain_size} images, test accuracy on {args.test_size} test images; seeds {args.seeds}. "
        f"`python bench/search_quality.py{'' if args.space == 'nb201' else ' --space ' + args.space} --seeds {args.seeds} --search-epochs {args.search_epochs} "
        f"--train-epochs {args.train_epochs} --channels {args.channels} --layers {args.layers} --retrain-channels "
        f"{args.retrain_channels} --retrain-layers {args.retrain_layers}{' --quick' if args.quick else ''}`.",
        "",
        table(summary),
    ])
    if args.record:
        record(md, f"quality-{args.dataset}" if args.space == "nb201" else f"quality-{args.space}-{args.dataset}", "cpu", Path(args.results))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
