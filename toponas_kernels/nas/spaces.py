"""Search spaces as data: every candidate operation is a chain of basic modules.

A *basic module* is a small frozen dataclass that says what a module is and carries every
hyperparameter (``Conv(kernel=5, dilation=2, separable=True)``). Two modules are "the same
module" for sharing exactly when their descriptions are equal (type and all fields): the
simplification engine (``simplify.py``) never looks at operation names.

An *operation* (``OpDef``) is a name plus its chain at stride 1, optionally with a separate
chain for stride 2 (``reduce``: DARTS' skip_connect becomes FactorizedReduce there). A
*search space* (``SearchSpace``) is an ordered tuple of operations; the order is the order of
the architecture weights. Declaring a new space means writing ``OpDef``s: the engine and
``FusedMixedOp`` take it as is.

Stride. The chain of an operation at stride s > 1 (without a ``reduce`` chain) gives the stride
to the *first* module that can take one (a conv, a pool, zero): a separable conv's stride is on
its depthwise conv, and a double-stacked sep conv has it on its first depthwise only.

Counting (docs/DESIGN.md section 4, paper Table II). ``Conv`` (one *conv unit*: a depthwise+pointwise
pair or one dense conv) and ``FactorizedReduce`` count as ``conv``; ``ReLU``, ``BN`` and ``Pool``
count as ``non_conv``; ``Identity`` and ``Zero`` are not counted.

Pooling followed by its search-time BN is ONE atomic module. The DARTS *search* network appends
``BN(affine=False)`` after each pooling candidate, but the paper's Table I lists a pooling
candidate as a single module and Table II counts the DARTS edge as 6 conv / 14 non-conv. We
therefore describe DARTS' pools as ``Pool(kind, 3, bn=True)``: one module, counted once, run as
pool-then-BN, and never split by sharing (the BN inside belongs to that pool alone). With this
the DARTS counts are the paper's: original 6/14/20, PMS 6/8/14, FMS 6/6/12, reparam 3/6/9.
NAS-Bench-201's avg_pool has no BN after it (``bn=False``).

Sharing is allowed for parameter-free modules only (``ReLU``, ``BN``, ``Pool``): a conv unit
carries its candidate's own weights and is never shared, it is merged (reparameterized) instead.
``BN`` is shareable because the search builds it with ``affine=False``; with ``affine=True`` the
shared BN uses the affine parameters of one candidate (the lowest-index one).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

__all__ = [
    "Module",
    "ReLU",
    "BN",
    "Conv",
    "Pool",
    "Identity",
    "Zero",
    "FactorizedReduce",
    "OpDef",
    "SearchSpace",
    "DARTS_PRIMITIVES",
    "NB201_PRIMITIVES",
    "DARTS_SPACE",
    "NB201_SPACE",
    "darts_space",
    "nb201_space",
    "exaggerated_space",
    "get_space",
    "SPACE_NAMES",
    "sep_conv",
    "dil_conv",
    "nor_conv",
]


# ----------------------------------------------------------------------------- basic modules
@dataclass(frozen=True)
class Module:
    """A basic module of a candidate chain. Subclasses set the class attributes below."""

    category: ClassVar[str | None] = None  # "conv", "non_conv", or None (not counted)
    shareable: ClassVar[bool] = False  # parameter-free: PMS/FMS may run one copy for many
    strideable: ClassVar[bool] = False  # can take the stride of the operation

    def with_stride(self, stride: int) -> Module:
        """This module with stride ``stride`` (only for ``strideable`` modules)."""
        raise TypeError(f"{self} takes no stride")

    def describe(self) -> str:
        """Short human-readable text."""
        return type(self).__name__


@dataclass(frozen=True)
class ReLU(Module):
    """``nn.ReLU`` (not in place)."""

    category: ClassVar[str | None] = "non_conv"
    shareable: ClassVar[bool] = True

    def describe(self) -> str:
        return "ReLU"


@dataclass(frozen=True)
class BN(Module):
    """``nn.BatchNorm2d(C, affine=<the op's affine>)``."""

    category: ClassVar[str | None] = "non_conv"
    shareable: ClassVar[bool] = True

    def describe(self) -> str:
        return "BN"


@dataclass(frozen=True)
class Conv(Module):
    """One conv unit, C -> C channels, bias-free, padding ``(kernel - 1) * dilation // 2``
    ("same"; odd kernels only).

    ``separable=False``: one dense conv with ``groups``. ``separable=True``: a depthwise
    ``kernel`` x ``kernel`` conv (dilation, stride) followed by a 1x1 pointwise conv, as in
    DARTS' sep_conv / dil_conv; it counts as ONE conv unit.
    """

    kernel: int
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    separable: bool = False

    category: ClassVar[str | None] = "conv"
    strideable: ClassVar[bool] = True

    def __post_init__(self):
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"Conv: kernel must be odd and positive (padding 'same'), got {self.kernel}")
        if self.stride < 1 or self.dilation < 1 or self.groups < 1:
            raise ValueError(f"Conv: stride, dilation and groups must be >= 1, got {self}")
        if self.separable and self.groups != 1:
            raise ValueError("Conv: a separable conv has a depthwise conv and a dense 1x1 conv; groups must be 1")

    @property
    def span(self) -> int:
        """Receptive field of the kernel along one axis: (k - 1) d + 1."""
        return (self.kernel - 1) * self.dilation + 1

    @property
    def merge_groups(self) -> int:
        """``groups`` of the single equivalent conv (a dw+pw unit is a dense conv, groups 1)."""
        return 1 if self.separable else self.groups

    def with_stride(self, stride: int) -> Conv:
        return replace(self, stride=stride)

    def describe(self) -> str:
        k = f"{self.kernel}x{self.kernel}"
        text = f"dw{k}+pw" if self.separable else f"conv{k}"
        if self.dilation != 1:
            text += f" d{self.dilation}"
        if self.groups != 1:
            text += f" g{self.groups}"
        if self.stride != 1:
            text += f" s{self.stride}"
        return text


