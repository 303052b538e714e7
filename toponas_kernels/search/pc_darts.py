"""PC-DARTS (Xu et al., 2020): partial channel connections and edge normalization, first order.

Only 1/k of each edge's input channels (k = 4) go through the mixed operation, the rest bypass
it, then a channel shuffle (the ``partial_channel_shuffle`` kernel); per-edge betas, softmaxed
over each node's incoming edges, weight the edges and enter the genotype's edge ranking. Both
live in the supernet (``partial_channels=k``, ``edge_normalization``); the method differs from
DARTS only in its settings: batch 256, SGD lr 0.1 cosine to 0, Adam 6e-4, and no architecture
update during the first 15 epochs (the weights warm up first).

On NAS-Bench-201 the supernet has no edge normalization (an NB201 cell keeps every edge, so
there is no edge ranking for the betas to enter); partial channels and the settings apply.
"""

from __future__ import annotations

from .base import SearchMethod


class PCDarts(SearchMethod):
    name = "pc-darts"
    reference = dict(batch_size=256, lr=0.1, lr_min=0.0, arch_lr=6e-4, warmup_epochs=15, partial_channels=4)

    def schedule(self) -> dict:
        return {**super().schedule(), "arch_updates": self.updates_arch()}
