#!/usr/bin/env python
"""Benchmark of the public ops against plain PyTorch eager (and ``torch.compile`` of it).

    python bench/ops.py                       # GPU when present, CPU otherwise; default shapes
    python bench/ops.py --quick               # two tiny shapes per op, few repetitions (smoke test)
    python bench/ops.py --ops mixed_sum --dtype bfloat16 --backend cuda,triton,eager
    python bench/ops.py --backend all         # every backend; on CPU Triton runs under the
                                              # interpreter, on tiny shapes only
    python bench/ops.py --full                # the whole shape grid (GPU sized)

For every (op, shape, implementation): median time of the forward, the backward alone (the
forward is re-run outside the timed region) and both; the 20th/80th percentiles of "both";
achieved GB/s from the bytes model below and its fraction of the copy bandwidth measured in the
same run; peak memory of forward + backward; the speedup of "both" over eager; the host time
per call (``host_us``: forward + backward on a tiny version of the shape, one thread, so only
the Python and dispatch side counts); and the relative error of the output and every gradient
against a float64 eager run. A table is printed last; rows are written to a CSV only when asked
(``--csv FILE``, or ``--record`` for the tracked ``bench/results.csv``, keyed by device, commit,
op, shape, dtype, impl). See bench/RESULTS.md for the columns, the bytes models and results.

Implementations ("impl"): ``eager`` (what a NAS codebase writes, differentiated by autograd),
``compile`` (``torch.compile`` of that eager code; ``--no-compile`` skips it), and the package's
backends ``reference``, ``triton``, ``cpp``, ``cuda`` (``toponas_kernels.ops`` with
``backend=``). Default: cuda, triton, eager, compile on a GPU; cpp, eager, compile on CPU.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
RESULTS_CSV = HERE / "results.csv"
sys.path.insert(0, str(HERE))

OPS = ("mixed_sum", "merge_kernels", "channel_shuffle", "partial_channel_shuffle")
PACKAGE_BACKENDS = ("reference", "triton", "cpp", "cuda")
IMPL_ORDER = ("eager", "compile", "reference", "triton", "cpp", "cuda")
DTYPES = ("float32", "float16", "bfloat16")
# Triton on CPU runs in the interpreter (one program at a time, ~2 ms each): tiny shapes only.
TRITON_CPU_MAX_NUMEL = 1 << 16

COLUMNS = [
    "date", "commit", "device", "torch", "op", "impl", "shape", "dtype",
    "fwd_ms", "bwd_ms", "both_ms", "both_q20_ms", "both_q80_ms", "reps",
    "fwd_gbps", "bwd_gbps", "gbps", "copy_gbps", "copy_frac",
    "copy_same_frac", "peak_bytes", "speedup_vs_eager", "host_us", "rel_err", "others_cpu", "note",
]  # fmt: skip


# ============================================================================ arguments


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark toponas_kernels ops against PyTorch eager and torch.compile.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Results: bench/RESULTS.md explains the columns and bytes models.",
    )
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list of ops (default: all of {','.join(OPS)})")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument(
        "--backend",
        default="default",
        help="comma list of impls among eager,compile,reference,triton,cpp,cuda; 'all' for every "
        "one usable here (Triton on CPU under TRITON_INTERPRET, tiny shapes only); default: "
        "cuda,triton,eager,compile on GPU, cpp,eager,compile on CPU",
    )
    p.add_argument("--device", default=None, choices=("cuda", "cpu"), help="default: cuda when available")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="two tiny shapes per op, few reps (smoke test / CI)")
    size.add_argument("--full", action="store_true", help="the full shape grid (sized for a GPU)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the eager baseline")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--csv", default=None, metavar="FILE", help="append the rows to this CSV (default: none)")
    out.add_argument("--record", action="store_true", help=f"append the rows to the tracked {RESULTS_CSV.relative_to(HERE.parent)}")
    out.add_argument("--no-csv", action="store_true", help="write no CSV (the default; kept for old scripts)")
    p.add_argument("--json", action="store_true", help="also print one JSON object per row to stdout")
    p.add_argument("--no-flush", action="store_true", help="do not flush the cache between repetitions")
    p.add_argument(
        "--sync-each", action="store_true",
        help="GPU: synchronize before each repetition (counts host launch overhead; default: "
        "repetitions queued ahead as in triton.testing.do_bench)",
    )
    p.add_argument("--rep-ms", type=float, default=None, help="measured time budget per timing (ms)")
    p.add_argument(
        "--retries", type=int, default=None,
        help="CPU: re-time a row up to this many times while other processes take over 10%% of "
        "the CPUs (default 2 on CPU, 0 with --quick; none after 3 rows in a row stayed busy)",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in args.ops if o not in OPS]
    if bad:
        p.error(f"unknown op(s) {bad}; choose from {','.join(OPS)}")
    return args


def requested_impls(spec: str, device_type: str, no_compile: bool) -> list[str]:
    """Implementation names asked for, before checking what is available."""
    spec = spec.strip().lower()
    if spec == "default":
        names = ["cuda", "triton", "eager", "compile"] if device_type == "cuda" else ["cpp", "eager", "compile"]
    elif spec == "all":
        names = ["eager", "compile", *PACKAGE_BACKENDS]
    else:
        names = [n.strip() for n in spec.split(",") if n.strip()]
        bad = [n for n in names if n not in IMPL_ORDER]
        if bad:
            raise SystemExit(f"--backend: unknown impl(s) {bad}; choose from {','.join(IMPL_ORDER)} or 'all'")
    if no_compile:
        names = [n for n in names if n != "compile"]
    return sorted(dict.fromkeys(names), key=IMPL_ORDER.index)


# ============================================================================ cases


@dataclass
class Case:
    """One op at one shape: how to build its inputs, the eager code, the package call, and the
    bytes it must move at the least."""

    op: str
    key: str
    params: dict
    make_leaves: Callable  # (dtype, device, generator) -> list of leaf tensors (requires_grad)
    call_args: Callable  # leaves -> positional args of eager/fused
    eager: Callable  # (*args) -> output
    fused: Callable  # (*args, backend=) -> output
    fwd_elems: int  # elements read + written by the forward at the least
    bwd_elems: int  # elements read + written by the backward at the least
    numel: int  # elements of the largest single tensor (for the Triton-on-CPU size limit)
    notes: list = field(default_factory=list)
    tiny: Callable | None = None  # () -> the same case at a tiny shape, for host_us


def _randn(shape, dtype, device, gen):
    """Random normal data (never zeros: they hide unwritten outputs and can run faster)."""
    import torch

    return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


def _weights(k, dtype, device, gen):
    import torch

    # Positive weights that sum to 1, as softmax(alpha) gives; never all equal.
    return torch.softmax(torch.randn(k, generator=gen, device=device), 0).to(dtype)


# ---------------------------------------------------------------------------- mixed_sum
def eager_mixed_sum(ys, w):
    """What DARTS writes: ``sum(w * op(x) for w, op in zip(weights, self._ops))``."""
    return sum(w[k] * ys[k] for k in range(len(ys)))


def mixed_sum_case(b, c, h, k):
    from toponas_kernels import ops as T

    n = b * c * h * h

    def make(dtype, device, gen):
        ys = [_randn((b, c, h, h), dtype, device, gen) for _ in range(k)]
        return [t.requires_grad_() for t in ys + [_weights(k, dtype, device, gen)]]

    return Case(
        op="mixed_sum", key=f"B{b}xC{c}x{h}x{h}xK{k}", params=dict(B=b, C=c, H=h, K=k),
        make_leaves=make, call_args=lambda L: (L[:-1], L[-1]),
        eager=eager_mixed_sum, fused=lambda ys, w, backend: T.mixed_sum(ys, w, backend=backend),
        # fwd: read K*N, write N. bwd: read grad_out and the K outputs, write K grads.
        fwd_elems=(k + 1) * n, bwd_elems=(2 * k + 1) * n, numel=n,
        tiny=lambda: mixed_sum_case(1, 2, 2, k),
    )


# ---------------------------------------------------------------------------- merge_kernels
# Kernel sets (kernel size, dilation): merged size k_max = max((k - 1) * d + 1).
KERNEL_SETS = {
    "nb201": [(1, 1), (3, 1)],  # NAS-Bench-201 nor_conv_1x1 + nor_conv_3x3 (k_max 3)
    "darts": [(3, 1), (5, 1), (3, 2), (5, 2)],  # DARTS sep/dil 3x3, 5x5 (k_max 9)
    "ext8": [(1, 1), (3, 1), (5, 1), (7, 1), (3, 2), (5, 2), (3, 3), (3, 4)],  # K = 8 (k_max 9)
}


def eager_merge(kernels, weights, dilations, eps=1e-5):
    """The eager sequence merge_kernels replaces: per-output-channel standardization, centred
    embedding into k_max x k_max (F.pad; zero-insertion for dilation), weighted sum."""
    import torch.nn.functional as F

    kmax = max((kk.shape[-1] - 1) * d + 1 for kk, d in zip(kernels, dilations))
    out = None
    for i, (kk, d) in enumerate(zip(kernels, dilations)):
        mean = kk.mean(dim=(1, 2, 3), keepdim=True)
        std = (kk - mean).pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
        kh = (kk - mean) / (std + eps)
        if d > 1:
            span = (kh.shape[-1] - 1) * d + 1
            dil = kh.new_zeros(*kh.shape[:-2], span, span)
            dil[..., ::d, ::d] = kh
            kh = dil
        pad = (kmax - kh.shape[-1]) // 2
        term = weights[i] * F.pad(kh, (pad, pad, pad, pad))
        out = term if out is None else out + term
    return out


def merge_case(o, i, set_name):
    from toponas_kernels import ops as T

    spec = KERNEL_SETS[set_name]
    dil = [d for _, d in spec]
    kmax = max((k - 1) * d + 1 for k, d in spec)
    s = sum(o * i * k * k for k, _ in spec)
    out = o * i * kmax * kmax

    def make(dtype, device, gen):
        ks = [_randn((o, i, k, k), dtype, device, gen) for k, _ in spec]
        return [t.requires_grad_() for t in ks + [_weights(len(spec), dtype, device, gen)]]

    return Case(
        op="merge_kernels", key=f"O{o}xI{i}xK{len(spec)}-{set_name}",
        params=dict(O=o, I=i, K=len(spec), set=set_name, kmax=kmax),
        make_leaves=make, call_args=lambda L: (L[:-1], L[-1]),
        eager=lambda ks, w: eager_merge(ks, w, dil),
        fused=lambda ks, w, backend: T.merge_kernels(ks, w, dilations=dil, normalize="channel", backend=backend),
        # fwd: read the K kernels, write the merged one. bwd: read grad_out and the kernels
        # (statistics), write the kernel grads.
        fwd_elems=s + out, bwd_elems=out + 2 * s, numel=max(s, out),
        tiny=lambda: merge_case(2, 1, set_name),
    )


# ---------------------------------------------------------------------------- shuffles
def eager_channel_shuffle(x, groups):
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


def eager_partial_channel_shuffle(processed, bypass, groups):
    """PC-DARTS: ``channel_shuffle(torch.cat([processed, bypass], 1), k)``."""
    import torch

    return eager_channel_shuffle(torch.cat([processed, bypass], dim=1), groups)


def shuffle_case(b, c, h, g):
    from toponas_kernels import ops as T

    n = b * c * h * h

    def make(dtype, device, gen):
        return [_randn((b, c, h, h), dtype, device, gen).requires_grad_()]

    return Case(
        op="channel_shuffle", key=f"B{b}xC{c}x{h}x{h}xG{g}", params=dict(B=b, C=c, H=h, G=g),
        make_leaves=make, call_args=lambda L: (L[0],),
        eager=lambda x: eager_channel_shuffle(x, g),
        fused=lambda x, backend: T.channel_shuffle(x, g, backend=backend),
        fwd_elems=2 * n, bwd_elems=2 * n, numel=n,  # a permutation: read N, write N
        tiny=lambda: shuffle_case(1, 2 * g, 2, g),
    )


def partial_shuffle_case(b, c, h, g):
    from toponas_kernels import ops as T

    n = b * c * h * h
    cp = c // g  # PC-DARTS: 1/k of the channels go through the mixed op, the rest bypass it

    def make(dtype, device, gen):
        # As in PC-DARTS: processed is the mixed op's fresh output, bypass is the strided view
        # x[:, C/k:] of the edge input (made a leaf by detach, so no slice backward is timed).
        x = _randn((b, c, h, h), dtype, device, gen)
        return [
            _randn((b, cp, h, h), dtype, device, gen).requires_grad_(),
            x[:, cp:].detach().requires_grad_(),
        ]

    return Case(
        op="partial_channel_shuffle", key=f"B{b}xC{c}x{h}x{h}xG{g}", params=dict(B=b, C=c, H=h, G=g),
        make_leaves=make, call_args=lambda L: (L[0], L[1]),
        eager=lambda p, q: eager_partial_channel_shuffle(p, q, g),
        fused=lambda p, q, backend: T.partial_channel_shuffle(p, q, g, backend=backend),
        fwd_elems=2 * n, bwd_elems=2 * n, numel=n,  # both inputs read once, output written once
        tiny=lambda: partial_shuffle_case(1, 2 * g, 2, g),
    )


# ---------------------------------------------------------------------------- shape sets
def shape_sets(device_type: str, quick: bool, full: bool) -> tuple[dict, str]:
    """Cases per op, and a line that says which set was chosen."""
    if quick:
        return {
            "mixed_sum": [mixed_sum_case(2, 4, 8, 4), mixed_sum_case(4, 8, 16, 8)],
            "merge_kernels": [merge_case(8, 1, "darts"), merge_case(8, 8, "nb201")],
            "channel_shuffle": [shuffle_case(2, 8, 8, 4), shuffle_case(4, 16, 16, 2)],
            "partial_channel_shuffle": [partial_shuffle_case(2, 8, 8, 4), partial_shuffle_case(4, 16, 16, 2)],
        }, "quick: two tiny shapes per op, 3 repetitions (a smoke test; the numbers mean little)"
    merge = [merge_case(o, i, s) for o, i, s in [
        (16, 1, "darts"), (64, 1, "darts"),  # depthwise layers of sep/dil convs, DARTS C16/C64
        (16, 16, "darts"), (64, 64, "darts"),  # dense C x C: merged sep convs (P_i * D_i)
        (64, 64, "nb201"), (64, 64, "ext8"),
    ]]  # fmt: skip
    if full:
        bs, cs, hs = (64, 128, 256), (16, 32, 64), (32, 16)
        return {
            "mixed_sum": [mixed_sum_case(b, c, h, k) for b in bs for c in cs for h in hs for k in (4, 8, 16)],
            "merge_kernels": [merge_case(o, i, s) for o in (16, 32, 64) for i in (1, o) for s in KERNEL_SETS],
            "channel_shuffle": [shuffle_case(b, c, h, 4) for b in bs for c in cs for h in hs],
            "partial_channel_shuffle": [partial_shuffle_case(b, c, h, 4) for b in bs for c in cs for h in hs],
        }, "full grid: batch 64/128/256, C 16/32/64, 32x32 and 16x16, K 4/8/16; shuffles with 4 groups (PC-DARTS k=4)"
    if device_type == "cuda":
        ms = [(64, 16, 32, 4), (64, 16, 32, 8), (64, 16, 32, 16), (64, 32, 16, 8),
              (256, 16, 32, 8), (256, 64, 16, 8), (128, 64, 32, 8), (256, 64, 32, 16)]  # fmt: skip
        sh = [(64, 16, 32), (256, 16, 32), (64, 64, 16), (256, 64, 16), (256, 64, 32)]
        desc = "GPU set: batch 64-256, C 16-64, 32x32/16x16, K 4/8/16; shuffles with 4 groups (PC-DARTS k=4)"
    else:
        ms = [(64, 16, 32, 4), (64, 16, 32, 8), (64, 16, 32, 16), (64, 32, 16, 8), (64, 64, 16, 8)]
        sh = [(64, 16, 32), (64, 32, 16), (64, 64, 16)]
        desc = ("CPU set (sized for a few minutes on 2 cores): batch 64 only, C 16-64, 32x32/16x16, "
                "K 4/8/16; shuffles with 4 groups; fewer repetitions than on a GPU")  # fmt: skip
    return {
        "mixed_sum": [mixed_sum_case(*s) for s in ms],
        "merge_kernels": merge,
        "channel_shuffle": [shuffle_case(b, c, h, 4) for b, c, h in sh],
        "partial_channel_shuffle": [partial_shuffle_case(b, c, h, 4) for b, c, h in sh],
    }, desc


# ============================================================================ measuring


# CPU: a timing during which other processes took more than this share of the CPUs beyond the
# cores this run leaves idle (--threads below the core count) is repeated (--retries) and, if
# still busy, marked "busy" in its note.
BUSY_SHARE = 0.10


_BUSY_STREAK = [0]  # rows in a row that stayed busy after their retries


def busy_limit() -> float:
    import torch

    ncpu = os.cpu_count() or 1
    return BUSY_SHARE + max(0.0, 1.0 - torch.get_num_threads() / ncpu)

REL_TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


def rel_err(x, ref) -> float:
    """||x - ref|| / ||ref|| in float64 (inf for NaN or a shape mismatch)."""
    import torch

    if x is None or ref is None or x.shape != ref.shape:
        return math.inf
    x, ref = x.detach().double(), ref.detach().double()
    if not bool(torch.isfinite(x).all()):
        return math.inf
    den = ref.norm().item()
    num = (x - ref).norm().item()
    return num / den if den > 0 else num


# (calls per round, rounds) of host_us; --quick takes fewer.
HOST_REPS = [20, 100]  # many short rounds: the least of them is one no other process disturbed


def host_us(case: Case, impl: str, dtype, device, H) -> float | None:
    """Host time per call, in microseconds, of forward + backward of ``impl`` at the tiny
    version of ``case``, on one thread: the tensors are so small that the Python, dispatch and
    autograd work is what is timed (on a GPU the launches are queued, not waited for). None
    for torch.compile and the Triton interpreter, where it means nothing."""
    import torch

    if case.tiny is None or impl == "compile" or (impl == "triton" and device.type == "cpu"):
        return None
    tiny = case.tiny()
    leaves = tiny.make_leaves(dtype, device, torch.Generator(device=device).manual_seed(0))
    args = tiny.call_args(leaves)
    f = tiny.eager if impl == "eager" else (lambda *a: tiny.fused(*a, backend=impl))
    grad_out = torch.ones_like(f(*args))

    def step():
        torch.autograd.grad(f(*args), leaves, grad_out)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return H.host_time_us(step, device, *HOST_REPS)
    finally:
        torch.set_num_threads(threads)


def bench_case(case: Case, impls, dtype_name, device, budget, H, gen_seed, retries=0) -> list[dict]:
    import torch

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator(device=device).manual_seed(gen_seed)
    leaves = case.make_leaves(dtype, device, gen)
    args = case.call_args(leaves)
    with torch.no_grad():
        out_shape = case.eager(*args).shape
    grad_out = _randn(tuple(out_shape), dtype, device, gen)

    # float64 eager oracle for the output and every gradient
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    out64 = case.eager(*case.call_args(leaves64))
    ref = [out64.detach(), *torch.autograd.grad(out64, leaves64, grad_out.double())]
    del leaves64, out64

    elem = torch.finfo(dtype).bits // 8
    fwd_bytes, bwd_bytes = case.fwd_elems * elem, case.bwd_elems * elem
    # A copy of the same bytes, timed the same way: for small shapes the fair yardstick.
    same_copy_gbps = H.gbps(fwd_bytes + bwd_bytes, H.copy_time(device, fwd_bytes + bwd_bytes, budget))
    rows = []
    for impl in impls:
        note = []
        if impl == "triton" and device.type == "cpu":
            if case.numel > TRITON_CPU_MAX_NUMEL or dtype_name == "bfloat16":
                print(f"  skip triton (interpreter) on {case.op} {case.key} {dtype_name}: too large or bf16", file=sys.stderr)
                continue
            note.append("interpreter")
        if impl in PACKAGE_BACKENDS and case.notes:
            note += case.notes
        if impl == "eager":
            f = case.eager
        elif impl == "compile":
            torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no stale guards
            f = torch.compile(case.eager, dynamic=False)
        else:
            f = lambda *a, _b=impl: case.fused(*a, backend=_b)  # noqa: E731

        def fwd(_=None):
            return f(*args)

        def both(_=None):
            return torch.autograd.grad(f(*args), leaves, grad_out)

        def bwd(out):
            return torch.autograd.grad(out, leaves, grad_out)

        row = dict(op=case.op, impl=impl, shape=case.key, dtype=dtype_name)
        try:
            t0 = time.perf_counter()
            out = fwd()
            grads = torch.autograd.grad(out, leaves, grad_out)
            H.sync(device)
            first_s = time.perf_counter() - t0
            if impl == "compile":
                note.append(f"compile {first_s:.1f}s")
            err = max(rel_err(x, r) for x, r in zip([out, *grads], ref))
            del out, grads
            if not err <= REL_TOL[dtype_name]:
                note.append(f"MISMATCH rel_err {err:.2g}")
                print(f"  WARNING {case.op} {case.key} {impl}: rel_err {err:.3g} > {REL_TOL[dtype_name]}", file=sys.stderr)
            # A machine that stayed busy through the last rows' retries is busy for a while:
            # retrying then only triples the run time.
            tries = retries + 1 if _BUSY_STREAK[0] < 3 else 1
            for attempt in range(tries):
                meter = H.CpuMeter() if device.type == "cpu" else None
                t_fwd = H.time_fn(fwd, device, budget)
                t_bwd = H.time_fn(bwd, device, budget, setup=fwd)
                t_both = H.time_fn(both, device, budget)
                others = meter.share() if meter is not None else None
                if others is None or others <= busy_limit():
                    break
                print(f"  {case.op} {case.key} {impl}: other processes took {100 * others:.0f}% of the CPUs "
                      f"while timing{', again' if attempt < tries - 1 else ''}", file=sys.stderr)  # fmt: skip
            if others is not None and others > busy_limit():
                note.append(f"busy: others {100 * others:.0f}% CPU")
                _BUSY_STREAK[0] += 1
            else:
                _BUSY_STREAK[0] = 0
            peak = H.peak_memory(both, device)
            host = host_us(case, impl, dtype, device, H)
        except Exception as exc:  # a backend or torch.compile that fails here: report, go on
            msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            print(f"  FAILED {case.op} {case.key} {impl}: {msg}", file=sys.stderr)
            row.update(note="; ".join(note + [f"failed: {msg}"]))
            rows.append(row)
            continue
        row.update(
            fwd_ms=t_fwd.median, bwd_ms=t_bwd.median, both_ms=t_both.median,
            both_q20_ms=t_both.q20, both_q80_ms=t_both.q80, reps=t_both.reps,
            fwd_gbps=H.gbps(fwd_bytes, t_fwd.median), bwd_gbps=H.gbps(bwd_bytes, t_bwd.median),
            gbps=H.gbps(fwd_bytes + bwd_bytes, t_both.median),
            copy_same_frac=H.gbps(fwd_bytes + bwd_bytes, t_both.median) / same_copy_gbps,
            peak_bytes=peak, host_us=host, rel_err=err, others_cpu=others, note="; ".join(note),
        )  # fmt: skip
        rows.append(row)
        print(
            f"  {case.op:24s} {case.key:22s} {impl:9s} fwd {t_fwd.median:9.4f}  bwd {t_bwd.median:9.4f}  "
            f"both {t_both.median:9.4f} ms",
            file=sys.stderr,
        )
    eager = next((r for r in rows if r["impl"] == "eager" and r.get("both_ms")), None)
    for r in rows:
        if eager is not None and r.get("both_ms"):
            r["speedup_vs_eager"] = eager["both_ms"] / r["both_ms"]
    del leaves, args, grad_out, ref
    return rows


# ============================================================================ report


def print_table(rows, header_lines, H) -> None:
    head = ["op", "shape", "impl", "fwd ms", "bwd ms", "both ms", "q20-q80", "GB/s", "%copy", "%same", "x eager", "host us", "peak MiB", "rel err", "note"]
    body = []
    for r in rows:
        if r.get("both_ms") is None:
            body.append([r["op"], r["shape"], r["impl"], *["-"] * 11, r.get("note", "")])
            continue
        peak = r.get("peak_bytes")
        body.append([
            r["op"], r["shape"], r["impl"],
            H.fmt(r["fwd_ms"], ".4g"), H.fmt(r["bwd_ms"], ".4g"), H.fmt(r["both_ms"], ".4g"),
            f"{H.fmt(r['both_q20_ms'], '.3g')}-{H.fmt(r['both_q80_ms'], '.3g')}",
            H.fmt(r["gbps"], ".1f"), H.fmt(100 * r["copy_frac"], ".0f"), H.fmt(100 * r["copy_same_frac"], ".0f"),
            H.fmt(r.get("speedup_vs_eager"), ".2f"), H.fmt(r.get("host_us"), ".0f", "-"),
            H.fmt(None if peak is None else peak / 2**20, ".1f", "n/a"),
            H.fmt(r.get("rel_err"), ".1e"), r.get("note", ""),
        ])  # fmt: skip
    print()
    for line in header_lines:
        print(line)
    print(H.format_table(body, head, right=set(range(3, 14))))


def target_lines(rows, device_type: str, H) -> list[str]:
    """The kernels' targets (stated for an H100/H200; bench/RESULTS.md), checked against the fused rows."""
    out = []
    where = "" if device_type == "cuda" else " (targets are for an H100/H200; shown for reference only)"
    for r in rows:
        if r["impl"] not in PACKAGE_BACKENDS or r.get("both_ms") is None:
            continue
        frac, sp = r.get("copy_frac", math.nan), r.get("speedup_vs_eager")
        if r["op"] == "mixed_sum" and r["shape"].endswith("xK8"):
            ok = frac >= 0.8 and sp is not None and sp >= 2.5
            out.append(f"  mixed_sum {r['shape']} {r['impl']}: fwd+bwd {100 * frac:.0f}% of copy bw (>= 80%), "
                       f"{H.fmt(sp, '.2f')}x eager (>= 2.5x): {'met' if ok else 'MISSED'}")  # fmt: skip
        elif r["op"] in ("channel_shuffle", "partial_channel_shuffle"):
            ok = frac >= 0.8
            out.append(f"  {r['op']} {r['shape']} {r['impl']}: {100 * frac:.0f}% of copy bw (>= 80%): "
                       f"{'met' if ok else 'MISSED'}")  # fmt: skip
        elif r["op"] == "merge_kernels":
            ok = sp is not None and sp > 1.0
            out.append(f"  merge_kernels {r['shape']} {r['impl']}: {H.fmt(sp, '.2f')}x eager (> 1x): "
                       f"{'met' if ok else 'MISSED'}")  # fmt: skip
    # Host time per call (any device): fused <= 0.4 x eager for mixed_sum and merge_kernels
    # (eager launches many small ops), <= eager for the shuffles (eager is one copy there).
    limits = {"mixed_sum": 0.4, "merge_kernels": 0.4, "channel_shuffle": 1.0, "partial_channel_shuffle": 1.0}
    eager_host = {(r["op"], r["shape"]): r.get("host_us") for r in rows if r["impl"] == "eager"}
    for r in rows:
        base = eager_host.get((r["op"], r["shape"]))
        if r["impl"] in PACKAGE_BACKENDS and r.get("host_us") and base:
            ratio, limit = r["host_us"] / base, limits[r["op"]]
            out.append(f"  host {r['op']} {r['shape']} {r['impl']}: {r['host_us']:.0f} us per call = {ratio:.2f} x eager's "
                       f"{base:.0f} us (<= {limit:g}): {'met' if ratio <= limit else 'MISSED'}")  # fmt: skip
    return ([f"Targets{where}:"] + out) if out else []


