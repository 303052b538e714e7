"""Family 1: mixed_sum, masked_softmax, gumbel_softmax on every backend against the reference."""

import pytest
import torch

from toponas_kernels import ops
from toponas_kernels.ops import reference as R
from utils import CUDA_KERNELS, assert_close, backend_cases, dtypes_for, noncontiguous

# Odd shapes: primes, size-1 dims, a scalar-sized output, one larger than a Triton block.
SHAPES = [(7,), (1, 3, 5, 5), (2, 13, 1, 11), (3, 1031)]
KS = [1, 3, 8, 9, 17]  # 8 and 16 are chunk sizes of the Triton and CUDA launches


def _inputs(k, shape, dtype, device, contiguous=True):
    ys = [torch.randn(shape, dtype=torch.float64, device=device).to(dtype) for _ in range(k)]
    w = torch.randn(k, dtype=torch.float64, device=device).to(dtype)
    if not contiguous:  # every argument strided, the weights included
        ys = [noncontiguous(y) for y in ys]
        w = noncontiguous(w)
    return ys, w


def _expected(ys, w, g):
    """Reference in float64 on the same (rounded) inputs, with autograd gradients."""
    ys64 = [y.detach().to(torch.float64).requires_grad_() for y in ys]
    w64 = w.detach().to(torch.float64).requires_grad_()
    out = R.mixed_sum_ref(ys64, w64)
    grads = torch.autograd.grad(out, ys64 + [w64], g.to(torch.float64))
    return out, grads


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("shape", SHAPES)
def test_mixed_sum_matches_reference(backend, device, k, shape):
    for dtype in dtypes_for(device):
        for contiguous in (True, False):
            ys, w = _inputs(k, shape, dtype, device, contiguous)
            ys = [y.requires_grad_() for y in ys]
            w.requires_grad_()
            out = ops.mixed_sum(ys, w, backend=backend)
            g = torch.randn_like(out)
            grads = torch.autograd.grad(out, ys + [w], g)
            exp_out, exp_grads = _expected(ys, w, g)
            tag = f"{backend} {dtype} k={k} shape={shape} contiguous={contiguous}"
            assert out.dtype == dtype and out.shape == ys[0].shape
            assert_close(out, exp_out, dtype, f"forward {tag}")
            for i, (a, e) in enumerate(zip(grads, exp_grads)):
                # grad_w sums over many elements: its error grows with their count.
                scale = 1.0 if i < k else max(1.0, ys[0].numel() ** 0.5)
                assert_close(a / scale, e / scale, dtype, f"grad {i} {tag}")


@pytest.mark.parametrize("backend,device", backend_cases())
def test_mixed_sum_stacked_input_and_determinism(backend, device):
    stacked = torch.randn(5, 2, 3, 7, dtype=torch.float32, device=device, requires_grad=True)
    w = torch.randn(5, device=device, requires_grad=True)
    out = ops.mixed_sum(stacked, w, backend=backend)
    assert_close(out, R.mixed_sum_ref(list(stacked.unbind(0)), w), what="stacked")
    g = torch.randn_like(out)
    first = torch.autograd.grad(out, (stacked, w), g)
    again = torch.autograd.grad(ops.mixed_sum(stacked, w, backend=backend), (stacked, w), g)
    for a, b in zip(first, again):
        assert torch.equal(a, b), "backward is not bitwise deterministic"


@pytest.mark.parametrize("backend,device", backend_cases())
def test_mixed_sum_gradcheck(backend, device):
    ys = [torch.randn(2, 3, 5, dtype=torch.float64, device=device, requires_grad=True) for _ in range(3)]
    w = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.mixed_sum(list(a[:-1]), a[-1], backend=backend), (*ys, w))


