"""What the searcher (``search.runner``), the retrainer (``train.trainer``), the memory planner
(``search.budget``) and the benchmarks (``bench/``) share to run and record their work:

* ``device``: the device, the CPU threads, the seeds, every RNG state as tensors (exact resume);
* ``checkpoints``: atomic checkpoints loaded with ``weights_only=True``, one-line refusals,
  the run folder and the start of a run that may be a resume (``RunFolder``);
* ``loop``: step clocks, the peak memory a run records (on ``toponas_kernels.memory_meter``),
  progress bars, logs, TensorBoard, the stop-as-if-killed test hook;
* ``processes``: data parallelism under torchrun, measurements in a fresh process;
* ``records``: the device's and the commit's names, the genotype as data, text and picture;
* ``options``: the options every run has (``RunOptions``, the base of both run configurations);
* ``errors``: the one-line errors of a run.

It imports nothing of ``search`` or ``train``: both sit above it.
"""

from .checkpoints import CHECKPOINT, RESULT, RunFolder, check_resume, load_checkpoint, save_checkpoint
from .device import resolve_device, rng_state, seed_everything, set_rng_state, set_threads, start
from .errors import CheckpointError, ConfigError
from .options import RunOptions
from .loop import (EpochLoop, PeakMemory, StepClock, bank_epoch_progress, finish_run, log_scalars, run_record, say,
                   silent, state_bytes, tensorboard_writer, tqdm_class)
from .processes import FreshProcessError, Processes, call_fresh, run_fresh
from .records import device_name, draw_cell, genotype_record, genotype_text, git_commit

__all__ = [
    "CHECKPOINT", "RESULT", "RunFolder", "check_resume", "load_checkpoint", "save_checkpoint",
    "resolve_device", "rng_state", "seed_everything", "set_rng_state", "set_threads", "start",
    "CheckpointError", "ConfigError", "RunOptions",
    "EpochLoop", "PeakMemory", "StepClock", "bank_epoch_progress", "finish_run", "log_scalars", "run_record", "say",
    "silent", "state_bytes",
    "tensorboard_writer", "tqdm_class",
    "FreshProcessError", "Processes", "call_fresh", "run_fresh",
    "device_name", "draw_cell", "genotype_record", "genotype_text", "git_commit",
]
