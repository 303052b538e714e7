"""Family 1: the fused masked mixed operation (docs/DESIGN.md sections 1 and 9).

    out = sum_k w_k * y_k                  one pass over the K candidate outputs
    grad_y_k = w_k * grad_out              grad_w_k = <grad_out, y_k>  (deterministic)

plus the weights around it: the masked softmax p_k = m_k exp(a_k / tau) / sum_j m_j exp(a_j / tau)
and the Gumbel-softmax of GDAS built on it. A masked candidate is simply not among the outputs:
nothing is ever read for it.

Layout of this file, top to bottom: Triton kernels and launchers, the reference backward
formulas, the two ops (``toponas::mixed_sum`` and ``toponas::masked_softmax``, each with its
backward op, defined once through ``_define.define_op``), and the public functions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import backend as _backend
from . import reference as _ref
from ._common import (
    FUSED_BACKENDS,
    HAS_TRITON,
    as_tensor_list,
    block_size,
    check_like,
    check_same,
    check_tensor,
    empty_contiguous,
    empty_grads,
    fast_path,
    tl,
    triton,
)
from ._define import Kernels, define_op

# How many candidate pointers one Triton launch takes; larger K runs in chunks of this size.
_CHUNK = 8
# Programs of the backward, each striding over tiles (several waves of SMs on an H100): the
# per-candidate reductions happen once per program, not once per tile.
_MAX_BWD_PROGRAMS = 1024

# ============================================================================ Triton kernels
if HAS_TRITON:

    @triton.jit
    def _load_term(w_ptr, k, y_ptr, offs, mask, ACC: tl.constexpr):
        w = tl.load(w_ptr + k).to(ACC)
        return w * tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC)

    @triton.jit
    def _mixed_sum_fwd_kernel(
        out_ptr, acc_ptr, w_ptr, y0, y1, y2, y3, y4, y5, y6, y7, n, k0,
        NUM: tl.constexpr, ACCUMULATE: tl.constexpr, FINAL: tl.constexpr,
        BLOCK: tl.constexpr, ACC: tl.constexpr,
    ):
        # One pass: read NUM candidate outputs once, write the weighted sum once. With K > 8 the
        # running sum lives in acc_ptr (accumulation dtype) between chunks.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        if ACCUMULATE:
            acc = tl.load(acc_ptr + offs, mask=m, other=0.0).to(ACC)
        else:
            acc = tl.zeros([BLOCK], dtype=ACC)
        acc += _load_term(w_ptr, k0, y0, offs, m, ACC)
        if NUM > 1:
            acc += _load_term(w_ptr, k0 + 1, y1, offs, m, ACC)
        if NUM > 2:
            acc += _load_term(w_ptr, k0 + 2, y2, offs, m, ACC)
        if NUM > 3:
            acc += _load_term(w_ptr, k0 + 3, y3, offs, m, ACC)
        if NUM > 4:
            acc += _load_term(w_ptr, k0 + 4, y4, offs, m, ACC)
        if NUM > 5:
            acc += _load_term(w_ptr, k0 + 5, y5, offs, m, ACC)
        if NUM > 6:
            acc += _load_term(w_ptr, k0 + 6, y6, offs, m, ACC)
        if NUM > 7:
            acc += _load_term(w_ptr, k0 + 7, y7, offs, m, ACC)
        if FINAL:
            tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=m)
        else:
            tl.store(acc_ptr + offs, acc, mask=m)

    @triton.jit
    def _grad_one(g, w_ptr, k, y_ptr, gy_ptr, offs, mask, ACC: tl.constexpr):
        # y is loaded before grad_y is stored, so the loads of all candidates can be in flight.
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC)
        w = tl.load(w_ptr + k).to(ACC)
        tl.store(gy_ptr + offs, (w * g).to(gy_ptr.dtype.element_ty), mask=mask)
        return g * y

    @triton.jit
    def _mixed_sum_bwd_kernel(
        g_ptr, w_ptr, part_ptr, n, nprog, k0,
        y0, y1, y2, y3, y4, y5, y6, y7, gy0, gy1, gy2, gy3, gy4, gy5, gy6, gy7,
        NUM: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
    ):
        # A program strides over the tiles pid, pid + nprog, ...; grad_out is read once per tile
        # and chunk. The products g * y_k are accumulated elementwise across its tiles and
        # reduced once at the end: one partial <g, y_k> per k in part[k, pid], summed afterwards
        # in a fixed order (deterministic, no atomics).
        pid = tl.program_id(0).to(tl.int64)
        d0 = tl.zeros([BLOCK], ACC)
        d1 = tl.zeros([BLOCK], ACC)
        d2 = tl.zeros([BLOCK], ACC)
        d3 = tl.zeros([BLOCK], ACC)
        d4 = tl.zeros([BLOCK], ACC)
        d5 = tl.zeros([BLOCK], ACC)
        d6 = tl.zeros([BLOCK], ACC)
        d7 = tl.zeros([BLOCK], ACC)
        for start in range(pid * BLOCK, n, nprog * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < n
            g = tl.load(g_ptr + offs, mask=m, other=0.0).to(ACC)
            d0 += _grad_one(g, w_ptr, k0, y0, gy0, offs, m, ACC)
            if NUM > 1:
                d1 += _grad_one(g, w_ptr, k0 + 1, y1, gy1, offs, m, ACC)
            if NUM > 2:
                d2 += _grad_one(g, w_ptr, k0 + 2, y2, gy2, offs, m, ACC)
            if NUM > 3:
                d3 += _grad_one(g, w_ptr, k0 + 3, y3, gy3, offs, m, ACC)
            if NUM > 4:
                d4 += _grad_one(g, w_ptr, k0 + 4, y4, gy4, offs, m, ACC)
            if NUM > 5:
                d5 += _grad_one(g, w_ptr, k0 + 5, y5, gy5, offs, m, ACC)
            if NUM > 6:
                d6 += _grad_one(g, w_ptr, k0 + 6, y6, gy6, offs, m, ACC)
            if NUM > 7:
                d7 += _grad_one(g, w_ptr, k0 + 7, y7, gy7, offs, m, ACC)
        base = part_ptr + k0 * nprog + pid
        tl.store(base, tl.sum(d0, axis=0))
        if NUM > 1:
            tl.store(base + nprog, tl.sum(d1, axis=0))
        if NUM > 2:
            tl.store(base + 2 * nprog, tl.sum(d2, axis=0))
        if NUM > 3:
            tl.store(base + 3 * nprog, tl.sum(d3, axis=0))
        if NUM > 4:
            tl.store(base + 4 * nprog, tl.sum(d4, axis=0))
        if NUM > 5:
            tl.store(base + 5 * nprog, tl.sum(d5, axis=0))
        if NUM > 6:
            tl.store(base + 6 * nprog, tl.sum(d6, axis=0))
        if NUM > 7:
            tl.store(base + 7 * nprog, tl.sum(d7, axis=0))

    @triton.jit
    def _masked_softmax_fwd_kernel(x_ptr, m_ptr, p_ptr, K, inv_tau, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
        # One row per program: only the active entries are read.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_K)
        active = (cols < K) & (tl.load(m_ptr + row * K + cols, mask=cols < K, other=0) != 0)
        x = tl.load(x_ptr + row * K + cols, mask=active, other=0.0).to(ACC) * inv_tau
        x = tl.where(active, x, -float("inf"))
        # A row with no active entry (max -inf, shifted by 0 instead) has e = 0 everywhere: it
        # stays 0, not the NaN of -inf - -inf or 0 / 0, as in C++/CUDA.
        mx = tl.max(x, axis=0)
        e = tl.where(active, tl.exp(x - tl.where(mx > -float("inf"), mx, 0.0)), 0.0)
        total = tl.sum(e, axis=0)
        p = e / tl.where(total > 0, total, 1.0)
        tl.store(p_ptr + row * K + cols, p.to(p_ptr.dtype.element_ty), mask=cols < K)

    @triton.jit
    def _masked_softmax_bwd_kernel(g_ptr, p_ptr, gx_ptr, K, inv_tau, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
        # d logits = p * (g - <g, p>) / tau; masked entries have p = 0, hence gradient 0.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_K)
        inb = cols < K
        p = tl.load(p_ptr + row * K + cols, mask=inb, other=0.0).to(ACC)
        g = tl.load(g_ptr + row * K + cols, mask=inb, other=0.0).to(ACC)
        gx = p * (g - tl.sum(g * p, axis=0)) * inv_tau
        tl.store(gx_ptr + row * K + cols, gx.to(gx_ptr.dtype.element_ty), mask=inb)


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _padded(tensors: list[Tensor], start: int) -> tuple[list[Tensor], int]:
    """Up to _CHUNK tensors from ``start``, padded with the first (unused slots are never read)."""
    chunk = tensors[start : start + _CHUNK]
    return chunk + [chunk[0]] * (_CHUNK - len(chunk)), len(chunk)


def _mixed_sum_triton(outputs: list[Tensor], weights: Tensor) -> Tensor:
    ys = [y.contiguous() for y in outputs]
    weights = weights.contiguous()  # the kernels read weights[k] at w_ptr + k
    out = torch.empty_like(ys[0])
    n, k_total = out.numel(), len(ys)
    if n == 0:
        return out
    block = block_size(n, 1024)
    grid = (triton.cdiv(n, block),)
    acc_dtype = _ref.acc_dtype(out.dtype)
    # The running sum between chunks (K > 8 only) is kept in the accumulation dtype.
    scratch = out if k_total <= _CHUNK else torch.empty(n, dtype=acc_dtype, device=out.device)
    for start in range(0, k_total, _CHUNK):
        chunk, num = _padded(ys, start)
        _mixed_sum_fwd_kernel[grid](
            out, scratch, weights, *chunk, n, start,
            NUM=num, ACCUMULATE=start > 0, FINAL=start + num == k_total,
            BLOCK=block, ACC=_tl_acc(out.dtype),
        )
    return out


def _mixed_sum_backward_triton(grad: Tensor, outputs: list[Tensor], weights: Tensor) -> list[Tensor]:
    g = grad.contiguous()
    ys = [y.contiguous() for y in outputs]
    weights = weights.contiguous()
    gys = [torch.empty_like(y) for y in ys]
    n, k_total = g.numel(), len(ys)
    if n == 0:
        return gys + [torch.zeros_like(weights)]
    block = block_size(n, 1024)
    nprog = min(triton.cdiv(n, block), _MAX_BWD_PROGRAMS)
    parts = torch.empty(k_total, nprog, dtype=_ref.acc_dtype(g.dtype), device=g.device)
    for start in range(0, k_total, _CHUNK):
        chunk, num = _padded(ys, start)
        gchunk, _ = _padded(gys, start)
        _mixed_sum_bwd_kernel[(nprog,)](
            g, weights, parts, n, nprog, start, *chunk, *gchunk,
            NUM=num, BLOCK=block, ACC=_tl_acc(g.dtype),
        )
    return gys + [parts.sum(dim=1).to(weights.dtype)]


def _masked_softmax_triton(logits: Tensor, mask: Tensor, tau: float) -> Tensor:
    x = logits.contiguous()
    p = torch.empty_like(x)
    k = x.shape[-1]
    rows = x.numel() // max(k, 1)
    if x.numel() == 0:
        return p
    m = mask.contiguous().view(torch.uint8)
    _masked_softmax_fwd_kernel[(rows,)](
        x, m, p, k, 1.0 / tau, BLOCK_K=triton.next_power_of_2(k), ACC=_tl_acc(x.dtype)
    )
    return p


def _masked_softmax_backward_triton(grad: Tensor, probs: Tensor, tau: float) -> Tensor:
    g, p = grad.contiguous(), probs.contiguous()
    gx = torch.empty_like(p)
    k = p.shape[-1]
    if p.numel() == 0:
        return gx
    _masked_softmax_bwd_kernel[(p.numel() // k,)](
        g, p, gx, k, 1.0 / tau, BLOCK_K=triton.next_power_of_2(k), ACC=_tl_acc(p.dtype)
    )
    return gx


# ============================================================================ eager backward formulas
# Inside a custom op autograd is off, so the reference backend spells its backward out.
def _mixed_sum_backward_ref(grad: Tensor, outputs: list[Tensor], weights: Tensor) -> list[Tensor]:
    acc = _ref.acc_dtype(grad.dtype)
    g = grad.to(acc)
    w = weights.to(acc)
    gys = [(w[k] * g).to(grad.dtype).contiguous() for k in range(len(outputs))]
    gw = torch.stack([(g * y.to(acc)).sum() for y in outputs]).to(weights.dtype)
    return gys + [gw]


def _masked_softmax_backward_ref(grad: Tensor, probs: Tensor, tau: float) -> Tensor:
    acc = _ref.acc_dtype(probs.dtype)
    g, p = grad.to(acc), probs.to(acc)
    return (p * (g - (g * p).sum(-1, keepdim=True)) / tau).to(probs.dtype).contiguous()


# ============================================================================ the ops
# Each op defined once (ops/_define.py): its body on every backend, its fake (shared with the
# compiled kernel op and the C++ fused op), its backward op, and what the backward saves.
def _mixed_sum_save(ctx, inputs, output):
    outputs, weights, backend = inputs
    ctx.save_for_backward(*outputs, weights)
    ctx.backend = backend


def _mixed_sum_gradients(ctx, backward, grad):
    *outputs, weights = ctx.saved_tensors
    grads = backward(grad, outputs, weights, ctx.backend)  # K output gradients, then the weights'
    return grads[:-1], grads[-1], None


_mixed_sum = define_op(
    "mixed_sum",
    "(Tensor[] outputs, Tensor weights, str backend) -> Tensor",
    # reference: contiguous, as the fake promises (eager keeps channels_last); the compiled
    # kernels make their inputs contiguous themselves
    Kernels(
        reference=lambda outputs, weights: _ref.mixed_sum_ref(outputs, weights).contiguous(),
        triton=_mixed_sum_triton,
        compiled="mixed_sum_kernel",
        fake=lambda outputs, weights: empty_contiguous(outputs[0]),
        fused="mixed_sum_fused",  # csrc/mixed_sum.cpp: its autograd node in C++
    ),
    backward=Kernels(
        reference=_mixed_sum_backward_ref,
        triton=_mixed_sum_backward_triton,
        compiled="mixed_sum_backward_kernel",
        fake=lambda grad, outputs, weights: empty_grads(outputs, weights),
    ),
    backward_schema="(Tensor grad, Tensor[] outputs, Tensor weights, str backend) -> Tensor[]",
    save=_mixed_sum_save,
    gradients=_mixed_sum_gradients,
)
_mixed_sum_fused = _mixed_sum.fused


def _masked_softmax_save(ctx, inputs, output):
    _, _, tau, backend = inputs
    ctx.save_for_backward(output)
    ctx.tau, ctx.backend = tau, backend


def _masked_softmax_gradients(ctx, backward, grad):
    (probs,) = ctx.saved_tensors
    return backward(grad, probs, ctx.tau, ctx.backend), None, None, None


# Besides the dispatch cost it spares, the eager path means that a process that never calls a
# custom op in eager mode never imports torch._dynamo (the custom-op wrapper does, about 70 MiB
# of resident memory).
_masked_softmax = define_op(
    "masked_softmax",
    "(Tensor logits, Tensor mask, float tau, str backend) -> Tensor",
    Kernels(
        reference=lambda logits, mask, tau: _ref.masked_softmax_ref(logits, mask, tau).contiguous(),
        triton=_masked_softmax_triton,
        compiled="masked_softmax_kernel",
        compiled_args=lambda logits, mask, tau: (logits.contiguous(), mask.contiguous(), tau),
        fake=lambda logits, mask, tau: empty_contiguous(logits),
    ),
    backward=Kernels(
        reference=_masked_softmax_backward_ref,
        triton=_masked_softmax_backward_triton,
        compiled="masked_softmax_backward_kernel",
        compiled_args=lambda grad, probs, tau: (grad.contiguous(), probs.contiguous(), tau),
        fake=lambda grad, probs, tau: empty_contiguous(probs),
    ),
    backward_schema="(Tensor grad, Tensor probs, float tau, str backend) -> Tensor",
    save=_masked_softmax_save,
    gradients=_masked_softmax_gradients,
)


# ============================================================================ public functions
def mixed_sum(outputs, weights: Tensor, *, backend: str | None = None) -> Tensor:
    """``sum_k weights[k] * outputs[k]`` in one pass, differentiable in both arguments.

    Args:
        outputs: K same-shaped tensors, or one stacked ``[K, ...]`` tensor. Only the candidates
            that run belong here: a masked candidate is left out, with its weight.
        weights: ``[K]`` tensor of the same dtype and device.
        backend: ``"reference"``, ``"triton"``, ``"cpp"``, ``"cuda"`` or None/``"auto"``.
    """
    if _mixed_sum_fused is not None and type(outputs) is list and outputs and isinstance(outputs[0], Tensor):
        # The hot path (a search step calls this once per edge): the C++ op checks its
        # arguments itself, so the Python checks below run only to name what is wrong.
        if _backend.resolve(backend, outputs[0].device) in FUSED_BACKENDS and fast_path():
            try:
                return _mixed_sum_fused(outputs, weights)
            except (RuntimeError, TypeError):
                pass
    ys = as_tensor_list("outputs", outputs)
    first = check_same("outputs", ys)
    check_tensor("weights", weights, dim=1)
    if weights.shape[0] != len(ys):
        raise ValueError(f"weights has {weights.shape[0]} entries but there are {len(ys)} outputs; one weight per output")
    check_like("weights", weights, "outputs[0]", first, shape=False)
    return _mixed_sum(ys, weights, _backend.resolve(backend, first.device))


def _check_mask(mask, logits: Tensor) -> Tensor:
    if mask is None:
        return torch.ones_like(logits, dtype=torch.bool)
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool, got {mask.dtype}")
    if mask.device != logits.device:
        raise ValueError(f"mask is on {mask.device} but logits is on {logits.device}")
    if mask.shape != logits.shape:
        try:
            mask = mask.expand(logits.shape)
        except RuntimeError:
            raise ValueError(
                f"mask has shape {tuple(mask.shape)}, not broadcastable to logits {tuple(logits.shape)}"
            ) from None
    # Whether every row keeps a candidate is NOT checked here: that would read the mask back
    # from the device on every call (a sync per search step). Masks are checked once where they
    # are set (the supernets' set_masks, FusedMixedOp); a row with none active is all zeros.
    return mask


def _check_logits(logits, tau: float) -> Tensor:
    check_tensor("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits needs a non-empty last dim (the K candidates), got shape {tuple(logits.shape)}")
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a positive finite number, got {tau!r}")
    return logits


def masked_softmax(logits: Tensor, mask: Tensor | None = None, *, tau: float = 1.0, backend: str | None = None) -> Tensor:
    """Softmax of ``logits / tau`` over the last dim, restricted to ``mask`` (masked entries are
    exactly 0, get zero gradient and take no part in the normalisation).

    A row whose entries are all masked is all zeros with zero gradient, on every backend: the
    weights of an edge with no candidate, whose mixed sum is then 0, never NaN that would spread
    through the search's gradients. (The search networks refuse such a mask where it is set; the
    kernels do not check it per call, which would read the mask back from the device.)"""
    _check_logits(logits, tau)
    mask = _check_mask(mask, logits)
    return _masked_softmax(logits, mask, float(tau), _backend.resolve(backend, logits.device))


def gumbel_softmax(
    logits: Tensor,
    mask: Tensor | None = None,
    *,
    tau: float = 1.0,
    hard: bool = True,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> Tensor:
    """GDAS weights: ``softmax((log_softmax(logits) + g) / tau)`` with g = -log(Exponential(1))
    noise, restricted to ``mask``; ``hard`` returns the one-hot of the argmax with the
    straight-through gradient ``one_hot - probs.detach() + probs``. (log_softmax only shifts a
    row by a constant, so it is left out.) The exponential draws are clamped to the finite
    positive range of the dtype, so the noise is always finite (no check, no device sync). A row
    with every entry masked is all zeros, soft or hard, as in ``masked_softmax``."""
    _check_logits(logits, tau)
    mask = _check_mask(mask, logits)
    resolved = _backend.resolve(backend, logits.device)
    info = torch.finfo(logits.dtype)
    draws = torch.empty_like(logits).exponential_(generator=generator).clamp_(info.tiny, info.max)
    probs = _masked_softmax(logits - draws.log(), mask, float(tau), resolved)
    if not hard:
        return probs
    one_hot = torch.zeros_like(probs).scatter_(-1, probs.argmax(-1, keepdim=True), 1.0)
    one_hot = one_hot.masked_fill_(~mask, 0.0)  # only a row with none active changes: it stays 0
    return one_hot - probs.detach() + probs
