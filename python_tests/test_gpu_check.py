"""``bench/gpu_check.sh``, the one command a GPU session runs first, tested through its dry run
on this CPU: every phase lands in the JSON record with its status, the large-shape check really
compared values (and its comparison catches a wrong one), a phase cut by its time box and a
spent budget are reported as such, and bad usage is one line with exit status 2."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"

_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)

RAN_ON_CPU = ("env", "build", "large_shapes", "compile_probe", "ops_quick", "search_plain", "search_topo", "search_separable")
GPU_ONLY = ("tests_cuda_vector", "tests_cuda", "tests_triton", "search_topo_small", "search_graphs_small")


def _run(out: Path, *args, env_extra=None, timeout=900) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # as a user runs it: the script sets what it needs
    env.pop("OUT", None)
    env.update(env_extra or {})
    cmd = ["bash", str(SCRIPT), "--dry-run", "--out", str(out), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _record(out: Path) -> dict:
    return json.loads((out / "gpu_check.json").read_text())


@pytest.mark.slow  # two minutes on two cores: the bench phases run for real on the CPU
def test_dry_run(tmp_path):
    """One dry run (a minute or more of CPU), checked three ways; one test, so that pytest-xdist
    never runs it twice."""
    proc = _run(tmp_path)
    _check_every_phase(proc, tmp_path)
    _check_large_shapes(tmp_path)
    _check_compile_ops_search(tmp_path)


def _check_every_phase(proc, out):
    rec = _record(out)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert rec["dry_run"] is True and rec["passed"] is True and rec["finished"]
    assert list(rec["phases"]) == list(gpu_check.PHASE_NAMES)
    for name in RAN_ON_CPU:
        p = rec["phases"][name]
        assert p["status"] == "ok", (name, p)
        assert p["rc"] == 0 and 0 <= p["seconds"] <= p["timeout_s"], (name, p)
    for name in GPU_ONLY:
        p = rec["phases"][name]
        assert p["status"] == "skipped" and "GPU" in p["reason"], (name, p)
    env = rec["environment"]
    assert env["torch"] == torch.__version__ and env["cores"] >= 1 and env["python"]
    build = rec["phases"]["build"]["numbers"]
    assert build["extension"] is True and "cpp" in build["backends"]
    summary = (out / "gpu_check_summary.md").read_text()
    assert summary.startswith("# gpu_check --dry-run: PASSED")
    for name in gpu_check.PHASE_NAMES:
        assert f"| {name} |" in summary
    assert "=== search_separable" in (out / "gpu_check.log").read_text()
    # what a device run brings back: a few plain files in one folder (at most 8)
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check_summary.md", "ops_quick.csv"]


def _check_large_shapes(out):
    n = _record(out)["phases"]["large_shapes"]["numbers"]
    assert n["device"] == "cpu" and "cpp" in n["backends"] and n["failed"] == 0
    ops = {r["op"] for r in n["rows"]}
    assert ops == {"mixed_sum", "masked_softmax", "merge_kernels", "channel_shuffle", "partial_channel_shuffle"}
    variants = {(r["op"], r["variant"]) for r in n["rows"] if r["backend"] == "cpp"}
    assert ("mixed_sum", "strided") in variants and ("mixed_sum", "masked") in variants
    for r in n["rows"]:
        assert r["ok"] and r["error"] is None and r["values"] > 0 and r["checks"] >= 2, r
        assert 0 <= r["max_err"] <= r["tol"], r
        if "shuffle" in r["op"]:
            assert r["max_err"] == 0 and r["tol"] == 0, r  # permutations: exact
    # something was computed: a float32 kernel agrees with float64 closely, not trivially
    assert any(0 < r["max_err"] < 1e-5 for r in n["rows"] if r["dtype"] == "float32")
    assert n["values"] == sum(r["values"] for r in n["rows"]) > 10_000


def _check_compile_ops_search(out):
    phases = _record(out)["phases"]
    (probe,) = phases["compile_probe"]["numbers"]["rows"]
    assert probe["ok"] and probe["graphs"] == 1 and probe["max_rel_diff_vs_eager"] <= 1e-4
    rows = phases["ops_quick"]["numbers"]["rows"]
    assert {r["op"] for r in rows} == {"mixed_sum", "channel_shuffle"} and all(r["both_ms"] > 0 for r in rows)
    with open(out / "ops_quick.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    modes = [(phases[p]["numbers"]["mode"], phases[p]["numbers"]["merge"]) for p in ("search_plain", "search_topo", "search_separable")]
    assert modes == [("plain", "auto"), ("topo", "auto"), ("topo", "separable")]
    for p in ("search_plain", "search_topo", "search_separable"):
        n = phases[p]["numbers"]
        assert n["batch"] == 2 and n["step_seconds"] > 0 and n["peak_bytes"] is not None, n


def test_phase_cut_by_its_time_box_is_reported(tmp_path):
    proc = _run(tmp_path, "--phases", "large_shapes", env_extra={"GPU_CHECK_TIMEOUT_LARGE_SHAPES": "1"}, timeout=300)
    assert proc.returncode == 1, proc.stderr
    rec = _record(tmp_path)
    p = rec["phases"]["large_shapes"]
    assert p["status"] == "timeout" and p["timeout_s"] == 1 and p["rc"] in (124, 137), p
    assert "time box" in p["reason"] and p["seconds"] < 30
    others = [rec["phases"][n] for n in RAN_ON_CPU if n != "large_shapes"]
    assert all(o["status"] == "skipped" and "not selected" in o["reason"] for o in others)
    assert all(rec["phases"][n]["status"] == "skipped" for n in GPU_ONLY)
    assert rec["passed"] is False
    assert "| large_shapes | timeout |" in (tmp_path / "gpu_check_summary.md").read_text()


def test_spent_budget_and_bad_usage(tmp_path):
    proc = _run(tmp_path, "--phases", "env", "--budget", "1", timeout=300)
    assert proc.returncode == 1
    p = _record(tmp_path)["phases"]["env"]
    assert p["status"] == "not_run" and "budget" in p["reason"], p
    for args in (["--bogus"], ["--phases", "nope"], ["--budget", "soon"]):
        bad = _run(tmp_path / "bad", *args, timeout=120)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, (args, bad.stderr)
        assert bad.stderr.startswith("gpu_check.sh: ")
    no_out = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if k != "OUT"}, timeout=120)
    assert no_out.returncode == 2 and "--out" in no_out.stderr


def test_comparison_catches_a_wrong_value():
    e = torch.randn(1000, dtype=torch.float64)
    good = gpu_check._compare("x", e.float(), e, "float32", 8, exact=False)
    assert good["ok"] and 0 < good["err"] <= good["tol"]
    bad = e.float().clone()
    bad[123] += 1e-3 * float(e.abs().max())  # one element off by 0.1 % of the scale
    assert not gpu_check._compare("x", bad, e, "float32", 8, exact=False)["ok"]
    nan = e.float().clone()
    nan[7] = float("nan")
    assert not gpu_check._compare("x", nan, e, "float32", 8, exact=False)["ok"]
    swapped = e.clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert not gpu_check._compare("x", swapped, e, "float64", 1, exact=True)["ok"]
    assert gpu_check._compare("x", e.clone(), e, "float64", 1, exact=True)["ok"]


def test_pytest_counts_survive_a_cut_short_run():
    log = "\n".join([
        "python_tests/test_mixed.py::test_a[cuda] PASSED                   [  1%]",
        "python_tests/test_mixed.py::test_b[cuda-torch.float32] FAILED     [  2%]",
        "python_tests/test_mixed.py::test_c[cuda] SKIPPED (needs x)        [  3%]",
        "python_tests/test_mixed.py::test_d[cuda] PASSED                   [  4%]",
    ])
    n = gpu_check.pytest_numbers(log)  # killed before pytest's last line
    assert (n["passed"], n["failed"], n["skipped"], n["finished"]) == (2, 1, 1, False)
    assert n["first_failures"] == ["python_tests/test_mixed.py::test_b[cuda-torch.float32]"]
    done = gpu_check.pytest_numbers(log + "\n===== 1 failed, 2 passed, 1 skipped in 3.21s =====")
    assert done["finished"] and done["pytest_summary"] == "1 failed, 2 passed, 1 skipped"
    assert gpu_check._status("tests_cuda", 0, gpu_check.pytest_numbers("")) == "failed"  # nothing ran
    assert gpu_check._status("tests_cuda", 124, n) == "timeout"
    assert gpu_check._status("large_shapes", 1, {}) == "failed"