@dataclass(frozen=True)
class Pool(Module):
    """``MaxPool2d`` / ``AvgPool2d(count_include_pad=False)`` with padding ``kernel // 2``;
    with ``bn=True`` followed by its own BN, as one atomic module (see the module docstring)."""

    kind: str
    kernel: int = 3
    stride: int = 1
    bn: bool = False

    category: ClassVar[str | None] = "non_conv"
    shareable: ClassVar[bool] = True
    strideable: ClassVar[bool] = True

    def __post_init__(self):
        if self.kind not in ("max", "avg"):
            raise ValueError(f"Pool: kind must be 'max' or 'avg', got {self.kind!r}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"Pool: kernel must be odd and positive, got {self.kernel}")

    def with_stride(self, stride: int) -> Pool:
        return replace(self, stride=stride)

    def describe(self) -> str:
        text = f"{self.kind}_pool{self.kernel}x{self.kernel}"
        if self.stride != 1:
            text += f" s{self.stride}"
        return text + ("+BN" if self.bn else "")


@dataclass(frozen=True)
class Identity(Module):
    """The identity (skip_connect at stride 1). Not counted; the engine drops it from chains."""

    def describe(self) -> str:
        return "identity"


@dataclass(frozen=True)
class Zero(Module):
    """DARTS' ``none``: ``x * 0``, subsampled ``[::s, ::s]`` at stride s. Not counted; outside
    plain mode it is left out of the weighted sum (it adds exactly 0)."""

    stride: int = 1
    strideable: ClassVar[bool] = True

    def with_stride(self, stride: int) -> Zero:
        return replace(self, stride=stride)

    def describe(self) -> str:
        return "zero" + (f" s{self.stride}" if self.stride != 1 else "")


@dataclass(frozen=True)
class FactorizedReduce(Module):
    """The convolution part of DARTS' FactorizedReduce: two 1x1 stride-2 convs of C/2 outputs
    each, the second on ``x[:, :, 1:, 1:]``, concatenated (needs even H and W). DARTS' ReLU before
    it and BN after it are separate modules of the chain, so they can be shared. Counts as one
    conv unit; it is linear but not a centred conv, so it is never merged."""

    category: ClassVar[str | None] = "conv"

    def describe(self) -> str:
        return "factorized_reduce s2"


# ----------------------------------------------------------------------------- operations
@dataclass(frozen=True)
class OpDef:
    """A named candidate operation: its chain of basic modules at stride 1 and, if the chain at
    stride 2 is not just "the same with the first strideable module strided", that chain."""

    name: str
    modules: tuple[Module, ...]
    reduce: tuple[Module, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "modules", tuple(self.modules))
        if self.reduce is not None:
            object.__setattr__(self, "reduce", tuple(self.reduce))
        for m in self.modules + (self.reduce or ()):
            if not isinstance(m, Module):
                raise TypeError(f"OpDef {self.name!r}: {m!r} is not a basic module (spaces.Module)")

    def chain(self, stride: int = 1) -> tuple[Module, ...]:
        """The modules of this operation at ``stride``."""
        if stride == 1:
            return self.modules
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        if self.reduce is not None:
            return self.reduce
        for i, m in enumerate(self.modules):
            if m.strideable:
                return self.modules[:i] + (m.with_stride(stride),) + self.modules[i + 1 :]
        raise ValueError(f"operation {self.name!r} has no module that takes a stride and no reduce chain")


@dataclass(frozen=True)
class SearchSpace:
    """An ordered set of candidate operations (order = order of the architecture weights)."""

    name: str
    ops: tuple[OpDef, ...]

    def __post_init__(self):
        object.__setattr__(self, "ops", tuple(self.ops))
        names = [op.name for op in self.ops]
        if len(set(names)) != len(names):
            raise ValueError(f"space {self.name!r}: operation names must be unique, got {names}")
        if not names:
            raise ValueError(f"space {self.name!r} has no operations")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(op.name for op in self.ops)

    def __len__(self) -> int:
        return len(self.ops)

    def __iter__(self) -> Iterator[OpDef]:
        return iter(self.ops)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __getitem__(self, name: str) -> OpDef:
        for op in self.ops:
            if op.name == name:
                return op
        raise KeyError(name)

    def subset(self, names: Iterable[str], *, argument: str = "primitives") -> SearchSpace:
        """The space restricted to ``names``, in the order given."""
        ops = []
        for n in names:
            if n not in self:
                raise ValueError(
                    f"{argument}: unknown primitive {n!r} for space {self.name!r}; known: {list(self.names)}"
                )
            ops.append(self[n])
        return SearchSpace(self.name, tuple(ops))

    def chains(self, stride: int = 1) -> list[tuple[Module, ...]]:
        """Every operation's chain at ``stride``, in order."""
        return [op.chain(stride) for op in self.ops]


# ----------------------------------------------------------------------------- built-in spaces
def sep_conv(kernel: int, name: str | None = None) -> OpDef:
    """DARTS' double-stacked separable conv: twice (ReLU, dw k x k + pw 1x1, BN)."""
    unit = (ReLU(), Conv(kernel, separable=True), BN())
    return OpDef(name or f"sep_conv_{kernel}x{kernel}", unit + unit)


def dil_conv(kernel: int, dilation: int = 2, name: str | None = None) -> OpDef:
    """DARTS' dilated separable conv: ReLU, dw k x k dilation d + pw 1x1, BN."""
    suffix = "" if dilation == 2 else f"_d{dilation}"
    return OpDef(
        name or f"dil_conv_{kernel}x{kernel}{suffix}",
        (ReLU(), Conv(kernel, dilation=dilation, separable=True), BN()),
    )


def nor_conv(kernel: int, name: str | None = None) -> OpDef:
    """NAS-Bench-201's ReLU-Conv-BN."""
    return OpDef(name or f"nor_conv_{kernel}x{kernel}", (ReLU(), Conv(kernel), BN()))


_NONE = OpDef("none", (Zero(),))
_SKIP = OpDef("skip_connect", (Identity(),), reduce=(ReLU(), FactorizedReduce(), BN()))

DARTS_PRIMITIVES = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)
NB201_PRIMITIVES = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")


