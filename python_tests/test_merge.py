"""Family 2: merge_kernels (normalize K candidate kernels, embed, weight, sum) on every backend
against the reference, forward and backward."""

import pytest
import torch
import torch.nn.functional as F

from toponas_kernels import ops
from toponas_kernels.ops import reference as R
from utils import CUDA_KERNELS, assert_close, backend_cases, dtypes_for, noncontiguous

MODES = ["channel", "tensor", "none"]

# (O, I, kernel sizes, dilations): O and I prime or 1; k in {1, 3, 5, 7}, dilations {1, 2, 3};
# mixed sizes; K from 1 to 5 (5 > 4, the Triton launch's slots: two chunks; more candidates in
# test_merge_many_candidates_in_chunks). Every case runs with contiguous and with non-contiguous
# inputs.
CASES = [
    pytest.param(1, 1, [3], [1], id="O1-I1-k3"),
    pytest.param(3, 2, [1, 3], [1, 1], id="O3-I2-k1,3"),
    pytest.param(5, 3, [3, 5, 3, 5], [1, 1, 2, 2], id="O5-I3-darts"),
    pytest.param(2, 7, [7, 1, 3, 5, 3], [1, 1, 3, 2, 1], id="O2-I7-K5"),
    pytest.param(7, 1, [5, 3], [3, 2], id="O7-I1-dilated"),
    pytest.param(1, 5, [1], [2], id="O1-I5-k1d2"),
]


def _inputs(O, I, sizes, dtype, device, contiguous=True):
    ks = [torch.randn(O, I, k, k, dtype=torch.float64, device=device).to(dtype) for k in sizes]
    w = torch.randn(len(sizes), dtype=torch.float64, device=device).to(dtype)
    if not contiguous:
        ks = [noncontiguous(k) for k in ks]
        w = noncontiguous(w)
    return ks, w


def _expected(ks, w, dils, normalize, eps, g):
    """Reference in float64 on the same (rounded) inputs, gradients by autograd."""
    ks64 = [k.detach().to(torch.float64).requires_grad_() for k in ks]
    w64 = w.detach().to(torch.float64).requires_grad_()
    out = R.merge_kernels_ref(ks64, w64, dils, normalize, eps)
    grads = torch.autograd.grad(out, ks64 + [w64], g.to(torch.float64))
    return out, grads


@pytest.mark.parametrize("normalize", MODES)
@pytest.mark.parametrize("O,I,sizes,dils", CASES)
@pytest.mark.parametrize("backend,device", backend_cases())
def test_merge_matches_reference(backend, device, O, I, sizes, dils, normalize):
    eps = 1e-5
    for dtype in dtypes_for(device):
        for contiguous in (True, False):
            if not contiguous and dtype != torch.float32:
                continue  # layout is dtype-independent: one dtype is enough (interpreter time)
            ks, w = _inputs(O, I, sizes, dtype, device, contiguous)
            ks = [k.requires_grad_() for k in ks]
            w.requires_grad_()
            out = ops.merge_kernels(ks, w, dils, normalize, eps, backend=backend)
            g = torch.randn_like(out)
            grads = torch.autograd.grad(out, ks + [w], g)
            exp_out, exp_grads = _expected(ks, w, dils, normalize, eps, g)
            tag = f"{backend} {dtype} O={O} I={I} k={sizes} d={dils} {normalize} contiguous={contiguous}"
            kmax = R.merged_size(sizes, dils)
            assert out.dtype == dtype and out.shape == (O, I, kmax, kmax), tag
            assert_close(out, exp_out, dtype, f"forward {tag}")
            for i, (a, e) in enumerate(zip(grads, exp_grads)):
                assert a.shape == e.shape and a.dtype == dtype, f"grad {i} {tag}"
                # grad_w sums over a whole candidate: its error grows with the element count.
                scale = 1.0 if i < len(ks) else max(1.0, max(k.numel() for k in ks) ** 0.5)
                assert_close(a / scale, e / scale, dtype, f"grad {i} {tag}")


