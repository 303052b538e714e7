"""NAS-Bench-201 look-up: what an architecture of the NB201 space scored when it was trained from
scratch, read from the benchmark's published table through the benchmark's own API package.

    from toponas_kernels.lookup import lookup

    r = lookup("|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|",
               "NAS-Bench-201-v1_1-096897.pth")                      # cifar10-valid, hp '200'
    r["valid_accuracy"], r["test_accuracy"], r["best"]["test_accuracy"]
    lookup(arch, "NATS-tss-v1_0-3ffb9-simple", dataset="cifar100")  # a NATS-tss folder

Tables, and the package that reads each (``pip install 'toponas_kernels[nb201]'`` installs both):

* ``NAS-Bench-201-v1_0-e61699.pth`` / ``NAS-Bench-201-v1_1-096897.pth``: ``nas_201_api``
  (PyPI ``nas-bench-201``);
* ``NATS-tss-v1_0-3ffb9-simple`` (a folder, one file per architecture, read lazily) or
  ``NATS-tss-v1_0-3ffb9.pickle.pbz2`` (one file): ``nats_bench`` (PyPI ``nats_bench``).

The user downloads the table (links in the benchmarks' READMEs); nothing here downloads it.

Without a download: ``table='analog-nasbench'`` (or the path of its ``.anb`` file) reads the
CIFAR-10 test accuracies that the ``analog-nasbench`` package ships, one 200-epoch retrain per
cell, which is not NAS-Bench-201's table: its answers carry that label (``nb201_offline``).

Numbers are top-1 accuracies in percent after the last training epoch, averaged over the table's
trials (seeds) of that architecture. ``hp='200'`` (200 training epochs) is the default because it
is what papers report; the APIs' own default, '12', is a 12-epoch schedule. Splits per dataset
(``SPLITS``): 'cifar10-valid' is trained on CIFAR-10's train half, valid = x-valid, test =
ori-test; 'cifar100' and 'ImageNet16-120': valid = x-valid, test = x-test; 'cifar10' is trained
on train+valid and has only ori-test (valid_accuracy is None).

"best" is the architecture of the table with the highest valid accuracy on the same dataset, as
the papers pick it, with its test accuracy; for 'cifar10', which has no validation split, it is
picked by the x-valid accuracy of 'cifar10-valid' (the APIs' own convention). ``max_test_accuracy``
is the highest test accuracy of any architecture (to set beside the papers' "optimal" rows).

A table takes minutes and gigabytes to load: each is loaded once per process (``table_api``) and
its best architecture found once per (dataset, hp).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings

from . import nb201_offline as offline
from .nas.nb201_arch import canonical_nb201
from .nas.spaces import NB201_PRIMITIVES

__all__ = ["DATASETS", "HPS", "SPLITS", "LookupTableError", "check_table", "lookup", "lookup_all", "table_api"]

DATASETS = ("cifar10-valid", "cifar10", "cifar100", "ImageNet16-120")
HPS = ("12", "200")
# (valid split, test split) per dataset, the names the APIs use
SPLITS = {
    "cifar10-valid": ("x-valid", "ori-test"),
    "cifar10": (None, "ori-test"),
    "cifar100": ("x-valid", "x-test"),
    "ImageNet16-120": ("x-valid", "x-test"),
}

_NB201_FILES = "NAS-Bench-201-v1_1-096897.pth (or v1_0-e61699.pth) from the links in https://github.com/D-X-Y/NAS-Bench-201"
_NATS_FILES = ("NATS-tss-v1_0-3ffb9-simple.tar from the links in https://github.com/D-X-Y/NATS-Bench "
               "(unpack it: the folder is the table)")
_PACKAGES = {"nas_201_api": "nas-bench-201", "nats_bench": "nats_bench"}


class LookupTableError(ValueError):
    """A look-up cannot be answered: a malformed architecture, dataset or hp, a missing table or
    API package, or an architecture the table does not have. The message is one line saying what
    was expected or what to install or download."""


def _canonical_arch(arch: str) -> str:
    """The table's spelling of ``arch``: 3 nodes, node i reading nodes 0..i-1 in that order."""
    try:
        return canonical_nb201(arch, NB201_PRIMITIVES)
    except ValueError as exc:
        raise LookupTableError(str(exc)) from None


def _dataset(dataset: str) -> str:
    for name in DATASETS:
        if isinstance(dataset, str) and dataset.lower() == name.lower():
            return name
    raise LookupTableError(f"dataset: expected one of {', '.join(DATASETS)}, got {dataset!r} "
                           "('cifar10-valid' is trained on the train split and has a validation split; "
                           "'cifar10' is trained on train+valid and has only the test split)")