def darts_space() -> SearchSpace:
    """The DARTS CIFAR-10 space (docs/REFERENCE.md), pools with their search-time BN."""
    return SearchSpace(
        "darts",
        (
            _NONE,
            OpDef("max_pool_3x3", (Pool("max", 3, bn=True),)),
            OpDef("avg_pool_3x3", (Pool("avg", 3, bn=True),)),
            _SKIP,
            sep_conv(3),
            sep_conv(5),
            dil_conv(3),
            dil_conv(5),
        ),
    )


def nb201_space() -> SearchSpace:
    """The NAS-Bench-201 space. Its cells are all stride 1; at stride 2 skip_connect is DARTS'
    FactorizedReduce (NB201's own pads odd inputs instead)."""
    return SearchSpace(
        "nb201",
        (_NONE, _SKIP, nor_conv(1), nor_conv(3), OpDef("avg_pool_3x3", (Pool("avg", 3),))),
    )


def exaggerated_space(num_sep_dil: int | Sequence[int] = 5, num_double_sep: int | Sequence[int] = 7) -> SearchSpace:
    """The paper's "exaggerated" space (Sec. 4.5, Table VI, Fig. 8): skip, max pool and avg pool
    (the DARTS definitions) plus separable dilated convs and double-stacked separable convs.

    The paper used 5 and 7 (Table VI; the defaults) but does not give their sizes. Our reading:
    the i-th of each kind has kernel 2i + 1 (3, 5, 7, ...), the dilated ones dilation 2 like
    DARTS' dil_conv. Pass a sequence of kernel sizes instead of a count to choose them.
    There is no ``none`` (the paper's base space is the three parameter-free ops).
    """
    dil_k = _kernels(num_sep_dil, "num_sep_dil")
    sep_k = _kernels(num_double_sep, "num_double_sep")
    ops = [
        OpDef("skip_connect", _SKIP.modules, _SKIP.reduce),
        OpDef("max_pool_3x3", (Pool("max", 3, bn=True),)),
        OpDef("avg_pool_3x3", (Pool("avg", 3, bn=True),)),
    ]
    ops += [dil_conv(k) for k in dil_k]
    ops += [sep_conv(k) for k in sep_k]
    return SearchSpace(f"exaggerated({len(dil_k)},{len(sep_k)})", tuple(ops))