@pytest.mark.parametrize("backend,device", backend_cases())
def test_mixed_ops_opcheck(backend, device):
    ys = [torch.randn(2, 3, 5, device=device, requires_grad=True) for _ in range(3)]
    w = torch.randn(3, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.toponas.mixed_sum.default, (ys, w, backend))
    g = torch.randn(2, 3, 5, device=device)
    torch.library.opcheck(torch.ops.toponas.mixed_sum_backward.default, (g, [y.detach() for y in ys], w.detach(), backend))
    logits = torch.randn(4, 6, device=device, requires_grad=True)
    mask = torch.tensor([[1, 0, 1, 1, 0, 1]] * 4, dtype=torch.bool, device=device)
    torch.library.opcheck(torch.ops.toponas.masked_softmax.default, (logits, mask, 0.5, backend))
    p = ops.masked_softmax(logits.detach(), mask, tau=0.5)
    torch.library.opcheck(torch.ops.toponas.masked_softmax_backward.default, (torch.randn_like(p), p, 0.5, backend))
    # channels_last in: every backend returns what the fake promises (contiguous).
    cl = [torch.randn(2, 3, 4, 5, device=device).contiguous(memory_format=torch.channels_last).requires_grad_() for _ in range(3)]
    torch.library.opcheck(torch.ops.toponas.mixed_sum.default, (cl, w, backend))
    g = torch.randn(2, 3, 4, 5, device=device).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.toponas.mixed_sum_backward.default, (g, [y.detach() for y in cl], w.detach(), backend))
    x = cl[0].detach().requires_grad_()
    m4 = (torch.rand(2, 3, 4, 5, device=device) > 0.3).contiguous(memory_format=torch.channels_last)
    m4[..., 0] = True
    torch.library.opcheck(torch.ops.toponas.masked_softmax.default, (x, m4, 0.5, backend))
    p4 = ops.masked_softmax(x.detach(), m4).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.toponas.masked_softmax_backward.default, (g, p4, 0.5, backend))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA_KERNELS)])
def test_compiled_kernels_opcheck(device):
    from toponas_kernels import _lib

    if not _lib.HAS_CPP:
        pytest.skip("compiled extension not loaded")
    ys = [torch.randn(2, 3, 5, device=device) for _ in range(3)]
    w = torch.randn(3, device=device)
    torch.library.opcheck(torch.ops.toponas.mixed_sum_kernel.default, (ys, w))
    torch.library.opcheck(torch.ops.toponas.mixed_sum_backward_kernel.default, (torch.randn_like(ys[0]), ys, w))
    logits = torch.randn(4, 6, device=device)
    mask = torch.rand(4, 6, device=device) > 0.3
    mask[:, 2] = True
    torch.library.opcheck(torch.ops.toponas.masked_softmax_kernel.default, (logits, mask, 2.0))
    ys = [y.requires_grad_() for y in ys]
    torch.library.opcheck(torch.ops.toponas.mixed_sum_fused.default, (ys, w.requires_grad_()))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA_KERNELS)])
def test_fast_path_autograd_in_cpp(device):
    """In eager mode the compiled backends run mixed_sum with its autograd node in C++
    (csrc/mixed_sum.cpp): outputs and gradients equal the reference on strided inputs, the graph
    node is the C++ one, float64 gradcheck passes, and without autograd (inference mode) the
    op falls through to the kernel."""
    from toponas_kernels import _lib

    if not _lib.HAS_CPP:
        pytest.skip("compiled extension not loaded")
    backend = "cuda" if device == "cuda" else "cpp"
    ys, w = _inputs(5, (3, 4, 7), torch.float64, device, contiguous=False)
    ys = [y.requires_grad_() for y in ys]
    w.requires_grad_()
    out = ops.mixed_sum(ys, w, backend=backend)
    assert "MixedSumFunction" in out.grad_fn.name()
    g = torch.randn_like(out)
    ref, ref_grads = _expected(ys, w, g)
    assert_close(out, ref)
    for got, want in zip(torch.autograd.grad(out, ys + [w], g), ref_grads):
        assert_close(got, want)
    assert torch.autograd.gradcheck(lambda *a: ops.mixed_sum(list(a[:-1]), a[-1], backend=backend), (*ys, w))
    with torch.inference_mode():
        plain = [y.detach().clone() for y in ys]
        assert_close(ops.mixed_sum(plain, w.detach().clone(), backend=backend), ref)


