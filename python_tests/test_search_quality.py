"""bench/search_quality.py: the derived cells scored against a ground-truth table (a table made
here with known values, and the offline table when installed), the exact best-of-N expectation
of random search against enumeration, the rows file's resume (finished runs are skipped, a
finished run is recorded at once), the queue's order, and the search engine's schedules at a
tiny budget (GDAS's tau reaches its end, PC-DARTS' warm-up is added, beta-DARTS' lambda ends at
the reference's value)."""

import itertools
import json
import statistics
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import _quality_search as Q  # noqa: E402
import search_quality as SQ  # noqa: E402

from toponas_kernels import nb201_offline as O  # noqa: E402
from test_lookup import ARCHS as LOOKUP_ARCHS, nb201_table  # noqa: E402,F401  (the fixture)

ALL_CODES = list(itertools.product(range(5), repeat=6))
CONV3 = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|"
CUT = "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"
SKIPS = "|skip_connect~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|skip_connect~2|"
TINY = Q.Budget(epochs=2, train_size=64, batch=16, dataset="synthetic")


def _truth():
    """A table with known values: 10 for a cut-off cell, else 50 + 5 x (number of 3x3 convs)."""
    out = {}
    for code in ALL_CODES:
        arch = O.decode(code)
        out[code] = 10.0 if O.output_cut_off(arch) else 50.0 + 5.0 * code.count(O.OPS.index("nor_conv_3x3"))
    return out


def _row(method, topo, seed, genotype, seconds=10.0, budget=None):
    return {"method": method, "topo": topo, "seed": seed, "budget": budget or SQ.budget_dict(TINY),
            "genotype": genotype, "seconds": seconds, "arch_steps": 4}


def test_score_reads_each_cell_from_the_table():
    truth = _truth()
    rows = [_row("gdas", "plain", 0, CONV3), _row("gdas", "plain", 1, CUT), _row("gdas", "plain", 2, SKIPS),
            _row("gdas", "topo", 0, SKIPS, seconds=4.0)]
    scored = SQ.score(rows, truth, proxy_s=2.0)
    plain, topo = scored["searches"]
    assert (plain["method"], plain["topo"], topo["topo"]) == ("gdas", "plain", "topo")
    assert plain["accuracy"] == [80.0, 10.0, 50.0] and plain["seeds"] == [0, 1, 2]
    assert plain["mean"] == pytest.approx(140 / 3) and plain["std"] == pytest.approx(statistics.stdev([80, 10, 50]))
    assert plain["cut_off"] == 1 and topo["cut_off"] == 0
    assert plain["collapse"] == pytest.approx((0 + 1 + 1) / 3)  # none and skip are parameter-free
    assert plain["published"] == 93.61
    assert (plain["toponas_paper"], topo["toponas_paper"]) == (93.58, 92.08)  # Table III, GDAS / +TopoNAS
    values = list(truth.values())
    assert scored["random"]["mean"] == pytest.approx(statistics.fmean(values))
    assert scored["random"]["median"] == statistics.median(values) and scored["random"]["best"] == 80.0
    # 10 s of search at 2 s per proxy-ranked cell: best of 5
    assert plain["random_search_n"] == 5 and topo["random_search_n"] == 2
    assert plain["random_search"] == pytest.approx(SQ.expected_best_of(values, 5))
    assert plain["trajectory"] == [] and plain["max_weight"] is None  # rows without a trace
    md = SQ.score_table(scored)
    assert plain["skip"] == pytest.approx(1 / 3)
    assert "| gdas / plain | 0,1,2 | 80.0 / 10.0 / 50.0 | 46.67 ± 35.12 | 67% (33%) | 1 |" in md
    assert "| gdas / TopoNAS | 0 | 50.0 |" in md and "random cell" in md


