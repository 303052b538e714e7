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
import math
import os
import statistics
import time
from collections.abc import Callable

import torch

from .. import _version
from .._io import atomic_write_json
from ..nas import spaces as S
from ..nas.networks import DartsSearchNetwork, NB201SearchNetwork
from . import masks as M
from ._run import (PeakMemory, bank_epoch_progress, Processes, StepClock, silent, device_name, draw_cell, genotype_record, genotype_text, git_commit,
                   load_checkpoint, resolve_device, rng_state, save_checkpoint, say, seed_everything, set_rng_state,
                   tensorboard_writer, tqdm_class)
from .config import RESUME_KEYS, ConfigError, SearchConfig
from .methods import METHOD_CLASSES

CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"


class Interrupted(RuntimeError):
    """Raised when ``_INTERRUPT_AFTER`` steps are done: the run stops as if killed."""


#: a test hook, not an option: set (e.g. with pytest's monkeypatch) to stop the run with
#: ``Interrupted`` once this many steps are done; None runs to the end
_INTERRUPT_AFTER: int | None = None


# ====================================================================================== set-up
def space_of(config: SearchConfig) -> S.SearchSpace:
    if isinstance(config.space, S.SearchSpace):
        return config.space
    return S.get_space(config.space)


def build_supernet(config: SearchConfig, num_classes: int, in_channels: int, *, proxy: bool = False) -> torch.nn.Module:
    """The supernet of ``config`` (resolved), or the tiny ETENAS proxy of the same space."""
    space = space_of(config)
    method = METHOD_CLASSES[config.method]
    sampler = "softmax" if proxy else method.sampler
    exclude = () if proxy else tuple(name for name in method.exclude if name in space)
    common = dict(space=space, sampler=sampler, exclude=exclude, in_channels=in_channels, num_classes=num_classes)
    # the ``topo`` option is the supernets' (and FusedMixedOp's) ``mode``
    if proxy:
        common.update(mode="plain")
    else:
        common.update(mode=config.topo, normalize=config.kernel_norm, partial_channels=config.partial_channels,
                      merge=config.merge)
    if config.macro() == "nb201":
        C, N = (3, 1) if proxy else (config.init_channels, config.layers)
        return NB201SearchNetwork(C, N, **common)
    C, layers = (1, 8) if proxy else (config.init_channels, config.layers)
    return DartsSearchNetwork(C, layers=layers, topology=method.topology and not proxy,
                              recompute=config.recompute_cells and not proxy, **common)


