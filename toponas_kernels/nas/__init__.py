"""TopoNAS on top of the kernels: search spaces as data (``spaces``), the topological
simplification engine (``simplify``), plain reference operations (``operations``) and the
drop-in mixed operation ``FusedMixedOp`` (``mixed_op``), which also wraps a user's own
candidate modules (``FusedMixedOp.wrap``, ``wrap_supernet`` in ``supernet_wrap``; recognition in ``wrap``)."""

from .spaces import (
    BN,
    DARTS_PRIMITIVES,
    DARTS_SPACE,
    NB201_PRIMITIVES,
    NB201_SPACE,
    Conv,
    FactorizedReduce,
    Identity,
    Module,
    OpDef,
    Pool,
    ReLU,
    SearchSpace,
    Zero,
    darts_space,
    exaggerated_space,
    get_space,
    nb201_space,
)
from .operations import OpChain, build_op, chosen_module
from .mixed_op import FusedMixedOp, recalibrate_bn
from .supernet_wrap import wrap_supernet
from .simplify import MODES, STAGES, Counts, Graph, count, format_graph, simplify_space, stages

# The engine's ``simplify`` function is not re-exported here: it would shadow the ``simplify``
# submodule (``toponas_kernels.nas.simplify``). Use ``from toponas_kernels.nas.simplify import simplify``.

__all__ = [
    "Module", "ReLU", "BN", "Conv", "Pool", "Identity", "Zero", "FactorizedReduce",
    "OpDef", "SearchSpace", "DARTS_PRIMITIVES", "NB201_PRIMITIVES", "DARTS_SPACE", "NB201_SPACE",
    "darts_space", "nb201_space", "exaggerated_space", "get_space",
    "OpChain", "build_op", "chosen_module", "FusedMixedOp", "recalibrate_bn", "wrap_supernet",
    "MODES", "STAGES", "Counts", "Graph", "count", "format_graph", "simplify_space", "stages",
]
