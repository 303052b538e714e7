"""What a search run is: ``SearchConfig``, the names it accepts, and the checks that refuse what
is not defined. Each method class holds its reference hyperparameters (``search/base.py`` and the
method modules; the settings are in ``docs/SEARCH.md``); ``METHODS`` is ``methods.METHOD_CLASSES``.

Every field left ``None`` takes the method's reference value for the space (``resolved()``), so
``SearchConfig(space="darts", method="pc-darts", dataset="cifar10")`` is PC-DARTS as published.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..nas import spaces as S
from ..runtime import ConfigError, RunOptions

from ..nas.forms import MERGE_CHOICES as MERGES
from ..nas.simplify import MODES
from .methods import METHOD_CLASSES

METHODS = tuple(METHOD_CLASSES)
SPACES = ("darts", "nb201", "exaggerated")
#: the TopoNAS modes, named as ``nas.simplify.MODES`` names them; the ``topo`` option is the
#: ``mode=`` argument of the supernets and ``FusedMixedOp``
TOPO_MODES = tuple(MODES)
MASK_KINDS = ("random", "zero-shot")
MASK_RULES = ("operations", "architectures")


def reference_defaults(method: str, space: str) -> dict:
    """The hyperparameters a method uses on a space when the user sets none (each method class
    holds its own, ``SearchMethod.reference_defaults``)."""
    if method not in METHOD_CLASSES:
        raise ConfigError(f"--method: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return METHOD_CLASSES[method].reference_defaults(space)


@dataclass
class SearchConfig(RunOptions):
    """One search run: the options every run has (``runtime.RunOptions``: out, seed, device,
    schedule, optimizer, network size, data, reporting) and the search's own. ``None`` fields
    take the method's reference value (``resolved()``)."""

    space: str | S.SearchSpace = "darts"
    method: str = "darts"
    dataset: str = "synthetic"
    network: str | None = None  # "darts" or "nb201" macro for a user-declared SearchSpace
    topo: str = "plain"  # TopoNAS mode, one of TOPO_MODES; the supernets and FusedMixedOp call it mode=
    kernel_norm: bool = True
    merge: str = "auto"  # how merged conv groups run: auto, dense, stacked (exact), separable (approximation)
    recompute_cells: bool = False  # DARTS network: keep only each cell's inputs, rerun cells in backward
    compile: bool | str = False  # torch.compile the loss of a step (True: inductor; or a backend name)
    cuda_graphs: bool = False  # compile with inductor's mode="reduce-overhead" (CUDA graphs); CUDA only
    mask: str | None = None  # "random", "zero-shot", a mask file, or None
    mask_level: float = 0.5
    mask_rule: str = "operations"
    mask_batches: int = 3
    mask_batch_size: int = 128
    mask_inits: int = 3
    # architecture optimizer and method (None: reference value)
    arch_lr: float | None = None
    arch_weight_decay: float | None = None
    arch_betas: tuple[float, float] | None = None
    warmup_epochs: int | None = None
    partial_channels: int | None = None
    beta_lambda: float | None = None
    tau_max: float | None = None
    tau_min: float | None = None
    rome_samples: int | None = None
    # data
    train_portion: float = 0.5
    lookup: str | None = None  # NAS-Bench-201 / NATS-tss table: accuracies of the derived cell
    # memory budget (search/budget.py)
    memory_budget: str | int | None = None  # e.g. "6GiB"
    fit_by: str = "batch"

    # ------------------------------------------------------------------ checks
    def resolved(self) -> "SearchConfig":
        """A copy with every reference value filled in, after checking the options."""
        self.check()
        space = self.space_name()
        defaults = reference_defaults(self.method, "nb201" if self.macro() == "nb201" else space)
        values = {}
        for key, value in defaults.items():
            values[key] = value if getattr(self, key) is None else getattr(self, key)
        if self.init_channels is None:
            values["init_channels"] = 16
        if self.layers is None:
            values["layers"] = 5 if self.macro() == "nb201" else 8
        if self.num_workers is None:
            values["num_workers"] = 0
        out = dataclasses.replace(self, **values)
        out._check_values()
        return out

    def space_name(self) -> str:
        return self.space.name if isinstance(self.space, S.SearchSpace) else str(self.space)

    def macro(self) -> str:
        """Which supernet skeleton: the DARTS cell network or the NAS-Bench-201 one."""
        if isinstance(self.space, S.SearchSpace):
            return self.network or "darts"
        return "nb201" if self.space == "nb201" else "darts"

    def check(self) -> None:
        if not isinstance(self.space, S.SearchSpace) and self.space not in SPACES:
            raise ConfigError(f"--space: unknown search space {self.space!r}; choose one of {', '.join(SPACES)} (or pass a SearchSpace from Python)")
        if self.network not in (None, "darts", "nb201"):
            raise ConfigError(f"network: expected 'darts' or 'nb201', got {self.network!r}")
        if self.method not in METHODS:
            raise ConfigError(f"--method: unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.topo not in TOPO_MODES:
            raise ConfigError(f"--topo: unknown mode {self.topo!r}; choose one of {', '.join(TOPO_MODES)}")
        if self.lookup is not None and self.macro() != "nb201":
            raise ConfigError("--lookup: the benchmark tables hold NAS-Bench-201 cells; use it with --space nb201")
        if self.fit_by not in ("batch", "pc", "mask"):
            raise ConfigError(f"--fit-by: expected batch, pc or mask, got {self.fit_by!r}")
        if self.merge not in MERGES:
            raise ConfigError(f"--merge: expected one of {', '.join(MERGES)}, got {self.merge!r}")
        if self.recompute_cells and self.macro() != "darts":
            raise ConfigError("--recompute-cells: only the DARTS-space network recomputes its cells; the NB201 "
                              "network does not (leave the flag out, or search the darts/exaggerated space)")
        if self.mask_rule not in MASK_RULES:
            raise ConfigError(f"--mask-rule: expected one of {', '.join(MASK_RULES)}, got {self.mask_rule!r}")
        if not (isinstance(self.mask_level, (int, float)) and 0.0 < self.mask_level < 1.0):
            raise ConfigError(f"--mask-level: the pruning level must lie strictly between 0 and 1, got {self.mask_level!r}")
        if not 0.0 < self.train_portion < 1.0:
            raise ConfigError(f"--train-portion: expected a fraction strictly between 0 and 1, got {self.train_portion!r}")
        self.check_device()
        if self.partial_channels is not None and METHOD_CLASSES[self.method].sampler != "softmax":
            raise ConfigError(
                f"--partial-channels: not defined for {self.method} (a single sampled path per edge already "
                "runs; partial channels belong to pc-darts and the DARTS-family methods)"
            )

    def _check_values(self) -> None:
        positive_int = ("epochs", "batch_size", "init_channels", "layers", "rome_samples", "mask_batches", "mask_batch_size", "mask_inits")
        for key in positive_int:
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"--{key.replace('_', '-')}: expected a positive integer, got {v!r}")
        for key in ("train_size", "steps_per_epoch"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"--{key.replace('_', '-')}: expected a positive integer, got {v!r}")
        if not isinstance(self.warmup_epochs, int) or self.warmup_epochs < 0:
            raise ConfigError(f"--warmup-epochs: expected an integer >= 0, got {self.warmup_epochs!r}")
        for key in ("lr", "arch_lr"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"--{key.replace('_', '-')}: expected a positive learning rate, got {getattr(self, key)!r}")
        for key in ("lr_min", "weight_decay", "arch_weight_decay", "momentum", "grad_clip", "beta_lambda"):
            if getattr(self, key) < 0:
                raise ConfigError(f"--{key.replace('_', '-')}: expected a value >= 0, got {getattr(self, key)!r}")
        if not (self.tau_max >= self.tau_min > 0):
            raise ConfigError(f"--tau-max/--tau-min: expected tau_max >= tau_min > 0, got {self.tau_max!r} and {self.tau_min!r}")
        k = self.partial_channels
        if k is not None and (not isinstance(k, int) or k < 1 or self.init_channels % k):
            raise ConfigError(
                f"--partial-channels: expected a positive divisor of the initial channels ({self.init_channels}), got {k!r}"
            )
        if self.checkpoint_every < 0:
            raise ConfigError(f"--checkpoint-every: expected steps >= 0, got {self.checkpoint_every!r}")
        if self.cuda_graphs and self.compile not in (False, True, "inductor"):
            raise ConfigError(f"--cuda-graphs: compiles with inductor, not with --compile {self.compile}")

    # ------------------------------------------------------------------ records
    def to_dict(self) -> dict:
        d = self.recorded()
        d["space"] = self.space_name()
        if isinstance(self.space, S.SearchSpace):
            d["primitives"] = list(self.space.names)
        return d


# What must agree between a checkpoint and the configuration resuming it.
RESUME_KEYS = (
    "space", "method", "dataset", "network", "topo", "kernel_norm", "merge", "recompute_cells", "mask", "mask_level", "mask_rule", "seed",
    "epochs", "batch_size", "lr", "lr_min", "momentum", "nesterov", "weight_decay", "grad_clip", "arch_lr",
    "arch_weight_decay", "warmup_epochs", "partial_channels", "beta_lambda", "tau_max", "tau_min", "rome_samples",
    "init_channels", "layers", "train_portion", "train_size", "steps_per_epoch", "channels",
)
