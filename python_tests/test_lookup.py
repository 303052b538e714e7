"""NAS-Bench-201 look-up (toponas_kernels/lookup.py, `toponas lookup`) on tiny tables written here
in the benchmarks' real formats with the API packages' own classes: a NAS-Bench-201 .pth (a
torch-saved dict of meta_archs / arch2infos {'less', 'full'} / evaluated_indexes), a NATS-tss
-simple folder (meta + one bz2 pickle per architecture) and a NATS-tss .pickle.pbz2 file. Three
architectures with known accuracies per dataset, split, hp, seed and epoch; every check compares
against those numbers. Tests that need an API package skip without it; the argument errors run
without."""

import json
import os
import statistics
import sys

import numpy as np
import pytest
import torch

from toponas_kernels import cli
from toponas_kernels import lookup as L

ARCHS = [
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|",
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|",
    "|avg_pool_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|nor_conv_1x1~0|skip_connect~1|skip_connect~2|",
]
NOT_IN_TABLE = "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"
SEEDS = {0: [777], 1: [777, 888], 2: [777, 888, 999]}   # trials per architecture
SEED_OFFSET = {777: -1.0, 888: 2.0, 999: 0.5}
EPOCHS = {"12": 12, "200": 200}
BASE = {"cifar10-valid": 60.0, "cifar10": 62.0, "cifar100": 40.0, "ImageNet16-120": 20.0}
# final-epoch accuracy of each architecture before the seed offset: architecture 1 has the best
# validation accuracy, architecture 2 the best test accuracy, so "best" shows which picks it
VALID = {0: 0.0, 1: 10.0, 2: 5.0}
TEST = {0: 1.0, 1: 6.0, 2: 12.0}
# the eval sets each dataset has in the published tables
EVAL_SETS = {
    "cifar10-valid": ("x-valid", "ori-test"),
    "cifar10": ("ori-test",),
    "cifar100": ("x-valid", "x-test", "ori-test"),
    "ImageNet16-120": ("x-valid", "x-test", "ori-test"),
}


def final_acc(arch, dataset, hp, split):
    """Mean over the architecture's seeds of the accuracy after the last epoch."""
    base = BASE[dataset] + (15.0 if hp == "200" else 0.0)
    value = {"train": base + 20 + arch, "x-valid": base + VALID[arch],
             # cifar100/ImageNet16-120: ori-test is valid+test together, never the reported test
             "x-test": base + TEST[arch], "ori-test": base + TEST[arch] + (3.0 if dataset in ("cifar100", "ImageNet16-120") else 0.0)}[split]
    return value + statistics.mean(SEED_OFFSET[s] for s in SEEDS[arch])


def expected(arch, dataset, hp):
    valid_split, test_split = {"cifar10-valid": ("x-valid", "ori-test"), "cifar10": (None, "ori-test"),
                               "cifar100": ("x-valid", "x-test"), "ImageNet16-120": ("x-valid", "x-test")}[dataset]
    return (final_acc(arch, dataset, hp, "train"),
            final_acc(arch, dataset, hp, valid_split) if valid_split else None,
            final_acc(arch, dataset, hp, test_split))


def arch_results(api_module, index, hp):
    """One ArchResults of the table: every dataset, seed and eval set, every epoch (earlier
    epochs 5 points lower, so reading any epoch but the last shows)."""
    results = api_module.ArchResults(index, ARCHS[index])
    epochs = EPOCHS[hp]
    for dataset in BASE:
        for seed in SEEDS[index]:
            def curve(split):
                last = final_acc(index, dataset, hp, split) - statistics.mean(SEED_OFFSET[s] for s in SEEDS[index]) \
                    + SEED_OFFSET[seed]
                return {e: last - (5.0 if e < epochs - 1 else 0.0) for e in range(epochs)}
            count = api_module.ResultsCount(
                dataset, None, curve("train"), {e: 1.0 for e in range(epochs)},
                np.float64(0.1 + index), np.float64(10.0 + index),  # numpy scalars, as np.mean makes them
                {"channel": 16, "num_cells": 5, "arch_str": ARCHS[index], "class_num": 10}, seed, epochs, [0.01])
            accs, losses, times = {}, {}, {}
            for split in EVAL_SETS[dataset]:
                for e, a in curve(split).items():
                    accs[f"{split}@{e}"], losses[f"{split}@{e}"], times[f"{split}@{e}"] = a, 1.0, 0.5
            count.update_eval(accs, losses, times)
            results.update(dataset, seed, count)
    return results.state_dict()