def _many(k):
    """K candidates cycling through sizes 3, 5, 3 and dilations 1, 2, 1, 3 (kmax 13). No 1x1:
    statistics over a handful of elements make float32 too ill-conditioned to compare."""
    return [(3, 5, 3)[i % 3] for i in range(k)], [(1, 2, 1, 3)[i % 4] for i in range(k)]


# Chunk boundaries: the CUDA launch takes 8 candidates, the Triton launch 4 (so 8 and 16 are
# whole chunks for both, 9 and 17 end with a chunk of one); the exaggerated space's separable
# merge puts 12 candidates in one group.
@pytest.mark.parametrize("k", [8, 9, 16, 17])
@pytest.mark.parametrize("backend,device", backend_cases())
def test_merge_many_candidates_in_chunks(backend, device, k):
    """Forward and backward of K = 8..17 candidates (several launches, the forward's running sum
    kept between them) against the float64 reference, in every mode."""
    O, I, eps = 2, 2, 1e-5
    sizes, dils = _many(k)
    interpreted = backend == "triton" and device == "cpu"  # ~1 s a launch: float32 alone
    for dtype in (torch.float32,) if interpreted else (torch.float32, torch.float64):
        ks, w = _inputs(O, I, sizes, dtype, device)
        ks = [t.requires_grad_() for t in ks]
        w.requires_grad_()
        for normalize in MODES:
            out = ops.merge_kernels(ks, w, dils, normalize, eps, backend=backend)
            g = torch.randn_like(out)
            grads = torch.autograd.grad(out, ks + [w], g)
            exp_out, exp_grads = _expected(ks, w, dils, normalize, eps, g)
            tag = f"{backend} {dtype} K={k} {normalize}"
            assert_close(out, exp_out, dtype, f"forward {tag}")
            for i, (a, e) in enumerate(zip(grads, exp_grads)):
                scale = 1.0 if i < k else max(1.0, O * I * 5.0)  # grad_w: a sum over a candidate
                assert_close(a / scale, e / scale, dtype, f"grad {i} {tag}")


def test_triton_merge_loops_over_blocks(monkeypatch):
    """The Triton merge with blocks smaller than a channel and than O (each program loops over
    its channel's elements, and "tensor" mode over the O channel rows in several blocks), as at
    GPU block sizes with large kernels; the interpreter normally takes everything in one block."""
    from toponas_kernels import _lib
    from toponas_kernels.ops import _common
    from toponas_kernels.ops import merge as G

    if not (_lib.triton_available() and _common.INTERPRET):
        pytest.skip("needs the Triton interpreter")
    monkeypatch.setattr(G, "_blocks", lambda O, n_out: (16, 2))
    # I * 5 * 5 = 50 and I * 9 * 9 = 162 elements: several blocks of 16; O = 3 rows: two blocks
    # of 2; K = 5: two chunks.
    O, I, sizes, dils, eps = 3, 2, [3, 5, 3, 5, 3], [1, 2, 3, 1, 1], 1e-5
    ks, w = _inputs(O, I, sizes, torch.float64, "cpu")
    g = torch.randn(O, I, 9, 9, dtype=torch.float64)
    for normalize in MODES:
        out = G._merge_triton(ks, w, dils, normalize, eps)
        assert out.shape == g.shape
        grads = G._merge_backward_triton(g, ks, w, dils, normalize, eps)
        exp_out, exp_grads = _expected(ks, w, dils, normalize, eps, g)
        assert_close(out, exp_out, what=f"forward {normalize}")
        for i, (a, e) in enumerate(zip(grads, exp_grads)):
            assert_close(a, e, what=f"grad {i} {normalize}")


