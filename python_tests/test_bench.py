"""Smoke tests of the benchmark: ``bench/ops.py --quick`` runs end to end in a subprocess, its
JSON lines and CSV rows have the documented columns and sane values, and the CSV gets its header
once. Timing values themselves are not checked (they are noise on tiny shapes)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OPS_PY = ROOT / "bench" / "ops.py"

COLUMNS = [
    "date", "commit", "device", "torch", "op", "impl", "shape", "dtype",
    "fwd_ms", "bwd_ms", "both_ms", "both_q20_ms", "both_q80_ms", "reps",
    "fwd_gbps", "bwd_gbps", "gbps", "copy_gbps", "copy_frac",
    "copy_same_frac", "peak_bytes", "speedup_vs_eager", "host_us", "rel_err", "others_cpu", "note",
]  # fmt: skip
SHAPE_RE = {
    "mixed_sum": r"B\d+xC\d+x\d+x\d+xK\d+",
    "merge_kernels": r"O\d+xI\d+xK\d+-\w+",
    "channel_shuffle": r"B\d+xC\d+x\d+x\d+xG\d+",
    "partial_channel_shuffle": r"B\d+xC\d+x\d+x\d+xG\d+",
}
TIMES = ("fwd_ms", "bwd_ms", "both_ms", "both_q20_ms", "both_q80_ms")


def _run(tmp_path, *extra, device="cpu", timeout=600):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # ops.py interprets Triton only for CPU runs, itself
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))  # this checkout's package
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    cmd = [sys.executable, str(OPS_PY), "--quick", "--device", device, "--json", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc, rows


def _check_row(r: dict) -> None:
    assert list(r) == COLUMNS, f"columns differ: {list(r)}"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", r["date"]), r["date"]
    assert re.fullmatch(r"([0-9a-f]{4,40}(\+dirty)?|unknown)", r["commit"]), r["commit"]
    assert r["device"] and r["torch"]
    assert re.fullmatch(SHAPE_RE[r["op"]], r["shape"]), (r["op"], r["shape"])
    assert r["dtype"] == "float32"
    assert not (r["note"] or "").startswith("failed"), r
    for c in TIMES:
        assert isinstance(r[c], float) and r[c] > 0 and math.isfinite(r[c]), (c, r[c])
    assert r["both_q20_ms"] <= r["both_ms"] <= r["both_q80_ms"]
    assert isinstance(r["reps"], int) and r["reps"] >= 3
    for c in ("fwd_gbps", "bwd_gbps", "gbps", "copy_gbps", "copy_frac", "copy_same_frac", "speedup_vs_eager"):
        assert r[c] > 0 and math.isfinite(r[c]), (c, r[c])
    assert r["copy_frac"] == pytest.approx(r["gbps"] / r["copy_gbps"])
    assert r["peak_bytes"] is None or (isinstance(r["peak_bytes"], int) and r["peak_bytes"] >= 0)
    assert r["rel_err"] < 1e-4, r  # every impl matches the float64 eager run
    assert r["others_cpu"] is None or 0 <= r["others_cpu"] <= 1.5
    if r["impl"] == "compile" or (r["impl"] == "triton" and "interpreter" in (r["note"] or "")):
        assert r["host_us"] is None, r
    else:  # host time per call of fwd + bwd at a tiny shape: tens of microseconds to a few ms
        assert isinstance(r["host_us"], float) and 1 < r["host_us"] < 1e5, r


@pytest.mark.slow  # a minute: bench/ops.py --quick in a subprocess
def test_quick_run_json_csv_table(tmp_path):
    out = tmp_path / "results.csv"
    proc, rows = _run(tmp_path, "--no-compile", "--csv", str(out))
    ops = {r["op"] for r in rows}
    assert ops == set(SHAPE_RE), ops
    for r in rows:
        _check_row(r)
    # every (op, shape) has its eager baseline, with speedup 1 by definition
    for op, shape in {(r["op"], r["shape"]) for r in rows}:
        eager = [r for r in rows if (r["op"], r["shape"], r["impl"]) == (op, shape, "eager")]
        assert len(eager) == 1 and eager[0]["speedup_vs_eager"] == pytest.approx(1.0)
    assert {r["impl"] for r in rows} >= {"eager"}

    with open(out, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        body = list(reader)
    assert header == COLUMNS
    assert len(body) == len(rows)
    assert all(len(line) == len(COLUMNS) for line in body)
    for line, r in zip(body, rows):
        rec = dict(zip(header, line))
        assert (rec["op"], rec["impl"], rec["shape"]) == (r["op"], r["impl"], r["shape"])
        assert float(rec["both_ms"]) == pytest.approx(r["both_ms"], rel=1e-5)

    # the table comes last on stdout
    tail = proc.stdout.rstrip().splitlines()
    table_start = max(i for i, line in enumerate(tail) if line.startswith("op ") and "impl" in line)
    assert all(not line.startswith("{") for line in tail[table_start:])
    assert len(tail) - table_start - 2 == len(rows)


def test_default_run_writes_no_csv(tmp_path):
    tracked = ROOT / "bench" / "results.csv"
    before = tracked.read_bytes() if tracked.exists() else None
    proc, rows = _run(tmp_path, "--no-compile", "--ops", "channel_shuffle", "--backend", "eager")
    assert rows and "rows appended" not in proc.stdout
    assert (tracked.read_bytes() if tracked.exists() else None) == before
    bad = subprocess.run(
        [sys.executable, str(OPS_PY), "--quick", "--record", "--csv", str(tmp_path / "x.csv")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode != 0 and "--record" in bad.stderr


@pytest.mark.slow
def test_csv_header_written_once(tmp_path):
    out = tmp_path / "r.csv"
    _, rows1 = _run(tmp_path, "--no-compile", "--ops", "channel_shuffle", "--backend", "eager", "--csv", str(out))
    _, rows2 = _run(tmp_path, "--no-compile", "--ops", "channel_shuffle", "--backend", "eager", "--csv", str(out))
    lines = out.read_text().splitlines()
    assert sum(line.startswith("date,") for line in lines) == 1
    assert len(lines) == 1 + len(rows1) + len(rows2)


def test_bad_arguments_fail_cleanly(tmp_path):
    for extra in (["--ops", "nope"], ["--backend", "nope"]):
        proc = subprocess.run(
            [sys.executable, str(OPS_PY), "--quick", "--no-csv", *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode != 0
        assert "nope" in proc.stderr


def test_search_step_cuda_graphs_is_refused_off_cuda():
    """``--cuda-graphs`` replays CUDA kernels: on another device it is one line and exit status 2."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "search_step.py"), "--cuda-graphs", "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "needs --device cuda" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def _harness():
    spec = importlib.util.spec_from_file_location("_bench_harness", ROOT / "bench" / "_harness.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_harness_quantiles_and_csv_union(tmp_path):
    H = _harness()
    t = H.Timing([5.0, 1.0, 3.0, 2.0, 4.0])
    assert t.median == 3.0 and t.q20 == pytest.approx(1.8) and t.q80 == pytest.approx(4.2)
    path = tmp_path / "u.csv"
    H.append_csv(path, [{"a": "1", "b": "2"}], ["a", "b"])
    H.append_csv(path, [{"a": "3", "b": "4", "c": "5"}], ["a", "b", "c"])  # a column added later
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"a": "1", "b": "2", "c": ""}, {"a": "3", "b": "4", "c": "5"}]
    assert H.gbps(2e9, 1000.0) == pytest.approx(2.0)


@pytest.mark.slow
def test_quick_run_all_backends_with_compile(tmp_path):
    """Every impl usable here, torch.compile included (Triton runs under the interpreter)."""
    _, rows = _run(tmp_path, "--backend", "all", "--no-csv")
    assert {r["op"] for r in rows} == set(SHAPE_RE)
    impls = {r["impl"] for r in rows}
    assert {"eager", "compile", "reference"} <= impls, impls
    for r in rows:
        _check_row(r)


@pytest.mark.cuda
def test_quick_run_gpu(tmp_path):
    """The GPU paths of the harness (CUDA events, L2 flush, max_memory_allocated)."""
    _, rows = _run(tmp_path, "--no-csv", device="cuda")
    assert {r["op"] for r in rows} == set(SHAPE_RE)
    assert {"eager", "compile"} <= {r["impl"] for r in rows}
    for r in rows:
        _check_row(r)
        assert r["peak_bytes"] > 0 and r["others_cpu"] is None
