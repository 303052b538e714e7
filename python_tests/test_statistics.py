"""Kernel-normalization statistics of the stacked and separable forms in float32 (``forms._statistics``
and the fused op's in csrc/group_pointwise.h): two passes over centred values, no float64
round trip, and accurate where ``E[W^2] - mean^2`` is not, on kernels whose mean is large against
their spread; compared with the float64 standardization of the dense kernel."""

import sys
from pathlib import Path

import pytest
import torch

from toponas_kernels import FusedMixedOp
from toponas_kernels.nas import forms as Fm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import _harness as H  # noqa: E402


def _badly_conditioned(O=16, C=16, k=5, mean=50.0, spread=1e-3, seed=0):
    """P [O, C, 1, 1] near 1 and D [C, 1, k, k] near ``mean``: W = P D has a mean about ``mean``
    and a spread about ``mean * spread``."""
    g = torch.Generator().manual_seed(seed)
    P = 1 + spread * torch.randn(O, C, 1, 1, generator=g, dtype=torch.float64)
    D = mean * (1 + spread * torch.randn(C, 1, k, k, generator=g, dtype=torch.float64))
    return P, D


def _reference(P, D, normalize, eps):
    """float64 ``(a, b)`` from the dense kernel W[o, c] = P[o, c] D[c]."""
    W = P * D.transpose(0, 1)
    dims = (1, 2, 3) if normalize == "channel" else (0, 1, 2, 3)
    mean = W.mean(dims, keepdim=True).expand(W.shape[0], 1, 1, 1).flatten()
    std = W.std(dims, unbiased=False, keepdim=True).expand(W.shape[0], 1, 1, 1).flatten()
    a = 1 / (std + eps)
    return a, -mean * a


def _naive_std(P, D):
    """The one-pass ``sqrt(E[W^2] - mean^2)`` in P's dtype: what cancellation does to it."""
    p, d = P.flatten(1), D.flatten(1)
    C = p.shape[1]
    mean = p @ d.mean(1) / C
    sq = (p * p) @ (d * d).mean(1) / C
    return (sq - mean * mean).clamp_min(0).sqrt()


@pytest.mark.parametrize("normalize", ["channel", "tensor"])
@pytest.mark.parametrize("mean,spread", [(50.0, 1e-3), (1e3, 1e-4), (0.0, 1.0)])
def test_float32_statistics_match_float64(normalize, mean, spread):
    eps = 1e-5
    P, D = _badly_conditioned(mean=mean, spread=spread)
    a64, b64 = _reference(P, D, normalize, eps)
    a32, b32 = Fm.normalization_affine(P.float(), D.float(), normalize, eps)
    assert a32.dtype == torch.float32
    # a = 1 / (std + eps): relative accuracy of the std; b = -mean a, whose size is mean / std
    torch.testing.assert_close(a32.double(), a64, rtol=2e-4, atol=0)
    torch.testing.assert_close(b32.double(), b64, rtol=2e-4, atol=1e-3)


def test_one_pass_formula_would_fail_here():
    """The case above is one where float32 ``E[W^2] - mean^2`` loses the variance: the test can
    tell an accurate scheme from the one it replaced."""
    P, D = _badly_conditioned(mean=1e3, spread=1e-4)
    a64, _ = _reference(P, D, "channel", 1e-5)
    naive = _naive_std(P.float(), D.float()).double()
    std64 = 1 / a64 - 1e-5
    assert ((naive - std64).abs() / std64).max() > 0.05


def test_no_float64_round_trip():
    """float32 statistics make no dtype copies (``_to_copy``) in forward or backward."""
    P, D = _badly_conditioned()
    P, D = P.float().requires_grad_(), D.float().requires_grad_()
    with H.OpCounter() as fwd:
        a, b = Fm.normalization_affine(P, D, "channel", 1e-5)
    with H.OpCounter() as bwd:
        (a.sum() + b.sum()).backward()
    assert "aten::_to_copy" not in fwd.counts and "aten::_to_copy" not in bwd.counts


@pytest.mark.parametrize("merge", ["stacked", "separable"])
def test_float32_group_matches_float64_on_badly_conditioned_kernels(merge):
    """A whole edge in float32 (the fused op where built, else the Python path) against the same
    edge in float64, with every depthwise kernel shifted to a large mean: the outputs agree to
    float32 accuracy, which they would not if the statistics cancelled."""
    torch.manual_seed(0)
    op = FusedMixedOp(8, 1, merge=merge, primitives=["sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3"])
    with torch.no_grad():
        for m in op.modules():
            if isinstance(m, torch.nn.Conv2d) and m.groups > 1:
                m.weight.mul_(1e-3).add_(30.0)
    op64 = FusedMixedOp(8, 1, merge=merge, primitives=["sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3"]).double()
    op64.load_state_dict(op.state_dict())
    x = torch.randn(2, 8, 9, 9)
    w = torch.softmax(torch.randn(len(op.primitives)), 0)
    y32, y64 = op(x, w), op64(x.double(), w.double())
    err = (y32.double() - y64).abs().max() / y64.abs().max()
    assert err < 1e-4
