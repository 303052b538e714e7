#!/usr/bin/env python
"""The Python half of ``bench/gpu_check.sh``: the checks that are more than shell glue, and the
record of a run.

    python bench/gpu_check.py phases                  # the phase names, in the order they run
    python bench/gpu_check.py init   --out DIR [--dry-run] [--budget S]
    python bench/gpu_check.py env    --result FILE     # versions, GPU, toolkit, cores
    python bench/gpu_check.py build  --result FILE [--expect-cuda]
    python bench/gpu_check.py large  --result FILE [--device cuda|cpu]
    python bench/gpu_check.py compile --result FILE [--device cuda|cpu] [--backend inductor]
    python bench/gpu_check.py record --out DIR --phase NAME (--rc N --seconds S --timeout S --log FILE
                                     [--result FILE] | --status skipped|not_run --reason TEXT)

``record`` folds one phase into ``DIR/gpu_check.json`` and rewrites ``DIR/gpu_check_summary.md``
after every phase, so a run cut short still leaves a record of what finished. The record and
the summary need no torch: they are written in a fraction of a second.

The large-shape check runs every op on the given device's kernels (CUDA: the CUDA and Triton
backends at batch 256, 64 channels, 32 x 32, K = 8, in float32 and bfloat16; CPU: the C++ kernels
and, under TRITON_INTERPRET, Triton, on small shapes) forward and backward, contiguous, strided
and masked, and compares the output and every gradient with the float64 reference
(``toponas_kernels.ops.reference``, differentiated by autograd) computed from the same rounded
inputs. Permutations (the shuffles) must match exactly; the other ops within a normwise bound:
``max|kernel - ref| / max|ref| <= BASE[dtype] + 4 eps(acc) sqrt(n)``, n the length of the longest
sum behind one value (K for a mixed sum, the batch x spatial size for a weight's gradient).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RECORD = "gpu_check.json"
SUMMARY = "gpu_check_summary.md"
LOG = "gpu_check.log"

# (name, title), in the order gpu_check.sh runs them: correctness first, the compiled-Triton
# tests after the cheaper phases (their cold compiles take what time the budget has left) and
# the op benchmark last (its rows are recorded as they come, so a cut run still has some).
PHASES = (
    ("env", "environment record"),
    ("build", "in-place build (sm_90, MAX_JOBS = cores)"),
    ("tests_cuda_vector", "CUDA-marked tests: CUDA mixed_sum vector paths"),
    ("tests_cuda", "CUDA-marked tests: the other CUDA-backend cases"),
    ("large_shapes", "every op, large shapes, against float64"),
    ("compile_probe", "torch.compile of the ops"),
    ("search_plain", "bench/search_step.py plain"),
    ("search_topo", "bench/search_step.py topo"),
    ("search_separable", "bench/search_step.py topo --merge separable"),
    ("tests_triton", "CUDA-marked tests: compiled Triton"),
    ("ops_quick", "bench/ops.py --quick"),
    ("search_topo_small", "bench/search_step.py topo, 2 cells, eager"),
    ("search_graphs_small", "bench/search_step.py topo, 2 cells, CUDA graphs"),
)
PHASE_NAMES = tuple(name for name, _ in PHASES)
STATUSES = ("ok", "failed", "timeout", "skipped", "not_run")
TIMEOUT_RCS = (124, 137)  # timeout(1): TERM sent (124), or KILL after the grace period (128 + 9)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)  # a run killed mid-write never leaves half a record


def _read_json(path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _run(cmd: list[str], timeout: float = 20) -> str | None:
    """A command's stdout (stripped), or None when it is missing, fails or hangs."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


# ============================================================================ environment


