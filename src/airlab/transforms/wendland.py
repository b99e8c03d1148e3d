"""Compactly supported Wendland kernels on a control lattice (AirLab's kernel transformation).

``y = x + sum_k phi(|x - x_k| / support) c_k`` with ``phi`` one of Wendland's radial functions
for up to three dimensions, scaled to ``phi(0) = 1`` (Wendland 1995, ``phi_{3,k}``):

- ``order=2`` (C2): ``(1 - r)_+^4 (4r + 1)``
- ``order=4`` (C4): ``(1 - r)_+^6 (35r^2 + 18r + 3) / 3``
- ``order=6`` (C6): ``(1 - r)_+^8 (32r^3 + 25r^2 + 8r + 1)``

They are positive definite in 2D and 3D, so any displacements at the knots can be interpolated,
and zero beyond ``support`` mm, so a point sees only the knots within that radius. Unlike the
cubic B-spline, a radial kernel is not separable: the displacement is gathered knot by knot over
the compact neighbourhood (``(2 ceil(support / spacing))^D`` knots), exactly at any point.
With ``diffeomorphic``, the kernel field is a stationary velocity (:class:`KernelVelocityField`).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from torch import nn

from ..spatial import Grid
from .base import Transform
from .bspline import control_grid
from .velocity import StationaryVelocityField

__all__ = ["wendland", "WendlandTransform", "KernelVelocityField", "WENDLAND_ORDERS"]

WENDLAND_ORDERS = (2, 4, 6)
_CACHE = 8_000_000  # kernel weights kept per grid (voxels x neighbourhood): 96 MB in float32


def wendland(r: torch.Tensor, order: int = 4) -> torch.Tensor:
    """Wendland's ``phi_{3, order/2}`` at ``r = distance / support``, 1 at 0 and 0 from 1 on."""
    f = (1 - r).clamp_min(0)
    if order == 2:
        return f**4 * (4 * r + 1)
    if order == 4:
        return f**6 * (35 * r * r + 18 * r + 3) / 3
    if order == 6:
        return f**8 * (((32 * r + 25) * r + 8) * r + 1)
    raise ValueError(f"Wendland order must be one of {WENDLAND_ORDERS}, got {order}")


