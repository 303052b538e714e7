"""Family 3: channel_shuffle and partial_channel_shuffle (PC-DARTS) on every backend against the
reference. They are permutations, so every comparison is bitwise (NaN, inf and -0.0 included)."""

import pytest
import torch
import torch.nn.functional as F

from toponas_kernels import _lib, ops
from toponas_kernels.ops import reference as R
from toponas_kernels.ops.shuffle import split_channels
from utils import CUDA_KERNELS, backend_cases, noncontiguous

# Every dtype everywhere: the kernels move raw 16/32/64-bit words, so bf16 never meets the
# interpreter's (broken) bf16 arithmetic.
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
_WORD = {2: torch.int16, 4: torch.int32, 8: torch.int64}

# (B, groups, C/groups, spatial): odd batch, C = groups * prime, rank 2 to 5 (3-D spatial),
# 1x1 and 7x7 maps, and one shape whose rows span several Triton programs (S > 2^16) and one
# with more rows than one interpreter program takes.
SHUFFLE_CASES = [
    (1, 1, 5, ()),
    (3, 4, 3, (1, 1)),
    (3, 2, 7, (5, 7)),
    (1, 3, 5, (2, 3, 5)),
    (3, 5, 1, (7, 7)),
    (2, 4, 13, (9, 31)),
    (1, 2, 1, (70001,)),
    (3, 2, 25, (1000,)),
]


def _data(shape, dtype, device="cpu"):
    """Random values with the awkward ones a float copy could alter: NaN, +-inf, -0.0."""
    x = torch.randn(shape, dtype=torch.float64, device=device).to(dtype)
    flat = x.view(-1)
    for i, v in enumerate([float("nan"), float("inf"), -float("inf"), -0.0]):
        if i < flat.numel():
            flat[(i * 7919) % flat.numel()] = v
    return x


def assert_bitwise(actual, expected, what=""):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    word = _WORD[actual.element_size()]
    a, e = actual.detach().cpu().contiguous().view(word), expected.detach().cpu().contiguous().view(word)
    bad = a != e
    if bad.any():
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} elements differ; first at {idx}: got "
            f"{actual[idx].item()!r}, expected {expected[idx].item()!r}"
        )


def _layouts(x):
    """The same values in layouts the kernels take in place or copy first."""
    yield "contiguous", x
    if x.dim() >= 3 and x.shape[-1] > 1:
        yield "strided-spatial", noncontiguous(x)  # copied by contiguous()
    wide = torch.cat([x, torch.zeros_like(x[:, :1]), x], 1)
    yield "channel-slice", wide[:, : x.shape[1]]  # free batch/channel strides: read in place
    if x.dim() == 4:
        yield "channels-last", x.contiguous(memory_format=torch.channels_last)


