"""A run's folder across restarts: checkpoints written atomically and loaded with
``torch.load(weights_only=True)`` (tensors and plain values only, so a checkpoint someone hands
over cannot run code), one-line refusals of a damaged or foreign file, and the start of a run
that may be a resume (``RunFolder``)."""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable

import torch

from .._io import atomic_torch_save
from .device import set_rng_state
from .errors import CheckpointError, ConfigError

CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"


def save_checkpoint(path: str, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (a kill mid-write leaves the previous file)."""
    atomic_torch_save(path, state)


def load_checkpoint(path: str, keys: tuple[str, ...]) -> dict:
    """The checkpoint at ``path``, loaded with ``torch.load(weights_only=True)``: tensors, plain
    Python values and containers only, never an object that names a class or function to import.
    Anything else (an object that could run code, a truncated file, a file of another kind, a dict
    without ``keys``) raises ``CheckpointError`` with one line naming the file and what to do."""
    fix = "delete it (or choose another --out) to start over"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f"'{found.group(1)}'" if found else "an object other than tensors and plain values"
        raise CheckpointError(f"--resume: {path} holds {what}, which loading would import and could run code "
                              f"(a checkpoint of this version holds tensors and plain values only); refused: "
                              f"{fix}") from None
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, KeyError, EOFError, ... on a bad file
        detail = str(exc).split(". ")[0].strip()
        if not zipfile.is_zipfile(path):
            reason = "not a whole torch.save archive: cut short, or a file of another kind"
        else:
            reason = f"{type(exc).__name__}: {detail[:120]}" if detail else type(exc).__name__
        raise CheckpointError(f"--resume: {path} is damaged or not a checkpoint ({reason}); {fix}") from None
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"--resume: {path} is not a checkpoint of this kind of run (no '{missing[0]}'); {fix}")
    return state


def check_resume(saved: dict, now: dict, keys: Iterable[str]) -> None:
    """Refuse to resume when an option in ``keys`` differs between the checkpoint's configuration
    (``saved``) and this run's (``now``)."""
    diff = [k for k in keys if saved.get(k) != now.get(k)]
    if diff:
        k = diff[0]
        raise ConfigError(f"--resume: the checkpoint was made with {k}={saved.get(k)!r}, this run asks for "
                          f"{now.get(k)!r}; resume with the same options or choose another --out")


class RunFolder:
    """The files of one run in its ``--out`` folder: the checkpoint and the result."""

    def __init__(self, out: str | None, kind: str):
        if not out:
            raise ConfigError(f"--out: give the folder the {kind} writes to")
        self.option = out
        self.path = os.path.abspath(out)
        self.kind = kind
        self.checkpoint = os.path.join(self.path, CHECKPOINT)
        self.result = os.path.join(self.path, RESULT)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def previous(self, resume: bool, keys: tuple[str, ...], held: str, log: Callable[[str], None]) -> dict | None:
        """The checkpoint to resume from, or None for a fresh start. A checkpoint without
        ``resume`` is refused (``held``: what the folder holds, e.g. "a search"); ``resume``
        without one starts afresh, saying so."""
        if os.path.exists(self.checkpoint):
            if not resume:
                raise ConfigError(f"--out {self.option} already holds {held} ({CHECKPOINT}); pass --resume to continue "
                                  "it or choose another --out")
            return load_checkpoint(self.checkpoint, keys)
        if resume:
            log(f"--resume: no checkpoint in {self.option} yet; starting the {self.kind}")
        return None

    def finished(self, state: dict | None, log: Callable[[str], None]) -> dict | None:
        """The result of a run that the checkpoint says finished, else None."""
        if state is None or not state.get("finished") or not os.path.exists(self.result):
            return None
        log(f"{self.kind} in {self.option} already finished; result in {self.result}")
        with open(self.result) as f:
            return json.load(f)

    def resume(self, state: dict, parts: dict, log: Callable[[str], None]) -> dict:
        """Load each of ``parts`` (name in the checkpoint: an object with ``load_state_dict``)
        from ``state``, restore every RNG state, and return the run's position and records."""
        for name, part in parts.items():
            part.load_state_dict(state[name])
        run_state = state["run"]
        set_rng_state(state["rng"])
        log(f"resumed {self.option} at epoch {run_state['epoch'] + 1}, step {run_state['step']}")
        return run_state

    def save(self, state: dict) -> None:
        save_checkpoint(self.checkpoint, state)