def test_ground_truth_from_a_nas_bench_201_table_file(nb201_table, tmp_path):
    """``--table FILE``: a NAS-Bench-201 table (a small one in the published format, made by
    test_lookup.py) is the ground truth: every cell it holds, at its CIFAR-10 hp-200 test
    accuracy, scores the searches, end to end through the script."""
    from toponas_kernels.lookup import lookup

    truth, label = SQ.ground_truth(nb201_table)
    assert set(truth) == {O.encode(a) for a in LOOKUP_ARCHS}
    for arch in LOOKUP_ARCHS:
        assert truth[O.encode(arch)] == lookup(arch, nb201_table, dataset="cifar10", hp="200")["test_accuracy"]
    assert "NAS-Bench-201" in label and "analog" not in label
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([_row("darts", "plain", 0, LOOKUP_ARCHS[1]), _row("darts", "topo", 0, LOOKUP_ARCHS[2])]))
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "search_quality.py"), "--score-only", "--rows", str(rows),
                           "--table", nb201_table, "--json", "--epochs", str(TINY.epochs), "--train-size", str(TINY.train_size),
                           "--batch", str(TINY.batch), "--dataset", TINY.dataset], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    scored = json.loads(done.stdout[done.stdout.index("{"):])
    got = {(r["method"], r["topo"]): r["accuracy"] for r in scored["searches"]}
    assert got == {("darts", "plain"): [truth[O.encode(LOOKUP_ARCHS[1])]], ("darts", "topo"): [truth[O.encode(LOOKUP_ARCHS[2])]]}
    assert scored["random"]["best"] == max(truth.values())


def test_trajectory_scores_the_cell_of_every_epoch():
    truth = _truth()
    uniform = [[0.2] * 5] * 6
    decided = [[0.6, 0.1, 0.1, 0.1, 0.1]] * 6
    rows = [dict(_row("darts", "plain", s, CONV3), arch_weights=w,
                 trace=[{"epoch": 1, "genotype": CUT}, {"epoch": 2, "genotype": SKIPS}, {"epoch": 3, "genotype": CONV3},
                        {"epoch": 4, "genotype": first}])
            for s, (w, first) in enumerate([(uniform, CONV3), (decided, SKIPS)])]
    (s,) = SQ.score(rows, truth)["searches"]
    assert s["trajectory"] == [(1, 10.0), (2, 50.0), (3, 80.0), (4, 65.0)]
    assert s["max_weight"] == pytest.approx(0.4)
    md = SQ.trajectory_table(SQ.score(rows, truth), points=2)
    assert "| darts / plain | 50.0 (epoch 2) | 65.0 (epoch 4) | 0.400 |" in md


def test_expected_best_of_matches_enumeration():
    values = [3.0, 1.0, 4.0, 1.0, 5.0]
    for n in (1, 2, 3):
        tuples = list(itertools.product(values, repeat=n))
        exact = sum(Fraction(max(t)) for t in tuples) / len(tuples)
        assert SQ.expected_best_of(values, n) == pytest.approx(float(exact), rel=1e-12)
    assert SQ.expected_best_of(values, 1) == pytest.approx(statistics.fmean(values))
    assert SQ.expected_best_of(values, 10_000) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="n: expected a positive integer"):
        SQ.expected_best_of(values, 0)


def test_real_offline_table_scores_known_cells():
    try:
        truth, label = SQ.ground_truth("analog-nasbench")
    except O.OfflineTableError as exc:
        pytest.skip(f"the analog-nasbench package is not installed ({exc})")
    assert "not NAS-Bench-201's table" in label and len(truth) == 15625
    scored = SQ.score([_row("darts", "plain", 0, CUT), _row("darts", "plain", 1, O.table_stats()["best"]["arch"])], truth)
    assert scored["searches"][0]["accuracy"] == [10.0, O.table_stats()["best"]["test_accuracy"]]
    assert scored["random"]["median"] == pytest.approx(O.table_stats()["random_cell"]["median"])


def test_rows_resume_skips_finished_runs(tmp_path, monkeypatch):
    rows_path = tmp_path / "rows.json"
    bd = SQ.budget_dict(TINY)
    SQ.add_row(rows_path, _row("gdas", "plain", 0, CONV3, budget=bd))
    SQ.add_row(rows_path, _row("gdas", "plain", 0, SKIPS, budget={**bd, "epochs": 3}))  # another budget: not this run
    calls = []

    def fake_search(method, topo, seed, budget):
        calls.append((method, topo, seed))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed during the second new run
        return {"genotype": SKIPS, "seconds": 1.0, "arch_steps": 4}

    monkeypatch.setattr(Q, "search", fake_search)
    with pytest.raises(KeyboardInterrupt):
        SQ.run_searches(TINY, ["gdas"], ["plain", "topo"], [0, 1], rows_path, log=lambda s: None)
    assert calls == [("gdas", "topo", 0), ("gdas", "plain", 1)]  # (gdas, plain, 0) was finished
    kept = SQ.load_rows(rows_path)
    assert [(r["topo"], r["seed"], r["budget"]["epochs"]) for r in kept] == [("plain", 0, 2), ("plain", 0, 3), ("topo", 0, 2)]
    calls.clear()
    monkeypatch.setattr(Q, "search", lambda *a: calls.append(a[:3]) or {"genotype": CONV3, "seconds": 1.0, "arch_steps": 4})
    SQ.run_searches(TINY, ["gdas"], ["plain", "topo"], [0, 1], rows_path, log=lambda s: None)
    assert calls == [("gdas", "plain", 1), ("gdas", "topo", 1)]
    assert len(SQ.load_rows(rows_path)) == 5
    SQ.run_searches(TINY, ["gdas"], ["plain", "topo"], [0, 1], rows_path, log=lambda s: None)
    assert len(calls) == 2  # everything finished: nothing runs
    json.loads(rows_path.read_text())  # still one valid JSON document


