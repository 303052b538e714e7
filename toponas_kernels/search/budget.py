"""Predict a search's peak memory and step time before running it, and fit it into a budget.

The peak memory of a search step is affine in the batch size (weights, gradients and optimizer
states do not grow with it; activations grow in proportion), and so, nearly, is its time. So two
measured steps at small batches b1 < b2, each in a fresh process (a process's peak cannot be
un-done), give ``peak(B) = a + s B`` for any B. With ``--memory-budget`` the searcher then picks:

* ``--fit-by batch`` (default): the largest batch <= the requested one that fits;
* ``--fit-by pc``: the smallest partial-channel k (1, 2, 4, ... dividing C) that fits at the
  requested batch (each k measured);
* ``--fit-by mask``: a random-mask level xi: the per-sample slope is measured without a mask and
  at xi = 1/2, modelled as ``s(xi) = s_fixed + xi s_edges`` (masked operations are never run),
  and xi is the largest multiple of 0.05 that fits.

A measurement runs one warm-up step and one measured step on random inputs of the dataset's
shape; peak memory is what a search records in ``result.json`` (``runtime.PeakMemory``, with
``toponas_kernels.memory_meter``: on a GPU the most bytes allocated at once, model and both steps
included; on a CPU the model's bytes and the first step's peak).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import torch

from .. import runtime as R
from .build import build_method, build_supernet
from .config import ConfigError, SearchConfig

FIT_BY = ("batch", "pc", "mask")
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_bytes(text: str) -> int:
    """'6GiB', '512 MiB', '8e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"--memory-budget: expected a size such as 6GiB, 512MiB or 8e9 (bytes), got {text!r}")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise ConfigError(f"--memory-budget: expected a positive size, got {text!r}")
    return int(value)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


# ---------------------------------------------------------------------------- one measurement
def _child(spec: dict) -> dict:
    """Runs in a fresh process: one warm-up and one timed search step at spec's batch."""
    from ..data import dataset_info
    from .masks import choosable_ops, random_masks

    cfg = SearchConfig(**spec["config"]).resolved()
    device = R.resolve_device(cfg.device)
    R.set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    info = dataset_info(cfg.dataset, cfg.channels)
    batch = spec["batch"]
    shape = (batch, info.channels, info.image_size, info.image_size)
    x = torch.randn(shape, device=device)
    y = torch.randint(0, info.num_classes, (batch,), device=device)
    meter = R.PeakMemory(device)
    model = build_supernet(cfg, info.num_classes, info.channels).to(device)
    level = spec.get("mask_level")
    if level is not None and level < 1:
        shapes = {n: tuple(b.shape) for n, b in model.masks().items()}
        choosable = choosable_ops(list(model.space.names), model.exclude)  # the masks a search would draw
        for name, m in random_masks(shapes, level, torch.Generator().manual_seed(cfg.seed), choosable).items():
            model.get_buffer(name).copy_(m)
    method = build_method(cfg, model)
    method.begin_epoch(max(method.h["warmup_epochs"], 0))  # a step with the architecture update
    with meter.watch(model):  # the peak a search records (on a CPU: this first step and the model)
        method.step((x, y), (x, y))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    method.step((x, y), (x, y))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"batch": batch, "peak_bytes": meter.peak(), "step_seconds": time.perf_counter() - t0}


