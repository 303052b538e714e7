"""Plain reference modules: the DARTS and NAS-Bench-201 operations exactly as docs/REFERENCE.md
defines them, built from the basic-module chains of ``spaces.py``.

Every candidate operation is an ``OpChain``: an ``nn.Sequential`` with one child per basic module
of its chain, in order, so that ``FusedMixedOp`` can run a single module of a candidate (a shared
ReLU/BN, a conv unit) and read a conv unit's kernels. The forward of an ``OpChain`` is the
reference operation's forward, and its parameters and buffers come in the same order as in the
usual DARTS implementation (depthwise then pointwise, conv_1 then conv_2, BN after), which is
what ``FusedMixedOp.load_plain_state`` relies on.

Named constructors (``SepConv``, ``DilConv``, ``ReLUConvBN``, ``FactorizedReduce``, ``PoolBN``,
``Zero``, ``Identity``) and ``chosen_module`` (the op picked for retraining) return these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from . import spaces as S

__all__ = [
    "ConvUnit",
    "FactorizedReduceConv",
    "PoolBN",
    "Zero",
    "OpChain",
    "build_module",
    "build_op",
    "chosen_module",
    "ReLUConvBN",
    "SepConv",
    "DilConv",
    "FactorizedReduce",
]


class ConvUnit(nn.Module):
    """One conv unit (``spaces.Conv``): a dense conv, or a depthwise conv followed by a 1x1
    pointwise conv (``separable``); padding "same". ``bias``: the conv (the pointwise conv of a
    separable unit) carries a bias, as xautodl's convs do with ``affine=False``.

    ``ConvUnit.of(spec, convs)`` makes a view of existing ``nn.Conv2d`` modules (a wrapped
    supernet's own): it holds those modules, not copies, and any of them may carry a bias."""

    def __init__(self, C_in: int, C_out: int, spec: S.Conv, bias: bool = False):
        super().__init__()
        self.spec = spec
        pad = (spec.kernel - 1) * spec.dilation // 2
        if spec.separable:
            self.depthwise = nn.Conv2d(
                C_in, C_in, spec.kernel, spec.stride, pad, spec.dilation, groups=C_in, bias=False
            )
            self.pointwise = nn.Conv2d(C_in, C_out, 1, bias=bias)
        else:
            if C_in % spec.groups or C_out % spec.groups:
                raise ValueError(f"C: {C_in} -> {C_out} channels do not divide into groups={spec.groups}")
            self.conv = nn.Conv2d(C_in, C_out, spec.kernel, spec.stride, pad, spec.dilation, groups=spec.groups, bias=bias)

    @classmethod
    def of(cls, spec: S.Conv, convs: Sequence[nn.Conv2d]) -> "ConvUnit":
        """A unit over existing convs: ``(depthwise, pointwise)`` for a separable ``spec``,
        ``(conv,)`` otherwise."""
        unit = nn.Module.__new__(cls)
        nn.Module.__init__(unit)
        unit.spec = spec
        if spec.separable:
            unit.depthwise, unit.pointwise = convs
        else:
            (unit.conv,) = convs
        return unit

    def forward(self, x: Tensor) -> Tensor:
        if self.spec.separable:
            return self.pointwise(self.depthwise(x))
        return self.conv(x)

    def kernel_tensors(self) -> tuple[Tensor, ...]:
        """The unit's kernels: (depthwise, pointwise) for a separable unit, (weight,) otherwise."""
        if self.spec.separable:
            return (self.depthwise.weight, self.pointwise.weight)
        return (self.conv.weight,)

    def bias_tensor(self) -> Tensor | None:
        """The unit's output bias [C_out], None without one: the conv's bias; for a separable
        unit ``P @ b_depthwise + b_pointwise`` (pw(dw(x) + b_d) + b_p = pw(dw(x)) + P b_d + b_p)."""
        if not self.spec.separable:
            return self.conv.bias
        bd, bp = self.depthwise.bias, self.pointwise.bias
        if bd is None:
            return bp
        through = self.pointwise.weight.flatten(1) @ bd
        return through if bp is None else through + bp

    @staticmethod
    def dense_from(kernels: Sequence[Tensor]) -> Tensor:
        """The kernel of the single conv equal to a unit with these ``kernel_tensors()`` (before
        dilation): for a separable unit ``W[o, c] = P[o, c] * D[c]``, shape [C_out, C_in, k, k]
        (groups 1); for a dense conv its weight. Exact: pw(dw_d(x)) = conv_d(x, W)."""
        if len(kernels) == 2:
            depthwise, pointwise = kernels
            return pointwise * depthwise.transpose(0, 1)
        return kernels[0]

    def dense_kernel(self) -> Tensor:
        return self.dense_from(self.kernel_tensors())


class FactorizedReduceConv(nn.Module):
    """The conv part of DARTS' FactorizedReduce (``spaces.FactorizedReduce``): two 1x1 stride-2
    convs of C_out/2 outputs, the second on ``x[:, :, 1:, 1:]``, concatenated."""

    def __init__(self, C_in: int, C_out: int, bias: bool = False):
        super().__init__()
        if C_out % 2:
            raise ValueError(f"C: FactorizedReduce needs an even channel count, got {C_out}")
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=bias)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=bias)

    @classmethod
    def of(cls, conv_1: nn.Conv2d, conv_2: nn.Conv2d) -> "FactorizedReduceConv":
        """A view over existing convs (a wrapped supernet's own)."""
        unit = nn.Module.__new__(cls)
        nn.Module.__init__(unit)
        unit.conv_1, unit.conv_2 = conv_1, conv_2
        return unit

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError(f"x: FactorizedReduce (skip_connect at stride 2) needs even H and W, got {tuple(x.shape[-2:])}")
        return torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1)


