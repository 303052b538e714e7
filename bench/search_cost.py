"""Search cost of every method with and without TopoNAS, measured by ``toponas search`` itself.

    python bench/search_cost.py --space {nb201,darts,exaggerated} [--steps N] [--batch B] [--json] [--quick]

Each configuration runs in a fresh process (``toponas search ... --epochs 1 --steps-per-epoch
N``) on the same synthetic data, batch and seed; its ``result.json`` gives the peak memory (GPU:
``max_memory_allocated``; CPU: growth of the resident set), the median seconds per step and the
time the zero-shot mask took. The normalized cost is Eq. 29 of the TopoNAS paper: memory over the
lowest memory of the run plus time over the lowest time of the run (2.0 for a configuration
lowest in both). Prints one markdown table in the layout of the paper's Table III cost columns
and, unless ``--no-record``, writes it with device, commit and date into ``bench/RESULTS.md``
(replacing the previous table of the same space and device) with a bar plot of the normalized
cost per method, with and without TopoNAS, next to it.

Configurations: darts, darts2, pc-darts, beta-darts, gdas, rome, each ``--topo plain`` and
``--topo topo``; darts and pc-darts with a random and a zero-shot mask at level 0.5 (plain and
TopoNAS); darts + TopoNAS + PC 4 + zero-shot half mask, and on the DARTS-network spaces the same
with its cells recomputed in backward (``--recompute-cells``); ``--merge`` variants where the
searcher has them. ``--quick``: a tiny supernet and 2 steps, for the tests.

The zero-shot mask is Algorithm 1 of Zero-One-Shot (ETENAS ranking, 3 initializations of the
plain proxy supernet), computed once per run and reused by every zero-shot configuration. The
paper ranks on 3 x 128 images, the default on a GPU (``--mask-images``); on the CPU each round
runs one proxy forward per remaining candidate operation and initialization, so by default it
ranks on the run's training half (steps x batch images) and the table says how many it used.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

from toponas_kernels.search.config import METHODS  # noqa: E402


def configurations(space: str, merges: list[str]) -> list[dict]:
    out = []
    for method in METHODS:
        for topo in ("plain", "topo"):
            out.append({"method": method, "topo": topo})
    for method in ("darts", "pc-darts"):
        for mask in ("random", "zero-shot"):
            for topo in ("plain", "topo"):
                out.append({"method": method, "topo": topo, "mask": mask})
    out.append({"method": "darts", "topo": "topo", "mask": "zero-shot", "partial_channels": 4})
    if space != "nb201":  # the DARTS network can also rerun its cells in backward (opt-in)
        out.append({"method": "darts", "topo": "topo", "mask": "zero-shot", "partial_channels": 4, "recompute": True})
    for merge in merges:
        out.append({"method": "darts", "topo": "topo", "merge": merge})
    return out


def label(c: dict) -> str:
    parts = [c["method"]]
    if c.get("partial_channels"):
        parts.append(f"PC {c['partial_channels']}")
    if c.get("mask"):
        parts.append(f"{c['mask']} mask")
    if c.get("merge"):
        parts.append(f"merge {c['merge']}")
    if c.get("recompute"):
        parts.append("recomputed cells")
    return " + ".join(parts)


def searcher_flags() -> set[str]:
    """The flags this checkout's ``toponas search`` takes (``--merge`` may be missing)."""
    p = subprocess.run([sys.executable, "-m", "toponas_kernels.cli", "search", "--help"], capture_output=True, text=True)
    return set(re.findall(r"--[a-z][a-z0-9-]*", p.stdout))


