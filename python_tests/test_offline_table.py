"""The offline NB201 table (toponas_kernels/nb201_offline.py): the encoding of analog-nasbench's
data.anb proved against the data itself (tests that skip without the package), the restricted
unpickler's refusals on pickles written here, and the `toponas lookup` / `search --lookup` paths
on a small fake .anb written here in the package's format (no package needed)."""

import collections
import importlib.metadata
import itertools
import json
import os
import pickle
import statistics
import sys
import types

import pytest

from toponas_kernels import cli
from toponas_kernels import lookup as L
from toponas_kernels import nb201_offline as O

NB201_BEST = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|"
ALL_SKIP = "|skip_connect~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|skip_connect~2|"
ALL_CODES = list(itertools.product(range(5), repeat=6))


# ---------------------------------------------------------------------------------- encoding
def test_encode_decode_round_trip_and_edge_order():
    assert [O.encode(O.decode(c)) for c in ALL_CODES] == ALL_CODES
    # node 3 reads node 0 through avg_pool, node 1 through nor_conv_1x1; every other edge skips
    arch = "|skip_connect~0|+|skip_connect~0|skip_connect~1|+|avg_pool_3x3~0|nor_conv_1x1~1|skip_connect~2|"
    assert O.encode(arch) == (0, 0, 4, 0, 3, 0)
    shuffled = "|skip_connect~0|+|skip_connect~1|skip_connect~0|+|skip_connect~2|nor_conv_1x1~1|avg_pool_3x3~0|"
    assert O.encode(shuffled) == O.encode(arch) and O.decode(O.encode(shuffled)) == arch
    with pytest.raises(O.OfflineTableError, match="arch: node 1's op 'conv'"):
        O.encode("|conv~0|+|none~0|none~1|+|none~0|none~1|none~2|")
    with pytest.raises(O.OfflineTableError, match="3 nodes"):
        O.encode("|none~0|+|none~0|none~1|")
    with pytest.raises(O.OfflineTableError, match="code:"):
        O.decode((0, 1, 2))


def test_output_cut_off():
    assert O.output_cut_off("|none~0|+|none~0|none~1|+|none~0|none~1|none~2|")
    assert O.output_cut_off("|skip_connect~0|+|none~0|none~1|+|none~0|none~1|skip_connect~2|")  # node 2 unreached
    assert not O.output_cut_off("|skip_connect~0|+|none~0|skip_connect~1|+|none~0|none~1|skip_connect~2|")
    assert not O.output_cut_off("|none~0|+|none~0|none~1|+|avg_pool_3x3~0|none~1|none~2|")
    # over the whole space: 341 cells (the count of codes with every input-to-output path cut)
    assert sum(O.output_cut_off(O.decode(c)) for c in ALL_CODES) == 341


# ---------------------------------------------------------------------------------- the real table
@pytest.fixture(scope="module")
def real():
    try:
        return O.load_table()
    except O.OfflineTableError as exc:
        pytest.skip(f"the analog-nasbench package is not installed ({exc})")


def _same_function_key(code, identity, none):
    """A key equal for cells that compute the same function when op ``identity`` is the identity
    and op ``none`` the zero (xautodl's CellStructure.to_unique_str(consider_zero=True)), with
    the edges in the order of ``O.EDGES``."""
    ops = {edge: c for edge, c in zip(O.EDGES, code)}
    nodes = {0: "0"}
    for n in (1, 2, 3):
        terms = []
        for j in range(n):
            op = ops[(n, j)]
            terms.append("#" if op == none or nodes[j] == "#" else nodes[j] if op == identity else f"({nodes[j]})@{op}")
        nodes[n] = "+".join(sorted(terms))
    return nodes[3]


def _mean_spread(real, identity, none=1):
    groups = collections.defaultdict(list)
    for code, acc in real.items():
        groups[_same_function_key(code, identity, none)].append(acc)
    return statistics.fmean(max(g) - min(g) for g in groups.values() if len(g) > 1), len(groups)


def test_real_table_is_the_whole_space_and_never_imports_the_package(real):
    assert sorted(real) == ALL_CODES
    assert all(0.0 <= a <= 100.0 for a in real.values())
    assert "analognasbench" not in sys.modules and "analognasbench.data" not in sys.modules
    assert O.data_file().endswith(os.path.join("analognasbench", "data.anb"))


