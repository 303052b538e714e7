"""How ``FusedMixedOp`` evaluates a merged conv group (a ``simplify.Merged`` node): its *form*.

A merged group is ``sum_i c_i conv(x, Wn_i)`` with ``Wn_i`` candidate i's equivalent kernel,
kernel-normalized (``Wn_i = a_i * W_i + b_i`` per output channel, a_i = 1 / (std + eps),
b_i = -mean / (std + eps); a = 1, b = 0 without normalization). For depthwise+pointwise units
``W_i[o, c] = P_i[o, c] D_i[c]``. Three ways to evaluate it:

* ``dense`` (exact): one dense conv with the merged kernel ``sum_i c_i embed(Wn_i)``
  (``ops.merge_kernels``), stored on the group's dilated lattice (``Merged.dilation``: k^2 taps
  with k = ``Merged.lattice``). Cost grows with C_out * C_in * k^2 per pixel: cheapest for small C and
  for groups of dense convs (NAS-Bench-201, where it is the only form).
* ``stacked`` (exact, separable units only): each candidate's depthwise conv, then ONE 1x1 conv
  over the stacked depthwise outputs whose weights carry the coefficients and the normalization
  scales, ``[c_1 a_1 P_1, ..., c_n a_n P_n]``. The normalization shift is a constant kernel per
  output channel, so its conv is ``b * boxsum(sum_c x_c)``: one extra input channel per
  candidate (the box sum of the channel sum of x over the candidate's dilated k x k taps) with
  weights ``c_i b_i``. The statistics come from P and D alone: per output channel
  ``mean = P @ sum(D) / (C k^2)`` and ``E[W^2] = P^2 @ sum(D^2) / (C k^2)``. Cost per pixel
  ``C sum_i k_i^2 + C_out (n C + n)``.
* ``separable`` (an approximation, opt-in): the depthwise kernels merged into one depthwise conv
  (``sum_i q_i embed(D_i / r_i)`` on the lattice, q = c / sum(c), r_i the RMS of D_i when normalizing, else 1)
  and the pointwise ones into one 1x1 conv (``sum_i c_i a_i r_i P_i``), plus the same exact
  shift channels; so each candidate still enters through its standardized ``P_i D_i`` only. Its cost does not grow with the
  number of candidates. It equals the weighted sum for one-hot coefficients (as FMS does), not
  otherwise: ``sum_i q_i P_i D_i != (sum_i q_i P_i)(sum_i q_i D_i)``.

In ``stacked`` and ``separable`` the depthwise outputs are not kept for backward: the merged
conv keeps x, the coefficients and the parameters, as the dense form does, and backward
recomputes them (one depthwise pass).

``merge="auto"`` picks, per merged group and device, the exact form with the lowest modelled
cost (``form_costs``): multiply-accumulates of forward + backward per output pixel plus
``BYTE_WEIGHT[device]`` times the activation elements read and written (depthwise convs and the
stacked tensor are memory-bound where a dense conv is not). The CPU weight is fitted to
measurements of the two DARTS groups at C = 4..64 (bench/RESULTS.md: stacked is slower than dense
up to C = 16 and faster from C = 32 (dil) or 64 (sep), which brackets it between about 205 and
250); the GPU weight is a guess, not measured.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from .simplify import Merged

__all__ = ["FORMS", "MERGE_CHOICES", "EXACT_FORMS", "BYTE_WEIGHT", "FormCost", "check_merge", "form_costs", "choose_form",
           "normalization_affine", "stacked_input", "separable_input"]

FORMS = ("dense", "stacked", "separable")
MERGE_CHOICES = ("auto",) + FORMS
EXACT_FORMS = ("dense", "stacked")

#: Run the depthwise stage of the stacked and separable forms channels-last on a CPU.
CHANNELS_LAST_DEPTHWISE = True

#: Multiply-accumulates one activation element read or written is worth, per device type.
BYTE_WEIGHT = {"cpu": 230.0, "cuda": 150.0}


def check_merge(merge) -> str:
    if merge not in MERGE_CHOICES:
        raise ValueError(f"merge: expected one of {list(MERGE_CHOICES)}, got {merge!r}")
    return merge


def separable_group(node: Merged) -> bool:
    """Every part is a depthwise+pointwise unit (the only groups with more than one form)."""
    return all(p.module.separable for p in node.parts)


class FormCost(NamedTuple):
    """Modelled cost of one form, per output pixel and sample, forward + backward."""

    macs: float
    elements: float
    cost: float


def form_costs(node: Merged, C_in: int, C_out: int, device_type: str = "cpu", normalize: bool = True) -> dict[str, FormCost]:
    """The modelled cost of each form applicable to ``node`` at these channel counts."""
    beta = BYTE_WEIGHT.get(device_type, BYTE_WEIGHT["cuda"])
    s2 = node.stride**2  # input pixels per output pixel
    n = len(node.parts)
    K = node.lattice  # taps per side of the merged kernel (stored on its dilated lattice)
    out = {}

    def cost(form, macs, elements):
        out[form] = FormCost(macs, elements, macs + beta * elements)

    # dense: forward conv, then grad input and grad kernel (3 x the MACs); reads x twice and
    # writes grad x, reads grad y twice, writes y.
    cost("dense", 3 * C_out * C_in * K * K // node.groups, 3 * C_in * s2 + 3 * C_out)
    if separable_group(node):
        shift = n if normalize else 0
        for form, dw_macs, z in (
            ("stacked", C_in * sum(p.module.kernel**2 for p in node.parts), n * C_in + shift),
            ("separable", C_in * K * K, C_in + shift),
        ):
            reads = n if form == "stacked" else 1
            # depthwise: forward, recompute in backward, grad input and grad kernel (4x); 1x1: 3x.
            # x is read by each depthwise pass; z is written, read by the 1x1, written again by
            # the recompute, read for the 1x1's kernel grad, and its grad written and read.
            cost(form, 4 * dw_macs + 3 * C_out * z, 4 * reads * C_in * s2 + 6 * z + 3 * C_out)
    return out


def choose_form(node: Merged, merge: str, C_in: int, C_out: int, device_type: str, normalize: bool = True) -> tuple[str, str]:
    """The form ``node`` runs in, and why (a line for ``toponas simplify``)."""
    costs = form_costs(node, C_in, C_out, device_type, normalize)
    text = ", ".join(f"{f} {c.cost / 1e3:.1f}k" for f, c in costs.items())
    if merge == "auto":
        form = min((f for f in EXACT_FORMS if f in costs), key=lambda f: costs[f].cost)
        return form, f"auto: lowest modelled cost on {device_type} ({text} per output pixel)"
    if merge not in costs:
        return "dense", f"{merge} applies to depthwise+pointwise groups only; dense is the only form here"
    return merge, f"asked for ({text} per output pixel)"


# ----------------------------------------------------------------------------- the forms
def normalization_affine(P: Tensor, D: Tensor, normalize: str, eps: float) -> tuple[Tensor, Tensor]:
    """``(a, b)`` [C_out] with ``standardize(P D) = a * (P D) + b`` per output channel, from the
    pointwise kernel P [C_out, C, 1, 1] and the depthwise kernel D [C, 1, k, k] (never forming
    the C_out x C x k x k kernel). Statistics in float64 (they are C_out x C sized), so the
    ``E[W^2] - mean^2`` form loses nothing at float32."""
    acc = torch.float64 if P.dtype != torch.float64 and P.device.type != "mps" else P.dtype
    p = P.flatten(1).to(acc)
    d = D.flatten(1).to(acc)
    count = p.shape[1] * d.shape[1]
    mean = p @ d.sum(1) / count
    sq = (p * p) @ (d * d).sum(1) / count
    if normalize == "tensor":
        mean, sq = mean.mean().expand_as(mean), sq.mean().expand_as(sq)
    std = (sq - mean * mean).clamp_min(0).sqrt()
    a = 1.0 / (std + eps)
    return a.to(P.dtype), (-mean * a).to(P.dtype)


def _shift_channels(x: Tensor, node: Merged) -> Tensor:
    """Per candidate, the box sum of the channel sum of x over its dilated k x k taps (stride
    and 'same' padding of the group): [B, n, H', W']. Box sums from prefix sums along each axis
    (one per dilation and axis, a handful of ops per candidate whatever k): a 1-channel conv
    with a big kernel has a slow backward on a CPU, and summing k shifted slices per axis made
    hundreds of tiny ops per merged conv (host-bound at small maps)."""
    s, half = node.stride, node.size // 2
    total = F.pad(x.sum(1, keepdim=True), (half,) * 4)
    H, W = (x.shape[2] - 1) // s + 1, (x.shape[3] - 1) // s + 1
    rows_prefix: dict[int, Tensor] = {}
    out = []
    for p in node.parts:
        k, d = p.module.kernel, p.module.dilation
        start = half - p.module.span // 2
        if d not in rows_prefix:
            rows_prefix[d] = _dilated_prefix(total, 2, d)
        rows = _box(rows_prefix[d], 2, k, d, start, H, s)
        out.append(_box(_dilated_prefix(rows, 3, d), 3, k, d, start, W, s))
    return torch.cat(out, 1)


def _dilated_prefix(t: Tensor, dim: int, d: int) -> Tensor:
    """``P`` along ``dim`` with ``P[r + d] = sum_m t[r - m d]`` (the prefix sum within each residue
    class mod d) and ``P[0:d] = 0``: d zeros in front, the end padded to a multiple of d, viewed
    as [..., L / d, d] and summed cumulatively over L / d."""
    L = t.shape[dim]
    back = (-(L + d)) % d
    pad = [0, 0] * (t.dim() - 1 - dim) + [d, back]
    tp = F.pad(t, pad)
    shape = list(tp.shape)
    view = shape[:dim] + [shape[dim] // d, d] + shape[dim + 1 :]
    return tp.view(view).cumsum(dim).view(shape)


def _box(P: Tensor, dim: int, k: int, d: int, start: int, count: int, step: int) -> Tensor:
    """``sum_{i<k} t[start + i d + j step]`` along ``dim`` for ``j < count``, from ``P =
    _dilated_prefix(t, dim, d)``: two strided slices of P and a difference."""
    hi = P.narrow(dim, start + k * d, (count - 1) * step + 1)
    lo = P.narrow(dim, start, (count - 1) * step + 1)
    if step > 1:
        index = [slice(None)] * P.dim()
        index[dim] = slice(None, None, step)
        hi, lo = hi[tuple(index)], lo[tuple(index)]
    return hi - lo


def _depthwise_layout(x: Tensor) -> Tensor:
    """x in the memory layout its depthwise convs run fastest in: channels-last on a CPU, where
    oneDNN's NCHW depthwise backward is 5-20x slower than its forward for kernels above 3x3 or
    dilated (measured, bench/RESULTS.md); unchanged elsewhere."""
    if CHANNELS_LAST_DEPTHWISE and x.device.type == "cpu":
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _pointwise(P: Tensor) -> Tensor:
    return P.flatten(1)


def stacked_input(node: Merged, x: Tensor, coefs: Tensor, tensors, normalize: str, eps: float) -> tuple[Tensor, Tensor]:
    """``(z, kernel)`` with ``conv2d(z, kernel) == sum_i c_i conv(x, Wn_i)`` exactly: z the
    stacked depthwise outputs (and the shift channels), kernel the 1x1 conv over them."""
    x = _depthwise_layout(x)
    zs, cols, shifts = [], [], []
    for i, p in enumerate(node.parts):
        D, P = tensors[2 * i], tensors[2 * i + 1]
        m = p.module
        zs.append(F.conv2d(x, D.to(x.dtype), None, m.stride, m.span // 2, m.dilation, x.shape[1]))
        c = coefs[i].to(P.dtype)
        if normalize == "none":
            cols.append(c * _pointwise(P))
        else:
            a, b = normalization_affine(P, D, normalize, eps)
            cols.append((c * a)[:, None] * _pointwise(P))
            shifts.append(c * b)
    if shifts:
        zs.append(_shift_channels(x, node))
        cols.append(torch.stack(shifts, 1))
    kernel = torch.cat(cols, 1)
    return torch.cat(zs, 1), kernel[:, :, None, None]


def separable_input(node: Merged, x: Tensor, coefs: Tensor, tensors, normalize: str, eps: float) -> tuple[Tensor, Tensor]:
    """``(z, kernel)`` of the separable approximation: z the output of the one merged depthwise
    conv (and the shift channels), kernel the merged 1x1 conv."""
    Ds, Ps = list(tensors[0::2]), list(tensors[1::2])
    c = coefs.to(Ps[0].dtype)
    total = c.sum()
    q = c / torch.where(total == 0, torch.ones_like(total), total)
    dil = node.lattice_dilations()
    x = _depthwise_layout(x)
    if normalize != "none":
        # Each candidate's depthwise kernel enters the merged one at unit RMS, its scale moving
        # to the pointwise side: the sum then depends on P_i D_i only, as normalization means.
        ab = [normalization_affine(P, Di, normalize, eps) for P, Di in zip(Ps, Ds)]
        rms = [Di.pow(2).mean().sqrt() for Di in Ds]
        Ds = [Di / r for Di, r in zip(Ds, rms)]
        Ps = [(a * r)[:, None, None, None] * P for P, (a, _), r in zip(Ps, ab, rms)]
    D = ops.merge_kernels(Ds, q.to(Ds[0].dtype), dil, "none")
    z = F.conv2d(x, D.to(x.dtype), None, node.stride, node.size // 2, node.dilation, x.shape[1])
    pw = sum(ci * _pointwise(P) for ci, P in zip(c, Ps))
    if normalize == "none":
        return z, pw[:, :, None, None]
    shift = torch.stack([ci * b for ci, (_, b) in zip(c, ab)], 1)
    z = torch.cat([z, _shift_channels(x, node)], 1)
    return z, torch.cat([pw, shift], 1)[:, :, None, None]
