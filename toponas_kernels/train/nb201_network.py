"""The NAS-Bench-201 network for one architecture string (docs/REFERENCE.md): stem Conv3x3(3, C) + BN;
N cells at C, a ResNet basic block (stride 2) to 2C, N cells, a ResNet block to 4C, N cells; BN,
ReLU, global average pool, Linear. A cell's node i sums the operations the string gives it on
the nodes they name; the output is the last node. Operations are the package's plain modules
with affine BN (``operations.chosen_module``), so the parameter count equals NAS-Bench-201's
``TinyNetwork``."""

from __future__ import annotations

from torch import Tensor, nn

from ..nas.networks import build_nb201_skeleton
from ..nas.operations import chosen_module
from ..nas.nb201_arch import parse_nb201


class NB201Cell(nn.Module):
    def __init__(self, arch: str, C: int):
        super().__init__()
        self.nodes = parse_nb201(arch)
        self.inputs = [[j for _, j in node] for node in self.nodes]
        self.ops = nn.ModuleList(
            nn.ModuleList(chosen_module(op, C, 1, affine=True, space="nb201") for op, _ in node) for node in self.nodes
        )

    def forward(self, x: Tensor) -> Tensor:
        states = [x]
        for ops, inputs in zip(self.ops, self.inputs):
            states.append(sum(op(states[j]) for op, j in zip(ops, inputs)))
        return states[-1]


class NB201EvalNetwork(nn.Module):
    """``forward(x)`` -> ``(logits, None)`` (the same interface as ``DartsEvalNetwork``)."""

    def __init__(self, arch: str, C: int = 16, N: int = 5, num_classes: int = 10, *, in_channels: int = 3):
        super().__init__()
        build_nb201_skeleton(self, C, N, num_classes, in_channels, lambda c: NB201Cell(arch, c))
        self.drop_path_prob = 0.0  # NB201 trains without drop-path

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        x = self.stem(x)
        for cell in self.cells:
            x = cell(x)
        return self.classifier(self.global_pooling(self.lastact(x)).flatten(1)), None
