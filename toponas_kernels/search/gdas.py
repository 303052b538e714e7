"""GDAS (Dong & Yang, 2019): sample one operation per edge and run only that one.

Each forward draws g = -log(Exponential(1)) per entry and takes the hard one-hot of
softmax((log_softmax(alpha) + g) / tau) with the straight-through gradient
``one_hot - probs.detach() + probs``, so the sampled operation alone runs while every alpha of
the edge gets a gradient (noise giving inf/NaN is drawn again). tau falls linearly from 10 to 0.1
over the epochs. Order: the weight step first, then the architecture step, each with its own
sample. Reference: 250 epochs on NAS-Bench-201, the DARTS settings otherwise.
"""

from __future__ import annotations

from .base import SearchMethod


class GDAS(SearchMethod):
    name = "gdas"
    arch_first = False
    sampler = "gumbel"
    reference = dict(epochs=250)

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        if not hasattr(model, "sampler"):
            raise TypeError("model: GDAS needs a supernet with a Gumbel sampler (sampler, tau attributes)")
        model.sampler = self.sampler

    def tau(self) -> float:
        lo, hi = self.h["tau_min"], self.h["tau_max"]
        if self.epochs <= 1:
            return hi
        return hi - (hi - lo) * min(self.epoch, self.epochs - 1) / (self.epochs - 1)

    def begin_epoch(self, epoch: int) -> None:
        super().begin_epoch(epoch)
        self.model.tau = self.tau()

    def schedule(self) -> dict:
        return {**super().schedule(), "tau": self.tau()}