def _kernels(spec: int | Sequence[int], argument: str) -> list[int]:
    if isinstance(spec, int):
        if spec < 0:
            raise ValueError(f"{argument} must be >= 0, got {spec}")
        return [2 * i + 3 for i in range(spec)]
    kernels = [int(k) for k in spec]
    if len(set(kernels)) != len(kernels):
        raise ValueError(f"{argument}: kernel sizes must be distinct, got {kernels}")
    return kernels


DARTS_SPACE = darts_space()
NB201_SPACE = nb201_space()

SPACE_NAMES = ("darts", "nb201", "exaggerated")


def get_space(name: str | SearchSpace, **options) -> SearchSpace:
    """A built-in space by name (``"darts"``, ``"nb201"``, ``"exaggerated"``; options go to
    ``exaggerated_space``), or ``name`` itself when it already is a space."""
    if isinstance(name, SearchSpace):
        return name
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    if options and key != "exaggerated":
        raise ValueError(f"space: options {sorted(options)} apply to the 'exaggerated' space only, not {name!r}")
    if key == "darts":
        return DARTS_SPACE
    if key in ("nb201", "nasbench201"):
        return NB201_SPACE
    if key == "exaggerated":
        return exaggerated_space(**options)
    raise ValueError(f"space: unknown search space {name!r}; built in: {list(SPACE_NAMES)}")