def run_one(c: dict, args, workdir: str, masks: dict) -> dict:
    """One configuration in a fresh process. ``masks``: zero-shot masks already computed in this
    run, {"zero-shot": (mask.json, seconds, images)}: Algorithm 1 runs on the plain proxy supernet of
    the space with the run's seed and images, whatever the method, TopoNAS mode or partial
    channels, so every zero-shot configuration gets the same mask and the first one's file is
    reused (its time reported on each)."""
    out = os.path.join(workdir, re.sub(r"[^a-z0-9]+", "-", label(c).lower() + "-" + c["topo"]))
    shutil.rmtree(out, ignore_errors=True)  # what an interrupted attempt left (its row was never recorded)
    cmd = [sys.executable, "-m", "toponas_kernels.cli", "search", "--space", args.space, "--method", c["method"],
           "--topo", c["topo"], "--dataset", "synthetic", "--epochs", "1", "--steps-per-epoch", str(args.steps),
           "--batch-size", str(args.batch), "--train-size", str(2 * max(args.steps * args.batch, args.mask_images or 0)), "--seed", "0",
           "--out", out, "--no-progress", "--no-plots", "--json", "--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    reused = masks.get(c.get("mask"))
    if reused:
        cmd += ["--mask", reused[0]]
    elif c.get("mask"):
        cmd += ["--mask", c["mask"], "--mask-level", "0.5"]
        if args.mask_images:  # Algorithm 1's images: ceil(N / 128) batches of at most 128
            batches = -(-args.mask_images // 128)
            cmd += ["--mask-batches", str(batches), "--mask-batch-size", str(-(-args.mask_images // batches))]
        elif args.quick:
            cmd += ["--mask-batches", "1", "--mask-batch-size", "8"]
        if args.quick:
            cmd += ["--mask-inits", "1"]
    if c.get("partial_channels"):
        cmd += ["--partial-channels", str(c["partial_channels"])]
    if c.get("merge"):
        cmd += ["--merge", c["merge"]]
    if c.get("recompute"):
        cmd.append("--recompute-cells")
    if args.quick:
        cmd += ["--init-channels", "4", "--layers", "1" if args.space == "nb201" else "3"]
    meter = H.CpuMeter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    busy = meter.share()
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return {**c, "label": label(c), "error": last}
    r = json.loads(p.stdout.strip().splitlines()[-1])
    seconds = reused[1] if reused else (r.get("mask") or {}).get("seconds")
    images = reused[2] if reused else (r.get("mask") or {}).get("images")
    if c.get("mask") == "zero-shot" and not reused:
        masks["zero-shot"] = (os.path.join(out, "mask.json"), seconds, images)
    return {
        **c,
        "label": label(c),
        "peak_bytes": r["peak_memory_bytes"],
        "step_seconds": r["step_seconds"],
        "mask_seconds": seconds,
        "mask_reused": bool(reused),
        "mask_images": images if c.get("mask") == "zero-shot" else None,
        "mask_file": os.path.join(out, "mask.json") if c.get("mask") else None,
        "device": r["device"],
        "others_cpu": busy,
    }


def mask_images(path: str | None) -> int | None:
    """How many images Algorithm 1 ranked on, from a zero-shot ``mask.json``."""
    try:
        with open(path) as f:
            return json.load(f).get("images")
    except (OSError, TypeError, ValueError):
        return None


def normalize(rows: list[dict]) -> None:
    """Eq. 29: memory / lowest memory + time / lowest time, within this run."""
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return
    m0 = min(r["peak_bytes"] for r in ok) or 1
    t0 = min(r["step_seconds"] for r in ok) or 1e-12
    base = {r["label"]: r for r in ok if r["topo"] == "plain" and r["method"] == "darts" and not r.get("mask")}
    plain = base.get("darts")
    for r in ok:
        r["normalized_cost"] = r["peak_bytes"] / m0 + r["step_seconds"] / t0
        if plain:
            r["memory_vs_darts"] = r["peak_bytes"] / plain["peak_bytes"]
            r["time_vs_darts"] = r["step_seconds"] / plain["step_seconds"]


def table(rows: list[dict]) -> str:
    head = "| method | TopoNAS | peak memory | s / step | mask s | memory / DARTS | time / DARTS | normalized cost |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['topo']} | failed: {r['error']} | | | | | |")
            continue
        busy = " (busy)" if (r.get("others_cpu") or 0) > 0.15 else ""
        images = r.get("mask_images")
        notes = ([f"{images} images"] if images else []) + (["reused"] if r.get("mask_reused") else [])
        notes = f" ({', '.join(notes)})" if notes else ""
        lines.append(
            f"| {r['label']} | {'yes' if r['topo'] == 'topo' else 'no'} | {H.fmt(r['peak_bytes'] / 2**20, '.0f')} MiB"
            f" | {H.fmt(r['step_seconds'], '.3f')}{busy} | {H.fmt(r.get('mask_seconds'), '.1f')}{notes}"
            f" | {H.fmt(r.get('memory_vs_darts'), '.3f')} | {H.fmt(r.get('time_vs_darts'), '.3f')}"
            f" | {H.fmt(r.get('normalized_cost'), '.2f')} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    labels = list(dict.fromkeys(r["label"] for r in ok))
    # the rotated labels take about 0.06 inch of height per character: room for the longest one
    height = 3.0 + 0.06 * max((len(lab) for lab in labels), default=0)
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(labels)), height), layout="constrained")
    width = 0.4
    for i, topo in enumerate(("plain", "topo")):
        vals = [next((r["normalized_cost"] for r in ok if r["label"] == lab and r["topo"] == topo), 0) for lab in labels]
        ax.bar([x + (i - 0.5) * width for x in range(len(labels))], vals, width,
               label="with TopoNAS" if topo == "topo" else "without")
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right")
    ax.set_ylabel("normalized cost, Eq. 29")
    ax.set_title(title)
    ax.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def record(md: str, space: str, device: str, results: Path) -> None:
    """Replace (or add) this space and device's section in RESULTS.md."""
    text = results.read_text() if results.exists() else "# Benchmarks\n"
    tag = f"<!-- search_cost {space} {device} -->"
    end = f"<!-- /search_cost {space} {device} -->"
    block = f"{tag}\n{md}\n{end}"
    if tag in text and end in text:
        text = text[: text.index(tag)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = results.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, results)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", default="nb201", choices=("nb201", "darts", "exaggerated"))
    ap.add_argument("--steps", type=int, default=None, help="search steps per configuration (default 5; quick 2)")
    ap.add_argument("--batch", type=int, default=None, help="batch size of every configuration (default 16 on CPU, 64 on GPU; quick 4)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per run (default 1)")
    ap.add_argument("--quick", action="store_true", help="tiny supernet, 2 steps (smoke test)")
    ap.add_argument("--json", action="store_true", help="one JSON object per configuration on stdout")
    ap.add_argument("--no-record", dest="record", action="store_false", help="do not write bench/RESULTS.md")
    ap.add_argument("--results", default=str(H.REPO / "bench" / "RESULTS.md"), help="the markdown file to record into")
    ap.add_argument("--only", default=None, help="comma-separated methods to run (default all)")
    ap.add_argument("--rows", default=None, metavar="FILE",
                    help="JSON lines of measured rows: each row is appended as it is measured, and rows already in "
                         "the file are reused, so a killed run started again with the same FILE continues")
    ap.add_argument("--mask-images", type=int, default=None, metavar="N",
                    help="images Algorithm 1 ranks the zero-shot mask on (the paper: 384, the default on a GPU; on "
                         "the CPU the default is the run's training half, steps x batch, since Algorithm 1 runs "
                         "thousands of proxy forwards over them); the training set grows to hold them")
    ap.add_argument("--no-masks", dest="masks", action="store_false",
                    help="leave out the masked configurations (the zero-shot mask takes minutes on the DARTS space)")
    args = ap.parse_args(argv)
    import torch

    gpu = args.device in ("auto", "cuda") and torch.cuda.is_available()
    if args.device == "cuda" and not gpu:
        print("search_cost: --device cuda but no CUDA GPU is visible here; use --device cpu", file=sys.stderr)
        return 2
    args.steps = args.steps or (2 if args.quick else 5)
    args.batch = args.batch or (4 if args.quick else (64 if gpu else 16))
    if args.mask_images is None and gpu and not args.quick:
        args.mask_images = 384
    if args.mask_images is not None and args.mask_images < 2:
        print(f"search_cost: --mask-images must be at least 2 (the ranking correlates images), got {args.mask_images}",
              file=sys.stderr)
        return 2
    H.child_package_source(out=sys.stderr)
    flags = searcher_flags()
    merges = ["separable"] if "--merge" in flags and args.space == "exaggerated" else []
    configs = configurations(args.space, merges)
    if args.only:
        keep = set(args.only.split(","))
        configs = [c for c in configs if c["method"] in keep]
    if not args.masks:
        configs = [c for c in configs if not c.get("mask")]
    rows, done = [], {}
    if args.rows and os.path.exists(args.rows):
        for line in open(args.rows):
            if line.strip():
                r = json.loads(line)
                if "error" not in r:
                    done[(r["label"], r["topo"])] = r
    masks = {}
    for r in done.values():  # a zero-shot mask measured before the restart is reused too
        if r.get("mask") == "zero-shot" and not r.get("mask_reused") and r.get("mask_file") and os.path.exists(r["mask_file"]):
            masks["zero-shot"] = (r["mask_file"], r["mask_seconds"], r.get("mask_images") or mask_images(r["mask_file"]))
    for r in done.values():  # rows measured before the image count was recorded
        if r.get("mask") == "zero-shot" and r.get("mask_images") is None and "zero-shot" in masks:
            r["mask_images"] = masks["zero-shot"][2]
    with tempfile.TemporaryDirectory(prefix="search_cost_") as tmp:
        work = args.rows + ".d" if args.rows else tmp  # kept with --rows: reused masks live there
        os.makedirs(work, exist_ok=True)
        for i, c in enumerate(configs, 1):
            r = done.get((label(c), c["topo"]))
            print(f"[{i}/{len(configs)}] {label(c)} topo={c['topo']}{' (measured before)' if r else ''}",
                  file=sys.stderr, flush=True)
            if r is None:
                r = run_one(c, args, work, masks)
                if args.rows:
                    with open(args.rows, "a") as f:
                        f.write(json.dumps(r) + "\n")
            rows.append(r)
            if args.json:
                print(H.json_line(r), flush=True)
    normalize(rows)
    device = next((r["device"] for r in rows if "device" in r), "unknown")
    info = H.run_info(torch.device("cuda" if gpu else "cpu"), ignore=(args.results,))
    busiest = max((r.get("others_cpu") or 0) for r in rows)
    note = (f"Busy machine: other processes took up to {busiest:.0%} of the CPU during some runs; "
            "rows marked (busy) have unreliable times." if busiest > 0.15 else "")
    md = "\n".join([
        f"### Search cost, {args.space} space: {device}; commit {info['commit']}, {info['date'][:10]}",
        "",
        f"`python bench/search_cost.py --space {args.space} --steps {args.steps} --batch {args.batch}"
        f"{' --quick' if args.quick else ''}{f' --mask-images {args.mask_images}' if args.mask_images else ''}`: synthetic data, batch {args.batch}, {args.steps} steps per configuration, "
        f"each in a fresh process; torch {info['torch']}. The zero-shot mask: Algorithm 1, ETENAS ranking, "
        f"{1 if args.quick else 3} initialization(s) of the plain proxy, on the number of images its column gives. {note}",
        "",
        table(rows),
    ])
    if args.record:
        results = Path(args.results)
        png = results.parent / f"search_cost_{args.space}_{'gpu' if gpu else 'cpu'}.png"
        try:
            plot(rows, png, f"{args.space}: normalized cost per method")
            md += f"\n\n![normalized cost]({png.name})"
        except ImportError:
            pass
        record(md, args.space, "gpu" if gpu else "cpu", results)
    print(md)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
