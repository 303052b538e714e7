"""One NB201 search at a reduced budget, in-process, through the package's public search API
(``NB201SearchNetwork`` and the method classes of ``toponas_kernels.search``): the engine of
``bench/search_quality.py`` and ``bench/search_direction.py``.

What is reduced, and how each method's schedule is scaled to the run (``Budget``):

* images: Fashion-MNIST, one channel, average-pooled 2x2 from the package's 32x32 (28x28 padded)
  to 16x16, no augmentation; the first ``train_size`` training images, half for the weights and
  half for the architecture (the search's usual split);
* supernet: NB201 with C ``channels`` and ``layers`` cell(s) per stage;
* schedule: ``epochs`` epochs of ``steps`` steps (one weight step and one architecture step
  each); the cosine learning rate, GDAS/ROME's tau (10 -> 0.1, linear per epoch) and
  beta-DARTS' lambda run over those epochs. beta-DARTS' lambda grows by ``0.5 * 49 / (E - 1)``
  per epoch, so that it ends where the 50-epoch reference ends (24.5); PC-DARTS warms up for
  ``round(0.3 E)`` epochs (15 of 50 in the reference) and gets that many epochs more, so that it
  too takes ``E * steps`` architecture steps, and its weight learning rate is scaled with the
  batch (0.1 at batch 256 -> 0.1 * B / 256); ROME draws its K = 7 sub-networks per step as
  published (each step costs about K single-path steps).
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.nn.functional as F

from toponas_kernels import data as D
from toponas_kernels.nas.networks import NB201SearchNetwork
from toponas_kernels.search import METHOD_CLASSES
from toponas_kernels.search.base import COMMON_REFERENCE

REFERENCE_EPOCHS = COMMON_REFERENCE["epochs"]  # 50: the schedule the scaled ones are scaled from
PC_WARMUP_SHARE = 15 / 50  # PC-DARTS: 15 warm-up epochs of 50
PC_REFERENCE_BATCH = 256


@dataclasses.dataclass(frozen=True)
class Budget:
    epochs: int = 32  # architecture-step epochs (PC-DARTS adds its warm-up on top)
    train_size: int = 1024  # images: half weights, half architecture
    batch: int = 16
    channels: int = 8
    layers: int = 1
    image_size: int = 16
    dataset: str = "fashion-mnist"
    rome_samples: int = 7

    def steps(self) -> int:
        """Steps per epoch: the weight half in batches."""
        return (self.train_size // 2) // self.batch

    def check(self) -> None:
        for key in ("epochs", "train_size", "batch", "channels", "layers", "image_size", "rome_samples"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{key}: expected a positive integer, got {v!r}")
        if self.epochs < 2:
            raise ValueError(f"epochs: need at least 2 (the schedules run from their start to their end), got {self.epochs}")
        if self.steps() < 1:
            raise ValueError(f"train_size {self.train_size} and batch {self.batch}: the weight half holds no full batch")
        if 32 % self.image_size:
            raise ValueError(f"image_size: expected a divisor of 32 (the images are average-pooled), got {self.image_size}")


def add_budget_arguments(ap, epochs: int = 32) -> None:
    """The ``Budget`` options of a benchmark's command line (``budget_from_args`` reads them)."""
    b = ap.add_argument_group("budget (bench/_quality_search.py)")
    b.add_argument("--epochs", type=int, default=epochs, help="architecture-step epochs (pc-darts adds its warm-up)")
    b.add_argument("--train-size", type=int, default=Budget.train_size, help="images: half weights, half architecture")
    b.add_argument("--batch", type=int, default=Budget.batch)
    b.add_argument("--channels", type=int, default=Budget.channels, help="supernet C (NB201: 16)")
    b.add_argument("--layers", type=int, default=Budget.layers, help="cells per stage (NB201: 5)")
    b.add_argument("--image-size", type=int, default=Budget.image_size, help="images average-pooled from 32x32 to this size")
    b.add_argument("--dataset", default=Budget.dataset, help="fashion-mnist or synthetic")


def budget_from_args(args) -> Budget:
    """The checked ``Budget`` of parsed ``add_budget_arguments`` options (a bad one exits with one line)."""
    budget = Budget(epochs=args.epochs, train_size=args.train_size, batch=args.batch, channels=args.channels,
                    layers=args.layers, image_size=args.image_size, dataset=args.dataset)
    try:
        budget.check()
    except ValueError as e:
        raise SystemExit(f"budget: {e}") from None
    return budget


def schedule(method: str, budget: Budget) -> dict:
    """The epochs and hyperparameters of ``method`` at ``budget`` (the module docstring says how)."""
    if method not in METHOD_CLASSES:
        raise ValueError(f"method: expected one of {', '.join(METHOD_CLASSES)}, got {method!r}")
    E = budget.epochs
    h: dict = {}
    epochs = E
    if method == "pc-darts":
        warm = round(PC_WARMUP_SHARE * E)
        epochs = E + warm
        ref = METHOD_CLASSES[method].reference_defaults("nb201")
        h.update(warmup_epochs=warm, lr=ref["lr"] * budget.batch / PC_REFERENCE_BATCH)
    if method == "beta-darts":
        ref = METHOD_CLASSES[method].reference_defaults("nb201")
        h.update(beta_lambda=ref["beta_lambda"] * (REFERENCE_EPOCHS - 1) / (E - 1))
    if method == "rome":
        h.update(rome_samples=budget.rome_samples)
    return {"epochs": epochs, "arch_steps": E * budget.steps(), "hparams": h}