def test_cuda_kernels_registered():
    """Compiled with CUDA here (no GPU): the CUDA implementations must be registered."""
    from toponas_kernels import _lib

    build = _lib.build_config()
    if not build.get("cuda"):
        pytest.skip("this build has no CUDA kernels (see toponas_kernels/_build_config.json)")
    assert _lib.cuda_built()
    for name in ("mixed_sum_kernel", "mixed_sum_backward_kernel", "masked_softmax_kernel", "masked_softmax_backward_kernel"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"toponas::{name}", "CUDA"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"toponas::{name}", "CPU"), name
    # The fast path's op: its autograd node in C++, below autograd the kernel op on any device.
    for key in ("AutogradCUDA", "CUDA"):  # registered through the Autograd / CompositeExplicitAutograd aliases
        assert torch._C._dispatch_has_computed_kernel_for_dispatch_key("toponas::mixed_sum_fused", key), key


@pytest.mark.parametrize("backend,device", backend_cases())
def test_masked_softmax_matches_reference(backend, device):
    for dtype in dtypes_for(device):
        for shape in [(1,), (5,), (3, 8), (14, 7), (2, 3, 17)]:
            logits = torch.randn(shape, dtype=torch.float64, device=device).to(dtype).requires_grad_()
            mask = torch.rand(shape, device=device) > 0.4
            mask[..., shape[-1] // 2] = True
            for tau in (1.0, 0.3):
                p = ops.masked_softmax(logits, mask, tau=tau, backend=backend)
                g = torch.randn_like(p)
                (grad,) = torch.autograd.grad(p, logits, g)
                x64 = logits.detach().to(torch.float64).requires_grad_()
                p64 = R.masked_softmax_ref(x64, mask, tau)
                (grad64,) = torch.autograd.grad(p64, x64, g.to(torch.float64))
                tag = f"{backend} {dtype} {shape} tau={tau}"
                assert_close(p, p64, dtype, f"forward {tag}")
                assert_close(grad, grad64, dtype, f"grad {tag}")
                assert torch.all(p[~mask] == 0) and torch.all(grad[~mask] == 0), tag


@pytest.mark.parametrize("backend,device", backend_cases())
def test_masked_softmax_fully_masked_row(backend, device):
    """A row with every entry masked is all zeros with zero gradient on every backend (not the
    NaN of 0 / 0), the other rows are untouched, and the Gumbel weights of that row are 0 too,
    hard or soft."""
    for dtype in dtypes_for(device):
        for k in (1, 5, 17):  # one entry, a few, more than one 16-wide Triton block
            logits = (torch.randn(4, k, dtype=torch.float64, device=device) * 3).to(dtype).requires_grad_()
            mask = torch.rand(4, k, device=device) > 0.4
            mask[1:, 0] = True
            mask[0] = False
            for tau in (1.0, 0.3):
                p = ops.masked_softmax(logits, mask, tau=tau, backend=backend)
                g = torch.randn_like(p)
                (grad,) = torch.autograd.grad(p, logits, g)
                tag = f"{backend} {dtype} k={k} tau={tau}"
                assert torch.isfinite(p).all() and torch.isfinite(grad).all(), tag
                assert torch.all(p[0] == 0) and torch.all(grad[0] == 0), tag
                x64 = logits.detach()[1:].to(torch.float64).requires_grad_()
                p64 = torch.softmax((x64 / tau).masked_fill(~mask[1:], float("-inf")), -1)
                (grad64,) = torch.autograd.grad(p64, x64, g[1:].to(torch.float64))
                assert_close(p[1:], p64, dtype, f"forward {tag}")
                assert_close(grad[1:], grad64, dtype, f"grad {tag}")
            for hard in (True, False):
                gen = torch.Generator(device=device).manual_seed(1)
                w = ops.gumbel_softmax(logits, mask, hard=hard, generator=gen, backend=backend)
                (gw,) = torch.autograd.grad(w, logits, torch.randn_like(w))
                assert torch.all(w[0] == 0) and torch.all(gw[0] == 0), f"gumbel hard={hard} {backend} {dtype}"
                assert_close(w[1:].detach().sum(-1), torch.ones(3, dtype=dtype, device=device), dtype, "rows sum to 1")


@pytest.mark.parametrize("backend,device", backend_cases())
def test_masked_softmax_many_rows(backend, device):
    """More rows than one CUDA block of the softmax takes (128 threads, a row each): several
    blocks and a partial last one; every 7th row fully masked."""
    logits = torch.randn(3 * 128 + 5, 8, device=device, requires_grad=True)
    mask = torch.rand(3 * 128 + 5, 8, device=device) > 0.5
    mask[:, 3] = True
    mask[::7] = False
    p = ops.masked_softmax(logits, mask, tau=0.7, backend=backend)
    g = torch.randn_like(p)
    (grad,) = torch.autograd.grad(p, logits, g)
    x64 = logits.detach().double().requires_grad_()
    p64 = R.masked_softmax_ref(x64, mask, 0.7)
    (grad64,) = torch.autograd.grad(p64, x64, g.double())
    assert_close(p, p64, torch.float32, f"forward {backend}")
    assert_close(grad, grad64, torch.float32, f"grad {backend}")
    assert torch.all(p[::7] == 0) and torch.all(grad[::7] == 0)


def test_masked_softmax_reference_fully_masked_row_has_no_nan_inside():
    """The reference's own autograd graph stays finite for a fully masked row (a NaN inside it
    would surface in double backward), and its second derivative there is 0 as well."""
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[False] * 4, [True, False, True, True], [True] * 4])
    p = R.masked_softmax_ref(x, mask, 0.5)
    (gx,) = torch.autograd.grad(p, x, torch.randn_like(p), create_graph=True)
    (ggx,) = torch.autograd.grad(gx.pow(2).sum(), x)
    assert torch.all(p[0] == 0) and torch.all(gx[0] == 0) and torch.all(ggx[0] == 0)
    assert torch.isfinite(ggx).all()
    assert torch.autograd.gradgradcheck(lambda t: R.masked_softmax_ref(t, mask, 0.5), (x,))


