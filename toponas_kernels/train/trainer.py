"""Retraining a searched cell from scratch (``toponas train``): ``TrainConfig`` and ``train``.

DARTS space (REFERENCE.md): the evaluation network (20 cells, C 36), batch 96, SGD lr 0.025
momentum 0.9 wd 3e-4 with a cosine schedule to 0 over the epochs, grad clip 5, auxiliary head
weighted 0.4, drop-path probability 0.2 * epoch / epochs, random crop + flip + cutout 16, 600
epochs. NAS-Bench-201: its network (C 16, 5 cells per stage), batch 256, SGD nesterov lr 0.1
momentum 0.9 wd 5e-4 cosine to 0, crop + flip only, no clip / auxiliary / drop-path, 200 epochs.
Every field left ``None`` takes the value of the genotype's space.

The test split is evaluated after every epoch: ``test_accuracy`` is the last epoch's,
``best_accuracy`` the best. Files in ``out``: ``result.json`` (atomic), ``train_log.csv`` (a row
per epoch), ``curves.png``, ``cell.png``, ``checkpoint.pt`` (end of every epoch, and every
``checkpoint_every`` steps) and TensorBoard logs when tensorboard is installed. Resume is exact
on a CPU: the batch order and augmentation are seeded by (seed, epoch[, index]), and the
checkpoint holds the model, the optimizer, the position in the epoch, the running sums and
every RNG state (drop-path draws from torch's).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import _version
from .._io import atomic_write_json
from ..search._run import (PeakMemory, bank_epoch_progress, Processes, StepClock, silent, device_name, draw_cell, genotype_record, genotype_text, git_commit,
                           load_checkpoint, resolve_device, rng_state, save_checkpoint, say, seed_everything,
                           set_rng_state, tensorboard_writer, tqdm_class)
from ..search.config import ConfigError
from .darts_network import DartsEvalNetwork, count_parameters
from .genotypes import Arch, load_arch
from .nb201_network import NB201EvalNetwork

CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"
LOG = "train_log.csv"

# Reference retraining settings per macro space (REFERENCE.md; NAS-Bench-201's own schedule).
REFERENCE = {
    "darts": dict(epochs=600, batch_size=96, lr=0.025, lr_min=0.0, momentum=0.9, nesterov=False, weight_decay=3e-4,
                  grad_clip=5.0, aux_weight=0.4, drop_path=0.2, cutout=16, init_channels=36, layers=20),
    "nb201": dict(epochs=200, batch_size=256, lr=0.1, lr_min=0.0, momentum=0.9, nesterov=True, weight_decay=5e-4,
                  grad_clip=0.0, aux_weight=0.0, drop_path=0.0, cutout=0, init_channels=16, layers=5),
}


class Interrupted(RuntimeError):
    """Raised when ``_INTERRUPT_AFTER`` steps are done: the run stops as if killed."""


#: a test hook, not an option: set (e.g. with pytest's monkeypatch) to stop the run with
#: ``Interrupted`` once this many steps are done; None runs to the end
_INTERRUPT_AFTER: int | None = None


@dataclass
class TrainConfig:
    """One retraining run; ``None`` fields take the reference value of the genotype's space."""

    genotype: object = "DARTS_V2"  # see genotypes.load_arch: path, Genotype string, name, NB201 string
    dataset: str = "cifar10"
    out: str | None = None
    data_dir: str | None = None
    seed: int = 0
    resume: bool = False
    deterministic: bool = False
    device: str = "auto"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    lr_min: float | None = None
    momentum: float | None = None
    nesterov: bool | None = None
    weight_decay: float | None = None
    grad_clip: float | None = None  # 0: no clipping
    aux_weight: float | None = None  # 0: no auxiliary head
    drop_path: float | None = None  # final drop-path probability (linear from 0)
    cutout: int | None = None  # 0: none
    init_channels: int | None = None
    layers: int | None = None  # DARTS: cells; NB201: cells per stage
    train_size: int | None = None  # first N training images only (quick runs)
    test_size: int | None = None  # first N test images only (quick runs)
    steps_per_epoch: int | None = None
    num_workers: int | None = None
    channels: int | None = None
    checkpoint_every: int = 0
    progress: bool = True
    plots: bool = True
    threads: int | None = None

    def resolved(self) -> tuple["TrainConfig", Arch]:
        arch = load_arch(self.genotype)
        values = {k: (v if getattr(self, k) is None else getattr(self, k)) for k, v in REFERENCE[arch.macro].items()}
        if self.num_workers is None:
            values["num_workers"] = 0
        cfg = dataclasses.replace(self, **values)
        cfg._check(arch)
        return cfg, arch

    def _check(self, arch: Arch) -> None:
        def positive_int(key, v, allow_none=False):
            if allow_none and v is None:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"--{key.replace('_', '-')}: expected a positive integer, got {v!r}")

        for key in ("epochs", "batch_size", "init_channels", "layers"):
            positive_int(key, getattr(self, key))
        for key in ("train_size", "test_size", "steps_per_epoch", "threads"):
            positive_int(key, getattr(self, key), allow_none=True)
        if not self.lr > 0:
            raise ConfigError(f"--lr: expected a positive learning rate, got {self.lr!r}")
        for key in ("lr_min", "momentum", "weight_decay", "grad_clip", "aux_weight", "cutout", "checkpoint_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"--{key.replace('_', '-')}: expected a value >= 0, got {getattr(self, key)!r}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"--drop-path: expected a probability in [0, 1), got {self.drop_path!r}")
        if arch.macro == "darts" and self.layers < 3:
            raise ConfigError(f"--layers: the DARTS network needs at least 3 cells (two are reductions), got {self.layers}")
        if arch.macro == "darts" and self.init_channels % 2:
            raise ConfigError(f"--init-channels: the DARTS network needs an even C (FactorizedReduce halves it), got {self.init_channels}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"--device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")

    def to_dict(self, arch: Arch | None = None) -> dict:
        """The options as a JSON-able dict; ``genotype`` as the cell's text (so that 'darts_v2' and
        its Genotype string resume each other), ``genotype_spec`` as given."""
        arch = arch or load_arch(self.genotype)
        spec = self.genotype if isinstance(self.genotype, str) else arch.source
        d = dataclasses.asdict(dataclasses.replace(self, genotype=genotype_text(arch.genotype)))
        d["genotype_spec"] = spec
        d["space"] = arch.space
        for key in ("progress", "resume", "plots", "threads"):
            d.pop(key)
        return d


# What must agree between a checkpoint and the configuration resuming it.
RESUME_KEYS = ("genotype", "space", "dataset", "seed", "epochs", "batch_size", "lr", "lr_min", "momentum", "nesterov",
               "weight_decay", "grad_clip", "aux_weight", "drop_path", "cutout", "init_channels", "layers",
               "train_size", "test_size", "steps_per_epoch", "channels")


def build_network(arch: Arch, cfg: TrainConfig, num_classes: int, in_channels: int) -> torch.nn.Module:
    if arch.macro == "nb201":
        return NB201EvalNetwork(arch.genotype, cfg.init_channels, cfg.layers, num_classes, in_channels=in_channels)
    return DartsEvalNetwork(arch.genotype, cfg.init_channels, num_classes, cfg.layers, auxiliary=cfg.aux_weight > 0,
                            in_channels=in_channels, space=arch.space)


def cosine_lr(cfg: TrainConfig, epoch: int) -> float:
    """The learning rate of ``epoch`` (0-based): cosine from ``lr`` to ``lr_min`` over the epochs."""
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * epoch / cfg.epochs))


