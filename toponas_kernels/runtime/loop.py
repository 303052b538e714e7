"""What every training loop needs around its steps: step clocks that do not sync the host, the
peak memory a run records, progress bars, one-line logs, TensorBoard. Nothing here stops a run
for a test: the tests kill a run by raising inside one of its steps, as a real kill stops it."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time

import torch

from ..memory import memory_meter


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


def state_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each storage once."""
    storages = {}
    for t in [*module.parameters(), *module.buffers()]:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


class PeakMemory:
    """The peak memory a run records, measured with ``toponas_kernels.memory_meter``. GPU: the
    most bytes allocated at once from construction (before the model is built) to the end of the
    run. CPU, where the exact meter profiles every op (slower, and its events pile up): the peak
    of the first step of the run (``watch``) plus the bytes of the model's parameters and
    buffers, which live before it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.recorded = 0
        self._gpu = memory_meter(device, saved=False).__enter__() if device.type == "cuda" else None
        self._cpu_done = False

    def watch(self, model: torch.nn.Module):
        """A context manager around a step: the first one is measured on a CPU."""
        if self._gpu is not None or self._cpu_done:
            return contextlib.nullcontext()
        return self._first_cpu_step(model)

    @contextlib.contextmanager
    def _first_cpu_step(self, model):
        with memory_meter(self.device, saved=False) as meter:
            yield
        self._cpu_done = True
        self.recorded = max(self.recorded, meter.peak_bytes + state_bytes(model))

    def peak(self) -> int:
        if self._gpu is not None:
            return max(self.recorded, self._gpu.current_peak_bytes())
        return self.recorded


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def tensorboard_writer(out: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed
        return None
    return SummaryWriter(os.path.join(out, "tensorboard"))


def log_scalars(writer, row: dict, step: int) -> None:
    """The numbers of ``row`` to TensorBoard (``writer`` None: nothing)."""
    if writer is None:
        return
    for k, v in row.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            writer.add_scalar(k, v, step)
    writer.flush()


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


class EpochLoop:
    """The steps of a run, epoch after epoch, with what every step needs around it: the progress
    bar, the step clock, the peak-memory watch, the running sums, the mid-epoch checkpoints.
    ``run_state`` (in the checkpoint) holds the position: ``epoch``, ``step``, ``sums``,
    ``step_times``, ``seconds``. ::

        for epoch in loop.epochs():
            for step in loop.steps(epoch):
                with loop.timed():
                    stats = train_step(...)
                loop.add(stats)
            loop.end_epoch()  # the epoch's clock into run_state
            ...  # evaluate, log, then loop.next_epoch(epoch) and save
    """

    def __init__(self, run_state: dict, *, epochs: int, steps: int, device: torch.device, meter: PeakMemory,
                 model: torch.nn.Module, save, checkpoint_every: int = 0, bar_cls=None, postfix=None, empty_sums=dict):
        self.state, self.epochs_total, self.steps_total = run_state, epochs, steps
        self.device, self.meter, self.model, self.save = device, meter, model, save
        self.checkpoint_every, self.bar_cls, self.postfix = checkpoint_every, bar_cls, postfix
        self.empty_sums = empty_sums

    def epochs(self):
        return range(self.state["epoch"], self.epochs_total)

    def steps(self, epoch: int):
        """The step indices left in ``epoch``; between two, the bookkeeping of the one done."""
        rs = self.state
        start = rs["step"]
        bar = self.bar_cls(total=self.steps_total, initial=start, desc=f"epoch {epoch + 1}/{self.epochs_total}",
                           leave=False, dynamic_ncols=True) if self.bar_cls else None
        self.sums = {k: v.to(self.device) for k, v in rs["sums"].items()} or self.empty_sums()
        self.clock = StepClock(self.device)
        self.t_epoch = time.perf_counter()
        for step in range(start, self.steps_total):
            yield step
            rs["step"] = step + 1
            if bar is not None:
                bar.update(1)
                if step % 10 == 0 and self.postfix is not None:
                    bar.set_postfix_str(self.postfix(self.sums))
            if self.checkpoint_every and rs["step"] % self.checkpoint_every == 0 and rs["step"] < self.steps_total:
                self.t_epoch = bank_epoch_progress(rs, self.clock, self.sums, self.t_epoch)
                self.save()
        if bar is not None:
            bar.close()
        rs["step_times"].extend(self.clock.collect())
        rs["seconds"] += time.perf_counter() - self.t_epoch

    @contextlib.contextmanager
    def timed(self):
        """Around the work of one step: its clock, and the peak-memory watch."""
        with self.meter.watch(self.model):
            self.clock.start()
            yield
            self.clock.stop()

    def add(self, stats: dict) -> None:
        """Add a step's statistics (tensors) to the epoch's running sums."""
        for k, v in stats.items():
            self.sums[k] = self.sums[k] + v.to(self.device) if k in self.sums else v.to(self.device)

    def next_epoch(self, epoch: int) -> None:
        """The position after ``epoch``: the next one, at its first step, with empty sums."""
        self.state["epoch"], self.state["step"], self.state["sums"] = epoch + 1, 0, {}


def run_record(run_state: dict, meter: PeakMemory, device: torch.device) -> dict:
    """The fields every result file has: the run's peak memory, its median step time and step
    count, and where and with what code it ran."""
    from .. import _version
    from .records import device_name, git_commit

    times = run_state["step_times"]
    return {
        "peak_memory_bytes": int(max(run_state["peak"], meter.peak())),
        "step_seconds": statistics.median(times) if times else None,
        "steps": len(times),
        "device": device_name(device),
        "torch": torch.__version__,
        "version": _version.__version__,
        "commit": git_commit(),
    }


def finish_run(procs, params, finish, folder, save, writer) -> dict:
    """The end of a run, on every rank: whether the ranks hold the same ``params``; on rank 0
    the result (``finish()``, which writes it), with the ranks' record under data parallelism,
    and the last checkpoint, marked finished. Other ranks return ``{}``."""
    from .._io import atomic_write_json

    agree = procs.agree(params)
    if not procs.main:
        return {}
    result = finish()
    if procs.world > 1:
        result["processes"] = {"world_size": procs.world, "ranks_agree": agree}
        atomic_write_json(folder.result, result)
    save(finished=True)
    if writer is not None:
        writer.close()
    return result
