"""The three kernel families (docs/DESIGN.md section 9), each a ``torch.library`` custom op in the
``toponas`` namespace with reference, Triton, C++ (CPU) and CUDA backends.

Every function takes ``backend=`` (``"auto"``/None, ``"reference"``, ``"triton"``, ``"cpp"``,
``"cuda"``); without it the ``TOPONAS_BACKEND`` environment variable, else the device, decides.
"""

from .merge import merge_kernels
from .mixed import gumbel_softmax, masked_softmax, mixed_sum
from .shuffle import channel_shuffle, partial_channel_shuffle, split_channels

__all__ = [
    "mixed_sum",
    "masked_softmax",
    "gumbel_softmax",
    "merge_kernels",
    "channel_shuffle",
    "partial_channel_shuffle",
    "split_channels",
]
