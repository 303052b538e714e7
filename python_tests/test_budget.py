"""Memory budget: the affine prediction of a search step's peak memory, and the fitting rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from toponas_kernels.search import SearchConfig, run
from toponas_kernels.search import budget as B
from toponas_kernels.search.config import ConfigError


@pytest.mark.parametrize(
    "kw",
    [
        dict(space="nb201", method="darts", topo="plain", layers=1),
        pytest.param(dict(space="nb201", method="gdas", topo="topo", layers=1), marks=pytest.mark.slow),
        pytest.param(dict(space="darts", method="darts", topo="topo", layers=3, init_channels=8), marks=pytest.mark.slow),
    ],
    ids=["nb201-darts-plain", "nb201-gdas-topo", "darts-darts-topo"],
)
def test_prediction_within_15_percent_of_the_measured_peak(kw):
    cfg = SearchConfig(dataset="synthetic", batch_size=16, threads=1, epochs=1, **kw)
    predicted = B.plan(cfg)
    assert [m["batch"] for m in predicted["measured"]] == [2, 4]
    measured = B.measure(cfg.resolved(), 16)  # 4x beyond the largest probe
    ratio = predicted["predicted_peak_bytes"] / measured["peak_bytes"]
    assert 0.85 <= ratio <= 1.15, (predicted, measured)


def test_parse_bytes():
    assert B.parse_bytes("6GiB") == 6 * 2**30
    assert B.parse_bytes("512 MiB") == 512 * 2**20
    assert B.parse_bytes("8e9") == 8 * 10**9
    assert B.parse_bytes("1.5GB") == 1_500_000_000
    for bad in ("six GiB", "-1GiB", "0", "3 parsecs"):
        with pytest.raises(ConfigError, match="--memory-budget"):
            B.parse_bytes(bad)


def _fake_measure(per_sample, fixed=100e6, per_sample_masked=None):
    """A stand-in for measuring a step: peak = fixed + b * slope, the slope depending on the
    partial channels and on the mask level the way the model assumes."""

    def measure(config, batch, *, mask_level=None):
        k = config.partial_channels or 1
        slope = per_sample / k
        if mask_level is not None:
            slope = per_sample * 0.2 + per_sample * 0.8 * mask_level
        return {"batch": batch, "peak_bytes": fixed + batch * slope, "step_seconds": 0.01 * batch}

    return measure


def test_fit_rules(monkeypatch):
    monkeypatch.setattr(B, "measure", _fake_measure(10e6))
    cfg = SearchConfig(space="darts", method="darts", dataset="synthetic", epochs=1, batch_size=64)
    # fits: nothing changes
    same, rec = B.fit(cfg, int(1e9), "batch")
    assert rec["chosen"] == {} and same.batch_size == 64
    # by batch: the largest batch with 100 MB + b * 10 MB <= 400 MB is 30
    new, rec = B.fit(cfg, int(400e6), "batch")
    assert new.batch_size == 30 and rec["chosen"] == {"batch_size": 30}
    assert rec["predicted_peak_bytes"] <= 400e6 < rec["requested_predicted_peak_bytes"]
    # by partial channels: 100 + 64 * 10 / k <= 300 -> k = 4 (k = 2 needs 420 MB)
    new, rec = B.fit(cfg, int(300e6), "pc")
    assert new.partial_channels == 4 and new.batch_size == 64
    # by mask: slope(xi) = 2 + 8 xi MB per sample; 100 + 64 (2 + 8 xi) <= 400 -> xi <= 0.336 -> 0.3
    new, rec = B.fit(cfg, int(400e6), "mask")
    assert new.mask == "random" and new.mask_level == pytest.approx(0.3)
    with pytest.raises(ConfigError, match="even batch 1"):
        B.fit(cfg, int(105e6), "batch")


def test_search_with_a_memory_budget_records_the_choice(monkeypatch, tmp_path):
    monkeypatch.setattr(B, "measure", _fake_measure(10e6))
    cfg = SearchConfig(space="nb201", method="darts", dataset="synthetic", epochs=1, batch_size=16, layers=1,
                       init_channels=4, train_size=16, progress=False, plots=False, out=str(tmp_path / "r"),
                       memory_budget="200MB")
    result = run(cfg, log=lambda m: None)
    assert result["batch_size"] == 10 and result["memory_budget"]["chosen"] == {"batch_size": 10}
    assert result["memory_budget"]["budget_bytes"] == 200_000_000
    assert "peak_memory_bytes" in result
    # resuming a finished budgeted run re-applies the choice instead of calling it a different config
    cfg.resume = True
    again = run(cfg, log=lambda m: None)
    assert again["batch_size"] == 10


def test_cli_plan(tmp_path):
    import toponas_kernels

    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(toponas_kernels.__file__))}
    p = subprocess.run([sys.executable, "-m", "toponas_kernels.cli", "plan", "--space", "nb201", "--method", "darts",
                        "--layers", "1", "--init-channels", "4", "--batch", "8", "--dataset", "synthetic", "--threads", "1",
                        "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["batch_size"] == 8 and out["predicted_peak_bytes"] > 0 and len(out["measured"]) == 2
    p = subprocess.run([sys.executable, "-m", "toponas_kernels.cli", "plan", "--space", "nb201", "--method", "darts",
                        "--memory-budget", "lots"], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and "--memory-budget" in p.stderr