def _data(cfg: TrainConfig):
    from .. import data as D

    size = D.dataset_info(cfg.dataset, cfg.channels).image_size
    if cfg.cutout > size:
        raise ConfigError(f"--cutout: expected a side of at most the image size ({size} for {cfg.dataset}), got {cfg.cutout}")
    augment, cutout = ("train", cfg.cutout) if cfg.cutout else ("search", 0)
    train = D.load_split(cfg.dataset, "train", cfg.data_dir, channels=cfg.channels, download=True, seed=cfg.seed,
                         augment=augment, cutout=cutout)
    test = D.load_split(cfg.dataset, "test", cfg.data_dir, channels=cfg.channels, download=True, seed=cfg.seed)
    n_train = len(train) if cfg.train_size is None else min(len(train), cfg.train_size)
    n_test = len(test) if cfg.test_size is None else min(len(test), cfg.test_size)
    if n_train < 2 or n_test < 1:
        raise ConfigError(f"--train-size/--test-size: need at least 2 training and 1 test image, got {n_train} and {n_test}")
    return D, train, test, list(range(n_train)), list(range(n_test))


@torch.no_grad()
def evaluate(model, D, test, idx, batch_size, device, procs: Processes | None = None) -> tuple[float, float]:
    """(mean loss, accuracy in %) of ``model`` on ``test[idx]``, in eval mode; data parallel:
    each rank its share, the sums added over the ranks."""
    procs = procs or Processes()
    model.eval()
    sums = {"loss": torch.zeros((), device=device, dtype=torch.float64),
            "correct": torch.zeros((), device=device, dtype=torch.float64)}
    for x, y in D.make_loader(test, idx, batch_size, seed=0, epoch=0, shuffle=False, shard=(procs.rank, procs.world)):
        x, y = x.to(device), y.to(device)
        logits, _ = model(x)
        sums["loss"] += F.cross_entropy(logits, y, reduction="sum").double()
        sums["correct"] += (logits.argmax(1) == y).sum()
    sums = procs.sum(sums)
    return float(sums["loss"]) / len(idx), 100.0 * float(sums["correct"]) / len(idx)


