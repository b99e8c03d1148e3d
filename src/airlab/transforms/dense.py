"""Dense displacement fields on a grid (ITK's DisplacementFieldTransform)."""

from __future__ import annotations

import torch
from torch import nn

from ..spatial import Grid, sample, sample_grid
from .base import Transform

__all__ = ["DisplacementField", "sample_field", "invert_displacement"]


def _check_field(field: torch.Tensor, grid: Grid, name: str = "displacement") -> torch.Tensor:
    d = grid.ndim
    if field.dim() != d + 2 or field.shape[1] != d or tuple(field.shape[2:]) != grid.shape:
        raise ValueError(
            f"{name} of shape {tuple(field.shape)} does not fit the grid: expected "
            f"[N, {d}, *{grid.shape}]"
        )
    return field


def field_parameter(value, grid: Grid, batch_size: int, dtype=None, name: str = "displacement") -> nn.Parameter:
    """A vector field ``[N, D, *grid.shape]`` as a parameter: zeros when ``value`` is None; a
    single field ``[D, *shape]`` is repeated over the batch."""
    if value is None:
        return nn.Parameter(torch.zeros(batch_size, grid.ndim, *grid.shape, dtype=dtype or torch.get_default_dtype()))
    value = torch.as_tensor(value, dtype=dtype)
    if value.dim() == grid.ndim + 1:
        value = value.unsqueeze(0).expand(batch_size, *value.shape)
    _check_field(value, grid, name)
    if value.shape[0] != batch_size:
        raise ValueError(f"{name} batch {value.shape[0]} != batch_size {batch_size}")
    return nn.Parameter(value.detach().clone())


def sample_field(field: torch.Tensor, grid: Grid, points: torch.Tensor) -> torch.Tensor:
    """Displacement ``[N, *P, D]`` of ``field [N, D, *grid.shape]`` at physical ``points``.

    Exactly ITK's DisplacementFieldTransform: linear interpolation, the nearest value up to half
    a voxel beyond the outermost voxel centres, and no displacement further out.
    """
    values = sample(field, grid, points, "linear", outside=0.0)  # [N, D, *P]
    return torch.movedim(values, 1, -1)


def _sample_extended(field: torch.Tensor, grid: Grid, displacement: torch.Tensor) -> torch.Tensor:
    """``field`` at ``x + displacement(x)`` for every ``x`` of ``grid``, both ``[N, D, *shape]``.

    Beyond the grid the field keeps its border value: composing fields on their own grid must
    not tear at the boundary (that would fold), unlike evaluating the final transform.
    """
    points = grid.points(dtype=field.dtype, device=field.device)
    return sample(field, grid, points + torch.movedim(displacement, 1, -1), "linear", outside=None)


def compose_displacements(first: torch.Tensor, second: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Displacement of ``x -> x + first(x) + second(x + first(x))`` on ``grid``."""
    return first + _sample_extended(second, grid, first)


def invert_displacement(field: torch.Tensor, grid: Grid, iterations: int = 100, tolerance: float = 1e-4):
    """Fixed-point inverse ``w(x) = -u(x + w(x))`` of a displacement ``u`` on ``grid``.

    Returns ``(w, residual)`` where ``residual [N]`` is the largest ``|w(x) + u(x + w(x))|`` in mm
    over the grid (the field extended by its border values): how far ``T(T^-1(x))`` lands from
    ``x``. It converges where ``u`` is invertible
    (no folding); the residual says how well it did.
    """
    u = lambda w: _sample_extended(field, grid, w)  # noqa: E731
    w = -field
    for _ in range(iterations):
        w_next = -u(w)
        step = (w_next - w).norm(dim=1).flatten(1).amax(1)
        w = w_next
        if float(step.max()) < tolerance:
            break
    residual = (w + u(w)).norm(dim=1).flatten(1).amax(1)
    return w, residual


class DisplacementField(Transform):
    """``y = x + u(x)`` with ``u`` a parameter ``[N, D, *grid.shape]`` in mm on ``grid``.

    Between grid points ``u`` is linearly interpolated; beyond half a voxel outside the grid
    there is no displacement, exactly as in ITK's DisplacementFieldTransform.
    """

    def __init__(self, grid: Grid, batch_size: int = 1, displacement=None, dtype=None):
        super().__init__(grid.ndim, batch_size)
        self.grid = grid
        self.field = field_parameter(displacement, grid, batch_size, dtype)
        self.residual: torch.Tensor | None = None

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        points = self._check_points(points)
        return points + sample_field(self.field, self.grid, points)

    def displacement(self, grid: Grid) -> torch.Tensor:
        if grid.same_as(self.grid, atol=1e-9):
            return self.field
        return sample_grid(self.field, self.grid, grid)  # == sample_field at grid's points

    def inverse(self, iterations: int = 100, tolerance: float = 1e-4) -> "DisplacementField":
        """Fixed-point inverse on the same grid; its ``residual [N]`` (mm) says how exact it is."""
        w, residual = invert_displacement(self.field.detach(), self.grid, iterations, tolerance)
        inv = DisplacementField(self.grid, self.batch_size, w)
        inv.residual = residual
        return inv