@pytest.mark.parametrize("backend,device", backend_cases())
def test_masked_softmax_strided_inputs(backend, device):
    """Logits and mask as transposed views (rows strided), the mask a different view than the
    logits: the values must not depend on the layout."""
    logits = torch.randn(9, 5, dtype=torch.float64, device=device).t().requires_grad_()
    mask = torch.rand(9, 5, device=device) > 0.4
    mask[2] = True
    mask = mask.t()
    assert not logits.is_contiguous() and not mask.is_contiguous()
    p = ops.masked_softmax(logits, mask, tau=0.7, backend=backend)
    g = torch.randn_like(p)
    (grad,) = torch.autograd.grad(p, logits, g)
    x64 = logits.detach().contiguous().requires_grad_()
    p64 = R.masked_softmax_ref(x64, mask.contiguous(), 0.7)
    (grad64,) = torch.autograd.grad(p64, x64, g)
    assert_close(p, p64, what=f"forward {backend}")
    assert_close(grad, grad64, what=f"grad {backend}")
    # A column of a wider weight table as mixed_sum weights (the layout of a searcher's weight table).
    table = torch.randn(4, 3, dtype=torch.float64, device=device)
    ys = [torch.randn(6, dtype=torch.float64, device=device) for _ in range(4)]
    assert_close(ops.mixed_sum(ys, table[:, 1], backend=backend), R.mixed_sum_ref(ys, table[:, 1].contiguous()), what="column weights")


@pytest.mark.parametrize("backend,device", backend_cases())
def test_masked_softmax_gradcheck(backend, device):
    x = torch.randn(3, 7, dtype=torch.float64, device=device, requires_grad=True)
    mask = torch.rand(3, 7, device=device) > 0.5
    mask[:, 0] = True
    assert torch.autograd.gradcheck(lambda x: ops.masked_softmax(x, mask, tau=0.6, backend=backend), (x,))
    # Without a mask it is the plain softmax.
    assert_close(ops.masked_softmax(x, backend=backend), torch.softmax(x, -1), what="no mask")