def _hp(hp) -> str:
    if str(hp) not in HPS:
        raise LookupTableError(f"hp: expected '200' (200 training epochs, the numbers papers report) or '12', got {hp!r}")
    return str(hp)


def _kind(table: str) -> str:
    """The API package for a table path that exists."""
    if os.path.isdir(table):
        if not os.path.isfile(os.path.join(table, "meta.pickle.pbz2")):
            raise LookupTableError(f"table {table}: a folder without meta.pickle.pbz2 is not a NATS-tss table; "
                                   f"expected the unpacked {_NATS_FILES}")
        return "nats_bench"  # read in fast mode: one file per architecture when asked for
    if table.endswith(".pth"):
        return "nas_201_api"
    if table.endswith(".pbz2"):
        return "nats_bench"
    raise LookupTableError(f"table {table}: expected a NAS-Bench-201 .pth file, a NATS-tss .pickle.pbz2 file "
                           "or a NATS-tss-...-simple folder")


@contextlib.contextmanager
def _full_unpickling():
    # nas_201_api reads the .pth with torch.load(path) and no weights_only; since torch 2.6 that
    # means weights-only unpickling, which refuses objects other than tensors and plain
    # containers (numpy scalars, for one) that a 2020 pickle may hold. The file is the one the
    # user named, so torch is told to unpickle fully for the duration of that one load.
    old = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.*")
            yield
    finally:
        if old is None:
            del os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = old


_APIS: dict[tuple, tuple[str, object]] = {}
_BEST: dict[tuple, dict] = {}


def _key(table: str) -> tuple:
    st = os.stat(table)
    return os.path.realpath(table), st.st_mtime_ns, st.st_size


def check_table(table) -> str:
    """The API package that reads ``table``, after checking (in milliseconds, nothing loaded) that
    the file or folder exists, is of a known kind and that its package imports: a caller can
    check before a long run what it will look up after."""
    table = os.fspath(table)
    if offline.is_offline(table):
        try:
            offline.check_offline(table)
        except offline.OfflineTableError as exc:
            raise LookupTableError(str(exc)) from None
        return offline.TABLE
    if not os.path.exists(table):
        raise LookupTableError(f"table {table}: no such file or folder. Download {_NB201_FILES}, or {_NATS_FILES}; "
                               "toponas never downloads a table")
    package = _kind(table)
    try:
        importlib.import_module(package)
    except ImportError:
        raise LookupTableError(f"reading {os.path.basename(table)} needs the {package} package: "
                               f"pip install {_PACKAGES[package]} (or pip install 'toponas_kernels[nb201]')") from None
    return package


def table_api(table) -> tuple[str, object]:
    """(package name, API object) for a table file or folder, loaded once per process (a table
    rewritten on disk is loaded again)."""
    table = os.fspath(table)
    package = check_table(table)
    key = _key(table)
    if key in _APIS:
        return _APIS[key]
    try:
        if package == "nas_201_api":
            from nas_201_api import NASBench201API

            with _full_unpickling():
                api = NASBench201API(table, verbose=False)
        else:
            import nats_bench

            api = nats_bench.create(table, "tss", fast_mode=os.path.isdir(table), verbose=False)
    except Exception as exc:  # the APIs assert, raise KeyError/ValueError, or fail to unpickle
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise LookupTableError(f"table {table}: {package} cannot read it ({msg})") from None
    _APIS[key] = (package, api)
    return _APIS[key]


def _info(api, index: int, dataset: str, hp: str) -> dict:
    # mean over the trials, last epoch; the API picks the splits SPLITS lists
    return api.get_more_info(index, dataset, hp=hp, is_random=False)


def _float(v):
    return None if v is None else float(v)


def _best(package: str, api, key: tuple, dataset: str, hp: str) -> dict:
    if (key, dataset, hp) in _BEST:
        return _BEST[(key, dataset, hp)]
    select = "cifar10-valid" if dataset == "cifar10" else dataset
    indexes = range(len(api)) if package == "nats_bench" and api.fast_mode else sorted(api.evaluated_indexes)
    best, best_valid, best_test, max_test = None, None, None, None
    for i in indexes:
        try:
            info = _info(api, i, dataset, hp)
            valid = (info if select == dataset else _info(api, i, select, hp))["valid-accuracy"]
        except Exception as exc:
            raise LookupTableError(f"table {key[0]}: architecture {i} has no hp={hp} results on {select} "
                                   f"({type(exc).__name__}: {exc})") from None
        test = info.get("test-accuracy")
        if best_valid is None or valid > best_valid:
            best, best_valid, best_test = i, valid, test
        if test is not None and (max_test is None or test > max_test):
            max_test = test
    if best is None:
        raise LookupTableError(f"table {key[0]}: no evaluated architectures")
    _BEST[(key, dataset, hp)] = {
        "arch": api.arch(best),
        "index": int(best),
        "valid_accuracy": _float(best_valid),
        "test_accuracy": _float(best_test),
        "max_test_accuracy": _float(max_test),
        "selected_by": f"highest valid accuracy ({SPLITS[select][0]} of {select})",
    }
    return _BEST[(key, dataset, hp)]


