"""Each ``toponas::`` op defined once: :func:`define_op` makes, from one definition, everything
that must agree with it.

An op is one computation on four backends (:class:`Kernels`: the plain PyTorch reference, a
Triton launcher, and a compiled op ``toponas::<compiled>`` with its C++ CPU and CUDA kernels),
and, when differentiable, a backward and what the forward saves for it. From that come:

* the custom op ``toponas::<name>`` (``torch.library.custom_op``, taking the arguments plus a
  trailing ``backend`` string) with its fake, which torch.compile, export, functorch transforms
  and ``opcheck`` use; and the fakes of the compiled ops it calls (``toponas::<compiled>``, and
  ``toponas::<fused>`` where a C++ op with its own C++ autograd exists), so those pass opcheck
  and torch.compile too;
* for a differentiable op: its backward op (a second custom op ``toponas::<name>_backward``,
  differentiable once, or an op defined elsewhere with ``define_op``: a shuffle's backward is a
  shuffle), the ``register_autograd`` wiring of the custom op, and the eager fast path, a
  ``torch.autograd.Function`` that runs the same bodies and the same backward formula without
  the custom op's Python dispatch (see ``_common.fast_path``).

Calling the returned :class:`Op` picks the path: in eager mode the C++ fused op when there is one
and the backend is compiled (``cpp``/``cuda``), else the autograd.Function; under compilation or
a functorch transform the custom op. The public functions (``mixed.py``, ``merge.py``,
``shuffle.py``) check their arguments, resolve the backend and call their op once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._common import FUSED_BACKENDS, device_guard, fast_path, fused_op, register_kernel_fake


@dataclass(frozen=True)
class Kernels:
    """One computation on every backend. Every function takes the op's arguments without the
    trailing ``backend``."""

    # backend="reference": plain PyTorch (ops/reference.py). Its result must be contiguous, as the
    # fake promises, and must not alias an input (custom ops may not return views of inputs).
    reference: Callable[..., Any]
    # backend="triton": the launcher, run under the device of the first tensor argument.
    triton: Callable[..., Any]
    # backend="cpp"/"cuda": the compiled op toponas::<compiled> (csrc/<family>.cpp on the CPU,
    # csrc/cuda/<family>.cu on CUDA).
    compiled: str
    # Empty tensors of the result's shapes, dtypes and layouts: the fake of the custom op, of
    # the compiled op and of the fused op (which must accept their arguments too).
    fake: Callable[..., Any]
    # The arguments as the compiled op takes them, where they differ (a mode name as its int code).
    compiled_args: Callable[..., tuple] | None = None
    # toponas::<fused>: an op taking the same arguments whose autograd node is in C++ (csrc/),
    # which the eager path calls on the compiled backends. None where there is none.
    fused: str | None = None


# Every op made here, by name (without the namespace): a backward given by name is looked up
# here when first needed, so an op's backward may be itself or an op defined after it.
_OPS: dict[str, Op] = {}


def _by_backend(kernels: Kernels) -> Callable[..., Any]:
    """The body of the custom op (and of the eager path): the op's arguments and ``backend``."""
    reference, triton, compiled, adapt = kernels.reference, kernels.triton, kernels.compiled, kernels.compiled_args

    def impl(*args):
        backend = args[-1]
        if backend == "reference":
            return reference(*args[:-1])
        if backend == "triton":
            first = args[0] if isinstance(args[0], Tensor) else args[0][0]
            with device_guard(first):
                return triton(*args[:-1])
        kernel = getattr(torch.ops.toponas, compiled)
        return kernel(*adapt(*args[:-1])) if adapt is not None else kernel(*args[:-1])

    return impl


class Op:
    """A ``toponas::`` op: call it with the op's arguments and the resolved backend.

    Attributes: ``name``; ``impl`` (the body, dispatching on the backend); ``custom`` (the
    ``torch.library`` custom op); ``fused`` (the C++ fused op's overload, or None);
    ``eager`` (the eager path: the autograd.Function's apply for a differentiable op, else
    ``impl``); ``backward`` (the backward Op, or None)."""

    def __init__(self, name: str, schema: str, kernels: Kernels):
        if name in _OPS:
            raise ValueError(f"toponas::{name} is defined twice")
        self.name = name
        self.impl = _by_backend(kernels)
        self.custom = torch.library.custom_op(f"toponas::{name}", self.impl, mutates_args=(), schema=schema)
        fake = kernels.fake
        self.custom.register_fake(lambda *args: fake(*args[:-1]))
        register_kernel_fake(kernels.compiled)(fake)
        if kernels.fused is not None:
            register_kernel_fake(kernels.fused)(fake)
        self.fused = fused_op(kernels.fused) if kernels.fused is not None else None
        self.eager = self.impl
        self.function: type[torch.autograd.Function] | None = None
        self._backward: Op | str | None = None
        _OPS[name] = self

    @property
    def backward(self) -> Op | None:
        if isinstance(self._backward, str):
            self._backward = _OPS[self._backward]
        return self._backward

    def __call__(self, *args):
        if fast_path():
            if self.fused is not None and args[-1] in FUSED_BACKENDS:
                return self.fused(*args[:-1])
            return self.eager(*args)
        return self.custom(*args)

    def _make_differentiable(self, save: Callable, gradients: Callable) -> None:
        """Wire ``gradients`` into the custom op (its backward calls the backward's custom op)
        and build the eager autograd.Function (its backward calls the backward's eager path,
        so a differentiable backward differentiates again)."""

        returns = self.custom._opoverload._schema.returns
        if len(returns) == 1 and returns[0].type == torch._C.ListType.ofTensors():
            # a Tensor[] output's gradients arrive as one list: spread, as the eager path's
            def custom_backward(ctx, grads):
                return gradients(ctx, self.backward.custom, *grads)

        else:

            def custom_backward(ctx, *grads):
                return gradients(ctx, self.backward.custom, *grads)

        self.custom.register_autograd(custom_backward, setup_context=save)
        self.function, self.eager = _eager_function(self, save, gradients)


