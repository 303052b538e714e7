"""DARTS, first order (Liu et al., 2019): each iteration one Adam step of the architecture
parameters on a validation batch, then one SGD step of the weights on a training batch, both
through the continuous relaxation ``sum_k softmax(alpha)_k op_k(x)``.

Reference settings (DARTS space): batch 64, SGD lr 0.025 cosine to 0.001, momentum 0.9, wd 3e-4,
grad clip 5, 50 epochs; Adam 3e-4, betas (0.5, 0.999), wd 1e-3. NAS-Bench-201: SGD nesterov,
wd 5e-4. The whole mechanism is in ``base.SearchMethod``.
"""

from __future__ import annotations

from .base import SearchMethod


class Darts(SearchMethod):
    name = "darts"