def lookup(arch: str, table, dataset: str | None = None, hp: str = "200") -> dict:
    """Train/valid/test accuracy (percent) of the NAS-Bench-201 architecture ``arch`` in
    ``table`` (a .pth file, a NATS-tss .pickle.pbz2 file or -simple folder), on ``dataset`` (one
    of ``DATASETS``, default 'cifar10-valid'; the spelling's case is free) with ``hp`` '200' or
    '12' training epochs, and the table's best architecture (see the module's doc). Returns a
    dict: arch (as the table spells it), dataset, hp, table, api, index, trials,
    train/valid/test_accuracy, valid_split/test_split and best {arch, index, valid_accuracy,
    test_accuracy, max_test_accuracy, selected_by}. ``table='analog-nasbench'`` (or a ``.anb``
    file) answers from the offline table: 'cifar10' and '200' only, no train/valid accuracies,
    plus ``label`` and ``random_cell`` (``nb201_offline.offline_lookup``). Raises
    LookupTableError (a ValueError) with one line."""
    if offline.is_offline(table):
        try:
            return offline.offline_lookup(arch, os.fspath(table), dataset=dataset, hp=hp)
        except offline.OfflineTableError as exc:
            raise LookupTableError(str(exc)) from None
    arch = _canonical_arch(arch)
    dataset, hp = _dataset("cifar10-valid" if dataset is None else dataset), _hp(hp)
    table = os.fspath(table)
    package, api = table_api(table)
    index = api.query_index_by_arch(arch)
    if index < 0:
        raise LookupTableError(f"arch {arch} is not in table {table} ({len(api)} architectures)")
    try:
        results = api.query_meta_info_by_index(index, hp)
    except Exception:
        raise LookupTableError(f"table {table} has no hp={hp} results for architecture {index} ({arch})") from None
    if dataset not in results.get_dataset_names():
        raise LookupTableError(f"table {table} has no hp={hp} results on {dataset} for architecture {index}; "
                               f"it has {', '.join(results.get_dataset_names())}")
    info = _info(api, index, dataset, hp)
    valid_split, test_split = SPLITS[dataset]
    return {
        "arch": arch,
        "dataset": dataset,
        "hp": hp,
        "table": os.path.abspath(table),
        "api": package,
        "index": int(index),
        "trials": len(results.get_dataset_seeds(dataset)),
        "train_accuracy": _float(info["train-accuracy"]),
        "valid_accuracy": _float(info.get("valid-accuracy")) if valid_split else None,
        "test_accuracy": _float(info.get("test-accuracy")),
        "valid_split": valid_split,
        "test_split": test_split,
        "best": dict(_best(package, api, _key(table), dataset, hp)),
    }


def lookup_all(arch: str, table, log) -> dict:
    """{dataset: lookup(arch, table, dataset)} over every dataset the table has (hp 200; the
    offline table: 'cifar10' only), one line per dataset to ``log``; a dataset the table cannot
    answer is recorded as {"error": message}, never raised (a search calls this when it is done)."""
    out = {}
    for dataset in ("cifar10",) if offline.is_offline(table) else DATASETS:
        try:
            out[dataset] = r = lookup(arch, table, dataset=dataset)
        except LookupTableError as exc:
            out[dataset] = {"error": str(exc)}
            log(f"lookup {dataset}: {exc}")
            continue
        if "label" in r:
            log(f"{r['label']}: test {r['test_accuracy']:.2f} (best in the table {r['best']['test_accuracy']:.2f}, "
                f"a random cell {r['random_cell']['mean']:.2f} on average, median {r['random_cell']['median']:.2f})")
            continue
        valid = "-" if r.get("valid_accuracy") is None else f"{r['valid_accuracy']:.2f}"
        log(f"NAS-Bench-201 {dataset}: valid {valid}, test {r['test_accuracy']:.2f} "
            f"(best in the space: {r['best']['test_accuracy']:.2f})")
    return out