@pytest.fixture(scope="module")
def nb201_table(tmp_path_factory):
    api = pytest.importorskip("nas_201_api")
    path = tmp_path_factory.mktemp("nb201") / "NAS-Bench-201-tiny.pth"
    table = {"meta_archs": list(ARCHS), "evaluated_indexes": list(range(len(ARCHS))),
             "arch2infos": {i: {"less": arch_results(api, i, "12"), "full": arch_results(api, i, "200")}
                            for i in range(len(ARCHS))}}
    torch.save(table, path, _use_new_zipfile_serialization=False)  # the published files' legacy format
    return str(path)


@pytest.fixture(scope="module")
def nats_folder(tmp_path_factory):
    nats = pytest.importorskip("nats_bench")
    folder = tmp_path_factory.mktemp("nats") / "NATS-tss-tiny-simple"
    folder.mkdir()
    nats.pickle_save({"meta_archs": list(ARCHS)}, str(folder / "meta.pickle"))
    for i in range(len(ARCHS)):
        nats.pickle_save({hp: arch_results(nats, i, hp) for hp in EPOCHS}, str(folder / f"{i:06d}.pickle"))
    return str(folder)


@pytest.fixture(scope="module")
def nats_file(tmp_path_factory):
    nats = pytest.importorskip("nats_bench")
    path = tmp_path_factory.mktemp("nats_file") / "NATS-tss-tiny.pickle"
    nats.pickle_save({"meta_archs": list(ARCHS), "evaluated_indexes": list(range(len(ARCHS))),
                      "arch2infos": {i: {hp: arch_results(nats, i, hp) for hp in EPOCHS} for i in range(len(ARCHS))}},
                     str(path))
    return str(path) + ".pbz2"


@pytest.fixture(params=["nb201_table", "nats_folder", "nats_file"])
def table(request):
    return request.getfixturevalue(request.param)


def close(a, b):
    return a == pytest.approx(b, rel=1e-12, abs=1e-9)


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("dataset", L.DATASETS)
@pytest.mark.parametrize("arch", [0, 1, 2])
def test_accuracies_per_dataset(table, dataset, arch):
    r = L.lookup(ARCHS[arch], table, dataset=dataset)
    train, valid, test = expected(arch, dataset, "200")
    assert r["arch"] == ARCHS[arch] and r["index"] == arch
    assert r["dataset"] == dataset and r["hp"] == "200" and r["table"] == os.path.abspath(table)
    assert r["api"] == ("nas_201_api" if table.endswith(".pth") else "nats_bench")
    assert r["trials"] == len(SEEDS[arch])
    assert close(r["train_accuracy"], train)
    assert close(r["test_accuracy"], test)
    if valid is None:
        assert r["valid_accuracy"] is None and r["valid_split"] is None
    else:
        assert close(r["valid_accuracy"], valid)
    assert r["test_split"] == {"cifar10-valid": "ori-test", "cifar10": "ori-test"}.get(dataset, "x-test")
    json.dumps(r)  # plain floats, no numpy scalars


def test_hp_12_and_200_differ(table):
    for dataset in L.DATASETS:
        r12 = L.lookup(ARCHS[1], table, dataset=dataset, hp="12")
        r200 = L.lookup(ARCHS[1], table, dataset=dataset, hp=200)
        assert r12["hp"] == "12" and r200["hp"] == "200"
        assert close(r12["test_accuracy"], expected(1, dataset, "12")[2])
        assert close(r200["test_accuracy"] - r12["test_accuracy"], 15.0)
    assert L.lookup(ARCHS[1], table)["hp"] == "200"  # the default is what papers report


@pytest.mark.parametrize("dataset", L.DATASETS)
def test_best_is_highest_valid(table, dataset):
    best = L.lookup(ARCHS[0], table, dataset=dataset)["best"]
    select = "cifar10-valid" if dataset == "cifar10" else dataset   # cifar10 has no valid split
    assert best["index"] == 1 and best["arch"] == ARCHS[1]
    assert close(best["valid_accuracy"], expected(1, select, "200")[1])
    assert close(best["test_accuracy"], expected(1, dataset, "200")[2])
    # the highest test accuracy belongs to another architecture (2), reported beside it
    assert close(best["max_test_accuracy"], expected(2, dataset, "200")[2])
    assert best["max_test_accuracy"] > best["test_accuracy"]
    assert select in best["selected_by"] and "x-valid" in best["selected_by"]


