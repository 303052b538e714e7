"""The drop-in record: a user's own supernet as it is, against the same supernet with its edges
wrapped by ``FusedMixedOp.wrap`` (the user's own modules and tensors), on one search step.

    python bench/dropin.py                  # both supernets, a table
    python bench/dropin.py --json           # one JSON line per row
    python bench/dropin.py --quick          # tiny sizes (the smoke test)

Supernets: xautodl's NAS-Bench-201 ``TinyNetworkDarts`` (its search setting: ``affine=False``,
``track_running_stats=False``; skipped with a note when xautodl is absent) and a supernet laid
out as the DARTS reference ``model_search.py`` (``darts_reference.py``). Variants: ``original``
(the unwrapped network), and wrapped in ``plain``, ``topo`` (merge ``auto``) and ``topo`` with
``merge="separable"``.

Fields: ``peak_bytes`` and ``saved_bytes`` (bytes kept for backward) of one forward + backward,
from the package's public meter ``toponas_kernels.memory_meter`` (parameters apart); ``step_ms``
the median of ``--repeats`` timed forward + backward steps after one warm-up; ``op_calls`` the
dispatcher op calls of one forward + backward (``_harness.count_op_calls``, one thread).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402
import darts_reference as D  # noqa: E402

from toponas_kernels import memory_meter  # noqa: E402
from toponas_kernels.nas import NB201_PRIMITIVES, FusedMixedOp, wrap_supernet  # noqa: E402

VARIANTS = (("original", None, None), ("plain", "plain", "auto"), ("topo", "topo", "auto"), ("topo separable", "topo", "separable"))


def darts_edit(model, **options):
    """The user's edit of a DARTS-layout supernet (as docs/DROPIN.md shows it)."""
    for cell in model.cells:
        for i, mixed in enumerate(cell._ops):
            cell._ops[i] = FusedMixedOp.wrap(mixed._ops, **options)
    return model


def supernets(args):
    """(name, model, wrap(model, mode, merge)) for each supernet available."""
    out = []
    try:
        from xautodl.models.cell_searchs.search_model_darts import TinyNetworkDarts
    except ImportError:
        TinyNetworkDarts = None
        if args.supernet != "darts":
            print("# xautodl is not installed: the NAS-Bench-201 supernet is skipped", file=sys.stderr)
    if TinyNetworkDarts is not None and args.supernet != "darts":
        torch.manual_seed(0)
        net = TinyNetworkDarts(args.C, args.N, 4, 10, list(NB201_PRIMITIVES), False, False)
        out.append((f"xautodl NB201 (C {args.C}, N {args.N})", net, lambda m, mode, merge: wrap_supernet(m, mode=mode, merge=merge)))
    if args.supernet == "nb201":
        return out
    torch.manual_seed(0)
    net = D.Network(args.darts_C, 10, args.layers, torch.nn.CrossEntropyLoss(), steps=args.steps, multiplier=args.steps)
    out.append((f"DARTS layout (C {args.darts_C}, {args.layers} cells, {args.steps} steps)", net,
                lambda m, mode, merge: darts_edit(m, mode=mode, merge=merge)))
    return out


def _loss(model, x, y):
    out = model(x)
    return F.cross_entropy(out[1] if isinstance(out, tuple) else out, y)


def measure(model, x, y, repeats: int) -> dict:
    def step():
        model.zero_grad(set_to_none=True)
        _loss(model, x, y).backward()

    step()  # warm-up: plans, coefficient tables, lazy caches
    model.zero_grad(set_to_none=True)
    with memory_meter(x.device, params=model) as m:
        _loss(model, x, y).backward()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        H.sync(x.device)
        times.append(time.perf_counter() - t)
    counts = H.count_op_calls([("forward", lambda _: _loss(model, x, y)), ("backward", lambda loss: loss.backward())],
                              profiler=False)
    return {"peak_bytes": m.peak_bytes, "saved_bytes": m.saved_bytes, "step_ms": 1e3 * statistics.median(times),
            "op_calls": counts["op_calls"]}


def run(args) -> list[dict]:
    device = torch.device(args.device)
    rows = []
    for name, net, wrap in supernets(args):
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen).to(device)
        y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
        for variant, mode, merge in VARIANTS:
            model = copy.deepcopy(net)
            if mode is not None:
                model = wrap(model, mode, merge)
            row = {"supernet": name, "variant": variant, "batch": args.batch, "image_size": args.image_size,
                   "device": H.device_name(device), "torch": torch.__version__}
            row.update(measure(model.to(device), x, y, args.repeats))
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
    return rows


def print_table(rows, out=sys.stdout) -> None:
    mib = 2.0**20
    print("| supernet | variant | peak MiB | kept for backward MiB | step ms | op calls |", file=out)
    print("|---|---|---:|---:|---:|---:|", file=out)
    base = {}
    for r in rows:
        b = base.setdefault(r["supernet"], r)

        def rel(key, fmt):
            v = r[key] / mib if key.endswith("bytes") else r[key]
            text = format(v, fmt)
            return text if r is b else f"{text} ({r[key] / b[key]:.2f}x)"

        print(f"| {r['supernet']} | {r['variant']} | {rel('peak_bytes', '.1f')} | {rel('saved_bytes', '.1f')} | "
              f"{rel('step_ms', '.0f')} | {rel('op_calls', 'd')} |", file=out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--supernet", default="all", choices=("all", "nb201", "darts"), help="which supernets (default all)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--C", type=int, default=16, help="xautodl's C (default 16)")
    p.add_argument("--N", type=int, default=1, help="xautodl's cells per stage (default 1)")
    p.add_argument("--darts-C", type=int, default=8, help="the DARTS layout's C (default 8)")
    p.add_argument("--layers", type=int, default=5, help="the DARTS layout's cells (default 5)")
    p.add_argument("--steps", type=int, default=4, help="the DARTS layout's nodes per cell (default 4)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: steady times on a shared machine)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: batch 2, 8x8 images, C 4, 3 DARTS cells of 2 steps, 1 repeat")
    p.add_argument("--json", action="store_true", help="one JSON line per row instead of the table")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.image_size, args.C, args.darts_C, args.layers, args.steps, args.repeats = 2, 8, 4, 4, 3, 2, 1
    for name in ("batch", "image_size", "C", "N", "darts_C", "layers", "steps", "repeats", "threads"):
        if getattr(args, name) < 1:
            print(f"dropin.py: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        print(f"dropin.py: --device must be cpu, or cuda with a GPU visible, got {args.device!r}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    rows = run(args)
    if not rows:
        print("dropin.py: no supernet to measure (xautodl is not installed)", file=sys.stderr)
        return 1
    if not args.json:
        print(f"# one search step (forward + backward), batch {args.batch}, {args.image_size}x{args.image_size}, "
              f"float32, {rows[0]['device']}, {args.threads} thread(s), torch {torch.__version__}")
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
