"""Family 2: fused kernel-normalize-and-merge (docs/DESIGN.md sections 5, 6 and 9).

    merged = sum_i w_i * embed(K_hat_i)          K_hat_i = (K_i - mean) / (std + eps)

from K candidate conv kernels ``[O, I, k_i, k_i]`` of odd sizes k_i and dilations d_i into one
``[O, I, kmax, kmax]`` kernel, kmax = max_i (k_i - 1) d_i + 1, each candidate centred with its
taps d_i apart. The statistics are per output channel (``"channel"``), over the whole candidate
(``"tensor"``) or absent (``"none"``); std is the population std.

Backward, with G_i = crop_i(grad_merged) (the gradient at candidate i's embedded taps), n the
number of elements a statistic runs over, m and s its mean and std:

    grad_K_i = w_i * [ (G_i - mean(G_i)) / (s + eps) - sum(G_i (K_i - m)) / (s + eps)^2 * (K_i - m) / (n s) ]
    grad_w_i = <G_i, K_hat_i> = sum(G_i (K_i - m)) / (s + eps)

When s == 0 (a constant channel) the derivative of s does not exist; the second term is then
taken as 0 (the eager reference differentiated by autograd gives NaN there).

Memory: the autograd node saves only the inputs (kernels and weights) and the backward
recomputes the statistics. The normalized kernels and the merged kernel are never saved: the
TopoNAS search calls this for every edge of every cell, and saved merged kernels would cost
hundreds of MB.

Launch structure (Triton and CUDA alike), one program (CUDA block) per output channel:

* ``"channel"`` / ``"none"`` forward: ONE launch. Each program computes the statistics of its
  channel for every candidate (a mean pass and a centred pass over the I*k*k elements), then
  writes its I*kmax*kmax outputs once, gathering every candidate's taps.
* ``"tensor"`` forward: a stats launch writes per-(candidate, channel) mean and centred sum of
  squares, then the merge launch, in which every program combines the O channel stats of each
  candidate in the same fixed order (Chan's parallel formula), so all programs agree.
* backward: ``"channel"``/``"none"`` one launch (per candidate: mean pass, one pass for the
  centred sum of squares, sum G and sum G (K - m), then the write pass); ``"tensor"`` a stats
  launch (also summing G and G (K - m) per channel) and the gradient launch.
* The weight gradient: each program writes its partial <G_i, K_hat_i> to ``part[i, o]``; the
  [K, O] partials are then summed over o in a fixed order (deterministic, no atomics).
* One Triton launch handles up to 4 candidates (pointer slots with constexpr size, dilation and
  offset, so the tap gathers compile to constant arithmetic); more candidates run in chunks of 4,
  the forward keeping its running sum in the accumulation dtype between chunks.

Precision: accumulation in float32 (float64 for float64 inputs). On the GPU Triton passes the
Python float ``eps`` as a 32-bit scalar, so a float64 Triton result sees eps rounded to float32
(a relative difference of about 1e-13 for eps = 1e-5); the C++, CUDA and reference backends use
it in double.

Layout of this file, top to bottom: Triton kernels and launchers, the reference backward
formula, the op ``toponas::merge_kernels`` with its backward op (defined once through
``_define.define_op``), the fakes of the merged conv group's compiled ops (csrc/merged_conv.cpp)
and the public functions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import backend as _backend
from . import reference as _ref
from ._common import (
    HAS_TRITON,
    as_tensor_list,
    block_size,
    check_like,
    check_tensor,
    empty_contiguous,
    empty_grads,
    register_kernel_fake,
    tl,
    triton,
)
from ._define import Kernels, define_op

# Integer codes of the normalization modes, as the compiled kernels take them.
MODE_CODES = {"none": 0, "channel": 1, "tensor": 2}

# Candidate pointer slots per Triton launch; larger K runs in chunks of this size.
_SLOTS = 4

# ============================================================================ Triton kernels
if HAS_TRITON:

    @triton.jit
    def _grad_taps(g_ptr, gbase, e, m, KS: tl.constexpr, DIL: tl.constexpr, ST: tl.constexpr, KMAX: tl.constexpr, ACC: tl.constexpr):
        # grad_merged at the embedded positions of candidate elements e = (i, a, b) (flat, i-major).
        i = e // (KS * KS)
        a = (e // KS) % KS
        b = e % KS
        src = i * (KMAX * KMAX) + (ST + a * DIL) * KMAX + (ST + b * DIL)
        return tl.load(g_ptr + gbase + src, mask=m, other=0.0).to(ACC)

    @triton.jit
    def _channel_sums(
        x_ptr, g_ptr, o, I, GRAD: tl.constexpr, CENTER: tl.constexpr,
        KS: tl.constexpr, DIL: tl.constexpr, ST: tl.constexpr, KMAX: tl.constexpr,
        BLOCK: tl.constexpr, ACC: tl.constexpr,
    ):
        """Over the n = I*KS*KS elements of output channel o of one candidate: the mean, the
        centred sum of squares M2 and (GRAD) sum G and sum G (x - mean), G the gathered
        gradient. Without CENTER the mean is taken as 0 (mode "none")."""
        n = I * (KS * KS)
        xbase = o * n
        gbase = o * I * (KMAX * KMAX)
        offs = tl.arange(0, BLOCK)
        mean = tl.sum(tl.zeros([BLOCK], ACC), axis=0)
        if CENTER:
            acc = tl.zeros([BLOCK], ACC)
            for s in range(0, n, BLOCK):
                e = s + offs
                acc += tl.load(x_ptr + xbase + e, mask=e < n, other=0.0).to(ACC)
            mean = tl.sum(acc, axis=0) / n
        m2 = tl.zeros([BLOCK], ACC)
        sg = tl.zeros([BLOCK], ACC)
        sgx = tl.zeros([BLOCK], ACC)
        for s in range(0, n, BLOCK):
            e = s + offs
            m = e < n
            d = tl.where(m, tl.load(x_ptr + xbase + e, mask=m, other=0.0).to(ACC) - mean, 0.0)
            if CENTER:
                m2 += d * d
            if GRAD:
                g = _grad_taps(g_ptr, gbase, e, m, KS, DIL, ST, KMAX, ACC)
                sg += g
                sgx += g * d
        return mean, tl.sum(m2, axis=0), tl.sum(sg, axis=0), tl.sum(sgx, axis=0)

    @triton.jit
    def _tensor_stats(stats_ptr, j, O, n_c, GRAD: tl.constexpr, BLOCK_O: tl.constexpr, ACC: tl.constexpr):
        """Whole-candidate statistics from the per-channel rows stats[j, c] = (mean_c, M2_c,
        sum G_c, sum G_c (x - mean_c)), combined over c in a fixed order: every program gets
        the same numbers. Returns mean, population std, sum G, sum G (x - mean)."""
        offs = tl.arange(0, BLOCK_O)
        base = j * O * 4
        acc = tl.zeros([BLOCK_O], ACC)
        for s in range(0, O, BLOCK_O):
            c = s + offs
            acc += tl.load(stats_ptr + base + c * 4, mask=c < O, other=0.0)
        mean = tl.sum(acc, axis=0) / O
        m2 = tl.zeros([BLOCK_O], ACC)
        sg = tl.zeros([BLOCK_O], ACC)
        sgx = tl.zeros([BLOCK_O], ACC)
        for s in range(0, O, BLOCK_O):
            c = s + offs
            m = c < O
            dm = tl.where(m, tl.load(stats_ptr + base + c * 4, mask=m, other=0.0) - mean, 0.0)
            m2 += tl.load(stats_ptr + base + c * 4 + 1, mask=m, other=0.0) + n_c * dm * dm
            if GRAD:
                g = tl.load(stats_ptr + base + c * 4 + 2, mask=m, other=0.0)
                sg += g
                sgx += tl.load(stats_ptr + base + c * 4 + 3, mask=m, other=0.0) + dm * g
        # Divisions one count at a time: O * n_c could overflow int32, and I or O may arrive
        # as a constexpr 1 (Triton specializes ints equal to 1), so no .to() on them.
        std = tl.sqrt(tl.sum(m2, axis=0) / n_c / O)
        return mean, std, tl.sum(sg, axis=0), tl.sum(sgx, axis=0)

    @triton.jit
    def _merge_stats_kernel(
        stats_ptr, g_ptr, x0, x1, x2, x3, I, O, k0,
        NUM: tl.constexpr, GRAD: tl.constexpr, KMAX: tl.constexpr,
        KS0: tl.constexpr, DIL0: tl.constexpr, ST0: tl.constexpr,
        KS1: tl.constexpr, DIL1: tl.constexpr, ST1: tl.constexpr,
        KS2: tl.constexpr, DIL2: tl.constexpr, ST2: tl.constexpr,
        KS3: tl.constexpr, DIL3: tl.constexpr, ST3: tl.constexpr,
        BLOCK: tl.constexpr, ACC: tl.constexpr,
    ):
        # "tensor" mode, first pass: per (candidate, channel) stats rows, [K, O, 4].
        o = tl.program_id(0).to(tl.int64)
        field = tl.arange(0, 4)
        mean, m2, sg, sgx = _channel_sums(x0, g_ptr, o, I, GRAD, True, KS0, DIL0, ST0, KMAX, BLOCK, ACC)
        row = stats_ptr + ((k0 + 0) * O + o) * 4
        tl.store(row + field, tl.where(field == 0, mean, tl.where(field == 1, m2, tl.where(field == 2, sg, sgx))))
        if NUM > 1:
            mean, m2, sg, sgx = _channel_sums(x1, g_ptr, o, I, GRAD, True, KS1, DIL1, ST1, KMAX, BLOCK, ACC)
            row = stats_ptr + ((k0 + 1) * O + o) * 4
            tl.store(row + field, tl.where(field == 0, mean, tl.where(field == 1, m2, tl.where(field == 2, sg, sgx))))
        if NUM > 2:
            mean, m2, sg, sgx = _channel_sums(x2, g_ptr, o, I, GRAD, True, KS2, DIL2, ST2, KMAX, BLOCK, ACC)
            row = stats_ptr + ((k0 + 2) * O + o) * 4
            tl.store(row + field, tl.where(field == 0, mean, tl.where(field == 1, m2, tl.where(field == 2, sg, sgx))))
        if NUM > 3:
            mean, m2, sg, sgx = _channel_sums(x3, g_ptr, o, I, GRAD, True, KS3, DIL3, ST3, KMAX, BLOCK, ACC)
            row = stats_ptr + ((k0 + 3) * O + o) * 4
            tl.store(row + field, tl.where(field == 0, mean, tl.where(field == 1, m2, tl.where(field == 2, sg, sgx))))

    @triton.jit
    def _slot_norm(
        x_ptr, stats_ptr, w_ptr, j, o, I, O, eps, MODE: tl.constexpr,
        KS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_O: tl.constexpr, ACC: tl.constexpr,
    ):
        """(mean, w * scale) of candidate j for output channel o: K_hat = (K - mean) * scale."""
        w = tl.load(w_ptr + j).to(ACC)
        if MODE == 1:
            mean, m2, _sg, _sgx = _channel_sums(x_ptr, x_ptr, o, I, False, True, KS, 1, 0, KS, BLOCK, ACC)
            n = I * (KS * KS)
            coef = w / (tl.sqrt(m2 / n) + eps)
        elif MODE == 2:
            mean, std, _sg, _sgx = _tensor_stats(stats_ptr, j, O, I * (KS * KS), False, BLOCK_O, ACC)
            coef = w / (std + eps)
        else:
            mean = w * 0.0
            coef = w
        return mean, coef

    @triton.jit
    def _slot_term(
        x_ptr, o, I, i, r, c, inb, mean, coef,
        KS: tl.constexpr, DIL: tl.constexpr, ST: tl.constexpr, ACC: tl.constexpr,
    ):
        # w * K_hat at merged positions (i, r, c); 0 where candidate has no tap there.
        rr = r - ST
        cc = c - ST
        SPAN: tl.constexpr = (KS - 1) * DIL + 1
        ok = inb & (rr >= 0) & (rr < SPAN) & (cc >= 0) & (cc < SPAN)
        if DIL > 1:
            ok = ok & (rr % DIL == 0) & (cc % DIL == 0)
        src = tl.where(ok, i * (KS * KS) + (rr // DIL) * KS + cc // DIL, 0)
        x = tl.load(x_ptr + o * I * (KS * KS) + src, mask=ok, other=0.0).to(ACC)
        return tl.where(ok, (x - mean) * coef, 0.0)

    @triton.jit
    def _merge_fwd_kernel(
        out_ptr, acc_ptr, w_ptr, stats_ptr, x0, x1, x2, x3, I, O, k0, eps,
        NUM: tl.constexpr, MODE: tl.constexpr, ACCUMULATE: tl.constexpr, FINAL: tl.constexpr,
        KMAX: tl.constexpr,
        KS0: tl.constexpr, DIL0: tl.constexpr, ST0: tl.constexpr,
        KS1: tl.constexpr, DIL1: tl.constexpr, ST1: tl.constexpr,
        KS2: tl.constexpr, DIL2: tl.constexpr, ST2: tl.constexpr,
        KS3: tl.constexpr, DIL3: tl.constexpr, ST3: tl.constexpr,
        BLOCK: tl.constexpr, BLOCK_O: tl.constexpr, ACC: tl.constexpr,
    ):
        # One program per output channel: statistics of every candidate, then the channel's
        # I*KMAX*KMAX merged taps written once. Unused slots (NUM < 4) are never touched.
        o = tl.program_id(0).to(tl.int64)
        mean0, coef0 = _slot_norm(x0, stats_ptr, w_ptr, k0, o, I, O, eps, MODE, KS0, BLOCK, BLOCK_O, ACC)
        mean1, coef1 = mean0, coef0
        mean2, coef2 = mean0, coef0
        mean3, coef3 = mean0, coef0
        if NUM > 1:
            mean1, coef1 = _slot_norm(x1, stats_ptr, w_ptr, k0 + 1, o, I, O, eps, MODE, KS1, BLOCK, BLOCK_O, ACC)
        if NUM > 2:
            mean2, coef2 = _slot_norm(x2, stats_ptr, w_ptr, k0 + 2, o, I, O, eps, MODE, KS2, BLOCK, BLOCK_O, ACC)
        if NUM > 3:
            mean3, coef3 = _slot_norm(x3, stats_ptr, w_ptr, k0 + 3, o, I, O, eps, MODE, KS3, BLOCK, BLOCK_O, ACC)
        KM2: tl.constexpr = KMAX * KMAX
        n_out = I * KM2
        obase = o * n_out
        offs = tl.arange(0, BLOCK)
        for s in range(0, n_out, BLOCK):
            idx = s + offs
            inb = idx < n_out
            i = idx // KM2
            t = idx % KM2
            r = t // KMAX
            c = t % KMAX
            if ACCUMULATE:
                acc = tl.load(acc_ptr + obase + idx, mask=inb, other=0.0).to(ACC)
            else:
                acc = tl.zeros([BLOCK], ACC)
            acc += _slot_term(x0, o, I, i, r, c, inb, mean0, coef0, KS0, DIL0, ST0, ACC)
            if NUM > 1:
                acc += _slot_term(x1, o, I, i, r, c, inb, mean1, coef1, KS1, DIL1, ST1, ACC)
            if NUM > 2:
                acc += _slot_term(x2, o, I, i, r, c, inb, mean2, coef2, KS2, DIL2, ST2, ACC)
            if NUM > 3:
                acc += _slot_term(x3, o, I, i, r, c, inb, mean3, coef3, KS3, DIL3, ST3, ACC)
            if FINAL:
                tl.store(out_ptr + obase + idx, acc.to(out_ptr.dtype.element_ty), mask=inb)
            else:
                tl.store(acc_ptr + obase + idx, acc, mask=inb)

    @triton.jit
    def _bwd_slot(
        g_ptr, w_ptr, stats_ptr, part_ptr, x_ptr, dx_ptr, j, o, I, O, eps,
        MODE: tl.constexpr, KMAX: tl.constexpr,
        KS: tl.constexpr, DIL: tl.constexpr, ST: tl.constexpr,
        BLOCK: tl.constexpr, BLOCK_O: tl.constexpr, ACC: tl.constexpr,
    ):
        # Gradient of candidate j, output channel o; its partial weight gradient to part[j, o].
        n = I * (KS * KS)
        w = tl.load(w_ptr + j).to(ACC)
        if MODE == 2:
            row = stats_ptr + (j * O + o) * 4
            mean_c = tl.load(row)
            sg_c = tl.load(row + 2)
            sgx_c = tl.load(row + 3)
            mean, std, sg, sgx = _tensor_stats(stats_ptr, j, O, n, True, BLOCK_O, ACC)
            groups = O  # the statistics run over cnt = n * O elements
            inv = 1.0 / (std + eps)
            part = (sgx_c + (mean_c - mean) * sg_c) * inv
        else:
            mean, m2, sg, sgx = _channel_sums(x_ptr, g_ptr, o, I, True, MODE == 1, KS, DIL, ST, KMAX, BLOCK, ACC)
            groups = 1  # cnt = n
            if MODE == 1:
                std = tl.sqrt(m2 / n)
                inv = 1.0 / (std + eps)
            else:
                std = w * 0.0
                inv = w * 0.0 + 1.0
            part = sgx * inv
        tl.store(part_ptr + j * O + o, part)
        if MODE == 0:
            c1 = w * 0.0
            c2 = w * 0.0
        else:
            c1 = sg / n / groups
            # d std / d x = (x - mean) / (cnt std): undefined at std == 0, taken as 0 there.
            c2 = tl.where(std > 0, sgx * inv * inv / tl.where(std > 0, std, 1.0) / n / groups, 0.0)
        xbase = o * n
        gbase = o * I * (KMAX * KMAX)
        offs = tl.arange(0, BLOCK)
        for s in range(0, n, BLOCK):
            e = s + offs
            m = e < n
            d = tl.load(x_ptr + xbase + e, mask=m, other=0.0).to(ACC) - mean
            g = _grad_taps(g_ptr, gbase, e, m, KS, DIL, ST, KMAX, ACC)
            dx = w * ((g - c1) * inv - c2 * d)
            tl.store(dx_ptr + xbase + e, dx.to(dx_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _merge_bwd_kernel(
        g_ptr, w_ptr, stats_ptr, part_ptr, x0, x1, x2, x3, dx0, dx1, dx2, dx3, I, O, k0, eps,
        NUM: tl.constexpr, MODE: tl.constexpr, KMAX: tl.constexpr,
        KS0: tl.constexpr, DIL0: tl.constexpr, ST0: tl.constexpr,
        KS1: tl.constexpr, DIL1: tl.constexpr, ST1: tl.constexpr,
        KS2: tl.constexpr, DIL2: tl.constexpr, ST2: tl.constexpr,
        KS3: tl.constexpr, DIL3: tl.constexpr, ST3: tl.constexpr,
        BLOCK: tl.constexpr, BLOCK_O: tl.constexpr, ACC: tl.constexpr,
    ):
        o = tl.program_id(0).to(tl.int64)
        _bwd_slot(g_ptr, w_ptr, stats_ptr, part_ptr, x0, dx0, k0, o, I, O, eps, MODE, KMAX, KS0, DIL0, ST0, BLOCK, BLOCK_O, ACC)
        if NUM > 1:
            _bwd_slot(g_ptr, w_ptr, stats_ptr, part_ptr, x1, dx1, k0 + 1, o, I, O, eps, MODE, KMAX, KS1, DIL1, ST1, BLOCK, BLOCK_O, ACC)
        if NUM > 2:
            _bwd_slot(g_ptr, w_ptr, stats_ptr, part_ptr, x2, dx2, k0 + 2, o, I, O, eps, MODE, KMAX, KS2, DIL2, ST2, BLOCK, BLOCK_O, ACC)
        if NUM > 3:
            _bwd_slot(g_ptr, w_ptr, stats_ptr, part_ptr, x3, dx3, k0 + 3, o, I, O, eps, MODE, KMAX, KS3, DIL3, ST3, BLOCK, BLOCK_O, ACC)


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _geometry(kernels: list[Tensor], dilations: list[int]) -> tuple[int, list[int], list[int]]:
    """kmax, and per candidate its size and the offset of its first tap in the merged kernel."""
    sizes = [int(k.shape[-1]) for k in kernels]
    kmax = _ref.merged_size(sizes, dilations)
    starts = [(kmax - ((k - 1) * d + 1)) // 2 for k, d in zip(sizes, dilations)]
    return kmax, sizes, starts


def _slot_args(sizes, dilations, starts, start: int) -> tuple[dict, int]:
    """Constexpr size/dilation/offset of the (up to 4) candidates from ``start``; unused slots
    repeat the first (never read)."""
    idx = list(range(start, min(start + _SLOTS, len(sizes))))
    num = len(idx)
    idx += [idx[0]] * (_SLOTS - num)
    args = {}
    for s, k in enumerate(idx):
        args[f"KS{s}"], args[f"DIL{s}"], args[f"ST{s}"] = sizes[k], dilations[k], starts[k]
    return args, num


def _chunk(tensors: list[Tensor], start: int) -> list[Tensor]:
    chunk = tensors[start : start + _SLOTS]
    return chunk + [chunk[0]] * (_SLOTS - len(chunk))


def _blocks(O: int, n_out: int) -> tuple[int, int]:
    return block_size(n_out, 512), block_size(O, 256)


def _stats_triton(xs, grad, dilations, sizes, starts, kmax, I, O, acc_dtype, block, grad_needed):
    """The "tensor" mode first pass: [K, O, 4] rows (mean_c, M2_c, sum G_c, sum G_c (x - mean_c))."""
    stats = torch.empty(len(xs), O, 4, dtype=acc_dtype, device=xs[0].device)
    for start in range(0, len(xs), _SLOTS):
        slots, num = _slot_args(sizes, dilations, starts, start)
        _merge_stats_kernel[(O,)](
            stats, grad if grad_needed else stats, *_chunk(xs, start), I, O, start,
            NUM=num, GRAD=grad_needed, KMAX=kmax, BLOCK=block, ACC=_tl_acc(xs[0].dtype), **slots,
        )
    return stats


def _merge_triton(kernels: list[Tensor], weights: Tensor, dilations: list[int], normalize: str, eps: float) -> Tensor:
    xs = [k.contiguous() for k in kernels]
    w = weights.contiguous()
    O, I = xs[0].shape[:2]
    kmax, sizes, starts = _geometry(xs, dilations)
    out = torch.empty(O, I, kmax, kmax, dtype=xs[0].dtype, device=xs[0].device)
    if out.numel() == 0:
        return out
    mode = MODE_CODES[normalize]
    acc_dtype = _ref.acc_dtype(out.dtype)
    block, block_o = _blocks(O, I * kmax * kmax)
    stats = _stats_triton(xs, None, dilations, sizes, starts, kmax, I, O, acc_dtype, block, False) if mode == 2 else out
    k_total = len(xs)
    # The running sum between chunks (K > 4 only) is kept in the accumulation dtype.
    scratch = out if k_total <= _SLOTS else torch.empty(out.shape, dtype=acc_dtype, device=out.device)
    for start in range(0, k_total, _SLOTS):
        slots, num = _slot_args(sizes, dilations, starts, start)
        _merge_fwd_kernel[(O,)](
            out, scratch, w, stats, *_chunk(xs, start), I, O, start, eps,
            NUM=num, MODE=mode, ACCUMULATE=start > 0, FINAL=start + num == k_total, KMAX=kmax,
            BLOCK=block, BLOCK_O=block_o, ACC=_tl_acc(out.dtype), **slots,
        )
    return out


def _merge_backward_triton(
    grad: Tensor, kernels: list[Tensor], weights: Tensor, dilations: list[int], normalize: str, eps: float
) -> list[Tensor]:
    g = grad.contiguous()
    xs = [k.contiguous() for k in kernels]
    w = weights.contiguous()
    dxs = [torch.empty_like(x) for x in xs]
    O, I = xs[0].shape[:2]
    kmax, sizes, starts = _geometry(xs, dilations)
    if g.numel() == 0:
        return [dx.zero_() for dx in dxs] + [torch.zeros_like(w)]
    mode = MODE_CODES[normalize]
    acc_dtype = _ref.acc_dtype(g.dtype)
    block, block_o = _blocks(O, I * kmax * kmax)
    stats = _stats_triton(xs, g, dilations, sizes, starts, kmax, I, O, acc_dtype, block, True) if mode == 2 else g
    parts = torch.empty(len(xs), O, dtype=acc_dtype, device=g.device)
    for start in range(0, len(xs), _SLOTS):
        slots, num = _slot_args(sizes, dilations, starts, start)
        _merge_bwd_kernel[(O,)](
            g, w, stats, parts, *_chunk(xs, start), *_chunk(dxs, start), I, O, start, eps,
            NUM=num, MODE=mode, KMAX=kmax, BLOCK=block, BLOCK_O=block_o, ACC=_tl_acc(g.dtype), **slots,
        )
    return dxs + [parts.sum(dim=1).to(w.dtype)]


# ============================================================================ eager backward formula
# Inside a custom op autograd is off, so the reference backend spells its backward out (the same
# formulas as the kernels; the tests check them against autograd through merge_kernels_ref).
def _merge_backward_ref(
    grad: Tensor, kernels: list[Tensor], weights: Tensor, dilations: list[int], normalize: str, eps: float
) -> list[Tensor]:
    if grad.numel() == 0:  # no statistics to take (O or I is 0): nothing flows back
        return [torch.zeros_like(k) for k in kernels] + [torch.zeros_like(weights)]
    acc = _ref.acc_dtype(grad.dtype)
    g = grad.to(acc)
    kmax = g.shape[-1]
    w = weights.to(acc)
    dxs, gw = [], []
    for i, (kernel, d) in enumerate(zip(kernels, dilations)):
        x = kernel.to(acc)
        k = x.shape[-1]
        span = (k - 1) * d + 1
        st = (kmax - span) // 2
        G = g[..., st : st + span : d, st : st + span : d]  # crop: the candidate's taps
        if normalize == "none":
            dxs.append((w[i] * G).to(kernel.dtype).contiguous())
            gw.append((G * x).sum())
            continue
        dims = tuple(range(1, 4)) if normalize == "channel" else tuple(range(4))
        n = math.prod(x.shape[dm] for dm in dims)
        mean = x.mean(dim=dims, keepdim=True)
        xc = x - mean
        std = xc.pow(2).mean(dim=dims, keepdim=True).sqrt()
        inv = 1.0 / (std + eps)
        sg = G.sum(dim=dims, keepdim=True)
        sgx = (G * xc).sum(dim=dims, keepdim=True)
        c2 = torch.where(std > 0, sgx * inv * inv / (n * torch.where(std > 0, std, 1.0)), 0.0)
        dxs.append((w[i] * ((G - sg / n) * inv - c2 * xc)).to(kernel.dtype).contiguous())
        gw.append((sgx * inv).sum())
    return dxs + [torch.stack(gw).to(weights.dtype)]


# ============================================================================ the op
# Defined once (ops/_define.py): its body on every backend, its fake (shared with the compiled
# kernel op), its backward op, and what the backward saves.
def _merged_empty(kernels, weights, dilations, normalize, eps):
    size = _ref.merged_size([k.shape[-1] for k in kernels], dilations)
    return kernels[0].new_empty(kernels[0].shape[0], kernels[0].shape[1], size, size)


def _merge_save(ctx, inputs, output):
    kernels, weights, dilations, normalize, eps, backend = inputs
    # Only the inputs: the statistics are recomputed in the backward (see the module docstring).
    ctx.save_for_backward(*kernels, weights)
    ctx.dilations, ctx.normalize, ctx.eps, ctx.backend = dilations, normalize, eps, backend


def _merge_gradients(ctx, backward, grad):
    *kernels, weights = ctx.saved_tensors
    grads = backward(grad, kernels, weights, ctx.dilations, ctx.normalize, ctx.eps, ctx.backend)
    return grads[:-1], grads[-1], None, None, None, None  # K kernel gradients, then the weights'


def _mode_code(kernels, weights, dilations, normalize, eps):
    return kernels, weights, dilations, MODE_CODES[normalize], eps


def _mode_code_backward(grad, kernels, weights, dilations, normalize, eps):
    return grad, kernels, weights, dilations, MODE_CODES[normalize], eps


_merge_kernels = define_op(
    "merge_kernels",
    "(Tensor[] kernels, Tensor weights, SymInt[] dilations, str normalize, float eps, str backend) -> Tensor",
    # the compiled kernels make their inputs contiguous themselves, and take the mode's code
    Kernels(
        reference=lambda kernels, weights, dilations, normalize, eps: _ref.merge_kernels_ref(
            kernels, weights, dilations, normalize, eps
        ).contiguous(),
        triton=_merge_triton,
        compiled="merge_kernels_kernel",
        compiled_args=_mode_code,
        fake=_merged_empty,
    ),
    backward=Kernels(
        reference=_merge_backward_ref,
        triton=_merge_backward_triton,
        compiled="merge_kernels_backward_kernel",
        compiled_args=_mode_code_backward,
        fake=lambda grad, kernels, weights, *_: empty_grads(kernels, weights),
    ),
    backward_schema=(
        "(Tensor grad, Tensor[] kernels, Tensor weights, SymInt[] dilations, str normalize, float eps, str backend)"
        " -> Tensor[]"
    ),
    save=_merge_save,
    gradients=_merge_gradients,
)


# A whole merged conv group (csrc/merged_conv.cpp, used by nas/forms.py): 'same' convolution at
# the group's stride (spec[2]), so the output is [B, O, ceil(H / s), ceil(W / s)] with O the
# output channels of the first part's last kernel tensor (its weight, or its pointwise kernel).
def _merged_conv_out(x, tensors, spec):
    s = spec[2]
    O = tensors[spec[8] - 1].shape[0]
    return x.new_empty(x.shape[0], O, (x.shape[2] - 1) // s + 1, (x.shape[3] - 1) // s + 1)


@register_kernel_fake("merged_conv_kernel")
@register_kernel_fake("merged_conv_fused")
def _(x, coefs, tensors, pattern, spec, eps):
    return _merged_conv_out(x, tensors, spec)


@register_kernel_fake("merged_conv_backward_kernel")
def _(grad, x, coefs, tensors, pattern, spec, eps, need_x):
    # the stacked and separable forms run their depthwise stage channels-last when spec[6] says so
    cl = spec[0] != 0 and spec[6]
    gx = torch.empty_like(x, memory_format=torch.channels_last if cl else torch.preserve_format) if need_x else x.new_empty(0)
    return [gx, torch.empty_like(coefs)] + [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]


# A factored group's 1x1 kernel and separable merge weights (csrc/group_pointwise.h, called by
# merged_conv_kernel): [O, cols, 1, 1], cols = (n C stacked, C separable) + n shift channels when
# normalized; the merge weights [n] (separable) or empty.
@register_kernel_fake("group_pointwise_kernel")
def _(coefs, tensors, form, normalize, eps):
    n = len(tensors) // 2
    O, C = tensors[1].shape[:2]
    cols = (C if form == 2 else n * C) + (n if normalize else 0)
    return tensors[1].new_empty(O, cols, 1, 1), tensors[1].new_empty(n if form == 2 else 0)


@register_kernel_fake("group_pointwise_backward_kernel")
def _(grad_kernel, grad_dw, coefs, tensors, form, normalize, eps):
    return [empty_contiguous(coefs)] + [empty_contiguous(t) for t in tensors]


# ============================================================================ public function
def _check_normalize(normalize) -> str:
    if normalize is True:
        return "channel"
    if normalize is False or normalize is None:
        return "none"
    if not isinstance(normalize, str) or normalize.lower() not in MODE_CODES:
        raise ValueError(f"normalize must be one of 'channel', 'tensor', 'none' (or True/False), got {normalize!r}")
    return normalize.lower()


def _check_dilations(dilations, k_total: int) -> list[int]:
    if dilations is None:
        return [1] * k_total
    if isinstance(dilations, Tensor) or not hasattr(dilations, "__len__"):
        raise TypeError(f"dilations must be a sequence of K ints (or None), got {type(dilations).__name__}")
    if len(dilations) != k_total:
        raise ValueError(f"dilations has {len(dilations)} entries but there are {k_total} kernels; one per kernel")
    out = []
    for i, d in enumerate(dilations):
        if isinstance(d, bool) or not isinstance(d, int):
            raise TypeError(f"dilations[{i}] must be an int, got {d!r}")
        if d < 1:
            raise ValueError(f"dilations[{i}] must be >= 1, got {d}")
        out.append(int(d))
    return out


def merge_kernels_backward(
    grad: Tensor, kernels, weights: Tensor, dilations, normalize="channel", eps: float = 1e-5, *, backend: str | None = None
) -> list[Tensor]:
    """The gradients of ``merge_kernels(kernels, weights, dilations, normalize, eps)`` for the
    gradient ``grad`` of the merged kernel, without autograd: K kernel gradients, then the
    weights' gradient (the op's own backward kernels). For callers that rebuild a merged kernel
    in their own backward (``nas/_autograd.py``); the arguments are those of a
    ``merge_kernels`` call that succeeded, and are not checked again."""
    mode = _check_normalize(normalize)
    dils = _check_dilations(dilations, len(kernels))
    resolved = _backend.resolve(backend, grad.device)
    return _merge_kernels.backward.impl(grad, list(kernels), weights, dils, mode, float(eps), resolved)


def merge_kernels(
    kernels,
    weights: Tensor,
    dilations=None,
    normalize="channel",
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> Tensor:
    """``sum_i weights[i] * embed(standardize(kernels[i]))`` in one fused pass, differentiable
    in every kernel (through the statistics) and in the weights.

    Args:
        kernels: K conv kernels ``[O, I, k_i, k_i]`` with odd k_i (a list, or one stacked
            ``[K, O, I, k, k]`` tensor when all are one size); same O, I, dtype and device.
        weights: ``[K]`` tensor of the same dtype and device (the architecture weights q).
        dilations: K ints >= 1 (default all 1). The result is ``[O, I, kmax, kmax]`` with
            kmax = max_i (k_i - 1) d_i + 1, each candidate centred with its taps d_i apart.
        normalize: ``"channel"`` (per output channel statistics, over I, k, k), ``"tensor"``
            (over the whole kernel) or ``"none"``; True means "channel", False "none".
            K_hat = (K - mean) / (std + eps), std the population std.
        eps: added to the std; must be > 0 when normalizing.
        backend: ``"reference"``, ``"triton"``, ``"cpp"``, ``"cuda"`` or None/``"auto"``.
    """
    if isinstance(kernels, Tensor) and kernels.dim() != 5:
        raise ValueError(
            f"kernels as one stacked tensor must be [K, O, I, k, k], got shape {tuple(kernels.shape)}; "
            "pass a list for a single kernel"
        )
    ks = as_tensor_list("kernels", kernels)
    if len(ks) == 0:
        raise ValueError("kernels is empty: at least one candidate (K >= 1) is needed")
    first = check_tensor("kernels[0]", ks[0], dim=4)
    for i, k in enumerate(ks):
        if i > 0:
            check_tensor(f"kernels[{i}]", k, dim=4)
            check_like(f"kernels[{i}]", k, "kernels[0]", first, shape=False)
        if k.shape[-1] != k.shape[-2]:
            raise ValueError(f"kernels[{i}] must be square [O, I, k, k], got shape {tuple(k.shape)}")
        if k.shape[-1] % 2 == 0:
            raise ValueError(f"kernels[{i}]: unsupported kernel size {k.shape[-1]}: must be odd")
        if k.shape[:2] != first.shape[:2]:
            raise ValueError(
                f"kernels[{i}] has [O, I] = {list(k.shape[:2])} but kernels[0] has {list(first.shape[:2])}; "
                "all candidates need the same output and input channels"
            )
    check_tensor("weights", weights, dim=1)
    if weights.shape[0] != len(ks):
        raise ValueError(f"weights has {weights.shape[0]} entries but there are {len(ks)} kernels; one weight per kernel")
    check_like("weights", weights, "kernels[0]", first, shape=False)
    dils = _check_dilations(dilations, len(ks))
    mode = _check_normalize(normalize)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite number, got {eps!r}")
    if mode != "none" and eps <= 0:
        raise ValueError(f"eps must be > 0 when normalizing (normalize={mode!r}), got {eps!r}")
    return _merge_kernels(ks, weights, dils, mode, float(eps), _backend.resolve(backend, first.device))