def cuda_home() -> str | None:
    """The CUDA toolkit the build should use: $CUDA_HOME, else /usr/local/cuda, else nvcc's."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return str(Path(nvcc).resolve().parent.parent) if nvcc else None


def environment() -> dict:
    """What the numbers of this run depend on; never raises (a missing piece is None)."""
    env: dict = {
        "date": _now(),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        env["cpu"] = re.search(r"model name\s*:\s*(.*)", cpuinfo).group(1).strip()
    except (OSError, AttributeError):
        env["cpu"] = platform.processor() or None
    try:
        meminfo = Path("/proc/meminfo").read_text()
        env["memory_gib"] = round(int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1)) / 2**20, 1)
    except (OSError, AttributeError):
        env["memory_gib"] = None
    commit = _run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    if commit and _run(["git", "-C", str(REPO), "status", "--porcelain"]):
        commit += "+dirty"
    env["commit"] = commit or "unknown (no git checkout)"
    for mod in ("torch", "triton", "numpy", "setuptools", "ninja", "pytest"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent or broken: recorded as such
            env[mod] = None
    home = cuda_home()
    env["cuda_home"] = home
    nvcc = str(Path(home, "bin", "nvcc")) if home and Path(home, "bin", "nvcc").exists() else shutil.which("nvcc")
    version = _run([nvcc, "--version"]) if nvcc else None
    match = re.search(r"release ([\d.]+)", version or "")
    env["nvcc"] = match.group(1) if match else None
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"])
    env["nvidia_smi"] = smi.splitlines() if smi else None
    try:
        import torch

        env["torch_cuda"] = torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
        if env["cuda_available"]:
            props = torch.cuda.get_device_properties(0)
            env["gpu"] = props.name
            env["gpu_count"] = torch.cuda.device_count()
            env["gpu_capability"] = f"{props.major}.{props.minor}"
            env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
            env["gpu_sms"] = props.multi_processor_count
    except Exception as exc:  # noqa: BLE001
        env["torch_error"] = f"{type(exc).__name__}: {exc}"
    return env


def cmd_env(args) -> int:
    env = environment()
    print(json.dumps(env, indent=1))
    smi = _run(["nvidia-smi"])
    print(smi or "nvidia-smi: not available")
    _write_json(Path(args.result), {"environment": env})
    return 0


# ============================================================================ build check


def cmd_build(args) -> int:
    """What the import of the package finds built: extension, CUDA kernels, the build's record."""
    import torch  # noqa: F401

    import toponas_kernels
    from toponas_kernels import _lib

    numbers = {
        "package": str(Path(toponas_kernels.__file__).resolve().parent),
        "extension": _lib.HAS_CPP,
        "cuda_built": _lib.cuda_built(),
        "load_error": _lib.load_error,
        "backends": list(_lib.available_backends()),
    }
    config = _read_json(Path(toponas_kernels.__file__).resolve().parent / "_build_config.json") or {}
    numbers.update({f"config_{k}": v for k, v in config.items() if k in ("cuda", "arch_list", "cuda_home", "reason", "torch")})
    print(json.dumps(numbers, indent=1))
    _write_json(Path(args.result), {"numbers": numbers})
    if not numbers["extension"]:
        print(f"gpu_check: the extension did not load: {numbers['load_error']}", file=sys.stderr)
        return 1
    if args.expect_cuda and not numbers["cuda_built"]:
        print("gpu_check: the extension was built without CUDA kernels", file=sys.stderr)
        return 1
    return 0


# ============================================================================ large-shape check

BASE_TOL = {"float32": 1e-5, "float16": 4e-3, "bfloat16": 3e-2, "float64": 1e-12}


def _tolerance(dtype_name: str, n: int) -> float:
    eps_acc = 2.0**-52 if dtype_name == "float64" else 2.0**-23
    return BASE_TOL[dtype_name] + 4 * eps_acc * math.sqrt(max(n, 1))


def _noncontiguous(t):
    """The same values, every other element of a doubled last dim (no dense dim left)."""
    import torch

    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def _channel_slice(t):
    """The same values as a channel slice of a wider tensor (dense rows, batch/channel strides)."""
    import torch

    wide = torch.empty(t.shape[0], t.shape[1] + 3, *t.shape[2:], dtype=t.dtype, device=t.device)
    wide[:, 1 : 1 + t.shape[1]] = t
    return wide[:, 1 : 1 + t.shape[1]]


def _compare(name: str, actual, expected, dtype_name: str, n: int, exact: bool) -> dict:
    import torch

    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    if a.shape != e.shape:
        return dict(what=name, ok=False, error=f"shape {tuple(a.shape)} != {tuple(e.shape)}", values=0)
    diff = (a - e).abs()
    finite = bool(torch.isfinite(a).all()) or not bool(torch.isfinite(e).all())
    max_diff = float(diff.max()) if diff.numel() else 0.0
    if exact:
        ok, err, tol = finite and bool((a == e).all()), max_diff, 0.0
    else:
        scale = float(e.abs().max()) if e.numel() else 0.0
        err = max_diff / scale if scale > 0 else max_diff
        tol = _tolerance(dtype_name, n)
        ok = finite and err <= tol
    return dict(what=name, ok=bool(ok), err=err, tol=tol, values=int(a.numel()))


