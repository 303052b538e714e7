"""Recognizing a user's own candidate modules, so that ``FusedMixedOp.wrap`` can run an
existing supernet's edges through the TopoNAS rewrites with the user's own parameters.

Recognition is by structure, never by class name: a candidate is traced with ``torch.fx`` (or
taken as is when it is itself one ``torch.nn`` leaf module) and its graph is read as a chain of
the package's basic modules (``spaces.py``):

* ``ReLU`` (module, ``F.relu``, ``torch.relu`` or ``.relu()``);
* a conv unit: an ``nn.Conv2d`` C -> C with a square odd kernel, "same" zero padding
  ``(k - 1) d / 2``, any stride, dilation and groups, with or without bias (a dense ``Conv``);
  a depthwise conv followed by a 1x1 pointwise conv is one separable unit (DARTS' sep and dil
  convs);
* ``nn.BatchNorm2d`` over C channels, affine or not, tracking running statistics or not;
* ``nn.MaxPool2d`` / ``nn.AvgPool2d(count_include_pad=False)`` k x k, padding k // 2, any
  stride; a pool followed by a BN is DARTS' atomic search-time ``Pool(bn=True)``;
* identity (a graph that returns its input, ``nn.Identity``);
* zero: ``x.mul(0.)`` (``x * 0``), after an optional ``x[:, :, ::s, ::s]`` (DARTS' and xautodl's
  ``Zero``); a module that makes new zeros (``new_zeros``) is not this (NaN would not propagate);
* DARTS' FactorizedReduce: ReLU, ``cat([conv_1(x), conv_2(x[:, :, 1:, 1:])], 1)`` with two 1x1
  stride-2 convs of C/2 outputs, BN.

A candidate that is none of these (another graph, a module fx cannot trace, other channel
counts) is *opaque*: it runs as it is, in every mode, as one branch of the top-level weighted
sum (so it is exact there), and is left out of sharing and merging. ``FusedMixedOp.wrap``
reports opaque candidates once by name; ``wrap_supernet`` once per model.

The recognized modules are *views* of the user's: a ``ConvUnit`` over the user's convs, a
``PoolBN`` over the user's pool and BN, the user's BN itself (a fresh ``nn.ReLU`` stands for a
ReLU: it has no state). The views are not registered as submodules of the ``FusedMixedOp``, so
its parameters, buffers and ``state_dict`` are the user's candidates' (under ``_ops.<i>.``).

BN settings. Two BNs are the same module for sharing when the edge's BNs all have the same
settings (affine, track_running_stats, eps, momentum), as in every supernet known to us; when
they differ, each setting is its own module description (``TaggedBN``), so no BN is shared
with one of other settings.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import spaces as S
from .operations import ConvUnit, FactorizedReduceConv, PoolBN

__all__ = ["Opaque", "TaggedBN", "Recognized", "recognize", "recognize_edge"]


@dataclass(frozen=True)
class Opaque(S.Module):
    """A candidate that was not recognized: run as it is, never shared or merged. ``index``
    keeps two opaque candidates of an edge distinct."""

    name: str = "?"
    index: int = 0

    def describe(self) -> str:
        return f"opaque {self.name}"


@dataclass(frozen=True)
class TaggedBN(S.BN):
    """A BN whose settings differ from another BN of the same edge (``settings``: affine,
    track_running_stats, eps, momentum); shared only with BNs of the same settings."""

    settings: tuple = ()


class Recognized(NamedTuple):
    """A candidate as a chain: ``chain`` (basic modules) and ``parts`` (one module per chain
    position, views of the user's modules); ``reason`` is why it is opaque (None if not)."""

    chain: tuple[S.Module, ...]
    parts: tuple[nn.Module, ...]
    reason: str | None = None


class _Opaque(Exception):
    pass


_LEAVES = (nn.ReLU, nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.Identity)


def _pair(v) -> int:
    if isinstance(v, tuple):
        if len(set(v)) != 1:
            raise _Opaque(f"non-square {v}")
        return v[0]
    return v


def _steps(module: nn.Module) -> list[tuple]:
    """The candidate as a list of steps: ("module", m), ("relu",), ("zero", s), ("identity",),
    ("fr", conv_1, conv_2). Raises _Opaque for anything else."""
    if isinstance(module, _LEAVES):
        return [("module", module)]
    try:
        graph = torch.fx.Tracer().trace(module)
    except Exception as exc:  # noqa: BLE001 - any tracing failure makes the candidate opaque
        raise _Opaque(f"torch.fx cannot trace it ({type(exc).__name__})") from None
    nodes = [n for n in graph.nodes]
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise _Opaque(f"{len(inputs)} inputs")
    cur = inputs[0]
    steps: list[tuple] = []
    pending = None  # a subsampling getitem waiting for its mul(0)
    body = [n for n in nodes if n.op not in ("placeholder", "output")]
    i = 0
    while i < len(body):
        n = body[i]
        fr = _factorized_reduce(module, body[i : i + 4], cur)
        if fr is not None:
            steps.append(fr)
            cur = body[i + 3]
            i += 4
            continue
        if n.all_input_nodes != [cur]:
            raise _Opaque("not a chain of modules")
        step = _step(module, n, cur)
        if step[0] == "subsample":
            if pending is not None:
                raise _Opaque("a subsampling that is not zero's")
            pending = step[1]
        elif step[0] == "zero":
            steps.append(("zero", pending or 1))
            pending = None
        elif pending is not None:
            raise _Opaque("a subsampling that is not zero's")
        elif step[0] != "identity":
            steps.append(step)
        cur = n
        i += 1
    if pending is not None:
        raise _Opaque("a subsampling that is not zero's")
    (out,) = [n for n in nodes if n.op == "output"]
    if out.args[0] is not cur:
        raise _Opaque("the output is not the chain's end")
    return steps or [("identity",)]


def _is_slices(arg, stop_start: int | None = None) -> int | None:
    """``x[:, :, a::s, a::s]`` -> s (with start ``stop_start``), None if not that form."""
    if not isinstance(arg, tuple) or len(arg) != 4 or not all(isinstance(a, slice) for a in arg):
        return None
    if arg[0] != slice(None) or arg[1] != slice(None) or arg[2] != arg[3]:
        return None
    sl = arg[2]
    if sl.stop is not None or sl.start != stop_start:
        return None
    return 1 if sl.step is None else sl.step


def _step(root: nn.Module, n, cur) -> tuple:
    if n.op == "call_module":
        m = root.get_submodule(n.target)
        if isinstance(m, nn.Identity):
            return ("identity",)
        if isinstance(m, _LEAVES):
            return ("module", m)
        raise _Opaque(f"module {type(m).__name__}")
    if (n.op == "call_function" and n.target in (F.relu, torch.relu)) or (n.op == "call_method" and n.target == "relu"):
        if n.kwargs.get("inplace") or any(a is True for a in n.args[1:]):
            raise _Opaque("an in-place relu")
        return ("relu",)
    is_mul = (n.op == "call_function" and n.target in (operator.mul, torch.mul)) or (n.op == "call_method" and n.target == "mul")
    if is_mul and len(n.args) == 2 and not n.kwargs:
        other = n.args[1] if n.args[0] is cur else n.args[0]
        if isinstance(other, (int, float)) and not isinstance(other, bool) and other == 0:
            return ("zero",)
    if n.op == "call_function" and n.target is operator.getitem and len(n.args) == 2:
        s = _is_slices(n.args[1])
        if s is not None:
            return ("subsample", s)
    raise _Opaque(f"{n.op} {getattr(n.target, '__name__', n.target)}")


def _factorized_reduce(root: nn.Module, window, cur):
    """DARTS' ``cat([conv_1(x), conv_2(x[:, :, 1:, 1:])], 1)`` on ``cur``: ("fr", conv_1, conv_2)."""
    if len(window) != 4:
        return None
    a, sub, b, cat = window
    if not (a.op == "call_module" and a.args == (cur,) and sub.op == "call_function" and sub.target is operator.getitem):
        return None
    if sub.args[0] is not cur or _is_slices(sub.args[1], 1) != 1 or b.op != "call_module" or b.args != (sub,):
        return None
    if not (cat.op == "call_function" and cat.target is torch.cat):
        return None
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if cat.args[0] != [a, b] and cat.args[0] != (a, b) or dim != 1:
        return None
    c1, c2 = root.get_submodule(a.target), root.get_submodule(b.target)
    if not all(isinstance(c, nn.Conv2d) for c in (c1, c2)):
        return None
    return ("fr", c1, c2)


def _check_conv(m: nn.Conv2d, C: int) -> tuple[int, int, int]:
    k, s, d, p = (_pair(v) for v in (m.kernel_size, m.stride, m.dilation, m.padding))
    if m.padding_mode != "zeros" or isinstance(m.padding, str) and m.padding != "same":
        raise _Opaque("a conv with padding other than zeros")
    if isinstance(m.padding, str):
        p = (k - 1) * d // 2 if s == 1 else -1
    if k % 2 == 0 or p != (k - 1) * d // 2:
        raise _Opaque(f"a conv {k}x{k} whose padding is not 'same' ({p})")
    if C is not None and (m.in_channels != C or m.out_channels != C):
        raise _Opaque(f"a conv {m.in_channels} -> {m.out_channels} channels (the edge has {C})")
    return k, s, d


def _pool_spec(m: nn.Module) -> S.Pool:
    k, s, p = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size), _pair(m.padding)
    if k % 2 == 0 or p != k // 2 or m.ceil_mode:
        raise _Opaque(f"a pool {k}x{k} padding {p}")
    if isinstance(m, nn.MaxPool2d):
        if _pair(m.dilation) != 1 or m.return_indices:
            raise _Opaque("a dilated max pool or one that returns indices")
        return S.Pool("max", k, s)
    if m.count_include_pad or m.divisor_override is not None:
        raise _Opaque("an avg pool that counts its padding")
    return S.Pool("avg", k, s)


