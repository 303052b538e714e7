"""Search-step cost of a supernet: DARTS (plain) against the TopoNAS rewrites.

One measurement = forward + backward of one search step (cross-entropy on random CIFAR-shaped
data) of the space's supernet, in a fresh process:

    python bench/search_step.py --space darts --mode topo --json
    python bench/search_step.py                      # DARTS space: plain vs topo, a table
    python bench/search_step.py --sweep              # Fig. 8: cost against the number of ops
    python bench/search_step.py --counts --batch 2 --image-size 16 --merge separable
                                                     # host work only (op calls): no memory, no timing

Fields of the JSON line (one per measurement):

* ``peak_bytes``: the first step of a fresh process under ``toponas_kernels.memory_meter``: the
  most bytes allocated at once above what was allocated just before it (model, optimizer-free,
  inputs), so it holds the activations, the saved tensors, the temporaries and the parameter
  gradients of the step. GPU: ``torch.cuda.max_memory_allocated``; CPU: the CPU allocator's
  events as ``torch.profiler`` records them (every ATen tensor, exact and the same on every run).
* ``saved_bytes``: bytes of the tensors autograd saves for backward during one forward
  (``memory_meter``'s ``saved_bytes``): each storage counted once at its full size (a view saves
  its whole storage alive; two views of one storage count once), and parameters and buffers left
  out (they live anyway: reported as ``saved_param_bytes``).
* ``saved_by_module`` (with ``--saved-by-module``): ``saved_bytes`` split by part of the
  network and innermost module type (``saved_by_module()``), e.g. "normal preprocess1 / ReLU".
* ``step_seconds``: median of ``--repeats`` timed steps after one warm-up step.
* ``package``: the folder of the ``toponas_kernels`` measured. ``python bench/search_step.py``
  imports the installed package, not the checkout's sources, unless the checkout is installed
  editable or on ``PYTHONPATH`` (a warning on stderr says so).
* ``profile`` (with ``--profile [TOP]``): one more step under ``torch.profiler``, self time per
  ATen op type (``total_cpu_ms``, ``top`` rows ``op`` / ``calls`` / ``self_cpu_ms``, ``rest``).
* ``op_calls``, ``op_calls_all``: host work of one forward + backward (cross-entropy, as timed),
  counted after one warm-up pass by ``_harness.count_op_calls``. ``op_calls``: every ATen or
  custom op call that reaches a ``TorchDispatchMode`` (what Python code, Python autograd
  Functions and the autograd layer issue one by one; on a GPU each that does work is at least
  one kernel launch from the host), split in ``op_calls_forward`` and ``op_calls_backward``.
  ``op_calls_all``: every event ``torch.profiler`` records in one more such pass, nested calls
  included (what a C++ op calls inside, the autograd engine's node events).
  ``op_calls_step``, ``op_calls_all_step``: the same two for one whole search step of
  first-order DARTS on the same supernet (``toponas_kernels.search.Darts.step``: architecture
  step on one batch, weight step on another, each with its optimizer's update; on a CPU torch's
  optimizers loop over the parameters, on a GPU they default to ``foreach``, so the step counts
  differ between the two by the optimizers' share). ``op_calls_top``: the op types with most
  dispatcher calls in the forward + backward (``op`` without overload, ``calls``, ``forward``,
  ``backward``). Counted on one CPU thread (``count_op_calls``): the same code gives the same
  numbers whatever the machine's load; the dispatcher's do not depend on the batch or image
  size, the profiler's by a fraction of a percent (ATen's ``zero_`` calls ``fill_`` only on
  larger tensors). Taken last (the whole step changes the weights); ``--counts`` takes only
  them (no memory, no timing), ``--no-counts`` leaves them out.
  With ``--compile`` both passes run the compiled step.
* ``image_size``: height and width of the random images (``--image-size``, 32 by default).
* ``merge``: the form of topo's merged convs (``--merge``); ``recompute``: the DARTS network
  reruns its cells in backward (``--recompute``); ``compile``, ``compile_seconds``:
  with ``--compile`` the step runs under ``torch.compile`` (``nas/compile.py``), compiled by one
  untimed step (its wall time) before memory and time are measured; ``cuda_graphs``: with
  ``--cuda-graphs`` (CUDA only) compiled in inductor's ``reduce-overhead`` mode, each step a
  CUDA-graph replay.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import _harness as H  # bench/ is sys.path[0] when this file runs as a script
from toponas_kernels import memory_meter, runtime
from toponas_kernels.nas.forms import MERGE_CHOICES

HERE = Path(__file__).resolve().parent
MODES = ("plain", "pms", "fms", "pms+fms", "topo")  # FusedMixedOp's modes
# CPU step times taken while other processes used more than this share of the CPUs (beyond the
# cores the measuring process leaves idle) are flagged: a busy machine makes them many times off.
BUSY_SHARE = 0.10


# ----------------------------------------------------------------------------- the child
def build_model(args):
    from toponas_kernels.nas.networks import DartsSearchNetwork, NB201SearchNetwork
    from toponas_kernels.nas.spaces import exaggerated_space

    common = dict(mode=args.mode, normalize=not args.no_normalize, partial_channels=args.partial_channels, merge=args.merge)
    if args.space == "nb201":
        if args.recompute:
            raise SystemExit("search_step: --recompute is for the DARTS network (darts, exaggerated), not nb201")
        model = NB201SearchNetwork(C=args.C or 16, N=args.cells or 5, **common)
    else:
        space = "darts"
        if args.space == "exaggerated":
            space = exaggerated_space(args.num_sep_dil, args.num_double_sep)
        model = DartsSearchNetwork(C=args.C or 16, layers=args.cells or 8, space=space, recompute=args.recompute, **common)
    if args.mask_fraction > 0:
        _apply_random_masks(model, args.mask_fraction)
    return model


def _random_mask(rows: int, k: int, fraction: float, gen):
    """Per edge, switch off round(fraction * K) candidates chosen at random (at least one kept)."""
    off = min(k - 1, round(fraction * k))
    mask = torch.ones(rows, k, dtype=torch.bool)
    for r in range(rows):
        mask[r, torch.randperm(k, generator=gen)[:off]] = False
    return mask


def _apply_random_masks(model, fraction):
    gen = torch.Generator().manual_seed(0)
    if hasattr(model, "set_masks"):
        rows, k = model.mask_normal.shape
        model.set_masks(_random_mask(rows, k, fraction, gen), _random_mask(rows, k, fraction, gen))
    else:
        rows, k = model.mask.shape
        model.mask.copy_(_random_mask(rows, k, fraction, gen))


def count_saved_bytes(model, x, y):
    """Bytes saved for backward by one forward, each storage once, and the parameters' and
    buffers' apart (``memory_meter``)."""
    with memory_meter(x.device, params=model, peak=False) as meter:
        loss = torch.nn.functional.cross_entropy(model(x), y)
    del loss
    return meter.saved_bytes, meter.saved_param_bytes


