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
import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import runtime as R
from .._io import atomic_write_json
from ..runtime import ConfigError, Processes, RunOptions, say
from .darts_network import DartsEvalNetwork, count_parameters
from .genotypes import Arch, load_arch
from .nb201_network import NB201EvalNetwork

LOG = "train_log.csv"

# Reference retraining settings per macro space (REFERENCE.md; NAS-Bench-201's own schedule).
REFERENCE = {
    "darts": dict(epochs=600, batch_size=96, lr=0.025, lr_min=0.0, momentum=0.9, nesterov=False, weight_decay=3e-4,
                  grad_clip=5.0, aux_weight=0.4, drop_path=0.2, cutout=16, init_channels=36, layers=20),
    "nb201": dict(epochs=200, batch_size=256, lr=0.1, lr_min=0.0, momentum=0.9, nesterov=True, weight_decay=5e-4,
                  grad_clip=0.0, aux_weight=0.0, drop_path=0.0, cutout=0, init_channels=16, layers=5),
}


CHECKPOINT_KEYS = ("config", "model", "optimizer", "run", "rng")


@dataclass
class TrainConfig(RunOptions):
    """One retraining run: the options every run has (``runtime.RunOptions``) and the
    retraining's own; ``None`` fields take the reference value of the genotype's space."""

    genotype: object = "DARTS_V2"  # see genotypes.load_arch: path, Genotype string, name, NB201 string
    dataset: str = "cifar10"
    aux_weight: float | None = None  # 0: no auxiliary head
    drop_path: float | None = None  # final drop-path probability (linear from 0)
    cutout: int | None = None  # 0: none
    test_size: int | None = None  # first N test images only (quick runs)

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
        self.check_device()

    def to_dict(self, arch: Arch | None = None) -> dict:
        """The options as a JSON-able dict; ``genotype`` as the cell's text (so that 'darts_v2' and
        its Genotype string resume each other), ``genotype_spec`` as given."""
        arch = arch or load_arch(self.genotype)
        spec = self.genotype if isinstance(self.genotype, str) else arch.source
        d = dataclasses.replace(self, genotype=R.genotype_text(arch.genotype)).recorded()
        d["genotype_spec"] = spec
        d["space"] = arch.space
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
    folder = R.RunFolder(cfg.out, "training")
    procs = Processes()
    procs.check_batch(cfg.batch_size)
    log = log if procs.main else R.silent
    state = folder.previous(cfg.resume, CHECKPOINT_KEYS, "a training run", log)
    if state is not None:
        R.check_resume(state["config"], cfg.to_dict(arch), RESUME_KEYS)
        if (done := folder.finished(state, log)) is not None:
            return done
    if procs.main:
        os.makedirs(folder.path, exist_ok=True)

    device = R.start(cfg, procs)
    from ..data import dataset_info

    size = dataset_info(cfg.dataset, cfg.channels).image_size
    if arch.macro == "darts" and cfg.aux_weight > 0 and size < 32:
        raise ConfigError(f"--aux-weight: the auxiliary head needs 32x32 images ({cfg.dataset} has {size}x{size}); "
                          "pass --aux-weight 0")
    D, train_set, test_set, train_idx, test_idx = _data(cfg)
    info = train_set.info
    meter = R.PeakMemory(device)
    model = build_network(arch, cfg, info.num_classes, info.channels).to(device)
    params, params_aux = count_parameters(model), count_parameters(model, auxiliary=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                nesterov=cfg.nesterov)
    # data parallel: each rank its share of every epoch, 1/world of the (global) batch
    batch, steps, drop_last = procs.share(cfg.batch_size, len(train_idx), cfg.steps_per_epoch, drop_single=True)

    run_state = {"epoch": 0, "step": 0, "sums": {}, "rows": [], "step_times": [], "seconds": 0.0, "peak": 0}
    if state is not None:
        run_state = folder.resume(state, {"model": model, "optimizer": optimizer}, log)
    else:
        log(f"retraining {R.genotype_text(arch.genotype)} ({arch.space}) on {cfg.dataset}: "
            f"{params / 1e6:.6f} M parameters ({params_aux / 1e6:.6f} M with the auxiliary head)")
    writer = R.tensorboard_writer(folder.path) if procs.main else None

    def save(finished: bool = False):
        run_state["peak"] = max(run_state["peak"], meter.peak())
        if procs.main:
            folder.save({"config": cfg.to_dict(arch), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "run": run_state, "rng": R.rng_state(), "finished": finished})

    loop = R.EpochLoop(run_state, epochs=cfg.epochs, steps=steps, device=device, meter=meter, model=model, save=save,
                       checkpoint_every=cfg.checkpoint_every, postfix=_postfix, empty_sums=lambda: _zero_sums(device),
                       bar_cls=R.tqdm_class(log) if cfg.progress and procs.main else None)
    params_list = list(model.parameters())
    for epoch in loop.epochs():
        model.train()
        lr = cosine_lr(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.drop_path_prob = cfg.drop_path * epoch / cfg.epochs
        batches = iter(D.make_loader(train_set, train_idx, batch, seed=cfg.seed, epoch=epoch, start_batch=run_state["step"],
                                     num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                                     shard=(procs.rank, procs.world), drop_last=drop_last))
        for _ in loop.steps(epoch):
            x, y = (t.to(device, non_blocking=True) for t in next(batches))
            with loop.timed():
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
            loop.add({"loss": loss.detach().double() * y.shape[0], "correct": (logits.detach().argmax(1) == y).sum(),
                      "count": torch.tensor(y.shape[0], dtype=torch.int64)})
        procs.broadcast_buffers(model)  # BN statistics are per rank in training; evaluate with rank 0's
        test_loss, test_acc = evaluate(model, D, test_set, test_idx, batch, device, procs)
        row = _epoch_row(epoch, lr, model, procs.sum(loop.sums), test_loss, test_acc, run_state, steps)
        run_state["rows"].append(row)
        loop.next_epoch(epoch)
        if procs.main:
            _write_log(folder.path, run_state["rows"])
        R.log_scalars(writer, row, epoch + 1)
        save()
        log(f"epoch {row['epoch']}/{cfg.epochs}  lr {lr:.4g}  drop-path {row['drop_path_prob']:.3f}  train loss "
            f"{row['train_loss']:.3f} acc {row['train_acc']:.2f}%  test loss {test_loss:.3f} acc {test_acc:.2f}%  "
            f"step {row['step_seconds']:.3f} s  total {row['seconds']:.0f} s")

    return R.finish_run(procs, params_list, writer=writer, folder=folder, save=save,
                        finish=lambda: _finish(cfg, arch, run_state, params, params_aux, device, meter, folder.path, log))


def _zero_sums(device) -> dict:
    return {"loss": torch.zeros((), device=device, dtype=torch.float64),
            "correct": torch.zeros((), device=device, dtype=torch.int64),
            "count": torch.zeros((), device=device, dtype=torch.int64)}


def _postfix(sums) -> str:
    n = float(sums["count"])
    return f"loss {float(sums['loss']) / n:.3f} acc {100 * float(sums['correct']) / n:.1f}%"


def _epoch_row(epoch, lr, model, sums, test_loss, test_acc, run_state, steps) -> dict:
    n = float(sums["count"])
    recent = run_state["step_times"][-steps:]
    return {"epoch": epoch + 1, "lr": lr, "drop_path_prob": model.drop_path_prob,
            "train_loss": float(sums["loss"]) / n if n else float("nan"),
            "train_acc": 100 * float(sums["correct"]) / n if n else float("nan"),
            "test_loss": test_loss, "test_acc": test_acc,
            "step_seconds": statistics.median(recent) if recent else float("nan"), "seconds": run_state["seconds"]}


def _write_log(out: str, rows: list[dict]) -> None:
    from ..report import write_csv

    write_csv(os.path.join(out, LOG), rows)


def _finish(cfg, arch, run_state, params, params_aux, device, meter, out, log) -> dict:
    rows = run_state["rows"]
    best = max(rows, key=lambda r: r["test_acc"])
    result = {
        "genotype": R.genotype_record(arch.genotype),
        "genotype_text": R.genotype_text(arch.genotype),
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
        "seed": cfg.seed,
        **R.run_record(run_state, meter, device),
        "config": cfg.to_dict(arch),
    }
    atomic_write_json(os.path.join(out, R.RESULT), result)
    if cfg.plots:
        _pictures(cfg, arch, rows, out, log)
    log(f"test accuracy {result['test_accuracy']:.2f}% (best {result['best_accuracy']:.2f}% at epoch "
        f"{result['best_epoch']}); result: {os.path.join(out, R.RESULT)}")
    return result


def _pictures(cfg, arch, rows, out, log) -> None:
    from .. import report

    title = f"{arch.source or arch.space} on {cfg.dataset}"
    cell = os.path.join(out, "cell.png")
    report.draw_pictures([
        lambda: report.plot_curves(rows, os.path.join(out, "curves.png"), title=title,
                                   groups={"loss": ["train_loss", "test_loss"], "accuracy (%)": ["train_acc", "test_acc"],
                                           "lr": ["lr"]}),
        lambda: R.draw_cell(arch.genotype, cell, title),
    ], log)
