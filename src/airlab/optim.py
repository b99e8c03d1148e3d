"""Optimisers suited to spatial transforms.

They follow ``torch.optim``'s interface (``param_groups``, ``state``, ``zero_grad``,
``step(closure)``) without deriving from ``torch.optim.Optimizer``: its ``add_param_group`` and
``zero_grad`` import ``torch._dynamo`` on first use, which costs about 3 s of a command-line
run that never compiles anything. Any ``torch.optim`` optimiser still plugs into the engine.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch

from .filters import gaussian_operators, gaussian_smooth

__all__ = ["Adam", "FieldAdam"]


class _Optimizer:
    def __init__(self, params, defaults: dict):
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.defaults = defaults
        self.param_groups = []
        for g in groups:
            g = dict(g)
            g["params"] = list(g["params"]) if not isinstance(g["params"], torch.Tensor) else [g["params"]]
            for key, value in defaults.items():
                g.setdefault(key, value)
            self.param_groups.append(g)
        self.state: defaultdict = defaultdict(dict)
        # gradient_sigma's smoothing operators per (shape, sigma, dtype, device): built once, not
        # at every step (a banded matrix per axis is dozens of small tensor operations)
        self.smoothing: dict = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    def _step(self, p: torch.Tensor, group: dict) -> None:
        raise NotImplementedError

    def _moments(self, p: torch.Tensor, second_shape) -> tuple[dict, int]:
        """The parameter's Adam state (first moment like ``p``, second of ``second_shape``),
        its step count advanced."""
        state = self.state[p]
        if not state:
            state.update(step=0, m=torch.zeros_like(p), v=p.new_zeros(second_shape))
        state["step"] += 1
        return state, state["step"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            sigma = group.get("gradient_sigma", 0.0)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if sigma > 0 and p.dim() >= 3 and p.dim() == p.shape[1] + 2:
                    # a field's gradient [N, D, *shape], smoothed along its spatial axes: the
                    # "fluid" preconditioner of greedy dense registration (ANTs' SyN)
                    g = p.grad
                    key = (g.shape, sigma, g.dtype, g.device)
                    if key not in self.smoothing:
                        size = g.shape[2:][::-1]  # ITK order
                        self.smoothing[key] = gaussian_operators(size, sigma, dtype=g.dtype, device=g.device)
                    p.grad = gaussian_smooth(g, sigma, operators=self.smoothing[key])
                self._step(p, group)
        return loss


# Rows at least this long are bracketed from a sample first (_bracketed_kth)
_BRACKET_MIN = 1 << 16
_SAMPLE_STRIDE = 16


def _kth_smallest(values: torch.Tensor, rank: int) -> torch.Tensor:
    """``torch.kthvalue(values, rank, dim=1).values`` for ``values [N, M]``. On the CPU numpy's
    introselect finds the same entry in about two thirds of the time (a finest level's 400 000
    entries: 2.2 against 3.0 ms, one thread), and a long row is first bracketed from a sample
    (:func:`_bracketed_kth`)."""
    if values.device.type != "cpu" or values.requires_grad or values.dtype not in (torch.float32, torch.float64):
        return torch.kthvalue(values, rank, dim=1).values
    rows = values.detach().numpy()
    if rows.shape[1] >= _BRACKET_MIN:
        chosen = np.array([_bracketed_kth(row, rank) for row in rows], dtype=rows.dtype)
    else:
        chosen = np.partition(rows, rank - 1, axis=1)[:, rank - 1]
    return torch.from_numpy(np.ascontiguousarray(chosen))


def _bracketed_kth(row: np.ndarray, rank: int):
    """The ``rank``-th smallest entry of ``row`` (1-based; NaN last), exactly: two entries of a
    strided sample bracket it (its sample rank, give or take four binomial standard
    deviations), one pass counts the entries below the bracket and keeps those inside, and the
    selection runs on those few. Where the bracket misses (by chance, or NaN where it should
    be), the whole row is partitioned. A 2 mm finest level's 423 000 entries took about a
    quarter of the time of partitioning them all, a 1 mm level's 3.3 million about 40%
    (docs/architecture.md, "FieldAdam's quantile, bracketed")."""
    sample = row[::_SAMPLE_STRIDE]
    m, s = row.shape[0], sample.shape[0]
    p = (rank - 0.5) / m
    centre, margin = p * s, 4.0 * math.sqrt(s * p * (1 - p)) + 2.0
    lo_rank = min(max(int(centre - margin), 0), s - 1)
    hi_rank = min(max(int(math.ceil(centre + margin)), 0), s - 1)
    ends = np.partition(sample, (lo_rank, hi_rank))
    lo, hi = ends[lo_rank], ends[hi_rank]
    below = int(np.count_nonzero(row < lo))
    inside = row[(row >= lo) & (row <= hi)]
    if below < rank <= below + inside.shape[0]:
        return np.partition(inside, rank - below - 1)[rank - below - 1]
    return np.partition(row, rank - 1)[rank - 1]


class Adam(_Optimizer):
    """Adam (Kingma and Ba), the same update as ``torch.optim.Adam`` with its defaults.

    ``gradient_sigma`` (voxels, both optimisers): smooth the gradient of every field-shaped
    parameter ``[N, D, *shape]`` with a Gaussian before the step."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, gradient_sigma: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, gradient_sigma=gradient_sigma))

    def _step(self, p, group):
        g, (b1, b2) = p.grad, group["betas"]
        state, k = self._moments(p, p.shape)
        state["m"].lerp_(g, 1 - b1)
        state["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (state["v"].sqrt() / (1 - b2**k) ** 0.5).add_(group["eps"])
        p.addcdiv_(state["m"], denom, value=-group["lr"] / (1 - b1**k))


class FieldAdam(_Optimizer):
    """Adam whose second moment is one number per batch element and parameter tensor: the
    largest squared gradient, not one per entry.

    Adam normalises every entry on its own, so a control point with a negligible gradient (in
    the background, say) moves as far as one on an edge, and the transform fills with noise
    that only the regulariser pulls back. Normalising by the largest gradient keeps the
    direction of the gradient, makes ``lr`` the size (mm) of the largest step, and lets steps
    shrink as the gradient vanishes. Batch elements stay independent.

    ``quantile`` < 1 normalises by that quantile of the squared gradient entries instead of
    their maximum, and clips the entries above it to a step of ``lr``. The largest gradient can
    sit at one hard edge (a brain cut out by its mask, say) and then sets the step of every
    other entry; a quantile is a scale of the whole field that a few such entries do not set
    (docs/architecture.md, "A constant step, and the step at a quantile").
    """

    def __init__(self, params, lr: float = 0.5, betas=(0.9, 0.999), eps: float = 1e-12, gradient_sigma: float = 0.0,
                 quantile: float = 1.0):
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile!r}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, gradient_sigma=gradient_sigma, quantile=quantile))

    def _step(self, p, group):
        g, (b1, b2), q = p.grad, group["betas"], group["quantile"]
        state, k = self._moments(p, (g.shape[0], *([1] * (g.dim() - 1))))
        state["m"].mul_(b1).add_(g, alpha=1 - b1)
        squares = g.square().flatten(1)
        if q < 1.0:
            rank = math.ceil(q * (squares.shape[1] - 1)) + 1  # numpy's quantile, method "higher"
            peak = _kth_smallest(squares, rank)
        else:
            peak = squares.amax(1)
        state["v"].mul_(b2).add_(peak.view_as(state["v"]), alpha=1 - b2)
        m_hat = state["m"] / (1 - b1**k)
        v_hat = state["v"] / (1 - b2**k)
        step = group["lr"] * m_hat / (v_hat.sqrt() + group["eps"])
        if q < 1.0:
            step = step.clamp_(-group["lr"], group["lr"])
        p.sub_(step)