def test_queue_is_seed_major_with_darts2_last():
    q = SQ.queue(["darts2", "gdas", "rome"], ["plain", "topo"], [0, 1])
    assert q[:4] == [("gdas", "plain", 0), ("gdas", "topo", 0), ("rome", "plain", 0), ("rome", "topo", 0)]
    assert q[-4:] == [("darts2", "plain", 0), ("darts2", "topo", 0), ("darts2", "plain", 1), ("darts2", "topo", 1)]


def test_schedules_scale_to_the_run():
    b = Q.Budget(epochs=32, train_size=1024, batch=16)
    assert b.steps() == 32
    pc = Q.schedule("pc-darts", b)
    assert pc["hparams"]["warmup_epochs"] == 10 and pc["epochs"] == 42 and pc["arch_steps"] == 1024
    assert pc["hparams"]["lr"] == pytest.approx(0.1 * 16 / 256)
    beta = Q.schedule("beta-darts", b)
    assert beta["hparams"]["beta_lambda"] * (b.epochs - 1) == pytest.approx(0.5 * 49)
    assert Q.schedule("rome", b)["hparams"]["rome_samples"] == 7
    with pytest.raises(ValueError, match="method: expected one of"):
        Q.schedule("enas", b)
    with pytest.raises(ValueError, match="epochs: need at least 2"):
        Q.Budget(epochs=1).check()


@pytest.mark.parametrize("method", ["gdas", pytest.param("pc-darts", marks=pytest.mark.slow),
                                    pytest.param("beta-darts", marks=pytest.mark.slow)])
def test_tiny_search_runs_each_schedule_to_its_end(method):
    r = Q.search(method, "plain", 0, TINY)
    plan = Q.schedule(method, TINY)
    assert r["epochs"] == plan["epochs"] and r["arch_steps"] == TINY.epochs * TINY.steps()
    assert r["steps"] == plan["epochs"] * TINY.steps()
    O.encode(r["genotype"])  # a valid NB201 cell
    last = r["trace"][-1]
    if method == "gdas":
        assert r["trace"][0]["tau"] == pytest.approx(10.0) and last["tau"] == pytest.approx(0.1)
    if method == "beta-darts":
        assert last["beta_lambda"] == pytest.approx(24.5)
    if method == "pc-darts":
        assert len(r["trace"]) == plan["epochs"]


def test_xautodl_terms_keep_the_forward_and_give_a_sampled_none_a_gradient():
    import torch

    import gdas_estimator as G

    x, y = Q.load_images(TINY)
    x, y = x[:8], y[:8]
    model = Q.build("gdas", "plain", TINY, in_channels=x.shape[1])
    model.tau = 10.0  # softmax((log_softmax(alpha) + g) / 10): probabilities not saturated

    def forward_and_grad():
        torch.manual_seed(0)
        out = model(x)
        (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(out, y), [model.alphas])
        return out.detach(), g

    names = list(model.space.names)
    last = len(model.alphas) - 1  # edge 3<-2, into the cell's output
    with torch.no_grad():  # the last edge draws none, every other nor_conv_3x3 (logits 5 above the rest)
        model.alphas.zero_()
        model.alphas[:last, names.index("nor_conv_3x3")] = 5.0
        model.alphas[last, names.index("none")] = 5.0
    out0, g0 = forward_and_grad()
    assert torch.count_nonzero(g0[last]) == 0 and torch.count_nonzero(g0[:last]) > 0  # a sampled none moves nothing
    handles = G.add_xautodl_terms(model)
    out1, g1 = forward_and_grad()
    assert torch.equal(out0, out1)  # the added terms are zeros in value
    assert torch.count_nonzero(g1[last]) > 0  # xautodl's: every op not sampled gets sum(dL/dout)
    assert not torch.allclose(g1[:last], g0[:last])
    for h in handles:
        h.remove()
    assert torch.equal(forward_and_grad()[1], g0)