def test_real_table_none_and_edge_order_are_the_only_ones_that_explain_the_10_percent_cells(real):
    at_chance = {c for c, a in real.items() if a == 10.0}
    assert at_chance == {c for c in ALL_CODES if O.output_cut_off(O.decode(c))}
    # every other reading (which integer is none, which tuple position which edge) gives another
    # set, except the mirror image of the DAG (node i <-> 3 - i), which cut-offs cannot tell apart
    node_edges = [(j, n) for n, j in O.EDGES]  # (from, to)
    explaining = []
    for none in range(5):
        classes = collections.defaultdict(set)  # positions holding none -> {scores exactly 10 %?}
        for c in ALL_CODES:
            classes[tuple(x == none for x in c)].add(c in at_chance)
        if any(len(v) > 1 for v in classes.values()):
            continue
        for perm in itertools.permutations(range(6)):
            def cut(mask):
                reached = {0}
                for n in (1, 2, 3):
                    if any(not mask[p] and node_edges[perm[p]][1] == n and node_edges[perm[p]][0] in reached
                           for p in range(6)):
                        reached.add(n)
                return 3 not in reached
            if all(cut(mask) == next(iter(v)) for mask, v in classes.items()):
                explaining.append((none, tuple(node_edges[p] for p in perm)))
    mirror = tuple((3 - b, 3 - a) for a, b in node_edges)
    assert sorted(explaining) == sorted([(1, tuple(node_edges)), (1, mirror)])


def test_real_table_skip_is_the_identity_and_the_dag_is_not_mirrored(real):
    # cells that are one function under the encoding agree to retrain noise; read another op as
    # the identity and the "same" cells differ by several times that
    spread, classes = _mean_spread(real, identity=O.OPS.index("skip_connect"))
    assert classes == 6466  # NAS-Bench-201's count of unique cells
    assert spread < 1.0
    for other in ("nor_conv_3x3", "nor_conv_1x1", "avg_pool_3x3"):
        assert _mean_spread(real, identity=O.OPS.index(other))[0] > 2.5 * spread, other
    # node 2 unused (its edge to node 3 is none): the ops into it (node 2 <- 0, node 2 <- 1) do
    # not matter; in the mirrored reading those positions would be node 3 <- 1 and <- 2, which do
    free = [O.EDGES.index((2, 0)), O.EDGES.index((2, 1))]
    groups = collections.defaultdict(list)
    for c, a in real.items():
        if c[O.EDGES.index((3, 2))] == O.OPS.index("none"):
            groups[tuple(x for p, x in enumerate(c) if p not in free)].append(a)
    assert statistics.fmean(max(g) - min(g) for g in groups.values()) < 1.5


def test_real_table_3x3_beats_1x1_and_nb201s_best_cell_is_near_the_top(real):
    c3, c1 = O.OPS.index("nor_conv_3x3"), O.OPS.index("nor_conv_1x1")
    wins = losses = 0
    for c, a in real.items():
        for p in range(6):
            if c[p] == c1 and a != 10.0:
                b = real[c[:p] + (c3,) + c[p + 1:]]
                wins, losses = wins + (b > a), losses + (b < a)
    assert wins > 3 * losses
    ranked = sorted(real.values(), reverse=True)
    assert real[O.encode(NB201_BEST)] >= ranked[2]  # NB201's best CIFAR-10 cell: third here
    # parameter-free cells train poorly; convs on every edge train well
    median = statistics.median(real.values())
    assert real[O.encode(ALL_SKIP)] < median - 20
    assert real[(O.OPS.index("avg_pool_3x3"),) * 6] < median - 20
    assert real[(c3,) * 6] > median + 2


def test_lookup_on_the_real_table(real):
    r = L.lookup(NB201_BEST, "analog-nasbench")
    assert r["test_accuracy"] == real[O.encode(NB201_BEST)] and r["label"] == O.LABEL
    assert r["best"]["test_accuracy"] == max(real.values())
    assert r["random_cell"]["median"] == statistics.median(real.values())
    assert L.check_table("analog-nasbench") == "analog-nasbench"


# ---------------------------------------------------------------------------------- restricted unpickler
class _Call:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_unpickler_refuses_other_classes(tmp_path):
    target = tmp_path / "pwned"
    bad = tmp_path / "evil.anb"
    bad.write_bytes(pickle.dumps({(0,) * 6: _Call(os.makedirs, str(target))}))
    with pytest.raises(O.OfflineTableError, match="refusing to load (os|posix).makedirs"):
        O.load_table(str(bad))
    assert not target.exists()
    with pytest.raises(L.LookupTableError, match="refusing to load"):
        L.lookup(ALL_SKIP, str(bad))
    # an allowed name used as a function with arguments is refused too, as a bad table
    allowed = tmp_path / "call.anb"
    allowed.write_bytes(b"\x80\x04\x8c\x13analognasbench.data\x8c\x0cArchitecture\x93K\x01\x85R.")
    with pytest.raises(O.OfflineTableError, match="not an analog-nasbench table"):
        O.load_table(str(allowed))
    (tmp_path / "list.anb").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(O.OfflineTableError, match="expected a non-empty dict"):
        O.load_table(str(tmp_path / "list.anb"))


# ---------------------------------------------------------------------------------- a fake table
FAKE_CODES = list(itertools.product((0, 2), repeat=6))  # skip / nor_conv_3x3 on every edge


