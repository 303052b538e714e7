"""Smoke test of bench/search_cost.py --quick: every configuration runs through `toponas search`,
the table follows Eq. 29, and the table and plot are recorded in the given results file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import toponas_kernels

BENCH = Path(__file__).resolve().parent.parent / "bench" / "search_cost.py"


@pytest.mark.slow
def test_search_cost_quick(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmarks\n\nkept text\n")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(toponas_kernels.__file__))}
    # --rows keeps the run's folders (and so the mask files) for the checks below
    p = subprocess.run([sys.executable, str(BENCH), "--quick", "--only", "darts", "--json", "--results", str(results),
                        "--rows", str(tmp_path / "rows.jsonl"), "--mask-images", "6"],
                       capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert [(r["label"], r["topo"]) for r in rows] == [
        ("darts", "plain"), ("darts", "topo"),
        ("darts + random mask", "plain"), ("darts + random mask", "topo"),
        ("darts + zero-shot mask", "plain"), ("darts + zero-shot mask", "topo"),
        ("darts + PC 4 + zero-shot mask", "topo"),
    ]
    for r in rows:
        assert r["peak_bytes"] >= 0 and r["step_seconds"] > 0
    assert all(r["mask_seconds"] > 0 for r in rows if "zero-shot" in r["label"])
    # Algorithm 1 ran once: the later zero-shot configurations reuse the first one's mask file
    zero = [r for r in rows if "zero-shot" in r["label"]]
    assert [r["mask_reused"] for r in zero] == [False, True, True]
    assert len({r["mask_seconds"] for r in zero}) == 1
    first = json.load(open(zero[0]["mask_file"]))["masks"]
    assert all(json.load(open(r["mask_file"]))["masks"] == first for r in zero[1:])
    # --mask-images 6: Algorithm 1 ranked on 6 images (the training half holds 8), and the table says so
    assert [r["mask_images"] for r in zero] == [6, 6, 6]
    assert json.load(open(zero[0]["mask_file"]))["images"] == 6
    text = results.read_text()
    assert "kept text" in text and "<!-- search_cost nb201 cpu -->" in text and "normalized cost" in text
    lines = [line for line in text.splitlines() if line.startswith("| darts")]
    costs = [float(line.rstrip(" |").rsplit("|", 1)[1]) for line in lines]
    assert min(costs) >= 2.0 - 1e-9 and len(costs) == 7  # Eq. 29: 2 only for the lowest in both
    assert sum("(6 images)" in line for line in lines) == 1 and sum("(6 images, reused)" in line for line in lines) == 2
    assert (tmp_path / "search_cost_nb201_cpu.png").exists()
    # a second run replaces its section instead of adding another
    p = subprocess.run([sys.executable, str(BENCH), "--quick", "--only", "gdas", "--results", str(results)],
                       capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert results.read_text().count("<!-- search_cost nb201 cpu -->") == 1


@pytest.mark.slow
def test_search_quality_quick(tmp_path):
    """bench/search_quality.py --quick: search, retrain, summarize; a second start reuses the
    finished runs instead of running them again."""
    bench = BENCH.parent / "search_quality.py"
    results = tmp_path / "RESULTS.md"
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(toponas_kernels.__file__))}
    cmd = [sys.executable, str(bench), "--retrain", "--quick", "--seeds", "0,1", "--work", str(tmp_path / "w"), "--results", str(results)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(f.read_text()) for f in sorted((tmp_path / "w").glob("*/row.json"))]
    # darts plain / TopoNAS / TopoNAS without kernel normalization / TopoNAS separable merge, 2 seeds
    assert len(rows) == 8
    for r in rows:
        assert 0 <= r["test_accuracy"] <= 100 and 0 <= r["collapse"] <= 1
        ops = [o.split("~")[0] for g in r["genotype"].split("+") for o in g.strip("|").split("|")]
        assert r["collapse"] == sum(op in ("skip_connect", "none", "avg_pool_3x3") for op in ops) / 6
    text = results.read_text()
    assert "NOT the papers' CIFAR protocol" in text and "| darts / TopoNAS / no kernel norm | 2 |" in text
    assert "| darts / TopoNAS / merge separable | 2 |" in text
    stamp = {f: f.stat().st_mtime for f in (tmp_path / "w").glob("*/row.json")}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert p.returncode == 0
    assert {f: f.stat().st_mtime for f in (tmp_path / "w").glob("*/row.json")} == stamp


@pytest.mark.slow
def test_search_cost_rows_resume(tmp_path):
    """--rows FILE: rows are appended as they are measured and reused by a second start, which
    runs only what is missing."""
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(toponas_kernels.__file__))}
    rows_file = tmp_path / "rows.jsonl"
    cmd = [sys.executable, str(BENCH), "--quick", "--only", "gdas", "--json", "--rows", str(rows_file), "--no-record"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    first = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [(r["label"], r["topo"]) for r in first] == [("gdas", "plain"), ("gdas", "topo")]
    rows_file.write_text(json.dumps(first[0]) + "\n")  # as if killed after the first row
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "(measured before)" in p.stderr and p.stderr.count("(measured before)") == 1
    again = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert again[0] == first[0] and [(r["label"], r["topo"]) for r in again] == [("gdas", "plain"), ("gdas", "topo")]


@pytest.mark.slow
def test_search_quality_quick_darts_space(tmp_path):
    """--space darts: darts plain, TopoNAS and TopoNAS with the separable merge on the DARTS
    space; the collapse share is read from the DARTS genotypes (skip and pools)."""
    bench = BENCH.parent / "search_quality.py"
    results = tmp_path / "RESULTS.md"
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(toponas_kernels.__file__))}
    cmd = [sys.executable, str(bench), "--retrain", "--quick", "--space", "darts", "--seeds", "0", "--work", str(tmp_path / "w"),
           "--results", str(results)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = {r["label"]: r for r in (json.loads(f.read_text()) for f in (tmp_path / "w").glob("*/row.json"))}
    assert set(rows) == {"darts / plain", "darts / TopoNAS", "darts / TopoNAS / merge separable"}
    for r in rows.values():
        ops = [op for key in ("normal", "reduce") for op, _ in r["genotype"][key]]
        assert len(ops) == 16  # 8 edges per cell, normal and reduce
        assert r["collapse"] == sum(op in ("skip_connect", "avg_pool_3x3", "max_pool_3x3") for op in ops) / 16
    text = results.read_text()
    assert "### Search quality, DARTS space on synthetic" in text and "<!-- search_cost quality-darts-synthetic cpu -->" in text