def test_cpp_merge_threads(one_thread):
    """The C++ merge on kernels large enough to split over threads (64 x 64 channels): bitwise the
    same on 1 and 2 threads in every mode ("tensor" combines the channel rows in channel order),
    and equal to the float64 reference."""
    from toponas_kernels import _lib

    if not _lib.HAS_CPP:
        pytest.skip("compiled extension not loaded")
    sizes, dils = [3, 5, 3], [1, 1, 2]
    ks, w = _inputs(64, 64, sizes, torch.float32, "cpu")
    g = torch.randn(64, 64, 5, 5)
    fwd, bwd = torch.ops.toponas.merge_kernels_kernel, torch.ops.toponas.merge_kernels_backward_kernel
    for normalize in MODES:
        code = ops.merge.MODE_CODES[normalize]
        torch.set_num_threads(1)
        one = [fwd(ks, w, dils, code, 1e-5)] + list(bwd(g, ks, w, dils, code, 1e-5))
        torch.set_num_threads(2)
        two = [fwd(ks, w, dils, code, 1e-5)] + list(bwd(g, ks, w, dils, code, 1e-5))
        for i, (a, b) in enumerate(zip(one, two)):
            assert torch.equal(a, b), f"{normalize}: result {i} depends on the thread count"
        exp_out, exp_grads = _expected(ks, w, dils, normalize, 1e-5, g)
        assert_close(two[0], exp_out, torch.float32, f"forward {normalize}")
        for i, (a, e) in enumerate(zip(two[1:], exp_grads)):
            scale = 1.0 if i < len(ks) else 64 * 8.0  # grad_w: a sum over a whole candidate
            assert_close(a / scale, e / scale, torch.float32, f"grad {i} {normalize}")


@pytest.mark.parametrize("backend,device", backend_cases())
def test_merge_stacked_input_and_determinism(backend, device):
    stacked = torch.randn(3, 4, 3, 3, 3, device=device, requires_grad=True)
    w = torch.randn(3, device=device, requires_grad=True)
    dils = [1, 2, 3]
    out = ops.merge_kernels(stacked, w, dils, backend=backend)
    assert_close(out, R.merge_kernels_ref(list(stacked.unbind(0)), w, dils), what="stacked")
    g = torch.randn_like(out)
    for normalize in MODES:
        first = torch.autograd.grad(ops.merge_kernels(stacked, w, dils, normalize, backend=backend), (stacked, w), g)
        again = torch.autograd.grad(ops.merge_kernels(stacked, w, dils, normalize, backend=backend), (stacked, w), g)
        for a, b in zip(first, again):
            assert torch.equal(a, b), f"backward is not bitwise deterministic ({normalize})"


@pytest.mark.parametrize("backend,device", backend_cases())
def test_merge_gradcheck(backend, device):
    # Under the CPU interpreter a full gradcheck (a forward per input element, a backward per
    # output element, three modes) takes minutes: there it checks random projections instead.
    fast = backend == "triton" and device == "cpu"
    ks = [
        torch.randn(2, 2, 1, 1, dtype=torch.float64, device=device, requires_grad=True),
        torch.randn(2, 2, 3, 3, dtype=torch.float64, device=device, requires_grad=True),
    ]
    w = torch.randn(2, dtype=torch.float64, device=device, requires_grad=True)
    for normalize in MODES:
        def f(k0, k1, w):
            return ops.merge_kernels([k0, k1], w, [1, 2], normalize, 1e-3, backend=backend)

        assert torch.autograd.gradcheck(f, (*ks, w), fast_mode=fast), normalize


@pytest.mark.parametrize("backend,device", backend_cases())
def test_merge_opcheck(backend, device):
    ks = [torch.randn(3, 2, k, k, device=device, requires_grad=True) for k in (1, 3)]
    w = torch.randn(2, device=device, requires_grad=True)
    g = torch.randn(3, 2, 3, 3, device=device)
    for normalize in MODES:
        torch.library.opcheck(torch.ops.toponas.merge_kernels.default, (ks, w, [2, 1], normalize, 1e-5, backend))
        torch.library.opcheck(
            torch.ops.toponas.merge_kernels_backward.default,
            (g, [k.detach() for k in ks], w.detach(), [2, 1], normalize, 1e-5, backend),
        )
    # channels_last kernels and gradient: the results are contiguous, as the fake promises.
    cl = [k.detach().contiguous(memory_format=torch.channels_last).requires_grad_() for k in ks]
    gl = g.contiguous(memory_format=torch.channels_last)
    for normalize in MODES:
        torch.library.opcheck(torch.ops.toponas.merge_kernels.default, (cl, w, [2, 1], normalize, 1e-5, backend))
        torch.library.opcheck(
            torch.ops.toponas.merge_kernels_backward.default,
            (gl, [k.detach() for k in cl], w.detach(), [2, 1], normalize, 1e-5, backend),
        )


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA_KERNELS)])
def test_compiled_merge_kernels_opcheck(device):
    from toponas_kernels import _lib

    if not _lib.HAS_CPP:
        pytest.skip("compiled extension not loaded")
    ks = [torch.randn(3, 2, k, k, device=device) for k in (3, 5)]
    w = torch.randn(2, device=device)
    for code in (0, 1, 2):
        torch.library.opcheck(torch.ops.toponas.merge_kernels_kernel.default, (ks, w, [2, 1], code, 1e-5))
        g = torch.randn(3, 2, 5, 5, device=device)
        torch.library.opcheck(torch.ops.toponas.merge_kernels_backward_kernel.default, (g, ks, w, [2, 1], code, 1e-5))