def saved_by_module(model, x, y) -> dict[str, int]:
    """``count_saved_bytes`` split by where the forward was when a storage was first saved:
    "<part> / <module type>", the part being the stem, the classifier, or a cell's kind (normal,
    reduce) with its child (preprocess0/1, edge s1/s2, the edge's bypass pool, or the cell
    itself: node sums, concatenation, a recomputed cell), the module type the innermost module
    running (a forward pre-hook stack). Each storage is counted once, at its first saver."""
    names = {m: n for n, m in model.named_modules()}
    stack: list = []

    def enter(module, inputs):
        stack.append(module)

    def leave(module, inputs, output):
        stack.pop()

    pre = torch.nn.modules.module.register_module_forward_pre_hook(enter)
    post = torch.nn.modules.module.register_module_forward_hook(leave)
    cells = getattr(model, "cells", [])

    def label() -> str:
        inner = stack[-1] if stack else None
        path = names.get(inner, "").split(".") if inner is not None else [""]
        if path[0] != "cells" or len(path) < 2:
            return f"{path[0] or 'network'} / {type(inner).__name__}"
        cell = cells[int(path[1])]
        kind = "reduce" if getattr(cell, "reduction", False) else "normal"
        if len(path) == 2:
            part = "cell itself"
        elif path[2] == "edges":
            edge = cell.edges[int(path[3])]
            part = f"edge s{edge.stride}" + (" bypass pool" if path[4:5] == ["mp"] else "")
        else:
            part = path[2]
        return f"{kind} {part} / {type(inner).__name__}"

    param_ptrs = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    where: dict[int, tuple[str, int]] = {}
    keep = []

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if storage.nbytes() > 0 and t.device.type != "meta" and ptr not in param_ptrs and ptr not in where:
            where[ptr] = (label(), storage.nbytes())
        keep.append(t)
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = torch.nn.functional.cross_entropy(model(x), y)
    finally:
        pre.remove()
        post.remove()
    out: dict[str, int] = {}
    for key, n in where.values():
        out[key] = out.get(key, 0) + n
    del loss, keep
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def child(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_model(args).to(device)
    size = args.image_size
    x = torch.randn(args.batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)

    forward_loss = lambda: torch.nn.functional.cross_entropy(model(x), y)  # noqa: E731
    compiled = None
    if args.compile:
        from toponas_kernels.nas.compile import compile_step

        # (loss, logits), as the search runner compiles it, so the search step reuses the graph
        compiled = compile_step(model, lambda logits, t: (torch.nn.functional.cross_entropy(logits, t), logits),
                                cuda_graphs=args.cuda_graphs)
        forward_loss = lambda: compiled(x, y)[0]  # noqa: E731

    def step():
        model.zero_grad(set_to_none=True)
        loss = forward_loss()
        loss.backward()

    compile_seconds = None
    if args.compile:  # compile before measuring: memory and time are those of the compiled step
        t0 = time.perf_counter()
        step()
        compile_seconds = time.perf_counter() - t0

    record = {
        "space": args.space,
        "mode": args.mode,
        "batch": args.batch,
        "image_size": size,
        "partial_channels": args.partial_channels,
        "mask_fraction": args.mask_fraction,
        "normalize": not args.no_normalize,
        "merge": args.merge,
        "recompute": args.recompute,
        "compile": args.compile,
        "compile_seconds": compile_seconds,
        "cuda_graphs": args.cuda_graphs,
        "num_ops": len(model.space),
    }
    info = {
        "device": H.device_name(device),
        "package": H.package_source(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in model.parameters()),
    }
    if args.counts:  # host work only: no memory, no timing
        return {**record, **host_work(args, model, forward_loss, compiled, x, y), **info}

    # Memory: the first step of a fresh process.
    with memory_meter(device, saved=False) as meter:
        step()
    peak = meter.peak_bytes
    saved, saved_params = count_saved_bytes(model, x, y)
    by_module = saved_by_module(model, x, y) if args.saved_by_module else None
    times = []
    step()  # warm-up
    meter = H.CpuMeter() if device.type == "cpu" else None
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    others = meter.share() if meter is not None else None
    profile = profile_step(step, device, args.profile) if args.profile else None
    # Last: the whole search step's optimizer updates change the weights.
    counts = host_work(args, model, forward_loss, compiled, x, y) if not args.no_counts else {}
    return {
        **record,
        "peak_bytes": int(peak),
        "saved_bytes": int(saved),
        "saved_param_bytes": int(saved_params),
        "saved_by_module": by_module,
        "step_seconds": statistics.median(times),
        "profile": profile,
        "others_cpu": others,
        "busy_limit": BUSY_SHARE + max(0.0, 1.0 - torch.get_num_threads() / (os.cpu_count() or 1)),
        **counts,
        **info,
    }


TOP_OP_TYPES = 15  # op types listed in op_calls_top


def host_work(args, model, forward_loss, compiled, x, y) -> dict:
    """Op calls (``_harness.count_op_calls``) of one forward + backward (``op_calls``,
    ``op_calls_all``, split ``op_calls_forward`` / ``op_calls_backward``, the op types with most
    calls in ``op_calls_top``) and of one whole first-order DARTS search step on the same supernet
    (``op_calls_step``, ``op_calls_all_step``): ``toponas_kernels.search.Darts.step``, the
    architecture step on one batch, then the weight step on another of the same shape, each with
    its optimizer's update. Changes the weights."""
    from toponas_kernels.search import Darts

    def forward(_):
        model.zero_grad(set_to_none=True)
        return forward_loss()

    pass_ = H.count_op_calls([("forward", forward), ("backward", lambda loss: loss.backward())])
    method = Darts(model, epochs=1, space="nb201" if args.space == "nb201" else "darts")
    if compiled is not None:
        method.compiled_loss = compiled
    gen = torch.Generator().manual_seed(1)
    x_val = torch.randn(x.shape, generator=gen).to(x.device)
    y_val = torch.randint(0, 10, y.shape, generator=gen).to(y.device)
    whole = H.count_op_calls([("step", lambda _: method.step((x, y), (x_val, y_val)))])
    return {
        "op_calls": pass_["op_calls"],
        "op_calls_all": pass_["op_calls_all"],
        "op_calls_forward": pass_["op_calls_forward"],
        "op_calls_backward": pass_["op_calls_backward"],
        "op_calls_step": whole["op_calls"],
        "op_calls_all_step": whole["op_calls_all"],
        "op_calls_top": H.top_op_types(pass_["counts"], TOP_OP_TYPES),
    }


def profile_step(step, device: torch.device, top: int) -> dict:
    """One more step under ``torch.profiler``: where its time goes, per ATen op type (self time,
    so nested ops are not counted twice; on a GPU the device time too), the ``top`` op types by
    self host time and the rest summed."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    rows = [
        {
            "op": e.key,
            "calls": e.count,
            "self_cpu_ms": e.self_cpu_time_total / 1e3,
            "self_device_ms": getattr(e, "self_device_time_total", 0.0) / 1e3,
        }
        for e in prof.key_averages()
    ]
    rows.sort(key=lambda r: -r["self_cpu_ms"])
    rest = rows[top:]
    return {
        "total_cpu_ms": sum(r["self_cpu_ms"] for r in rows),
        "total_calls": sum(r["calls"] for r in rows),
        "top": rows[:top],
        "rest": {"op_types": len(rest), "calls": sum(r["calls"] for r in rest), "self_cpu_ms": sum(r["self_cpu_ms"] for r in rest)},
    }


def print_profile(rec, out=sys.stdout) -> None:
    """The profile of a record as a markdown table."""
    prof = rec["profile"]
    total = prof["total_cpu_ms"] or 1.0
    print(f"\nprofile, {rec['space']} {rec['mode']} (merge {rec['merge']}): {prof['total_cpu_ms'] / 1e3:.2f} s self CPU, {prof['total_calls']} calls", file=out)
    print("| op | calls | self CPU ms | share |", file=out)
    print("|---|---:|---:|---:|", file=out)
    for r in prof["top"] + [dict(op=f"({prof['rest']['op_types']} other op types)", **{k: prof["rest"][k] for k in ("calls", "self_cpu_ms")})]:
        print(f"| `{r['op']}` | {r['calls']} | {r['self_cpu_ms']:.1f} | {100 * r['self_cpu_ms'] / total:.1f} % |", file=out)


# ----------------------------------------------------------------------------- the parent
FLAGS = ("no_normalize", "compile", "cuda_graphs", "recompute", "saved_by_module", "counts", "no_counts")  # passed on to the child


def measure(args, **override) -> dict:
    """Run one measurement in a fresh process and return its JSON record."""
    opts = vars(args).copy()
    opts.update(override)
    cmd = [str(Path(__file__).resolve()), "--child"]
    for key in ("space", "mode", "batch", "image_size", "device", "repeats", "mask_fraction", "num_sep_dil", "num_double_sep", "merge"):
        cmd += [f"--{key.replace('_', '-')}", str(opts[key])]
    for key in ("partial_channels", "C", "cells", "threads"):
        if opts[key] is not None:
            cmd += [f"--{key.replace('_', '-')}", str(opts[key])]
    cmd += [f"--{key.replace('_', '-')}" for key in FLAGS if opts[key]]
    if opts.get("profile"):
        cmd += ["--profile", str(opts["profile"])]
    try:
        rec = runtime.run_fresh(cmd)
    except runtime.FreshProcessError as exc:
        raise RuntimeError(f"measurement {' '.join(cmd[1:])} failed:\n{exc.stderr}") from None
    if rec.get("others_cpu") is not None and rec["others_cpu"] > rec["busy_limit"]:
        print(
            f"WARNING {opts['space']}/{opts['mode']}: other processes took {100 * rec['others_cpu']:.0f}% of the "
            "CPUs while the steps were timed; step_seconds is unreliable (rerun on a quiet machine)",
            file=sys.stderr,
        )
    return rec


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:9.1f} MiB"


def compare(args, modes) -> list[dict]:
    rows = []
    for mode in modes:
        print(f"measuring {args.space} / {mode} (batch {args.batch}, {args.device}) ...", file=sys.stderr, flush=True)
        rows.append(measure(args, mode=mode))
    if not args.json:
        print_table(args, rows)
    return rows


def print_table(args, rows) -> None:
    """Costs and their ratios to plain (to the first row when plain was not measured)."""
    base = next((r for r in rows if r["mode"] == "plain"), rows[0])
    print(f"\n{args.space} space, batch {args.batch}, {args.image_size} x {args.image_size}, device {base['device']}")
    if base.get("step_seconds") is not None:
        print_costs(rows, base)
    if base.get("op_calls") is not None:
        print_counts(rows, base)
    for r in rows:
        if r.get("profile"):
            print_profile(r)
    return rows


COUNT_COLUMNS = (("op_calls_forward", "forward"), ("op_calls_backward", "backward"), ("op_calls", "fwd+bwd"),
                 ("op_calls_all", "profiler"), ("op_calls_step", "step"), ("op_calls_all_step", "profiler step"))


def print_counts(rows, base, out=None) -> None:
    """Op calls: dispatcher counts of forward, backward and both, the profiler's count of both,
    and the same two for a whole search step; the totals with their ratio to ``base``."""
    print("\nop calls (dispatcher; profiler: nested calls included)", file=out)
    print(f"{'mode':18s}" + "".join(f" {title:>14s}" for _, title in COUNT_COLUMNS), file=out)
    for r in rows:
        name = r["mode"] + (f" ({r['merge']})" if r["mode"] == "topo" else "")
        cells = []
        for key, _ in COUNT_COLUMNS:
            ratio = "" if key in ("op_calls_forward", "op_calls_backward") else f" {r[key] / base[key]:4.1f}x"
            cells.append(f"{r[key]:>{14 - len(ratio)}d}{ratio}")
        print(f"{name:18s} " + " ".join(cells), file=out)


def print_costs(rows, base) -> None:
    """Peak memory, saved bytes and step time, with their ratios to ``base``."""
    print(f"{'mode':10s} {'peak':>14s} {'saved':>14s} {'step s':>9s}  peak/plain  saved/plain  time/plain")
    for r in rows:
        print(
            f"{r['mode']:10s} {_fmt_bytes(r['peak_bytes'])} {_fmt_bytes(r['saved_bytes'])} {r['step_seconds']:9.3f}"
            f"  {r['peak_bytes'] / base['peak_bytes']:10.3f}  {r['saved_bytes'] / base['saved_bytes']:11.3f}"
            f"  {r['step_seconds'] / base['step_seconds']:10.3f}"
        )


def sweep(args) -> list[dict]:
    """Fig. 8: skip, max pool, avg pool plus 1..13 conv candidates (sep-dil and double-sep in
    the 5:7 proportion of the paper's exaggerated space), plain against topo."""
    rows = []
    try:
        from tqdm import tqdm
    except ImportError:  # progress bar only
        def tqdm(items, **_):
            return items

    counts = list(range(4, 17, args.sweep_step))
    jobs = [(n, mode) for n in counts for mode in ("plain", "topo")]
    for n, mode in tqdm(jobs, desc="sweep", file=sys.stderr):
        convs = n - 3
        sep_dil = round(convs * 5 / 12)
        rec = measure(args, space="exaggerated", mode=mode, num_sep_dil=sep_dil, num_double_sep=convs - sep_dil)
        rows.append(rec)
    # Under --json, stdout holds only the JSON lines: the summary goes to stderr.
    out = sys.stderr if args.json else sys.stdout
    per_candidate = (("peak_bytes", "memory", _fmt_bytes), ("step_seconds", "step-time", lambda v: f"{v:.3f} s"),
                     ("op_calls", "op-call (forward + backward)", lambda v: f"{v:.0f}"))
    print(file=out)
    for key, what, show in per_candidate:
        if rows[0].get(key) is None:
            continue
        slope = {mode: _slope([(r["num_ops"], r[key]) for r in rows if r["mode"] == mode]) for mode in ("plain", "topo")}
        print(f"{what} slope per added conv candidate: plain {show(slope['plain'])}, topo {show(slope['topo'])}"
              f" (ratio {slope['topo'] / slope['plain']:.3f}; merge {args.merge})", file=out)
    if rows[0].get("peak_bytes") is not None:
        _plot_sweep(rows, args.plot, out)
    return rows


def _slope(points):
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    return sum((x - mx) * (y - my) for x, y in points) / max(1e-12, sum((x - mx) ** 2 for x, _ in points))


def _plot_sweep(rows, path, out=sys.stdout):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode, style in (("plain", "o-"), ("topo", "s-")):
        pts = sorted((r["num_ops"], r["peak_bytes"] / 2**20, r["step_seconds"]) for r in rows if r["mode"] == mode)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, label="DARTS" if mode == "plain" else "DARTS + TopoNAS")
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], style, label="DARTS" if mode == "plain" else "DARTS + TopoNAS")
    axes[0].set(xlabel="candidate operations", ylabel="peak memory of a step (MiB)")
    axes[1].set(xlabel="candidate operations", ylabel="step time (s)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Search-step cost vs search-space size ({rows[0]['device']}, batch {rows[0]['batch']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}", file=out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", choices=("darts", "nb201", "exaggerated"), default="darts")
    p.add_argument("--mode", choices=MODES + ("all",), default=None, help="one mode (default: compare plain and topo)")
    p.add_argument("--partial-channels", type=int, default=None, help="PC-DARTS: 1/k of the channels go through the edge")
    p.add_argument("--mask-fraction", type=float, default=0.0, help="fraction of candidates masked per edge (Zero-One-Shot)")
    p.add_argument("--batch", type=int, default=None, help="default 64 on a GPU, 16 on a CPU")
    p.add_argument("--C", type=int, default=None, help="initial channels (default 16)")
    p.add_argument("--cells", type=int, default=None, help="DARTS: cells (8); NB201: cells per stage (5)")
    p.add_argument("--num-sep-dil", type=int, default=5, help="exaggerated space: separable dilated convs")
    p.add_argument("--num-double-sep", type=int, default=7, help="exaggerated space: double-stacked separable convs")
    p.add_argument("--no-normalize", action="store_true", help="topo without kernel normalization")
    p.add_argument("--merge", choices=MERGE_CHOICES, default="auto",
                   help="topo: form of the merged convs (auto: cheapest exact; separable: approximation)")
    p.add_argument("--recompute", action="store_true",
                   help="DARTS network: keep only the cell inputs, run the cells again in backward (recompute=True)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the step (toponas_kernels.nas.compile.compile_step); compiled before measuring")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA only: --compile with CUDA graphs (compile_step(cuda_graphs=True), inductor's "
                        "reduce-overhead mode); the op counts are left out")
    p.add_argument("--saved-by-module", action="store_true",
                   help="also split saved_bytes by the module that saved each storage (saved_by_module)")
    p.add_argument("--image-size", type=int, default=32, help="height and width of the random images (32: CIFAR)")
    p.add_argument("--counts", action="store_true",
                   help="host work only: the op_calls fields, no memory or timing (seconds at batch 2, 16 x 16)")
    p.add_argument("--no-counts", action="store_true", help="leave out the op_calls fields (they take a few more steps)")
    p.add_argument("--profile", type=int, nargs="?", const=12, default=0, metavar="TOP",
                   help="after timing, profile one more step: self time per ATen op type, the TOP (12) largest")
    p.add_argument("--device", default=None, choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--repeats", type=int, default=None, help="timed steps (default 5 GPU / 3 CPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of the measuring process (default: torch's)")
    p.add_argument("--json", action="store_true", help="print one JSON line per measurement")
    p.add_argument("--sweep", action="store_true", help="Fig. 8 sweep over 4-16 candidate ops, with a plot")
    p.add_argument("--sweep-step", type=int, default=2, help="candidate-count step of the sweep")
    p.add_argument("--plot", default=str(HERE / "fig8_scaling.png"), help="where the sweep plot goes")
    p.add_argument("--quick", action="store_true", help="small smoke run: batch 2, 1 repeat")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible here; use --device cpu")
    if args.quick:
        args.batch = args.batch or 2
        args.repeats = args.repeats or 1
    args.batch = args.batch or (64 if args.device == "cuda" else 16)
    args.repeats = args.repeats or (5 if args.device == "cuda" else 3)
    if args.partial_channels is not None and args.partial_channels < 1:
        p.error(f"--partial-channels must be a positive integer, got {args.partial_channels}")
    if not 0.0 <= args.mask_fraction < 1.0:
        p.error(f"--mask-fraction must be in [0, 1), got {args.mask_fraction}")
    if args.image_size < 8:
        p.error(f"--image-size must be at least 8 (the network halves it twice), got {args.image_size}")
    if args.cuda_graphs:
        if args.device != "cuda":
            p.error("--cuda-graphs needs --device cuda (CUDA graphs replay CUDA kernels)")
        if args.counts:
            p.error("--cuda-graphs and --counts exclude each other (the op counts are taken eagerly on a CPU thread)")
        args.compile, args.no_counts = True, True
    if args.counts and args.no_counts:
        p.error("--counts and --no-counts exclude each other")
    if args.counts and (args.profile or args.saved_by_module):
        p.error("--counts measures op calls only: leave out --profile and --saved-by-module")

    if args.child:
        args.mode = args.mode or "plain"
        print(json.dumps(child(args)))
        return 0
    H.package_source(out=sys.stderr)  # the children run this script with this path: the same package
    if args.sweep:
        rows = sweep(args)
    elif args.mode in MODES:
        rows = [measure(args)]
        if not args.json:
            print_table(args, rows)
    else:
        rows = compare(args, MODES if args.mode == "all" else ("plain", "topo"))
    if args.json:
        for r in rows:
            print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
