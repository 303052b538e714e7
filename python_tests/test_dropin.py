"""Smoke test of the drop-in record: ``bench/dropin.py --quick --json`` runs end to end in a
subprocess and its rows have the documented fields; the structural memory saving shows even at
tiny sizes (topo keeps fewer bytes for backward than the original network, wrapped plain the
same bytes). Timing values are not checked (noise on tiny shapes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DROPIN = ROOT / "bench" / "dropin.py"


def _run(*extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, str(DROPIN), *extra], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow  # about 40 s for the DARTS layout alone on a busy 2-core machine
@pytest.mark.parametrize("supernet", ["darts", "all"])
def test_dropin_quick_rows(supernet):
    done = _run("--quick", "--json", "--supernet", supernet)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    by = {(r["supernet"].split(" (")[0], r["variant"]): r for r in rows}
    supernets = {s for s, _ in by}
    assert "DARTS layout" in supernets and (supernet == "all" or len(supernets) == 1)
    for s in supernets:
        assert {v for t, v in by if t == s} == {"original", "plain", "topo", "topo separable"}
        for v in ("original", "plain", "topo", "topo separable"):
            r = by[(s, v)]
            assert r["peak_bytes"] > 0 and r["saved_bytes"] > 0 and r["step_ms"] > 0 and r["op_calls"] > 0
        original = by[(s, "original")]
        assert abs(by[(s, "plain")]["saved_bytes"] - original["saved_bytes"]) <= 0.05 * original["saved_bytes"]  # same computation
        assert by[(s, "topo")]["saved_bytes"] < 0.6 * original["saved_bytes"]


def test_dropin_bad_argument_is_one_line():
    done = _run("--batch", "0")
    assert done.returncode != 0
    assert done.stderr.strip().count("\n") == 0 and "--batch" in done.stderr
