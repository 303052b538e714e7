"""Retraining (``toponas train``): genotype reading, the evaluation networks against the official
ones (parameter counts; AutoDL-Projects' ``xautodl`` as an oracle when installed), the auxiliary
head and drop-path, the loop end to end through the CLI, exact resume, and a search result
retrained."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from toponas_kernels import cli
from toponas_kernels.nas.networks import Genotype
from toponas_kernels.search import SearchConfig, run
from toponas_kernels.runtime import genotype_record, genotype_text
from toponas_kernels.train import (PUBLISHED, DartsEvalNetwork, GenotypeError, NB201EvalNetwork, TrainConfig,
                                   count_parameters, drop_path, load_arch, parse_genotype, train)
from toponas_kernels.train.darts_network import EvalCell
from utils import Killed, kill_after

NB201_BEST = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|"
NB201_MIXED = "|nor_conv_1x1~0|+|none~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|avg_pool_3x3~2|"

# Tiny runs: a couple of steps of a 5-cell C=4 DARTS network on the synthetic set.
TINY = dict(dataset="synthetic", init_channels=4, layers=5, batch_size=8, train_size=16, test_size=8, progress=False,
            plots=False)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny networks: one thread is faster and immune to a busy machine."""


def quiet(_msg):
    pass


def _xautodl():
    return pytest.importorskip("xautodl", reason="AutoDL-Projects' xautodl (pip install xautodl --no-deps) is the oracle")


# ------------------------------------------------------------------------------------ genotypes
def test_published_genotypes_read_by_name_and_round_trip_through_their_text():
    for name, g in PUBLISHED.items():
        for spec in (name, name.lower(), name.replace("_", "-").lower()):
            arch = load_arch(spec)
            assert arch.space == "darts" and arch.genotype == g
        assert parse_genotype(genotype_text(g)) == g
        assert len(g.normal) == len(g.reduce) == 8 and list(g.normal_concat) == [2, 3, 4, 5]
    assert load_arch("GDAS_V1").genotype == PUBLISHED["GDAS"]
    assert load_arch("DARTS").genotype == PUBLISHED["DARTS_V2"]


def test_genotype_strings_as_the_darts_family_prints_them():
    # PC-DARTS' genotypes.py style: one line, concat as range(2, 6)
    text = ("Genotype(normal=[('sep_conv_3x3', 1), ('skip_connect', 0), ('sep_conv_3x3', 0), ('dil_conv_3x3', 1), "
            "('sep_conv_5x5', 0), ('sep_conv_3x3', 1), ('avg_pool_3x3', 0), ('dil_conv_3x3', 1)], "
            "normal_concat=range(2, 6), reduce=[('sep_conv_5x5', 1), ('max_pool_3x3', 0), ('sep_conv_5x5', 1), "
            "('sep_conv_5x5', 2), ('sep_conv_3x3', 0), ('sep_conv_3x3', 3), ('sep_conv_3x3', 1), ('sep_conv_3x3', 2)], "
            "reduce_concat=range(2, 6))")
    assert load_arch(text).genotype == PUBLISHED["PC_DARTS"]
    # multi-line, positional fields, tuples
    g = PUBLISHED["DARTS_V1"]
    positional = f"Genotype(\n  {tuple(g.normal)!r},\n  [2, 3, 4, 5],\n  {list(g.reduce)!r},\n  (2, 3, 4, 5),\n)"
    assert parse_genotype(positional) == g
    # AutoDL-Projects style: a pair of genes per node, extra fields
    pairs = lambda genes: [tuple(genes[i:i + 2]) for i in range(0, len(genes), 2)]  # noqa: E731
    autodl = (f"Genotype(normal={pairs(g.normal)!r}, normal_concat=[2, 3, 4, 5], reduce={pairs(g.reduce)!r}, "
              "reduce_concat=[2, 3, 4, 5], connectN=None, connects=None)")
    assert parse_genotype(autodl) == g