def measure(config: SearchConfig, batch: int, *, mask_level: float | None = None) -> dict:
    """Peak memory and step time of one search step at ``batch``, in a fresh process."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(SearchConfig)}
    if not isinstance(fields["space"], str):
        raise ConfigError("--memory-budget: planning a user-declared SearchSpace is not supported; pass a built-in --space")
    fields.update(out=None, resume=False, progress=False, plots=False, mask=None, batch_size=batch)
    spec = {"config": fields, "batch": batch, "mask_level": mask_level}
    try:
        return R.call_fresh("toponas_kernels.search.budget:_child", spec)
    except R.FreshProcessError as exc:
        raise ConfigError(f"--memory-budget: measuring a step at batch {batch} failed: {exc.last_line}") from None


# ---------------------------------------------------------------------------- the model
@dataclasses.dataclass
class Affine:
    """value(b) = intercept + slope * b, from two measured points."""

    intercept: float
    slope: float

    @classmethod
    def through(cls, p: tuple[float, float], q: tuple[float, float]) -> "Affine":
        slope = (q[1] - p[1]) / (q[0] - p[0])
        return cls(p[1] - slope * p[0], slope)

    def __call__(self, b: float) -> float:
        return self.intercept + self.slope * b


def probe_batches(batch: int) -> tuple[int, int]:
    """Two small batches to measure at: an eighth and a quarter of the requested one (at least 2
    and 4), never above it."""
    b1 = max(2, batch // 8)
    b2 = max(b1 + 2, batch // 4)
    return b1, b2


def model_for(config: SearchConfig, *, mask_level: float | None = None, log=None) -> tuple[Affine, Affine, list]:
    """Peak-memory and step-time models of ``config`` (resolved) as functions of the batch."""
    b1, b2 = probe_batches(config.batch_size)
    points = []
    for b in (b1, b2):
        m = measure(config, b, mask_level=mask_level)
        points.append(m)
        if log:
            log(f"plan: batch {b}: peak {format_bytes(m['peak_bytes'])}, step {m['step_seconds']:.3f} s")
    mem = Affine.through((b1, points[0]["peak_bytes"]), (b2, points[1]["peak_bytes"]))
    sec = Affine.through((b1, points[0]["step_seconds"]), (b2, points[1]["step_seconds"]))
    return mem, sec, points


def plan(config: SearchConfig, *, log=None) -> dict:
    """Predicted peak memory and step time of ``config`` at its batch size."""
    cfg = config.resolved()
    level = cfg.mask_level if cfg.mask is not None else None
    mem, sec, points = model_for(cfg, mask_level=level, log=log)
    return {
        "batch_size": cfg.batch_size,
        "predicted_peak_bytes": int(max(mem(cfg.batch_size), 0)),
        "predicted_step_seconds": max(sec(cfg.batch_size), 0.0),
        "memory_model": {"intercept_bytes": mem.intercept, "bytes_per_sample": mem.slope},
        "measured": points,
    }


def fit(config: SearchConfig, budget: int, by: str = "batch", *, log=None) -> tuple[SearchConfig, dict]:
    """The configuration to run under ``budget`` bytes, and a record of the choice."""
    if by not in FIT_BY:
        raise ConfigError(f"--fit-by: expected one of {', '.join(FIT_BY)}, got {by!r}")
    cfg = config.resolved()
    B = cfg.batch_size
    level = cfg.mask_level if cfg.mask is not None else None
    mem, sec, points = model_for(cfg, mask_level=level, log=log)
    record = {"budget_bytes": budget, "fit_by": by, "requested_batch_size": B,
              "requested_predicted_peak_bytes": int(mem(B)), "measured": points}
    if mem(B) <= budget:
        record.update(chosen={}, predicted_peak_bytes=int(mem(B)), predicted_step_seconds=sec(B))
        return cfg, record
    if by == "batch":
        b = int(math.floor((budget - mem.intercept) / mem.slope)) if mem.slope > 0 else 0
        if b < 1:
            raise ConfigError(
                f"--memory-budget {format_bytes(budget)}: even batch 1 needs about {format_bytes(mem(1))}; "
                "try --fit-by pc or --fit-by mask, --topo topo, or a larger budget"
            )
        chosen, new = {"batch_size": b}, dataclasses.replace(cfg, batch_size=b)
        record.update(predicted_peak_bytes=int(mem(b)), predicted_step_seconds=sec(b))
    elif by == "pc":
        C = cfg.init_channels
        for k in [k for k in (2, 4, 8, 16, 32) if C % k == 0 and k > (cfg.partial_channels or 1)]:
            trial = dataclasses.replace(cfg, partial_channels=k)
            m_k, s_k, pts = model_for(trial, mask_level=level, log=log)
            if m_k(B) <= budget:
                chosen, new = {"partial_channels": k}, trial
                record.update(predicted_peak_bytes=int(m_k(B)), predicted_step_seconds=s_k(B), measured_pc=pts)
                break
        else:
            raise ConfigError(f"--memory-budget {format_bytes(budget)}: no partial-channel k dividing C = {C} fits at batch {B}; "
                              "try --fit-by batch or a larger budget")
    else:
        half, _, pts = model_for(dataclasses.replace(cfg, mask=None), mask_level=0.5, log=log)
        full, _, pts_full = model_for(dataclasses.replace(cfg, mask=None), mask_level=None, log=log)
        s_edges = 2 * (full.slope - half.slope)
        s_fixed = full.slope - s_edges
        intercept = full.intercept
        xi = ((budget - intercept) / B - s_fixed) / s_edges if s_edges > 0 else -1
        xi = math.floor(min(xi, 0.95) * 20) / 20
        if xi < 0.05:
            raise ConfigError(f"--memory-budget {format_bytes(budget)}: no mask level fits at batch {B}; "
                              "try --fit-by batch or a larger budget")
        mask = cfg.mask if cfg.mask in ("random", "zero-shot") else "random"
        chosen, new = {"mask": mask, "mask_level": xi}, dataclasses.replace(cfg, mask=mask, mask_level=xi)
        record.update(predicted_peak_bytes=int(intercept + B * (s_fixed + xi * s_edges)), measured_mask=pts + pts_full)
    record["chosen"] = chosen
    return new, record
