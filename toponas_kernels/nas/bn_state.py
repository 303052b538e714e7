"""BN running statistics across the modes of ``FusedMixedOp``: every mode holds the same
parameters, so a state dict loads across modes, but a merged, normalized conv (topo) feeds its
BN outputs of another scale than the candidates' convs, so the running statistics do not carry
over. The state records its mode (``_extra_state``); a load across kernel normalizations resets
the statistics with one warning per load, and ``recalibrate_bn`` re-estimates them. A mixin of
``FusedMixedOp`` (it reads ``mode``, ``normalize``, ``_ops``, ``_wrapped`` and
``_loaded_from``), and the functions it registers."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

__all__ = ["ModeState", "recalibrate_bn"]


class ModeState:
    """The BN-state part of ``FusedMixedOp`` (module docstring)."""

    def _stats_key(self) -> str:
        """What sets the scale of the BN inputs besides the parameters: the kernel normalization
        of merged convs (topo). Sharing and unnormalized merging keep the scale (PMS is exact;
        FMS and merging change a BN's input only by weighting), so their statistics carry over."""
        return _stats_key(self.mode, self.normalize)

    def get_extra_state(self) -> Tensor:
        # A small tensor, so every value of a state dict stays a tensor (clone, to(device), save).
        return torch.tensor([_MODE_NAMES.index(self.mode), _NORM_NAMES.index(self.normalize)], dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        mode, norm = (int(v) for v in state.tolist())
        self._loaded_from = _stats_key(_MODE_NAMES[mode], _NORM_NAMES[norm])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if self._wrapped:  # the user's unwrapped candidate list: "<i>.<name>" -> "_ops.<i>.<name>"
            for k in [k for k in state_dict if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()]:
                state_dict[prefix + "_ops." + k[len(prefix):]] = state_dict.pop(k)
        key = prefix + "_extra_state"
        had = key in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if not had and key in missing_keys:  # a state saved before the mode was recorded: mode unknown
            missing_keys.remove(key)

    def _reset_bn_statistics(self, load=None) -> None:
        """BN running statistics gathered in another mode do not fit this one (a merged,
        normalized conv has outputs of another scale than the candidates' convs): reset them.
        ``load``: an object that is the same for every edge of one ``load_state_dict`` call (its
        list of missing keys), so that the call warns once for the whole model."""
        reset = 0
        for m in self._ops.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.reset_running_stats()
                reset += 1
        if reset and (load is None or _LAST_LOAD[0] is not load):
            if load is not None:
                _LAST_LOAD[0] = load
            # One message for every edge and source (so a model warns once, not once per edge).
            warnings.warn(
                "FusedMixedOp: loaded a state saved with another kernel normalization (another mode); "
                "the BN running statistics do not fit and were reset. Re-estimate them with "
                "toponas_kernels.nas.recalibrate_bn(model, batches) before evaluating.",
                stacklevel=3 if load is None else 5,
            )

    def load_plain_state(self, other: nn.Module) -> None:
        """Copy parameters and buffers, in registration order, from a module holding the same
        candidates in the same order: a DARTS-style MixedOp (its ``_ops``), another
        FusedMixedOp, or a list of candidate modules. Shapes must match one to one."""
        source = other._ops if isinstance(other, ModeState) else other
        if isinstance(source, (list, tuple)):
            source = nn.ModuleList(source)
        for kind, dst, src in (
            ("parameters", list(self._ops.parameters()), list(source.parameters())),
            ("buffers", list(self._ops.buffers()), list(source.buffers())),
        ):
            if len(dst) != len(src) or any(d.shape != s.shape for d, s in zip(dst, src)):
                raise ValueError(
                    f"other: its {kind} do not match this op's one to one "
                    f"({[tuple(s.shape) for s in src]} vs {[tuple(d.shape) for d in dst]})"
                )
            with torch.no_grad():
                for d, s in zip(dst, src):
                    d.copy_(s)
        source_key = other._stats_key() if isinstance(other, ModeState) else _stats_key("plain", "none")
        if source_key != self._stats_key():
            self._reset_bn_statistics()


# The codes of the mode record in a state dict (append only: saved states keep their meaning).
_MODE_NAMES = ("plain", "pms", "fms", "pms+fms", "topo")
_NORM_NAMES = ("none", "channel", "tensor")


def _stats_key(mode: str, normalize: str) -> str:
    return normalize if mode == "topo" else "none"


def _after_load(module: "ModeState", incompatible_keys) -> None:
    """After a load_state_dict (the candidates' buffers are loaded by now): a state saved in
    another mode leaves BN statistics that do not fit; reset them."""
    source, module._loaded_from = module._loaded_from, None
    if source is not None and source != module._stats_key():
        module._reset_bn_statistics(incompatible_keys.missing_keys)


# The missing-keys list of the last load that warned (held, so its id cannot be reused).
_LAST_LOAD: list = [None]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches, *, forward=None) -> int:
    """Re-estimate the running statistics of every BatchNorm in ``model`` from ``batches``, e.g.
    after loading a state saved in another mode (see ``FusedMixedOp``). The statistics are reset
    and become the plain average over the batches (momentum None while this runs); parameters
    do not change and no gradient is taken. The model's train/eval state is put back.

    Args:
        model: any module.
        batches: an iterable; each item is passed as ``model(item)``, or ``model(*item)`` for a
            tuple or list (``FusedMixedOp`` takes ``(x, weights)``), unless ``forward`` is given.
        forward: optional ``forward(model, item)`` that runs one batch (e.g. to drop labels).
    Returns the number of batches run (a ValueError when there were none).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    count = 0
    try:
        for item in batches:
            if forward is not None:
                forward(model, item)
            elif isinstance(item, (tuple, list)):
                model(*item)
            else:
                model(item)
            count += 1
    finally:
        for m, momentum in momenta:
            m.momentum = momentum
        for m, training in modes:
            m.training = training
    if count == 0:
        raise ValueError("batches: no batch to estimate the BN statistics from")
    return count