def test_nb201_strings_and_search_result_files(tmp_path):
    arch = load_arch(NB201_BEST)
    assert arch.space == "nb201" and arch.genotype == NB201_BEST
    darts = tmp_path / "darts"
    darts.mkdir()
    (darts / "result.json").write_text(json.dumps({"space": "darts", "genotype": genotype_record(PUBLISHED["GDAS"])}))
    assert load_arch(str(darts / "result.json")).genotype == PUBLISHED["GDAS"]
    assert load_arch(str(darts)).genotype == PUBLISHED["GDAS"]  # the run's folder works too
    nb = tmp_path / "nb.json"
    nb.write_text(json.dumps({"space": "nb201", "genotype": NB201_MIXED}))
    assert load_arch(str(nb)).genotype == NB201_MIXED and load_arch(str(nb)).space == "nb201"


@pytest.mark.parametrize("spec, expected", [
    ("DARTS_V9", "published name (DARTS_V1"),
    ("Genotype(normal=[('sep_conv_3x3', 0)]", "not a readable Genotype"),
    ("Genotype(normal=__import__('os').getcwd(), normal_concat=[2], reduce=[], reduce_concat=[2])",
     "only names, numbers, lists, tuples and range()"),
    ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], normal_concat=[2], reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1)])",
     "missing field(s) reduce_concat"),
    ("Genotype(normal=[('sep_conv_3x3', 0), ('conv_9x9', 1)], normal_concat=[2], reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1)], reduce_concat=[2])",
     "normal[1] uses 'conv_9x9', not an operation of the darts space"),
    ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 2)], normal_concat=[2], reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1)], reduce_concat=[2])",
     "normal[1] reads state 2; node 0 can read states 0..1"),
    ("Genotype(normal=[('sep_conv_3x3', 0)], normal_concat=[2], reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1)], reduce_concat=[2])",
     "normal must list two (op, input) genes per node"),
    ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], normal_concat=[7], reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1)], reduce_concat=[2])",
     "normal_concat must name states 0..2"),
    ("|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|", "3 nodes"),
    ("|nor_conv_3x3~0|+|sep_conv_3x3~0|nor_conv_3x3~1|+|none~0|none~1|none~2|", "node 2 uses 'sep_conv_3x3'"),
    ("|nor_conv_3x3~1|+|none~0|none~1|+|none~0|none~1|none~2|", "node 1 can only read nodes 0..0"),
])
def test_bad_genotypes_are_named_in_one_line(spec, expected):
    with pytest.raises(GenotypeError) as info:
        load_arch(spec)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_bad_result_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(GenotypeError, match="cannot read it as JSON"):
        load_arch(str(bad))
    bad.write_text(json.dumps({"alphas": []}))
    with pytest.raises(GenotypeError, match="no 'genotype' in this file"):
        load_arch(str(bad))


