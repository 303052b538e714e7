"""The options every run has, whatever it runs: the searcher's ``SearchConfig`` and the
retrainer's ``TrainConfig`` are this dataclass plus their own fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from .errors import ConfigError


@dataclass
class RunOptions:
    """Where a run writes, how it starts, its schedule and optimizer, its network's size, how
    much data it reads, and how it reports. ``None`` fields take the reference value of what the
    run runs (the method and space of a search, the space of a retrained cell)."""

    out: str | None = None
    data_dir: str | None = None
    seed: int = 0
    resume: bool = False
    deterministic: bool = False
    device: str = "auto"
    # schedule and optimizer (None: reference value)
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    lr_min: float | None = None
    momentum: float | None = None
    nesterov: bool | None = None
    weight_decay: float | None = None
    grad_clip: float | None = None  # 0: no clipping
    # network
    init_channels: int | None = None  # DARTS 16 (search) / 36 (retraining), NB201 16
    layers: int | None = None  # DARTS: cells; NB201: cells per stage
    # data
    train_size: int | None = None  # use only the first N training images (quick runs)
    steps_per_epoch: int | None = None  # stop an epoch after N steps (quick runs)
    num_workers: int | None = None
    channels: int | None = None
    # run
    checkpoint_every: int = 0  # steps; 0: at the end of every epoch only
    progress: bool = True
    plots: bool = True  # pictures at the end
    threads: int | None = None  # torch intra-op threads (None: torch's default)

    #: options that change how a run reports, not what it computes: left out of its record
    NOT_RECORDED: ClassVar[tuple[str, ...]] = ("progress", "resume", "plots", "threads")

    def check_device(self) -> None:
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"--device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")

    def recorded(self) -> dict:
        """The options as a JSON-able dict, without those in ``NOT_RECORDED``."""
        d = dataclasses.asdict(self)
        for key in self.NOT_RECORDED:
            d.pop(key)
        return d
