"""The DARTS CIFAR evaluation network (docs/REFERENCE.md, "Retraining") for a fixed ``Genotype``:
stem Conv3x3(3, 3C) + BN; ``layers`` cells with reductions at 1/3 and 2/3 depth (channels
double); each cell preprocesses its two inputs (FactorizedReduce after a reduction, else a 1x1
ReLUConvBN), runs the genotype's two operations per node on the states they name, sums them, and
concatenates the ``concat`` states; global average pool, Linear. An auxiliary head reads the
output of the cell at 2/3 depth (the second reduction) while training. Drop-path zeroes whole
samples of a non-identity operation's output with probability ``drop_path_prob`` and scales the
kept ones by 1 / (1 - p).

The operations are the package's plain modules (``operations.chosen_module``, affine BN), so
the parameter count equals DARTS' own network (DARTS_V2 at C 36, 20 cells: 3,349,342 without
the auxiliary head).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..nas.networks import Genotype
from ..nas.operations import FactorizedReduce, ReLUConvBN, chosen_module


def drop_path(x: Tensor, p: float) -> Tensor:
    """Zero each sample of ``x`` with probability ``p`` and scale the others by 1 / (1 - p)."""
    if p <= 0.0:
        return x
    keep = 1.0 - p
    mask = torch.bernoulli(x.new_full((x.shape[0],) + (1,) * (x.dim() - 1), keep))
    return x * mask / keep


def _is_identity(op: nn.Module) -> bool:
    return len(op) == 1 and isinstance(op[0], nn.Identity)


class EvalCell(nn.Module):
    def __init__(self, genotype: Genotype, C_pp: int, C_p: int, C: int, reduction: bool, reduction_prev: bool,
                 space: str = "darts"):
        super().__init__()
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_pp, C, affine=True)
        else:
            self.preprocess0 = ReLUConvBN(C_pp, C, 1, 1, affine=True)
        self.preprocess1 = ReLUConvBN(C_p, C, 1, 1, affine=True)
        genes = genotype.reduce if reduction else genotype.normal
        self.concat = list(genotype.reduce_concat if reduction else genotype.normal_concat)
        self.indices = [int(j) for _, j in genes]
        self.ops = nn.ModuleList(
            chosen_module(op, C, 2 if reduction and j < 2 else 1, affine=True, space=space) for op, j in genes
        )
        self.identity = [_is_identity(op) for op in self.ops]
        self.multiplier = len(self.concat)

    def forward(self, s0: Tensor, s1: Tensor, drop_prob: float = 0.0) -> Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for node in range(len(self.ops) // 2):
            total = None
            for k in (2 * node, 2 * node + 1):
                h = self.ops[k](states[self.indices[k]])
                if self.training and drop_prob > 0.0 and not self.identity[k]:
                    h = drop_path(h, drop_prob)
                total = h if total is None else total + h
            states.append(total)
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHead(nn.Module):
    """DARTS' CIFAR auxiliary classifier on an 8x8 map: ReLU, AvgPool 5 stride 3 (-> 2x2), 1x1 conv
    to 128 + BN + ReLU, 2x2 conv to 768 + BN + ReLU, Linear."""

    def __init__(self, C: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(),
            nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False),
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if min(x.shape[-2:]) < 6:
            raise ValueError(f"x: the auxiliary head needs a map of at least 6x6 (8x8 for 32x32 images), got "
                             f"{tuple(x.shape[-2:])}; retrain without it (aux_weight 0)")
        return self.classifier(self.features(x).flatten(1))


class DartsEvalNetwork(nn.Module):
    """``forward(x)`` -> ``(logits, logits_aux)``; ``logits_aux`` is None unless training with the
    auxiliary head. Set ``drop_path_prob`` before each epoch."""

    def __init__(self, genotype: Genotype, C: int = 36, num_classes: int = 10, layers: int = 20, *,
                 auxiliary: bool = True, in_channels: int = 3, stem_multiplier: int = 3, space: str = "darts"):
        super().__init__()
        if not isinstance(layers, int) or layers < 3:
            raise ValueError(f"layers: the DARTS network needs at least 3 cells (two are reductions), got {layers!r}")
        self.layers = layers
        self.aux_index = 2 * layers // 3
        self.drop_path_prob = 0.0
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr))
        C_pp, C_p, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        C_aux = None
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            cell = EvalCell(genotype, C_pp, C_p, C_curr, reduction, reduction_prev, space)
            reduction_prev = reduction
            self.cells.append(cell)
            C_pp, C_p = C_p, cell.multiplier * C_curr
            if i == self.aux_index:
                C_aux = C_p
        self.auxiliary_head = AuxiliaryHead(C_aux, num_classes) if auxiliary else None
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_p, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        logits_aux = None
        s0 = s1 = self.stem(x)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self.aux_index and self.auxiliary_head is not None and self.training:
                logits_aux = self.auxiliary_head(s1)
        return self.classifier(self.global_pooling(s1).flatten(1)), logits_aux


def count_parameters(model: nn.Module, *, auxiliary: bool = False) -> int:
    """Parameters of ``model``; without the auxiliary head unless ``auxiliary`` (as DARTS reports)."""
    return sum(p.numel() for name, p in model.named_parameters() if auxiliary or not name.startswith("auxiliary_head."))
