"""toponas_kernels: fused kernels and TopoNAS topological simplification for one-shot NAS."""

from ._version import __version__
from . import ops
from ._lib import available_backends
from .nas.mixed_op import FusedMixedOp
from .memory import memory_meter, measure_memory

__all__ = ["__version__", "ops", "available_backends", "FusedMixedOp", "memory_meter", "measure_memory"]
