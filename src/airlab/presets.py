"""Ready-made pipelines that work without tuning: ``rigid``, ``affine``, ``bspline``,
``diffeomorphic``.

Pyramids are sized from the fixed image (the coarsest level has about 25-50 voxels along its
longest axis; smoothing sigma is half the level spacing), so the same preset serves a 2D
slice, a 2 mm and a 1 mm brain. Intensities are normalised by the engine, so the regulariser
weights mean the same on every image.
"""

from __future__ import annotations

import copy

import numpy as np

from .losses import LOSSES
from .regularisers import BendingEnergy, Diffusion
from .registration import Level, Stage
from .spatial import Grid
from .transforms import Affine, BSplineTransform, BSplineVelocityField, Rigid

__all__ = ["PRESETS", "METRICS", "preset", "pyramid"]

PRESETS = ("rigid", "affine", "bspline", "diffeomorphic")
METRICS = ("mse", "ncc", "lncc", "mi", "nmi", "ngf")
# Mattes mutual information, as ANTs' SyN and elastix default to: it holds within and across
# contrasts, and measured best on the synthetic MNI benchmark (tests/test_registration.py)
_DEFAULT_DEFORMABLE_METRIC = "mi"


def pyramid(grid: Grid, iterations: list[int] | int, *, finest: int = 1, coarsest_voxels: int = 25) -> list[Level]:
    """Levels coarse to fine with shrink factors 2**k, down to ``finest``."""
    factors = [1]
    while max(grid.size) / (factors[-1] * 2) >= coarsest_voxels:
        factors.append(factors[-1] * 2)
    factors = [f for f in reversed(factors) if f >= finest] or [finest]
    if isinstance(iterations, int):
        iterations = [iterations] * len(factors)
    iterations = list(iterations)[-len(factors):]
    iterations = [iterations[0]] * (len(factors) - len(iterations)) + iterations
    spacing = float(np.mean(grid.spacing))
    return [Level(shrink=f, sigma=0.5 * spacing * f if f > 1 else 0.0, iterations=n) for f, n in zip(factors, iterations)]


def _loss(metric: str):
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if metric == "lncc":
        return LOSSES["lncc"](radius=2)
    if metric in ("mi", "nmi"):
        # fine bins resolve small misalignments; the Parzen window keeps them smooth
        return LOSSES[metric](bins=64)
    return LOSSES[metric]()


def _linear_metric(metric: str | None) -> str:
    # global statistics suit linear stages; across contrasts only (N)MI works
    return metric if metric in ("mi", "nmi") else "ncc"


def _refine_after_first(t, level_index, level_grid):
    if level_index > 0:
        t.refine()


# The velocity is exponentiated on a grid this many times coarser than the level (and
# regularised there, where the field is cached): it is a spline with knots 5 voxels apart, and
# the squarings are the cost. MNI benchmark (tests' construction): 2x and 2^6 steps 0.235 mm,
# 3x and 2^4 0.223 mm, 4x and 2^4 0.217 mm (across contrasts 0.405 and 0.403 mm) at 15% less time.
_EXP_SHRINK = 4


# most of the work at coarse levels, where steps are cheap
_DEFORMABLE_ITERATIONS = [100, 100, 60, 25]


def _velocity_on_level(t, level_index, level_grid):
    t.regrid(level_grid.with_spacing(np.asarray(level_grid.spacing) * _EXP_SHRINK))
    if level_index > 0:
        t.refine()


def preset(name: str, fixed_grid: Grid, *, metric: str | None = None) -> list[Stage]:
    """The stages of preset ``name`` for images on ``fixed_grid``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    d = fixed_grid.ndim
    lin = _linear_metric(metric)
    # before a deformable stage the linear ones need only the two coarsest levels, the second on
    # every other voxel: the deformation absorbs what is left (MNI benchmark: 0.223 vs 0.233 mm;
    # across contrasts the second level is needed: 0.45 vs 0.56 mm without it)
    linear_levels = pyramid(fixed_grid, 100)[:2]
    for level in linear_levels[1:]:
        level.iterations, level.stride = 60, 2
    if name == "rigid":
        return [Stage(lambda g, n: Rigid(d, n), [(1.0, _loss(lin))], levels=pyramid(fixed_grid, [100, 60, 40]),
                      lr=0.5, name="rigid")]
    # the rigid stage only starts the affine one off, at the coarsest level: its second level
    # changed nothing after the affine stage (MNI benchmark seeds 1 / 3 / across contrasts:
    # 0.173 / 0.174 / 0.208 mm with and without it) and took 0.3 s of a 2 mm run
    stages = [Stage(lambda g, n: Rigid(d, n), [(1.0, _loss(lin))], levels=copy.deepcopy(linear_levels[:1]), lr=0.5,
                    name="rigid")]
    affine_levels = pyramid(fixed_grid, [100, 60, 40]) if name == "affine" else copy.deepcopy(linear_levels)
    stages.append(Stage(lambda g, n: Affine(d, n), [(1.0, _loss(lin))], levels=affine_levels, lr=0.2,
                        name="affine"))
    if name == "affine":
        return stages
    deformable = metric or _DEFAULT_DEFORMABLE_METRIC
    levels = pyramid(fixed_grid, _DEFORMABLE_ITERATIONS)
    # the two finest levels see every other voxel along each axis, another sublattice each
    # iteration: 8x cheaper steps at the same accuracy on the MNI benchmark (finest level: 0.228
    # vs 0.233 mm; the next one too, seeds 1 / 3 / across contrasts: 0.173 / 0.174 / 0.245 mm
    # against 0.171 / 0.174 / 0.241 mm, and 20% less time)
    for level in levels[1:][-2:]:
        level.stride = 2
    # control points every 5 voxels of the finest level, twice that per coarser level
    spacing = 5.0 * float(np.mean(fixed_grid.spacing)) * 2 ** (len(levels) - 1)
    if name == "bspline":
        stages.append(Stage(lambda g, n: BSplineTransform(g, spacing, n), [(1.0, _loss(deformable))],
                            [(0.1, BendingEnergy())], levels=levels, optimizer="field-adam", lr=0.25, on_level=_refine_after_first,
                            regulariser_shrink=2, name="bspline"))
    else:
        stages.append(Stage(lambda g, n: BSplineVelocityField(g, spacing, n, steps=4, domain=g),
                            [(1.0, _loss(deformable))], [(0.1, BendingEnergy()), (0.01, Diffusion())],
                            levels=levels, optimizer="field-adam", lr=0.25, on_level=_velocity_on_level,
                            regulariser_shrink=_EXP_SHRINK, name="diffeomorphic"))
    return stages