def fake_acc(code):
    return 50.0 + 5.0 * code.count(2) + 0.25 * code[0]  # distinct per count, best: all conv


@pytest.fixture
def fake_anb(tmp_path, monkeypatch):
    """A .anb in the package's format: the classes pickled by the names the package gives them."""
    package, module = types.ModuleType("analognasbench"), types.ModuleType("analognasbench.data")

    class Architecture:
        pass

    class DriftMeasurement:
        pass

    for cls in (Architecture, DriftMeasurement):
        cls.__module__, cls.__qualname__ = "analognasbench.data", cls.__name__
        setattr(module, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, "analognasbench", package)
    monkeypatch.setitem(sys.modules, "analognasbench.data", module)
    data = {}
    for code in FAKE_CODES:
        a = Architecture()
        a.architecture, a.baseline_accuracy, a.analog_accuracy = code, fake_acc(code), 12.5
        drift = DriftMeasurement()
        drift.value, drift.uncertainty = 1.0, 0.5
        a.baseline_drift_60 = drift
        data[code] = a
    path = tmp_path / "data.anb"
    path.write_bytes(pickle.dumps(data, protocol=4))
    monkeypatch.delitem(sys.modules, "analognasbench.data")
    monkeypatch.delitem(sys.modules, "analognasbench")
    return str(path)


def test_cli_lookup_on_a_fake_table(fake_anb, capsys):
    code = (2, 0, 2, 2, 0, 2)
    arch = O.decode(code)
    assert cli.main(["lookup", "--arch", arch, "--table", fake_anb]) == 0
    out = capsys.readouterr().out
    assert O.LABEL in out and f"{fake_acc(code):7.2f}" in out and O.decode((2,) * 6) in out
    assert cli.main(["lookup", "--arch", arch, "--table", fake_anb, "--json", "--dataset", "CIFAR10"]) == 0
    r = json.loads(capsys.readouterr().out)
    values = [fake_acc(c) for c in FAKE_CODES]
    assert r["label"] == O.LABEL and r["test_accuracy"] == fake_acc(code) and r["code"] == list(code)
    assert r["best"] == {**r["best"], "arch": O.decode((2,) * 6), "test_accuracy": max(values)}
    assert r["random_cell"] == {"mean": statistics.fmean(values), "median": statistics.median(values)}
    assert r["valid_accuracy"] is None and r["dataset"] == "cifar10"


@pytest.mark.parametrize("argv, words", [
    (["--dataset", "cifar100"], "CIFAR-10 test accuracy only"),
    (["--hp", "12"], "200-epoch runs only"),
    (["--arch", "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"], "is not in table"),
])
def test_cli_lookup_errors_on_a_fake_table(fake_anb, argv, words, capsys):
    args = {"--arch": ALL_SKIP, "--table": fake_anb}
    extra = []
    for k, v in zip(argv[::2], argv[1::2]):
        if k in args:
            args[k] = v
        else:
            extra += [k, v]
    assert cli.main(["lookup", *itertools.chain(*args.items()), *extra]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1


def test_missing_package_is_one_line_saying_how_to_install(monkeypatch, capsys, tmp_path):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    assert cli.main(["lookup", "--arch", ALL_SKIP, "--table", "analog-nasbench"]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps analog-nasbench" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["lookup", "--arch", ALL_SKIP, "--table", str(tmp_path / "gone.anb")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_search_lookup_on_a_fake_table(fake_anb, tmp_path, monkeypatch):
    from toponas_kernels.nas.networks import NB201SearchNetwork
    from toponas_kernels.search import SearchConfig, run

    code = (0, 2, 2, 0, 2, 0)
    monkeypatch.setattr(NB201SearchNetwork, "genotype", lambda self: O.decode(code))
    lines = []
    cfg = SearchConfig(space="nb201", method="darts", dataset="synthetic", epochs=1, batch_size=8, train_size=16,
                       layers=1, init_channels=4, progress=False, plots=False, out=str(tmp_path / "s"),
                       lookup=fake_anb)
    result = run(cfg, log=lines.append)
    assert list(result["lookup"]) == ["cifar10"]
    r = result["lookup"]["cifar10"]
    assert r["label"] == O.LABEL and r["test_accuracy"] == fake_acc(code)
    assert json.load(open(tmp_path / "s" / "result.json"))["lookup"] == result["lookup"]
    assert any(line.startswith(O.LABEL) and f"{fake_acc(code):.2f}" in line for line in lines)
    with pytest.raises(L.LookupTableError, match="no such file"):  # refused before searching
        run(SearchConfig(space="nb201", method="darts", dataset="synthetic", epochs=1, out=str(tmp_path / "m"),
                         lookup=str(tmp_path / "missing.anb")), log=lambda m: None)
    assert not (tmp_path / "m").exists() or not os.listdir(tmp_path / "m")
