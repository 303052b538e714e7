# TEMPORARY placeholder while the fused kernels are written; replaced in this session.
import torch
from . import reference as _ref


def mixed_sum(outputs, weights, *, backend=None):
    if isinstance(outputs, torch.Tensor):
        outputs = list(outputs.unbind(0))
    return _ref.mixed_sum_ref(list(outputs), weights)


def masked_softmax(logits, mask=None, *, tau=1.0, backend=None):
    if mask is None:
        mask = torch.ones_like(logits, dtype=torch.bool)
    return _ref.masked_softmax_ref(logits, mask, tau)


def gumbel_softmax(logits, mask=None, *, tau=1.0, hard=True, generator=None, backend=None):
    if mask is None:
        mask = torch.ones_like(logits, dtype=torch.bool)
    u = torch.empty_like(logits).exponential_(generator=generator)
    probs = _ref.masked_softmax_ref(logits - u.log(), mask, tau)
    if not hard:
        return probs
    index = probs.argmax(-1, keepdim=True)
    one_hot = torch.zeros_like(probs).scatter_(-1, index, 1.0)
    return one_hot - probs.detach() + probs
