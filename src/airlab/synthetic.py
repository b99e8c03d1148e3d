"""Known, seeded deformations for testing and benchmarking registration."""

from __future__ import annotations

import numpy as np
import torch

from .spatial import Grid
from .transforms import BSplineTransform, Composite, DisplacementField, Rigid, Transform

__all__ = ["random_deformation", "ground_truth", "invert_grey_white"]


def random_deformation(
    grid: Grid,
    seed: int,
    *,
    max_displacement: float = 7.0,
    control_points: int = 6,
    max_rotation_deg: float = 4.0,
    max_translation: float = 4.0,
    dtype=torch.float32,
) -> Composite:
    """A smooth random deformation over ``grid``: a cubic B-spline with ``control_points`` knots
    per axis scaled so its largest displacement on the grid is ``max_displacement`` mm, followed
    by a rotation (random axis, angle up to ``max_rotation_deg``) about the grid centre and a
    translation of up to ``max_translation`` mm. The same seed gives the same deformation."""
    rng = np.random.default_rng(seed)
    d = grid.ndim
    if control_points < 4:
        raise ValueError(f"control_points must be at least 4, got {control_points}")
    spacing = grid.extent() / (control_points - 3)
    bspline = BSplineTransform(grid, spacing, dtype=torch.float64)
    with torch.no_grad():
        bspline.coefficients.copy_(torch.as_tensor(rng.normal(size=bspline.coefficients.shape)))
        peak = bspline.displacement(grid).norm(dim=1).max()
        bspline.coefficients.mul_(max_displacement / peak)
    angle = np.deg2rad(rng.uniform(0, max_rotation_deg))
    if d == 2:
        rotation = [angle * rng.choice([-1.0, 1.0])]
    else:
        axis = rng.normal(size=3)
        rotation = angle * axis / np.linalg.norm(axis)
    direction = rng.normal(size=d)
    translation = direction / np.linalg.norm(direction) * rng.uniform(0, max_translation)
    rigid = Rigid(d, rotation=rotation, translation=translation, center=grid.center(), dtype=torch.float64)
    return Composite(bspline, rigid).to(dtype)


def ground_truth(deformation: Transform, grid: Grid, tolerance: float = 1e-4, iterations: int = 30):
    """The inverse of ``deformation`` on ``grid``: ``(field, residual)``.

    If ``moving = resample(fixed, grid, deformation)`` then ``fixed(x) = moving(T(x))`` for the
    returned displacement field ``T``: the transform a registration of ``fixed`` to ``moving``
    should find. It is solved voxel by voxel with the deformation's own formula (no
    interpolation of a field); ``residual [N, *grid.shape]`` (mm) says where it is exact: large
    only near the border, where the deformation pushes points out of its domain.
    """
    points = grid.points(dtype=torch.float32)
    deformation = deformation.float()
    y, residual = deformation.inverse_points(points, iterations=iterations, tolerance=tolerance)
    field = DisplacementField(grid, y.shape[0], torch.movedim(y - points, -1, 1)).requires_grad_(False)
    return field, residual


def invert_grey_white(data: torch.Tensor, grey: float, white: float) -> torch.Tensor:
    """Remap intensities piecewise linearly so that ``grey`` becomes as bright as ``white`` was
    and vice versa (background stays dark): a synthetic change of contrast for testing
    multi-modal similarity measures."""
    top = float(data.max())
    if not 0 < grey < white < top:
        raise ValueError(f"expected 0 < grey ({grey}) < white ({white}) < max ({top})")
    xs = torch.tensor([0.0, grey, white, top], dtype=data.dtype)
    ys = torch.tensor([0.0, white, grey, 0.8 * grey], dtype=data.dtype)
    x = data.clamp(0, top)
    k = torch.bucketize(x, xs[1:-1])
    x0, x1, y0, y1 = xs[k], xs[k + 1], ys[k], ys[k + 1]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)
