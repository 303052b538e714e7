"""ROME v2 (Wang et al., 2023): single-path search with the topology disentangled from the
operations and gradient accumulation over sampled sub-networks.

* Operations: per edge, GDAS's hard Gumbel sample over the operations except 'none'
  (``exclude=("none",)`` on the supernet), straight-through gradient to every alpha.
* Topology (DARTS cell): per edge a topology logit beta; per node, two incoming edges are kept by
  Gumbel top-2 on log softmax(beta) (two draws without replacement); only those edges run, with
  the straight-through gradient of softmax((log softmax(beta) + g) / tau). The genotype takes the
  two edges with the largest beta per node and the best non-'none' operation on each.
  NAS-Bench-201 cells keep every edge by definition, so there ROME searches operations only.
* Gradient accumulation: K = 7 sub-networks are sampled per iteration, for the weight step and for
  the architecture step alike; each contributes (1/K) of its loss gradient, and one optimizer step
  follows. tau falls linearly from 10 to 0.1 (as GDAS); weight step first, then architecture step.
"""

from __future__ import annotations

from .base import _stats, accumulate_grads
from .gdas import GDAS


class ROME(GDAS):
    name = "rome"
    exclude = ("none",)
    topology = True
    reference = {}  # the DARTS settings, not GDAS' 250 epochs

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.samples = int(self.h["rome_samples"])
        if self.samples < 1:
            raise ValueError(f"rome_samples: expected a positive integer, got {self.samples}")

    def _accumulated(self, params, x, y, regularized: bool):
        """Sum over K sampled sub-networks of (1/K) grad loss, into ``.grad``; returns the mean
        loss and the last sample's logits."""
        total = None
        for _ in range(self.samples):
            loss, logits = self.arch_loss(x, y) if regularized else self.loss(x, y)
            accumulate_grads(loss, params, scale=1.0 / self.samples)
            total = loss.detach() if total is None else total + loss.detach()
        return total / self.samples, logits

    def weight_step(self, x, y):
        self.w_optimizer.zero_grad(set_to_none=True)
        loss, logits = self._accumulated(self.weight_params, x, y, False)
        self.update_weights()
        return _stats("train", loss, logits, y)

    def arch_step(self, x, y):
        self.a_optimizer.zero_grad(set_to_none=True)
        loss, logits = self._accumulated(self.arch_params, x, y, True)
        self.update_arch()
        return _stats("val", loss, logits, y)