def test_cuda_kernels_registered():
    """Compiled with CUDA here (no GPU): the CUDA implementations must be registered."""
    from toponas_kernels import _lib

    if not _lib.build_config().get("cuda"):
        pytest.skip("this build has no CUDA kernels (see toponas_kernels/_build_config.json)")
    for name in ("merge_kernels_kernel", "merge_kernels_backward_kernel"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"toponas::{name}", "CUDA"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"toponas::{name}", "CPU"), name


@pytest.mark.parametrize("backend,device", backend_cases())
def test_merge_is_invariant_to_candidate_scale_and_shift(backend, device):
    """Normalization removes each candidate's scale and shift (docs/DESIGN.md section 6): the merged
    kernel is unchanged under K_i -> a_i K_i + b_i (a_i > 0), per output channel in "channel"
    mode; its gradient sums to 0 over each statistic's group and is orthogonal to K - mean up to
    eps."""
    O, I, sizes, dils = 3, 2, [1, 3, 5], [1, 2, 1]
    ks, w = _inputs(O, I, sizes, torch.float64, device)
    eps = 1e-12
    for normalize in ("channel", "tensor"):
        if normalize == "channel":
            a = [torch.rand(O, 1, 1, 1, dtype=torch.float64, device=device) * 5 + 0.1 for _ in sizes]
            b = [torch.randn(O, 1, 1, 1, dtype=torch.float64, device=device) * 10 for _ in sizes]
        else:
            a, b = [3.7, 0.2, 11.0], [-4.0, 25.0, 0.5]
        moved = [ai * k + bi for k, ai, bi in zip(ks, a, b)]
        base = ops.merge_kernels(ks, w, dils, normalize, eps, backend=backend)
        assert_close(ops.merge_kernels(moved, w, dils, normalize, eps, backend=backend), base, torch.float32, normalize)
        # Scale and shift invariance show in the gradient too: it sums to 0 over each group
        # and <grad, K - mean> = w <G, K_hat> eps / (std + eps), ~0 for a tiny eps.
        ks_g = [k.clone().requires_grad_() for k in ks]
        out = ops.merge_kernels(ks_g, w, dils, normalize, eps, backend=backend)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, ks_g, g)
        dims = (1, 2, 3) if normalize == "channel" else (0, 1, 2, 3)
        for k, gk in zip(ks, grads):
            bound = 1e-9 * float(g.norm() * w.abs().max()) * k.numel() ** 0.5
            assert gk.sum(dim=dims).abs().max() < bound, normalize
            xc = k - k.mean(dim=dims, keepdim=True)
            assert (gk * xc).sum(dim=dims).abs().max() < bound, normalize


@pytest.mark.parametrize("backend,device", backend_cases())
def test_merged_conv_equals_sum_of_convs(backend, device):
    """Reparameterization (docs/DESIGN.md section 5): conv(x, merged) == sum_i w_i conv_{d_i}(x, K_hat_i)."""
    O, I, sizes, dils = 4, 3, [1, 3, 5, 3], [1, 1, 1, 2]
    ks, w = _inputs(O, I, sizes, torch.float64, device)
    x = torch.randn(2, I, 11, 9, dtype=torch.float64, device=device)
    for normalize in ("none", "channel"):
        merged = ops.merge_kernels(ks, w, dils, normalize, backend=backend)
        expected = sum(
            w[i] * F.conv2d(x, R.standardize_ref(k, normalize, 1e-5), dilation=d, padding="same")
            for i, (k, d) in enumerate(zip(ks, dils))
        )
        assert_close(F.conv2d(x, merged, padding="same"), expected, torch.float64, normalize)


