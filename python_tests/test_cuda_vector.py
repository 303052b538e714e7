"""The CUDA mixed_sum kernels' 16-byte vector path against the reference, on a GPU.

The vector path runs when every pointer is 16-byte aligned; the last n % V elements
(V = 16 / element size) and any misaligned launch take the scalar path. Sizes here cover whole
vectors, tails of 1..7 elements, n < V, chunked K (> 16) and a grid-stride loop that wraps.
Tolerances are bounds from the dtypes' rounding, relative to sum_k |w_k y_k| per element (or
sum_i |g_i y_ik| for grad_w): one wrong or missing element breaks them."""

import pytest
import torch

from toponas_kernels import ops

pytestmark = [pytest.mark.cuda, pytest.mark.cuda_kernels]  # the CUDA backend itself

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
KS = [3, 8, 17]  # 17 > kChunk = 16: two launches and the fp32 running-sum buffer
SIZES = [8 * 64, 8 * 37 + 1, 8 * 37 + 3, 8 * 37 + 7, 5, 8 * 1000 + 3]  # whole vectors, tails, n < V, 4 blocks


def _eps(dtype):
    return torch.finfo(dtype).eps


def _acc_eps(dtype):
    return _eps(torch.float64 if dtype == torch.float64 else torch.float32)


def _place(values, offset):
    """values (1-D) copied into storage that starts `offset` elements past an allocation."""
    buf = torch.empty(values.numel() + offset, dtype=values.dtype, device=values.device)
    view = buf[offset:]
    view.copy_(values)
    return view


def _inputs(k, n, dtype, misaligned=False):
    """k candidates of n elements; with misaligned, the last (in the last chunk) is moved."""
    ys = [torch.randn(n, dtype=torch.float64, device="cuda").to(dtype) for _ in range(k)]
    w = torch.randn(k, dtype=torch.float64, device="cuda").to(dtype)
    if misaligned:
        ys[-1] = _place(ys[-1], 1)
        assert ys[-1].data_ptr() % 16 != 0
    return ys, w