def _eager_function(op: Op, save: Callable, gradients: Callable) -> tuple[type, Callable]:
    """The eager fast path of ``op``: an autograd.Function and the call that applies it.

    Autograd sees only the tensors passed to ``apply`` directly, so a tensor-list argument (at
    most one per op) is passed spread out, after the other arguments, and its gradients are
    returned spread out the same way."""
    arguments = op.custom._opoverload._schema.arguments
    tensor_lists = [i for i, a in enumerate(arguments) if a.type == torch._C.ListType.ofTensors()]
    if len(tensor_lists) > 1:
        raise ValueError(f"toponas::{op.name}: an eager autograd.Function takes at most one Tensor[] argument")
    impl = op.impl

    def run(ctx, args):
        out = impl(*args)
        save(ctx, args, out)
        return tuple(out) if isinstance(out, list) else out  # several outputs: a tuple

    if not tensor_lists:

        def forward(ctx, *args):
            return run(ctx, args)

        def backward(ctx, *grads):
            return gradients(ctx, op.backward.eager, *grads)

    else:
        at, fixed = tensor_lists[0], len(arguments) - 1

        def forward(ctx, *flat):
            ctx.toponas_list_len = len(flat) - fixed
            return run(ctx, (*flat[:at], list(flat[fixed:]), *flat[at:fixed]))

        def backward(ctx, *grads):
            g = gradients(ctx, op.backward.eager, *grads)
            spread = g[at] if g[at] is not None else [None] * ctx.toponas_list_len
            return (*g[:at], *g[at + 1 :], *spread)

    camel = "".join(part.title() for part in op.name.split("_"))
    function = type(camel, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward)})
    if not tensor_lists:
        return function, function.apply
    apply = function.apply

    def eager(*args):
        return apply(*args[:at], *args[at + 1 :], *args[at])

    return function, eager


def define_op(
    name: str,
    schema: str,
    forward: Kernels,
    *,
    backward: Kernels | str | None = None,
    backward_schema: str | None = None,
    save: Callable[[Any, tuple, Any], None] | None = None,
    gradients: Callable[..., tuple] | None = None,
) -> Op:
    """Define the op ``toponas::<name>`` once (see the module docstring for what it makes).

    Args:
        name: the op's name in the ``toponas`` namespace.
        schema: its schema, ending in ``str backend``, e.g.
            ``"(Tensor[] outputs, Tensor weights, str backend) -> Tensor"``.
        forward: the forward on every backend, with its fake.
        backward: None for an op without autograd; the backward's :class:`Kernels`, which
            becomes the op ``toponas::<name>_backward`` (schema ``backward_schema``, not itself
            differentiable); or the name of an op made by ``define_op`` (this one included),
            whose own autograd then differentiates the backward again.
        save: ``save(ctx, inputs, output)``, as ``setup_context`` of ``register_autograd``: what
            the backward needs (``ctx.save_for_backward(...)``, plain attributes on ctx).
        gradients: ``gradients(ctx, backward_op, *grads)`` -> one gradient per input (a list for
            a Tensor[] input, None for a non-tensor), calling ``backward_op`` with the backward's
            arguments (its custom op under compilation, its eager path in eager mode). A custom
            op's output gradient may be None (not materialized); the eager path's never is.
    """
    op = Op(name, schema, forward)
    if backward is None:
        return op
    if save is None or gradients is None:
        raise ValueError(f"toponas::{name}: a backward needs save= and gradients=")
    if isinstance(backward, Kernels):
        if backward_schema is None:
            raise ValueError(f"toponas::{name}: a backward given as Kernels needs backward_schema=")
        backward = Op(f"{name}_backward", backward_schema, backward)
    op._backward = backward
    op._make_differentiable(save, gradients)
    return op
