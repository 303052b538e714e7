"""Files written so that a crash never leaves a half-written one: write a temporary file in the
same folder, flush it to disk, then ``os.replace`` it over the target (atomic on POSIX)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable


def atomic_write(path: str | os.PathLike, write: Callable, *, text: bool = True) -> str:
    """Call ``write(file)`` on a temporary file next to ``path`` (text: UTF-8, no newline
    translation), then move it into place; the parent folder is created. Returns the path."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") if text else os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj, *, indent: int | None = 2) -> str:
    return atomic_write(path, lambda f: (json.dump(obj, f, indent=indent), f.write("\n")))


def atomic_torch_save(path: str | os.PathLike, obj) -> str:
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f), text=False)
