"""One search run from a ``SearchConfig``: data, supernet, mask, method, the loop, checkpoints and
the result files (``run``; the ``toponas search`` command calls it).

Determinism and resume. The order of every epoch's batches is a permutation seeded by (seed,
epoch) and the augmentation of an image by (seed, epoch, index) (``toponas_kernels.data``); the
architecture half is read through one persistent iterator that cycles through it, pass after
pass, each pass seeded by its number. A checkpoint (atomic, at the end of every epoch and every
``checkpoint_every`` steps) holds the supernet, both optimizers, the schedule, the position in
both data streams, the running sums of the epoch and every RNG state, so a killed run resumed
with ``--resume`` continues with the same numbers, bit for bit on a CPU.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from collections.abc import Callable

import torch

from .._io import atomic_write_json
from .. import runtime as R
from ..runtime import say
from . import masks as M
from .budget import fit, format_bytes, parse_bytes
from .build import build_method, build_supernet, space_of
from .config import RESUME_KEYS, ConfigError, SearchConfig

CHECKPOINT_KEYS = ("config", "model", "method", "run", "rng", "mask")


# ====================================================================================== records
@torch.no_grad()
def arch_weights(model) -> dict[str, list]:
    """The architecture weights as a researcher reads them: alphas softmaxed over each edge's
    unmasked operations; edge-normalization betas softmaxed over each node's incoming edges
    (ROME's topology betas likewise)."""
    from .. import ops

    masks = model.masks() if hasattr(model, "masks") else {}
    out = {}
    for name, p in model.named_arch_parameters():
        if name.startswith("alphas"):
            mask = masks.get("mask" + name[len("alphas"):])
            out[name] = ops.masked_softmax(p.detach().float(), mask).cpu().tolist()
        elif hasattr(model, "_edge_weights"):
            out[name] = model._edge_weights(p.detach().float()).cpu().tolist()
        else:
            out[name] = p.detach().float().cpu().tolist()
    return out


# ====================================================================================== data
def _load_data(config: SearchConfig, device: torch.device):
    from .. import data as D

    train = D.load_split(config.dataset, "train", config.data_dir, channels=config.channels, download=True,
                         seed=config.seed, augment="search")
    n = len(train)
    if config.train_size is not None:
        if config.train_size < 2:
            raise ConfigError("--train-size: need at least 2 images (one per half)")
        n = min(n, config.train_size)
    train_idx, val_idx = D.split_indices(n, config.train_portion)
    if not train_idx or not val_idx:
        raise ConfigError(f"--train-portion {config.train_portion} leaves one half of {n} images empty")
    return D, train, train, train_idx, val_idx


class _Cycle:
    """A persistent iterator over the architecture half that starts a new seeded pass whenever
    one ends (never ``next(iter(loader))`` per step, which replays the first batch)."""

    def __init__(self, make: Callable[[int, int], object], pass_index: int = 0, position: int = 0):
        self.make = make
        self.pass_index, self.position = pass_index, position
        self.it = iter(make(pass_index, position))

    def __next__(self):
        try:
            batch = next(self.it)
        except StopIteration:
            self.pass_index, self.position = self.pass_index + 1, 0
            self.it = iter(self.make(self.pass_index, 0))
            batch = next(self.it)
        self.position += 1
        return batch

    def state(self) -> dict:
        return {"pass": self.pass_index, "position": self.position}


# ====================================================================================== run
def run(config: SearchConfig, *, log: Callable[[str], None] = say) -> dict:
    """Run (or resume) the search of ``config`` and return its result (also in
    ``config.out/result.json``). ``log`` receives the one-line messages."""
    cfg = config.resolved()
    folder = R.RunFolder(cfg.out, "search")
    if cfg.lookup is not None:
        from ..lookup import check_table

        check_table(cfg.lookup)  # a missing table or API package fails now, not after the search
    procs = R.Processes()
    procs.check_batch(cfg.batch_size)
    log = log if procs.main else R.silent
    state = folder.previous(cfg.resume, CHECKPOINT_KEYS, "a search", log)
    budget = state.get("budget") if state is not None else None
    if budget:  # what --memory-budget chose when the search started
        cfg = dataclasses.replace(cfg, **budget["chosen"])
    if state is not None:
        R.check_resume(state["config"], cfg.to_dict(), RESUME_KEYS)
        if (done := folder.finished(state, log)) is not None:
            return done
    if procs.main:
        os.makedirs(folder.path, exist_ok=True)
    if state is None and cfg.memory_budget is not None:
        cfg, budget = _fit_budget(cfg, procs, log)

    device = R.start(cfg, procs)
    D, train_set, val_set, train_idx, val_idx = _load_data(cfg, device)
    info = train_set.info
    meter = R.PeakMemory(device)
    model = build_supernet(cfg, info.num_classes, info.channels).to(device)
    mask_record = state["mask"] if state is not None else procs.broadcast(
        _make_masks(cfg, model, train_set, train_idx, device, info, log) if procs.main else None)
    _apply_masks(model, mask_record)
    method = build_method(cfg, model)
    if cfg.compile or cfg.cuda_graphs:
        from ..nas.compile import compile_step

        if cfg.cuda_graphs and device.type != "cuda":
            raise ConfigError(f"--cuda-graphs: needs a CUDA device, the run is on {device.type}")
        backend = "inductor" if cfg.compile in (True, False) else str(cfg.compile)
        method.compiled_loss = compile_step(
            model, lambda logits, y: (method.criterion(logits, y), logits), backend=backend, cuda_graphs=cfg.cuda_graphs
        )
    if procs.world > 1:
        method.grad_reducer = procs.mean_grads

    # weights on one half of the training set, architecture on the other (a cycling stream)
    batch, steps, _ = procs.share(cfg.batch_size, len(train_idx), cfg.steps_per_epoch)
    loader = _loaders(cfg, D, train_set, val_set, train_idx, val_idx, batch, device, procs)
    run_state = {"epoch": 0, "step": 0, "sums": {}, "history": [], "rows": [], "step_times": [], "seconds": 0.0,
                 "peak": 0, "val": {"pass": 0, "position": 0}}
    if state is not None:
        run_state = folder.resume(state, {"model": model, "method": method}, log)
    if not run_state["history"]:
        run_state["history"].append(arch_weights(model))  # epoch 0: the weights at initialization
    cycle = _Cycle(loader["val"], run_state["val"]["pass"], run_state["val"]["position"])
    writer = R.tensorboard_writer(folder.path) if procs.main else None

    def save(finished: bool = False):
        run_state["val"] = cycle.state()
        run_state["peak"] = max(run_state["peak"], meter.peak())
        if procs.main:
            folder.save({"config": cfg.to_dict(), "model": model.state_dict(), "method": method.state_dict(),
                         "run": run_state, "rng": R.rng_state(), "mask": mask_record, "finished": finished,
                         "budget": budget})

    loop = R.EpochLoop(run_state, epochs=cfg.epochs, steps=steps, device=device, meter=meter, model=model, save=save,
                       checkpoint_every=cfg.checkpoint_every, postfix=_postfix,
                       bar_cls=R.tqdm_class(log) if cfg.progress and procs.main else None)
    for epoch in loop.epochs():
        model.train()
        method.begin_epoch(epoch)
        train_batches = iter(loader["train"](epoch, run_state["step"]))
        for _ in loop.steps(epoch):
            xb, yb = (t.to(device, non_blocking=True) for t in next(train_batches))
            xv, yv = (t.to(device, non_blocking=True) for t in next(cycle))
            with loop.timed():
                stats = method.step((xb, yb), (xv, yv))
            loop.add(stats)
        row = _epoch_row(epoch, method, procs.sum(loop.sums), model, run_state, steps)
        run_state["rows"].append(row)
        run_state["history"].append(arch_weights(model))
        loop.next_epoch(epoch)
        method.end_epoch(epoch)
        if procs.main:
            _write_csv(folder.file("search_log.csv"), run_state["rows"])
        R.log_scalars(writer, row, epoch + 1)
        save()
        log(_summary(row, cfg.epochs))

    return R.finish_run(procs, model.arch_parameters(), writer=writer, folder=folder, save=save,
                        finish=lambda: _finish(cfg, model, run_state, mask_record, device, meter, folder.path, log, budget))


def _fit_budget(cfg: SearchConfig, procs, log) -> tuple[SearchConfig, dict]:
    """The configuration ``--memory-budget`` chooses (``budget.fit``), and the record of it."""
    if procs.world > 1:
        raise ConfigError("--memory-budget: plan with one process (toponas plan), then start torchrun with the batch it gives")
    cfg, budget = fit(cfg, parse_bytes(cfg.memory_budget), cfg.fit_by, log=log)
    chosen = ", ".join(f"{k} {v}" for k, v in budget["chosen"].items()) or "the requested configuration"
    log(f"memory budget {format_bytes(budget['budget_bytes'])}: {chosen} (predicted peak "
        f"{format_bytes(budget['predicted_peak_bytes'])}; requested would need {format_bytes(budget['requested_predicted_peak_bytes'])})")
    return cfg, budget


def _apply_masks(model, mask_record) -> None:
    if mask_record is None:
        return
    for name, rows in mask_record["masks"].items():
        model.get_buffer(name).copy_(torch.tensor(rows, dtype=torch.bool))
    for name, m in model.masks().items():
        if not bool(m.any(dim=1).all()):
            raise ConfigError(f"--mask: '{name}' switches off every operation of some edge")


def _loaders(cfg, D, train_set, val_set, train_idx, val_idx, batch, device, procs) -> dict:
    """The two halves' loaders, each a function of (epoch or pass, first batch)."""
    num_workers = cfg.num_workers if cfg.num_workers else (min(4, os.cpu_count() or 1) if device.type == "cuda" else 0)
    common = dict(num_workers=num_workers, pin_memory=device.type == "cuda", shard=(procs.rank, procs.world))
    return {
        "train": lambda epoch, start: D.make_loader(train_set, train_idx, batch, seed=cfg.seed, epoch=epoch,
                                                    start_batch=start, **common),
        "val": lambda pass_index, start: D.make_loader(val_set, val_idx, batch, seed=cfg.seed + 7919, epoch=pass_index,
                                                       start_batch=start, **common),
    }


def _make_masks(cfg, model, train_set, train_idx, device, info, log) -> dict | None:
    if cfg.mask is None:
        return None
    shapes = {name: tuple(b.shape) for name, b in model.masks().items()}
    space = space_of(cfg)
    primitives = list(space.names)
    choosable = M.choosable_ops(primitives, model.exclude)  # every edge keeps one a derivation can choose
    if cfg.mask == "random":
        g = torch.Generator().manual_seed(cfg.seed)
        masks = M.random_masks(shapes, cfg.mask_level, g, choosable)
        extra = {"kind": "random", "level": cfg.mask_level, "seconds": 0.0}
    elif cfg.mask == "zero-shot":
        n = min(len(train_idx), cfg.mask_batches * cfg.mask_batch_size)
        order = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(cfg.seed))[:n].tolist()
        plain = train_set.with_augment("none")
        images = torch.stack([plain[train_idx[i]][0] for i in order]).to(device)
        proxy = lambda: build_supernet(cfg, info.num_classes, info.channels, proxy=True)  # noqa: E731
        log(f"zero-shot mask: Algorithm 1 with the ETENAS ranking on {n} images, {cfg.mask_inits} inits, level {cfg.mask_level}")
        masks, rec = M.zero_shot_masks(proxy, shapes, images, cfg.mask_level, inits=cfg.mask_inits, seed=cfg.seed,
                                       rule=cfg.mask_rule, batch_size=cfg.mask_batch_size, choosable=choosable,
                                       progress=log)
        extra = {"kind": "zero-shot", "level": cfg.mask_level, "rule": cfg.mask_rule, "seconds": rec["seconds"],
                 "images": n, "inits": cfg.mask_inits, "rounds": len(rec["rounds"])}
        log(f"zero-shot mask: {rec['seconds']:.1f} s")
    else:
        masks, record = M.load_masks(cfg.mask, shapes, primitives, model.exclude)
        extra = {"kind": "file", "file": os.path.abspath(cfg.mask), "source_kind": record.get("kind"),
                 "level": record.get("level"), "seconds": 0.0}
    kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    extra["kept_share"] = kept
    record = M.mask_record(masks, space=space.name, primitives=primitives, info=extra)
    atomic_write_json(os.path.join(os.path.abspath(cfg.out), "mask.json"), record)
    return record


