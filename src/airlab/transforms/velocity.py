"""Stationary velocity fields: diffeomorphisms by scaling and squaring."""

from __future__ import annotations

import torch
from torch import nn

from ..spatial import Grid
from .base import Transform
from .dense import _check_field, compose_displacements, sample_field

__all__ = ["StationaryVelocityField", "exponential"]


def exponential(velocity: torch.Tensor, grid: Grid, steps: int = 7) -> torch.Tensor:
    """Displacement of ``exp(v)`` on ``grid`` by scaling and squaring (``2**steps`` sub-steps)."""
    u = velocity / (2**steps)
    for _ in range(steps):
        u = compose_displacements(u, u, grid)
    return u


class StationaryVelocityField(Transform):
    """``T = exp(v)`` for a velocity ``v [N, D, *grid.shape]`` (mm) held as a parameter.

    :meth:`inverse` is ``exp(-v)``; it shares the parameter, so symmetric objectives can
    optimise a transform and its inverse together.
    """

    def __init__(self, grid: Grid, batch_size: int = 1, velocity=None, steps: int = 7, dtype=None):
        super().__init__(grid.ndim, batch_size)
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self.grid = grid
        self.steps = steps
        self.sign = 1.0
        if velocity is None:
            velocity = torch.zeros(batch_size, grid.ndim, *grid.shape, dtype=dtype or torch.get_default_dtype())
        else:
            velocity = torch.as_tensor(velocity, dtype=dtype)
            if velocity.dim() == grid.ndim + 1:
                velocity = velocity.unsqueeze(0).expand(batch_size, *velocity.shape)
            _check_field(velocity, grid, "velocity")
            if velocity.shape[0] != batch_size:
                raise ValueError(f"velocity batch {velocity.shape[0]} != batch_size {batch_size}")
        self.velocity = nn.Parameter(velocity.detach().clone())

    def field(self) -> torch.Tensor:
        """The displacement of this transform on its own grid ``[N, D, *shape]``."""
        return exponential(self.sign * self.velocity, self.grid, self.steps)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        points = self._check_points(points)
        return points + sample_field(self.field(), self.grid, points)

    def displacement(self, grid: Grid) -> torch.Tensor:
        if grid.same_as(self.grid, atol=1e-9):
            return self.field()
        return super().displacement(grid)

    def inverse(self) -> "StationaryVelocityField":
        inv = StationaryVelocityField(self.grid, self.batch_size, steps=self.steps,
                                      dtype=self.velocity.dtype)
        inv.velocity = self.velocity  # shared: the inverse follows the optimisation
        inv.sign = -self.sign
        return inv

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, steps={self.steps}, sign={self.sign:+.0f}"