@pytest.mark.parametrize("backend,device", backend_cases())
def test_gumbel_softmax(backend, device):
    alpha = torch.randn(14, 8, dtype=torch.float64, device=device, requires_grad=True)
    mask = torch.ones(14, 8, dtype=torch.bool, device=device)
    mask[:, 0] = False
    gen = torch.Generator(device=device).manual_seed(3)
    hard = ops.gumbel_softmax(alpha, mask, tau=2.0, generator=gen, backend=backend)
    assert torch.all(hard.detach().sum(-1) == 1) and torch.all(hard.detach()[:, 0] == 0)
    assert set(hard.detach().unique().tolist()) <= {0.0, 1.0}
    hard.mul(torch.randn_like(hard)).sum().backward()
    assert alpha.grad is not None and torch.all(alpha.grad[:, 0] == 0) and alpha.grad.abs().sum() > 0
    # Same generator state -> same sample; soft weights are a masked softmax of perturbed logits.
    soft1 = ops.gumbel_softmax(alpha, mask, tau=2.0, hard=False, generator=torch.Generator(device=device).manual_seed(5), backend=backend)
    soft2 = ops.gumbel_softmax(alpha, mask, tau=2.0, hard=False, generator=torch.Generator(device=device).manual_seed(5), backend=backend)
    assert torch.equal(soft1, soft2)
    assert_close(soft1.sum(-1), torch.ones(14, dtype=torch.float64, device=device), what="rows sum to 1")
    # The argmax is distributed as softmax(alpha): check the empirical frequencies on one row.
    row = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    freq = ops.gumbel_softmax(row.expand(4000, 3), generator=gen, backend=backend).detach().mean(0)
    # 4000 draws: the standard error of each frequency is below 0.008.
    assert torch.allclose(freq, torch.softmax(row[0], -1), atol=0.03), freq


def test_mixed_sum_bad_input():
    y = torch.randn(2, 3)
    with pytest.raises(ValueError, match="outputs is empty"):
        ops.mixed_sum([], torch.ones(0))
    with pytest.raises(ValueError, match="weights has 3 entries but there are 2 outputs"):
        ops.mixed_sum([y, y], torch.ones(3))
    with pytest.raises(ValueError, match=r"outputs\[1\] has shape \(2, 4\)"):
        ops.mixed_sum([y, torch.randn(2, 4)], torch.ones(2))
    with pytest.raises(TypeError, match=r"outputs\[1\] has dtype torch.float64"):
        ops.mixed_sum([y, y.double()], torch.ones(2))
    with pytest.raises(TypeError, match="weights has dtype torch.float64"):
        ops.mixed_sum([y, y], torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="weights must have 1 dims"):
        ops.mixed_sum([y, y], torch.ones(1, 2))
    with pytest.raises(TypeError, match="outputs\\[0\\] has dtype torch.int64"):
        ops.mixed_sum([torch.ones(3, dtype=torch.long)], torch.ones(1))
    with pytest.raises(ValueError, match="is not a backend"):
        ops.mixed_sum([y], torch.ones(1), backend="metal")
    with pytest.raises(ValueError, match="'cuda' runs on CUDA tensors"):
        ops.mixed_sum([y], torch.ones(1), backend="cuda")