def _check(actual, expected, scale, eps, what):
    fi = torch.finfo(actual.dtype)
    err = (actual.double() - expected).abs()
    bound = eps * scale + fi.tiny * fi.eps  # the floor: the spacing of subnormals
    bad = err > bound
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {err.numel()} elements out of bound; worst excess at "
        f"{int((err - bound).argmax())}: got {actual.flatten()[int((err - bound).argmax())].item():.8g}"
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
def test_mixed_sum_cuda_matches_reference(dtype, k, n, misaligned):
    ys, w = _inputs(k, n, dtype, misaligned)
    ys = [y.requires_grad_() for y in ys]
    w.requires_grad_()
    out = ops.mixed_sum(ys, w, backend="cuda")
    g = torch.randn(n, dtype=torch.float64, device="cuda").to(dtype)
    grads = torch.autograd.grad(out, ys + [w], g)

    ys64 = [y.detach().double().requires_grad_() for y in ys]
    w64 = w.detach().double().requires_grad_()
    exp = ops.mixed_sum(ys64, w64, backend="reference")
    exp_grads = torch.autograd.grad(exp, ys64 + [w64], g.double())

    tag = f"{dtype} k={k} n={n} misaligned={misaligned}"
    e, ea = _eps(dtype), _acc_eps(dtype)
    y64 = torch.stack([y.detach().double() for y in ys])  # [k, n]
    w_abs, g_abs = w64.detach().abs(), g.double().abs()
    # out rounds once to dtype (<= eps/2 relative) after k fused multiply-adds in the acc dtype.
    _check(out, exp, (w_abs[:, None] * y64.abs()).sum(0), e + k * ea, f"forward {tag}")
    for j in range(k):  # grad_y_j = w_j * g, rounded once
        _check(grads[j], exp_grads[j], w_abs[j] * g_abs, e, f"grad_y[{j}] {tag}")
    # grad_w: a sum of n products in the acc dtype (serial per thread, then trees), rounded once.
    _check(grads[k], exp_grads[k], (g_abs * y64.abs()).sum(1), e + 64 * ea, f"grad_w {tag}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [3, 17])
def test_vector_and_scalar_paths_agree(dtype, k):
    """The same values through the vector path (all aligned) and the scalar path (one input
    misaligned): out and grad_y must be equal, not just close (same per-element arithmetic);
    grad_w may differ only by summation order. Repeats are bitwise identical."""
    n = 8 * 129 + 5
    ys, w = _inputs(k, n, dtype)
    g = torch.randn(n, device="cuda").to(dtype)
    fwd, bwd = torch.ops.toponas.mixed_sum_kernel, torch.ops.toponas.mixed_sum_backward_kernel
    vec_out, vec_grads = fwd(ys, w), bwd(g, ys, w)
    moved = list(ys)
    moved[k // 2] = _place(ys[k // 2], 1)
    g_moved = _place(g, 1)
    assert torch.equal(fwd(moved, w), vec_out), "forward: vector and scalar paths differ"
    for gg, yy in ((g, moved), (g_moved, ys)):  # a misaligned candidate, then a misaligned g
        sca_grads = bwd(gg, yy, w)
        for j in range(k):
            assert torch.equal(sca_grads[j], vec_grads[j]), f"grad_y[{j}]: vector and scalar paths differ"
        bound = (_eps(dtype) + 64 * _acc_eps(dtype)) * (g.double().abs() * torch.stack(ys).double().abs()).sum(1)
        assert ((sca_grads[k].double() - vec_grads[k].double()).abs() <= 2 * bound).all(), "grad_w"
    again = bwd(g, ys, w)
    for a, b in zip(again, vec_grads):
        assert torch.equal(a, b), "backward is not bitwise deterministic"


def _ints(shape, low, high, dtype):
    return torch.randint(low, high, shape, device="cuda").to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
def test_exact_on_small_integers(dtype, k, n, misaligned):
    """Small integer values: every sum is exact in the acc dtype, so out, grad_y and grad_w must
    equal the float64 reference rounded to dtype, and a dropped or repeated element shows
    (whatever the output precision)."""
    ys = [_ints((n,), -2, 3, dtype) for _ in range(k)]
    if misaligned:
        ys[-1] = _place(ys[-1], 1)
    w = _ints((k,), -2, 3, dtype)
    g = _ints((n,), -2, 3, dtype)
    ys = [y.requires_grad_() for y in ys]
    w.requires_grad_()
    out = ops.mixed_sum(ys, w, backend="cuda")
    grads = torch.autograd.grad(out, ys + [w], g)
    y64, w64, g64 = torch.stack([y.detach() for y in ys]).double(), w.detach().double(), g.double()
    tag = f"{dtype} k={k} n={n} misaligned={misaligned}"
    assert torch.equal(out, (w64[:, None] * y64).sum(0).to(dtype)), f"forward {tag}"
    for j in range(k):
        assert torch.equal(grads[j], (w64[j] * g64).to(dtype)), f"grad_y[{j}] {tag}"
    assert torch.equal(grads[k], (y64 @ g64).to(dtype)), f"grad_w {tag}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_grid_stride_wraps(dtype):
    """More elements than one pass of the backward grid (2048 blocks x 256 threads x 8 for fp16,
    x 4 for fp32), with a tail: every element is visited exactly once. Integer values keep
    every result exact; the y of the backward are nonzero only at ~1000 positions (among them
    the first, the last and those around each pass boundary), so grad_w stays exact in fp16."""
    n = 2048 * 256 * 8 * 2 + 8 * 1000 + 3
    w = torch.tensor([1.0, -2.0, 3.0], device="cuda").to(dtype)
    ys = [_ints((n,), 1, 3, dtype) for _ in range(3)]
    out = torch.ops.toponas.mixed_sum_kernel(ys, w)
    y64, w64 = torch.stack(ys).double(), w.double()
    assert torch.equal(out, (w64[:, None] * y64).sum(0).to(dtype)), "forward"
    g = (_ints((n,), 0, 2, dtype) * 2 - 1)  # +-1 everywhere
    marks = torch.cat([torch.randint(0, n, (1000,)), torch.tensor([0, n - 1, n - 2, n - 4, n - 5])])
    for p in (2048 * 256 * 4, 2048 * 256 * 8, 2048 * 256 * 12, 2048 * 256 * 16):
        marks = torch.cat([marks, torch.arange(p - 9, p + 9)])
    sparse = []
    for _ in range(3):
        y = torch.zeros(n, dtype=dtype, device="cuda")
        y[marks.cuda()] = _ints((marks.numel(),), 0, 2, dtype) * 2 - 1
        sparse.append(y)
    grads = torch.ops.toponas.mixed_sum_backward_kernel(g, sparse, w)
    s64, g64 = torch.stack(sparse).double(), g.double()
    for j in range(3):
        assert torch.equal(grads[j], (w64[j] * g64).to(dtype)), f"grad_y[{j}]"
    assert torch.equal(grads[3], (s64 @ g64).to(dtype)), "grad_w"
