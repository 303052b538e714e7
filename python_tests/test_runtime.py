"""The run layer the searcher, the retrainer and the benchmarks share (``toponas_kernels.runtime``):
its place in the import graph, the run folder, the epoch loop's bookkeeping, fresh processes."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
import torch

from toponas_kernels import runtime as R

PKG = Path(__file__).resolve().parent.parent / "toponas_kernels"


def _imports(path: Path) -> set[str]:
    """The package-relative modules a file imports (at the top or inside functions)."""
    package = path.relative_to(PKG.parent).with_suffix("").parts[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def _module_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (at the top or inside functions), a package's
    ``__init__`` not counted as importing its own children (it re-exports them)."""
    mods = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in mods.items():
        is_init = path.name == "__init__.py"
        found = set()
        for m in _imports(path):
            # "from .x import y": the module x.y when there is one, else x
            while m and m not in mods:
                m = m.rpartition(".")[0]
            if m and m != name and not (is_init and m.startswith(name + ".")):
                found.add(m)
        graph[name] = found
    return graph


def test_the_package_import_graph_has_no_cycle():
    graph = _module_graph()
    assert "toponas_kernels.nas.mixed_op" in graph and graph["toponas_kernels.nas.mixed_op"]
    done, active = set(), []

    def visit(m):
        if m in active:
            raise AssertionError("import cycle: " + " -> ".join(active[active.index(m):] + [m]))
        if m in done:
            return
        active.append(m)
        for n in sorted(graph[m]):
            visit(n)
        active.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


def test_runtime_imports_nothing_of_search_or_train():
    for path in (PKG / "runtime").glob("*.py"):
        bad = [m for m in _imports(path) if re.match(r"toponas_kernels\.(search|train)\b", m)]
        assert not bad, (path.name, bad)


def test_retraining_does_not_import_the_searcher():
    for path in (PKG / "train").glob("*.py"):
        bad = [m for m in _imports(path) if m.startswith("toponas_kernels.search")]
        assert not bad, (path.name, bad)


def test_the_memory_planner_does_not_import_the_search_loop():
    assert not [m for m in _imports(PKG / "search" / "budget.py") if m.startswith("toponas_kernels.search.runner")]


def test_both_run_configurations_share_the_run_options():
    from toponas_kernels.search import SearchConfig
    from toponas_kernels.train import TrainConfig

    assert issubclass(SearchConfig, R.RunOptions) and issubclass(TrainConfig, R.RunOptions)
    with pytest.raises(R.ConfigError, match="--device"):
        TrainConfig(device="tpu", genotype="DARTS_V2").resolved()


def test_run_folder_refuses_a_checkpoint_without_resume_and_says_when_there_is_none(tmp_path):
    with pytest.raises(R.ConfigError, match="--out"):
        R.RunFolder(None, "search")
    folder = R.RunFolder(str(tmp_path / "run"), "search")
    said = []
    assert folder.previous(True, ("run",), "a search", said.append) is None
    assert said == [f"--resume: no checkpoint in {tmp_path / 'run'} yet; starting the search"]
    (tmp_path / "run").mkdir()
    folder.save({"run": {"epoch": 1, "step": 0}, "rng": R.rng_state(), "finished": False})
    with pytest.raises(R.ConfigError, match="already holds a search .*--resume"):
        folder.previous(False, ("run",), "a search", said.append)
    state = folder.previous(True, ("run",), "a search", said.append)
    assert folder.finished(state, said.append) is None
    with pytest.raises(R.CheckpointError, match="no 'model'"):
        folder.previous(True, ("run", "model"), "a search", said.append)


def test_check_resume_names_the_first_option_that_differs():
    R.check_resume({"seed": 0, "lr": 0.1}, {"seed": 0, "lr": 0.1}, ("seed", "lr"))
    with pytest.raises(R.ConfigError, match="lr=0.1, this run asks for 0.2"):
        R.check_resume({"seed": 0, "lr": 0.1}, {"seed": 0, "lr": 0.2}, ("seed", "lr"))


def _loop(run_state, saves, every=0):
    return R.EpochLoop(run_state, epochs=2, steps=3, device=torch.device("cpu"), meter=R.PeakMemory(torch.device("cpu")),
                       model=torch.nn.Linear(1, 1), save=lambda: saves.append(dict(run_state)), checkpoint_every=every)


def test_epoch_loop_steps_sums_and_mid_epoch_checkpoints():
    run_state = {"epoch": 0, "step": 0, "sums": {}, "step_times": [], "seconds": 0.0}
    saves = []
    loop = _loop(run_state, saves, every=2)
    seen = []
    for epoch in loop.epochs():
        for step in loop.steps(epoch):
            with loop.timed():
                seen.append((epoch, step))
            loop.add({"n": torch.tensor(1)})
        assert int(loop.sums["n"]) == 3
        loop.next_epoch(epoch)
    assert seen == [(e, s) for e in range(2) for s in range(3)]
    assert [s["step"] for s in saves] == [2, 2]  # at step 2 of each epoch (not at its end)
    assert len(run_state["step_times"]) == 6 and run_state["epoch"] == 2 and run_state["step"] == 0
    assert loop.meter.peak() > 0  # the first step was measured


def test_epoch_loop_resumes_mid_epoch_and_a_kill_leaves_the_last_whole_step():
    run_state = {"epoch": 1, "step": 1, "sums": {"n": torch.tensor(1)}, "step_times": [], "seconds": 0.0}
    loop = _loop(run_state, [])
    seen = []
    with pytest.raises(KeyboardInterrupt):
        for epoch in loop.epochs():
            for step in loop.steps(epoch):
                seen.append((epoch, step))
                if step == 2:
                    raise KeyboardInterrupt  # killed in the middle of step 2
                loop.add({"n": torch.tensor(1)})
    assert seen == [(1, 1), (1, 2)]
    assert run_state["step"] == 2 and int(loop.sums["n"]) == 2


def test_processes_share_the_batch_and_drop_a_last_batch_of_one():
    procs = R.Processes()
    assert procs.share(8, 17, None) == (8, 3, False)
    assert procs.share(8, 17, None, drop_single=True) == (8, 2, True)
    assert procs.share(8, 100, 5) == (8, 5, False)


def test_fresh_process_returns_the_last_json_line_and_fails_in_one_line():
    assert R.run_fresh(["-c", "print('noise'); print('{\"a\": 1}')"]) == {"a": 1}
    assert R.call_fresh("json:loads", '{"b": 2}') == {"b": 2}
    with pytest.raises(R.FreshProcessError) as err:
        R.run_fresh(["-c", "import sys; sys.exit('bad thing happened')"], what="probe")
    assert err.value.last_line == "bad thing happened" and str(err.value) == "probe failed: bad thing happened"


def test_device_and_commit_names():
    assert "cores" in R.device_name(torch.device("cpu"))
    full = R.git_commit()
    if full is None:
        pytest.skip("not a git checkout")
    assert re.fullmatch(r"[0-9a-f]{40}", full)
    assert re.fullmatch(r"[0-9a-f]{4,40}(\+dirty)?", R.git_commit(short=True, dirty=True))
    assert R.git_commit("/") is None or sys.platform != "linux"
