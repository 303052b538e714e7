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

Eagerly, on the compiled backends (C++ and CUDA kernels) and without autocast, a group in any
form is ONE op (``toponas::merged_conv_fused``, csrc/merged_conv.cpp: the same formulas as the
Python functions below, composed in C++ of the convs, the merge kernels and, for the stacked and
separable forms, one launch that turns the statistics, rescaling, shift columns and coefficients
into the 1x1 kernel, csrc/group_pointwise.h): one dispatcher call in forward, one in backward,
its autograd node a C++ Function, so no Python runs in a group's backward. The
Python functions remain the path under ``torch.compile``, autocast and the reference and Triton
backends, and the float64 reference the fused op is tested against.

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

from .. import backend as _backend
from .. import ops
from ..ops._common import FUSED_BACKENDS, fused_op
from ..ops.merge import MODE_CODES, merge_kernels_backward
from .operations import ConvUnit
from .simplify import Merged

__all__ = ["FORMS", "MERGE_CHOICES", "EXACT_FORMS", "BYTE_WEIGHT", "FormCost", "check_merge", "form_costs", "choose_form",
           "normalization_affine", "stacked_input", "separable_input", "DenseGroup", "FactoredGroup", "group_for"]

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
    the C_out x C x k x k kernel). Statistics in P's dtype (float32 for half types), accurate
    there: the variance is a sum of squares of centred values (``_statistics``), never
    ``E[W^2] - mean^2``."""
    st = _statistics([P], [D], normalize, eps)
    return st["a"][0], st["b"][0]


def _statistics(Ps, Ds, normalize: str, eps: float) -> dict:
    """``normalization_affine`` of n parts at once (their P have one shape): ``a`` and ``b``
    [n, C_out] in P's dtype, ``P`` the stacked pointwise kernels [n, C_out, C], and what the
    backward needs. Two passes, no cancellation: with ``m1[c]``, ``v[c]`` the mean and variance
    of D's taps of channel c and ``u[o, c] = P[o, c] m1[c]``, per output channel ``mean =
    mean_c u`` and ``var = mean_c (u - mean)^2 + mean_c P^2 v`` (the cross term vanishes: the
    centred taps sum to 0), both sums of squares of centred values, so float32 keeps the
    variance of a kernel whose mean is large against its spread (where ``E[W^2] - mean^2``
    loses every digit; ``python_tests/test_statistics.py``). The same formulas as the fused op
    (csrc/group_pointwise.h)."""
    P0 = Ps[0]
    acc = torch.float32 if P0.dtype in (torch.float16, torch.bfloat16) else P0.dtype
    Pst = torch.stack([P.flatten(1) for P in Ps])
    p = Pst.to(acc)
    ds, m1s, vs = [], [], []
    for D in Ds:
        d = D.flatten(1).to(acc)
        m = d.mean(1)
        centred = d - m.unsqueeze(1)
        ds.append(d)
        m1s.append(m)
        vs.append((centred * centred).mean(1))
    m1, v = torch.stack(m1s), torch.stack(vs)  # [n, C]
    u = p * m1.unsqueeze(1)  # [n, O, C]
    mo = u.mean(2)  # [n, O]
    dev = u - mo.unsqueeze(2)
    var = (dev * dev).mean(2) + (p * p * v.unsqueeze(1)).mean(2)
    mean = mo
    if normalize == "tensor":
        mt = mo.mean(1, keepdim=True)
        dm = mo - mt
        var = (var + dm * dm).mean(1, keepdim=True).expand_as(mo)
        mean = mt.expand_as(mo)
    std = var.clamp_min(0).sqrt()
    a = (std + eps).reciprocal()
    return dict(P=Pst, p=p, ds=ds, m1=m1, v=v, dev=dev, mo=mo, mean=mean, std=std, a_acc=a,
                a=a.to(P0.dtype), b=(-(mean * a)).to(P0.dtype))


def _statistics_backward(st: dict, ga: Tensor, gb: Tensor, normalize: str, Ds) -> tuple[Tensor, list[Tensor]]:
    """The gradients of the stacked P [n, C_out, C] and of each D for the gradients ``ga``,
    ``gb`` [n, C_out] of ``_statistics``' ``(a, b)``. A constant channel (std 0) passes no
    gradient through its std."""
    p, mean, std, a = st["p"], st["mean"], st["std"], st["a_acc"]
    ga, gb = ga.to(a.dtype), gb.to(a.dtype)
    g_mean = -(a * gb)
    g_std = -((ga - mean * gb) * a * a)  # b = -mean a; da/dstd = -a^2
    pos = std > 0
    g_var = torch.where(pos, g_std / (torch.where(pos, std, torch.ones_like(std)) * 2), torch.zeros_like(g_std))
    if normalize == "tensor":
        O = st["mo"].shape[1]
        gvt = g_var.sum(1, keepdim=True)
        g_mean = g_mean.sum(1, keepdim=True) / O + gvt * (st["mo"] - mean) * (2.0 / O)
        g_var = (gvt / O).expand_as(g_var)
    C = p.shape[2]
    gm3, gv3, m13 = g_mean.unsqueeze(2), g_var.unsqueeze(2), st["m1"].unsqueeze(1)
    gp = (gm3 * m13 + gv3 * (st["dev"] * m13 + p * st["v"].unsqueeze(1)) * 2) / C
    g_m1 = ((gm3 + gv3 * st["dev"] * 2) * p).sum(1) / C  # [n, C]
    g_v = (gv3 * p * p).sum(1) / C
    gds = []
    for i, (d, D) in enumerate(zip(st["ds"], Ds)):
        g = (g_m1[i].unsqueeze(1) + g_v[i].unsqueeze(1) * (d - st["m1"][i].unsqueeze(1)) * 2) / d.shape[1]
        gds.append(g.view(D.shape).to(D.dtype))
    return gp.to(st["P"].dtype), gds


def _shift_channels(x: Tensor, node: Merged) -> Tensor:
    """Per candidate, the box sum of the channel sum of x over its dilated k x k taps (stride
    and 'same' padding of the group): [B, n, H', W'], as one conv of the channel sum with a 0/1
    kernel per candidate (``_shift_pattern``): two ops whatever the number of candidates (its
    gradient, ``_shift_input_grad``, is the transposed conv)."""
    return F.conv2d(x.sum(1, keepdim=True), _shift_pattern(node, x), None, node.stride, node.size // 2)


def _depthwise_layout(x: Tensor) -> Tensor:
    """x in the memory layout its depthwise convs run fastest in: channels-last on a CPU, where
    oneDNN's NCHW depthwise backward is 5-20x slower than its forward for kernels above 3x3 or
    dilated (measured, bench/RESULTS.md); unchanged elsewhere."""
    if CHANNELS_LAST_DEPTHWISE and x.device.type == "cpu":
        return x.contiguous(memory_format=torch.channels_last)
    return x


def stacked_input(node: Merged, x: Tensor, coefs: Tensor, tensors, normalize: str, eps: float) -> tuple[Tensor, Tensor]:
    """``(z, kernel)`` with ``conv2d(z, kernel) == sum_i c_i conv(x, Wn_i)`` exactly: z the
    stacked depthwise outputs (and the shift channels), kernel the 1x1 conv over them."""
    return _stacked(node, x, coefs, tensors, normalize, eps)[:2]


def _stacked(node, x, coefs, tensors, normalize, eps):
    """``stacked_input``'s ``(z, kernel)`` and what its backward needs: ``(xl, c, stats)``."""
    x = _depthwise_layout(x)
    Ds, Ps = tensors[0::2], tensors[1::2]
    zs = [
        F.conv2d(x, D.to(x.dtype), None, p.module.stride, p.module.span // 2, p.module.dilation, x.shape[1])
        for D, p in zip(Ds, node.parts)
    ]
    c = coefs.to(Ps[0].dtype)
    if normalize == "none":
        stats = None
        Pst = torch.stack([P.flatten(1) for P in Ps])
        cols = c[:, None, None] * Pst  # [n, O, C]
    else:
        stats = _statistics(Ps, Ds, normalize, eps)
        cols = (c[:, None] * stats["a"]).unsqueeze(2) * stats["P"]
    O = cols.shape[1]
    kernel = cols.transpose(0, 1).reshape(O, -1)
    if stats is not None:
        zs.append(_shift_channels(x, node))
        kernel = torch.cat([kernel, (c[:, None] * stats["b"]).t()], 1)
    return torch.cat(zs, 1), kernel[:, :, None, None], x, c, stats


def separable_input(node: Merged, x: Tensor, coefs: Tensor, tensors, normalize: str, eps: float) -> tuple[Tensor, Tensor]:
    """``(z, kernel)`` of the separable approximation: z the output of the one merged depthwise
    conv (and the shift channels), kernel the merged 1x1 conv."""
    return _separable(node, x, coefs, tensors, normalize, eps)[:2]


def _separable(node, x, coefs, tensors, normalize, eps):
    """``separable_input``'s ``(z, kernel)`` and what its backward needs (a dict)."""
    Ds, Ps = list(tensors[0::2]), list(tensors[1::2])
    c = coefs.to(Ps[0].dtype)
    total = c.sum()
    safe = torch.where(total == 0, torch.ones_like(total), total)
    q = c / safe
    dil = node.lattice_dilations()
    x = _depthwise_layout(x)
    saved = dict(xl=x, c=c, q=q, total=total, safe=safe)
    if normalize != "none":
        # Each candidate's depthwise kernel enters the merged one at unit RMS, its scale moving
        # to the pointwise side: the sum then depends on P_i D_i only, as normalization means.
        stats = _statistics(Ps, Ds, normalize, eps)
        rms = torch.stack([Di.pow(2).mean() for Di in Ds]).sqrt()  # [n]
        Ds = [Di / r for Di, r in zip(Ds, rms.unbind(0))]
        scale = stats["a"] * rms[:, None]  # [n, O]: a_i r_i
        pw = ((c[:, None] * scale).unsqueeze(2) * stats["P"]).sum(0)
        saved.update(stats=stats, rms=rms, scale=scale)
    else:
        pw = (c[:, None, None] * torch.stack([P.flatten(1) for P in Ps])).sum(0)
    saved["Dn"] = Ds
    D = ops.merge_kernels(Ds, q.to(Ds[0].dtype), dil, "none")
    saved["D"] = D
    z = F.conv2d(x, D.to(x.dtype), None, node.stride, node.size // 2, node.dilation, x.shape[1])
    if normalize == "none":
        return z, pw[:, :, None, None], saved
    shift = (c[:, None] * stats["b"]).t()
    z = torch.cat([z, _shift_channels(x, node)], 1)
    return z, torch.cat([pw, shift], 1)[:, :, None, None], saved


_PATTERNS: dict = {}


def _shift_pattern(node: Merged, like: Tensor) -> Tensor:
    """``[n, 1, size, size]``: 1 at the taps of each part (the shift channels as a conv), in
    ``like``'s dtype and device; cached."""
    key = (node, like.device, like.dtype)
    got = None if torch.compiler.is_compiling() else _PATTERNS.get(key)
    if got is not None:
        return got
    size, half = node.size, node.size // 2
    w = torch.zeros(len(node.parts), 1, size, size, dtype=like.dtype)
    for i, p in enumerate(node.parts):
        k, d = p.module.kernel, p.module.dilation
        start = half - p.module.span // 2
        w[i, 0, start : start + (k - 1) * d + 1 : d, start : start + (k - 1) * d + 1 : d] = 1.0
    w = w.to(like.device)
    if not torch.compiler.is_compiling():
        _PATTERNS[key] = w
    return w


def _shift_input_grad(node: Merged, g: Tensor, x: Tensor, pattern: Tensor) -> Tensor:
    """The gradient of x (``[B, 1, H, W]``, the same for every channel) of the shift channels
    for their gradient ``g`` ``[B, n, H', W']``: the transposed box sums."""
    s, half = node.stride, node.size // 2
    extra = [x.shape[d] - 1 - (g.shape[d] - 1) * s for d in (2, 3)]
    return F.conv_transpose2d(g, pattern.to(g.dtype), None, s, half, extra)


# ----------------------------------------------------------------------------- groups
#: The whole group as one op with a C++ autograd node (csrc/merged_conv.cpp); None when the
#: extension lacks it.
_MERGED_CONV = fused_op("merged_conv_fused")
_FORM_CODES = {form: i for i, form in enumerate(FORMS)}


class _Group:
    """What every form shares: ``fused``, the group as one ``toponas::merged_conv_fused`` call
    (one dispatcher call in forward, one in backward, no Python in backward), where it applies:
    the compiled backends, no autocast, one dtype throughout."""

    def __init__(self, node: Merged, form: str, sizes: list[int], normalize: str, eps: float, backend):
        self.node, self.form, self.sizes = node, form, sizes
        self.normalize, self.eps, self.backend = normalize, eps, backend
        self._specs: dict = {}

    def spec(self, device_type: str) -> list[int]:
        """The fused op's ``spec`` (csrc/merged_conv.cpp) of this group on ``device_type``."""
        got = self._specs.get(device_type)
        if got is None:
            node = self.node
            cl = int(self.form != "dense" and CHANNELS_LAST_DEPTHWISE and device_type == "cpu")
            got = [_FORM_CODES[self.form], MODE_CODES[self.normalize], node.stride, node.dilation, node.groups,
                   node.size, cl, len(node.parts)]
            for n, p, d in zip(self.sizes, node.parts, node.lattice_dilations()):
                m = p.module
                got += [n, m.stride, m.span // 2, m.dilation, d]
            self._specs[device_type] = got
        return got

    def fused(self, x: Tensor, coefs: Tensor, tensors) -> Tensor | None:
        """The group's output through the fused op, or None where it does not apply."""
        dev, dt = x.device, x.dtype
        if (
            _MERGED_CONV is None
            or torch.is_autocast_enabled(dev.type)
            or torch._C._are_functorch_transforms_active()
            or coefs.dtype != dt
            or any(t.dtype != dt for t in tensors)
            or _backend.resolve(self.backend, dev) not in FUSED_BACKENDS
        ):
            return None
        pattern = _shift_pattern(self.node, x) if self.form != "dense" and self.normalize != "none" else None
        return _MERGED_CONV(x, coefs, list(tensors), pattern, self.spec(dev.type), self.eps)


# What ``nas/_autograd.merged_conv`` runs for a merged group: ``conv`` (stride, dilation, groups)
# and a differentiable ``prepare(x, coefs, tensors) -> (z, kernel)``; the dense form also has
# the analytic backward of its kernel (``build`` and ``kernel_grads``).
class DenseGroup(_Group):
    """The dense form of ``node``: the merged kernel from each part's kernel tensors (a dense
    conv's weight, or a separable unit's depthwise D and pointwise P, whose dense kernel is
    ``P * D^T``), through ``ops.merge_kernels``. Its backward is the conv's and the merge's
    backward kernels and, per separable part, ``grad P = sum_kl grad W D^T`` and
    ``grad D = (sum_o grad W P)^T``: a fixed few ops, no autograd graph."""

    def __init__(self, node: Merged, sizes: list[int], normalize: str, eps: float, backend):
        super().__init__(node, "dense", sizes, normalize, eps, backend)
        self.conv = (node.stride, node.dilation, node.groups)
        self.dilations = node.lattice_dilations()

    def build(self, coefs: Tensor, tensors) -> tuple[Tensor, tuple]:
        kernels, start = [], 0
        for n in self.sizes:
            kernels.append(ConvUnit.dense_from(tensors[start : start + n]))
            start += n
        c = coefs if coefs.dtype == kernels[0].dtype else coefs.to(kernels[0].dtype)
        merged = ops.merge_kernels(kernels, c, self.dilations, self.normalize, self.eps, backend=self.backend)
        return merged, (kernels, c)

    def prepare(self, x: Tensor, coefs: Tensor, tensors) -> tuple[Tensor, Tensor]:
        return x, self.build(coefs, tensors)[0]

    def kernel_grads(self, grad: Tensor, coefs: Tensor, tensors, built) -> list[Tensor]:
        """The gradients of the coefficients and of every kernel tensor for the gradient
        ``grad`` of the merged kernel."""
        kernels, c = built
        g = merge_kernels_backward(grad, kernels, c, self.dilations, self.normalize, self.eps, backend=self.backend)
        out, start = [g[-1] if g[-1].dtype == coefs.dtype else g[-1].to(coefs.dtype)], 0
        for i, n in enumerate(self.sizes):
            if n == 2:
                out.append((g[i] * tensors[start + 1]).sum(0, keepdim=True).transpose(0, 1))
                out.append((g[i] * tensors[start].transpose(0, 1)).sum((2, 3), keepdim=True))
            else:
                out.append(g[i])
            start += n
        return out


class FactoredGroup(_Group):
    """The stacked or separable form of ``node`` (``stacked_input`` / ``separable_input``), with
    the analytic backward of both (``backward``): rebuild z and the 1x1 kernel, then the convs'
    backward kernels, the transposed box sums of the shift channels and the chain rule through
    the coefficients, the normalization statistics (``_statistics_backward``) and, separable,
    the RMS scaling and ``ops.merge_kernels``; a fixed set of ops per group, no autograd graph."""

    conv = (1, 1, 1)

    def __init__(self, node: Merged, form: str, sizes: list[int], normalize: str, eps: float, backend=None):
        super().__init__(node, form, sizes, normalize, eps, backend)
        self._build = stacked_input if form == "stacked" else separable_input

    def prepare(self, x: Tensor, coefs: Tensor, tensors) -> tuple[Tensor, Tensor]:
        return self._build(self.node, x, coefs, tensors, self.normalize, self.eps)

    def backward(self, grad: Tensor, x: Tensor, coefs: Tensor, tensors, need_x: bool):
        """``(grad x, [grad coefs, *grad tensors])`` of ``conv2d(*prepare(x, coefs, tensors))``
        for the output gradient ``grad`` (no autocast: one dtype throughout)."""
        if self.form == "stacked":
            return self._backward_stacked(grad, x, coefs, tensors, need_x)
        return self._backward_separable(grad, x, coefs, tensors, need_x)

    def _backward_stacked(self, grad, x, coefs, tensors, need_x):
        node, normalize = self.node, self.normalize
        z, kernel, xl, c, stats = _stacked(node, x, coefs, tensors, normalize, self.eps)
        gz, gk, _ = torch.ops.aten.convolution_backward(
            grad, z, kernel, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, False]
        )
        gk = gk.flatten(1)
        C, n = x.shape[1], len(node.parts)
        Ds, Ps = tensors[0::2], tensors[1::2]
        gx, gDs = None, []
        for i, (D, p) in enumerate(zip(Ds, node.parts)):
            m = p.module
            gxi, gD, _ = torch.ops.aten.convolution_backward(
                gz[:, i * C : (i + 1) * C], xl, D, None, [m.stride] * 2, [m.span // 2] * 2, [m.dilation] * 2,
                False, [0, 0], C, [need_x, True, False],
            )
            gx = gxi if gx is None else gx + gxi
            gDs.append(gD)
        G = gk[:, : n * C].view(-1, n, C).transpose(0, 1)  # [n, O, C]
        Pst = stats["P"] if stats is not None else torch.stack([P.flatten(1) for P in Ps])
        h = (G * Pst).sum(2)  # [n, O]
        if normalize == "none":
            gP = c[:, None, None] * G
            gc = h.sum(1)
        else:
            gs = gk[:, n * C :].t()  # [n, O]
            a, b = stats["a"], stats["b"]
            gP = (c[:, None] * a).unsqueeze(2) * G
            gc = (a * h).sum(1) + (b * gs).sum(1)
            sP, sD = _statistics_backward(stats, c[:, None] * h, c[:, None] * gs, normalize, Ds)
            gP = gP + sP
            gDs = [g + s for g, s in zip(gDs, sD)]
            if need_x:
                gx = gx + _shift_input_grad(node, gz[:, n * C :], x, _shift_pattern(node, x))
        gts = []
        for gD, gPi, P in zip(gDs, gP.unbind(0), Ps):
            gts += [gD, gPi.view(P.shape)]
        return gx, [gc.to(coefs.dtype), *gts]

    def _backward_separable(self, grad, x, coefs, tensors, need_x):
        node, normalize = self.node, self.normalize
        z, kernel, sv = _separable(node, x, coefs, tensors, normalize, self.eps)
        gz, gk, _ = torch.ops.aten.convolution_backward(
            grad, z, kernel, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, False]
        )
        gk = gk.flatten(1)
        C = x.shape[1]
        half = node.size // 2
        gx, gDm, _ = torch.ops.aten.convolution_backward(
            gz[:, :C], sv["xl"], sv["D"], None, [node.stride] * 2, [half] * 2,
            [node.dilation] * 2, False, [0, 0], C, [need_x, True, False],
        )
        q, c = sv["q"], sv["c"]
        g = merge_kernels_backward(gDm, sv["Dn"], q.to(sv["Dn"][0].dtype), node.lattice_dilations(), "none")
        gDn, gq = g[:-1], g[-1].to(c.dtype)
        Ds, Ps = tensors[0::2], tensors[1::2]
        gpw = gk[:, :C]
        if normalize == "none":
            Pst = torch.stack([P.flatten(1) for P in Ps])
            gc = (gpw * Pst).sum((1, 2))
            gP = c[:, None, None] * gpw
            gDs = gDn
        else:
            stats, rms, scale = sv["stats"], sv["rms"], sv["scale"]
            a, b = stats["a"], stats["b"]
            gs = gk[:, C:].t()  # [n, O]
            h = (gpw * stats["P"]).sum(2)  # [n, O]
            gP = (c[:, None] * scale).unsqueeze(2) * gpw
            gc = (scale * h).sum(1) + (b * gs).sum(1)
            gt = c[:, None] * h  # gradient of a_i r_i
            # D_i / r_i, r_i = sqrt(mean(D_i^2))
            gDr = torch.stack([(gd * D).sum() for gd, D in zip(gDn, Ds)])
            gr = (gt * a).sum(1) - gDr / (rms * rms)
            sP, sD = _statistics_backward(stats, gt * rms[:, None], c[:, None] * gs, normalize, Ds)
            gP = gP + sP
            gDs = [
                gd / r + gri * D / (D.numel() * r) + s
                for gd, D, r, gri, s in zip(gDn, Ds, rms.unbind(0), gr.unbind(0), sD)
            ]
            if need_x:
                gx = gx + _shift_input_grad(node, gz[:, C:], x, _shift_pattern(node, x))
        # q = c / T (T = sum c, or 1 when it is 0)
        gc = gc + (gq - (gq * q).sum() * (sv["total"] != 0)) / sv["safe"]
        gts = []
        for gD, gPi, P in zip(gDs, gP.unbind(0), Ps):
            gts += [gD, gPi.view(P.shape)]
        return gx, [gc.to(coefs.dtype), *gts]


def group_for(node: Merged, form: str, sizes: list[int], normalize: str, eps: float, backend):
    """The group object of ``node`` in ``form``; ``sizes``: the number of kernel tensors of
    each part (2 for a separable unit, 1 for a dense conv)."""
    if form == "dense":
        return DenseGroup(node, sizes, normalize, eps, backend)
    return FactoredGroup(node, form, sizes, normalize, eps, backend)