_DATA: dict = {}


def load_images(budget: Budget, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``train_size`` images of ``split`` (all of the test split), normalized, one
    channel, pooled to ``image_size`` (cached per process)."""
    key = (budget.dataset, split, budget.train_size if split == "train" else None, budget.image_size)
    if key not in _DATA:
        channels = 1 if budget.dataset == "fashion-mnist" else None
        ds = D.load_split(budget.dataset, split, channels=channels, synthetic_size=max(budget.train_size, 64))
        n = min(len(ds), budget.train_size) if split == "train" else len(ds)
        x = torch.stack([ds[i][0] for i in range(n)])
        y = torch.tensor([int(ds.labels[i]) for i in range(n)])
        k = 32 // budget.image_size
        if k > 1:
            x = F.avg_pool2d(x, k)
        _DATA[key] = (x.contiguous(), y)
    return _DATA[key]


def build(method: str, topo: str, budget: Budget, *, in_channels: int = 1) -> NB201SearchNetwork:
    """The supernet a ``method`` searches (its sampler, exclusions and partial channels)."""
    cls = METHOD_CLASSES[method]
    k = cls.reference_defaults("nb201").get("partial_channels")
    if k is not None and budget.channels % k:
        k = None
    return NB201SearchNetwork(budget.channels, budget.layers, 10, space="nb201", mode=topo, sampler=cls.sampler,
                              exclude=tuple(cls.exclude), partial_channels=k, in_channels=in_channels)


class Batches:
    """Seeded batches of one half: a new permutation per pass, cycling."""

    def __init__(self, x, y, batch: int, seed: int):
        self.x, self.y, self.batch = x, y, batch
        self.g = torch.Generator().manual_seed(seed)
        self.order, self.pos = None, 0

    def __next__(self):
        if self.order is None or self.pos + self.batch > len(self.order):
            self.order, self.pos = torch.randperm(len(self.x), generator=self.g), 0
        idx = self.order[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return self.x[idx], self.y[idx]


@torch.no_grad()
def _weights(model, digits: int) -> list[list[float]]:
    """softmax(alphas) per edge over the operations the method can choose (rows: edges in the
    supernet's order ``NB201SearchNetwork.EDGES``; columns: ``model.space.names``)."""
    keep = model.mask & torch.tensor([name not in model.exclude for name in model.space.names])
    weights = torch.softmax(model.alphas.detach().masked_fill(~keep, -math.inf), -1)
    return [[round(float(v), digits) for v in row] for row in weights]


def search(method: str, topo: str, seed: int, budget: Budget, *, on_step=None, prepare=None, log=None) -> dict:
    """Run one search; returns its record (derived cell, cost, schedule ends, final weights).
    ``on_step(step, model, method_obj, train_batch, val_batch)`` is called before every step
    (``bench/search_direction.py`` measures there); ``prepare(model)`` once on the new supernet
    (``bench/gdas_estimator.py`` adds hooks there)."""
    budget.check()
    plan = schedule(method, budget)
    x, y = load_images(budget)
    torch.manual_seed(seed)
    n = len(x)
    half = n // 2
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    tr, va = perm[:half], perm[half:]
    model = build(method, topo, budget, in_channels=x.shape[1])
    if prepare is not None:
        prepare(model)
    m = METHOD_CLASSES[method](model, epochs=plan["epochs"], space="nb201", **plan["hparams"])
    train_it = Batches(x[tr], y[tr], budget.batch, seed)
    val_it = Batches(x[va], y[va], budget.batch, seed + 7919)
    steps = budget.steps()
    arch_steps = 0
    t0, c0 = time.perf_counter(), time.process_time()
    last, trace = {}, []
    for epoch in range(plan["epochs"]):
        m.begin_epoch(epoch)
        sched = m.schedule()
        sums = {}
        for s in range(steps):
            tb, vb = next(train_it), next(val_it)
            if on_step is not None:
                on_step(epoch * steps + s, model, m, tb, vb)
            stats = m.step(tb, vb)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0) + float(v)
            arch_steps += int(m.updates_arch())
        m.end_epoch(epoch)
        last = {"epoch": epoch + 1, **{k: float(v) if isinstance(v, (int, float)) else v for k, v in sched.items()}}
        for half_name in ("train", "val"):
            c = sums.get(f"{half_name}_count", 0)
            if c:
                last[f"{half_name}_acc"] = 100 * sums[f"{half_name}_correct"] / c
                last[f"{half_name}_loss"] = sums[f"{half_name}_loss_sum"] / c
        trace.append({"epoch": epoch + 1, "genotype": model.genotype(),
                      **{k: round(v, 4) for k, v in sched.items() if isinstance(v, float)},
                      "weights": _weights(model, 3)})
        if log is not None:
            log(f"{method}/{topo} seed {seed}: epoch {epoch + 1}/{plan['epochs']} {model.genotype()} "
                f"{ {k: round(v, 3) if isinstance(v, float) else v for k, v in last.items()} }")
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    return {
        "genotype": model.genotype(),
        "arch_weights": _weights(model, 5),
        "ops": list(model.space.names),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,  # this process's CPU time: the cost on a shared machine
        "steps": plan["epochs"] * steps,
        "arch_steps": arch_steps,
        "epochs": plan["epochs"],
        "hparams": plan["hparams"],
        "last_epoch": last,
        "trace": trace,
    }
