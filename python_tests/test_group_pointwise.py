"""The factored merged group's small-tensor work as one op each way (``toponas::group_pointwise_kernel``
and its backward, csrc/group_pointwise.h, called by ``merged_conv_kernel``): the 1x1 kernel and
the separable merge weights equal a direct float64 computation from the definition (each
candidate's dense kernel P D^T standardized per channel or per tensor, then scaled by its
coefficient), and the backward equals autograd through that computation, in both forms and every
normalization, on odd shapes and non-contiguous inputs; float32 keeps the statistics accurate
where the one-pass formula would not; half types run with float accumulation; opcheck passes;
bad input is refused naming what is wrong."""

import pytest
import torch

from toponas_kernels.ops._common import HAS_CPP

pytestmark = pytest.mark.skipif(
    not (HAS_CPP and hasattr(torch.ops.toponas, "group_pointwise_kernel")), reason="the C++ extension lacks group_pointwise"
)

MODES = {0: None, 1: "channel", 2: "tensor"}


def _inputs(n=3, O=5, C=7, ks=(3, 5, 1), dtype=torch.float64, seed=0, contiguous=False):
    g = torch.Generator().manual_seed(seed)
    tensors = []
    for i in range(n):
        k = ks[i % len(ks)]
        D = torch.randn(C, 1, k, k, generator=g, dtype=dtype) + 0.3
        P = torch.randn(O, C, 1, 1, generator=g, dtype=dtype)
        if not contiguous:  # same values, other strides
            D = D.transpose(2, 3).contiguous().transpose(2, 3)
            P = P.transpose(0, 1).contiguous().transpose(0, 1)
        tensors += [D, P]
    coefs = torch.rand(2 * n, generator=g, dtype=dtype)[::2] + 0.1
    return coefs, tensors


def _reference(coefs, tensors, form, normalize, eps):
    """(kernel [O, cols, 1, 1], dw [n] or empty) from the definition, differentiable."""
    Ds, Ps = tensors[0::2], tensors[1::2]
    n, (O, C) = len(Ds), Ps[0].shape[:2]
    a_s, b_s = [], []
    for D, P in zip(Ds, Ps):
        W = P * D.transpose(0, 1)  # [O, C, k, k]
        if normalize:
            dims = (1, 2, 3) if normalize == 1 else (0, 1, 2, 3)
            mean = W.mean(dims, keepdim=True).expand(O, 1, 1, 1).flatten()
            std = W.var(dims, unbiased=False, keepdim=True).sqrt().expand(O, 1, 1, 1).flatten()
            a = 1 / (std + eps)
            a_s.append(a)
            b_s.append(-mean * a)
        else:
            a_s.append(torch.ones(O, dtype=D.dtype))
    rms = [D.pow(2).mean().sqrt() if (form == 2 and normalize) else torch.ones((), dtype=D.dtype) for D in Ds]
    if form == 1:
        cols = [coefs[i] * a_s[i][:, None] * Ps[i].flatten(1) for i in range(n)]
    else:
        cols = [sum(coefs[i] * a_s[i][:, None] * rms[i] * Ps[i].flatten(1) for i in range(n))]
    if normalize:
        cols.append(torch.stack([coefs[i] * b_s[i] for i in range(n)], 1))
    kernel = torch.cat(cols, 1)[:, :, None, None]
    if form == 1:
        return kernel, coefs.new_empty(0)
    total = coefs.sum()
    q = coefs / (total if total != 0 else 1)
    return kernel, torch.stack([q[i] / rms[i] for i in range(n)])


def _op(coefs, tensors, form, normalize, eps):
    return torch.ops.toponas.group_pointwise_kernel(coefs, tensors, form, normalize, eps)


def _op_backward(gk, gdw, coefs, tensors, form, normalize, eps):
    return torch.ops.toponas.group_pointwise_backward_kernel(gk, gdw, coefs, tensors, form, normalize, eps)


def _reference_grads(coefs, tensors, form, normalize, eps, gk, gdw):
    leaves = [coefs.detach().clone().requires_grad_()] + [t.detach().clone().requires_grad_() for t in tensors]
    kernel, dw = _reference(leaves[0], leaves[1:], form, normalize, eps)
    loss = (kernel * gk).sum() + ((dw * gdw).sum() if form == 2 else 0)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)  # D is unused without normalization
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]


