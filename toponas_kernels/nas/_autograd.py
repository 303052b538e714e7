"""Memory-saving autograd for the TopoNAS edges and supernets: merged convs that rebuild their
kernel in backward (``merged_conv``), and recomputation of parameter-free ends, cells and stems
(``recompute``; where the kernels are compiled, an edge's recomputed pooling/BN tails are one op
each way with a C++ backward, ``light_sum``). All keep only their inputs for backward and run
again there.

A merged conv group (``forms.py``) is an object with ``conv`` (stride, dilation, groups) and a
differentiable ``prepare(x, coefs, tensors) -> (z, kernel)`` (the conv input and kernel). A
group whose kernel has an analytic backward (the dense form: ``ops.merge_kernels`` and its
backward formula) also has ``build(coefs, tensors)`` and ``kernel_grads(grad_kernel, coefs,
tensors, built)``, and a group of the stacked or separable form ``backward(grad, x, coefs,
tensors, need_x)``; its backward then runs a fixed set of ops (rebuild the kernel, the convs'
backward, the kernel's backward) instead of running ``prepare`` again under autograd (which
remains the path under autocast for the factored forms). Where the compiled kernels are built,
a group runs eagerly as one C++ op instead (``group.fused``, ``forms.py``), with no Python in its
backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backend as _backend
from ..ops._common import FUSED_BACKENDS, fused_op, register_kernel_fake

__all__ = ["merged_conv", "recompute", "recomputed", "channels_last_on_cpu", "light_tail", "light_sum"]


def _autocast_dtype(x: Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class _MergedConv(torch.autograd.Function):
    """``conv2d(z, kernel)`` ('same' padding) with ``z, kernel = group.prepare(x, coefs,
    tensors)`` and ``group.conv = (stride, dilation, groups)`` (a merged kernel is stored on its
    group's lattice, ``Merged.dilation``), keeping only x, the coefficients and the candidates'
    parameters for backward. Dense form: z is x and kernel the merged kernel; stacked and
    separable forms: z the depthwise outputs and kernel the 1x1 conv over them (``forms.py``).
    Backward rebuilds the kernel (and z), which costs a few small kernel-sized ops (and a
    depthwise pass) instead of keeping C_out x C_in x k x k kernels or n x |x| depthwise outputs
    per merged conv for the whole step."""

    @staticmethod
    def run(group, x, coefs, tensors) -> tuple[Tensor, torch.dtype, int]:
        """The conv, its dtype and padding. Under autocast the conv runs in the autocast dtype,
        like F.conv2d would; kernels are merged in the parameters' dtype and cast."""
        dtype = _autocast_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            z, kernel = group.prepare(x.to(dtype), coefs, tensors)
            stride, dilation, groups = group.conv
            padding = dilation * (kernel.shape[-1] // 2)
            return F.conv2d(z, kernel.to(dtype), None, stride, padding, dilation, groups), dtype, padding

    @staticmethod
    def forward(ctx, group, x, coefs, *tensors):
        # Autograd is off here: nothing is kept but what is saved; backward repeats the casts.
        y, dtype, padding = _MergedConv.run(group, x, coefs, tensors)
        ctx.group, ctx.padding, ctx.dtype = group, padding, dtype
        ctx.save_for_backward(x, coefs, *tensors)  # the candidates' kernels are parameters
        return y

    @staticmethod
    def backward(ctx, grad):
        x, coefs, *tensors = ctx.saved_tensors
        group = ctx.group
        stride, dilation, groups = group.conv
        need_x = ctx.needs_input_grad[1]
        conv_args = ([stride] * 2, [ctx.padding] * 2, [dilation] * 2, False, [0, 0], groups)
        if hasattr(group, "backward") and ctx.dtype == x.dtype == grad.dtype and all(t.dtype == x.dtype for t in tensors):
            with torch.autocast(x.device.type, enabled=False):
                gx, grads = group.backward(grad, x, coefs, tensors, need_x)
            return (None, gx, *grads)
        if hasattr(group, "kernel_grads"):
            with torch.autocast(x.device.type, enabled=False):
                kernel, built = group.build(coefs, tensors)
                xd = x if x.dtype == ctx.dtype else x.to(ctx.dtype)
                gx, gk, _ = torch.ops.aten.convolution_backward(
                    grad if grad.dtype == ctx.dtype else grad.to(ctx.dtype), xd,
                    kernel if kernel.dtype == ctx.dtype else kernel.to(ctx.dtype), None, *conv_args,
                    [need_x, True, False],
                )
                grads = group.kernel_grads(gk if gk.dtype == kernel.dtype else gk.to(kernel.dtype), coefs, tensors, built)
            gx = gx if gx is None or gx.dtype == x.dtype else gx.to(x.dtype)
            return (None, gx, *grads)
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            xg = x.detach().requires_grad_(need_x)
            sources = [t.detach().requires_grad_() for t in (coefs, *tensors)]
            z, kernel = group.prepare(xg.to(ctx.dtype), sources[0], sources[1:])
            kernel = kernel.to(ctx.dtype)
        need_z = z.requires_grad
        gz, gk, _ = torch.ops.aten.convolution_backward(
            grad.to(ctx.dtype), z.detach(), kernel.detach(), None, *conv_args, [need_z, True, False],
        )
        outs, gouts = [kernel], [gk]
        if need_z:
            outs.append(z)
            gouts.append(gz)
        inputs = ([xg] if need_x else []) + sources
        grads = list(torch.autograd.grad(outs, inputs, gouts, allow_unused=True))
        gx = grads.pop(0) if need_x else None
        return (None, gx.to(x.dtype) if gx is not None else None, *grads)


def merged_conv(group, x: Tensor, coefs: Tensor, *tensors: Tensor) -> Tensor:
    """A merged conv: eagerly the group's fused op where it applies (``group.fused``: one
    dispatcher call each way, its backward a C++ autograd node keeping what ``_MergedConv``
    keeps), else ``_MergedConv``; under ``torch.compile`` the same computation differentiated as
    it stands (the merged kernel through ``ops.merge_kernels``' autograd formula, no Python
    backward for dynamo to stop at), what backward keeps or recomputes left to AOTAutograd's
    partitioner."""
    if torch.compiler.is_compiling():
        return _MergedConv.run(group, x, coefs, tensors)[0]
    fused = getattr(group, "fused", None)
    y = None if fused is None else fused(x, coefs, tensors)
    return y if y is not None else _MergedConv.apply(group, x, coefs, *tensors)


class _NoStatistics:
    """While it is active, the BNs ``bns`` run without reading or advancing their running
    statistics (``track_running_stats`` off): in train mode the same batch statistics and
    outputs; in eval mode the running statistics are still used (a BN reads them when not
    training). Used where a forward runs again in backward, so the statistics advance once."""

    def __init__(self, bns):
        self.bns = [m for m in bns if m.track_running_stats]

    def __enter__(self):
        for m in self.bns:
            m.track_running_stats = False

    def __exit__(self, *exc):
        for m in self.bns:
            m.track_running_stats = True


class _Recomputed(torch.autograd.Function):
    """``run(*inputs)`` (one tensor out) keeping only the inputs for backward: forward runs
    ``run`` without autograd; backward runs it again with autograd, under the forward's autocast
    state and with the BNs ``bns`` not advancing their running statistics (so they advance once
    per step), and takes its vector-Jacobian product for the inputs and ``params`` (the
    parameters ``run`` reads). ``run`` must give the same values again: no dropout, no sampling
    inside."""

    @staticmethod
    def forward(ctx, run, bns, n_inputs, *tensors):
        dev = tensors[0].device.type
        ctx.autocast = (dev, torch.get_autocast_dtype(dev), torch.is_autocast_enabled(dev))
        ctx.run, ctx.bns, ctx.n_inputs = run, bns, n_inputs
        ctx.save_for_backward(*tensors)  # the inputs, and the parameters (kept anyway)
        return run(*tensors[:n_inputs])  # autograd is off inside Function.forward: nothing is kept

    @staticmethod
    def backward(ctx, grad):
        tensors, n = ctx.saved_tensors, ctx.n_inputs
        need = ctx.needs_input_grad[3:]
        dev, dtype, enabled = ctx.autocast
        with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled), _NoStatistics(ctx.bns):
            inputs = [t.detach().requires_grad_(nd) for t, nd in zip(tensors[:n], need)]
            out = ctx.run(*inputs)
        wrt = [t for t, nd in zip(inputs + list(tensors[n:]), need) if nd]
        grads = iter(torch.autograd.grad(out, wrt, grad, allow_unused=True) if wrt and out.requires_grad else [None] * len(wrt))
        return (None, None, None, *(next(grads) if nd else None for nd in need))


def recomputed(run, bns, n_inputs: int, *tensors: Tensor) -> Tensor:
    """``run(*tensors[:n_inputs])``, recomputed in backward (``_Recomputed``) when autograd
    records it eagerly; without autograd, and under ``torch.compile`` (where the partitioner
    decides what to keep), just run."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return run(*tensors[:n_inputs])
    return _Recomputed.apply(run, bns, n_inputs, *tensors)


#: The recomputed parameter-free tails of an edge as one op with a C++ autograd node
#: (csrc/light_sum.cpp); None when the extension lacks it.
_LIGHT_SUM = fused_op("light_sum_fused")


@register_kernel_fake("light_sum_fused")
def _(weights, inputs, running_means, running_vars, counters, spec, floats, training):
    x = inputs[0]
    pool, k, s, p = spec[:4]
    h, w = x.shape[-2:]
    if pool:
        h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    return x.new_empty((*x.shape[:-2], h, w))


@register_kernel_fake("light_sum_backward_kernel")
def _(grad, weights, inputs, running_means, running_vars, spec, floats, training):
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in inputs] + [torch.empty_like(weights)]


def light_tail(pool: nn.Module | None, bn: nn.Module | None, channels_last: bool) -> tuple | None:
    """A tail ``bn(pool(x))`` (either may be None) in the terms of the fused op: ``(spec, floats,
    bn)`` (csrc/light_sum.cpp), or None when the op cannot run it (another module, a pool with
    ceil mode, dilation, unequal sides or padding over half its window, an affine BN, a
    cumulative-average BN). ``channels_last``: the pool and BN run channels-last (as
    ``channels_last_on_cpu`` runs a pooling unit on a CPU)."""
    code, kernel, stride, padding = 0, 1, 1, 0
    if pool is not None:
        if type(pool) is nn.MaxPool2d and pool.dilation in (1, (1, 1)) and not pool.return_indices:
            code = 1
        elif type(pool) is nn.AvgPool2d and not pool.count_include_pad and pool.divisor_override is None:
            code = 2
        else:
            return None
        k, st, pad = (v if isinstance(v, int) else (v[0] if len(set(v)) == 1 else None)
                      for v in (pool.kernel_size, pool.stride, pool.padding))
        if None in (k, st, pad) or pool.ceil_mode or 2 * pad > k:
            return None
        kernel, stride, padding = k, st, pad
    floats = [0.0, 0.0]
    bn_code = 0
    if bn is not None:
        if type(bn) is not nn.BatchNorm2d or bn.affine or bn.momentum is None:
            return None
        bn_code = 2 if bn.track_running_stats and bn.running_mean is not None else 1
        floats = [float(bn.momentum), float(bn.eps)]
    spec = [code, kernel, stride, padding, bn_code, int(channels_last and pool is not None)]
    return spec, floats, bn if bn_code == 2 else None


def light_sum(tails: list[tuple], w: Tensor, inputs: list[Tensor], backend: str | None) -> Tensor | None:
    """``sum_k w_k tail_k(inputs[k])`` for tails from ``light_tail``, as one op whose backward
    runs the tails again in C++ (batch statistics, running statistics advanced once, in
    forward), keeping only ``w`` and the inputs, as ``_Recomputed`` does; None where it does not
    apply (no compiled op, a backend other than the compiled ones, no autograd, under
    ``torch.compile``, autocast, mixed dtypes, BNs in different modes), for the caller to take
    the Python path."""
    if _LIGHT_SUM is None or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    if torch.is_autocast_enabled(w.device.type) or _backend.resolve(backend, w.device) not in FUSED_BACKENDS:
        return None
    if any(h.dtype != w.dtype or h.dim() != 4 for h in inputs):
        return None
    spec, floats, means, variances, counters, modes = [], [], [], [], [], set()
    for s, f, bn in tails:
        spec += s
        floats += f
        if bn is not None:
            means.append(bn.running_mean)
            variances.append(bn.running_var)
            counters.append(bn.num_batches_tracked)
            modes.add(bn.training)
    if len(modes) > 1:
        return None
    return _LIGHT_SUM(w, inputs, means, variances, counters, spec, floats, modes.pop() if modes else True)


def recompute(run, module: nn.Module, *inputs: Tensor) -> Tensor:
    """``run(*inputs)``, where ``run`` uses the parameters and BNs of ``module``, keeping only
    ``inputs`` for backward and running it again there (``_Recomputed``); without autograd, or
    under ``torch.compile``, just ``run(*inputs)``."""
    if not torch.is_grad_enabled():
        return run(*inputs)
    bns = []
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            raise ValueError(f"recompute: {type(m).__name__} in {type(module).__name__} would draw other values in backward")
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            bns.append(m)
    return recomputed(run, bns, len(inputs), *inputs, *module.parameters())


def channels_last_on_cpu(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` for a pooling module, run channels-last on a CPU, where 3x3 max pooling is
    10-80x and average pooling 5-15x faster than in NCHW (bench/RESULTS.md); the same values
    (up to the order of a window's sum), for two layout copies. Used where the pool is
    recomputed in backward, so the channels-last copy is never kept (plain stays the DARTS
    reference)."""
    if x.device.type != "cpu":
        return module(x)
    return module(x.contiguous(memory_format=torch.channels_last)).contiguous()
