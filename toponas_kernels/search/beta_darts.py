"""beta-DARTS (Ye et al., 2022): first-order DARTS with the Beta-Decay regularization.

The architecture step minimizes ``L_val + lambda_t * sum_A mean_e logsumexp_o A[e, o]`` over the
operation-weight tensors A (``alphas_normal``/``alphas_reduce``, or ``alphas``), with
``lambda_t = beta_lambda * t`` at epoch t (0.5 by default: linear from 0). Its gradient with
respect to A[e] is lambda_t * softmax(A[e]) / E: it pulls every edge's logits down in proportion
to their softmax, which keeps the softmax from saturating on one operation early.

Masked operations are left out of the logsumexp (they take no part in the softmax either).
"""

from __future__ import annotations

import torch

from .base import SearchMethod


class BetaDarts(SearchMethod):
    name = "beta-darts"
    reference = dict(beta_lambda=0.5)

    def coefficient(self) -> float:
        return self.h["beta_lambda"] * self.epoch

    def schedule(self) -> dict:
        return {**super().schedule(), "beta_lambda": self.coefficient()}

    def regularizer(self):
        lam = self.coefficient()
        if lam == 0:
            return None
        return lam * beta_decay(self.model)


def beta_decay(model) -> torch.Tensor:
    """``sum_A mean_e logsumexp_o A[e, o]`` over the operation logits (``alphas*`` parameters),
    masked operations left out."""
    masks = model.masks() if hasattr(model, "masks") else {}
    total = None
    for name, alpha in model.named_arch_parameters() if hasattr(model, "named_arch_parameters") else []:
        if not name.startswith("alphas"):
            continue
        mask = masks.get("mask" + name[len("alphas"):])
        logits = alpha if mask is None else alpha.masked_fill(~mask, float("-inf"))
        term = torch.logsumexp(logits, dim=-1).mean()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("model: beta-DARTS needs operation logits named alphas* (named_arch_parameters())")
    return total
