"""What every search method shares: the two optimizers, the learning-rate schedule, one
architecture step and one weight step, and the state a checkpoint needs.

A method works on any supernet that has ``arch_parameters()`` and ``weight_parameters()`` and
returns logits from ``forward(x)``: the package's ``DartsSearchNetwork`` / ``NB201SearchNetwork``
or the user's own. Drive it from your own loop::

    method = Darts(model, epochs=50)              # reference hyperparameters by default
    for epoch in range(50):
        method.begin_epoch(epoch)
        for train_batch, val_batch in zip(train_loader, val_loader):
            stats = method.step(train_batch, val_batch)
        method.end_epoch(epoch)

``step`` returns detached tensors (loss sums and correct counts), so nothing waits for the
device until you read them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


# Reference values. DARTS space (DARTS, PC-DARTS, beta-DARTS, GDAS, ROME papers and code) and
# NAS-Bench-201 (its DARTS/GDAS search settings). Where a paper states nothing for a space, the
# DARTS-space value of the same method is used (said in docs/SEARCH.md). A method class lists
# what differs for it in ``SearchMethod.reference``.
COMMON_REFERENCE = dict(
    epochs=50, batch_size=64, lr=0.025, lr_min=0.001, momentum=0.9, nesterov=False, weight_decay=3e-4,
    grad_clip=5.0, arch_lr=3e-4, arch_weight_decay=1e-3, arch_betas=(0.5, 0.999), warmup_epochs=0,
    partial_channels=None, beta_lambda=0.0, tau_max=10.0, tau_min=0.1, rome_samples=7,
)
NB201_REFERENCE = dict(nesterov=True, weight_decay=5e-4)


class SearchMethod:
    """First-order DARTS mechanics; subclasses change what differs in their papers.

    Args:
        model: the supernet.
        epochs: length of the schedule (cosine learning rate, tau and lambda schedules).
        space: the space the reference hyperparameters come from ("darts", "nb201", ...).
        **hparams: any of ``lr, lr_min, momentum, nesterov, weight_decay, grad_clip, arch_lr,
            arch_weight_decay, arch_betas, warmup_epochs, beta_lambda, tau_max, tau_min,
            rome_samples``; the rest take the method's reference values.
    """

    name = "darts"
    #: the architecture step runs before the weight step (DARTS); GDAS and ROME run it after.
    arch_first = True
    #: how the supernet weighs an edge's operations: "softmax" (all run, mixed) or "gumbel" (one
    #: sampled operation runs; such methods take no partial channels)
    sampler = "softmax"
    #: operations of the space the method never mixes or samples (ROME: "none")
    exclude: tuple[str, ...] = ()
    #: DARTS-space network: learn which two inputs each node keeps (ROME's topology betas)
    topology = False
    #: this method's reference hyperparameters where they differ from ``COMMON_REFERENCE``
    reference: dict = {}

    @classmethod
    def reference_defaults(cls, space: str) -> dict:
        """The hyperparameters this method uses on ``space`` when the user sets none."""
        out = dict(COMMON_REFERENCE)
        if space == "nb201":
            out.update(NB201_REFERENCE)
        out.update(cls.reference)
        return out

    def __init__(self, model: nn.Module, *, epochs: int, space: str = "darts", **hparams):
        for attr in ("arch_parameters", "weight_parameters"):
            if not callable(getattr(model, attr, None)):
                raise TypeError(f"model: a supernet needs {attr}() (the package's supernets have it)")
        defaults = self.reference_defaults(space)
        unknown = set(hparams) - set(defaults)
        if unknown:
            raise TypeError(f"unknown hyperparameters {sorted(unknown)}; known: {sorted(defaults)}")
        h = {**defaults, **{k: v for k, v in hparams.items() if v is not None}}
        self.h = h
        self.model = model
        self.epochs = int(epochs)
        self.arch_params = list(model.arch_parameters())
        self.weight_params = list(model.weight_parameters())
        if not self.arch_params:
            raise ValueError("model: the supernet has no architecture parameters")
        self.criterion = nn.CrossEntropyLoss()
        self.w_optimizer = torch.optim.SGD(
            self.weight_params, h["lr"], momentum=h["momentum"], weight_decay=h["weight_decay"], nesterov=h["nesterov"]
        )
        self.a_optimizer = torch.optim.Adam(
            self.arch_params, h["arch_lr"], betas=tuple(h["arch_betas"]), weight_decay=h["arch_weight_decay"]
        )
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.w_optimizer, self.epochs, eta_min=h["lr_min"])
        self.epoch = 0
        #: data parallel: called with a parameter list before every optimizer step, to average
        #: the gradients over the processes (the runner sets it under torchrun)
        self.grad_reducer = None
        #: a compiled ``(x, y) -> (loss, logits)`` (``nas.compile.compile_step``) used instead of
        #: the eager forward when set (the runner's ``--compile``)
        self.compiled_loss = None

    # ------------------------------------------------------------------ schedule
    def begin_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def end_epoch(self, epoch: int) -> None:
        self.scheduler.step()

    def updates_arch(self) -> bool:
        """Whether this epoch updates the architecture (PC-DARTS warms up without)."""
        return self.epoch >= self.h["warmup_epochs"]

    @property
    def lr(self) -> float:
        return self.w_optimizer.param_groups[0]["lr"]

    def schedule(self) -> dict:
        """The scheduled quantities of the current epoch, for the log."""
        return {"lr": self.lr}

    # ------------------------------------------------------------------ steps
    def step(self, train_batch, val_batch) -> dict[str, Tensor]:
        """One search iteration: the architecture step on ``val_batch`` and the weight step on
        ``train_batch``, in the method's order. Returns detached sums for the log."""
        stats = {}
        if self.arch_first and self.updates_arch():
            stats.update(self.arch_step(*val_batch))
        stats.update(self.weight_step(*train_batch))
        if not self.arch_first and self.updates_arch():
            stats.update(self.arch_step(*val_batch))
        return stats

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.compiled_loss is not None:
            return self.compiled_loss(x, y)
        logits = self.model(x)
        return self.criterion(logits, y), logits

    def regularizer(self) -> Tensor | None:
        """Added to the validation loss of the architecture step (beta-DARTS)."""
        return None

    def arch_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        loss, logits = self.loss(x, y)
        reg = self.regularizer()
        return (loss if reg is None else loss + reg), logits

    def arch_step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        self.a_optimizer.zero_grad(set_to_none=True)
        loss, logits = self.arch_loss(x, y)
        accumulate_grads(loss, self.arch_params)
        self.update_arch()
        return _stats("val", loss, logits, y)

    def weight_step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        self.w_optimizer.zero_grad(set_to_none=True)
        loss, logits = self.loss(x, y)
        accumulate_grads(loss, self.weight_params)
        self.update_weights()
        return _stats("train", loss, logits, y)

    def update_arch(self) -> None:
        """The architecture optimizer's step on the gradients in ``.grad``."""
        if self.grad_reducer is not None:
            self.grad_reducer(self.arch_params)
        self.a_optimizer.step()

    def update_weights(self) -> None:
        """Clip, then the weight optimizer's step on the gradients in ``.grad``."""
        if self.grad_reducer is not None:
            self.grad_reducer(self.weight_params)
        if self.h["grad_clip"]:
            nn.utils.clip_grad_norm_(self.weight_params, self.h["grad_clip"])
        self.w_optimizer.step()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "w_optimizer": self.w_optimizer.state_dict(),
            "a_optimizer": self.a_optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        self.w_optimizer.load_state_dict(state["w_optimizer"])
        self.a_optimizer.load_state_dict(state["a_optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = state["epoch"]


def accumulate_grads(loss: Tensor, params: Sequence[Tensor], scale: float = 1.0) -> None:
    """Add d(scale * loss)/d(params) to ``.grad``, computing no other gradient (the weight step
    does not compute architecture gradients and vice versa). Parameters the loss does not reach
    (a masked candidate's weights) keep their ``.grad``."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for p, g in zip(params, grads):
        if g is None:
            continue
        if scale != 1.0:
            g = g * scale
        if p.grad is None:
            p.grad = g
        else:
            p.grad.add_(g)


def _stats(prefix: str, loss: Tensor, logits: Tensor, y: Tensor) -> dict[str, Tensor]:
    n = y.shape[0]
    return {
        f"{prefix}_loss_sum": loss.detach() * n,
        f"{prefix}_correct": (logits.detach().argmax(-1) == y).sum(),
        f"{prefix}_count": torch.tensor(n),
    }