def _postfix(sums) -> str:
    parts = []
    for half in ("train", "val"):
        if f"{half}_count" in sums:
            n = float(sums[f"{half}_count"])
            parts.append(f"{half} loss {float(sums[f'{half}_loss_sum']) / n:.3f} acc {100 * float(sums[f'{half}_correct']) / n:.1f}%")
    return ", ".join(parts)


def _epoch_row(epoch, method, sums, model, run_state, steps) -> dict:
    row = {"epoch": epoch + 1, **{k: v for k, v in method.schedule().items()}}
    for half in ("train", "val"):
        n = float(sums.get(f"{half}_count", torch.tensor(0)))
        row[f"{half}_loss"] = float(sums[f"{half}_loss_sum"]) / n if n else float("nan")
        row[f"{half}_acc"] = 100 * float(sums[f"{half}_correct"]) / n if n else float("nan")
    recent = run_state["step_times"][-steps:]
    row["step_seconds"] = statistics.median(recent) if recent else float("nan")
    row["seconds"] = run_state["seconds"]
    row["genotype"] = R.genotype_text(model.genotype())
    return row


def _summary(row: dict, epochs: int) -> str:
    extra = "".join(f"  {k} {row[k]:.3g}" for k in ("tau", "beta_lambda") if k in row)
    if row.get("arch_updates") is False:
        extra += "  (warm-up: no architecture step)"
    return (
        f"epoch {row['epoch']}/{epochs}  lr {row['lr']:.4g}{extra}  train loss {row['train_loss']:.3f} acc {row['train_acc']:.1f}%"
        f"  val loss {row['val_loss']:.3f} acc {row['val_acc']:.1f}%  step {row['step_seconds']:.3f} s  total {row['seconds']:.0f} s"
    )


