"""Shared benchmark helpers: where a number was taken (device, commit, torch), how it was timed
(median and quantiles, warm-up, cache flush between repetitions), the device's copy bandwidth,
peak memory, host work as op calls (``count_op_calls``: through the dispatcher and through
``torch.profiler``), the CSV every benchmark appends to, and the table printed last.

Used by ``bench/ops.py`` and meant for any later benchmark in this folder (``search_step.py``):
import it as ``import _harness as H`` after putting ``bench/`` on ``sys.path``.

Timing (``time_fn``):
  * GPU: one pair of CUDA events around each repetition; the work that prepares a repetition
    (``setup``, e.g. the forward pass before a backward-only timing) and the cache flush are
    queued before the start event, so they are not counted. As in ``triton.testing.do_bench``
    the repetitions are queued without a host sync, so the events measure device time (kernels
    plus the gaps between them) and host launch overhead is hidden while the host keeps ahead;
    ``Budget.sync_each`` synchronizes before each repetition instead, which counts it.
  * CPU: ``time.perf_counter`` around each repetition.
  * Both: a first call to size the run, then warm-up and repetitions by time budget (clamped to a
    minimum and maximum count), the last-level cache flushed before every repetition (a buffer
    larger than the cache is written) so that repeated runs do not measure the cache.
  * Reported: median and the 20th/80th percentiles of the per-repetition times.
"""

from __future__ import annotations

import csv
import datetime as _dt
import fcntl
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from toponas_kernels import runtime
from toponas_kernels.memory import quiet_stderr

REPO = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------- where and what


def device_name(device: torch.device) -> str:
    """GPU name and multiprocessor count, or the CPU model with the number of cores this process
    may use (``toponas_kernels.runtime.device_name``)."""
    return runtime.device_name(device)


def git_commit(ignore: tuple[str | os.PathLike, ...] = ()) -> str:
    """The checkout's short commit, with ``+dirty`` when the tree has changes (untracked files
    included) other than the paths in ``ignore`` (the benchmark's own output files)."""
    return runtime.git_commit(REPO, short=True, dirty=True, ignore=ignore) or "unknown"


def package_source(out=None) -> str:
    """The folder of the ``toponas_kernels`` this process imported. A script run as ``python
    bench/X.py`` has ``bench/`` on its path, not the checkout, so it imports the INSTALLED
    package, which need not be this checkout's code although ``commit`` names the checkout: with
    ``out`` given, say so there, and how to measure the checkout instead."""
    import toponas_kernels

    return _checked_package(Path(toponas_kernels.__file__).resolve().parent, out)


def child_package_source(out=None) -> str:
    """``package_source`` of a ``python -m toponas_kernels.cli`` child started from here (same
    working directory and environment): what search_cost.py and search_quality.py measure."""
    p = subprocess.run([sys.executable, "-c", "import toponas_kernels, os; print(os.path.dirname(os.path.realpath(toponas_kernels.__file__)))"],
                       capture_output=True, text=True)
    path = p.stdout.strip()
    return _checked_package(Path(path), out) if path else path


def _checked_package(path: Path, out) -> str:
    """``str(path)``; with ``out`` given and ``path`` not this checkout's package, one line there
    saying so and how to measure the checkout."""
    if out is not None and path != REPO / "toponas_kernels":
        print(f"bench: measuring the toponas_kernels at {path}, not this checkout's ({REPO}), while the commit "
              f"recorded is the checkout's; to measure the checkout, run from its root (search_cost, "
              f"search_quality), `pip install -e {REPO}`, or set PYTHONPATH={REPO} (after building it in place: "
              f"python setup.py build_ext --inplace)", file=out)
    return str(path)


def run_info(device: torch.device, ignore: tuple = ()) -> dict:
    """The columns that say where and when a row was measured."""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(ignore),
        "device": device_name(device),
        "torch": torch.__version__,
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- other load


def _proc_stat_times(pid: int) -> tuple[int, int]:
    """(ppid, utime + stime + cutime + cstime) of a process, in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[1]), sum(int(x) for x in fields[11:15])


def _own_tree_ticks() -> int:
    """CPU ticks used by this process, its threads and every live or reaped descendant (the
    compile workers of torch.compile included)."""
    me = os.getpid()
    info = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                info[int(name)] = _proc_stat_times(int(name))
            except (OSError, ValueError, IndexError):
                continue
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in info.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [me]
    while todo:
        pid = todo.pop()
        total += info.get(pid, (0, 0))[1]
        todo += children.get(pid, [])
    return total


def _machine_ticks() -> int:
    """Busy ticks of all CPUs (user, nice, system, irq, softirq, and steal by the hypervisor)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)


