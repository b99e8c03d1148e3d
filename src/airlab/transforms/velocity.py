"""Stationary velocity fields: diffeomorphisms by scaling and squaring."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import torch
from torch import nn

from .. import compiled
from ..spatial import Grid, apply_interpolation, grid_sample, interpolation_steps, sample_grid
from .base import Transform
from .bspline import BSplineTransform
from .dense import field_parameter, sample_field

__all__ = ["StationaryVelocityField", "BSplineVelocityField", "DenseVelocityField", "exponential",
           "exponential_frame"]


def exponential(velocity: torch.Tensor, grid: Grid, steps: int = 7, frame: tuple | None = None) -> torch.Tensor:
    """Displacement of ``exp(v)`` on ``grid`` by scaling and squaring (``2**steps`` sub-steps).

    Each squaring is ``u(x) + u(x + u(x))`` with ``u`` extended by its border values, as
    :func:`~airlab.transforms.dense.compose_displacements`. Composition commutes with a constant
    linear map of the vectors, so the loop runs in grid_sample's normalised units and converts
    only at both ends: the squarings then need no coordinate conversions. ``frame``:
    :func:`exponential_frame` of the same grid, steps, dtype and device, for a caller that
    exponentiates on one grid many times. On the CPU, where no gradient flows through the
    squarings, each is one compiled pass (:func:`airlab.compiled.square`).
    """
    if steps == 0:
        return velocity
    to_norm, from_norm, identity = frame or exponential_frame(grid, steps, velocity.dtype, velocity.device)
    u = _map_vectors(to_norm, velocity)
    for _ in range(steps):
        if compiled.can_square(u):
            u = compiled.square(u)
        else:
            u = u + grid_sample(u, identity + torch.movedim(u, 1, -1), "border")
    return _map_vectors(from_norm, u)


def exponential_frame(grid: Grid, steps: int, dtype=None, device=None) -> tuple[torch.Tensor, ...]:
    """The constants of :func:`exponential` on ``grid``: the map of mm to normalised units scaled
    by ``2**-steps``, the map back (each a ``[D, D]`` matrix, or where it is diagonal its
    diagonal as ``[1, D, 1, ...]``), and the normalised identity ``[1, *shape, D]``."""
    d = grid.ndim
    to_norm = torch.as_tensor(grid.physical_to_normalized_matrix()[:d, :d], dtype=dtype, device=device)
    identity = grid.index_to_normalized(grid.indices(dtype, device))
    maps = [to_norm / 2**steps, torch.linalg.inv(to_norm)]
    if bool((to_norm == torch.diag(torch.diagonal(to_norm))).all()):
        # axis-aligned: a product per component gives the matrix product's numbers exactly (the
        # other terms are exact zeros) in one operation instead of einsum's permutes and bmm
        maps = [m.diagonal().view(1, d, *([1] * d)) for m in maps]
    return *maps, identity


def _map_vectors(matrix: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """``matrix @ vector`` at every voxel of ``field [N, D, *shape]``; ``matrix`` as in
    :func:`exponential_frame`."""
    if matrix.dim() == field.dim():
        return field * matrix
    return torch.einsum("ij,nj...->ni...", matrix, field)


class StationaryVelocityField(Transform):
    """``T = exp(v)`` for a velocity ``v [N, D, *grid.shape]`` (mm) held as a parameter.

    :meth:`inverse` is ``exp(-v)``; it shares the parameter, so symmetric objectives can
    optimise a transform and its inverse together.
    """

    def __init__(self, grid: Grid, batch_size: int = 1, velocity=None, steps: int = 7, dtype=None):
        self._exponentiate_on(grid, batch_size, steps)
        self.velocity = field_parameter(velocity, grid, batch_size, dtype, "velocity")

    def _exponentiate_on(self, grid: Grid, batch_size: int, steps: int) -> None:
        """The state every stationary velocity field has, whatever holds its velocity."""
        Transform.__init__(self, grid.ndim, batch_size)
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self.grid = grid
        self.steps = steps
        self.sign = 1.0
        self._field_cache = None  # a dict inside cached(): see there
        # the constant tensors of every step, built once per grid (see _constant)
        self._constants: dict = {}

    def velocity_field(self) -> torch.Tensor:
        """The velocity ``[N, D, *grid.shape]`` (mm) that is exponentiated."""
        return self.velocity

    def field(self) -> torch.Tensor:
        """The displacement of this transform on its own grid ``[N, D, *shape]``."""
        cache = self._field_cache
        key = (self.sign, self.steps, self.grid, torch.is_grad_enabled())
        if cache is not None and key in cache:
            return cache[key]
        v = self.sign * self.velocity_field()
        u = exponential(v, self.grid, self.steps, self._exponential_frame(v))
        if cache is not None:
            cache[key] = u
        return u

    def _constant(self, key: tuple, make):
        """``make()``, kept under ``key`` until the grid changes: exponentiation and resampling
        constants (identity grid, interpolation matrices) would otherwise be rebuilt at every
        step, dozens of small tensor operations each."""
        key = (self.grid, *key)
        if key not in self._constants:
            self._constants[key] = make()
        return self._constants[key]

    def _exponential_frame(self, v: torch.Tensor) -> tuple:
        return self._constant(("exp", self.steps, v.dtype, v.device),
                              lambda: exponential_frame(self.grid, self.steps, v.dtype, v.device))

    @contextlib.contextmanager
    def cached(self):
        """Within this block the field is computed once: scaling and squaring is the expensive
        part, and an objective needs the field twice (to warp and to regularise). The caller
        promises not to change the parameters inside the block."""
        self._field_cache = {}
        try:
            yield self
        finally:
            self._field_cache = None

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        points = self._check_points(points)
        return points + sample_field(self.field(), self.grid, points)

    def displacement(self, grid: Grid) -> torch.Tensor:
        if grid.same_as(self.grid, atol=1e-9):
            return self.field()
        u = self.field()
        if not grid.aligned_with(self.grid):
            return sample_grid(u, self.grid, grid)  # == sample_field at grid's points
        # sample_grid's interpolation on aligned grids, with its steps kept
        steps = self._constant(("resample", grid, u.dtype, u.device),
                               lambda: interpolation_steps(self.grid, grid, 0.0, u.dtype, u.device))
        return apply_interpolation(u, steps)

    @torch.no_grad()
    def regrid(self, grid: Grid) -> None:
        """Move the velocity onto another grid in place (linear interpolation), for example a
        finer one at the next pyramid level. Create the optimiser again afterwards."""
        from ..spatial import sample

        v = sample(self.velocity.detach(), self.grid, grid.points(self.velocity.dtype, self.velocity.device),
                   "linear", outside=None)
        self.grid = grid
        self._constants = {}
        self.velocity = nn.Parameter(v.contiguous())

    def scaled(self, factor: float) -> "StationaryVelocityField":
        """``exp(factor * v)`` sharing this transform's parameters (``scaled(0.5)`` is the
        half-way transform of symmetric registration)."""
        out = copy.copy(self)
        out.sign = self.sign * factor
        return out

    def inverse(self) -> "StationaryVelocityField":
        """``exp(-v)``, sharing this transform's parameters (a shallow copy): optimising either
        moves both, so symmetric objectives get the inverse at no extra cost."""
        return self.scaled(-1.0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, steps={self.steps}, sign={self.sign:+g}"


class BSplineVelocityField(StationaryVelocityField):
    """A stationary velocity field whose velocity is a cubic B-spline (control points every
    ``control_spacing`` mm over ``domain``), exponentiated on ``grid``.

    The spline keeps the velocity smooth and the parameters few, which conditions the
    optimisation well; the exponential keeps the transform diffeomorphic. ``refine()`` halves the
    control spacing exactly; ``regrid(grid)`` moves the exponentiation to another grid.

    In a multi-resolution stage: ``exp_shrink`` exponentiates on each level's grid with that many
    times its spacing (the velocity is smooth at the knot scale, and the squarings are the cost),
    and ``refine_levels`` halves the control spacing before every level after the first.
    """

    def __init__(self, grid: Grid, control_spacing, batch_size: int = 1, steps: int = 7,
                 domain: Grid | None = None, dtype=None, *, refine_levels: bool = False,
                 exp_shrink: float | None = None):
        self._exponentiate_on(grid, batch_size, steps)
        self.spline = BSplineTransform(domain or grid, control_spacing, batch_size, dtype=dtype)
        self.refine_levels = refine_levels
        self.exp_shrink = exp_shrink

    def start_level(self, level_index: int, level_grid: Grid) -> None:
        if self.exp_shrink is not None:
            self.regrid(level_grid.with_spacing(np.asarray(level_grid.spacing) * self.exp_shrink))
        if self.refine_levels and level_index > 0:
            self.refine()

    def velocity_field(self) -> torch.Tensor:
        return self.spline.displacement(self.grid)

    def refine(self) -> None:
        self.spline.refine()

    def regrid(self, grid: Grid) -> None:
        self.grid = grid
        self._constants = {}

    def coefficient_lattice(self) -> tuple[torch.Tensor, Grid]:
        return self.spline.coefficient_lattice()


class DenseVelocityField(StationaryVelocityField):
    """A stationary velocity held at every point of a grid that follows the pyramid: at each
    level the velocity moves (linear interpolation) onto the level's grid with ``grid_shrink``
    times its spacing, and is exponentiated there.

    A free-form velocity has the capacity of the grid it lives on, far beyond a B-spline's;
    its smoothness comes from the optimiser (``gradient_sigma``: Gaussian-smoothed, "fluid"
    updates, as in ANTs' SyN) and the regularisers, not from the parametrisation.

    ``exact_gradient=False`` differentiates ``exp(v)`` as if it were ``v`` (its first order at
    the identity), as greedy and log-domain demons schemes update their velocities: the
    gradient no longer flows back through the squarings, which were most of a step's cost. The
    transform itself is unchanged (still ``exp(v)``, still diffeomorphic, with inverse ``exp(-v)``).
    """

    def __init__(self, grid: Grid, batch_size: int = 1, steps: int = 4, grid_shrink: float = 2.0, dtype=None,
                 *, exact_gradient: bool = True):
        super().__init__(grid.with_spacing(np.asarray(grid.spacing) * grid_shrink), batch_size, steps=steps,
                         dtype=dtype)
        self.grid_shrink = grid_shrink
        self.exact_gradient = exact_gradient

    def start_level(self, level_index: int, level_grid: Grid) -> None:
        self.regrid(level_grid.with_spacing(np.asarray(level_grid.spacing) * self.grid_shrink))

    def field(self) -> torch.Tensor:
        if self.exact_gradient or not torch.is_grad_enabled():
            return super().field()
        cache = self._field_cache
        key = ("first order", self.sign, self.steps, self.grid)
        if cache is not None and key in cache:
            return cache[key]
        v = self.sign * self.velocity_field()
        with torch.no_grad():
            u = exponential(v, self.grid, self.steps, self._exponential_frame(v))
        u = u + (v - v.detach())  # the value of exp(v), the derivative of v
        if cache is not None:
            cache[key] = u
        return u

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, grid_shrink={self.grid_shrink:g}, exact_gradient={self.exact_gradient}"
