"""Cubic B-spline free-form deformation (ITK's BSplineTransform of order 3)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from .. import splines
from ..filters import apply_axis_weights
from ..spatial import Grid
from .base import Transform

__all__ = ["BSplineTransform", "control_grid"]

_EDGE = 1e-5  # control-index units; see BSplineTransform._valid


def control_grid(domain: Grid, control_spacing: float | Sequence[float]) -> Grid:
    """Control-point grid over ``domain`` with exactly ``control_spacing`` mm between knots.

    The knots share the domain's direction; the mesh covers the domain's extent (voxel centre to
    voxel centre) and is centred on it; one extra knot on each side completes the cubic support.
    """
    spacing = np.broadcast_to(np.asarray(control_spacing, dtype=float), (domain.ndim,))
    if (spacing <= 0).any():
        raise ValueError(f"control-point spacing must be positive, got {tuple(spacing)}")
    mesh = np.maximum(np.ceil(domain.extent() / spacing - 1e-9).astype(int), 1)
    size = mesh + 3
    origin = domain.center() - domain.direction_matrix @ (spacing * (size - 1) / 2.0)
    return Grid(size, spacing, origin, domain.direction)


class BSplineTransform(Transform):
    """``y = x + sum_k B3(u - k) c_k``: displacement coefficients ``[N, D, *control.shape]`` (mm).

    ``u`` is the continuous index of ``x`` in the control grid. As in ITK, points outside the
    region the control grid supports (more than the mesh) are not moved.

    ``refine_levels``: in a multi-resolution stage, halve the control spacing (:meth:`refine`)
    before every level after the first.
    """

    def __init__(self, domain: Grid, control_spacing, batch_size: int = 1, dtype=None, *, refine_levels: bool = False):
        self._init(control_grid(domain, control_spacing), batch_size, None, dtype)
        self.refine_levels = refine_levels

    @classmethod
    def from_control_grid(cls, control: Grid, coefficients=None, batch_size: int | None = None, dtype=None):
        """Build from an explicit control grid (for example one read from an ITK file)."""
        self = cls.__new__(cls)
        if coefficients is not None:
            coefficients = torch.as_tensor(coefficients, dtype=dtype)
            batch_size = batch_size or coefficients.shape[0]
        self._init(control, batch_size or 1, coefficients, dtype)
        return self

    def _init(self, control: Grid, batch_size, coefficients, dtype):
        Transform.__init__(self, control.ndim, batch_size)
        if any(s < 4 for s in control.size):
            raise ValueError(f"a cubic B-spline needs at least 4 control points per axis, got {control.size}")
        self.control = control
        shape = (batch_size, control.ndim, *control.shape)
        if coefficients is None:
            coefficients = torch.zeros(shape, dtype=dtype or torch.get_default_dtype())
        if tuple(coefficients.shape) != shape:
            raise ValueError(f"coefficients of shape {tuple(coefficients.shape)} do not fit {shape}")
        self.coefficients = nn.Parameter(coefficients.detach().clone())
        self.refine_levels = False
        # displacement()'s per-axis weights by (grid, control grid, dtype, device): an optimisation
        # evaluates the spline on the same grid at every step (a few small matrices; the key holds
        # the control grid, which refine() replaces)
        self._axis_weights: dict[tuple, list[torch.Tensor]] = {}

    def start_level(self, level_index: int, level_grid: Grid) -> None:
        if self.refine_levels and level_index > 0:
            self.refine()

    def _valid(self, index: torch.Tensor) -> torch.Tensor:
        # ITK's InsideValidRegion for odd order: 1 <= u <= size - 2 on every axis (ITK moves a
        # point on the upper limit just inside). The domain's first and last voxels lie exactly
        # on the limits, so rounding must not decide: _EDGE (control-index units) absorbs it, and
        # the separable path in displacement() applies the same test.
        hi = torch.as_tensor([s - 2 + _EDGE for s in self.control.size], dtype=index.dtype, device=index.device)
        return ((index >= 1 - _EDGE) & (index <= hi)).all(-1)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        points = self._check_points(points)
        c = self.coefficients
        n = max(points.shape[0], self.batch_size)
        flat = points.reshape(points.shape[0], -1, self.ndim).to(c.dtype).expand(n, -1, -1)
        index = self.control.physical_to_index(flat)
        disp = splines.evaluate(c.expand(n, *c.shape[1:]), index, boundary="border")
        disp = disp * self._valid(index).unsqueeze(1).to(disp.dtype)
        return (flat + disp.transpose(1, 2)).reshape(n, *points.shape[1:])

    def displacement(self, grid: Grid) -> torch.Tensor:
        """Dense displacement on ``grid``; separable (one small matmul per axis) when each grid
        axis runs along a control grid axis (``Grid.aligned_with``), as the fixed image grid's do."""
        if not grid.aligned_with(self.control):
            return super().displacement(grid)
        c = self.coefficients
        key = (grid, self.control, c.dtype, c.device)
        cache = self._axis_weights
        if key not in cache:
            # continuous control index of each grid voxel, axis by axis
            to_index = grid.index_map(self.control)
            matrices = []
            for a in range(self.ndim):
                j = torch.arange(grid.size[a], dtype=c.dtype, device=c.device)
                u = to_index[a, a] * j + to_index[a, self.ndim]
                valid = (u >= 1 - _EDGE) & (u <= self.control.size[a] - 2 + _EDGE)
                matrices.append(splines.cubic_axis_weights(u, self.control.size[a], "border", valid))
            if len(cache) >= 4:
                cache.clear()
            cache[key] = matrices
        return apply_axis_weights(c, cache[key])

    @torch.no_grad()
    def refine(self) -> None:
        """Halve the control-point spacing in place; the deformation stays exactly the same.

        Uniform cubic B-spline subdivision along each axis; the refined grid keeps the same
        valid region (it is cropped to ``2 * mesh + 3`` knots), so nothing changes anywhere.
        Create the optimiser again afterwards: the parameter is a new tensor.
        """
        c = self.coefficients.detach()
        for a in range(self.ndim):
            axis = c.dim() - 1 - a
            x = torch.movedim(c, axis, -1)
            odd = (x[..., :-1] + x[..., 1:]) / 2
            even = (x[..., :-2] + 6 * x[..., 1:-1] + x[..., 2:]) / 8
            out = x.new_zeros(*x.shape[:-1], 2 * x.shape[-1] - 3)
            out[..., 0::2] = odd
            out[..., 1::2] = even
            c = torch.movedim(out, -1, axis)
        g = self.control
        spacing = np.asarray(g.spacing) / 2
        origin = np.asarray(g.origin) + g.direction_matrix @ spacing
        self.control = Grid([2 * n - 3 for n in g.size], spacing, origin, g.direction)
        self.coefficients = nn.Parameter(c.contiguous())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, control={self.control}"

    def coefficient_lattice(self) -> tuple[torch.Tensor, Grid]:
        return self.coefficients, self.control