@pytest.mark.parametrize("form", [1, 2])
@pytest.mark.parametrize("normalize", [0, 1, 2])
@pytest.mark.parametrize("shape", [dict(n=3, O=5, C=7), dict(n=1, O=1, C=2, ks=(3,)), dict(n=4, O=9, C=3, ks=(5, 3))])
def test_equals_the_definition_in_float64(form, normalize, shape):
    eps = 1e-5
    coefs, tensors = _inputs(**shape)
    kernel, dw = _op(coefs, tensors, form, normalize, eps)
    ref_kernel, ref_dw = _reference(coefs, tensors, form, normalize, eps)
    assert kernel.shape == ref_kernel.shape and kernel.is_contiguous()
    torch.testing.assert_close(kernel, ref_kernel, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-11, atol=1e-12)

    g = torch.Generator().manual_seed(1)
    gk = torch.randn(kernel.shape, generator=g, dtype=kernel.dtype).transpose(0, 1).contiguous().transpose(0, 1)
    gdw = torch.randn(dw.shape, generator=g, dtype=dw.dtype)
    got = _op_backward(gk, gdw, coefs, tensors, form, normalize, eps)
    want = _reference_grads(coefs, tensors, form, normalize, eps, gk, gdw)
    assert len(got) == len(want)
    for a, b, t in zip(got[1:], want[1:], tensors):
        assert a.shape == t.shape
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_separable_coefficients_that_sum_to_zero():
    """q = c / sum c falls back to c when the sum is 0, in values and gradients."""
    coefs, tensors = _inputs()
    coefs = torch.tensor([0.5, -0.5, 0.0], dtype=torch.float64)
    for normalize in (0, 1):
        kernel, dw = _op(coefs, tensors, 2, normalize, 1e-5)
        ref_kernel, ref_dw = _reference(coefs, tensors, 2, normalize, 1e-5)
        torch.testing.assert_close(dw, ref_dw, rtol=1e-12, atol=0)
        gk, gdw = torch.randn_like(kernel), torch.randn_like(dw)
        got = _op_backward(gk, gdw, coefs, tensors, 2, normalize, 1e-5)
        want = _reference_grads(coefs, tensors, 2, normalize, 1e-5, gk, gdw)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_a_constant_channel_passes_no_gradient_through_its_std():
    """std 0 (a constant dense kernel row): a = 1 / eps, and finite gradients (sqrt's derivative
    at 0 is infinite; the op passes nothing through it, as the Python path does)."""
    coefs, tensors = _inputs(n=1, O=2, C=3, ks=(3,))
    D, P = tensors
    D = torch.ones_like(D)
    P = torch.ones_like(P)
    kernel, _ = _op(coefs, [D, P], 1, 1, 1e-3)
    torch.testing.assert_close(kernel[:, :3].flatten(), (coefs[0] / 1e-3).expand(6), rtol=1e-12, atol=0)
    got = _op_backward(torch.randn_like(kernel), torch.empty(0, dtype=D.dtype), coefs, [D, P], 1, 1, 1e-3)
    assert all(torch.isfinite(g).all() for g in got)


