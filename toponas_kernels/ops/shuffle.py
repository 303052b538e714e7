"""Family 3: partial-channel shuffles (docs/DESIGN.md sections 7 and 9, PC-DARTS).

    channel_shuffle(x, g)                 view channels as (g, C/g), swap, flatten
    partial_channel_shuffle(p, q, g)      channel_shuffle(cat([p, q], 1), g), without the cat

Every op here is one row permutation. A tensor ``[B, C, *spatial]`` is ``B*C`` rows of
``S = prod(spatial)`` contiguous elements, and destination row ``(b, d)`` is a copy of source
row ``(b, s)`` with

    s = (d % G) * (C / G) + d // G

``G = groups`` is the shuffle; ``G = C / groups`` is its inverse (so the backward of a shuffle is
a shuffle). The PC-DARTS concatenation is never built: the source rows of the forward (and the
destination rows of the backward) are looked up in whichever of ``processed`` / ``bypass`` holds
that channel, so forward and backward are each one kernel that reads and writes every element
once. The kernels move bits (16-, 32- or 64-bit words), so every dtype is moved exactly: the
outputs are bitwise permutations of the inputs.

Inputs need only dense spatial dims: batch and channel strides are free, so the views that
:func:`split_channels` returns (``x[:, :C//k]`` is not contiguous for B > 1) are read in place.
Any other layout (channels-last, a strided spatial dim) is first copied by ``contiguous()``.
Outputs are contiguous.

Layout of this file, top to bottom: the Triton kernel and launchers, the three ops
(``toponas::channel_shuffle``, ``partial_channel_shuffle`` and its backward
``partial_channel_unshuffle``, each defined once through ``_define.define_op``), and the public
functions.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from .. import backend as _backend
from . import reference as _ref
from ._common import (
    HAS_TRITON,
    INTERPRET,
    check_like,
    check_tensor,
    empty_contiguous,
    tl,
    triton,
)
from ._define import Kernels, define_op

# The kernels move raw words of the element size: bf16 never meets (interpreter) arithmetic.
_WORDS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

# Elements per Triton program on a GPU (a [ROWS, BLOCK_S] tile); the interpreter takes far more.
_GPU_TILE = 4096
_MAX_GRID_1 = 65535  # CUDA's limit on grid axis 1, which counts the spatial blocks

# ============================================================================ Triton kernel
if HAS_TRITON:

    @triton.jit
    def _permute_rows_kernel(
        src0, src1, dst0, dst1,
        src0_sb, src0_sc, src1_sb, src1_sc, dst0_sb, dst0_sc, dst1_sb, dst1_sc,
        n_rows, S, C, G, CG, src_split, dst_split,
        SPLIT_SRC: tl.constexpr, SPLIT_DST: tl.constexpr, ROWS: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        # A program copies a [ROWS, BLOCK_S] tile: ROWS consecutive destination rows (several
        # short rows per program, e.g. 7x7 maps), BLOCK_S contiguous elements of each. Row
        # index math is per row, 64-bit; element offsets are base + column, coalesced.
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.program_id(1).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
        b = rows // C
        d = rows - b * C
        s = (d % G) * CG + d // G
        mask = (rows < n_rows)[:, None] & (cols < S)[None, :]
        cols = cols[None, :]
        if SPLIT_SRC:
            # Two predicated loads: a row's lanes read only the tensor that holds its channel.
            first = s < src_split
            second = s >= src_split
            off0 = b * src0_sb + tl.where(first, s, 0) * src0_sc
            off1 = b * src1_sb + tl.where(first, 0, s - src_split) * src1_sc
            v0 = tl.load(src0 + off0[:, None] + cols, mask=mask & first[:, None])
            v1 = tl.load(src1 + off1[:, None] + cols, mask=mask & second[:, None])
            vals = tl.where(first[:, None], v0, v1)
        else:
            vals = tl.load(src0 + (b * src0_sb + s * src0_sc)[:, None] + cols, mask=mask)
        if SPLIT_DST:
            first = d < dst_split
            second = d >= dst_split
            off0 = b * dst0_sb + tl.where(first, d, 0) * dst0_sc
            off1 = b * dst1_sb + tl.where(first, 0, d - dst_split) * dst1_sc
            tl.store(dst0 + off0[:, None] + cols, vals, mask=mask & first[:, None])
            tl.store(dst1 + off1[:, None] + cols, vals, mask=mask & second[:, None])
        else:
            tl.store(dst0 + (b * dst0_sb + d * dst0_sc)[:, None] + cols, vals, mask=mask)


# ============================================================================ row views and launchers
def _spatial_numel(t: Tensor) -> int:
    n = 1
    for size in t.shape[2:]:
        n *= size
    return n


def _rows(t: Tensor) -> tuple[Tensor, int, int]:
    """``(tensor, batch stride, channel stride)`` of ``t`` seen as rows of S contiguous elements.
    No copy when the spatial dims are dense (any batch/channel strides); else ``contiguous()``.
    Strides of size-1 dims are 0: never multiplied by a non-zero index."""
    expected = 1
    for size, stride in zip(reversed(t.shape[2:]), reversed(t.stride()[2:])):
        if size != 1 and stride != expected:
            t = t.contiguous()
            break
        expected *= size
    return t, (t.stride(0) if t.shape[0] != 1 else 0), (t.stride(1) if t.shape[1] != 1 else 0)


def _sides(first: tuple, second: tuple, first_channels: int, channels: int) -> tuple[list, int]:
    """A channel-split side as the kernel takes it: one part when the split leaves one empty."""
    if first_channels == 0:
        return [second], channels
    if first_channels == channels:
        return [first], channels
    return [first, second], first_channels


def _launch_sizes(rows: int, s: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_S, num_warps). The interpreter runs programs one by one at ~2 ms each, so
    there a program takes (almost) everything."""
    tile = 1 << 16 if INTERPRET else _GPU_TILE
    block_s = min(triton.next_power_of_2(s), tile)
    block_s = max(block_s, triton.next_power_of_2(triton.cdiv(s, _MAX_GRID_1)))
    rows_per_prog = max(1, min(tile // block_s, triton.next_power_of_2(rows)))
    return rows_per_prog, block_s, 8 if rows_per_prog * block_s >= 4096 else 4


def _permute_rows_triton(
    src: list, src_split: int, dst: list, dst_split: int, batch: int, channels: int, groups: int, s: int
) -> None:
    """Destination row (b, d) <- source row (b, (d % groups) * (channels / groups) + d // groups).
    ``src``/``dst``: one or two ``(tensor, batch stride, channel stride)`` parts, split at
    ``src_split``/``dst_split`` channels."""
    rows = batch * channels
    if rows == 0 or s == 0:
        return
    (s0, s0b, s0c), (s1, s1b, s1c) = src[0], src[-1]
    (d0, d0b, d0c), (d1, d1b, d1c) = dst[0], dst[-1]
    word = _WORDS[s0.element_size()]
    rows_per_prog, block_s, warps = _launch_sizes(rows, s)
    grid = (triton.cdiv(rows, rows_per_prog), triton.cdiv(s, block_s))
    _permute_rows_kernel[grid](
        s0.view(word), s1.view(word), d0.view(word), d1.view(word),
        s0b, s0c, s1b, s1c, d0b, d0c, d1b, d1c,
        rows, s, channels, groups, channels // groups, src_split, dst_split,
        SPLIT_SRC=len(src) == 2, SPLIT_DST=len(dst) == 2, ROWS=rows_per_prog, BLOCK_S=block_s,
        num_warps=warps,
    )


def _empty_rows(like: Tensor, channels: int) -> Tensor:
    return like.new_empty((like.shape[0], channels, *like.shape[2:]))


def _channel_shuffle_triton(x: Tensor, groups: int) -> Tensor:
    c = x.shape[1]
    out = _empty_rows(x, c)
    _permute_rows_triton([_rows(x)], c, [_rows(out)], c, x.shape[0], c, groups, _spatial_numel(x))
    return out


def _partial_channel_shuffle_triton(processed: Tensor, bypass: Tensor, groups: int) -> Tensor:
    cp = processed.shape[1]
    c = cp + bypass.shape[1]
    out = _empty_rows(processed, c)
    src, split = _sides(_rows(processed), _rows(bypass), cp, c)
    _permute_rows_triton(src, split, [_rows(out)], c, processed.shape[0], c, groups, _spatial_numel(out))
    return out


def _partial_channel_unshuffle_triton(grad: Tensor, processed_channels: int, groups: int) -> list[Tensor]:
    c = grad.shape[1]
    outs = [_empty_rows(grad, processed_channels), _empty_rows(grad, c - processed_channels)]
    dst, split = _sides(_rows(outs[0]), _rows(outs[1]), processed_channels, c)
    inverse = c // groups if c else 1
    _permute_rows_triton([_rows(grad)], c, dst, split, grad.shape[0], c, inverse, _spatial_numel(grad))
    return outs


# ============================================================================ eager reference paths
# Custom-op results must not alias their inputs, and the fakes promise contiguous outputs.
def _owned(t: Tensor, *inputs: Tensor) -> Tensor:
    t = t.contiguous()
    if any(torch._C._is_alias_of(t, i) for i in inputs):
        t = t.clone()
    return t


def _partial_channel_unshuffle_ref(grad: Tensor, processed_channels: int, groups: int) -> list[Tensor]:
    c = grad.shape[1]
    full = _ref.channel_shuffle_ref(grad, c // groups if c else 1)
    parts = full.split([processed_channels, c - processed_channels], 1)
    return [t.clone(memory_format=torch.contiguous_format) for t in parts]


# ============================================================================ the ops
# Each op defined once (ops/_define.py): its body on every backend, its fake (shared with the
# compiled kernel op and the C++ fused op), and its backward, which is again one of these ops, so
# every shuffle differentiates any number of times, on every path.
def _shuffled_empty(processed, bypass, groups):
    return processed.new_empty((processed.shape[0], processed.shape[1] + bypass.shape[1], *processed.shape[2:]))


def _unshuffled_empty(grad, processed_channels, groups):
    c = grad.shape[1]
    return [_empty_rows(grad, processed_channels), _empty_rows(grad, c - processed_channels)]


def _channel_shuffle_save(ctx, inputs, output):
    x, groups, backend = inputs
    c = x.shape[1]
    ctx.inverse_groups = c // groups if c else 1
    ctx.backend = backend


def _channel_shuffle_gradients(ctx, shuffle, grad):
    # The inverse permutation is a shuffle with C / groups groups: the op is its own backward.
    return shuffle(grad, ctx.inverse_groups, ctx.backend), None, None


_channel_shuffle = define_op(
    "channel_shuffle",
    "(Tensor x, SymInt groups, str backend) -> Tensor",
    Kernels(
        reference=lambda x, groups: _owned(_ref.channel_shuffle_ref(x, groups), x),
        triton=_channel_shuffle_triton,
        compiled="channel_shuffle_kernel",
        fake=lambda x, groups: empty_contiguous(x),
        fused="channel_shuffle_fused",  # csrc/channel_shuffle.cpp: its autograd node in C++
    ),
    backward="channel_shuffle",
    save=_channel_shuffle_save,
    gradients=_channel_shuffle_gradients,
)


def _partial_shuffle_save(ctx, inputs, output):
    processed, _, groups, backend = inputs
    ctx.processed_channels, ctx.groups, ctx.backend = processed.shape[1], groups, backend


def _partial_shuffle_gradients(ctx, unshuffle, grad):
    grad_processed, grad_bypass = unshuffle(grad, ctx.processed_channels, ctx.groups, ctx.backend)
    return grad_processed, grad_bypass, None, None


_partial_channel_shuffle = define_op(
    "partial_channel_shuffle",
    "(Tensor processed, Tensor bypass, SymInt groups, str backend) -> Tensor",
    Kernels(
        reference=lambda processed, bypass, groups: _owned(
            _ref.partial_channel_shuffle_ref(processed, bypass, groups), processed, bypass
        ),
        triton=_partial_channel_shuffle_triton,
        compiled="partial_channel_shuffle_kernel",
        fake=_shuffled_empty,
        fused="partial_channel_shuffle_fused",
    ),
    backward="partial_channel_unshuffle",
    save=_partial_shuffle_save,
    gradients=_partial_shuffle_gradients,
)


def _partial_unshuffle_save(ctx, inputs, output):
    _, _, groups, backend = inputs
    ctx.groups, ctx.backend = groups, backend
    ctx.shapes = [t.shape for t in output]  # for an absent gradient


def _partial_unshuffle_gradients(ctx, shuffle, *grads):
    # The unshuffle is linear and the adjoint of the shuffle: its backward is the forward op,
    # so double backward of partial_channel_shuffle works too. Only the custom op's gradients
    # may be absent (None); the eager path's arrive as zeros.
    present = [g for g in grads if g is not None]
    if not present:
        return None, None, None, None
    gp, gb = (g if g is not None else present[0].new_zeros(shape) for g, shape in zip(grads, ctx.shapes))
    return shuffle(gp, gb, ctx.groups, ctx.backend), None, None, None


# The backward of partial_channel_shuffle: [grad_processed, grad_bypass] in one pass.
_partial_channel_unshuffle = define_op(
    "partial_channel_unshuffle",
    "(Tensor grad, SymInt processed_channels, SymInt groups, str backend) -> Tensor[]",
    Kernels(
        reference=_partial_channel_unshuffle_ref,
        triton=_partial_channel_unshuffle_triton,
        compiled="partial_channel_unshuffle_kernel",
        fake=_unshuffled_empty,
        fused="partial_channel_unshuffle_fused",
    ),
    backward="partial_channel_shuffle",
    save=_partial_unshuffle_save,
    gradients=_partial_unshuffle_gradients,
)


# ============================================================================ public functions
def _check_rows(name: str, t) -> Tensor:
    check_tensor(name, t)
    if t.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dims [B, C, *spatial], got shape {tuple(t.shape)}")
    return t


def _check_count(name: str, value) -> int:
    """A positive int (numpy ints and 0-dim int tensors pass through operator.index; bools do not)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def channel_shuffle(x: Tensor, groups: int, *, backend: str | None = None) -> Tensor:
    """View the channels of ``x`` ``[B, C, *spatial]`` as ``(groups, C/groups)``, swap the two,
    flatten: output channel ``i * groups + j`` is input channel ``j * (C/groups) + i``.

    Differentiable (the backward is the inverse shuffle, itself differentiable). Returns a new
    contiguous tensor of x's shape and dtype, bitwise a permutation of x.

    Args:
        x: any rank >= 2; C divisible by groups.
        groups: positive int.
        backend: ``"reference"``, ``"triton"``, ``"cpp"``, ``"cuda"`` or None/``"auto"``.
    """
    _check_rows("x", x)
    groups = _check_count("groups", groups)
    if x.shape[1] % groups:
        raise ValueError(f"x: C={x.shape[1]} is not divisible by groups={groups}")
    return _channel_shuffle(x, groups, _backend.resolve(backend, x.device))


def partial_channel_shuffle(
    processed: Tensor, bypass: Tensor, groups: int, *, backend: str | None = None
) -> Tensor:
    """The PC-DARTS output step ``channel_shuffle(cat([processed, bypass], 1), groups)`` as one
    permutation: the concatenation is never built. Its backward produces both gradients in one
    pass (the inverse permutation).

    Args:
        processed: ``[B, Cp, *spatial]``, the channels that went through the mixed op (C/k in
            PC-DARTS).
        bypass: ``[B, Cb, *spatial]``, the rest (C - C/k), same batch, spatial shape, dtype and
            device. Either part may have 0 channels.
        groups: positive int dividing ``Cp + Cb`` (k in PC-DARTS).
        backend: as for :func:`channel_shuffle`.
    """
    _check_rows("processed", processed)
    _check_rows("bypass", bypass)
    check_like("bypass", bypass, "processed", processed, shape=False)
    if bypass.dim() != processed.dim():
        raise ValueError(
            f"bypass has shape {tuple(bypass.shape)} but processed has {tuple(processed.shape)}: "
            "they must have the same rank [B, C, *spatial]"
        )
    if bypass.shape[0] != processed.shape[0]:
        raise ValueError(f"bypass has batch size {bypass.shape[0]} but processed has {processed.shape[0]}")
    if bypass.shape[2:] != processed.shape[2:]:
        raise ValueError(
            f"bypass has spatial shape {tuple(bypass.shape[2:])} but processed has {tuple(processed.shape[2:])}"
        )
    groups = _check_count("groups", groups)
    cp, cb = processed.shape[1], bypass.shape[1]
    if (cp + cb) % groups:
        raise ValueError(
            f"processed ({cp} channels) and bypass ({cb}) together: C={cp + cb} is not divisible "
            f"by groups={groups}"
        )
    return _partial_channel_shuffle(processed, bypass, groups, _backend.resolve(backend, processed.device))


def split_channels(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The PC-DARTS split ``(x[:, :C//k], x[:, C//k:])``: views, no copy (the partial-shuffle
    kernels read them in place). C must be divisible by k, as the shuffle with k groups that
    follows needs it."""
    _check_rows("x", x)
    k = _check_count("k", k)
    c = x.shape[1]
    if c % k:
        raise ValueError(f"x: C={c} is not divisible by k={k}")
    return x[:, : c // k], x[:, c // k :]
