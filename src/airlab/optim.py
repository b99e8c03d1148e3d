"""Optimisers suited to spatial transforms."""

from __future__ import annotations

import torch

__all__ = ["FieldAdam"]


class FieldAdam(torch.optim.Optimizer):
    """Adam whose second moment is one number per batch element and parameter tensor: the
    largest squared gradient, not one per entry.

    Adam normalises every entry on its own, so a control point with a negligible gradient (in
    the background, say) moves as far as one on an edge, and the transform fills with noise
    that only the regulariser pulls back. Normalising by the largest gradient keeps the
    direction of the gradient, makes ``lr`` the size (mm) of the largest step, and lets steps
    shrink as the gradient vanishes. Batch elements stay independent.
    """

    def __init__(self, params, lr: float = 0.5, betas=(0.9, 0.999), eps: float = 1e-12):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p)
                    state["v"] = g.new_zeros(g.shape[0], *([1] * (g.dim() - 1)))
                state["step"] += 1
                k = state["step"]
                state["m"].mul_(b1).add_(g, alpha=1 - b1)
                peak = g.square().flatten(1).amax(1).view_as(state["v"])
                state["v"].mul_(b2).add_(peak, alpha=1 - b2)
                m_hat = state["m"] / (1 - b1**k)
                v_hat = state["v"] / (1 - b2**k)
                p.sub_(group["lr"] * m_hat / (v_hat.sqrt() + group["eps"]))
        return loss
