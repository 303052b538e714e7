"""Search quality on NAS-Bench-201, scored against ground truth: every search's derived cell looked
up in a table of cells trained from scratch, not retrained here.

    python bench/search_quality.py                       # run what is missing, then print the table
    python bench/search_quality.py --search-only         # the searches alone (resumable; run it in the background)
    python bench/search_quality.py --score-only [--table NAS-Bench-201-v1_1-096897.pth]
    python bench/search_quality.py --retrain ...         # the older protocol: search with `toponas search`
                                                         # at 32x32, retrain each cell briefly (below)

For darts, darts2, pc-darts, beta-darts, gdas and rome, each with ``--topo plain`` and ``--topo
topo``, over ``--seeds``: one search at the budget of ``_quality_search.Budget`` (its docstring
says what is reduced and how each method's schedule is scaled: at least 1,000 architecture steps,
GDAS/ROME's tau annealed to its end, ROME's K = 7 samples per step). Every finished search is one
row of ``--rows`` (a JSON list, rewritten atomically after each run); a rerun skips the runs whose
method, mode, seed and budget are already there, so a killed job continues where it stopped. The
queue is seed-major (every method's seed 0 before any seed 1) with darts2, the most expensive and
exempt from the quality targets, last.

Scored (``score``): the derived cell's CIFAR-10 test accuracy after 200 epochs in ``--table``:
``analog-nasbench`` by default (the offline table: one 200-epoch retrain per cell, CIFAR-10 only,
NOT NAS-Bench-201's table; every output says so), or a NAS-Bench-201 / NATS-tss table file, read
through its own package (``toponas_kernels.lookup``). Per search: every seed, mean and standard
deviation, the share of parameter-free operations and the cells whose output is cut off by
``none``; beside them the same table's random-cell mean and median, random search at the same
cost, and the method's published NB201 CIFAR-10 test accuracy (``PUBLISHED``).

Random search at the same cost is the expected best of N cells drawn uniformly, ranked by their
ground truth (an oracle ranking: an upper bound on what a real random search with a proxy ranking
reaches), where N is the number of cells a proxy ranking could train in the search's measured
CPU time (the process's, single-threaded: wall-clock on a shared machine measures the other
users): each proxy trains one cell alone, at the search's size and data, for one search epoch's
weight steps, and its CPU time is measured with the searches (``proxy_seconds``). The expectation is exact
(computed from the table's sorted accuracies), not sampled.

The older protocol (``--retrain``: ``toponas search`` on 32x32 Fashion-MNIST, then ``toponas
train`` of the derived cell for a few epochs, test accuracy of the retrained cell) is kept; its
finished runs live in ``--work`` (default ``bench/quality_runs``, not tracked). For the papers'
protocol (CIFAR-10 search, NB201 look-up), with a GPU and the data, run for each method::

    toponas search --space nb201 --method M [--topo topo] --dataset cifar10 --data-dir DATA --epochs 50 \\
                   --out runs/M --lookup NAS-Bench-201-v1_1-096897.pth          # gdas: --epochs 250
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

PARAMETER_FREE = ("skip_connect", "none", "avg_pool_3x3", "max_pool_3x3")
SPACE_NAMES = {"nb201": "NAS-Bench-201", "darts": "DARTS"}
METHODS = ("gdas", "pc-darts", "beta-darts", "darts", "rome", "darts2")  # the queue's order
TOPOS = ("plain", "topo")
DEFAULT_ROWS = H.REPO / "bench" / "search_quality_nb201_rows.json"

# Published NAS-Bench-201 CIFAR-10 test accuracy (%, 200-epoch table) of each method's searched
# cell, with where it is published.
PUBLISHED = {
    "darts": (54.30, "NAS-Bench-201 paper (Dong & Yang, ICLR 2020), Table 5, DARTS-V1"),
    "darts2": (54.30, "NAS-Bench-201 paper, Table 5, DARTS-V2"),
    "gdas": (93.61, "NAS-Bench-201 paper, Table 5"),
    "beta-darts": (94.36, "beta-DARTS paper (Ye et al., CVPR 2022), Table 1"),
    "pc-darts": (91.70, "TopoNAS paper (Zhao, Liu & Yuan), Table III, PC-DARTS as run there (its own paper has no NB201 number)"),
    "rome": (None, "not found in a source available here"),
}
# The TopoNAS paper's NB201 CIFAR-10 test accuracies (Table III, mean of five searches): each
# method as run there (plain) and with TopoNAS (topo). Its DARTS used a larger weight decay.
TOPONAS_PAPER = {
    ("darts", "plain"): 82.79, ("darts", "topo"): 89.17,
    ("beta-darts", "plain"): 93.76, ("beta-darts", "topo"): 94.05,
    ("pc-darts", "plain"): 91.70, ("pc-darts", "topo"): 93.12,
    ("gdas", "plain"): 93.58, ("gdas", "topo"): 92.08,
}


# ====================================================================================== rows
def budget_dict(budget) -> dict:
    import dataclasses

    return dataclasses.asdict(budget)


def run_key(method: str, topo: str, seed: int, budget: dict) -> str:
    return json.dumps([method, topo, int(seed), budget], sort_keys=True)


def load_rows(path) -> list[dict]:
    """The finished runs recorded in ``path`` ([] when it does not exist yet)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = json.loads(path.read_text())
    if not isinstance(rows, list):
        raise ValueError(f"--rows {path}: expected a JSON list of runs, got {type(rows).__name__}")
    return rows


