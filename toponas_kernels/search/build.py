"""The supernet and the search method a ``SearchConfig`` describes: what the searcher
(``runner``) runs and what the memory planner (``budget``) measures."""

from __future__ import annotations

import torch

from ..nas import spaces as S
from ..nas.networks import DartsSearchNetwork, NB201SearchNetwork
from .config import SearchConfig
from .methods import METHOD_CLASSES


def space_of(config: SearchConfig) -> S.SearchSpace:
    if isinstance(config.space, S.SearchSpace):
        return config.space
    return S.get_space(config.space)


def build_supernet(config: SearchConfig, num_classes: int, in_channels: int, *, proxy: bool = False) -> torch.nn.Module:
    """The supernet of ``config`` (resolved), or the tiny ETENAS proxy of the same space."""
    space = space_of(config)
    method = METHOD_CLASSES[config.method]
    sampler = "softmax" if proxy else method.sampler
    exclude = () if proxy else tuple(name for name in method.exclude if name in space)
    common = dict(space=space, sampler=sampler, exclude=exclude, in_channels=in_channels, num_classes=num_classes)
    # the ``topo`` option is the supernets' (and FusedMixedOp's) ``mode``
    if proxy:
        common.update(mode="plain")
    else:
        common.update(mode=config.topo, normalize=config.kernel_norm, partial_channels=config.partial_channels,
                      merge=config.merge)
    if config.macro() == "nb201":
        C, N = (3, 1) if proxy else (config.init_channels, config.layers)
        return NB201SearchNetwork(C, N, **common)
    C, layers = (1, 8) if proxy else (config.init_channels, config.layers)
    return DartsSearchNetwork(C, layers=layers, topology=method.topology and not proxy,
                              recompute=config.recompute_cells and not proxy, **common)


def build_method(config: SearchConfig, model: torch.nn.Module):
    cls = METHOD_CLASSES[config.method]
    names = ("lr", "lr_min", "momentum", "nesterov", "weight_decay", "grad_clip", "arch_lr", "arch_weight_decay",
             "arch_betas", "warmup_epochs", "beta_lambda", "tau_max", "tau_min", "rome_samples")
    space = "nb201" if config.macro() == "nb201" else "darts"
    return cls(model, epochs=config.epochs, space=space, **{n: getattr(config, n) for n in names})
