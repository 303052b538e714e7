"""What a result file records beside its numbers: the device, the commit of the code, and the
derived genotype (as data, as text, as a picture)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    """The GPU's name and multiprocessor count; on a CPU, "CPU (<model, from /proc/cpuinfo>,
    <the cores this process may use> cores)"."""
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.multi_processor_count} SMs)"
    model = platform.processor() or platform.machine() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 0
    return f"CPU ({model}, {cores} cores)"


def git_commit(where: str | os.PathLike | None = None, *, short: bool = False, dirty: bool = False,
               ignore: tuple = ()) -> str | None:
    """The commit checked out at ``where`` (default: this package's folder), None outside a git
    checkout. ``short``: the abbreviated hash; ``dirty``: ``+dirty`` appended when the tree has
    changes (untracked files included) other than the paths in ``ignore``."""
    here = Path(where) if where is not None else Path(__file__).resolve().parent

    def git(*args):
        out = subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=30)
        return out.stdout if out.returncode == 0 else None

    try:
        head = git("rev-parse", *(["--short"] if short else []), "HEAD")
        if not head or not head.strip():
            return None
        head = head.strip()
        if not dirty:
            return head
        status = git("status", "--porcelain")
        root = git("rev-parse", "--show-toplevel")
    except (OSError, subprocess.SubprocessError):
        return None
    if status is None or root is None:
        return head
    skip = set()
    for p in ignore:
        try:
            skip.add(str(Path(p).resolve().relative_to(Path(root.strip()))))
        except ValueError:
            pass
    changed = [line for line in status.splitlines() if line[3:].strip().strip('"') not in skip]
    return head + ("+dirty" if changed else "")


def genotype_record(genotype):
    """DARTS: the Genotype as a dict of lists ([op, input] genes); NB201: the string."""
    if isinstance(genotype, str):
        return genotype
    return {
        "normal": [[op, int(j)] for op, j in genotype.normal],
        "normal_concat": list(genotype.normal_concat),
        "reduce": [[op, int(j)] for op, j in genotype.reduce],
        "reduce_concat": list(genotype.reduce_concat),
    }


def genotype_text(genotype) -> str:
    if isinstance(genotype, str):
        return genotype
    g = genotype_record(genotype)
    fmt = lambda genes: "[" + ", ".join(f"('{op}', {j})" for op, j in genes) + "]"  # noqa: E731
    return (
        f"Genotype(normal={fmt(g['normal'])}, normal_concat={g['normal_concat']}, "
        f"reduce={fmt(g['reduce'])}, reduce_concat={g['reduce_concat']})"
    )


def draw_cell(genotype, path: str, title: str) -> str:
    """The derived cell as a picture: an NB201 string or a DARTS Genotype (``report``)."""
    from .. import report

    if isinstance(genotype, str):
        return report.draw_nb201_cell(genotype, path, title=title)
    return report.draw_darts_cell(genotype_record(genotype), path, title=title)