def _bn_settings(m: nn.BatchNorm2d) -> tuple:
    return (m.affine, m.track_running_stats, m.eps, m.momentum)


def _channels(module: nn.Module) -> int | None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
        if isinstance(m, nn.BatchNorm2d):
            return m.num_features
    return None


def recognize(module: nn.Module, C: int | None = None, *, name: str = "?", index: int = 0, bn_spec=None) -> Recognized:
    """``module`` as a chain of basic modules at C channels, or opaque (``reason`` says why).
    C None: the channels of the module's first conv or BN (any, for a module without either).
    ``bn_spec(bn)``: the description of a BN (default ``spaces.BN()``)."""
    if C is None:
        C = _channels(module)
    bn_spec = bn_spec or (lambda bn: S.BN())
    try:
        steps = _steps(module)
        chain: list[S.Module] = []
        parts: list[nn.Module] = []
        i = 0
        while i < len(steps):
            step = steps[i]
            kind = step[0]
            nxt = steps[i + 1] if i + 1 < len(steps) else None
            nxt_m = nxt[1] if nxt is not None and nxt[0] == "module" else None
            if kind == "relu" or (kind == "module" and isinstance(step[1], nn.ReLU)):
                chain.append(S.ReLU())
                parts.append(nn.ReLU())
            elif kind == "zero":
                chain.append(S.Zero(step[1]))
                parts.append(nn.Identity())
            elif kind == "identity":
                chain.append(S.Identity())
                parts.append(nn.Identity())
            elif kind == "fr":
                for c in step[1:]:
                    if _pair(c.kernel_size) != 1 or _pair(c.stride) != 2 or _pair(c.padding) != 0 or c.groups != 1:
                        raise _Opaque("a factorized reduce whose convs are not 1x1 stride 2")
                    if C is None or c.in_channels != C or 2 * c.out_channels != C:
                        raise _Opaque("a factorized reduce of other channel counts")
                chain.append(S.FactorizedReduce())
                parts.append(FactorizedReduceConv.of(step[1], step[2]))
            elif isinstance(step[1], nn.Conv2d):
                m = step[1]
                k, s, d = _check_conv(m, C)
                C = m.in_channels if C is None else C
                pointwise = (
                    m.groups == C
                    and isinstance(nxt_m, nn.Conv2d)
                    and _pair(nxt_m.kernel_size) == 1
                    and _pair(nxt_m.stride) == 1
                    and _pair(nxt_m.padding) == 0
                    and nxt_m.groups == 1
                    and nxt_m.padding_mode == "zeros"
                    and nxt_m.in_channels == C
                    and nxt_m.out_channels == C
                )
                if pointwise and C > 1:
                    spec = S.Conv(k, s, d, separable=True)
                    chain.append(spec)
                    parts.append(ConvUnit.of(spec, (m, nxt_m)))
                    i += 1
                else:
                    spec = S.Conv(k, s, d, groups=m.groups)
                    chain.append(spec)
                    parts.append(ConvUnit.of(spec, (m,)))
            elif isinstance(step[1], nn.BatchNorm2d):
                if C is not None and step[1].num_features != C:
                    raise _Opaque(f"a BN of {step[1].num_features} channels (the edge has {C})")
                chain.append(bn_spec(step[1]))
                parts.append(step[1])
            elif isinstance(step[1], (nn.MaxPool2d, nn.AvgPool2d)):
                spec = _pool_spec(step[1])
                bn = nxt_m if isinstance(nxt_m, nn.BatchNorm2d) and nxt_m.num_features == C else None
                if bn is not None:
                    if bn_spec(bn) != S.BN():  # a pool's BN shares with pools whose BN has the same settings only
                        raise _Opaque("a pool whose BN has other settings than the edge's other BNs")
                    spec = S.Pool(spec.kind, spec.kernel, spec.stride, bn=True)
                    i += 1
                chain.append(spec)
                parts.append(PoolBN.of(spec, step[1], bn))
            else:
                raise _Opaque(f"module {type(step[1]).__name__}")
            i += 1
        zeros = [m for m in chain if isinstance(m, S.Zero)]
        if zeros and len(chain) != 1:
            raise _Opaque("zero inside a chain")
        return Recognized(tuple(chain), tuple(parts))
    except _Opaque as why:
        return Recognized((Opaque(name, index),), (module,), str(why))