@pytest.mark.parametrize("backend,device", backend_cases())
def test_merge_constant_channel_has_finite_gradient(backend, device):
    """std == 0: the d std/d K term is defined as 0 (documented), the gradient stays finite."""
    ks, w = _inputs(3, 2, [3, 1], torch.float64, device)
    ks[0][1] = 0.25  # output channel 1 of candidate 0 is constant
    ks = [k.requires_grad_() for k in ks]
    w.requires_grad_()
    out = ops.merge_kernels(ks, w, [1, 1], "channel", backend=backend)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, ks + [w], g)
    assert all(torch.isfinite(t).all() for t in grads)
    expected = torch.ops.toponas.merge_kernels_backward(
        g, [k.detach() for k in ks], w.detach(), [1, 1], "channel", 1e-5, "reference"
    )
    for a, e in zip(grads, expected):
        assert_close(a, e, torch.float64, "constant channel")
    # Away from the constant channel the reference (autograd) agrees.
    _, exp = _expected(ks, w, [1, 1], "channel", 1e-5, g)
    assert_close(grads[0][[0, 2]], exp[0][[0, 2]], torch.float64, "other channels")


@pytest.mark.parametrize("backend,device", backend_cases())
def test_merge_empty(backend, device):
    for O, I in ((0, 3), (2, 0)):
        ks = [torch.randn(O, I, k, k, device=device, requires_grad=True) for k in (1, 3)]
        w = torch.randn(2, device=device, requires_grad=True)
        out = ops.merge_kernels(ks, w, [1, 2], backend=backend)
        assert out.shape == (O, I, 5, 5)
        grads = torch.autograd.grad(out.sum(), ks + [w])
        assert [t.shape for t in grads] == [k.shape for k in ks] + [w.shape]
        assert torch.all(grads[-1] == 0)


def _has_cpp():
    from toponas_kernels import _lib

    return _lib.HAS_CPP


