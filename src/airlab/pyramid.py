"""The multi-resolution pyramid: levels, their prepared data, and strided views of them.

A :class:`Pyramid` smooths and downsamples each (shrink, sigma) once per registration, so the
stages that share levels (rigid, affine and the deformable stage start at the same coarse ones)
share the work.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import numpy as np
import torch

from .filters import convolution_matrix, gaussian_kernel, smooth_mm
from .spatial import Grid, sample, sample_grid

__all__ = ["Level", "LevelData", "Pyramid", "level_grid", "prepare_level", "strided_views"]


@dataclass
class Level:
    """One pyramid level: images resampled to ``shrink`` x the fixed spacing after Gaussian
    smoothing with ``sigma`` mm, then ``iterations`` optimiser steps at most.

    ``stride > 1`` evaluates the similarity on every ``stride``-th fixed voxel along each axis
    (the moving image keeps the level's resolution), moving the sublattice's offset every
    iteration so that each voxel counts once per ``stride**D`` iterations. A smooth transform
    needs far fewer voxels than a fine level has, and each iteration costs ``stride**D`` times
    less; unlike random sampling, runs repeat exactly.

    ``interpolation`` (``"linear"`` or ``"bspline"``) samples the moving image on this level
    as it says; ``None`` leaves it to the stage's.
    """

    shrink: float = 1.0
    sigma: float = 0.0
    iterations: int = 100
    stride: int = 1
    interpolation: str | None = None


@dataclass
class LevelData:
    grid: Grid
    fixed: torch.Tensor
    fixed_weight: torch.Tensor | None
    moving_grid: Grid
    moving: torch.Tensor
    moving_mask: torch.Tensor | None
    regulariser_grid: Grid | None = None
    moving_spline: tuple[torch.Tensor, ...] | None = None  # see Pyramid.spline
    full: "LevelData | None" = None  # the whole level, when this is a strided view of it


def _offsets(stride: int, ndim: int) -> list[tuple[int, ...]]:
    """Sublattice offsets in an order that alternates an offset with its opposite corner, so
    consecutive iterations see well-spread voxels."""
    offs = list(itertools.product(range(stride), repeat=ndim))
    half = len(offs) // 2
    order = [o for i in range(half) for o in (offs[i], offs[-1 - i])]
    return order + (offs[half:half + 1] if len(offs) % 2 else [])


def strided_views(data: LevelData, stride: int) -> list[LevelData]:
    """The level seen through each sublattice of every ``stride``-th fixed voxel."""
    if stride <= 1:
        return [data]
    views = []
    for offset in _offsets(stride, data.grid.ndim):
        # tensor axes run (z, y, x): the reverse of the ITK-ordered offset
        index = (Ellipsis, *(slice(o, None, stride) for o in reversed(offset)))
        views.append(dataclasses.replace(
            data, grid=data.grid.subgrid(stride, offset), fixed=data.fixed[index],
            fixed_weight=None if data.fixed_weight is None else data.fixed_weight[index], full=data))
    return views


def level_grid(grid: Grid, shrink: float) -> Grid:
    if shrink <= 1.0:
        return grid
    return grid.with_spacing(np.asarray(grid.spacing) * shrink)


def downsample(data: torch.Tensor, grid: Grid, level_grid: Grid, sigma: float) -> torch.Tensor:
    if level_grid is grid or sigma <= 0:
        smoothed = smooth_mm(data, grid, sigma)
        return smoothed if level_grid is grid else sample_grid(smoothed, grid, level_grid, outside=None)
    # smoothing folded into the downsampling matrices: each axis is filtered at the level's size
    # (the same numbers as smoothing first, several times faster at the coarse levels)
    dtype = data.dtype if data.is_floating_point() else torch.get_default_dtype()
    filters = [convolution_matrix(gaussian_kernel(sigma / s, dtype=torch.float64), n).to(dtype)
               for n, s in zip(grid.size, grid.spacing)]
    return sample_grid(data, grid, level_grid, outside=None, filters=filters)


def prepare_level(level: Level, fixed, fgrid, fmask, moving, mgrid, mmask) -> LevelData:
    lg = level_grid(fgrid, level.shrink)
    mg = level_grid(mgrid, level.shrink)
    f = downsample(fixed, fgrid, lg, level.sigma)
    m = downsample(moving, mgrid, mg, level.sigma)
    fw = None
    if fmask is not None:
        fw = fmask if lg is fgrid else sample(fmask, fgrid, lg.points(fmask.dtype, fmask.device), "nearest", 0.0)
    mm = None
    if mmask is not None:
        mm = mmask if mg is mgrid else sample(mmask, mgrid, mg.points(mmask.dtype, mmask.device), "nearest", 0.0)
    return LevelData(lg, f, fw, mg, m, mm)


class Pyramid:
    """The levels of one pair, prepared on first use and kept for the registration's duration."""

    def __init__(self, fixed: torch.Tensor, fixed_grid: Grid, fixed_mask, moving: torch.Tensor, moving_grid: Grid,
                 moving_mask):
        self._inputs = (fixed, fixed_grid, fixed_mask, moving, moving_grid, moving_mask)
        self._levels: dict[tuple[float, float], LevelData] = {}
        self._splines: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._matched: dict[tuple[float, float], tuple[LevelData, list]] = {}

    def __getitem__(self, level: Level) -> LevelData:
        key = (float(level.shrink), float(level.sigma))
        if key not in self._levels:
            self._levels[key] = prepare_level(level, *self._inputs)
        return self._levels[key]

    def matched(self, level: Level) -> tuple[LevelData, list]:
        """The level with the sharper image of each pair smoothed to the other's sharpness
        (:func:`airlab.sharpness.match_sharpness`), and what was found (a
        :class:`~airlab.sharpness.SharpnessMatch` per pair), computed once."""
        from .sharpness import match_sharpness

        key = (float(level.shrink), float(level.sigma))
        if key not in self._matched:
            data = self[level]
            fixed, moving, found = match_sharpness(data.fixed, data.grid, data.fixed_weight, data.moving,
                                                   data.moving_grid, data.moving_mask)
            self._matched[key] = (dataclasses.replace(data, fixed=fixed, moving=moving), found)
        return self._matched[key]

    def spline(self, level: Level, matched: bool = False) -> tuple[torch.Tensor, ...]:
        """The level's moving image (``matched``: after :meth:`matched`) as a cubic B-spline, what
        :func:`airlab.spatial.sample` takes as ``spline``, computed once: its coefficients,
        their derivatives at the voxels, and the image's cell range that the samples are clamped
        to (:func:`airlab.splines.sample_cubic`)."""
        from .splines import cell_range, node_gradient, prefilter

        key = (float(level.shrink), float(level.sigma)) + (("matched",) if matched else ())
        if key not in self._splines:
            moving = self.matched(level)[0].moving if matched else self[level].moving
            coefficients = prefilter(moving)
            self._splines[key] = (coefficients, node_gradient(coefficients), *cell_range(moving))
        return self._splines[key]