def train(config: TrainConfig, *, log: Callable[[str], None] = say) -> dict:
    """Retrain (or resume) the cell of ``config`` and return its result (also ``out/result.json``)."""
    cfg, arch = config.resolved()
    if not cfg.out:
        raise ConfigError("--out: give the folder the training writes to")
    procs = Processes()
    if procs.world > 1 and cfg.batch_size % procs.world:
        raise ConfigError(f"--batch-size {cfg.batch_size}: must divide by the {procs.world} processes (it is the global batch)")
    if not procs.main:
        log = silent
    out = os.path.abspath(cfg.out)
    ckpt_path, result_path = os.path.join(out, CHECKPOINT), os.path.join(out, RESULT)
    state = None
    if os.path.exists(ckpt_path):
        if not cfg.resume:
            raise ConfigError(f"--out {cfg.out} already holds a training run ({CHECKPOINT}); pass --resume to continue it or choose another --out")
        state = load_checkpoint(ckpt_path, ("config", "model", "optimizer", "run", "rng"))
        _check_resume(state["config"], cfg.to_dict(arch))
        if state.get("finished") and os.path.exists(result_path):
            log(f"training in {cfg.out} already finished; result in {result_path}")
            with open(result_path) as f:
                return json.load(f)
    elif cfg.resume:
        log(f"--resume: no checkpoint in {cfg.out} yet; starting the training")
    if procs.main:
        os.makedirs(out, exist_ok=True)

    device = procs.start(resolve_device(cfg.device))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed, cfg.deterministic)
    from ..data import dataset_info

    size = dataset_info(cfg.dataset, cfg.channels).image_size
    if arch.macro == "darts" and cfg.aux_weight > 0 and size < 32:
        raise ConfigError(f"--aux-weight: the auxiliary head needs 32x32 images ({cfg.dataset} has {size}x{size}); "
                          "pass --aux-weight 0")
    D, train_set, test_set, train_idx, test_idx = _data(cfg)
    info = train_set.info
    meter = PeakMemory(device)
    model = build_network(arch, cfg, info.num_classes, info.channels).to(device)
    params, params_aux = count_parameters(model), count_parameters(model, auxiliary=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                nesterov=cfg.nesterov)
    num_workers = cfg.num_workers
    pin = device.type == "cuda"
    # data parallel: each rank its share of every epoch, 1/world of the (global) batch
    batch, shard = cfg.batch_size // procs.world, (procs.rank, procs.world)
    share = len(train_idx) // procs.world  # the smallest share: every rank runs as many steps
    # BatchNorm cannot train on a last batch of one image: drop it then.
    drop_last = share % batch == 1
    steps_total = share // batch if drop_last else math.ceil(share / batch)
    steps = min(steps_total, cfg.steps_per_epoch) if cfg.steps_per_epoch else steps_total

    run_state = {"epoch": 0, "step": 0, "sums": {}, "rows": [], "step_times": [], "seconds": 0.0, "peak": 0}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        run_state = state["run"]
        set_rng_state(state["rng"])
        log(f"resumed {cfg.out} at epoch {run_state['epoch'] + 1}, step {run_state['step']}")
    else:
        log(f"retraining {genotype_text(arch.genotype)} ({arch.space}) on {cfg.dataset}: "
            f"{params / 1e6:.6f} M parameters ({params_aux / 1e6:.6f} M with the auxiliary head)")
    writer = tensorboard_writer(out) if procs.main else None
    bar_cls = tqdm_class(log) if cfg.progress and procs.main else None

    def save(finished: bool = False):
        run_state["peak"] = max(run_state["peak"], meter.peak())
        if not procs.main:
            return
        save_checkpoint(ckpt_path, {"config": cfg.to_dict(arch), "model": model.state_dict(),
                                    "optimizer": optimizer.state_dict(), "run": run_state, "rng": rng_state(),
                                    "finished": finished})

    done_steps = 0
    params_list = list(model.parameters())
    for epoch in range(run_state["epoch"], cfg.epochs):
        model.train()
        lr = cosine_lr(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.drop_path_prob = cfg.drop_path * epoch / cfg.epochs
        start = run_state["step"]
        it = iter(D.make_loader(train_set, train_idx, batch, seed=cfg.seed, epoch=epoch, start_batch=start,
                                num_workers=num_workers, pin_memory=pin, drop_last=drop_last, shard=shard))
        bar = bar_cls(total=steps, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                      dynamic_ncols=True) if bar_cls else None
        sums = {k: v.to(device) for k, v in run_state["sums"].items()} or {
            "loss": torch.zeros((), device=device, dtype=torch.float64),
            "correct": torch.zeros((), device=device, dtype=torch.int64),
            "count": torch.zeros((), device=device, dtype=torch.int64)}
        clock = StepClock(device)
        t_epoch = time.perf_counter()
        for step in range(start, steps):
            x, y = next(it)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            clock.start()
            optimizer.zero_grad(set_to_none=True)
            logits, logits_aux = model(x)
            loss = F.cross_entropy(logits, y)
            total = loss if logits_aux is None else loss + cfg.aux_weight * F.cross_entropy(logits_aux, y)
            total.backward()
            if procs.world > 1:
                procs.mean_grads(params_list)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            clock.stop()
            sums["loss"] += loss.detach().double() * y.shape[0]
            sums["correct"] += (logits.detach().argmax(1) == y).sum()
            sums["count"] += y.shape[0]
            run_state["step"] = step + 1
            done_steps += 1
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    n = float(sums["count"])
                    bar.set_postfix_str(f"loss {float(sums['loss']) / n:.3f} acc {100 * float(sums['correct']) / n:.1f}%")
            if cfg.checkpoint_every and run_state["step"] % cfg.checkpoint_every == 0 and run_state["step"] < steps:
                t_epoch = bank_epoch_progress(run_state, clock, sums, t_epoch)
                save()
            if _INTERRUPT_AFTER is not None and done_steps >= _INTERRUPT_AFTER:
                raise Interrupted(f"interrupted after {done_steps} steps (test hook)")
        if bar is not None:
            bar.close()
        run_state["step_times"].extend(clock.collect())
        run_state["seconds"] += time.perf_counter() - t_epoch
        procs.broadcast_buffers(model)  # BN statistics are per rank in training; evaluate with rank 0's
        test_loss, test_acc = evaluate(model, D, test_set, test_idx, batch, device, procs)
        sums = procs.sum(sums)
        n = float(sums["count"])
        recent = run_state["step_times"][-steps:]
        row = {"epoch": epoch + 1, "lr": lr, "drop_path_prob": model.drop_path_prob,
               "train_loss": float(sums["loss"]) / n if n else float("nan"),
               "train_acc": 100 * float(sums["correct"]) / n if n else float("nan"),
               "test_loss": test_loss, "test_acc": test_acc,
               "step_seconds": statistics.median(recent) if recent else float("nan"), "seconds": run_state["seconds"]}
        run_state["rows"].append(row)
        run_state["epoch"], run_state["step"], run_state["sums"] = epoch + 1, 0, {}
        if procs.main:
            _write_log(out, run_state["rows"])
        if writer is not None:
            for k, v in row.items():
                writer.add_scalar(k, v, epoch + 1)
            writer.flush()
        save()
        log(f"epoch {row['epoch']}/{cfg.epochs}  lr {lr:.4g}  drop-path {row['drop_path_prob']:.3f}  train loss "
            f"{row['train_loss']:.3f} acc {row['train_acc']:.2f}%  test loss {test_loss:.3f} acc {test_acc:.2f}%  "
            f"step {row['step_seconds']:.3f} s  total {row['seconds']:.0f} s")

    agree = procs.agree(params_list)
    if not procs.main:
        return {}
    result = _finish(cfg, arch, run_state, params, params_aux, device, meter, out, log)
    if procs.world > 1:
        result["processes"] = {"world_size": procs.world, "ranks_agree": agree}
        atomic_write_json(result_path, result)
    save(finished=True)
    if writer is not None:
        writer.close()
    return result


def _check_resume(saved: dict, now: dict) -> None:
    diff = [k for k in RESUME_KEYS if saved.get(k) != now.get(k)]
    if diff:
        k = diff[0]
        raise ConfigError(f"--resume: the checkpoint was made with {k}={saved.get(k)!r}, this run asks for "
                          f"{now.get(k)!r}; resume with the same options or choose another --out")


def _write_log(out: str, rows: list[dict]) -> None:
    from ..report import write_csv

    write_csv(os.path.join(out, LOG), rows)


def _finish(cfg, arch, run_state, params, params_aux, device, meter, out, log) -> dict:
    rows = run_state["rows"]
    best = max(rows, key=lambda r: r["test_acc"])
    times = run_state["step_times"]
    result = {
        "genotype": genotype_record(arch.genotype),
        "genotype_text": genotype_text(arch.genotype),
        "genotype_source": arch.source,
        "space": arch.space,
        "dataset": cfg.dataset,
        "params": params,
        "params_with_aux": params_aux,
        "test_accuracy": rows[-1]["test_acc"],
        "best_accuracy": best["test_acc"],
        "best_epoch": best["epoch"],
        "test_loss": rows[-1]["test_loss"],
        "train_accuracy": rows[-1]["train_acc"],
        "epochs": cfg.epochs,
        "train_seconds": run_state["seconds"],
        "step_seconds": statistics.median(times) if times else None,
        "steps": len(times),
        "peak_memory_bytes": int(max(run_state["peak"], meter.peak())),
        "seed": cfg.seed,
        "device": device_name(device),
        "torch": torch.__version__,
        "version": _version.__version__,
        "commit": git_commit(),
        "config": cfg.to_dict(arch),
    }
    atomic_write_json(os.path.join(out, RESULT), result)
    if cfg.plots:
        _pictures(cfg, arch, rows, out, log)
    log(f"test accuracy {result['test_accuracy']:.2f}% (best {result['best_accuracy']:.2f}% at epoch "
        f"{result['best_epoch']}); result: {os.path.join(out, RESULT)}")
    return result


def _pictures(cfg, arch, rows, out, log) -> None:
    from .. import report

    title = f"{arch.source or arch.space} on {cfg.dataset}"
    cell = os.path.join(out, "cell.png")
    report.draw_pictures([
        lambda: report.plot_curves(rows, os.path.join(out, "curves.png"), title=title,
                                   groups={"loss": ["train_loss", "test_loss"], "accuracy (%)": ["train_acc", "test_acc"],
                                           "lr": ["lr"]}),
        lambda: draw_cell(arch.genotype, cell, title),
    ], log)
