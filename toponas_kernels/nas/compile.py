"""``torch.compile`` of a whole search step (supernet forward, loss and, through AOTAutograd,
backward), with recompilation bounded.

    from toponas_kernels.nas.compile import compile_step
    step = compile_step(model)                       # loss_fn defaults to cross-entropy
    loss = step(x, y)                                # compiled forward + loss
    loss.backward()                                  # runs the compiled backward graph

How the supernet captures. Under compilation the TopoNAS edges run their differentiable forward
as it stands: a merged conv is ``ops.merge_kernels`` (a ``torch.library`` custom op with a fake
and an autograd formula) then ``F.conv2d``, and the parameter-free tails and recomputed cells
just run, so AOTAutograd's partitioner decides what backward keeps (eagerly the same code goes
through ``_autograd._MergedConv`` / ``_Recomputed``, whose Python backward dynamo cannot trace).
The host-side decisions (each edge's simplified graph for its mask, the merge forms, the masks'
host copies) are made eagerly before every step by ``prepare_host`` on every supernet in
``model``; the traced forward only reads them as Python values, which dynamo guards on. A
softmax sampler with fixed masks (DARTS, PC-DARTS, beta-DARTS) is thus one graph, forward and
backward, without graph breaks.

On CUDA tensors the same holds: which kernels a fused op runs (``backend.resolve``: the CUDA
kernels when the extension was built with them, else Triton) is decided from constants fixed at
import, which dynamo folds into the graph, so the choice costs no graph break
(``python_tests/test_compile_cuda_trace.py`` traces the ops and whole supernets on fake CUDA
tensors with ``fullgraph=True``). The fused ops stay opaque custom ops in the graph, each run by
its own kernels; what compiling removes is the host work around them (the small elementwise
ops of the per-step weights and statistics, fused by inductor) and, with
``mode="reduce-overhead"``, the per-op launches altogether (CUDA graphs).

What changes the graph. A supernet's graph depends on which candidates run: the masks
(Zero-One-Shot, PC + mask) and, with a single-path sampler (``sampler="gumbel"``: GDAS; ROME),
the sub-network sampled at every step. A new mask is a new graph. A sampled sub-network is
known only once the sample is read back, a graph break: a GDAS step makes up to 4 graphs for
its first sub-network (the sampling, the read, which dynamo splits in pieces, and the rest of
the step in one graph) and one more per new sub-network. With 14 edges and 8 candidates there
are far too many to compile them all, and compiling one takes seconds to minutes where an eager
step takes a fraction of a second. So ``compile_step`` caps the number of graphs per compiled
function at ``max_graphs`` (dynamo's recompile limit, while this step runs): the first
``max_graphs`` sub-networks are compiled and every later new one runs eagerly (with eager's
recomputing edges), never recompiled.

Shapes are static (``dynamic=False``): a new batch size is a new graph (it counts toward the cap).

CUDA graphs (``cuda_graphs=True``: inductor's ``mode="reduce-overhead"``). A graph replays its
kernels without the host issuing them one by one, which removes the per-op launch cost of a step
altogether. It needs a step with no host synchronization, no tensor made from Python values per
step and static shapes: a softmax sampler (DARTS, PC-DARTS, beta-DARTS) with fixed masks is one
(``python_tests/test_compile_cuda_graphs.py`` checks that its forward + backward makes no host
read-back and no tensor from Python values after the first step); a single-path sampler reads
its sample back, so its steps break the graph there and only the pieces are captured. Each step
starts with ``torch.compiler.cudagraph_mark_step_begin()``, so the previous step's outputs may be
overwritten by the next replay: read what a step returns before running the next one. On a CPU
the mode compiles as ``compile`` does and captures nothing.
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
    cuda_graphs: bool = False,
    **compile_kwargs,
) -> Callable[[Tensor, Tensor], Tensor]:
    """``step(x, y) = loss_fn(model(x), y)`` compiled with ``torch.compile(dynamic=False,
    **compile_kwargs)``; calling ``.backward()`` on the loss runs the compiled backward. At most
    ``max_graphs`` graphs are compiled for it (see the module docstring); later new
    sub-networks run eagerly. ``cuda_graphs``: inductor with ``mode="reduce-overhead"`` (CUDA
    graphs on CUDA tensors), each call a new CUDA-graph step."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(max_graphs, int) or max_graphs < 1:
        raise ValueError(f"max_graphs: expected a positive int, got {max_graphs!r}")
    if not isinstance(cuda_graphs, bool):
        raise ValueError(f"cuda_graphs: expected True or False, got {cuda_graphs!r}")
    if cuda_graphs:
        backend = compile_kwargs.get("backend", "inductor")
        if backend != "inductor":
            raise ValueError(f"cuda_graphs: needs the inductor backend (mode='reduce-overhead'), got backend={backend!r}")
        if compile_kwargs.get("mode", "reduce-overhead") != "reduce-overhead":
            raise ValueError(f"cuda_graphs: is mode='reduce-overhead', got mode={compile_kwargs['mode']!r}")
        compile_kwargs["mode"] = "reduce-overhead"
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
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch._dynamo.config.patch(**{name: max_graphs}):
            return compiled(x, y)

    step.compiled = compiled  # for inspection (torch._dynamo.explain, counters)
    return step