class WendlandTransform(Transform):
    """Wendland kernels every ``control_spacing`` mm over ``domain`` with radius ``support`` mm
    (default twice the spacing, the reach of a cubic B-spline); coefficients ``[N, D, *lattice]``
    (mm) are what the optimiser sees. The lattice is :func:`~airlab.transforms.control_grid`'s
    (the B-spline's knots: the domain, centred, plus one knot on each side)."""

    def __init__(self, domain: Grid, control_spacing: float, batch_size: int = 1, *, support: float | None = None,
                 order: int = 4, dtype=None):
        super().__init__(domain.ndim, batch_size)
        wendland(torch.zeros(1), order)  # checks the order
        self.control = control_grid(domain, control_spacing)
        self.support = float(support) if support is not None else 2.0 * float(control_spacing)
        if not self.support > 0:
            raise ValueError(f"the kernel support must be positive, got {support}")
        self.order = order
        shape = (batch_size, self.ndim, *self.control.shape)
        self.coefficients = nn.Parameter(torch.zeros(shape, dtype=dtype or torch.get_default_dtype()))
        # knot offsets, relative to floor(index), that can lie within the support
        reach = [self.support / h for h in self.control.spacing]
        ranges = [range(math.floor(-r) + 1, math.ceil(r) + 1) for r in reach]
        self._offsets = list(itertools.product(*ranges))
        # displacement()'s kernel weights and knot indices ([K, P] each) by (grid, lattice, dtype,
        # device): they do not depend on the coefficients
        self._grid_weights: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def start_level(self, level_index: int, level_grid: Grid) -> None:
        """Nothing: Wendland kernels have no exact refinement; one lattice serves every level."""

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        points = self._check_points(points)
        c = self.coefficients
        n = max(points.shape[0], self.batch_size)
        flat = points.reshape(points.shape[0], -1, self.ndim).to(c.dtype).expand(n, -1, -1)
        weights, knots = self._neighbourhood(self.control.physical_to_index(flat))
        disp = sum(w.unsqueeze(1) * torch.gather(c.expand(n, *c.shape[1:]).reshape(n, self.ndim, -1), 2,
                                                 k.unsqueeze(1).expand(-1, self.ndim, -1))
                   for w, k in zip(weights, knots))
        return (flat + disp.transpose(1, 2)).reshape(n, *points.shape[1:])

    def displacement(self, grid: Grid) -> torch.Tensor:
        """Dense displacement on ``grid``. The kernel weights of a grid do not depend on the
        coefficients: an optimisation evaluates the same grid at every step, so they are kept
        (up to ``_CACHE`` weights per grid; larger grids recompute them)."""
        c = self.coefficients
        if grid.numel * len(self._offsets) > _CACHE:
            return super().displacement(grid)
        key = (grid, self.control, c.dtype, c.device)
        cache = self._grid_weights
        if key not in cache:
            with torch.no_grad():
                index = self.control.physical_to_index(grid.points(c.dtype, c.device).reshape(1, -1, self.ndim))
                weights, knots = self._neighbourhood(index)
            if len(cache) >= 4:
                cache.clear()
            cache[key] = (torch.stack(weights)[:, 0], torch.stack(knots)[:, 0])  # [K, P]
        weights, knots = cache[key]
        n = c.shape[0]
        gathered = c.reshape(n, self.ndim, -1)[:, :, knots.reshape(-1)].reshape(n, self.ndim, *knots.shape)
        return (gathered * weights).sum(2).reshape(n, self.ndim, *grid.shape)

    def _neighbourhood(self, index: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """For each knot offset of the compact neighbourhood of continuous lattice ``index
        [N, P, D]``: the kernel weights ``[N, P]`` (0 beyond the support or the lattice) and
        the flat knot indices ``[N, P]``."""
        d = self.ndim
        base = torch.floor(index.detach()).long()
        frac = index - base
        # what each axis contributes for each offset, computed once: squared mm (index steps are
        # spacing mm along orthonormal directions, so distances need no direction), whether the
        # knot exists, and its part of the flat knot index
        sq, valid, at = {}, {}, {}
        for a in range(d):
            n_a, h_a, stride = self.control.size[a], self.control.spacing[a], math.prod(self.control.size[:a])
            for o in {off[a] for off in self._offsets}:
                knot = base[..., a] + o
                sq[a, o] = ((frac[..., a] - o) * h_a) ** 2
                valid[a, o] = (knot >= 0) & (knot < n_a)
                at[a, o] = knot.clamp(0, n_a - 1) * stride
        weights, knots = [], []
        for offset in self._offsets:
            r2 = sum(sq[a, o] for a, o in enumerate(offset))
            inside = valid[0, offset[0]]
            for a in range(1, d):
                inside = inside & valid[a, offset[a]]
            # clamp: the gradient of sqrt at 0 is infinite, and phi is flat there anyway
            weights.append(wendland(r2.clamp_min(1e-20).sqrt() / self.support, self.order) * inside)
            knots.append(sum(at[a, o] for a, o in enumerate(offset)))
        return weights, knots

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, order={self.order}, support={self.support:g}, control={self.control}"

    def coefficient_lattice(self) -> tuple[torch.Tensor, Grid]:
        return self.coefficients, self.control


class KernelVelocityField(StationaryVelocityField):
    """A stationary velocity field given by a kernel transform (its displacement is the
    velocity), exponentiated on ``grid`` by scaling and squaring: a diffeomorphic counterpart
    of any kernel-on-a-lattice family. ``exp_shrink``: exponentiate on each level's grid with
    that many times its spacing (the kernel field is smooth at the knot scale)."""

    def __init__(self, grid: Grid, kernel: Transform, steps: int = 7, *, exp_shrink: float | None = None):
        self._exponentiate_on(grid, kernel.batch_size, steps)
        self.kernel = kernel
        self.exp_shrink = exp_shrink

    def start_level(self, level_index: int, level_grid: Grid) -> None:
        if self.exp_shrink is not None:
            self.regrid(level_grid.with_spacing(np.asarray(level_grid.spacing) * self.exp_shrink))
        self.kernel.start_level(level_index, level_grid)

    def velocity_field(self) -> torch.Tensor:
        return self.kernel.displacement(self.grid)

    def regrid(self, grid: Grid) -> None:
        self.grid = grid

    def coefficient_lattice(self) -> tuple[torch.Tensor, Grid]:
        return self.kernel.coefficient_lattice()