def _write_csv(path: str, rows: list[dict]) -> None:
    from ..report import write_csv

    write_csv(path, rows)


def _finish(cfg, model, run_state, mask_record, device, meter, out, log, budget) -> dict:
    genotype = model.genotype()
    result = {
        "genotype": R.genotype_record(genotype),
        "genotype_text": R.genotype_text(genotype),
        "space": cfg.space_name(),
        "method": cfg.method,
        "topo": cfg.topo,
        "kernel_norm": cfg.kernel_norm,
        "mask": mask_record,
        "dataset": cfg.dataset,
        "epochs": cfg.epochs,
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "search_seconds": run_state["seconds"],
        "alphas": {name: p.detach().cpu().tolist() for name, p in model.named_arch_parameters()},
        "arch_weights": arch_weights(model),
        "final": {k: v for k, v in (run_state["rows"][-1] if run_state["rows"] else {}).items() if k != "genotype"},
        **R.run_record(run_state, meter, device),
        "config": cfg.to_dict(),
    }
    if budget is not None:
        result["memory_budget"] = budget
    if cfg.lookup is not None:
        result["lookup"] = _lookup(genotype, cfg.lookup, log)
    atomic_write_json(os.path.join(out, R.RESULT), result)
    if cfg.plots:
        _pictures(cfg, model, run_state, genotype, out, log)
    log(f"result: {os.path.join(out, R.RESULT)}")
    return result


def _lookup(arch: str, table: str, log) -> dict:
    """The derived cell's accuracies on every dataset of the table (hp 200)."""
    from ..lookup import lookup_all

    return lookup_all(arch, table, log)


def _pictures(cfg, model, run_state, genotype, out, log) -> None:
    from .. import report

    title, cell = f"{cfg.method}, {cfg.dataset}", os.path.join(out, "cell.png")
    names = list(space_of(cfg).names)
    report.draw_pictures([
        lambda: report.plot_arch_weights(run_state["history"], names, os.path.join(out, "arch_weights.png"),
                                         title=f"{cfg.method} on {cfg.space_name()} ({cfg.dataset})"),
        lambda: R.draw_cell(genotype, cell, title),
    ], log)
