"""DARTS, second order: the architecture gradient through one virtual weight step.

With eta the current weight learning rate, the virtual step is the SGD step the weight
optimizer would take, momentum and weight decay included::

    w' = w - eta * (mu * m + grad_w L_train(w, alpha) + wd * w)        m: momentum buffer

and the architecture gradient is that of L_val(w'(alpha), alpha)::

    grad_alpha L_val(w', alpha) - eta * H v,      v = grad_w' L_val(w', alpha)
    H v ~= [grad_alpha L_train(w+, alpha) - grad_alpha L_train(w-, alpha)] / (2 eps)
    w+- = w +- eps v,  eps = 0.01 / ||v||

(a central finite difference for the mixed second derivative). The weights are modified in
place and restored bit for bit from a copy; no second model is built.
"""

from __future__ import annotations

import torch

from .base import SearchMethod, _stats


class Darts2(SearchMethod):
    name = "darts2"

    def arch_step(self, x, y):
        # The arch step of the iteration is given the validation batch; the virtual step needs
        # the training batch too, which step() hands over through _train_batch.
        xt, yt = self._train_batch
        self.a_optimizer.zero_grad(set_to_none=True)
        grads, loss, logits = self.unrolled_arch_grads(xt, yt, x, y)
        for p, g in zip(self.arch_params, grads):
            p.grad = g
        self.update_arch()
        return _stats("val", loss, logits, y)

    def step(self, train_batch, val_batch):
        self._train_batch = train_batch
        try:
            return super().step(train_batch, val_batch)
        finally:
            self._train_batch = None

    def unrolled_arch_grads(self, x_train, y_train, x_val, y_val):
        """The second-order architecture gradient (module docstring); also returns the
        validation loss and logits at the virtual weights."""
        W, A = self.weight_params, self.arch_params
        eta = self.lr
        mu, wd = self.h["momentum"], self.h["weight_decay"]
        backup = [w.detach().clone() for w in W]

        loss_t, _ = self.loss(x_train, y_train)
        g_train = _grads_or_zeros(loss_t, W)
        with torch.no_grad():
            for w, g in zip(W, g_train):
                d = g + wd * w
                buf = self.w_optimizer.state.get(w, {}).get("momentum_buffer")
                if buf is not None:
                    d = d + mu * buf
                w.sub_(eta * d)

        loss_v, logits = self.arch_loss(x_val, y_val)
        grads = _grads_or_zeros(loss_v, list(A) + list(W))
        d_alpha, v = grads[: len(A)], grads[len(A):]

        try:
            norm = torch.sqrt(sum((g.double() ** 2).sum() for g in v))
            eps = 0.01 / norm.clamp_min(1e-30)
            with torch.no_grad():
                for w, b, g in zip(W, backup, v):
                    w.copy_(b + eps.to(b.dtype) * g)
            g_plus = _grads_or_zeros(self.loss(x_train, y_train)[0], A)
            with torch.no_grad():
                for w, b, g in zip(W, backup, v):
                    w.copy_(b - eps.to(b.dtype) * g)
            g_minus = _grads_or_zeros(self.loss(x_train, y_train)[0], A)
        finally:
            with torch.no_grad():
                for w, b in zip(W, backup):
                    w.copy_(b)
        scale = eta / (2 * eps)
        out = [da - (scale.to(gp.dtype) * (gp - gm)) for da, gp, gm in zip(d_alpha, g_plus, g_minus)]
        return out, loss_v, logits


def _grads_or_zeros(loss, params):
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
