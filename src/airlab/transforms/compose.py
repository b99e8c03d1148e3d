"""Sequences of transforms."""

from __future__ import annotations

import torch
from torch import nn

from ..spatial import Grid
from .base import Transform

__all__ = ["Composite"]


class Composite(Transform):
    """Transforms applied in the order given: ``Composite(a, b)(x) == b(a(x))``.

    For a registration that found an affine ``A`` and then a deformation ``D`` in the fixed
    space, the whole fixed -> moving map is ``Composite(D, A)``. (ITK's CompositeTransform
    lists the same chain the other way round; :mod:`airlab.transforms.itkio` converts.)
    """

    def __init__(self, *transforms: Transform):
        if not transforms:
            raise ValueError("Composite needs at least one transform")
        ndims = {t.ndim for t in transforms}
        if len(ndims) != 1:
            raise ValueError(f"cannot compose transforms of different dimensions: {sorted(ndims)}")
        batches = {t.batch_size for t in transforms} - {1}
        if len(batches) > 1:
            raise ValueError(f"cannot compose transforms with batch sizes {sorted(batches)}")
        super().__init__(ndims.pop(), batches.pop() if batches else 1)
        self.transforms = nn.ModuleList(transforms)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        points = self._check_points(points)
        for t in self.transforms:
            points = t(points)
        return points

    def displacement(self, grid: Grid) -> torch.Tensor:
        """As :meth:`Transform.displacement`, with the first transform's own (often separable)
        ``displacement``: a B-spline or velocity field then costs a few matrix products on the
        grid instead of an interpolation at every voxel."""
        first = self.transforms[0].displacement(grid)
        points = grid.points(dtype=first.dtype, device=first.device)
        y = points + torch.movedim(first, 1, -1)
        for t in self.transforms[1:]:
            y = t(y)
        return torch.movedim(y - points, -1, 1)

    def inverse(self) -> "Composite":
        return Composite(*[t.inverse() for t in reversed(self.transforms)])

    def __len__(self) -> int:
        return len(self.transforms)

    def __getitem__(self, i: int) -> Transform:
        return self.transforms[i]
