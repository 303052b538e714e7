"""Every ``toponas::`` op defined in Python (``ops/_define.py``: one definition per op) keeps what
the definition promises: its name and schema (torch.compile graphs and saved programs name
them), a fake and an autograd formula that pass ``opcheck``, and an eager fast path that never
goes through the custom op's dispatch, on every backend this build has."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from toponas_kernels import _lib, ops
from toponas_kernels.ops import _define

# The ops and their schemas, as torch.compile graphs and the tests record them.
SCHEMAS = {
    "mixed_sum": "(Tensor[] outputs, Tensor weights, str backend) -> Tensor",
    "mixed_sum_backward": "(Tensor grad, Tensor[] outputs, Tensor weights, str backend) -> Tensor[]",
    "masked_softmax": "(Tensor logits, Tensor mask, float tau, str backend) -> Tensor",
    "masked_softmax_backward": "(Tensor grad, Tensor probs, float tau, str backend) -> Tensor",
    "merge_kernels": "(Tensor[] kernels, Tensor weights, SymInt[] dilations, str normalize, float eps, str backend) -> Tensor",
    "merge_kernels_backward": (
        "(Tensor grad, Tensor[] kernels, Tensor weights, SymInt[] dilations, str normalize, float eps, str backend) -> Tensor[]"
    ),
    "channel_shuffle": "(Tensor x, SymInt groups, str backend) -> Tensor",
    "partial_channel_shuffle": "(Tensor processed, Tensor bypass, SymInt groups, str backend) -> Tensor",
    "partial_channel_unshuffle": "(Tensor grad, SymInt processed_channels, SymInt groups, str backend) -> Tensor[]",
}
# Each differentiable op's backward op; the others are backward ops, differentiable no further.
BACKWARD = {
    "mixed_sum": "mixed_sum_backward",
    "masked_softmax": "masked_softmax_backward",
    "merge_kernels": "merge_kernels_backward",
    "channel_shuffle": "channel_shuffle",
    "partial_channel_shuffle": "partial_channel_unshuffle",
    "partial_channel_unshuffle": "partial_channel_shuffle",
}
# The ops with a C++ twice (a *_fused op whose autograd node is in C++).
FUSED = {"mixed_sum", "channel_shuffle", "partial_channel_shuffle", "partial_channel_unshuffle"}

DT = torch.float64


def _backends():
    return ["reference"] + (["cpp"] if _lib.HAS_CPP else [])


def _leaf(*shape, grad=True):
    return torch.randn(*shape, dtype=DT, requires_grad=grad)


def _arguments(name: str, backend: str) -> tuple:
    """Sample arguments of every op (inputs of a differentiable op require grad)."""
    if name == "mixed_sum":
        return [_leaf(2, 3, 4) for _ in range(3)], _leaf(3), backend
    if name == "mixed_sum_backward":
        return _leaf(2, 3, 4, grad=False), [_leaf(2, 3, 4, grad=False) for _ in range(3)], _leaf(3, grad=False), backend
    if name == "masked_softmax":
        return _leaf(3, 5), torch.rand(3, 5) < 0.7, 0.5, backend
    if name == "masked_softmax_backward":
        return _leaf(3, 5, grad=False), torch.softmax(torch.randn(3, 5, dtype=DT), -1), 0.5, backend
    if name == "merge_kernels":
        return [_leaf(2, 3, 1, 1), _leaf(2, 3, 3, 3)], _leaf(2), [1, 2], "channel", 1e-5, backend
    if name == "merge_kernels_backward":
        kernels = [_leaf(2, 3, 1, 1, grad=False), _leaf(2, 3, 3, 3, grad=False)]
        return _leaf(2, 3, 5, 5, grad=False), kernels, _leaf(2, grad=False), [1, 2], "tensor", 1e-5, backend
    if name == "channel_shuffle":
        return _leaf(2, 6, 3), 3, backend
    if name == "partial_channel_shuffle":
        return _leaf(2, 2, 3), _leaf(2, 4, 3), 3, backend
    if name == "partial_channel_unshuffle":
        return _leaf(2, 6, 3), 2, 3, backend
    raise AssertionError(f"no sample arguments for toponas::{name}: add them here")


def test_every_op_is_defined_once_with_its_schema():
    assert set(_define._OPS) == set(SCHEMAS)
    for name, op in _define._OPS.items():
        overload = getattr(torch.ops.toponas, name).default
        assert str(overload._schema) == f"toponas::{name}{SCHEMAS[name]}"
        assert op.custom._opoverload is overload
        backward = op.backward
        assert (backward.name if backward else None) == BACKWARD.get(name), name
        # a differentiable op's eager path is its autograd.Function, a backward op's its body
        assert (op.function is not None) == (name in BACKWARD), name
        assert (op.fused is not None) == (name in FUSED and _lib.HAS_CPP), name
    with pytest.raises(ValueError, match="toponas::mixed_sum is defined twice"):
        _define.define_op("mixed_sum", SCHEMAS["mixed_sum"], None)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_opcheck(name, backend):
    """The fake, the schema and (for a differentiable op) the autograd registration."""
    torch.library.opcheck(getattr(torch.ops.toponas, name).default, _arguments(name, backend))


def test_compiled_and_fused_ops_have_fakes():
    """The compiled kernel ops and the C++ fused ops get the fakes of the ops they serve."""
    if not _lib.HAS_CPP:
        pytest.skip("compiled extension not loaded")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 6, 3, dtype=DT)
        for name in ("channel_shuffle_kernel", "channel_shuffle_fused"):
            assert getattr(torch.ops.toponas, name)(x, 3).shape == (2, 6, 3)
        ys, w = [torch.empty(2, 3, dtype=DT) for _ in range(3)], torch.empty(3, dtype=DT)
        for name in ("mixed_sum_kernel", "mixed_sum_fused"):
            assert getattr(torch.ops.toponas, name)(ys, w).shape == (2, 3)
        grads = torch.ops.toponas.mixed_sum_backward_kernel(ys[0], ys, w)
        assert [g.shape for g in grads] == [(2, 3)] * 3 + [(3,)]
        ks = [torch.empty(2, 3, 1, 1, dtype=DT), torch.empty(2, 3, 3, 3, dtype=DT)]
        assert torch.ops.toponas.merge_kernels_kernel(ks, w[:2], [1, 2], 1, 1e-5).shape == (2, 3, 5, 5)
        parts = torch.ops.toponas.partial_channel_unshuffle_fused(x, 2, 3)
        assert [p.shape for p in parts] == [(2, 2, 3), (2, 4, 3)]


class _Recorder(TorchDispatchMode):
    """The ops that reach the Python dispatcher (custom ops among them: they do not decompose)."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func._schema.name)
        return func(*args, **(kwargs or {}))