def add_row(path, row: dict) -> None:
    """Append ``row`` to the list in ``path``, atomically (a killed process leaves the old file or
    the new one, never half of one)."""
    from toponas_kernels._io import atomic_write_json

    rows = load_rows(path)
    key = run_key(row["method"], row["topo"], row["seed"], row["budget"])
    rows = [r for r in rows if run_key(r["method"], r["topo"], r["seed"], r["budget"]) != key] + [row]
    atomic_write_json(path, rows, indent=1)


def queue(methods, topos, seeds) -> list[tuple[str, str, int]]:
    """Seed-major: every (method, mode) at seed 0 before any at seed 1; darts2 after the rest."""
    first = [m for m in methods if m != "darts2"]
    out = [(m, t, s) for s in seeds for m in first for t in topos]
    if "darts2" in methods:
        out += [("darts2", t, s) for s in seeds for t in topos]
    return out


def run_searches(budget, methods, topos, seeds, rows_path, *, log=print, stop_at: float | None = None) -> list[dict]:
    """Run every (method, mode, seed) of the queue that ``rows_path`` does not hold yet, recording
    each as it finishes. ``stop_at``: a ``time.time()`` after which no new run starts."""
    import torch

    import _quality_search as Q

    bd = budget_dict(budget)
    done = {run_key(r["method"], r["topo"], r["seed"], r["budget"]) for r in load_rows(rows_path)}
    info = H.run_info(torch.device("cpu"), ignore=(str(rows_path),))
    for method, topo, seed in queue(methods, topos, seeds):
        if run_key(method, topo, seed, bd) in done:
            continue
        if stop_at is not None and time.time() > stop_at:
            log("stop time reached; the remaining runs are left for a later start")
            break
        log(f"{method} / {topo}, seed {seed}: searching")
        r = Q.search(method, topo, seed, budget)
        row = {"method": method, "topo": topo, "seed": seed, "budget": bd, **r,
               "device": info["device"], "commit": info["commit"], "torch": info["torch"],
               "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        add_row(rows_path, row)
        log(f"{method} / {topo}, seed {seed}: {r['genotype']} ({r['seconds']:.0f} s, {r['arch_steps']} architecture steps)")
    return load_rows(rows_path)


def proxy_seconds(budget, cells: int = 3, seed: int = 0) -> float:
    """CPU seconds one proxy ranking costs (this process's CPU time, which a shared machine does
    not inflate as it does wall-clock time): a random cell trained alone (a one-hot supernet: only its
    operations run) at the search's size and data for one search epoch's weight steps; the median
    over ``cells`` random cells."""
    import torch

    import _quality_search as Q
    from toponas_kernels.search import METHOD_CLASSES

    x, y = Q.load_images(budget)
    g = torch.Generator().manual_seed(seed)
    times = []
    for _ in range(cells):
        model = Q.build("darts", "plain", budget, in_channels=x.shape[1])
        choice = torch.randint(len(model.space.names), (model.mask.shape[0],), generator=g)
        mask = torch.zeros_like(model.mask)
        mask[torch.arange(mask.shape[0]), choice] = True
        model.mask.copy_(mask)
        m = METHOD_CLASSES["darts"](model, epochs=1, space="nb201")
        it = Q.Batches(x, y, budget.batch, seed)
        t = time.process_time()
        for _ in range(budget.steps()):
            m.weight_step(*next(it))
        times.append(time.process_time() - t)
    return statistics.median(times)


# ====================================================================================== scoring
def collapse(arch) -> float:
    """Share of parameter-free operations in a cell: an NB201 string, or a DARTS genotype as
    result.json records it ({"normal": [[op, input], ...], "reduce": [...], ...})."""
    if isinstance(arch, dict):
        ops = [op for key in ("normal", "reduce") for op, _ in arch[key]]
    else:
        ops = _ops(arch)
    return sum(op in PARAMETER_FREE for op in ops) / len(ops)


def _ops(arch: str) -> list[str]:
    """The operations of an NB201 cell string, edge by edge."""
    return [o.split("~")[0] for group in arch.split("+") for o in group.strip("|").split("|")]


def ground_truth(table: str = "analog-nasbench") -> tuple[dict, str]:
    """({table code: CIFAR-10 test accuracy}, label) for every NB201 cell of the table. The offline
    table by default; a NAS-Bench-201 / NATS-tss table is looked up cell by cell
    (``dataset='cifar10'``, hp 200, the mean over its trials) through its own package."""
    from toponas_kernels import nb201_offline as O

    if O.is_offline(table):
        return dict(O.load_table(table)), O.LABEL
    from toponas_kernels.lookup import lookup, table_api

    scores = {}
    for arch in table_api(table)[1].meta_archs:  # every cell the table holds (all 15,625 in a full one)
        scores[O.encode(arch)] = float(lookup(arch, table, dataset="cifar10", hp="200")["test_accuracy"])
    return scores, f"{os.path.basename(os.fspath(table))}: NAS-Bench-201 CIFAR-10 test accuracy, hp 200 (mean over its trials)"


def expected_best_of(values, n: int) -> float:
    """E[max of n draws, uniform with replacement, from ``values``], exactly:
    sum_k v_(k) [(k/M)^n - ((k-1)/M)^n] over the sorted values."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive integer, got {n!r}")
    v = sorted(values)
    M = len(v)
    if M == 0:
        raise ValueError("values: empty")
    return sum(x * ((k / M) ** n - ((k - 1) / M) ** n) for k, x in enumerate(v, 1))


def score(rows: list[dict], truth: dict, *, proxy_s: float | None = None) -> dict:
    """The quality table's numbers: per (method, mode) the seeds' accuracies (by seed), mean,
    standard deviation, parameter-free share, cut-off cells, search seconds, and random search
    at the same cost; plus the random-cell mean and median of ``truth``."""
    from toponas_kernels import nb201_offline as O

    values = list(truth.values())
    out = {"random": {"mean": statistics.fmean(values), "median": statistics.median(values),
                      "best": max(values), "cells": len(values)},
           "proxy_seconds": proxy_s, "searches": []}
    for method in dict.fromkeys(r["method"] for r in rows):
        for topo in dict.fromkeys(r["topo"] for r in rows if r["method"] == method):
            rs = sorted((r for r in rows if r["method"] == method and r["topo"] == topo), key=lambda r: r["seed"])
            acc = [truth[O.encode(r["genotype"])] for r in rs]
            seconds = statistics.fmean(r.get("cpu_seconds", r["seconds"]) for r in rs)
            n = max(1, int(seconds // proxy_s)) if proxy_s else None
            out["searches"].append({
                "method": method, "topo": topo, "seeds": [r["seed"] for r in rs], "accuracy": acc,
                "cells": [r["genotype"] for r in rs],
                "mean": statistics.fmean(acc), "std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                "collapse": statistics.fmean(collapse(r["genotype"]) for r in rs),
                "skip": statistics.fmean(_ops(r["genotype"]).count("skip_connect") / 6 for r in rs),
                "cut_off": sum(O.output_cut_off(r["genotype"]) for r in rs),
                "seconds": seconds, "arch_steps": rs[0]["arch_steps"],
                "random_search_n": n, "random_search": expected_best_of(values, n) if n else None,
                "published": PUBLISHED.get(method, (None, ""))[0],
                "toponas_paper": TOPONAS_PAPER.get((method, topo)),
                "max_weight": statistics.fmean(statistics.fmean(max(row) for row in r["arch_weights"])
                                               for r in rs if "arch_weights" in r) if all("arch_weights" in r for r in rs) else None,
                "trajectory": _trajectory(rs, truth),
            })
    return out


def _trajectory(rs: list[dict], truth: dict) -> list[tuple[int, float]]:
    """(epoch, mean ground truth over the seeds of the cell derived at the end of that epoch),
    for the epochs every run's trace holds."""
    from toponas_kernels import nb201_offline as O

    traces = [r.get("trace") or [] for r in rs]
    if not all(traces):
        return []
    n = min(len(t) for t in traces)
    return [(traces[0][e]["epoch"], statistics.fmean(truth[O.encode(t[e]["genotype"])] for t in traces))
            for e in range(n)]


def trajectory_table(scored: dict, points: int = 4) -> str:
    """The ground truth of the cell each search would have derived at ``points`` evenly spaced
    epochs (mean over its seeds), and how far the architecture weights moved from uniform (the
    mean over edges of the largest operation weight at the end)."""
    rows = [s for s in scored["searches"] if s["trajectory"]]
    if not rows:
        return ""
    lines = ["| search | " + " | ".join(f"{q}/{points} of the epochs" for q in range(1, points + 1))
             + " | largest op weight at the end (uniform: 1/ops) |",
             "|---|" + "---|" * (points + 1)]
    for s in rows:
        tr = s["trajectory"]
        picks = [tr[max(0, round(q * len(tr) / points) - 1)] for q in range(1, points + 1)]
        cells = " | ".join(f"{acc:.1f} (epoch {ep})" for ep, acc in picks)
        mw = f"{s['max_weight']:.3f}" if s["max_weight"] is not None else "-"
        lines.append(f"| {s['method']} / {'TopoNAS' if s['topo'] == 'topo' else 'plain'} | {cells} | {mw} |")
    return "\n".join(lines)


def score_table(scored: dict) -> str:
    """The Markdown table of ``score``'s numbers."""
    rnd = scored["random"]
    lines = ["| search | seeds | accuracy per seed | mean ± std | parameter-free ops (skip) | cut off | search CPU s | "
             "random search, same cost (N) | published | TopoNAS paper |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in scored["searches"]:
        per = " / ".join(f"{a:.1f}" for a in s["accuracy"])
        rs = f"{s['random_search']:.2f} ({s['random_search_n']})" if s["random_search"] is not None else "-"
        pub = f"{s['published']:.2f}" if s["published"] is not None else "-"
        paper = f"{s['toponas_paper']:.2f}" if s.get("toponas_paper") is not None else "-"
        name = f"{s['method']} / {'TopoNAS' if s['topo'] == 'topo' else 'plain'}"
        lines.append(f"| {name} | {','.join(map(str, s['seeds']))} | {per} | {s['mean']:.2f} ± {s['std']:.2f} "
                     f"| {100 * s['collapse']:.0f}% ({100 * s['skip']:.0f}%) | {s['cut_off']} | {s['seconds']:.0f} | {rs} | {pub} | {paper} |")
    lines.append(f"| random cell | - | - | mean {rnd['mean']:.2f}, median {rnd['median']:.2f} | - | - | - | - | "
                 f"best {rnd['best']:.2f} | - |")
    return "\n".join(lines)


# ====================================================================================== retraining (--retrain)
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


def main_retrain(args) -> int:
    """The older protocol: ``toponas search`` and ``toponas train`` per run (``--retrain``)."""
    if args.quick:
        args.dataset, args.search_epochs, args.train_epochs = "synthetic", 1, 1
        args.train_size, args.retrain_size, args.test_size, args.batch = 32, 64, 32, 16
        args.channels, args.layers, args.retrain_channels, args.retrain_layers = 4, 1, 4, 1
        args.only = args.only or "darts"
        if args.space == "darts":  # a DARTS network needs 3 cells for its two reduction cells
            args.layers = args.retrain_layers = 3
    from search_cost import record, searcher_flags

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




def proxy_file(rows_path) -> Path:
    rows_path = Path(rows_path)
    return rows_path.with_name(rows_path.stem.replace("_rows", "") + "_proxy.json")


def measured_proxy(budget, rows_path, *, measure: bool, log=print) -> float | None:
    """The proxy ranking's seconds for ``budget``: read from the file beside the rows, or measured
    (and recorded there) when ``measure``."""
    from toponas_kernels._io import atomic_write_json

    path = proxy_file(rows_path)
    known = json.loads(path.read_text()) if path.exists() else []
    bd = budget_dict(budget)
    for entry in known:
        if entry["budget"] == bd:
            return entry["seconds"]
    if not measure:
        return None
    seconds = proxy_seconds(budget)
    log(f"proxy ranking: {seconds:.2f} s per cell ({budget.steps()} weight steps)")
    atomic_write_json(path, known + [{"budget": bd, "seconds": seconds,
                                       "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}], indent=1)
    return seconds


def _stop_time(text: str | None) -> float | None:
    """'HH:MM' (UTC, today) -> a time.time(); None -> None."""
    if text is None:
        return None
    m = re.fullmatch(r"(\d{1,2}):(\d{2})", text)
    if not m or int(m.group(1)) > 23 or int(m.group(2)) > 59:
        raise SystemExit(f"--stop-at: expected HH:MM (UTC), got {text!r}")
    now = time.gmtime()
    day = time.mktime((now.tm_year, now.tm_mon, now.tm_mday, 0, 0, 0, 0, 0, 0)) - time.timezone
    return day + 3600 * int(m.group(1)) + 60 * int(m.group(2))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated (default {','.join(METHODS)})")
    ap.add_argument("--topos", default="plain,topo")
    ap.add_argument("--rows", default=str(DEFAULT_ROWS), help="the JSON list of finished runs (resume)")
    ap.add_argument("--table", default="analog-nasbench",
                    help="ground truth: analog-nasbench (offline, default) or a NAS-Bench-201 / NATS-tss table file")
    ap.add_argument("--search-only", action="store_true", help="run the missing searches, score nothing")
    ap.add_argument("--score-only", action="store_true", help="score the recorded runs, search nothing")
    ap.add_argument("--stop-at", default=None, metavar="HH:MM", help="start no new search after this time (UTC)")
    ap.add_argument("--json", action="store_true", help="print the scores as JSON after the table")
    ap.add_argument("--threads", type=int, default=1)
    import _quality_search as Q

    Q.add_budget_arguments(ap)
    r = ap.add_argument_group("the older protocol (--retrain)")
    r.add_argument("--retrain", action="store_true", help="search with `toponas search`, retrain each cell with `toponas train`")
    r.add_argument("--space", default="nb201", choices=("nb201", "darts"))
    r.add_argument("--search-epochs", type=int, default=5)
    r.add_argument("--train-epochs", type=int, default=3)
    r.add_argument("--retrain-size", type=int, default=4000)
    r.add_argument("--retrain-batch", type=int, default=64)
    r.add_argument("--retrain-channels", type=int, default=8)
    r.add_argument("--retrain-layers", type=int, default=1)
    r.add_argument("--test-size", type=int, default=2000)
    r.add_argument("--work", default=str(H.REPO / "bench" / "quality_runs"))
    r.add_argument("--only", default=None, help="comma-separated methods")
    r.add_argument("--quick", action="store_true", help="synthetic data, tiny supernet, 1 epoch each, darts only (smoke test)")
    r.add_argument("--no-record", dest="record", action="store_false")
    r.add_argument("--results", default=str(H.REPO / "bench" / "RESULTS.md"))
    args = ap.parse_args(argv)
    if args.retrain:
        if args.batch == 16:
            args.batch = 32  # the older protocol's search batch
        return main_retrain(args)
    if args.quick or args.space != "nb201":
        raise SystemExit("--quick and --space belong to the retraining protocol: add --retrain")
    if args.search_only and args.score_only:
        raise SystemExit("--search-only and --score-only: choose one")
    import torch

    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown {', '.join(bad)}; known: {', '.join(METHODS)}")
    topos = [t for t in args.topos.split(",") if t]
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    budget = Q.budget_from_args(args)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if not args.score_only:
        measured_proxy(budget, args.rows, measure=True, log=log)
        run_searches(budget, methods, topos, seeds, args.rows, log=log, stop_at=_stop_time(args.stop_at))
    if args.search_only:
        return 0
    bd = budget_dict(budget)
    rows = [r for r in load_rows(args.rows) if r["budget"] == bd and r["method"] in methods and r["topo"] in topos
            and r["seed"] in seeds]
    if not rows:
        raise SystemExit(f"--rows {args.rows}: no finished run at this budget yet")
    truth, label_ = ground_truth(args.table)
    scored = score(rows, truth, proxy_s=measured_proxy(budget, args.rows, measure=False))
    print(f"Ground truth: {label_}.\n")
    print(score_table(scored))
    traj = trajectory_table(scored)
    if traj:
        print("\nThe cell each search derives along the way, scored the same way (mean over its seeds):\n")
        print(traj)
    if args.json:
        print(json.dumps(scored))
    return 0


if __name__ == "__main__":
    sys.exit(main())
