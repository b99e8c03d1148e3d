"""Transforms by name: what a pipeline (YAML, metrics.json, a Dask task) says instead of a
closure, so that a stage pickles and can be written down."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..spatial import Grid
from .base import Transform
from .bspline import BSplineTransform
from .linear import Affine, Rigid, Similarity, Translation
from .velocity import BSplineVelocityField, DenseVelocityField
from .wendland import KernelVelocityField, WendlandTransform

__all__ = ["TRANSFORMS", "TransformSpec"]


def _linear(kind):
    def build(grid: Grid, batch_size: int) -> Transform:
        return kind(grid.ndim, batch_size)
    return build


def _bspline(grid: Grid, batch_size: int, *, control_spacing: float, refine_levels: bool = True) -> Transform:
    return BSplineTransform(grid, control_spacing, batch_size, refine_levels=refine_levels)


def _velocity(grid: Grid, batch_size: int, *, control_spacing: float, steps: int = 4, refine_levels: bool = True,
              exp_shrink: float | None = 4.0) -> Transform:
    return BSplineVelocityField(grid, control_spacing, batch_size, steps=steps, domain=grid,
                                refine_levels=refine_levels, exp_shrink=exp_shrink)


def _dense_velocity(grid: Grid, batch_size: int, *, steps: int = 4, exp_shrink: float | None = 2.0,
                    exact_gradient: bool = True) -> Transform:
    return DenseVelocityField(grid, batch_size, steps=steps, grid_shrink=exp_shrink or 1.0,
                              exact_gradient=exact_gradient)


def _wendland(grid: Grid, batch_size: int, *, control_spacing: float, support: float | None = None, order: int = 4,
              diffeomorphic: bool = False, steps: int = 4, exp_shrink: float | None = 4.0) -> Transform:
    kernel = WendlandTransform(grid, control_spacing, batch_size, support=support, order=order)
    if not diffeomorphic:
        return kernel
    return KernelVelocityField(grid, kernel, steps=steps, exp_shrink=exp_shrink)


# name -> (fixed_grid, batch_size, **options) -> Transform
TRANSFORMS = {
    "translation": _linear(Translation),
    "rigid": _linear(Rigid),
    "similarity": _linear(Similarity),
    "affine": _linear(Affine),
    "bspline": _bspline,
    "velocity": _velocity,
    "dense-velocity": _dense_velocity,
    "wendland": _wendland,
}


@dataclass(frozen=True)
class TransformSpec:
    """A transform family by registry name and options; called as ``spec(fixed_grid, batch_size)``
    when its stage starts."""

    name: str
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.name not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.name!r}; choose from {', '.join(TRANSFORMS)}")

    def __call__(self, grid: Grid, batch_size: int) -> Transform:
        return TRANSFORMS[self.name](grid, batch_size, **self.options)