def build_method(config: SearchConfig, model: torch.nn.Module):
    cls = METHOD_CLASSES[config.method]
    names = ("lr", "lr_min", "momentum", "nesterov", "weight_decay", "grad_clip", "arch_lr", "arch_weight_decay",
             "arch_betas", "warmup_epochs", "beta_lambda", "tau_max", "tau_min", "rome_samples")
    space = "nb201" if config.macro() == "nb201" else "darts"
    return cls(model, epochs=config.epochs, space=space, **{n: getattr(config, n) for n in names})


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
    if not cfg.out:
        raise ConfigError("--out: give the folder the search writes to")
    if cfg.lookup is not None:
        from ..lookup import check_table

        check_table(cfg.lookup)  # a missing table or API package fails now, not after the search
    procs = Processes()
    if procs.world > 1 and cfg.batch_size % procs.world:
        raise ConfigError(f"--batch-size {cfg.batch_size}: must divide by the {procs.world} processes (it is the global batch)")
    if not procs.main:
        log = silent
    out = os.path.abspath(cfg.out)
    ckpt_path = os.path.join(out, CHECKPOINT)
    result_path = os.path.join(out, RESULT)
    state = None
    budget = None
    if os.path.exists(ckpt_path):
        if not cfg.resume:
            raise ConfigError(f"--out {cfg.out} already holds a search ({CHECKPOINT}); pass --resume to continue it or choose another --out")
        state = load_checkpoint(ckpt_path, ("config", "model", "method", "run", "rng", "mask"))
        budget = state.get("budget")
        if budget:  # what --memory-budget chose when the search started
            cfg = dataclasses.replace(cfg, **budget["chosen"])
        _check_resume(state["config"], cfg)
        if state.get("finished") and os.path.exists(result_path):
            import json

            log(f"search in {cfg.out} already finished; result in {result_path}")
            with open(result_path) as f:
                return json.load(f)
    elif cfg.resume:
        log(f"--resume: no checkpoint in {cfg.out} yet; starting the search")
    if procs.main:
        os.makedirs(out, exist_ok=True)
    if state is None and cfg.memory_budget is not None:
        if procs.world > 1:
            raise ConfigError("--memory-budget: plan with one process (toponas plan), then start torchrun with the batch it gives")
        from .budget import fit, format_bytes, parse_bytes

        cfg, budget = fit(cfg, parse_bytes(cfg.memory_budget), cfg.fit_by, log=log)
        chosen = ", ".join(f"{k} {v}" for k, v in budget["chosen"].items()) or "the requested configuration"
        log(f"memory budget {format_bytes(budget['budget_bytes'])}: {chosen} (predicted peak "
            f"{format_bytes(budget['predicted_peak_bytes'])}; requested would need {format_bytes(budget['requested_predicted_peak_bytes'])})")

    device = procs.start(resolve_device(cfg.device))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed, cfg.deterministic)
    num_workers = cfg.num_workers if cfg.num_workers else (min(4, os.cpu_count() or 1) if device.type == "cuda" else 0)
    D, train_set, val_set, train_idx, val_idx = _load_data(cfg, device)
    info = train_set.info
    meter = PeakMemory(device)

    model = build_supernet(cfg, info.num_classes, info.channels).to(device)
    shapes = {name: tuple(b.shape) for name, b in model.masks().items()}
    if state is None:
        mask_record = _make_masks(cfg, model, shapes, train_set, train_idx, device, info, log) if procs.main else None
        mask_record = procs.broadcast(mask_record)
    else:
        mask_record = state["mask"]
    if mask_record is not None:
        for name, rows in mask_record["masks"].items():
            model.get_buffer(name).copy_(torch.tensor(rows, dtype=torch.bool))
        for name, m in model.masks().items():
            if not bool(m.any(dim=1).all()):
                raise ConfigError(f"--mask: '{name}' switches off every operation of some edge")

    method = build_method(cfg, model)
    if cfg.compile:
        from ..nas.compile import compile_step

        backend = "inductor" if cfg.compile is True else str(cfg.compile)
        method.compiled_loss = compile_step(model, lambda logits, y: (method.criterion(logits, y), logits), backend=backend)
    if procs.world > 1:
        method.grad_reducer = procs.mean_grads
    pin = device.type == "cuda"
    batch = cfg.batch_size // procs.world
    shard = (procs.rank, procs.world)

    def train_loader(epoch: int, start: int):
        return D.make_loader(train_set, train_idx, batch, seed=cfg.seed, epoch=epoch, start_batch=start,
                             num_workers=num_workers, pin_memory=pin, shard=shard)

    def val_loader(pass_index: int, start: int):
        return D.make_loader(val_set, val_idx, batch, seed=cfg.seed + 7919, epoch=pass_index,
                             start_batch=start, num_workers=num_workers, pin_memory=pin, shard=shard)

    # every rank runs the same number of steps: that of the smallest share
    steps_total = math.ceil((len(train_idx) // procs.world) / batch)
    steps = min(steps_total, cfg.steps_per_epoch) if cfg.steps_per_epoch else steps_total

    run_state = {"epoch": 0, "step": 0, "sums": {}, "history": [], "rows": [], "step_times": [], "seconds": 0.0,
                 "peak": 0, "val": {"pass": 0, "position": 0}}
    if state is not None:
        model.load_state_dict(state["model"])
        method.load_state_dict(state["method"])
        run_state = state["run"]
        set_rng_state(state["rng"])
        log(f"resumed {cfg.out} at epoch {run_state['epoch'] + 1}, step {run_state['step']}")
    if not run_state["history"]:
        run_state["history"].append(arch_weights(model))  # epoch 0: the weights at initialization
    cycle = _Cycle(val_loader, run_state["val"]["pass"], run_state["val"]["position"])
    writer = tensorboard_writer(out) if procs.main else None
    bar_cls = tqdm_class(log) if cfg.progress and procs.main else None

    def save(finished: bool = False):
        run_state["val"] = cycle.state()
        run_state["peak"] = max(run_state["peak"], meter.peak())
        if not procs.main:
            return
        save_checkpoint(ckpt_path, {
            "config": cfg.to_dict(), "model": model.state_dict(), "method": method.state_dict(),
            "run": run_state, "rng": rng_state(), "mask": mask_record, "finished": finished, "budget": budget,
        })

    done_steps = 0
    for epoch in range(run_state["epoch"], cfg.epochs):
        model.train()
        method.begin_epoch(epoch)
        start_step = run_state["step"]
        it = iter(train_loader(epoch, start_step))
        bar = bar_cls(total=steps, initial=start_step, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                      dynamic_ncols=True) if bar_cls else None
        sums = {k: v.to(device) for k, v in run_state["sums"].items()}
        clock = StepClock(device)
        t_epoch = time.perf_counter()
        for step in range(start_step, steps):
            xb, yb = next(it)
            xv, yv = next(cycle)
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            xv, yv = xv.to(device, non_blocking=True), yv.to(device, non_blocking=True)
            clock.start()
            stats = method.step((xb, yb), (xv, yv))
            clock.stop()
            for k, v in stats.items():
                sums[k] = sums[k] + v.to(device) if k in sums else v.to(device)
            run_state["step"] = step + 1
            done_steps += 1
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix_str(_postfix(sums))
            if cfg.checkpoint_every and run_state["step"] % cfg.checkpoint_every == 0 and run_state["step"] < steps:
                t_epoch = bank_epoch_progress(run_state, clock, sums, t_epoch)
                save()
            if _INTERRUPT_AFTER is not None and done_steps >= _INTERRUPT_AFTER:
                raise Interrupted(f"interrupted after {done_steps} steps (test hook)")
        if bar is not None:
            bar.close()
        run_state["step_times"].extend(clock.collect())
        run_state["seconds"] += time.perf_counter() - t_epoch
        row = _epoch_row(epoch, method, procs.sum(sums), model, run_state, steps)
        run_state["rows"].append(row)
        run_state["history"].append(arch_weights(model))
        run_state["epoch"], run_state["step"], run_state["sums"] = epoch + 1, 0, {}
        method.end_epoch(epoch)
        if procs.main:
            _write_csv(os.path.join(out, "search_log.csv"), run_state["rows"])
        if writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    writer.add_scalar(k, v, epoch + 1)
            writer.flush()
        save()
        log(_summary(row, cfg.epochs))

    agree = procs.agree(model.arch_parameters())
    if not procs.main:
        return {}
    result = _finish(cfg, model, run_state, mask_record, device, meter, out, log, budget)
    if procs.world > 1:
        result["processes"] = {"world_size": procs.world, "ranks_agree": agree}
        atomic_write_json(os.path.join(out, RESULT), result)
    save(finished=True)
    if writer is not None:
        writer.close()
    return result


def _check_resume(saved: dict, cfg: SearchConfig) -> None:
    now = cfg.to_dict()
    diff = [k for k in RESUME_KEYS if saved.get(k) != now.get(k)]
    if diff:
        k = diff[0]
        raise ConfigError(
            f"--resume: the checkpoint was made with {k}={saved.get(k)!r}, this run asks for {now.get(k)!r}; "
            "resume with the same options or choose another --out"
        )


def _make_masks(cfg, model, shapes, train_set, train_idx, device, info, log) -> dict | None:
    if cfg.mask is None:
        return None
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
    row["genotype"] = genotype_text(model.genotype())
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
    peak = max(run_state["peak"], meter.peak())
    times = run_state["step_times"]
    result = {
        "genotype": genotype_record(genotype),
        "genotype_text": genotype_text(genotype),
        "space": cfg.space_name(),
        "method": cfg.method,
        "topo": cfg.topo,
        "kernel_norm": cfg.kernel_norm,
        "mask": mask_record,
        "dataset": cfg.dataset,
        "epochs": cfg.epochs,
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "peak_memory_bytes": int(peak),
        "search_seconds": run_state["seconds"],
        "step_seconds": statistics.median(times) if times else None,
        "steps": len(times),
        "alphas": {name: p.detach().cpu().tolist() for name, p in model.named_arch_parameters()},
        "arch_weights": arch_weights(model),
        "final": {k: v for k, v in (run_state["rows"][-1] if run_state["rows"] else {}).items() if k != "genotype"},
        "device": device_name(device),
        "torch": torch.__version__,
        "version": _version.__version__,
        "commit": git_commit(),
        "config": cfg.to_dict(),
    }
    if budget is not None:
        result["memory_budget"] = budget
    if cfg.lookup is not None:
        result["lookup"] = _lookup(genotype, cfg.lookup, log)
    atomic_write_json(os.path.join(out, RESULT), result)
    if cfg.plots:
        _pictures(cfg, model, run_state, genotype, out, log)
    log(f"result: {os.path.join(out, RESULT)}")
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
        lambda: draw_cell(genotype, cell, title),
    ], log)