# ============================================================================ main


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    impls = requested_impls(args.backend, device.type, args.no_compile)
    if device.type == "cpu" and "triton" in impls:
        # Must be set before toponas_kernels (and its Triton kernels) are imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")

    import _harness as H
    import toponas_kernels

    H.package_source(out=sys.stderr)
    avail = toponas_kernels.available_backends()
    dropped = [i for i in impls if i in PACKAGE_BACKENDS and i not in avail]
    if device.type == "cpu":
        dropped += [i for i in impls if i == "cuda" and i not in dropped]
    if device.type == "cuda":
        dropped += [i for i in impls if i == "cpp" and i not in dropped]
    impls = [i for i in impls if i not in dropped]
    if dropped:
        print(f"not available on {device.type} here (skipped): {', '.join(dropped)}; available: {avail}", file=sys.stderr)
    if not impls:
        raise SystemExit("nothing to run")

    torch.manual_seed(args.seed)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick:
        budget = H.QUICK_BUDGET
        HOST_REPS[:] = [20, 40]
    else:
        budget = H.GPU_BUDGET if device.type == "cuda" else H.CPU_BUDGET
    budget = H.Budget(**{**budget.__dict__, "flush": not args.no_flush, "sync_each": args.sync_each})
    if args.rep_ms is not None:
        budget.rep_ms = args.rep_ms

    cases, shape_desc = shape_sets(device.type, args.quick, args.full)

    csv_path = RESULTS_CSV if args.record else (Path(args.csv).resolve() if args.csv else None)
    ignore = () if csv_path is None else (csv_path, Path(str(csv_path) + ".lock"))
    info = H.run_info(device, ignore)
    print(f"device {info['device']}, commit {info['commit']}, torch {info['torch']}, impls {impls}", file=sys.stderr)
    print("measuring copy bandwidth ...", file=sys.stderr)
    copy_bw = H.copy_bandwidth(device, budget=None if not args.quick else H.Budget(0, 0, 1, 3, 3, False))
    print(f"copy bandwidth {copy_bw:.1f} GB/s", file=sys.stderr)

    retries = args.retries if args.retries is not None else (0 if args.quick or device.type == "cuda" else 2)
    all_rows = []
    load_start = os.getloadavg()[0]
    run_meter = H.CpuMeter()
    t_start = time.perf_counter()
    for op in args.ops:
        for case in cases[op]:
            rows = bench_case(case, impls, args.dtype, device, budget, H, args.seed, retries)
            for r in rows:
                r.update(info)
                r["copy_gbps"] = copy_bw
                r["copy_frac"] = (r["gbps"] / copy_bw) if r.get("gbps") is not None else math.nan
                if args.json:
                    print(H.json_line({c: r.get(c) for c in COLUMNS}), flush=True)
            if csv_path is not None:
                H.append_csv(csv_path, [{c: H.csv_value(r.get(c)) for c in COLUMNS} for r in rows], COLUMNS)
            all_rows += rows
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    elapsed = time.perf_counter() - t_start

    flush = "cache flushed before each repetition" if budget.flush else "no cache flush"
    timing = ("CUDA events, repetitions queued ahead (device time)" if device.type == "cuda" and not budget.sync_each
              else "CUDA events, sync before each repetition" if device.type == "cuda" else "perf_counter")  # fmt: skip
    peak = "torch.cuda.max_memory_allocated delta" if device.type == "cuda" else "CPU allocator events (torch.profiler)"
    load = ""
    if device.type == "cpu":
        load = f"; {torch.get_num_threads()} threads; load average at start {load_start:.2f}"
    header = [
        f"toponas_kernels ops benchmark: {info['device']} | commit {info['commit']} | torch {info['torch']} | {info['date']}{load}",
        f"dtype {args.dtype}; {shape_desc}",
        f"timing: {timing}, median of {budget.min_reps}-{budget.max_reps} repetitions after warm-up, {flush}; "
        f"q20-q80 of fwd+bwd; peak: {peak}",
        f"copy bandwidth (dst.copy_(src), read+write): {copy_bw:.1f} GB/s; GB/s and %copy are for fwd+bwd "
        f"(bytes model in bench/RESULTS.md); %same: of a copy of the same bytes timed alike; x eager = eager both_ms / both_ms; "
        "host us: fwd+bwd per call at a tiny shape, one thread; rel err vs float64 eager",
    ]
    others = run_meter.share()
    busy_rows = sum("busy:" in (r.get("note") or "") for r in all_rows)
    if device.type == "cpu" and others is not None:
        header.append(
            f"other processes took {100 * others:.0f}% of the CPUs over the run; {busy_rows} rows still busy "
            f"after {retries} retries (note 'busy': those timings are unreliable)"
        )
    if csv_path is not None:
        header.append(f"rows appended to {csv_path}; ran in {elapsed:.0f} s")
    print_table(all_rows, header, H)
    targets = target_lines(all_rows, device.type, H)
    if targets and not args.quick:
        print()
        print("\n".join(targets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
