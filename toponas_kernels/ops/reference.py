"""Plain eager PyTorch references of every op: the readable definition, the test oracle and the
``backend="reference"`` path. They take already-checked arguments (see ``_checks``) and are
differentiated by autograd, not by hand.

Half-precision inputs are computed in float32 and cast back, as the kernels do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

NORMALIZE_MODES = ("channel", "tensor", "none")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of every kernel: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- family 1
def mixed_sum_ref(outputs: Sequence[Tensor], weights: Tensor) -> Tensor:
    """``sum_k weights[k] * outputs[k]``."""
    acc = acc_dtype(outputs[0].dtype)
    w = weights.to(acc)
    out = w[0] * outputs[0].to(acc)
    for k in range(1, len(outputs)):
        out = out + w[k] * outputs[k].to(acc)
    return out.to(outputs[0].dtype)


def masked_softmax_ref(logits: Tensor, mask: Tensor, tau: float = 1.0) -> Tensor:
    """Softmax of ``logits / tau`` over the last dim, restricted to ``mask``: masked entries are
    exactly 0 and take no part in the normalisation (docs/DESIGN.md section 1). A row with no
    active entry is all zeros with zero gradient (its softmax is taken over finite values, then
    masked, so no NaN appears even inside autograd)."""
    acc = acc_dtype(logits.dtype)
    z = (logits.to(acc) / tau).masked_fill(~mask, float("-inf"))
    z = z.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    return torch.softmax(z, dim=-1).masked_fill(~mask, 0.0).to(logits.dtype)


# ----------------------------------------------------------------------------- family 2
def merged_size(kernel_sizes: Sequence[int], dilations: Sequence[int]) -> int:
    """The common kernel size: max_i (k_i - 1) d_i + 1 (docs/DESIGN.md section 5)."""
    return max((k - 1) * d + 1 for k, d in zip(kernel_sizes, dilations))


def standardize_ref(kernel: Tensor, normalize: str, eps: float) -> Tensor:
    """Kernel normalization (docs/DESIGN.md section 6): subtract the mean and divide by the population
    standard deviation plus eps, per output channel (``"channel"``), over the whole kernel
    (``"tensor"``), or not at all (``"none"``)."""
    if normalize == "none":
        return kernel
    dims = tuple(range(1, kernel.dim())) if normalize == "channel" else tuple(range(kernel.dim()))
    mean = kernel.mean(dim=dims, keepdim=True)
    std = (kernel - mean).pow(2).mean(dim=dims, keepdim=True).sqrt()
    return (kernel - mean) / (std + eps)


def embed_ref(kernel: Tensor, dilation: int, size: int) -> Tensor:
    """Place a k x k kernel with dilation d centred in a size x size kernel (taps d apart)."""
    k = kernel.shape[-1]
    span = (k - 1) * dilation + 1
    start = (size - span) // 2
    out = kernel.new_zeros(*kernel.shape[:-2], size, size)
    out[..., start : start + span : dilation, start : start + span : dilation] = kernel
    return out


def merge_kernels_ref(
    kernels: Sequence[Tensor],
    weights: Tensor,
    dilations: Sequence[int],
    normalize: str = "channel",
    eps: float = 1e-5,
) -> Tensor:
    """``sum_i weights[i] * embed(standardize(kernels[i]))``: one conv equal to the weighted sum
    of K convs of different size and dilation (same stride, groups and padding 'same')."""
    acc = acc_dtype(kernels[0].dtype)
    size = merged_size([k.shape[-1] for k in kernels], dilations)
    w = weights.to(acc)
    out = None
    for i, (kernel, d) in enumerate(zip(kernels, dilations)):
        term = w[i] * embed_ref(standardize_ref(kernel.to(acc), normalize, eps), d, size)
        out = term if out is None else out + term
    return out.to(kernels[0].dtype)


# ----------------------------------------------------------------------------- family 3
def channel_shuffle_ref(x: Tensor, groups: int) -> Tensor:
    """View channels as (groups, C/groups), swap the two, flatten (ShuffleNet, PC-DARTS)."""
    b, c = x.shape[:2]
    rest = x.shape[2:]
    return x.reshape(b, groups, c // groups, *rest).transpose(1, 2).reshape(b, c, *rest)


def partial_channel_shuffle_ref(processed: Tensor, bypass: Tensor, groups: int) -> Tensor:
    """The PC-DARTS output step: ``channel_shuffle(cat([processed, bypass], 1), groups)``."""
    return channel_shuffle_ref(torch.cat([processed, bypass], dim=1), groups)
