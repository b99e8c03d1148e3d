"""Sampling an image at physical points: :func:`sample` (every interpolation) and
:func:`sample_grid` (a whole grid, separable where the grids are aligned).

The frames and the linear fetch are :mod:`airlab.grid`'s; ``Grid``, ``grid_sample``, ``inside`` and
``sample_index`` are importable from here too, where they were first.
"""

from __future__ import annotations

import numpy as np
import torch

from .filters import apply_axis_weights
from .grid import Grid, grid_sample, inside, sample_index  # noqa: F401  (grid_sample, inside: re-exported)
from .splines import bspline_interpolate, linear_axis_weights, sample_cubic

__all__ = ["Grid", "sample", "sample_at_index", "sample_grid", "interpolation_matrices", "interpolation_steps",
           "apply_interpolation", "INTERPOLATIONS"]

INTERPOLATIONS = ("linear", "nearest", "bspline", "label")


def _broadcast_batch(data: torch.Tensor, points: torch.Tensor):
    n = max(data.shape[0], points.shape[0])
    for t, what in ((data, "image"), (points, "points")):
        if t.shape[0] not in (1, n):
            raise ValueError(
                f"batch sizes do not match: image {data.shape[0]}, points {points.shape[0]}"
            )
    return data.expand(n, *data.shape[1:]), points.expand(n, *points.shape[1:])


def _flatten_points(points: torch.Tensor):
    n, d = points.shape[0], points.shape[-1]
    middle = points.shape[1:-1]
    return points.reshape(n, -1, d), middle


def _sample_nearest(data, grid: Grid, index):
    """Nearest neighbour by ITK's rule (round half up); exact for any dtype, labels included."""
    n, p, d = index.shape
    nearest = torch.floor(index + 0.5).long()
    flat = torch.zeros(n, p, dtype=torch.long, device=data.device)
    stride = 1
    for a, s in enumerate(grid.size):
        flat += nearest[..., a].clamp(0, s - 1) * stride
        stride *= s
    values = data.reshape(n, data.shape[1], -1)
    idx = flat.unsqueeze(1).expand(n, data.shape[1], p)
    return torch.gather(values, 2, idx)


def _sample_label(data, grid: Grid, index):
    """Label maps by the largest linearly interpolated indicator (ITK's LabelImageGaussian /
    ANTs' GenericLabel idea, with a linear kernel): boundaries move smoothly instead of in
    whole-voxel steps, and no label is invented. Ties keep the lower label."""
    n, p, _ = index.shape
    c = data.shape[1]
    best = torch.full((n, c, p), -1.0, dtype=torch.float32, device=data.device)
    out = torch.zeros((n, c, p), dtype=data.dtype, device=data.device)
    for value in torch.unique(data).tolist():
        weight = sample_index((data == value).to(torch.float32), index.to(torch.float32), "border")
        better = weight > best
        best = torch.where(better, weight, best)
        out = torch.where(better, torch.as_tensor(value, dtype=data.dtype, device=data.device), out)
    return out