def test_cli_answers_a_bad_genotype_in_one_line(tmp_path, capsys):
    code = cli.main(["train", "--genotype", "NOPE", "--dataset", "synthetic", "--epochs", "1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("toponas: error: --genotype 'NOPE'") and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_published_genotypes_equal_autodl_projects():
    _xautodl()
    from xautodl.nas_infer_model.DXYs.genotypes import Networks

    for ours, theirs in (("DARTS_V1", "DARTS_V1"), ("DARTS_V2", "DARTS_V2"), ("GDAS", "GDAS_V1")):
        g = Networks[theirs]
        flat = lambda nodes: [tuple(gene[:2]) for node in nodes for gene in node]  # noqa: E731
        assert PUBLISHED[ours].normal == flat(g.normal) and PUBLISHED[ours].reduce == flat(g.reduce), ours


# ------------------------------------------------------------------------------------ networks
def test_darts_v2_parameter_count_equals_the_official_network():
    # DARTS' train.py logs "param size = 3.349342MB" for DARTS_V2 at C 36, 20 cells (auxiliary head excluded).
    model = DartsEvalNetwork(PUBLISHED["DARTS_V2"], 36, 10, 20, auxiliary=True)
    assert count_parameters(model) == 3_349_342
    head = sum(p.numel() for p in model.auxiliary_head.parameters())
    assert count_parameters(model, auxiliary=True) == 3_349_342 + head
    no_aux = DartsEvalNetwork(PUBLISHED["DARTS_V2"], 36, 10, 20, auxiliary=False)
    assert count_parameters(no_aux) == count_parameters(no_aux, auxiliary=True) == 3_349_342


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_darts_network_equals_autodl_projects_in_parameters(name):
    _xautodl()
    from xautodl.nas_infer_model.DXYs.CifarNet import NetworkCIFAR
    from xautodl.nas_infer_model.DXYs.genotypes import Genotype as AGenotype

    g = PUBLISHED[name]
    pairs = lambda genes: [tuple(genes[i:i + 2]) for i in range(0, len(genes), 2)]  # noqa: E731
    theirs = NetworkCIFAR(36, 6, 3, True, AGenotype(pairs(g.normal), g.normal_concat, pairs(g.reduce), g.reduce_concat,
                                                   None, None), 10)
    ours = DartsEvalNetwork(g, 36, 10, 20)
    assert count_parameters(ours) == sum(p.numel() for n, p in theirs.named_parameters() if "auxiliary" not in n)
    assert count_parameters(ours, auxiliary=True) == sum(p.numel() for p in theirs.parameters())


@pytest.mark.parametrize("arch", [NB201_BEST, NB201_MIXED])
def test_nb201_network_equals_the_reference_in_parameters(arch):
    _xautodl()
    from xautodl.models.cell_infers.tiny_network import TinyNetwork
    from xautodl.models.cell_searchs.genotypes import Structure

    theirs = TinyNetwork(16, 5, Structure.str2structure(arch), 10)
    ours = NB201EvalNetwork(arch, 16, 5, 10)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    x = torch.randn(2, 3, 32, 32)
    assert ours(x)[0].shape == theirs(x)[1].shape == (2, 10)


def test_drop_path_zeroes_whole_samples_and_scales_the_rest():
    torch.manual_seed(1)
    x = torch.rand(4000, 2, 3, 3) + 0.5
    p = 0.3
    y = drop_path(x, p)
    dropped = (y == 0).flatten(1).all(1)
    kept = ~dropped
    assert bool(((y == 0).flatten(1).any(1) == dropped).all())  # a sample is zeroed whole or not at all
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    sigma = math.sqrt(p * (1 - p) / len(x))
    assert abs(float(dropped.float().mean()) - p) < 5 * sigma
    assert drop_path(x, 0.0) is x


def _cell(genes, C=4):
    g = Genotype(normal=genes, normal_concat=[2, 3], reduce=genes, reduce_concat=[2, 3])
    return EvalCell(g, C, C, C, reduction=False, reduction_prev=False)


def test_drop_path_in_the_cell_spares_identity_operations():
    x0, x1 = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    skips = _cell([("skip_connect", 0), ("skip_connect", 1), ("skip_connect", 2), ("skip_connect", 0)])
    convs = _cell([("sep_conv_3x3", 0), ("skip_connect", 1), ("dil_conv_3x3", 2), ("max_pool_3x3", 0)])
    for cell, touched in ((skips, False), (convs, True)):
        cell.train()
        ref = cell(x0, x1, 0.0)
        torch.manual_seed(0)
        dropped = cell(x0, x1, 0.9)
        assert (not torch.equal(ref, dropped)) == touched
        cell.eval()  # never in evaluation
        torch.testing.assert_close(cell(x0, x1, 0.9), cell(x0, x1, 0.0), rtol=0, atol=0)


def test_auxiliary_logits_only_in_training_and_from_the_cell_at_two_thirds():
    model = DartsEvalNetwork(PUBLISHED["DARTS_V2"], 4, 7, 5)
    seen = {}
    model.auxiliary_head.register_forward_hook(lambda m, inp, out: seen.update(input=inp[0]))
    model.cells[2 * 5 // 3].register_forward_hook(lambda m, inp, out: seen.update(cell=out))
    x = torch.randn(2, 3, 32, 32)
    model.train()
    logits, aux = model(x)
    assert logits.shape == aux.shape == (2, 7)
    assert seen["input"] is seen["cell"] and model.cells[2 * 5 // 3].reduction  # the second reduction cell
    model.eval()
    logits, aux = model(x)
    assert aux is None and logits.shape == (2, 7)
    plain = DartsEvalNetwork(PUBLISHED["DARTS_V2"], 4, 7, 5, auxiliary=False).train()
    assert plain(x)[1] is None and plain.auxiliary_head is None


# ------------------------------------------------------------------------------------ the loop
def test_cli_train_end_to_end_writes_every_file(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--genotype", "DARTS_V2", "--dataset", "synthetic", "--epochs", "2", "--init-channels", "4",
            "--layers", "5", "--batch-size", "8", "--train-size", "16", "--test-size", "8", "--out", str(out),
            "--no-progress", "--threads", "1", "--json"]
    assert cli.main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    result = json.loads((out / "result.json").read_text())
    assert printed == result
    for name in ("result.json", "train_log.csv", "curves.png", "cell.png", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0, name
    model = DartsEvalNetwork(PUBLISHED["DARTS_V2"], 4, 10, 5)
    assert result["params"] == count_parameters(model) and result["params_with_aux"] == count_parameters(model, auxiliary=True)
    assert result["genotype"] == genotype_record(PUBLISHED["DARTS_V2"]) and result["epochs"] == 2
    assert result["train_seconds"] > 0 and result["device"].startswith("CPU")
    from toponas_kernels.report import read_csv

    rows = read_csv(out / "train_log.csv")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert result["test_accuracy"] == rows[-1]["test_acc"] and result["best_accuracy"] == max(r["test_acc"] for r in rows)
    # reference schedule: cosine from 0.025 (epoch 1) and drop-path 0.2 * epoch / epochs
    assert rows[0]["lr"] == pytest.approx(0.025) and rows[1]["lr"] == pytest.approx(0.0125)
    assert rows[0]["drop_path_prob"] == 0.0 and rows[1]["drop_path_prob"] == pytest.approx(0.1)
    cfg = result["config"]
    assert (cfg["aux_weight"], cfg["drop_path"], cfg["cutout"], cfg["grad_clip"], cfg["weight_decay"]) == (0.4, 0.2, 16, 5.0, 3e-4)
    # the same --out again without --resume is refused in one line
    assert cli.main(args) == 2
    assert "pass --resume" in capsys.readouterr().err


def _params_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_continues_exactly(tmp_path, monkeypatch):
    kw = dict(TINY, genotype="PC_DARTS", epochs=2, steps_per_epoch=None, checkpoint_every=1)
    whole = train(TrainConfig(out=str(tmp_path / "whole"), **kw), log=quiet)
    with monkeypatch.context() as patch:
        kill_after(patch, torch.optim.SGD, "step", 3)  # killed in the 4th step, mid-epoch 2
        with pytest.raises(Killed):
            train(TrainConfig(out=str(tmp_path / "cut"), **kw), log=quiet)
    resumed = train(TrainConfig(out=str(tmp_path / "cut"), resume=True, **kw), log=quiet)
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert _params_equal(a["model"], b["model"])
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("step_seconds", "seconds")} for r in rows]  # noqa: E731
    assert strip(a["run"]["rows"]) == strip(b["run"]["rows"])
    assert resumed["test_accuracy"] == whole["test_accuracy"] and resumed["best_accuracy"] == whole["best_accuracy"]
    with pytest.raises(ValueError, match="the checkpoint was made with lr=0.025"):
        train(TrainConfig(out=str(tmp_path / "cut"), resume=True, **{**kw, "lr": 0.1}), log=quiet)


def test_nb201_defaults_and_a_search_result_retrained(tmp_path):
    search_out = tmp_path / "search"
    run(SearchConfig(space="nb201", method="darts", dataset="synthetic", epochs=1, batch_size=8, train_size=16,
                     steps_per_epoch=1, init_channels=4, layers=1, out=str(search_out), progress=False, plots=False),
        log=quiet)
    searched = json.loads((search_out / "result.json").read_text())["genotype"]
    result = train(TrainConfig(genotype=str(search_out / "result.json"), out=str(tmp_path / "train"), epochs=1,
                               **{**TINY, "layers": 1}), log=quiet)
    assert result["genotype"] == searched and result["space"] == "nb201"
    assert result["params"] == result["params_with_aux"] == sum(
        p.numel() for p in NB201EvalNetwork(searched, 4, 1, 10).parameters())
    cfg = result["config"]
    assert (cfg["lr"], cfg["nesterov"], cfg["weight_decay"], cfg["aux_weight"], cfg["drop_path"], cfg["cutout"]) == (
        0.1, True, 5e-4, 0.0, 0.0, 0)
    assert TrainConfig(genotype=NB201_BEST).resolved()[0].epochs == 200
    assert TrainConfig(genotype="DARTS_V2").resolved()[0].epochs == 600


@pytest.mark.parametrize("change, expected", [
    (dict(epochs=0), "--epochs: expected a positive integer, got 0"),
    (dict(drop_path=1.0), "--drop-path: expected a probability in [0, 1)"),
    (dict(lr=0.0), "--lr: expected a positive learning rate"),
    (dict(layers=2), "--layers: the DARTS network needs at least 3 cells"),
    (dict(init_channels=5), "--init-channels: the DARTS network needs an even C"),
    (dict(cutout=40), "--cutout: expected a side of at most the image size (32 for synthetic)"),
    (dict(dataset="imagenet16-120"), "--aux-weight: the auxiliary head needs 32x32 images"),
])
def test_bad_options_are_named(tmp_path, change, expected):
    with pytest.raises(ValueError) as info:
        train(TrainConfig(**{**TINY, "genotype": "DARTS_V2", "epochs": 1, "out": str(tmp_path / "r"), **change}), log=quiet)
    assert expected in str(info.value)


@pytest.mark.slow
def test_search_then_train_in_one_command(tmp_path):
    import subprocess
    import sys

    import toponas_kernels

    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(toponas_kernels.__file__))}
    out = tmp_path / "s"
    p = subprocess.run(
        [sys.executable, "-m", "toponas_kernels.cli", "search", "--space", "nb201", "--method", "gdas",
         "--dataset", "synthetic", "--epochs", "1", "--train-size", "16", "--batch-size", "8", "--init-channels", "4",
         "--layers", "1", "--no-progress", "--no-plots", "--threads", "1", "--out", str(out),
         "--then-train", "--train-epochs", "1"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    searched = json.load(open(out / "result.json"))
    trained = json.load(open(out / "train" / "result.json"))
    assert trained["genotype"] == searched["genotype"] and trained["epochs"] == 1
    assert p.stdout.splitlines()[0] == searched["genotype"] and "retrained" in p.stdout


def test_data_parallel_training_two_processes(tmp_path):
    """torchrun with 2 CPU processes (gloo): shares of every epoch, averaged gradients, the same
    weights on both ranks at the end, the test split evaluated in shares and added; rank 0 writes."""
    import subprocess
    import sys

    import toponas_kernels

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(os.path.dirname(toponas_kernels.__file__))}
    out = tmp_path / "ddp"
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
         "toponas_kernels.cli", "train", "--genotype", "|nor_conv_3x3~0|+|skip_connect~0|nor_conv_1x1~1|+|none~0|skip_connect~1|avg_pool_3x3~2|",
         "--dataset", "synthetic", "--epochs", "1", "--train-size", "64", "--test-size", "40", "--batch-size", "16",
         "--init-channels", "4", "--layers", "1", "--device", "cpu", "--no-progress", "--no-plots", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.load(open(out / "result.json"))
    assert result["processes"] == {"world_size": 2, "ranks_agree": True}
    assert p.stderr.count("epoch 1/1") == 1
    rows = open(out / "train_log.csv").read().splitlines()
    assert len(rows) == 2