class PoolBN(nn.Module):
    """A pooling module (``spaces.Pool``), followed by ``BatchNorm2d`` when ``spec.bn``."""

    def __init__(self, C: int, spec: S.Pool, affine: bool = False, track_running_stats: bool = True):
        super().__init__()
        self.spec = spec
        pad = spec.kernel // 2
        if spec.kind == "max":
            self.pool = nn.MaxPool2d(spec.kernel, spec.stride, pad)
        else:
            self.pool = nn.AvgPool2d(spec.kernel, spec.stride, pad, count_include_pad=False)
        self.bn = nn.BatchNorm2d(C, affine=affine, track_running_stats=track_running_stats) if spec.bn else None

    @classmethod
    def of(cls, spec: S.Pool, pool: nn.Module, bn: nn.Module | None) -> "PoolBN":
        """A view over an existing pool and its BN (a wrapped supernet's own)."""
        unit = nn.Module.__new__(cls)
        nn.Module.__init__(unit)
        unit.spec, unit.pool, unit.bn = spec, pool, bn
        return unit

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(x)
        return self.bn(x) if self.bn is not None else x


class Zero(nn.Module):
    """DARTS' ``none``: ``x * 0`` (subsampled at stride s), so NaN/inf propagate like the reference."""

    def __init__(self, stride: int = 1):
        super().__init__()
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class OpChain(nn.Sequential):
    """A candidate operation: one child module per basic module of ``chain``."""

    def __init__(self, chain: Sequence[S.Module], children: Sequence[nn.Module], name: str = ""):
        super().__init__(*children)
        self.chain = tuple(chain)
        self.op_name = name

    def extra_repr(self) -> str:
        return f"name={self.op_name!r}" if self.op_name else ""


def build_module(
    spec: S.Module, C: int, affine: bool = False, track_running_stats: bool = True, bias: bool = False
) -> nn.Module:
    """The ``nn.Module`` of one basic module at C channels (C -> C). ``affine`` and
    ``track_running_stats`` go to every BN, ``bias`` to every conv (the pointwise conv of a
    separable unit)."""
    if isinstance(spec, S.ReLU):
        return nn.ReLU(inplace=False)
    if isinstance(spec, S.BN):
        return nn.BatchNorm2d(C, affine=affine, track_running_stats=track_running_stats)
    if isinstance(spec, S.Conv):
        return ConvUnit(C, C, spec, bias)
    if isinstance(spec, S.Pool):
        return PoolBN(C, spec, affine, track_running_stats)
    if isinstance(spec, S.Identity):
        return nn.Identity()
    if isinstance(spec, S.Zero):
        return Zero(spec.stride)
    if isinstance(spec, S.FactorizedReduce):
        return FactorizedReduceConv(C, C, bias)
    raise TypeError(f"no module for {spec!r}")


def build_op(
    op: S.OpDef, C: int, stride: int = 1, affine: bool = False, track_running_stats: bool = True, bias: bool = False
) -> OpChain:
    """The plain module of operation ``op`` at C channels and ``stride`` (options: ``build_module``)."""
    chain = op.chain(stride)
    return OpChain(chain, [build_module(m, C, affine, track_running_stats, bias) for m in chain], op.name)


def chosen_module(name: str, C: int, stride: int = 1, affine: bool = True, space: S.SearchSpace | str = "darts") -> OpChain:
    """The plain reference module of operation ``name`` of ``space``, for retraining (DARTS
    retrains with affine BN, hence ``affine=True``). The BN that the search network puts after a
    pooling candidate (``Pool(bn=True)``) is search-only: the retrained network's pool has none,
    as in DARTS' evaluation network."""
    space = S.get_space(space)
    if name not in space:
        raise ValueError(f"name: unknown primitive {name!r} for space {space.name!r}; known: {list(space.names)}")
    chain = tuple(replace(m, bn=False) if isinstance(m, S.Pool) else m for m in space[name].chain(stride))
    return OpChain(chain, [build_module(m, C, affine) for m in chain], name)


# ----------------------------------------------------------------------------- named references
def SepConv(C: int, kernel: int, stride: int = 1, affine: bool = False) -> OpChain:
    """DARTS sep_conv_kxk: twice (ReLU, dw k x k pad k//2, 1x1, BN); stride on the first dw."""
    return build_op(S.sep_conv(kernel), C, stride, affine)


def DilConv(C: int, kernel: int, stride: int = 1, dilation: int = 2, affine: bool = False) -> OpChain:
    """DARTS dil_conv_kxk: ReLU, dw k x k dilation d pad (k-1)d/2, 1x1, BN."""
    return build_op(S.dil_conv(kernel, dilation), C, stride, affine)


def ReLUConvBN(C_in: int, C_out: int, kernel: int, stride: int = 1, affine: bool = False) -> OpChain:
    """ReLU, Conv(bias=False, pad (k-1)/2), BN: DARTS' preprocessing and NB201's nor_conv."""
    spec = S.Conv(kernel, stride=stride)
    chain = (S.ReLU(), spec, S.BN())
    return OpChain(chain, [nn.ReLU(inplace=False), ConvUnit(C_in, C_out, spec), nn.BatchNorm2d(C_out, affine=affine)])


def FactorizedReduce(C_in: int, C_out: int, affine: bool = False) -> OpChain:
    """DARTS' FactorizedReduce: ReLU, two 1x1 stride-2 convs (the second shifted), concat, BN."""
    chain = (S.ReLU(), S.FactorizedReduce(), S.BN())
    return OpChain(
        chain, [nn.ReLU(inplace=False), FactorizedReduceConv(C_in, C_out), nn.BatchNorm2d(C_out, affine=affine)]
    )
