"""Checkpoints of both run loops (``toponas search``, ``toponas train``): written atomically, so a
kill mid-write leaves the last good one; loaded with ``torch.load(weights_only=True)``, so a
checkpoint someone hands over cannot run code on ``--resume``; and a damaged or foreign file is
answered with one line naming it and what to do."""

from __future__ import annotations

import io
import os

import pytest
import torch

from toponas_kernels import cli
from toponas_kernels.search import SearchConfig, run

SEARCH = ["search", "--space", "nb201", "--method", "darts", "--dataset", "synthetic", "--epochs", "1",
          "--layers", "1", "--init-channels", "4", "--batch-size", "8", "--train-size", "16", "--device", "cpu",
          "--no-progress", "--no-plots", "--threads", "1"]
TRAIN = ["train", "--genotype", "|nor_conv_3x3~0|+|skip_connect~0|nor_conv_1x1~1|+|skip_connect~0|none~1|avg_pool_3x3~2|",
         "--dataset", "synthetic", "--epochs", "1", "--layers", "1", "--init-channels", "4", "--batch-size", "8",
         "--train-size", "16", "--test-size", "8", "--device", "cpu", "--no-progress", "--no-plots", "--threads", "1"]
COMMANDS = {"search": SEARCH, "train": TRAIN}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny networks: one thread is faster and immune to a busy machine."""


def _finished_run(kind: str, out, capsys) -> list[str]:
    """Run the tiny command once into ``out``; returns its arguments (for a ``--resume``)."""
    args = COMMANDS[kind] + ["--out", str(out)]
    assert cli.main(args) == 0
    capsys.readouterr()
    return args


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


class _Opens:
    """Unpickled, this object would call ``open(path, "w")``: any code a pickle names runs."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("kind", ["search", "train"])
def test_checkpoint_loads_as_tensors_and_plain_values_only(kind, tmp_path, capsys):
    _finished_run(kind, tmp_path / "run", capsys)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["finished"] is True
    for key in ("torch", "python", "numpy"):
        assert key in state["rng"]


@pytest.mark.parametrize("kind", ["search", "train"])
def test_resume_refuses_a_checkpoint_that_carries_a_pickled_object(kind, tmp_path, capsys):
    args = _finished_run(kind, tmp_path / "run", capsys)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    marker = tmp_path / "code_ran"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state["finished"] = False
    state["run"]["note"] = _Opens(marker)
    torch.save(state, ckpt)
    assert cli.main(args + ["--resume"]) == 2
    err = _one_line_error(capsys)
    assert str(ckpt) in err and "open" in err and "could run code" in err
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["search", "train"])
@pytest.mark.parametrize("damage", ["truncated", "text", "empty", "not a checkpoint"])
def test_resume_on_a_damaged_checkpoint_answers_in_one_line(kind, damage, tmp_path, capsys):
    args = _finished_run(kind, tmp_path / "run", capsys)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    data = ckpt.read_bytes()
    if damage == "truncated":
        ckpt.write_bytes(data[: len(data) // 2])
    elif damage == "text":
        ckpt.write_text("epoch 3\nstep 12\n")
    elif damage == "empty":
        ckpt.write_bytes(b"")
    else:
        torch.save({"weights": torch.zeros(3)}, ckpt)
    assert cli.main(args + ["--resume"]) == 2
    err = _one_line_error(capsys)
    assert str(ckpt) in err and "delete it" in err


class _Killed(BaseException):
    """Stands for the process being killed (not an Exception: nothing may catch it)."""


def test_a_kill_while_writing_a_checkpoint_leaves_the_last_good_one(tmp_path, monkeypatch):
    """The second checkpoint write dies halfway through its bytes; the file on disk is still the
    first checkpoint, whole, and ``--resume`` continues from it to the result of a run that was
    never killed."""
    cfg = dict(space="nb201", method="darts", dataset="synthetic", epochs=1, layers=1, init_channels=4, batch_size=4,
               train_size=32, steps_per_epoch=None, checkpoint_every=1, progress=False, plots=False, threads=1)
    whole = run(SearchConfig(out=str(tmp_path / "whole"), **cfg), log=lambda m: None)

    real_save = torch.save
    writes = []

    def dying_save(obj, f, *a, **kw):
        writes.append(1)
        if len(writes) < 2:
            return real_save(obj, f, *a, **kw)
        buf = io.BytesIO()
        real_save(obj, buf, *a, **kw)
        data = buf.getvalue()
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as fh:
                fh.write(data[: len(data) // 2])
        else:
            f.write(data[: len(data) // 2])
            f.flush()
        raise _Killed

    monkeypatch.setattr(torch, "save", dying_save)
    out = tmp_path / "cut"
    with pytest.raises(_Killed):
        run(SearchConfig(out=str(out), **cfg), log=lambda m: None)
    monkeypatch.setattr(torch, "save", real_save)
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert (state["run"]["epoch"], state["run"]["step"]) == (0, 1)
    assert [f for f in os.listdir(out) if f.endswith(".tmp")] == []
    resumed = run(SearchConfig(out=str(out), resume=True, **cfg), log=lambda m: None)
    assert resumed["alphas"] == whole["alphas"]