def test_arch_spelling_and_dataset_case(nb201_table):
    # inputs of a node in another order, surrounding blanks and a lower-case dataset name
    shuffled = " |nor_conv_3x3~0|+|avg_pool_3x3~1|nor_conv_3x3~0|+|skip_connect~2|nor_conv_3x3~1|skip_connect~0| "
    r = L.lookup(shuffled, nb201_table, dataset="imagenet16-120")
    assert r["arch"] == ARCHS[0] and r["index"] == 0 and r["dataset"] == "ImageNet16-120"


def test_table_loaded_once(nb201_table, nats_folder):
    for table in (nb201_table, nats_folder):
        package, api = L.table_api(table)
        assert L.table_api(table)[1] is api
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ  # set only while the .pth loads


def test_check_table_loads_nothing(nb201_table, nats_folder, nats_file, tmp_path, monkeypatch):
    L._APIS.clear()
    assert L.check_table(nb201_table) == "nas_201_api"
    assert L.check_table(nats_folder) == L.check_table(nats_file) == "nats_bench"
    assert not L._APIS  # nothing loaded
    with pytest.raises(L.LookupTableError, match="no such file"):
        L.check_table(tmp_path / "missing.pth")
    monkeypatch.setitem(sys.modules, "nats_bench", None)
    with pytest.raises(L.LookupTableError, match="needs the nats_bench package"):
        L.check_table(nats_folder)


def test_pth_with_numpy_scalars_loads(nb201_table):
    """torch.load's default (weights-only) refuses this table, which nas_201_api would hit."""
    with pytest.raises(Exception, match="(?i)weights"):
        torch.load(nb201_table)
    L._APIS.clear()
    L._BEST.clear()
    assert close(L.lookup(ARCHS[2], nb201_table)["test_accuracy"], expected(2, "cifar10-valid", "200")[2])


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("arch, match", [
    ("", "arch: expected a NAS-Bench-201 string"),
    ("|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3|", "should read 'op~j'"),
    ("|sep_conv_3x3~0|+|none~0|none~1|+|none~0|none~1|none~2|", "'sep_conv_3x3' is not a NAS-Bench-201 operation; "
                                                                "expected one of none, skip_connect"),
    ("|none~0|+|none~0|none~1|", "3 nodes"),
    ("|none~0|+|none~0|+|none~0|none~1|none~2|", "3 nodes"),
])
def test_bad_arch(arch, match, tmp_path):
    # checked before anything else: the table here does not even exist
    with pytest.raises(L.LookupTableError, match=match) as info:
        L.lookup(arch, tmp_path / "missing.pth")
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_bad_dataset_and_hp(tmp_path):
    with pytest.raises(L.LookupTableError, match=r"dataset: expected one of cifar10-valid, cifar10, cifar100, "
                                                 r"ImageNet16-120, got 'cifar-10'.*'cifar10' is trained on train\+valid"):
        L.lookup(ARCHS[0], tmp_path / "missing.pth", dataset="cifar-10")
    with pytest.raises(L.LookupTableError, match=r"hp: expected '200' .* or '12', got '90'"):
        L.lookup(ARCHS[0], tmp_path / "missing.pth", hp="90")


def test_missing_table(tmp_path):
    with pytest.raises(L.LookupTableError) as info:
        L.lookup(ARCHS[0], tmp_path / "NAS-Bench-201-v1_1-096897.pth")
    msg = str(info.value)
    assert "no such file" in msg and "NAS-Bench-201-v1_1-096897.pth" in msg and "github.com/D-X-Y/NAS-Bench-201" in msg
    assert "NATS-tss-v1_0-3ffb9-simple" in msg and "github.com/D-X-Y/NATS-Bench" in msg and "never downloads" in msg


def test_unknown_table_kinds(tmp_path):
    (tmp_path / "table.json").write_text("{}")
    with pytest.raises(L.LookupTableError, match="expected a NAS-Bench-201 .pth file"):
        L.lookup(ARCHS[0], tmp_path / "table.json")
    with pytest.raises(L.LookupTableError, match="without meta.pickle.pbz2 is not a NATS-tss table"):
        L.lookup(ARCHS[0], tmp_path)


@pytest.mark.parametrize("module, pip", [("nas_201_api", "pip install nas-bench-201"),
                                         ("nats_bench", "pip install nats_bench")])
