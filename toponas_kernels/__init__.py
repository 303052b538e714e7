"""toponas_kernels: fused kernels and TopoNAS topological simplification for one-shot NAS."""

from ._version import __version__
from . import ops
from ._lib import available_backends
from .nas.mixed_op import FusedMixedOp

__all__ = ["__version__", "ops", "available_backends", "FusedMixedOp"]