def _stride_of(chain) -> int:
    for m in chain:
        if isinstance(m, (S.Conv, S.Pool, S.Zero)) and m.stride != 1:
            return m.stride
        if isinstance(m, S.FactorizedReduce):
            return 2
    return 1


def _matches(chain, stride: int) -> str | None:
    """The name of a built-in operation (DARTS, then NAS-Bench-201) with this chain at ``stride``."""
    for space in (S.DARTS_SPACE, S.NB201_SPACE):
        for op in space:
            try:
                if op.chain(stride) == chain or (stride == 1 and chain == (S.Identity(),) and op.name == "skip_connect"):
                    return op.name
            except ValueError:
                continue
    return None


class Edge(NamedTuple):
    """What ``recognize_edge`` found: the space (one ``OpDef`` per candidate, its chain at the
    edge's stride), the views per candidate, the channels, the stride, and the opaque
    candidates' names with the reason."""

    space: S.SearchSpace
    parts: list[list[nn.Module]]
    C: int | None
    stride: int
    opaque: list[tuple[str, str]]


def recognize_edge(modules: list[nn.Module], names: list[str] | None = None, C: int | None = None,
                   stride: int | None = None) -> Edge:
    """Recognize every candidate of one edge (``modules`` in weight order)."""
    if C is None:
        C = next((c for c in map(_channels, modules) if c is not None), None)
    bns = [m for mod in modules for m in mod.modules() if isinstance(m, nn.BatchNorm2d)]
    uniform = len({_bn_settings(b) for b in bns}) <= 1

    def bn_spec(bn):
        return S.BN() if uniform else TaggedBN(_bn_settings(bn))

    found = []
    for i, m in enumerate(modules):
        label = names[i] if names is not None else type(m).__name__
        found.append(recognize(m, C, name=label, index=i, bn_spec=bn_spec))
    strides = {_stride_of(r.chain) for r in found if r.reason is None}
    if stride is None:
        stride = max(strides, default=1)
    if names is None:
        names = []
        for i, r in enumerate(found):
            base = (_matches(r.chain, stride) if r.reason is None and uniform else None) or type(modules[i]).__name__
            names.append(base if base not in names else f"{base}_{i}")
    ops = tuple(S.OpDef(n, r.chain, reduce=r.chain if stride != 1 else None) for n, r in zip(names, found))
    opaque = [(names[i], r.reason) for i, r in enumerate(found) if r.reason is not None]
    return Edge(S.SearchSpace("wrapped", ops), [list(r.parts) for r in found], C, stride, opaque)


# ----------------------------------------------------------------------------- reports
_REPORTED: set[str] = set()


def opaque_message(opaque: list[tuple[str, str]], edges: int = 1) -> str:
    names = sorted({f"{n} ({why})" for n, why in opaque})
    where = f" on {edges} edges" if edges > 1 else ""
    return (
        "FusedMixedOp.wrap: candidates not recognized" + where + ", run as they are (exact in every mode, "
        "left out of sharing and merging): " + "; ".join(names)
    )


def report_once(message: str, stacklevel: int = 3) -> None:
    """Warn ``message`` once per process (a registry, so filters set to "always" still see it once)."""
    if message not in _REPORTED:
        _REPORTED.add(message)
        warnings.warn(message, stacklevel=stacklevel)