def test_missing_package(module, pip, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    if module == "nas_201_api":
        table = tmp_path / "x.pth"
        table.write_bytes(b"")
    else:
        table = tmp_path / "NATS-tss-v1_0-3ffb9-simple"
        table.mkdir()
        (table / "meta.pickle.pbz2").write_bytes(b"")
    with pytest.raises(L.LookupTableError, match=f"needs the {module} package: {pip} "
                                                 r"\(or pip install 'toponas_kernels\[nb201\]'\)"):
        L.lookup(ARCHS[0], table)


def test_unreadable_table(tmp_path):
    pytest.importorskip("nas_201_api")
    bad = tmp_path / "broken.pth"
    torch.save({"meta_archs": ARCHS}, bad)
    with pytest.raises(L.LookupTableError, match=r"broken.pth: nas_201_api cannot read it \(.*arch2infos"):
        L.lookup(ARCHS[0], bad)


def test_arch_not_in_table(table):
    with pytest.raises(L.LookupTableError, match=r"is not in table .* \(3 architectures\)"):
        L.lookup(NOT_IN_TABLE, table)


# --------------------------------------------------------------------------- command line


def test_cli_table_and_json(nb201_table, capsys):
    assert cli.main(["lookup", "--arch", ARCHS[2], "--table", nb201_table, "--dataset", "cifar100"]) == 0
    out = capsys.readouterr().out
    _, valid, test = expected(2, "cifar100", "200")
    arch_line = next(line for line in out.splitlines() if line.startswith("arch "))
    assert f"{valid:.2f}" in arch_line and f"{test:.2f}" in arch_line and ARCHS[2] in arch_line
    best_line = next(line for line in out.splitlines() if line.startswith("best "))
    assert ARCHS[1] in best_line and f"{expected(1, 'cifar100', '200')[1]:.2f}" in best_line
    assert "hp 200" in out and "test = x-test" in out

    assert cli.main(["lookup", "--arch", ARCHS[2], "--table", nb201_table, "--hp", "12", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got == json.loads(json.dumps(L.lookup(ARCHS[2], nb201_table, hp="12")))


@pytest.mark.parametrize("argv, words", [
    (["--arch", "|conv~0|", "--table", "t.pth"], "arch:"),
    (["--arch", ARCHS[0], "--table", "missing.pth"], "no such file"),
    (["--arch", ARCHS[0], "--table", "missing.pth", "--dataset", "cifar"], "dataset: expected one of"),
    (["--arch", ARCHS[0], "--table", "missing.pth", "--hp", "1"], "hp: expected"),
    (["--table", "missing.pth"], "--arch"),
])
def test_cli_errors_one_line(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = cli.main(["lookup", *argv])
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("toponas") and words in err
    assert len(err.strip().splitlines()) == 1


def test_search_adds_the_lookup_to_its_result(nb201_table, tmp_path, monkeypatch):
    from toponas_kernels.nas.networks import NB201SearchNetwork
    from toponas_kernels.search import ConfigError, SearchConfig, run

    monkeypatch.setattr(NB201SearchNetwork, "genotype", lambda self: ARCHS[1])  # a cell the tiny table has
    cfg = SearchConfig(space="nb201", method="darts", dataset="synthetic", epochs=1, batch_size=8, train_size=16,
                       layers=1, init_channels=4, progress=False, plots=False, out=str(tmp_path / "s"),
                       lookup=nb201_table)
    result = run(cfg, log=lambda m: None)
    on_disk = json.load(open(tmp_path / "s" / "result.json"))
    assert on_disk["lookup"] == result["lookup"]
    for dataset in L.DATASETS:
        train, valid, test = expected(1, dataset, "200")
        assert close(result["lookup"][dataset]["test_accuracy"], test)
        assert result["lookup"][dataset]["hp"] == "200"
    with pytest.raises(ConfigError, match="--lookup"):
        run(SearchConfig(space="darts", method="darts", dataset="synthetic", epochs=1, out=str(tmp_path / "d"),
                         lookup=nb201_table), log=lambda m: None)
    with pytest.raises(L.LookupTableError):  # refused before searching
        run(SearchConfig(space="nb201", method="darts", dataset="synthetic", epochs=1, out=str(tmp_path / "m"),
                         lookup=str(tmp_path / "NAS-Bench-201-v1_0-e61699.pth")), log=lambda m: None)
    assert not (tmp_path / "m" / "checkpoint.pt").exists()