def test_masked_softmax_bad_input(monkeypatch):
    x = torch.randn(2, 4)
    with pytest.raises(TypeError, match="mask must have dtype torch.bool"):
        ops.masked_softmax(x, torch.ones(2, 4))
    with pytest.raises(ValueError, match="not broadcastable"):
        ops.masked_softmax(x, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="tau must be a positive"):
        ops.masked_softmax(x, tau=0.0)
    with pytest.raises(ValueError, match="non-empty last dim"):
        ops.masked_softmax(torch.randn(2, 0))
    monkeypatch.setenv("TOPONAS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="TOPONAS_BACKEND='bogus'"):
        ops.masked_softmax(x)


def test_env_var_selects_backend(monkeypatch):
    calls = []
    import toponas_kernels.ops.mixed as mixed

    real = mixed._ref.mixed_sum_ref
    monkeypatch.setattr(mixed._ref, "mixed_sum_ref", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("TOPONAS_BACKEND", "reference")
    ops.mixed_sum([torch.randn(3)], torch.ones(1))
    assert calls == [1]


def test_torch_compile():
    def f(ys, w, logits, mask):
        return ops.mixed_sum(ys, ops.masked_softmax(logits, mask)[: len(ys)] + w).sin()

    ys = [torch.randn(4, 5, requires_grad=True) for _ in range(3)]
    w = torch.zeros(3)
    logits = torch.randn(3, requires_grad=True)
    mask = torch.tensor([True, False, True])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(ys, w, logits, mask)
    assert_close(out, f(ys, w, logits, mask), what="compiled forward")
    out.sum().backward()
    assert logits.grad is not None and all(y.grad is not None for y in ys)


def test_weight_ops_read_nothing_back(monkeypatch):
    """masked_softmax and gumbel_softmax run in a search step: no per-call reads of the mask or
    of the noise back to the host (each would be a device sync on a GPU)."""
    calls = []
    for name in ("item", "tolist", "cpu", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _r=real, _n=name, **k: (calls.append(_n), _r(t, *a, **k))[1])
    alpha = torch.randn(14, 8, requires_grad=True)
    mask = torch.ones(14, 8, dtype=torch.bool)
    ops.masked_softmax(alpha, mask).sum().backward()
    ops.gumbel_softmax(alpha, mask, tau=0.5).sum().backward()
    monkeypatch.undo()
    assert calls == []
    # The clamped noise is finite even for an exponential draw of 0 (log 0 = -inf before).
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda t, generator=None: t.zero_())
    assert torch.isfinite(ops.gumbel_softmax(alpha, mask, hard=False)).all()


def test_triton_backward_strides_over_tiles(monkeypatch):
    """The Triton backward with more tiles than programs (each program accumulates over several
    tiles and reduces once), as on a GPU; the interpreter normally takes one tile in all."""
    from toponas_kernels import _lib
    from toponas_kernels.ops import _common
    from toponas_kernels.ops import mixed as M

    if not (_lib.triton_available() and _common.INTERPRET):
        pytest.skip("needs the Triton interpreter")
    monkeypatch.setattr(M, "block_size", lambda n, gpu_block: 16)
    monkeypatch.setattr(M, "_MAX_BWD_PROGRAMS", 3)
    ys = [torch.randn(203, dtype=torch.float64) for _ in range(9)]  # 13 tiles over 3 programs, 2 chunks
    w = torch.randn(9, dtype=torch.float64)
    g = torch.randn(203, dtype=torch.float64)
    grads = M._mixed_sum_backward_triton(g, ys, w)
    for k, y in enumerate(ys):
        assert_close(grads[k], w[k] * g, what=f"grad_y[{k}]")
    assert_close(grads[-1], torch.stack([(g * y).sum() for y in ys]), what="grad_w")
    # The forward over 13 programs, the last one partial, and two chunks (running sum).
    assert_close(M._mixed_sum_triton(ys, w), R.mixed_sum_ref(ys, w), what="forward over tiles")


def test_cpp_mixed_sum_blocks_and_threads(one_thread):
    """The C++ kernels past one parallel grain (32768 elements) and one reduction block (4096),
    with a tail: equal to the float64 reference, and bitwise the same on 1 and 2 threads (the
    reductions run in fixed blocks, whatever the thread count)."""
    from toponas_kernels import _lib

    if not _lib.HAS_CPP:
        pytest.skip("compiled extension not loaded")
    n = 3 * 32768 + 4096 + 5
    ys = [torch.randn(n, dtype=torch.float64).float() for _ in range(5)]
    w, g = torch.randn(5).double().float(), torch.randn(n).double().float()
    fwd, bwd = torch.ops.toponas.mixed_sum_kernel, torch.ops.toponas.mixed_sum_backward_kernel
    one = (fwd(ys, w), bwd(g, ys, w))
    torch.set_num_threads(2)
    two = (fwd(ys, w), bwd(g, ys, w))
    assert torch.equal(one[0], two[0]) and all(torch.equal(a, b) for a, b in zip(one[1], two[1]))
    exp_out, exp_grads = _expected(ys, w, g)
    assert_close(two[0], exp_out, torch.float32, "forward")
    for i, (a, e) in enumerate(zip(two[1], exp_grads)):
        scale = 1.0 if i < 5 else n**0.5  # grad_w: a sum of n products
        assert_close(a / scale, e / scale, torch.float32, f"grad {i}")


def test_an_eager_search_step_does_not_import_dynamo():
    """In eager mode no public op goes through the custom-op wrapper, which imports
    torch._dynamo (about 70 MiB of resident memory counted in every search's peak)."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from toponas_kernels.nas.networks import DartsSearchNetwork, NB201SearchNetwork\n"
        "for net in (DartsSearchNetwork(C=4, layers=3, mode='topo', partial_channels=2),\n"
        "            NB201SearchNetwork(C=4, N=1, mode='plain', sampler='gumbel')):\n"
        "    net(torch.randn(2, 3, 16, 16)).sum().backward()\n"
        "assert 'torch._dynamo' not in sys.modules, 'an eager step imported torch._dynamo'\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
