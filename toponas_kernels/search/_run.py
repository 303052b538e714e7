"""Run helpers shared by the searcher (``runner``) and the retrainer (``toponas_kernels.train``):
device choice, seeding, peak memory, step clocks, RNG state for exact resumes, checkpoints (written
atomically, loaded as tensors and plain values only), the records of a result file (device, commit,
genotype), progress bars and TensorBoard."""

from __future__ import annotations

import os
import platform
import random
import re
import resource
import subprocess
import sys
import time

import torch

from .._io import atomic_torch_save
from .config import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is visible here; use --device cpu (or auto)")
    return device


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """GPU: ``torch.cuda.max_memory_allocated``. CPU: growth of the resident set over its value
    at the start (the kernel's high-water mark, reset through /proc/self/clear_refs; without
    /proc, ``ru_maxrss``)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.base = 0
            return
        self.base = _status_bytes("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.hwm = True
        except OSError:
            self.hwm = False
        if self.base is None:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        top = _status_bytes("VmHWM") if self.hwm else None
        if top is None:
            top = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(0, int(top) - int(self.base))


def git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


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


def draw_cell(genotype, path: str, title: str) -> str:
    """The derived cell as a picture: an NB201 string or a DARTS Genotype (``report``)."""
    from .. import report

    if isinstance(genotype, str):
        return report.draw_nb201_cell(genotype, path, title=title)
    return report.draw_darts_cell(genotype_record(genotype), path, title=title)


def genotype_text(genotype) -> str:
    if isinstance(genotype, str):
        return genotype
    g = genotype_record(genotype)
    fmt = lambda genes: "[" + ", ".join(f"('{op}', {j})" for op, j in genes) + "]"  # noqa: E731
    return (
        f"Genotype(normal={fmt(g['normal'])}, normal_concat={g['normal_concat']}, "
        f"reduce={fmt(g['reduce'])}, reduce_concat={g['reduce_concat']})"
    )


class StepClock:
    """Step times without a host sync per step: CUDA events on a GPU, read once per epoch (or
    checkpoint); the wall clock on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list = []

    def start(self) -> None:
        if self.cuda:
            self._begin = torch.cuda.Event(enable_timing=True)
            self._begin.record()
        else:
            self._begin = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.pending.append((self._begin, end))
        else:
            self.pending.append(time.perf_counter() - self._begin)

    def collect(self) -> list[float]:
        """Seconds of the steps since the last call."""
        if self.cuda and self.pending:
            self.pending[-1][1].synchronize()
            out = [a.elapsed_time(b) / 1000 for a, b in self.pending]
        else:
            out = list(self.pending)
        self.pending = []
        return out


def bank_epoch_progress(run_state: dict, clock: "StepClock", sums: dict, t_epoch: float) -> float:
    """Move an epoch's progress so far (step times, running sums, seconds) into ``run_state``
    before a mid-epoch checkpoint; returns the new start of the epoch's clock."""
    run_state["step_times"].extend(clock.collect())
    run_state["sums"] = {k: v.detach().cpu() for k, v in sums.items()}
    run_state["seconds"] += time.perf_counter() - t_epoch
    return time.perf_counter()


def rng_state() -> dict:
    """Every RNG state as tensors and plain values (a checkpoint loads with ``weights_only=True``)."""
    import numpy as np

    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": int(version), "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the states ``rng_state`` returned."""
    import numpy as np

    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(w) for w in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from: damaged, not a checkpoint, or holding objects
    that loading would have to import (which could run code)."""


def save_checkpoint(path: str, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (a kill mid-write leaves the previous file)."""
    atomic_torch_save(path, state)


def load_checkpoint(path: str, keys: tuple[str, ...]) -> dict:
    """The checkpoint at ``path``, loaded with ``torch.load(weights_only=True)``: tensors, plain
    Python values and containers only, never an object that names a class or function to import.
    Anything else (an object that could run code, a truncated file, a file of another kind, a dict
    without ``keys``) raises ``CheckpointError`` with one line naming the file and what to do."""
    import pickle

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
        import zipfile

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


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def tensorboard_writer(out: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed
        return None
    return SummaryWriter(os.path.join(out, "tensorboard"))


def tqdm_class(log=None):
    """tqdm's progress bar class, or None (and one line through ``log``) when tqdm is missing."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if log is not None:
            log("no progress bars: tqdm is not installed (pip install tqdm, a declared dependency)")
        return None
    return tqdm


def silent(msg: str) -> None:
    pass


class Processes:
    """Data parallelism under ``torchrun``: each rank reads its share of both data halves, the
    gradients of the weights and of the architecture parameters are averaged over the ranks
    before every optimizer step, and every random draw that shapes the architecture (Gumbel
    noise, ROME's edges, masks) comes from the same seeded generators on every rank, so all ranks
    hold the same parameters and derive the same genotype. Rank 0 alone writes files and shows
    progress. Without torchrun: one process, nothing to do."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def start(self, device: torch.device) -> torch.device:
        if self.world == 1:
            return device
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return device

    def mean_grads(self, params) -> None:
        """Average ``.grad`` over the ranks (one flat all-reduce)."""
        import torch.distributed as dist

        grads = [p.grad for p in params if p.grad is not None]
        # the ranks must have run the same sub-network (same samples, same masks): same set of
        # parameters with a gradient, or the all-reduce would mix different tensors
        present = torch.tensor([i for i, p in enumerate(params) if p.grad is not None] or [-1], dtype=torch.float64)
        key = torch.stack([present.sum(), (present * present).sum(), torch.tensor(float(len(grads)), dtype=torch.float64)])
        hi, lo = key.clone(), key.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        if not torch.equal(hi, lo):
            raise RuntimeError("data parallel: the ranks ran different sub-networks (their random draws differ); "
                               "start every rank with the same --seed")
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def sum(self, sums: dict) -> dict:
        """Epoch sums added over the ranks (for the log)."""
        if self.world == 1 or not sums:
            return sums
        import torch.distributed as dist

        keys = sorted(sums)
        flat = torch.stack([sums[k].double() for k in keys])
        dist.all_reduce(flat)
        return dict(zip(keys, flat))

    def broadcast_buffers(self, module) -> None:
        """Rank 0's buffers (BN running statistics) to every rank."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for b in module.buffers():
            dist.broadcast(b, src=0)

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, params) -> bool:
        """Whether every rank holds the same values of ``params`` as the others."""
        if self.world == 1:
            return True
        import torch.distributed as dist

        flat = torch.cat([p.detach().reshape(-1).double() for p in params])
        hi, lo = flat.clone(), flat.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        return bool(torch.equal(hi, lo))
