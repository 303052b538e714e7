# TEMPORARY placeholder while the fused kernels are written; replaced in this session.
from . import reference as _ref


def channel_shuffle(x, groups, *, backend=None):
    return _ref.channel_shuffle_ref(x, groups)


def partial_channel_shuffle(processed, bypass, groups, *, backend=None):
    return _ref.partial_channel_shuffle_ref(processed, bypass, groups)