class CpuMeter:
    """Share of the machine's CPU capacity that other processes (and the hypervisor, as steal
    time) took between construction and ``share()``: 0 on an otherwise idle machine. CPU timings
    taken while it is high are not to be trusted. None where /proc is not there."""

    def __init__(self):
        try:
            self._t0 = (time.monotonic(), _machine_ticks(), _own_tree_ticks())
        except OSError:
            self._t0 = None

    def share(self) -> float | None:
        if self._t0 is None:
            return None
        t0, busy0, own0 = self._t0
        try:
            wall, busy, own = time.monotonic() - t0, _machine_ticks() - busy0, _own_tree_ticks() - own0
        except OSError:
            return None
        capacity = wall * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
        return max(0.0, (busy - own) / capacity) if capacity > 0 else None


# ----------------------------------------------------------------------------- cache flush


def _llc_bytes() -> int:
    """Size of the CPU's last-level cache from sysfs (0 if unknown)."""
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in base.glob("index*"):
        try:
            text = (idx / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            best = max(best, int(text.rstrip("KMG")) * mult)
        except ValueError:
            continue
    return best


_FLUSH: dict[str, torch.Tensor] = {}


def flush_cache(device: torch.device) -> None:
    """Read a buffer larger than the last-level cache (GPU: 256 MiB; CPU: twice the LLC, at
    least 64 MiB) so the next repetition starts cold. Reading, not writing: written lines stay
    dirty in the cache and their write-back would land inside the timed op."""
    key = str(device)
    buf = _FLUSH.get(key)
    if buf is None:
        nbytes = 256 << 20 if device.type == "cuda" else max(64 << 20, 2 * _llc_bytes())
        buf = _FLUSH[key] = torch.zeros(nbytes // 4, dtype=torch.int32, device=device)
    buf.sum()


# ----------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Per-repetition times in milliseconds and their summary."""

    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else math.nan

    def quantile(self, q: float) -> float:
        if not self.times:
            return math.nan
        s = sorted(self.times)
        pos = q * (len(s) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    @property
    def q20(self) -> float:
        return self.quantile(0.2)

    @property
    def q80(self) -> float:
        return self.quantile(0.8)

    @property
    def reps(self) -> int:
        return len(self.times)


@dataclass
class Budget:
    """How long to warm up and to repeat (milliseconds of measured time), with count limits."""

    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_warmup: int = 2
    min_reps: int = 10
    max_reps: int = 1000
    flush: bool = True
    # GPU: synchronize before each repetition, so host launch overhead is counted whenever the
    # host is slower than the device. Off (default, as do_bench): repetitions are queued ahead
    # and the events measure device time.
    sync_each: bool = False


GPU_BUDGET = Budget(warmup_ms=25, rep_ms=100, min_warmup=3, min_reps=10, max_reps=500)
CPU_BUDGET = Budget(warmup_ms=50, rep_ms=300, min_warmup=1, min_reps=5, max_reps=30)
QUICK_BUDGET = Budget(warmup_ms=0, rep_ms=0, min_warmup=1, min_reps=3, max_reps=3)


def _one(fn, setup, device: torch.device, budget: Budget) -> float:
    """One repetition in milliseconds; ``setup``'s work and the flush are outside the region."""
    arg = setup() if setup is not None else None
    if budget.flush:
        flush_cache(device)
    if device.type == "cuda":
        if budget.sync_each:
            torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        res = fn(arg)
        end.record()
        del res, arg
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    res = fn(arg)
    t1 = time.perf_counter()
    del res, arg
    return (t1 - t0) * 1e3


def host_time_us(fn, device: torch.device, calls: int = 20, rounds: int = 100) -> float:
    """Host time per call of ``fn`` in microseconds, without waiting for the device: the calling
    thread's CPU time (``time.thread_time``, so the time this thread spent waiting for a core on a
    busy machine is not counted), the least over ``rounds`` rounds of the mean over ``calls``
    calls, after a warm-up. For tiny inputs on one thread this is the host cost of the call."""
    for _ in range(calls // 4):
        fn()
    best = math.inf
    for _ in range(rounds):
        sync(device)
        t0 = time.thread_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.thread_time() - t0) / calls)
    sync(device)
    return best * 1e6


def time_fn(fn, device: torch.device, budget: Budget, setup=None) -> Timing:
    """Time ``fn(setup())`` (``fn(None)`` without setup): see the module docstring."""
    est = _one(fn, setup, device, budget)  # first call: sizes the run, never counted
    est = max(est, 1e-3)
    n_warm = max(budget.min_warmup, int(budget.warmup_ms / est))
    n_rep = min(budget.max_reps, max(budget.min_reps, int(budget.rep_ms / est)))
    for _ in range(n_warm):
        _one(fn, setup, device, budget)
    timing = Timing()
    if device.type == "cuda" and not budget.sync_each:
        # Queue every repetition, synchronize once: no host sync between repetitions.
        events = []
        for _ in range(n_rep):
            arg = setup() if setup is not None else None
            if budget.flush:
                flush_cache(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            res = fn(arg)
            end.record()
            del res, arg
            events.append((start, end))
        torch.cuda.synchronize(device)
        timing.times = [s.elapsed_time(e) for s, e in events]
    else:
        timing.times = [_one(fn, setup, device, budget) for _ in range(n_rep)]
    return timing


# ----------------------------------------------------------------------------- bandwidth


def copy_bandwidth(device: torch.device, nbytes: int | None = None, budget: Budget | None = None) -> float:
    """The device's measured copy bandwidth in GB/s (1e9 B/s): ``dst.copy_(src)`` over a buffer far
    larger than the last-level cache, bytes = read + write = 2 * size. GPU: 512 MiB; CPU: 256 MiB."""
    if nbytes is None:
        nbytes = 512 << 20 if device.type == "cuda" else 256 << 20
    if budget is None:
        budget = GPU_BUDGET if device.type == "cuda" else Budget(50, 300, 1, 5, 20)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda _: dst.copy_(src), device, Budget(**{**budget.__dict__, "flush": False}))
    del src, dst
    return gbps(2 * nbytes, t.median)


def copy_time(device: torch.device, nbytes: int, budget: Budget) -> float:
    """Median ms of ``dst.copy_(src)`` moving ``nbytes`` in all (read + write), timed like the ops
    (same budget and cache flush): the yardstick for shapes too small to reach the large-copy
    bandwidth, where launch and cache effects dominate."""
    src = torch.zeros(max(1, nbytes // 8), dtype=torch.int32, device=device)
    dst = torch.empty_like(src)
    return time_fn(lambda _: dst.copy_(src), device, budget).median


def gbps(nbytes: float, ms: float) -> float:
    if not ms or math.isnan(ms) or ms <= 0:
        return math.nan
    return nbytes / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------- memory


def peak_memory(fn, device: torch.device) -> int | None:
    """Peak bytes allocated by one call of ``fn`` (its result included) above what was allocated
    before it: ``toponas_kernels.memory_meter`` (GPU: the ``max_memory_allocated`` delta; CPU: the
    CPU allocator's events as ``torch.profiler`` records them, every ATen tensor). None if it
    cannot be measured."""
    from toponas_kernels import measure_memory

    try:
        return measure_memory(fn, device, saved=False).peak_bytes
    except RuntimeError:
        return None


# ----------------------------------------------------------------------------- host work: op calls


def _op_type(func) -> str:
    """``aten::mul`` for the overload ``aten::mul.Tensor``: an op's name without its overload."""
    return func.name().split(".", 1)[0]


class OpCounter(TorchDispatchMode):
    """Counts, per op type, every ATen or custom op call that reaches the Python dispatcher while
    it is active (a ``TorchDispatchMode``), forward and backward alike: each call that Python code,
    a Python autograd Function or the autograd layer issues (a backward formula's ops included),
    after composite ops have decomposed. The ops a kernel calls inside itself (a C++ op calling
    ATen) run below the mode and are not seen: ``count_profiler_ops`` counts those too. On a GPU
    each counted op that does work is at least one kernel launch issued by the host. ::

        with OpCounter() as c:
            loss.backward()
        c.total, c.counts.most_common(10)
    """

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[_op_type(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count_profiler_ops(fn) -> int:
    """Number of events ``torch.profiler`` records on the CPU during ``fn()``: every op call with
    the calls nested in it (what a C++ op calls inside, ``aten::empty`` of an output), the
    autograd engine's node events, and ``record_function`` ranges (an optimizer's step). Counted
    on the profiler's raw event list: ``prof.events()`` drops a call made directly inside a call
    of the same name (``aten::sum`` of one overload calling another) as a duplicate, 0.01 % of
    a plain DARTS forward + backward's events and 1.7 % of a separable topo one's."""
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        # the raw events: building FunctionEvent trees for a million calls would take gigabytes
        return sum(1 for e in prof.profiler.kineto_results.events() if e.name() != "[memory]")


def count_op_calls(phases, warmup: int = 1, profiler: bool = True, threads: int | None = 1) -> dict:
    """Host work of running ``phases`` in order, counted after ``warmup`` untimed runs (lazy
    caches, optimizer state and the like are built by then, so the counts are those of every
    later run), on ``threads`` CPU threads (restored after; None: as set). One thread, because
    some CPU kernels choose what they call inside by the thread count: the profiler's count of a
    DARTS forward + backward is 8 % lower on two threads, the dispatcher's the same. ``phases`` is a sequence of ``(name, fn)``; each ``fn`` gets what the previous one
    returned (``None`` for the first), e.g. ``[("forward", lambda _: loss_fn()), ("backward",
    lambda loss: loss.backward())]``.

    Returns ``op_calls`` (``OpCounter`` total of one run), ``op_calls_<name>`` per phase (when
    there is more than one), ``op_calls_all`` (``count_profiler_ops`` of one more run; left out
    without ``profiler``) and ``counts``: ``{name: Counter}`` of op types per phase. Same code,
    same numbers, whatever the machine's load. The dispatcher's counts do not depend on the
    data's size; the profiler's do, slightly: ATen's ``zero_`` calls ``fill_`` only above a size
    (the forward + backward of a 3-cell DARTS network records 0.1 % more events at batch 4 than at
    batch 2)."""
    phases = list(phases)
    if not phases:
        raise ValueError("phases: give at least one (name, fn)")

    def run_all():
        out = None
        for _, fn in phases:
            out = fn(out)

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for _ in range(warmup):
            run_all()
        counts = {}
        out = None
        for name, fn in phases:
            with OpCounter() as counter:
                out = fn(out)
            counts[name] = counter.counts
        del out
        result = {"op_calls": sum(c.total() for c in counts.values())}
        if len(phases) > 1:
            result.update({f"op_calls_{name}": c.total() for name, c in counts.items()})
        if profiler:
            result["op_calls_all"] = count_profiler_ops(run_all)
    finally:
        torch.set_num_threads(before)
    result["counts"] = counts
    return result


def top_op_types(counts: dict, top: int) -> list[dict]:
    """The ``top`` op types by calls over all phases of ``count_op_calls(...)["counts"]``, each
    ``{"op", "calls", <phase>: calls in that phase, ...}``, most calls first (ties by name)."""
    total: Counter[str] = Counter()
    for c in counts.values():
        total.update(c)
    rows = sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return [{"op": op, "calls": n, **{name: c.get(op, 0) for name, c in counts.items()}} for op, n in rows]


# ----------------------------------------------------------------------------- CSV and JSON


def append_csv(path: str | os.PathLike, rows: list[dict], columns: list[str]) -> None:
    """Append ``rows`` to the CSV at ``path``, writing the header once. If the file has another
    header (columns added since), it is rewritten with the union of both, old rows keeping empty
    cells in the new columns. A lock file beside it serialises concurrent writers."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old_header: list[str] | None = None
        if path.exists() and path.stat().st_size > 0:
            with open(path, newline="") as f:
                old_header = next(csv.reader(f), None)
        if old_header is None:
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)
        elif old_header == columns or set(columns) <= set(old_header):
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=old_header, extrasaction="ignore").writerows(rows)
        else:
            header = old_header + [c for c in columns if c not in old_header]
            with open(path, newline="") as f:
                old_rows = list(csv.DictReader(f))
            tmp = path.with_suffix(path.suffix + ".tmp")
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
                w.writeheader()
                w.writerows(old_rows)
                w.writerows(rows)
            os.replace(tmp, path)


def csv_value(v) -> str:
    """One CSV cell: floats to 4 significant digits (6 for small times), NaN/None as empty."""
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.6g}"
    return str(v)


def json_line(row: dict) -> str:
    """One JSON object per row (NaN as null)."""
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
    return json.dumps(clean, sort_keys=False)


# ----------------------------------------------------------------------------- table


def fmt(v, spec: str = ".3g", none: str = "-") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v == "":
        return none
    if isinstance(v, (int, float)):
        return format(v, spec)
    return str(v)


def format_table(rows: list[list[str]], header: list[str], right: set[int] | None = None) -> str:
    """A plain fixed-width table; columns in ``right`` are right-aligned (the numbers)."""
    right = right if right is not None else set(range(1, len(header)))
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(r):
        return "  ".join(
            str(c).rjust(widths[i]) if i in right else str(c).ljust(widths[i]) for i, c in enumerate(r)
        ).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep] + [line(r) for r in rows])