def _reference_grads(fn, inputs, grad):
    """The reference's output and autograd gradients on the same inputs."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, grad)


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("b,groups,per_group,spatial", SHUFFLE_CASES)
def test_channel_shuffle_matches_reference(backend, device, b, groups, per_group, spatial):
    shape = (b, groups * per_group, *spatial)
    small = torch.Size(shape).numel() < 50000  # the large cases: one dtype, one layout
    for dtype in DTYPES if small else DTYPES[:1]:
        base = _data(shape, dtype, device)
        for layout, x in list(_layouts(base))[: None if small else 1]:
            tag = f"{backend} {dtype} {shape} groups={groups} {layout}"
            x = x.detach().requires_grad_()
            out = ops.channel_shuffle(x, groups, backend=backend)
            assert out.is_contiguous(), tag
            g = _data(shape, dtype, device)
            (grad,) = torch.autograd.grad(out, x, g)
            exp, (exp_grad,) = _reference_grads(lambda t: R.channel_shuffle_ref(t, groups), [x], g)
            assert_bitwise(out, exp, f"forward {tag}")
            assert_bitwise(grad, exp_grad, f"grad {tag}")


# (B, Cp, Cb, groups, spatial): the PC-DARTS split (Cp = C/k, groups = k), splits that do not
# fall on a group boundary, an empty bypass or processed part, 1x1 and 3-D maps.
PARTIAL_CASES = [
    (3, 3, 9, 4, (5, 7)),
    (1, 7, 21, 4, (1, 1)),
    (3, 2, 8, 5, (3, 1, 4)),
    (1, 5, 1, 2, ()),
    (3, 1, 10, 11, (5, 7)),
    (2, 6, 0, 3, (5, 7)),
    (2, 0, 6, 3, (5, 7)),
    (3, 13, 39, 4, (9, 11)),
]


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("b,cp,cb,groups,spatial", PARTIAL_CASES)
def test_partial_channel_shuffle_matches_reference(backend, device, b, cp, cb, groups, spatial):
    for dtype in DTYPES:
        p0 = _data((b, cp, *spatial), dtype, device)
        q0 = _data((b, cb, *spatial), dtype, device)
        layouts = list(zip(_layouts(p0), _layouts(q0)))
        # A bypass broadcast along the batch (stride 0) is read in place too.
        layouts.append((("contiguous", p0), ("expanded", q0[:1].expand_as(q0))))
        for (lp, p), (lq, q) in layouts:
            tag = f"{backend} {dtype} cp={cp} cb={cb} groups={groups} {spatial} {lp}/{lq}"
            p, q = p.detach().requires_grad_(), q.detach().requires_grad_()  # leaves, layout kept
            out = ops.partial_channel_shuffle(p, q, groups, backend=backend)
            assert out.is_contiguous(), tag
            g = _data(out.shape, dtype, device)
            grads = torch.autograd.grad(out, (p, q), g)
            exp, exp_grads = _reference_grads(lambda a, c: R.partial_channel_shuffle_ref(a, c, groups), [p, q], g)
            assert_bitwise(out, exp, f"forward {tag}")
            for name, a, e in zip(("processed", "bypass"), grads, exp_grads):
                assert_bitwise(a, e, f"grad {name} {tag}")


@pytest.mark.parametrize("backend,device", backend_cases())
def test_gradcheck_and_double_backward(backend, device):
    # Small: every input element costs the Triton interpreter several launches.
    x = torch.randn(2, 6, 1, 2, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.channel_shuffle(t, 3, backend=backend), (x,))
    # Double backward (the backward ops are differentiable): fast mode, the interpreter is slow.
    assert torch.autograd.gradgradcheck(lambda t: ops.channel_shuffle(t, 3, backend=backend), (x,), fast_mode=True)
    p = torch.randn(2, 1, 3, dtype=torch.float64, device=device, requires_grad=True)
    q = torch.randn(2, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    fn = lambda a, c: ops.partial_channel_shuffle(a, c, 4, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (p, q))
    assert torch.autograd.gradgradcheck(fn, (p, q), fast_mode=True)


@pytest.mark.parametrize("backend,device", backend_cases())
def test_shuffle_ops_opcheck(backend, device):
    x = torch.randn(3, 6, 2, 5, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.toponas.channel_shuffle.default, (x, 3, backend))
    p = torch.randn(3, 2, 2, 5, device=device, requires_grad=True)
    q = torch.randn(3, 6, 2, 5, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.toponas.partial_channel_shuffle.default, (p, q, 4, backend))
    g = torch.randn(3, 8, 2, 5, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.toponas.partial_channel_unshuffle.default, (g, 2, 4, backend))
    cl = torch.channels_last
    torch.library.opcheck(torch.ops.toponas.channel_shuffle.default, (x.contiguous(memory_format=cl), 3, backend))
    torch.library.opcheck(
        torch.ops.toponas.partial_channel_shuffle.default,
        (p.contiguous(memory_format=cl), q.contiguous(memory_format=cl), 4, backend),
    )
    torch.library.opcheck(torch.ops.toponas.partial_channel_unshuffle.default, (g.contiguous(memory_format=cl), 2, 4, backend))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA_KERNELS)])
def test_compiled_kernels_opcheck(device):
    if not _lib.HAS_CPP:
        pytest.skip("compiled extension not loaded")
    x = torch.randn(3, 6, 2, 5, device=device)
    torch.library.opcheck(torch.ops.toponas.channel_shuffle_kernel.default, (x, 3))
    p, q = split_channels(x, 3)
    torch.library.opcheck(torch.ops.toponas.partial_channel_shuffle_kernel.default, (p, q, 3))
    torch.library.opcheck(torch.ops.toponas.partial_channel_unshuffle_kernel.default, (x, 2, 3))
    # The last line for direct callers: the C++ checks name the argument too.
    with pytest.raises(RuntimeError, match="groups must be positive"):
        torch.ops.toponas.channel_shuffle_kernel(x, 0)
    with pytest.raises(RuntimeError, match="C=6 is not divisible by groups=4"):
        torch.ops.toponas.channel_shuffle_kernel(x, 4)
    with pytest.raises(RuntimeError, match=r"processed_channels must be in \[0, 6\]"):
        torch.ops.toponas.partial_channel_unshuffle_kernel(x, 7, 3)
    with pytest.raises(RuntimeError, match="must agree in every dim but the channels"):
        torch.ops.toponas.partial_channel_shuffle_kernel(p, q[:, :, :1], 3)
    # The eager fast path's ops (autograd in C++, csrc/channel_shuffle.cpp).
    x, g = x.requires_grad_(), torch.randn(3, 8, 2, 5, device=device, requires_grad=True)
    p = torch.randn(3, 2, 2, 5, device=device, requires_grad=True)
    q = torch.randn(3, 6, 2, 5, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.toponas.channel_shuffle_fused.default, (x, 3))
    torch.library.opcheck(torch.ops.toponas.partial_channel_shuffle_fused.default, (p, q, 4))
    torch.library.opcheck(torch.ops.toponas.partial_channel_unshuffle_fused.default, (g, 2, 4))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA_KERNELS)])
def test_fast_path_autograd_in_cpp(device):
    """In eager mode the compiled backends run the shuffles with their autograd nodes in C++:
    the graph nodes are the C++ ones, values and gradients (twice differentiable) match the
    reference on strided inputs, and inference mode falls through to the kernels."""
    if not _lib.HAS_CPP:
        pytest.skip("compiled extension not loaded")
    backend = "cuda" if device == "cuda" else "cpp"
    x = torch.randn(2, 5, 12, 3, dtype=torch.float64, device=device).transpose(1, 2).requires_grad_()
    y = ops.channel_shuffle(x, 4, backend=backend)
    assert "ChannelShuffleFunction" in y.grad_fn.name()
    assert torch.equal(y, ops.channel_shuffle(x, 4, backend="reference"))
    assert torch.autograd.gradgradcheck(lambda t: ops.channel_shuffle(t, 4, backend=backend), (x,))
    p = torch.randn(2, 5, 2, 3, dtype=torch.float64, device=device)[..., :2].requires_grad_()
    q = torch.randn(2, 7, 2, 2, dtype=torch.float64, device=device).transpose(2, 3).requires_grad_()
    z = ops.partial_channel_shuffle(p, q, 4, backend=backend)
    assert "PartialShuffleFunction" in z.grad_fn.name()
    assert torch.equal(z, ops.partial_channel_shuffle(p, q, 4, backend="reference"))
    fn = lambda a, c: ops.partial_channel_shuffle(a, c, 4, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (p, q)) and torch.autograd.gradgradcheck(fn, (p, q))
    with torch.inference_mode():
        assert torch.equal(ops.channel_shuffle(x.detach(), 4, backend=backend), y.detach())
        assert torch.equal(ops.partial_channel_shuffle(p.detach(), q.detach(), 4, backend=backend), z.detach())


def test_cuda_kernels_registered():
    """Compiled with CUDA here (no GPU): the CUDA implementations must be registered."""
    if not _lib.build_config().get("cuda"):
        pytest.skip("this build has no CUDA kernels (see toponas_kernels/_build_config.json)")
    for name in ("channel_shuffle_kernel", "partial_channel_shuffle_kernel", "partial_channel_unshuffle_kernel"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"toponas::{name}", "CUDA"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"toponas::{name}", "CPU"), name
    for name in ("channel_shuffle_fused", "partial_channel_shuffle_fused", "partial_channel_unshuffle_fused"):
        for key in ("AutogradCUDA", "CUDA"):  # through the Autograd / CompositeExplicitAutograd aliases
            assert torch._C._dispatch_has_computed_kernel_for_dispatch_key(f"toponas::{name}", key), (name, key)


def test_triton_gpu_launch_sizes(monkeypatch):
    """The launch sizes a GPU uses (tiles of 4096 elements, several rows per program, the
    spatial blocks widened so grid axis 1 stays within CUDA's 65535), run through the
    interpreter: partial row groups and several spatial blocks per row stay bitwise exact."""
    from toponas_kernels.ops import _common
    from toponas_kernels.ops import shuffle as S

    if not (_lib.triton_available() and _common.INTERPRET):
        pytest.skip("needs the Triton interpreter")
    monkeypatch.setattr(S, "INTERPRET", False)
    for rows, s in ((36, 35), (3, 4096), (2, 5000), (100000, 1), (1, 2**28 + 1), (7, 65535 * 4096 + 1)):
        per_prog, block_s, warps = S._launch_sizes(rows, s)
        tag = f"rows={rows} s={s}: {per_prog} rows x {block_s}"
        assert -(-s // block_s) <= S._MAX_GRID_1 and block_s >= min(s, 2), tag
        assert per_prog * block_s <= max(S._GPU_TILE, block_s) and per_prog >= 1, tag
        assert warps in (4, 8), tag
    for shape, groups in (((3, 12, 5, 7), 4), ((1, 2, 5000), 2), ((2, 6, 4096), 3)):
        x = _data(shape, torch.float32)
        assert_bitwise(ops.channel_shuffle(x, groups, backend="triton"), R.channel_shuffle_ref(x, groups), f"{shape}")
        p, q = x[:, : shape[1] // 3], x[:, shape[1] // 3 :]
        assert_bitwise(
            ops.partial_channel_shuffle(p, q, groups, backend="triton"),
            R.partial_channel_shuffle_ref(p, q, groups),
            f"partial {shape}",
        )


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("shape", [(0, 8, 3), (2, 8, 0, 4), (2, 0, 5)])
def test_empty(backend, device, shape):
    x = torch.randn(shape, device=device, requires_grad=True)
    out = ops.channel_shuffle(x, 4 if shape[1] else 1, backend=backend)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape
    p, q = split_channels(x.detach(), 4 if shape[1] else 1)
    assert ops.partial_channel_shuffle(p, q, 2 if shape[1] else 3, backend=backend).shape == x.shape


def _pcdarts_channel_shuffle(x, groups):
    """channel_shuffle exactly as the PC-DARTS code writes it (4-D only), as an independent check
    of the reference."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("reduction", [False, True])
def test_pcdarts_round_trip(backend, device, reduction):
    """The PC-DARTS edge: split C/k channels off, run them through an op, bypass the rest (a
    2x2 max-pool on reduction edges), concatenate and shuffle with k groups."""
    k, c = 4, 16
    x = torch.randn(3, c, 6, 10, device=device, requires_grad=True)
    weight = torch.randn(c // k, c // k, 3, 3, device=device, requires_grad=True)
    stride = 2 if reduction else 1

    def op(t):
        return F.conv2d(t, weight, stride=stride, padding=1)

    def bypass_of(t):
        return F.max_pool2d(t, 2, 2) if reduction else t

    processed, bypass = split_channels(x, k)
    assert processed.data_ptr() == x.data_ptr() and bypass.shape[1] == c - c // k  # views
    out = ops.partial_channel_shuffle(op(processed), bypass_of(bypass), k, backend=backend)

    xr = x.detach().clone().requires_grad_()
    wr = weight.detach().clone().requires_grad_()
    dim_2 = xr.shape[1]
    xtemp, xtemp2 = xr[:, : dim_2 // k, :, :], xr[:, dim_2 // k :, :, :]
    temp1 = F.conv2d(xtemp, wr, stride=stride, padding=1)
    exp = _pcdarts_channel_shuffle(torch.cat([temp1, bypass_of(xtemp2)], dim=1), k)
    assert_bitwise(out, exp, "PC-DARTS forward")
    assert_bitwise(exp, R.partial_channel_shuffle_ref(temp1, bypass_of(xtemp2), k), "reference vs PC-DARTS")
    g = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, weight), g)
    ex, ew = torch.autograd.grad(exp, (xr, wr), g)
    assert_bitwise(gx, ex, "grad x")
    assert_bitwise(gw, ew, "grad weight")

    if not reduction:
        # Identity on the processed part: the partial shuffle is the plain shuffle of x, and
        # the inverse shuffle (C/k groups) gives x back.
        same = ops.partial_channel_shuffle(processed, bypass, k, backend=backend)
        assert_bitwise(same, ops.channel_shuffle(x, k, backend=backend), "identity op")
        assert_bitwise(ops.channel_shuffle(same, c // k, backend=backend), x, "inverse shuffle")
        gp, gb = torch.ops.toponas.partial_channel_unshuffle(same.detach(), c // k, k, backend)
        assert_bitwise(gp, processed, "unshuffle processed")
        assert_bitwise(gb, bypass, "unshuffle bypass")


def test_torch_compile():
    def edge(x, weight):
        processed, bypass = split_channels(x, 4)
        return ops.partial_channel_shuffle(F.conv2d(processed, weight, padding=1), bypass, 4).sin()

    def cell(x, weight):
        return ops.channel_shuffle(edge(x, weight), 2) * 2

    x = torch.randn(2, 8, 5, 7, requires_grad=True)
    weight = torch.randn(2, 2, 3, 3, requires_grad=True)
    compiled = torch.compile(cell, fullgraph=True, backend="aot_eager")
    out = compiled(x, weight)
    exp = cell(x, weight)
    assert_bitwise(out, exp, "compiled forward")
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, weight), g)
    want = torch.autograd.grad(exp, (x, weight), g)
    for a, e in zip(got, want):
        assert_bitwise(a, e, "compiled backward")


def test_bad_input():
    x = torch.randn(2, 10, 3)
    with pytest.raises(ValueError, match="groups must be positive, got 0"):
        ops.channel_shuffle(x, 0)
    with pytest.raises(ValueError, match="groups must be positive, got -2"):
        ops.channel_shuffle(x, -2)
    with pytest.raises(TypeError, match="groups must be an int, got float"):
        ops.channel_shuffle(x, 2.0)
    with pytest.raises(TypeError, match="groups must be an int, got bool"):
        ops.channel_shuffle(x, True)
    with pytest.raises(ValueError, match="x: C=10 is not divisible by groups=4"):
        ops.channel_shuffle(x, 4)
    with pytest.raises(ValueError, match=r"x must have at least 2 dims \[B, C, \*spatial\], got shape \(10,\)"):
        ops.channel_shuffle(torch.randn(10), 2)
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        ops.channel_shuffle(torch.ones(2, 4, dtype=torch.long), 2)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.channel_shuffle([[1.0]], 1)

    p, q = torch.randn(2, 3, 5, 5), torch.randn(2, 9, 5, 5)
    with pytest.raises(ValueError, match=r"C=13 is not divisible by groups=4"):
        ops.partial_channel_shuffle(p, torch.randn(2, 10, 5, 5), 4)
    with pytest.raises(ValueError, match="bypass has batch size 3 but processed has 2"):
        ops.partial_channel_shuffle(p, torch.randn(3, 9, 5, 5), 4)
    with pytest.raises(ValueError, match=r"bypass has spatial shape \(5, 4\) but processed has \(5, 5\)"):
        ops.partial_channel_shuffle(p, torch.randn(2, 9, 5, 4), 4)
    with pytest.raises(ValueError, match="same rank"):
        ops.partial_channel_shuffle(p, torch.randn(2, 9, 25), 4)
    with pytest.raises(TypeError, match="bypass has dtype torch.float64 but processed has torch.float32"):
        ops.partial_channel_shuffle(p, q.double(), 4)
    with pytest.raises(ValueError, match="bypass is on meta but processed is on cpu"):
        ops.partial_channel_shuffle(p, q.to("meta"), 4)
    with pytest.raises(ValueError, match="processed must have at least 2 dims"):
        ops.partial_channel_shuffle(torch.randn(3), q, 4)
    with pytest.raises(ValueError, match="groups must be positive"):
        ops.partial_channel_shuffle(p, q, 0)
    with pytest.raises(ValueError, match="is not a backend"):
        ops.partial_channel_shuffle(p, q, 4, backend="metal")

    with pytest.raises(ValueError, match="x: C=10 is not divisible by k=4"):
        split_channels(x, 4)
    with pytest.raises(ValueError, match="k must be positive, got 0"):
        split_channels(x, 0)


def test_env_var_selects_backend(monkeypatch):
    calls = []
    import toponas_kernels.ops.shuffle as shuffle

    real = shuffle._ref.channel_shuffle_ref
    monkeypatch.setattr(shuffle._ref, "channel_shuffle_ref", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("TOPONAS_BACKEND", "reference")
    ops.channel_shuffle(torch.randn(2, 4, 3), 2)
    assert calls == [1]