def sample(
    data: torch.Tensor,
    grid: Grid,
    points: torch.Tensor,
    interpolation: str = "linear",
    outside: float | None = 0.0,
    spline: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sample an image at physical points.

    Args:
        data: image tensor ``[N, C, *grid.shape]``.
        grid: geometry of ``data``.
        points: physical points ``[N, *P, D]`` (batch 1 broadcasts against the image batch).
        interpolation: ``"linear"``, ``"nearest"``, ``"bspline"`` (cubic B-spline, as ITK's
            ``BSplineInterpolateImageFunction`` of order 3) or ``"label"`` (label maps: the label
            whose linearly interpolated indicator is largest; smoother than nearest).
        outside: value for points outside the image (ITK's buffer test: more than half a voxel
            beyond the outermost voxel centre). ``None`` extrapolates (border for linear and
            nearest, mirror for bspline), which is what displacement fields need.
        spline: with ``"bspline"``, for an image sampled many times (registration): its cubic
            B-spline coefficients and their :func:`~airlab.splines.node_gradient`, computed
            once. The values are the same; the gradient with respect to ``points`` is the
            cheaper one of :func:`~airlab.splines.sample_cubic`. A third and fourth element,
            the image's :func:`~airlab.splines.cell_range`, clamp the values to it.

    Returns:
        ``[N, C, *P]``; integer data stays integer with ``"nearest"`` and ``"label"``.
    """
    d = grid.ndim
    if data.dim() != d + 2 or tuple(data.shape[2:]) != grid.shape:
        raise ValueError(
            f"image tensor of shape {tuple(data.shape)} does not match a {d}D grid of shape "
            f"{grid.shape} (expected [N, C, *{grid.shape}])"
        )
    if points.shape[-1] != d:
        raise ValueError(f"points have {points.shape[-1]} components but the image is {d}D")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose from {INTERPOLATIONS}")
    data, points = _broadcast_batch(data, points)
    flat, middle = _flatten_points(points)
    if not data.is_floating_point() and interpolation not in ("nearest", "label"):
        data = data.to(points.dtype if points.is_floating_point() else torch.float32)
    if data.is_floating_point():
        flat = flat.to(data.dtype)
    out = sample_at_index(data, grid, grid.physical_to_index(flat), interpolation, outside, spline)
    return out.reshape(*out.shape[:2], *middle)


def sample_at_index(data: torch.Tensor, grid: Grid, index: torch.Tensor, interpolation: str = "linear",
                    outside: float | None = 0.0, spline: tuple | None = None) -> torch.Tensor:
    """:func:`sample` at continuous indices ``index [N, P, D]`` of ``grid`` instead of physical
    points: ``[N, C, P]``. For a caller that maps its points to the image's indices itself (the
    engine folds that map into the transform's matrix). Batches of 1 broadcast as in
    :func:`sample`; ``data`` must be floating for every interpolation but the integer-keeping two."""
    if data.shape[0] != index.shape[0]:
        data, index = _broadcast_batch(data, index)
    if interpolation == "linear":
        out = sample_index(data, index, "border")
    elif interpolation == "nearest":
        out = _sample_nearest(data, grid, index)
    elif interpolation == "label":
        out = _sample_label(data, grid, index)
    else:
        if spline is None:
            out = bspline_interpolate(data, index)
        else:
            coefficients, gradient, *bounds = spline
            out = sample_cubic(coefficients, gradient, index, bounds=tuple(bounds) or None)
    if outside is not None:
        keep = inside(index, grid.size).unsqueeze(1)
        fill = torch.as_tensor(outside, dtype=out.dtype, device=out.device)
        out = torch.where(keep, out, fill)
    return out


def sample_grid(data: torch.Tensor, grid: Grid, target: Grid, outside: float | None = 0.0,
                filters: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``sample(data, grid, target.points(), "linear", outside)``: ``data [N, C, *grid.shape]``
    linearly interpolated at every voxel of ``target``, returned as ``[N, C, *target.shape]``.

    When ``target``'s axes run along ``grid``'s (same direction, any spacing and origin), linear
    interpolation is one small matrix product per axis, which for a displacement field on a
    coarse grid is over ten times faster than ``grid_sample`` at every voxel, and so is its
    gradient. Otherwise it falls back to :func:`sample`.

    ``filters``: one ``[n, n]`` matrix per axis (ITK order) applied to ``data`` first, e.g.
    Gaussian smoothing before downsampling; on aligned grids it is folded into the interpolation
    matrices, so the full-resolution image is never filtered as a whole.
    """
    d = grid.ndim
    if not target.aligned_with(grid) or outside not in (None, 0.0):
        if filters is not None:
            data = data if data.is_floating_point() else data.to(torch.get_default_dtype())
            data = apply_axis_weights(data, [f.to(dtype=data.dtype, device=data.device) for f in filters])
        points = target.points(dtype=data.dtype if data.is_floating_point() else None, device=data.device)
        return sample(data, grid, points, "linear", outside=outside)
    if data.dim() != d + 2 or tuple(data.shape[2:]) != grid.shape:
        raise ValueError(
            f"image tensor of shape {tuple(data.shape)} does not match a {d}D grid of shape "
            f"{grid.shape} (expected [N, C, *{grid.shape}])"
        )
    if not data.is_floating_point():
        data = data.to(torch.get_default_dtype())
    return apply_axis_weights(data, interpolation_matrices(grid, target, outside, filters, data.dtype, data.device))


def interpolation_steps(grid: Grid, target: Grid, outside: float | None = 0.0, dtype=None,
                        device=None) -> list:
    """:func:`interpolation_matrices` for a caller that resamples to the same grid at every step,
    with each axis along which ``target`` has ``grid``'s spacing, inside it, as ``(start, count,
    weight)`` instead of a matrix: every target voxel then lies the same fraction ``weight`` of
    a voxel past a grid voxel, and :func:`apply_interpolation` takes a view there (``weight``
    0) or blends two views. A dense velocity sampled on a strided level (every other voxel of a
    grid of half its spacing) is such a case on every axis; its matrix products, forward and
    backward, cost 6-7 ms of a 2 mm level's iteration (one thread), the views 0.4-2.4."""
    d = grid.ndim
    to_index = target.index_map(grid)
    matrices = interpolation_matrices(grid, target, outside, None, dtype, device)
    steps = []
    for a in range(d):
        scale, shift, count = to_index[a, a], to_index[a, d], target.size[a]
        start = int(np.floor(shift + 1e-9))
        weight = shift - start if abs(shift - round(shift)) > 1e-9 else 0.0
        weight = 0.5 if abs(weight - 0.5) < 1e-9 else weight  # half-way, up to the origins' rounding
        last = start + count - 1 + (weight > 0)
        if abs(scale - 1) < 1e-9 and shift > -1e-9 and last <= grid.size[a] - 1:
            steps.append((start, count, float(weight)))
        else:
            steps.append(matrices[a])
    return steps


def apply_interpolation(data: torch.Tensor, steps: list) -> torch.Tensor:
    """``data [N, C, *S]`` resampled by :func:`interpolation_steps` (ITK axis order)."""
    out = data
    for a, step in enumerate(steps):
        axis = out.dim() - 1 - a
        if isinstance(step, tuple):
            start, count, weight = step
            low = out.narrow(axis, start, count)
            if weight == 0.5:
                out = (low + out.narrow(axis, start + 1, count)) * 0.5  # the matrix's numbers: halving is exact
            elif weight > 0:
                out = low * (1 - weight) + out.narrow(axis, start + 1, count) * weight
            else:
                out = low
        else:
            out = apply_axis_weights(out, [step if b == a else None for b in range(len(steps))])
    return out


def interpolation_matrices(grid: Grid, target: Grid, outside: float | None = 0.0,
                           filters: list[torch.Tensor] | None = None, dtype=None, device=None) -> list[torch.Tensor]:
    """The per-axis ``[target, grid]`` matrices with which :func:`sample_grid` interpolates on
    aligned grids (``target.aligned_with(grid)``): a caller that resamples to the same grid at
    every step computes them once and calls :func:`~airlab.filters.apply_axis_weights`."""
    d = grid.ndim
    to_index = target.index_map(grid)
    matrices = []
    for a in range(d):
        j = torch.arange(target.size[a], dtype=torch.float64)
        position = to_index[a, a] * j + to_index[a, d]
        weights = linear_axis_weights(position, grid.size[a], outside is not None)
        if filters is not None:
            weights = weights @ filters[a].to(weights.dtype)
        matrices.append(weights.to(dtype=dtype or torch.get_default_dtype(), device=device))
    return matrices