def _check(fn, ref, leaves, dtype_name, reductions, exact=False, extra=None) -> list[dict]:
    """fn and ref on the same values (ref on float64 copies), forward and backward with one
    upstream gradient; ``reductions[i]`` is the sum length behind output (0) / gradient i+1."""
    import torch

    xs = [t.detach().requires_grad_() for t in leaves]  # detach keeps the strides
    out = fn(*xs)
    g = torch.randn(out.shape, dtype=out.dtype, device=out.device)
    grads = torch.autograd.grad(out, xs, g)
    xs64 = [t.detach().to(torch.float64).requires_grad_() for t in leaves]
    out64 = ref(*xs64)
    grads64 = torch.autograd.grad(out64, xs64, g.to(torch.float64))
    rows = [_compare("out", out, out64, dtype_name, reductions[0], exact)]
    for i, (a, e) in enumerate(zip(grads, grads64)):
        rows.append(_compare(f"grad[{i}]", a, e, dtype_name, reductions[min(i + 1, len(reductions) - 1)], exact))
    if extra is not None:
        rows.extend(extra(out, grads))
    return rows


def large_cases(device: str, backends: list[str], dtypes: list, shape: tuple[int, int, int, int], k: int):
    """(op, variant, thunk) for every case; each thunk returns its comparison rows."""
    import torch

    from toponas_kernels import ops
    from toponas_kernels.ops import reference as R

    B, C, H, W = shape
    gen = torch.Generator(device=device).manual_seed(0)  # drawn where used: 16M values per tensor on a GPU

    def randn(*size, dtype):
        return torch.randn(*size, generator=gen, device=device, dtype=torch.float64).to(dtype)

    # K (at most 8) candidates for merge_kernels: sizes and dilations of the DARTS convs and a
    # few more (merged size 9)
    if not 1 <= k <= 8:
        raise ValueError(f"k: expected 1 to 8 merge candidates, got {k}")
    sizes = [1, 3, 5, 3, 5, 7, 3, 5][:k]
    dilations = [1, 1, 1, 2, 2, 1, 3, 2][:k]
    kmax = R.merged_size(sizes, dilations)
    cases = []
    for backend in backends:
        for dtype in dtypes:
            dn = str(dtype).replace("torch.", "")
            tag = (backend, dn)

            def mixed(layout, backend=backend, dtype=dtype, dn=dn):
                ys = [randn(B, C, H, W, dtype=dtype) for _ in range(k)]
                if layout == "strided":
                    ys = [_noncontiguous(y) for y in ys]
                w = randn(k, dtype=dtype)
                fn = lambda w, *ys: ops.mixed_sum(list(ys), w, backend=backend)  # noqa: E731
                ref = lambda w, *ys: R.mixed_sum_ref(list(ys), w)  # noqa: E731
                return _check(fn, ref, [w, *ys], dn, [k, B * C * H * W, 1])

            def masked_mixed(backend=backend, dtype=dtype, dn=dn):
                mask = torch.ones(k, dtype=torch.bool, device=device)
                mask[[0, k // 2, k - 1]] = False  # Zero-One-Shot: masked candidates are never run
                active = mask.nonzero().flatten().tolist()
                ys = [randn(B, C, H, W, dtype=dtype) for _ in active]
                alpha = randn(k, dtype=dtype)

                def fn(alpha, *ys):
                    w = ops.masked_softmax(alpha, mask, backend=backend)
                    return ops.mixed_sum(list(ys), w[active], backend=backend)

                def ref(alpha, *ys):
                    return R.mixed_sum_ref(list(ys), R.masked_softmax_ref(alpha, mask)[active])

                def masked_grad_zero(out, grads):
                    z = grads[0][~mask]
                    return [dict(what="grad[0][masked] == 0", ok=bool((z == 0).all()), err=float(z.detach().abs().max().double()), tol=0.0, values=int(z.numel()))]

                return _check(fn, ref, [alpha, *ys], dn, [k, B * C * H * W * len(active), 1], extra=masked_grad_zero)

            def softmax_rows(backend=backend, dtype=dtype, dn=dn):
                logits = randn(B * C, k, dtype=dtype)
                mask = torch.rand(B * C, k, generator=gen, device=device) < 0.6
                mask[torch.arange(B * C, device=device), torch.randint(0, k, (B * C,), generator=gen, device=device)] = True  # one kept
                fn = lambda x: ops.masked_softmax(x, mask, tau=0.7, backend=backend)  # noqa: E731
                ref = lambda x: R.masked_softmax_ref(x, mask, 0.7)  # noqa: E731

                def masked_zero(out, grads):
                    z = torch.cat([out[~mask], grads[0][~mask]])
                    return [dict(what="masked entries == 0", ok=bool((z == 0).all()), err=float(z.detach().abs().max().double()) if z.numel() else 0.0, tol=0.0, values=int(z.numel()))]

                return _check(fn, ref, [logits], dn, [k, k], extra=masked_zero)

            def merge(depthwise, layout, backend=backend, dtype=dtype, dn=dn):
                inner = 1 if depthwise else C
                norm = "tensor" if depthwise else "channel"
                kernels = [randn(C, inner, s, s, dtype=dtype) for s in sizes]
                if layout == "strided":
                    kernels = [_noncontiguous(t) for t in kernels]
                w = randn(k, dtype=dtype)
                fn = lambda w, *ks: ops.merge_kernels(list(ks), w, dilations, norm, backend=backend)  # noqa: E731
                ref = lambda w, *ks: R.merge_kernels_ref(list(ks), w, dilations, norm)  # noqa: E731
                n_stat = max(sizes) ** 2 * (inner if norm == "channel" else inner * C)  # one kernel's statistics
                return _check(fn, ref, [w, *kernels], dn, [n_stat, C * inner * kmax**2, n_stat])

            def shuffle(layout, backend=backend, dtype=dtype, dn=dn):
                x = randn(B, C, H, W, dtype=dtype)
                if layout == "strided":
                    x = _channel_slice(x)
                fn = lambda x: ops.channel_shuffle(x, 4, backend=backend)  # noqa: E731
                return _check(fn, lambda x: R.channel_shuffle_ref(x, 4), [x], dn, [1], exact=True)

            def partial(layout, backend=backend, dtype=dtype, dn=dn):
                x = randn(B, C, H, W, dtype=dtype)
                if layout == "strided":  # the PC-DARTS split: both sides are views of one tensor
                    parts = [x[:, : C // 4], x[:, C // 4 :]]
                else:
                    parts = [x[:, : C // 4].contiguous(), x[:, C // 4 :].contiguous()]
                fn = lambda p, q: ops.partial_channel_shuffle(p, q, 4, backend=backend)  # noqa: E731
                return _check(fn, lambda p, q: R.partial_channel_shuffle_ref(p, q, 4), parts, dn, [1], exact=True)

            cases += [
                (tag, "mixed_sum", "contiguous", lambda f=mixed: f("contiguous")),
                (tag, "mixed_sum", "strided", lambda f=mixed: f("strided")),
                (tag, "mixed_sum", "masked", masked_mixed),
                (tag, "masked_softmax", "masked rows", softmax_rows),
                (tag, "merge_kernels", "dense, channel norm", lambda f=merge: f(False, "contiguous")),
                (tag, "merge_kernels", "dense, strided", lambda f=merge: f(False, "strided")),
                (tag, "merge_kernels", "depthwise, tensor norm", lambda f=merge: f(True, "contiguous")),
                (tag, "channel_shuffle", "contiguous", lambda f=shuffle: f("contiguous")),
                (tag, "channel_shuffle", "channel slice", lambda f=shuffle: f("strided")),
                (tag, "partial_channel_shuffle", "contiguous", lambda f=partial: f("contiguous")),
                (tag, "partial_channel_shuffle", "PC-DARTS split", lambda f=partial: f("strided")),
            ]
    return cases


def cmd_large(args) -> int:
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import torch

    from toponas_kernels import _lib

    if args.device == "cpu":
        torch.set_num_threads(1)  # tiny shapes: one thread, immune to a busy machine
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("gpu_check large: --device cuda but no CUDA device is visible", file=sys.stderr)
            return 2
        shape, k = (256, 64, 32, 32), 8
        backends = [b for b in ("cuda", "triton") if b != "cuda" or _lib.cuda_built()]
        dtypes = {b: [torch.float32, torch.bfloat16] for b in backends}
    else:
        shape, k = (2, 8, 8, 8), 8
        backends = (["cpp"] if _lib.HAS_CPP else []) + (["triton"] if _lib.triton_available() else [])
        # float16 too for the C++ kernels; the interpreter is slow, so Triton in float32 only
        dtypes = {"cpp": [torch.float32, torch.float16], "triton": [torch.float32]}
    torch.manual_seed(0)
    rows, started = [], time.perf_counter()
    missing = [] if args.device == "cpu" or _lib.cuda_built() else ["cuda (not built)"]

    def save() -> dict:  # after every case: a run cut by its time box keeps the cases it finished
        numbers = dict(
            device=args.device, shape=list(shape), k=k, backends=backends, missing_backends=missing,
            cases=len(rows), failed=sum(not r["ok"] for r in rows), values=sum(r["values"] for r in rows),
            seconds=round(time.perf_counter() - started, 2), rows=rows,
        )
        _write_json(Path(args.result), {"numbers": numbers})
        return numbers

    for backend in backends:
        seen = set()
        for (be, dn), op, variant, thunk in large_cases(args.device, [backend], dtypes[backend], shape, k):
            if args.device == "cpu" and backend == "triton" and op in seen:
                continue  # the interpreter takes ~10 s per merge case: one case per op there
            seen.add(op)
            t0 = time.perf_counter()
            try:
                checks = thunk()
                error = None
            except Exception as exc:  # noqa: BLE001 - recorded per case; the others still run
                checks, error = [], f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            if args.device == "cuda":
                torch.cuda.synchronize()
            worst = max(checks, key=lambda c: (not c["ok"], c.get("err", 0.0) / (c.get("tol") or 1.0)), default=None)
            row = dict(
                op=op, variant=variant, backend=be, dtype=dn,
                ok=error is None and bool(checks) and all(c["ok"] for c in checks),
                values=sum(c["values"] for c in checks), checks=len(checks),
                max_err=worst.get("err") if worst else None, tol=worst.get("tol") if worst else None,
                worst=worst["what"] if worst else None, error=error, seconds=round(time.perf_counter() - t0, 3),
            )
            rows.append(row)
            save()
            print(f"{'ok  ' if row['ok'] else 'FAIL'} {be:7s} {dn:9s} {op:24s} {variant:24s} err {_fmt(row['max_err']):10s} "
                  f"tol {_fmt(row['tol']):9s} ({row['values']} values, {row['seconds']:.2f} s){'  ' + error if error else ''}",
                  flush=True)
    numbers = save()
    ok = rows and all(r["ok"] for r in rows) and not missing
    print(f"large-shape check: {len(rows) - numbers['failed']}/{len(rows)} cases ok, {numbers['values']} values compared"
          + (f"; missing {missing}" if missing else ""))
    return 0 if ok else 1


# ============================================================================ torch.compile probe


def cmd_compile(args) -> int:
    """One function over every op (softmax weights -> mixed sum -> merged kernel -> conv ->
    partial shuffle -> shuffle), compiled with fullgraph=True, run twice with new values:
    graphs made (1 expected: no break, no recompile), compile and step time, and the loss and
    gradients against eager."""
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    from torch._dynamo.backends.registry import lookup_backend

    from toponas_kernels import _lib, ops

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check compile: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    dev = torch.device(args.device)
    if dev.type == "cpu":
        torch.set_num_threads(1)
    torch.backends.cudnn.allow_tf32 = False  # eager and compiled convs must not differ by TF32 rounding
    kernel_backends = (["cuda"] if args.device == "cuda" and _lib.cuda_built() else []) + (["triton"] if args.device == "cuda" else [])
    if args.device == "cpu":
        kernel_backends = ["cpp"] if _lib.HAS_CPP else ["reference"]
    B, C, H, W, K = (16, 32, 16, 16, 4) if args.device == "cuda" else (2, 8, 8, 8, 4)

    def step(ys, alpha, mask, kernels, backend):
        w = ops.masked_softmax(alpha, mask, backend=backend)
        mixed = ops.mixed_sum(ys, w, backend=backend)
        merged = ops.merge_kernels(kernels, w, [1, 1, 2, 1], "channel", backend=backend)
        y = torch.nn.functional.conv2d(mixed, merged, padding=merged.shape[-1] // 2)
        z = ops.partial_channel_shuffle(y[:, : C // 4], y[:, C // 4 :], 4, backend=backend)
        return (ops.channel_shuffle(z, 2, backend=backend) ** 2).mean()

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        ys = [torch.randn(B, C, H, W, generator=g).to(dev).requires_grad_() for _ in range(K)]
        alpha = torch.randn(K, generator=g).to(dev).requires_grad_()
        kernels = [torch.randn(C, C, s, s, generator=g).mul(0.1).to(dev).requires_grad_() for s in (1, 3, 3, 5)]
        return ys, alpha, torch.tensor([True, True, False, True], device=dev), kernels

    results, ok = [], True
    for kb in kernel_backends:
        torch._dynamo.reset()
        graphs = []
        inner = lookup_backend(args.backend)

        def counting(gm, example_inputs, inner=inner, graphs=graphs):
            graphs.append(len(gm.graph.nodes))
            return inner(gm, example_inputs)

        compiled = torch.compile(step, backend=counting, fullgraph=True)
        row = dict(kernel_backend=kb, compile_backend=args.backend)
        try:
            times, worst = [], 0.0
            for seed in (1, 2):  # the second call must reuse the graph
                ys, alpha, mask, kernels = inputs(seed)
                leaves = [*ys, alpha, *kernels]
                t0 = time.perf_counter()
                loss = compiled(ys, alpha, mask, kernels, kb)
                grads = torch.autograd.grad(loss, leaves)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                ref_loss = step(ys, alpha, mask, kernels, kb)
                ref_grads = torch.autograd.grad(ref_loss, leaves)
                for a, e in zip([loss.detach(), *grads], [ref_loss.detach(), *ref_grads]):
                    scale = float(e.abs().max()) or 1.0
                    worst = max(worst, float((a - e).abs().max()) / scale)
            row.update(graphs=len(graphs), first_call_s=round(times[0], 3), second_call_s=round(times[1], 4),
                       max_rel_diff_vs_eager=worst, ok=len(graphs) == 1 and worst <= 1e-4, error=None)
        except Exception as exc:  # noqa: BLE001
            row.update(graphs=len(graphs), ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300])
        ok = ok and row["ok"]
        results.append(row)
        print(json.dumps(row), flush=True)
        _write_json(Path(args.result), {"numbers": dict(device=args.device, shape=[B, C, H, W], k=K, rows=results)})
    return 0 if ok and results else 1


# ============================================================================ phase logs -> numbers

PYTEST_LINE = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
PYTEST_TOTAL = re.compile(r"=+ (.*\d+ (?:passed|failed|skipped|error|errors|deselected).*) in [\d.]+s")


def pytest_numbers(log: str) -> dict:
    """Counts from ``pytest -v`` lines, so a run killed midway still counts what finished."""
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0, "xfail": 0, "xpass": 0}
    failures = []
    for line in log.splitlines():
        m = PYTEST_LINE.match(line)
        if m:
            key = m.group(2).lower()
            counts[key] += 1
            if key in ("failed", "error"):
                failures.append(m.group(1))
    total = None
    for line in log.splitlines():
        m = PYTEST_TOTAL.search(line)
        if m:
            total = m.group(1)
    numbers = {k: v for k, v in counts.items() if v or k in ("passed", "failed")}
    numbers["finished"] = total is not None
    if total:
        numbers["pytest_summary"] = total
    if failures:
        numbers["first_failures"] = failures[:15]
    return numbers


OPS_KEYS = ("op", "impl", "shape", "dtype", "both_ms", "speedup_vs_eager", "gbps", "copy_frac", "rel_err", "note")
SEARCH_KEYS = ("space", "mode", "merge", "batch", "image_size", "device", "step_seconds", "peak_bytes", "saved_bytes",
               "params", "op_calls", "op_calls_step", "cuda_graphs", "compile_seconds")


def json_lines(log: str) -> list[dict]:
    rows = []
    for line in log.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows


def phase_numbers(phase: str, log: str, result: dict | None) -> dict:
    if phase.startswith("tests_"):
        return pytest_numbers(log)
    if phase == "ops_quick":
        rows = [{k: r.get(k) for k in OPS_KEYS} for r in json_lines(log) if "op" in r and "impl" in r]
        return {"rows": rows, "device": next((r.get("device") for r in json_lines(log) if "device" in r), None)}
    if phase.startswith("search_"):
        rows = [r for r in json_lines(log) if "step_seconds" in r or "mode" in r]
        return {k: rows[-1].get(k) for k in SEARCH_KEYS if k in rows[-1]} if rows else {}
    return (result or {}).get("numbers", {})


# ============================================================================ the record


def _new_record(dry_run: bool, budget: float) -> dict:
    return {
        "schema": 1,
        "tool": "bench/gpu_check.sh",
        "dry_run": dry_run,
        "started": _now(),
        "finished": None,
        "budget_s": budget,
        "environment": {},
        "phases": {name: {"title": title, "status": "not_run", "reason": "not reached (the run stopped before it)"}
                   for name, title in PHASES},
    }


def cmd_init(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rec = _new_record(args.dry_run, args.budget)
    _write_json(out / RECORD, rec)
    (out / SUMMARY).write_text(render_summary(rec))
    return 0


def _status(phase: str, rc: int, numbers: dict) -> str:
    if rc in TIMEOUT_RCS:
        return "timeout"
    if rc != 0:
        return "failed"
    if phase.startswith("tests_") and not (numbers.get("passed") or numbers.get("failed")):
        return "failed"  # nothing ran: a selection that matched no test is not a pass
    return "ok"


def cmd_record(args) -> int:
    out = Path(args.out)
    rec = _read_json(out / RECORD) or _new_record(False, 0)
    if args.phase not in rec["phases"]:
        print(f"gpu_check record: unknown phase {args.phase!r}; expected one of {', '.join(PHASE_NAMES)}", file=sys.stderr)
        return 2
    entry = {"title": dict(PHASES)[args.phase]}
    if args.status:  # skipped / not_run, decided by the shell
        entry.update(status=args.status, reason=args.reason or "")
    else:
        log = Path(args.log).read_text(errors="replace") if args.log and Path(args.log).exists() else ""
        result = _read_json(args.result) if args.result else None
        numbers = phase_numbers(args.phase, log, result)
        status = _status(args.phase, args.rc, numbers)
        entry.update(status=status, rc=args.rc, seconds=round(args.seconds, 1), timeout_s=args.timeout, numbers=numbers)
        if status == "timeout":
            entry["reason"] = f"stopped by its {args.timeout:g} s time box"
        elif status == "failed":
            entry["reason"] = f"exit status {args.rc}" if args.rc else "no test ran"
        if status != "ok":
            entry["log_tail"] = log.splitlines()[-25:]
        if args.phase == "env" and result:
            rec["environment"] = result.get("environment", {})
    if args.reason and "reason" not in entry:
        entry["reason"] = args.reason
    rec["phases"][args.phase] = entry
    if args.elapsed is not None:
        rec["elapsed_s"] = round(args.elapsed, 1)
    counts: dict = {}
    for p in rec["phases"].values():
        counts[p["status"]] = counts.get(p["status"], 0) + 1
    rec["counts"] = counts
    rec["passed"] = not counts.get("failed") and not counts.get("timeout") and not counts.get("not_run")
    _write_json(out / RECORD, rec)
    (out / SUMMARY).write_text(render_summary(rec))
    return 0


def cmd_finish(args) -> int:
    """Stamp the end time; print the summary; exit 0 only when no phase failed or was cut."""
    out = Path(args.out)
    rec = _read_json(out / RECORD)
    if rec is None:
        print(f"gpu_check finish: no record in {out}", file=sys.stderr)
        return 2
    rec["finished"] = _now()
    rec["elapsed_s"] = round(args.elapsed, 1)
    _write_json(out / RECORD, rec)
    text = render_summary(rec)
    (out / SUMMARY).write_text(text)
    print(text)
    return 0 if rec.get("passed") else 1


# ============================================================================ the summary


def _fmt(v, spec="{:.3g}") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return spec.format(v)
    return str(v)


def _key_numbers(name: str, p: dict) -> str:
    n = p.get("numbers") or {}
    if name.startswith("tests_"):
        text = ", ".join(f"{n[k]} {k}" for k in ("passed", "failed", "error", "skipped") if n.get(k))
        return text + ("" if n.get("finished", True) else " (cut short)")
    if name == "build":
        return f"extension {n.get('extension')}, CUDA kernels {n.get('cuda_built')}, arch {n.get('config_arch_list')}"
    if name == "large_shapes":
        return (f"{n.get('cases', 0) - n.get('failed', 0)}/{n.get('cases', 0)} cases ok, {n.get('values', 0)} values "
                f"compared ({'/'.join(n.get('backends', []))}, shape {n.get('shape')}, K = {n.get('k')})")
    if name == "compile_probe":
        return "; ".join(f"{r['kernel_backend']}: {r.get('graphs')} graph(s), first call {_fmt(r.get('first_call_s'))} s, "
                         f"diff {_fmt(r.get('max_rel_diff_vs_eager'))}" for r in n.get("rows", []))
    if name == "ops_quick":
        return f"{len(n.get('rows', []))} rows"
    if name.startswith("search_"):
        if not n:
            return ""
        peak = n.get("peak_bytes")
        return (f"{n.get('mode')} ({n.get('merge')}{', CUDA graphs' if n.get('cuda_graphs') else ''}), batch {n.get('batch')}: "
                f"step {_fmt(n.get('step_seconds'))} s, "
                f"peak {_fmt(peak / 2**20 if peak is not None else None, '{:.1f}')} MiB")
    if name == "env":
        return ""
    return ""


def render_summary(rec: dict) -> str:
    env = rec.get("environment") or {}
    lines = [
        f"# gpu_check{' --dry-run' if rec.get('dry_run') else ''}: {'PASSED' if rec.get('passed') else 'NOT PASSED'}",
        "",
        f"started {rec.get('started')}, finished {rec.get('finished') or '(not finished)'}, "
        f"{_fmt(rec.get('elapsed_s'))} s of a {_fmt(rec.get('budget_s'))} s budget",
        "",
        f"- commit {env.get('commit', '?')}; device {env.get('gpu') or 'CPU (' + str(env.get('cpu')) + ')'}"
        f"{' (' + str(env.get('gpu_capability')) + ', ' + str(env.get('gpu_memory_gib')) + ' GiB)' if env.get('gpu') else ''}; "
        f"{env.get('cores', '?')} cores, {env.get('memory_gib', '?')} GiB",
        f"- torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), triton {env.get('triton')}, python {env.get('python')}, "
        f"nvcc {env.get('nvcc')} at {env.get('cuda_home')}, setuptools {env.get('setuptools')}",
        f"- nvidia-smi: {'; '.join(env.get('nvidia_smi') or ['none'])}",
        "",
        "| phase | status | s | box s | key numbers / reason |",
        "|---|---|---:|---:|---|",
    ]
    for name, p in rec["phases"].items():
        text = _key_numbers(name, p)
        if p.get("reason") and p["status"] != "ok":
            text = (text + "; " if text else "") + p["reason"]
        lines.append(f"| {name} | {p['status']} | {_fmt(p.get('seconds'))} | {_fmt(p.get('timeout_s'))} | {text} |")
    phases = rec["phases"]
    for name in PHASE_NAMES:
        n = phases[name].get("numbers") or {}
        if name.startswith("tests_") and n.get("first_failures"):
            lines += ["", f"{name}: first failures", ""] + [f"- `{t}`" for t in n["first_failures"]]
    large = (phases["large_shapes"].get("numbers") or {}).get("rows")
    if large:
        lines += ["", "## Large-shape check (normwise error against float64; shuffles exact)", "",
                  "| op | variant | backend | dtype | max err | tol | values | s | ok |", "|---|---|---|---|---:|---:|---:|---:|---|"]
        for r in large:
            lines.append(f"| {r['op']} | {r['variant']} | {r['backend']} | {r['dtype']} | {_fmt(r['max_err'])} | "
                         f"{_fmt(r['tol'])} | {r['values']} | {_fmt(r['seconds'])} | {'yes' if r['ok'] else 'NO ' + (r.get('error') or r.get('worst') or '')} |")
    ops_rows = (phases["ops_quick"].get("numbers") or {}).get("rows")
    if ops_rows:
        lines += ["", "## bench/ops.py --quick", "", "| op | shape | impl | dtype | both ms | x eager | rel err |",
                  "|---|---|---|---|---:|---:|---:|"]
        for r in ops_rows:
            lines.append(f"| {r['op']} | {r['shape']} | {r['impl']} | {r['dtype']} | {_fmt(r['both_ms'], '{:.4g}')} | "
                         f"{_fmt(r['speedup_vs_eager'], '{:.2f}')} | {_fmt(r['rel_err'], '{:.1e}')} |")
    search = [(n, phases[n].get("numbers")) for n in PHASE_NAMES if n.startswith("search_") and phases[n].get("numbers")]
    if search:
        lines += ["", "## bench/search_step.py", "", "| mode | merge | space | batch | image | step s | peak MiB | saved MiB | op calls |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for _, n in search:
            mib = lambda b: _fmt(b / 2**20 if b is not None else None, "{:.1f}")  # noqa: E731
            lines.append(f"| {n.get('mode')}{' (CUDA graphs)' if n.get('cuda_graphs') else ''} | {n.get('merge')} | {n.get('space')} | {n.get('batch')} | {n.get('image_size')} | "
                         f"{_fmt(n.get('step_seconds'), '{:.4g}')} | {mib(n.get('peak_bytes'))} | {mib(n.get('saved_bytes'))} | "
                         f"{_fmt(n.get('op_calls'))} |")
    return "\n".join(lines) + "\n"


# ============================================================================ command line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("phases", help="print the phase names in order")
    s = sub.add_parser("init", help="start a record in --out")
    s.add_argument("--out", required=True)
    s.add_argument("--dry-run", action="store_true")
    s.add_argument("--budget", type=float, default=0.0)
    for name in ("env", "build", "large", "compile"):
        s = sub.add_parser(name)
        s.add_argument("--result", required=True, help="JSON file for the phase's numbers")
        if name == "build":
            s.add_argument("--expect-cuda", action="store_true", help="fail when the CUDA kernels were not built")
        if name in ("large", "compile"):
            s.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
        if name == "compile":
            s.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    s = sub.add_parser("record", help="fold one phase into the record and rewrite the summary")
    s.add_argument("--out", required=True)
    s.add_argument("--phase", required=True)
    s.add_argument("--status", choices=("skipped", "not_run"), help="a phase that did not run")
    s.add_argument("--reason")
    s.add_argument("--rc", type=int, default=0)
    s.add_argument("--seconds", type=float, default=0.0)
    s.add_argument("--timeout", type=float, default=0.0)
    s.add_argument("--log")
    s.add_argument("--result")
    s.add_argument("--elapsed", type=float)
    s = sub.add_parser("finish", help="stamp the end, print the summary; exit 1 unless every phase passed or was skipped")
    s.add_argument("--out", required=True)
    s.add_argument("--elapsed", type=float, default=0.0)
    args = p.parse_args(argv)
    if args.cmd == "phases":
        print(" ".join(PHASE_NAMES))
        return 0
    return {"init": cmd_init, "env": cmd_env, "build": cmd_build, "large": cmd_large, "compile": cmd_compile,
            "record": cmd_record, "finish": cmd_finish}[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