def test_merge_saves_only_inputs():
    """The autograd node keeps the kernels and weights, nothing of the normalized or merged
    kernels (DESIGN: the search calls this for every edge of every cell)."""
    ks = [torch.randn(8, 4, k, k, requires_grad=True) for k in (3, 5)]
    w = torch.randn(2, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = ops.merge_kernels(ks, w, [1, 2], "tensor", backend="cpp" if _has_cpp() else "reference")
    inputs = {t.data_ptr() for t in ks + [w]}
    assert saved and all(t.data_ptr() in inputs for t in saved), [tuple(t.shape) for t in saved]
    out.sum().backward()
    assert all(k.grad is not None for k in ks) and w.grad is not None


def test_merge_bad_input():
    k3 = torch.randn(4, 2, 3, 3)
    w2 = torch.ones(2)
    with pytest.raises(ValueError, match="kernels is empty"):
        ops.merge_kernels([], torch.ones(0))
    with pytest.raises(ValueError, match="kernels is empty"):
        ops.merge_kernels(torch.empty(0, 4, 2, 3, 3), torch.ones(0))
    with pytest.raises(ValueError, match=r"stacked tensor must be \[K, O, I, k, k\]"):
        ops.merge_kernels(k3, torch.ones(1))
    with pytest.raises(ValueError, match=r"kernels\[1\] must have 4 dims"):
        ops.merge_kernels([k3, torch.randn(4, 2, 3)], w2)
    with pytest.raises(ValueError, match=r"kernels\[1\] must be square"):
        ops.merge_kernels([k3, torch.randn(4, 2, 3, 5)], w2)
    with pytest.raises(ValueError, match=r"kernels\[1\]: unsupported kernel size 4: must be odd"):
        ops.merge_kernels([k3, torch.randn(4, 2, 4, 4)], w2)
    with pytest.raises(ValueError, match=r"kernels\[1\] has \[O, I\] = \[4, 3\]"):
        ops.merge_kernels([k3, torch.randn(4, 3, 3, 3)], w2)
    with pytest.raises(ValueError, match=r"kernels\[1\] has \[O, I\] = \[5, 2\]"):
        ops.merge_kernels([k3, torch.randn(5, 2, 1, 1)], w2)
    with pytest.raises(TypeError, match=r"kernels\[1\] has dtype torch.float64"):
        ops.merge_kernels([k3, k3.double()], w2)
    with pytest.raises(TypeError, match=r"kernels\[0\] has dtype torch.int64"):
        ops.merge_kernels([torch.ones(1, 1, 1, 1, dtype=torch.long)], torch.ones(1))
    with pytest.raises(ValueError, match="weights has 3 entries but there are 2 kernels"):
        ops.merge_kernels([k3, k3], torch.ones(3))
    with pytest.raises(ValueError, match="weights must have 1 dims"):
        ops.merge_kernels([k3, k3], torch.ones(1, 2))
    with pytest.raises(TypeError, match="weights has dtype torch.float64"):
        ops.merge_kernels([k3, k3], w2.double())
    with pytest.raises(ValueError, match="dilations has 1 entries but there are 2 kernels"):
        ops.merge_kernels([k3, k3], w2, [1])
    with pytest.raises(ValueError, match=r"dilations\[1\] must be >= 1, got 0"):
        ops.merge_kernels([k3, k3], w2, [1, 0])
    with pytest.raises(TypeError, match=r"dilations\[0\] must be an int"):
        ops.merge_kernels([k3, k3], w2, [1.5, 1])
    with pytest.raises(ValueError, match="normalize must be one of"):
        ops.merge_kernels([k3], torch.ones(1), normalize="batch")
    with pytest.raises(ValueError, match="eps must be > 0 when normalizing"):
        ops.merge_kernels([k3], torch.ones(1), normalize="tensor", eps=0.0)
    with pytest.raises(ValueError, match="'cuda' runs on CUDA tensors"):
        ops.merge_kernels([k3], torch.ones(1), backend="cuda")
    # eps is not used without normalization; True/False mean "channel"/"none".
    ops.merge_kernels([k3], torch.ones(1), normalize="none", eps=0.0)
    assert torch.equal(ops.merge_kernels([k3], torch.ones(1), normalize=True), ops.merge_kernels([k3], torch.ones(1)))
    assert torch.equal(ops.merge_kernels([k3], torch.ones(1), normalize=False), k3)


def test_compiled_kernel_bad_input():
    """The compiled kernels check too, for direct torch.ops callers."""
    if not _has_cpp():
        pytest.skip("compiled extension not loaded")
    k3 = torch.randn(4, 2, 3, 3)
    op = torch.ops.toponas.merge_kernels_kernel
    with pytest.raises(RuntimeError, match="kernels is empty"):
        op([], torch.ones(0), [], 1, 1e-5)
    with pytest.raises(RuntimeError, match="must be odd"):
        op([torch.randn(4, 2, 2, 2)], torch.ones(1), [1], 1, 1e-5)
    with pytest.raises(RuntimeError, match=r"dilations\[0\] must be >= 1"):
        op([k3], torch.ones(1), [0], 1, 1e-5)
    with pytest.raises(RuntimeError, match="normalize must be 0"):
        op([k3], torch.ones(1), [1], 3, 1e-5)
    with pytest.raises(RuntimeError, match="eps must be > 0"):
        op([k3], torch.ones(1), [1], 2, 0.0)
    with pytest.raises(RuntimeError, match="grad has shape"):
        torch.ops.toponas.merge_kernels_backward_kernel(torch.randn(4, 2, 5, 5), [k3], torch.ones(1), [1], 1, 1e-5)


def test_merge_torch_compile():
    def f(k1, k3, alpha):
        return ops.merge_kernels([k1, k3], torch.softmax(alpha, 0), [1, 2], "channel").sin()

    k1 = torch.randn(4, 3, 1, 1, requires_grad=True)
    k3 = torch.randn(4, 3, 3, 3, requires_grad=True)
    alpha = torch.randn(2, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(k1, k3, alpha)
    assert_close(out, f(k1, k3, alpha), what="compiled forward")
    out.sum().backward()
    assert alpha.grad is not None and k1.grad is not None and k3.grad is not None
