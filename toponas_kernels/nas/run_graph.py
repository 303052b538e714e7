"""Running an edge's simplified graph (``simplify.py``): the part of ``FusedMixedOp`` that walks
the graph of a mask's plan, module by module, weighted sum by weighted sum, merged group by
merged group (``forms.py``), with the parameter-free tails recomputed in backward
(``_autograd.py``). A mixin: it reads the op's ``_parts`` (the module each chain position
runs), ``recompute``, ``backend``, ``normalize``, ``eps``, ``form_of`` and the group cache
``_groups``; ``mixed_op.py`` builds those and calls ``_run`` on a plan's root."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from . import forms as Fm
from ._autograd import channels_last_on_cpu, light_sum, light_tail, merged_conv, recomputed
from .operations import PoolBN
from .simplify import Choice, Leaf, Merged, Seq
from .wrap import Opaque

__all__ = ["GraphRunner"]


class GraphRunner:
    """How ``FusedMixedOp`` runs a simplified graph (module docstring)."""

    def _run(self, node, x: Tensor, coefs) -> Tensor:
        if isinstance(node, Leaf):
            module = self._module(node)
            if self.recompute and isinstance(module, PoolBN):
                return channels_last_on_cpu(module, x)
            return module(x)
        if isinstance(node, Seq):
            return self._run_items(node.items, x, coefs)
        if isinstance(node, Choice):
            return self._choice(node, x, coefs)
        raise TypeError(f"unexpected node {node!r}")

    def _run_items(self, items, x: Tensor, coefs) -> Tensor:
        """The nodes ``items`` applied in order. A ReLU right after a BN (the sep-conv chain's
        middle) runs in place on the BN's output: BN's backward needs its input, not its output,
        so the pair makes one activation-sized tensor instead of two (one pass and one buffer
        fewer; the values and gradients are those of the two modules)."""
        after_bn = False
        for item in items:
            module = self._module(item) if isinstance(item, Leaf) else None
            if after_bn and isinstance(module, nn.ReLU):
                x = torch.relu_(x)
            else:
                x = self._run(item, x, coefs)
            after_bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
        return x

    def _module(self, leaf: Leaf) -> nn.Module:
        """The module a leaf runs: the instance of its first owner (candidate, position)."""
        cand, pos = leaf.owners[0]
        return self._parts[cand][pos]

    def _choice(self, choice: Choice, x: Tensor, coefs) -> Tensor:
        """A weighted sum, its coefficients ``coefs = (layout, pieces)`` (``coefficients.py``).
        Branches whose coefficient went into a merged kernel (a merged conv, or a branch that
        ends in a sum of merged convs: c * conv(h, K) = conv(h, c * K), exact) are added
        plainly, so nothing is saved for them; the others go through ``mixed_sum`` with their
        derived coefficients (it saves its inputs for the weight gradient), or, for
        parameter-free tails with ``recompute``, through a recomputed ``mixed_sum``."""
        layout, pieces = coefs
        spec = layout.choices[id(choice)]
        weighted, applied, light = [], [], []
        for branch, (kind, piece, head, tail) in zip(choice.branches, spec.branches):
            if kind == "light":
                light.append((tail, self._run_items(head, x, coefs)))
            elif kind == "merged":
                applied.append(self._merged(branch.node, x, pieces[piece]))
            elif kind == "whole":
                applied.append(self._run(branch.node, x, coefs))
            elif kind == "absorb":
                items = branch.node.items
                applied.append(self._choice(items[-1], self._run_items(items[:-1], x, coefs), coefs))
            else:
                weighted.append(self._run(branch.node, x, coefs))
        out = ops.mixed_sum(*_promoted(weighted, pieces[spec.weighted]), backend=self.backend) if weighted else None
        if light:
            applied.append(self._recomputed_sum(light, pieces[spec.light]))
        for y in applied:
            out = y if out is None else out + y
        return out

    def _free_tail(self, node) -> tuple[list, list]:
        """Split a branch into its head and its trailing parameter-free modules (all of it for a
        pooling or identity branch; the trailing BN of a conv group)."""
        items = list(node.items) if isinstance(node, Seq) else [node]
        cut = len(items)
        while cut > 0 and self._parameter_free(items[cut - 1]):
            cut -= 1
        return items[:cut], items[cut:]

    def _parameter_free(self, node) -> bool:
        """A chain of modules without parameters and without inner weighted sums: cheap to run
        again in backward from its input."""
        if isinstance(node, Seq):
            return all(self._parameter_free(item) for item in node.items)
        if isinstance(node, Leaf):
            # An unrecognized candidate may be anything (random, stateful): never run twice.
            return not isinstance(node.module, Opaque) and next(self._module(node).parameters(), None) is None
        return False

    def _recomputed_sum(self, tails: list[tuple[list, Tensor]], w: Tensor) -> Tensor:
        """``sum_k w_k tail_k(input_k)`` for parameter-free tails, keeping only the inputs (the edge
        input, or what the tail's first BN keeps anyway) and ``w`` for backward."""
        inputs = [h for _, h in tails]
        fused = self._light_tails(tails, w.device.type)
        y = None if fused is None else light_sum(fused, w, inputs, self.backend)
        if y is not None:
            return y
        bns = [
            m
            for items, _ in tails
            for item in items
            for module in self._modules_of(item)
            for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]

        def run(w: Tensor, *inputs: Tensor) -> Tensor:
            ys, w = _promoted([self._run_items(items, h, None) for (items, _), h in zip(tails, inputs)], w)
            return ops.mixed_sum(ys, w, backend=self.backend)

        return recomputed(run, bns, 1 + len(inputs), w, *inputs)

    def _light_tails(self, tails, device_type: str) -> list[tuple] | None:
        """The tails in the terms of the fused op (``light_tail``), when each is a pooling unit
        and/or a non-affine BN; else None."""
        out = []
        for items, _ in tails:
            modules = [m for item in items for m in self._modules_of(item)]
            if len(modules) != 1:
                return None
            m = modules[0]
            if isinstance(m, PoolBN):
                got = light_tail(m.pool, m.bn, channels_last=device_type == "cpu")
            else:
                got = light_tail(None, m, channels_last=False)
            if got is None:
                return None
            out.append(got)
        return out

    def _modules_of(self, node):
        if isinstance(node, Seq):
            for item in node.items:
                yield from self._modules_of(item)
        elif isinstance(node, Leaf):
            yield self._module(node)

    def _merged(self, node: Merged, x: Tensor, coefs: Tensor) -> Tensor:
        """The weighted sum of several conv units as one merged conv, in the form ``merge``
        picks for the group (``forms.py``)."""
        units = [self._module(p) for p in node.parts]
        tensors = [t for u in units for t in u.kernel_tensors()]
        y = merged_conv(self._group(node, x.device.type), x, coefs, *tensors)
        biases = [u.bias_tensor() for u in units]
        if any(b is not None for b in biases):  # conv(x, sum c_i K_i) + sum c_i b_i: exact
            stacked = torch.stack([torch.zeros_like(y[0, :, 0, 0]) if b is None else b.to(y.dtype) for b in biases])
            y = y + (coefs.to(y.dtype) @ stacked).view(1, -1, 1, 1)
        return y

    def _group(self, node: Merged, device_type: str):
        """The ``forms`` group object that runs ``node`` on ``device_type`` (cached; made eagerly
        by ``merge_forms``, so a traced forward only reads the cache and never writes to it)."""
        key = (node, device_type)
        group = self._groups.get(key)
        if group is None:
            sizes = [len(self._module(p).kernel_tensors()) for p in node.parts]
            form = self.form_of(node, device_type)[0]
            group = Fm.group_for(node, form, sizes, self.normalize, self.eps, self.backend)
            if not torch.compiler.is_compiling():
                self._groups[key] = group
        return group


def _promoted(outputs: list[Tensor], w: Tensor) -> tuple[list[Tensor], Tensor]:
    """Outputs and weights in one dtype, the promotion of theirs: under autocast the candidates
    come out in mixed dtypes (convs in half, pools and BN in float), and DARTS' ``sum(w * op(x))``
    promotes. Without autocast nothing is cast."""
    dtype = w.dtype
    for y in outputs:
        if y.dtype != dtype:  # torch.promote_types is an op call, made only when it has work
            dtype = torch.promote_types(dtype, y.dtype)
    return [y if y.dtype == dtype else y.to(dtype) for y in outputs], (w if w.dtype == dtype else w.to(dtype))