@pytest.mark.parametrize("normalize", [1, 2])
def test_float32_statistics_are_accurate_where_one_pass_is_not(normalize):
    """Kernels whose mean is large against their spread: float32 two-pass statistics keep the
    std (a = 1 / (std + eps)) to 2e-4 of the float64 value."""
    g = torch.Generator().manual_seed(0)
    O, C, k = 16, 16, 5
    P = 1 + 1e-3 * torch.randn(O, C, 1, 1, generator=g, dtype=torch.float64)
    D = 50 * (1 + 1e-3 * torch.randn(C, 1, k, k, generator=g, dtype=torch.float64))
    coefs = torch.ones(1, dtype=torch.float64)
    ref, _ = _reference(coefs, [D, P], 1, normalize, 1e-5)
    got, _ = _op(coefs.float(), [D.float(), P.float()], 1, normalize, 1e-5)
    a_ref, a_got = ref[:, :C] / P.flatten(1), got.double()[:, :C] / P.flatten(1)
    torch.testing.assert_close(a_got, a_ref, rtol=2e-4, atol=0)
    # the one-pass E[W^2] - mean^2 in float32 loses the std entirely here
    W = (P * D.transpose(0, 1)).float()
    naive = ((W * W).mean((1, 2, 3)) - W.mean((1, 2, 3)) ** 2).clamp_min(0).sqrt().double()
    true = (P * D.transpose(0, 1)).std((1, 2, 3), unbiased=False)
    assert ((naive - true).abs() / true).max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_types_accumulate_in_float(dtype):
    coefs, tensors = _inputs(dtype=torch.float64)
    half = [t.to(dtype) for t in tensors]
    kernel, dw = _op(coefs.to(dtype), half, 2, 1, 1e-5)
    assert kernel.dtype == dtype and dw.dtype == dtype
    ref, ref_dw = _reference(coefs.to(dtype).double(), [t.double() for t in half], 2, 1, 1e-5)
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(kernel.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(dw.double(), ref_dw, rtol=tol, atol=tol)


@pytest.mark.parametrize("form", [1, 2])
def test_opcheck(form):
    coefs, tensors = _inputs(dtype=torch.float32)
    torch.library.opcheck(torch.ops.toponas.group_pointwise_kernel.default, (coefs, tensors, form, 1, 1e-5))
    kernel, dw = _op(coefs, tensors, form, 1, 1e-5)
    torch.library.opcheck(
        torch.ops.toponas.group_pointwise_backward_kernel.default,
        (torch.randn_like(kernel), torch.randn_like(dw), coefs, tensors, form, 1, 1e-5),
    )


def test_bad_input_is_refused():
    coefs, tensors = _inputs()
    with pytest.raises(RuntimeError, match="form must be"):
        _op(coefs, tensors, 0, 1, 1e-5)
    with pytest.raises(RuntimeError, match="normalize must be"):
        _op(coefs, tensors, 1, 3, 1e-5)
    with pytest.raises(RuntimeError, match="pairs"):
        _op(coefs, tensors[:-1], 1, 1, 1e-5)
    with pytest.raises(RuntimeError, match="coefs must have shape"):
        _op(coefs[:2], tensors, 1, 1, 1e-5)
    with pytest.raises(RuntimeError, match=r"tensors\[3\] has shape"):
        _op(coefs, tensors[:3] + [tensors[3][:2]] + tensors[4:], 1, 1, 1e-5)
    with pytest.raises(RuntimeError, match=r"tensors\[2\] must be a depthwise kernel"):
        _op(coefs, tensors[:2] + [tensors[2][:3]] + tensors[3:], 1, 1, 1e-5)
    with pytest.raises(RuntimeError, match="dtype and device"):
        _op(coefs, tensors[:2] + [tensors[2].float()] + tensors[3:], 1, 1, 1e-5)
    kernel, dw = _op(coefs, tensors, 2, 1, 1e-5)
    with pytest.raises(RuntimeError, match="grad_kernel must have the kernel's shape"):
        _op_backward(kernel[:, :-1], dw, coefs, tensors, 2, 1, 1e-5)
    with pytest.raises(RuntimeError, match="grad_dw must have shape"):
        _op_backward(kernel, dw[:-1], coefs, tensors, 2, 1, 1e-5)


@pytest.mark.cuda
@pytest.mark.cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("form", [1, 2])
@pytest.mark.parametrize("normalize", [0, 1, 2])
def test_cuda_equals_cpu(dtype, form, normalize):
    """The one-block CUDA kernel runs the CPU's phases: same values (its threads stride over more
    indices than a block has threads here)."""
    coefs, tensors = _inputs(n=5, O=40, C=33, ks=(3, 5, 7), dtype=dtype)
    kernel, dw = _op(coefs, tensors, form, normalize, 1e-5)
    on = [t.cuda() for t in tensors]
    kernel_c, dw_c = _op(coefs.cuda(), on, form, normalize, 1e-5)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernel_c.cpu(), kernel, **tol)
    torch.testing.assert_close(dw_c.cpu(), dw, **tol)
    gk, gdw = torch.randn_like(kernel), torch.randn_like(dw)
    got = _op_backward(gk.cuda(), gdw.cuda(), coefs.cuda(), on, form, normalize, 1e-5)
    want = _op_backward(gk, gdw, coefs, tensors, form, normalize, 1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, **tol)