def _public_calls(backend: str):
    """Forward, backward and double backward of every public op: the outputs, the leaves'
    gradients, and the names of the ops that reached the dispatcher."""
    torch.manual_seed(0)
    ys, w = [_leaf(2, 3, 4) for _ in range(3)], _leaf(3)
    logits, mask = _leaf(3, 5), torch.tensor([[True, False, True, True, False]] * 3)
    kernels, kw = [_leaf(2, 3, 1, 1), _leaf(2, 3, 3, 3)], _leaf(2)
    x, p, q = _leaf(2, 6, 3), _leaf(2, 2, 3), _leaf(2, 4, 3)
    with _Recorder() as seen:
        outs = {
            "mixed_sum": ops.mixed_sum(ys, w, backend=backend),
            "masked_softmax": ops.masked_softmax(logits, mask, tau=0.5, backend=backend),
            "gumbel_softmax": ops.gumbel_softmax(logits, mask, hard=False, backend=backend),
            "merge_kernels": ops.merge_kernels(kernels, kw, [1, 2], "tensor", backend=backend),
            "channel_shuffle": ops.channel_shuffle(x, 3, backend=backend),
            "partial_channel_shuffle": ops.partial_channel_shuffle(p, q, 3, backend=backend),
        }
        loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=DT).view_as(o)).sum() for o in outs.values())
        loss.backward()
        # twice differentiable: the shuffles' backwards (the unshuffle's path included)
        z = ops.channel_shuffle(ops.partial_channel_shuffle(p, q, 3, backend=backend), 2, backend=backend)
        v = torch.linspace(0, 1, z.numel(), dtype=DT).view_as(z).requires_grad_()
        gp, gb = torch.autograd.grad(z, (p, q), v, create_graph=True)
        (gp * gp).sum().add(gb.sum()).backward()  # to v, through the backwards' backwards
    grads = [t.grad for t in (*ys, w, logits, *kernels, kw, x, p, q, v)]
    return outs, grads, seen.names


def _custom_ops_only(monkeypatch):
    from toponas_kernels.ops import mixed

    for module in (_define, mixed):  # mixed: the hot path in front of the C++ fused op
        monkeypatch.setattr(module, "fast_path", lambda: False)


@pytest.mark.parametrize("backend", _backends())
def test_eager_path_skips_the_custom_ops(backend):
    """In eager mode no public op (forward, backward, double backward) dispatches a custom op:
    each runs its autograd.Function (or, on the compiled backends, its C++ fused op) around the
    same bodies; the compiled backends do reach their kernel ops."""
    outs, _, seen = _public_calls(backend)
    custom = {f"toponas::{name}" for name in SCHEMAS}
    assert not seen & custom, sorted(seen & custom)
    if backend == "cpp":
        for kernel in ("mixed_sum_kernel", "masked_softmax_backward_kernel", "merge_kernels_backward_kernel",
                       "partial_channel_unshuffle_kernel"):  # fmt: skip
            assert f"toponas::{kernel}" in seen, kernel
        assert "MixedSumFunction" in outs["mixed_sum"].grad_fn.name()  # autograd in C++
    else:
        assert not any(n.startswith("toponas::") for n in seen), sorted(seen)
        assert type(outs["mixed_sum"].grad_fn).__name__ == "MixedSumBackward"
    assert type(outs["merge_kernels"].grad_fn).__name__ == "MergeKernelsBackward"
    assert type(outs["masked_softmax"].grad_fn).__name__ == "MaskedSoftmaxBackward"


@pytest.mark.parametrize("backend", _backends())
def test_eager_and_custom_paths_agree(backend, monkeypatch):
    """With the fast path off the same calls go through the custom ops and their registered
    backwards (so the check above can fail), and give the eager path's values and gradients,
    double backward included, to the bit."""
    eager, eager_grads, _ = _public_calls(backend)
    _custom_ops_only(monkeypatch)
    custom, custom_grads, seen = _public_calls(backend)
    for name in ("mixed_sum", "mixed_sum_backward", "masked_softmax_backward", "merge_kernels_backward",
                 "channel_shuffle", "partial_channel_unshuffle", "partial_channel_shuffle"):  # fmt: skip
        assert f"toponas::{name}" in seen, name
    assert eager.keys() == custom.keys()
    for name in eager:
        torch.testing.assert_close(custom[name], eager[name], rtol=0, atol=0, msg=name)
    assert len(eager_grads) == len(custom_grads) == 12
    for k, (a, b) in enumerate(zip(custom_grads, eager_grads)):
        assert a is not None and b is not None, k
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"gradient {k}")
