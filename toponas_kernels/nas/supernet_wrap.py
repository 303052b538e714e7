"""Wrapping a whole supernet in place (``wrap_supernet``): every edge of DARTS' layout or of
xautodl's NAS-Bench-201 search cell becomes ``FusedMixedOp.wrap`` of its own candidates (whose
recognition is ``wrap.py``'s)."""

from __future__ import annotations

import inspect
import types

from torch import Tensor, nn

from .mixed_op import FusedMixedOp
from .wrap import opaque_message, report_once

__all__ = ["wrap_supernet"]


def _is_mixed_op(m: nn.Module) -> bool:
    """DARTS' layout: a module whose only child is ``_ops`` (a ModuleList of candidates that are
    not mixed ops themselves) and whose forward takes (x, weights)."""
    ops = m._modules.get("_ops")
    if not isinstance(ops, nn.ModuleList) or len(ops) == 0 or list(m._modules) != ["_ops"]:
        return False
    if any("_ops" in op._modules for op in ops):
        return False
    try:
        params = list(inspect.signature(m.forward).parameters)
    except (TypeError, ValueError):
        return False
    return len(params) == 2


def _is_nb201_cell(m: nn.Module) -> bool:
    """xautodl's NAS-Bench-201 search cell layout: ``edges`` a ModuleDict of candidate lists keyed
    ``"i<-j"``, with ``edge2index`` and ``max_nodes``."""
    edges = m._modules.get("edges")
    return (
        isinstance(edges, nn.ModuleDict)
        and isinstance(getattr(m, "edge2index", None), dict)
        and isinstance(getattr(m, "max_nodes", None), int)
        and all(isinstance(v, nn.ModuleList) for v in edges.values())
        and all(f"{i}<-{j}" in edges for i in range(1, m.max_nodes) for j in range(i))
    )


def _nb201_forward(self, inputs: Tensor, weightss: Tensor) -> Tensor:
    """The NAS-Bench-201 cell's forward with wrapped edges: node i is the sum over j < i of
    ``edge_{i<-j}(node_j, weights of that edge)``."""
    nodes = [inputs]
    for i in range(1, self.max_nodes):
        terms = []
        for j in range(i):
            key = f"{i}<-{j}"
            terms.append(self.edges[key](nodes[j], weightss[self.edge2index[key]]))
        nodes.append(sum(terms))
    return nodes[-1]


def wrap_supernet(model: nn.Module, **options) -> nn.Module:
    """Wrap every edge of ``model`` in place with ``FusedMixedOp.wrap(..., **options)`` and
    return ``model``. Two layouts are found by structure:

    * DARTS' ``model_search.py``: every module whose only child is ``_ops`` (a ModuleList of
      candidates) and whose forward takes ``(x, weights)`` is replaced by the wrapped op, which
      takes the same call (state_dict keys unchanged, plus each op's ``_extra_state``);
    * xautodl's NAS-Bench-201 search cell: each ``edges["i<-j"]`` candidate list is replaced by
      the wrapped op (its keys gain ``_ops.``; old states still load), and the cell's forward by
      the same sum that calls each edge as ``edge(x, weights)``.

    Candidates that are not recognized are reported in one warning for the whole model. A
    ValueError when no edge of either layout is found."""
    found, opaque, edges = 0, [], 0
    for parent in list(model.modules()):
        if _is_nb201_cell(parent):
            names = list(getattr(parent, "op_names", [])) or None
            for key in list(parent.edges):
                op = FusedMixedOp.wrap(parent.edges[key], primitives=names, _report=False, **options)
                parent.edges[key] = op
                opaque += op.unrecognized
                edges += bool(op.unrecognized)
                found += 1
            parent.forward = types.MethodType(_nb201_forward, parent)
            continue
        for name, child in list(parent._modules.items()):
            if child is not None and not isinstance(child, FusedMixedOp) and _is_mixed_op(child):
                op = parent._modules[name] = FusedMixedOp.wrap(child._ops, _report=False, **options)
                opaque += op.unrecognized
                edges += bool(op.unrecognized)
                found += 1
    if not found:
        raise ValueError(
            "model: no edge found (expected modules whose only child is `_ops` with forward(x, weights), "
            "or NAS-Bench-201 cells with `edges`); wrap each edge's candidates with FusedMixedOp.wrap instead"
        )
    if opaque:
        report_once(opaque_message(opaque, edges))
    return model
