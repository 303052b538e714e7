"""``torch.compile`` of a whole search step (supernet forward, loss and, through AOTAutograd,
backward), with recompilation bounded.

    from toponas_kernels.nas.compile import compile_step
    step = compile_step(model)                       # loss_fn defaults to cross-entropy
    loss = step(x, y)                                # compiled forward + loss
    loss.backward()                                  # runs the compiled backward graph

What changes the graph. A supernet's graph depends on which candidates run: the masks
(Zero-One-Shot, PC + mask) and, with a single-path sampler (``sampler="gumbel"``: GDAS; ROME),
the sub-network sampled at every step. Each distinct one is a distinct graph; with 14 edges and
8 candidates there are far too many to compile them all, and compiling a new one takes seconds
to minutes where an eager step takes a fraction of a second. So ``compile_step`` caps the number
of graphs per step function at ``max_graphs`` (dynamo's recompile limit, for this function
only): the first ``max_graphs`` sub-networks are compiled and every later new one runs eagerly,
never recompiled. Softmax samplers with fixed masks (DARTS, PC-DARTS) have one graph.

Fixed masks (``set_masks``) are read when the graph is traced: set them before the first step.
Shapes are static (``dynamic=False``): a new batch size is a new graph (it counts toward the cap).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["compile_step"]


def _limit_name() -> str:
    config = torch._dynamo.config
    return "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"


def compile_step(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    *,
    max_graphs: int = 4,
    **compile_kwargs,
) -> Callable[[Tensor, Tensor], Tensor]:
    """``step(x, y) = loss_fn(model(x), y)`` compiled with ``torch.compile(dynamic=False,
    **compile_kwargs)``; calling ``.backward()`` on the loss runs the compiled backward. At most
    ``max_graphs`` graphs are compiled for it (see the module docstring); later new
    sub-networks run eagerly."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(max_graphs, int) or max_graphs < 1:
        raise ValueError(f"max_graphs: expected a positive int, got {max_graphs!r}")
    compile_kwargs.setdefault("dynamic", False)

    def forward_loss(x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(model(x), y)

    # Dynamo keeps graphs and counts recompiles per code object: a copy of the code makes them
    # this step function's own (another compile_step in the process does not use up its cap).
    forward_loss.__code__ = forward_loss.__code__.replace()
    compiled = torch.compile(forward_loss, **compile_kwargs)
    name = _limit_name()
    supernets = [m for m in model.modules() if hasattr(m, "prepare_host")]

    def step(x: Tensor, y: Tensor) -> Tensor:
        for net in supernets:  # eagerly: masks' host copies, edge plans (nothing traced)
            net.prepare_host(x.device.type)
        with torch._dynamo.config.patch(**{name: max_graphs}):
            return compiled(x, y)

    step.compiled = compiled  # for inspection (torch._dynamo.explain, counters)
    return step
