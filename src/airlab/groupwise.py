"""The numerics of template building: streamed averages, the shape update, sharpness.

A template is built (:mod:`airlab.workflows.template`) by registering every image to the
current template, averaging the warped images and moving the average by the inverse of the
mean deformation (Guimond et al. 2000; Avants et al. 2010). Everything here works on one image
or one field at a time: a :class:`RunningMean` holds its sum and its weight, never the images,
so memory does not grow with the number of images.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .filters import smooth_mm, spatial_gradient
from .image import Image, resample
from .spatial import Grid, inside
from .transforms import BSplineVelocityField, DisplacementField, invert_displacement

__all__ = ["RunningMean", "foreground", "sharpness", "sharpen", "coverage", "shape_update", "displacement_norm",
           "GroupResult", "register_group"]


class RunningMean:
    """The (weighted) mean of tensors that arrive one at a time, in float64.

    It keeps the running sum and the running weight (a scalar, or a tensor where the weight
    varies by voxel), nothing else: ``add`` may be fed from a generator reading files and the
    memory held is that of one tensor, however many are added."""

    def __init__(self):
        self.sum: torch.Tensor | None = None
        self.weight: torch.Tensor | float = 0.0
        self.count = 0

    def add(self, value: torch.Tensor, weight: torch.Tensor | float = 1.0) -> None:
        value = value.detach().to(torch.float64)
        w = weight.detach().to(torch.float64) if isinstance(weight, torch.Tensor) else float(weight)
        if self.sum is None:
            self.sum = torch.zeros_like(value)
        elif self.sum.shape != value.shape:
            raise ValueError(f"cannot average a tensor of shape {tuple(value.shape)} with ones of shape "
                             f"{tuple(self.sum.shape)}")
        self.sum += value * w
        self.weight = self.weight + w
        self.count += 1

    @property
    def mean(self) -> torch.Tensor:
        """The mean so far (0 where nothing has weight), float64."""
        if self.sum is None:
            raise ValueError("nothing has been averaged yet")
        w = self.weight
        if isinstance(w, torch.Tensor):
            return torch.where(w > 0, self.sum / w.clamp_min(1e-12), torch.zeros_like(self.sum))
        return self.sum / w if w > 0 else torch.zeros_like(self.sum)


def foreground(data: torch.Tensor) -> torch.Tensor:
    """Voxels brighter than 10% of the way from the 1st to the 99th percentile (as the QC report
    outlines the foreground): ``[*shape]`` bool of the first image and channel of ``data``."""
    values = data.reshape(data.shape[0], data.shape[1], -1)[0, 0].detach().float()
    lo, hi = torch.quantile(values[:: max(1, values.numel() // 200_000)], torch.tensor([0.01, 0.99])).tolist()
    return data[0, 0] > lo + 0.1 * (hi - lo)


def sharpness(image: Image, mask: torch.Tensor | None = None) -> float:
    """Mean physical gradient magnitude (intensity per mm) inside ``mask`` (default: the
    image's :func:`foreground`): how crisp a template is, as an average of misaligned images
    is blurred."""
    data = image.data[:1, :1].detach().to(torch.float64)
    mask = foreground(data) if mask is None else torch.as_tensor(mask).reshape(image.grid.shape).bool()
    magnitude = spatial_gradient(data, image.grid)[0].norm(dim=0)
    return float(magnitude[mask].mean()) if bool(mask.any()) else 0.0


def sharpen(image: Image, amount: float, sigma_mm: float | None = None) -> Image:
    """Unsharp masking ``I + amount * (I - G_sigma * I)``; ``sigma_mm`` defaults to the largest
    voxel spacing. ``amount`` 0 returns the image unchanged."""
    if amount <= 0:
        return image
    sigma = max(image.grid.spacing) if sigma_mm is None else sigma_mm
    data = image.data.to(torch.float64)
    out = data + amount * (data - smooth_mm(data, image.grid, sigma))
    return Image(out.to(image.data.dtype), image.grid)


def coverage(displacement: torch.Tensor, grid: Grid, image_grid: Grid) -> torch.Tensor:
    """``[1, 1, *shape]`` 1 where ``x + u(x)`` (``displacement [1, D, *shape]`` on ``grid``)
    lands inside ``image_grid``: where a warped image holds data and not the zero outside it."""
    points = grid.points(displacement.dtype, displacement.device) + torch.movedim(displacement, 1, -1)
    return inside(image_grid.physical_to_index(points), image_grid.size).to(displacement.dtype)[:, None]


def displacement_norm(displacement: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean length (mm) of ``displacement [1, D, *shape]`` over ``mask`` (default: everywhere)."""
    norm = displacement.detach()[0].norm(dim=0)
    if mask is not None and bool(mask.any()):
        norm = norm[mask]
    return float(norm.mean())


@torch.no_grad()
def shape_update(average: Image, mean_displacement: torch.Tensor, *, step: float = 1.0,
                 interpolation: str = "bspline") -> tuple[Image, float]:
    """Move ``average`` by the inverse of the mean deformation: ``average o (id + step * u)^-1``.

    ``mean_displacement [1, D, *shape]`` (mm, on ``average.grid``) is the mean over the group
    of the transforms found from the template to each image (template point -> image point). If
    every image is a deformation of one shape, the template is that shape seen through the mean
    transform; removing it puts the template in the middle of the group (Guimond et al. 2000).
    The inverse is the fixed-point inverse of the displacement on the grid (not ``-u``, which is
    only its first order); ANTs instead applies ``-0.25 u`` four times. Returns the moved image
    and the inverse's residual (mm; large only where the mean field folds)."""
    u = mean_displacement.detach().to(torch.float64) * step
    w, residual = invert_displacement(u, average.grid)
    inverse = DisplacementField(average.grid, 1, w).requires_grad_(False)
    moved = resample(average.to(torch.float64), average.grid, inverse, interpolation=interpolation)
    return Image(moved.data.to(average.data.dtype), average.grid), float(residual.max())


# ---------------------------------------------------------------------------------------------
# Groupwise registration without a template: every image to the group's implicit mean

@dataclass
class GroupResult:
    """``transform`` (batch N): template point -> point of image i; ``template``: the mean of
    the images warped by it (in the images' intensity units); ``history``: the objective per
    iteration, per level."""

    transform: BSplineVelocityField
    template: Image
    history: list[list[float]] = field(default_factory=list)


def register_group(images, *, sigmas_mm=None, iterations=(150, 100, 60), control_spacing: float | None = None,
                   lr: float = 1.0, regularisation: float = 0.1, steps: int = 4, exp_shrink: float = 2.0,
                   device=None) -> GroupResult:
    """Register ``images`` (an Image with the group on its batch axis, or a list of Images on
    one grid) to their implicit mean, all at once through the batch dimension (congealing).

    One B-spline velocity field per image (knots every ``control_spacing`` mm, default 8
    voxels; exponentiated on a grid ``exp_shrink`` times coarser) is optimised with Adam to
    minimise the group's intensity variance ``mean_i |I_i o phi_i - mean_j I_j o phi_j|^2`` (the
    images normalised by their 99th percentile) plus ``regularisation`` times the velocities'
    diffusion energy, on images smoothed by ``sigmas_mm`` (default 2, 1 and 0 voxels) in turn.
    After every step the mean of the velocities is subtracted, so that the template stays in
    the middle of the group (to first order the mean transform is the identity). Same-grid
    images only, and no linear stage: the velocity absorbs small rigid offsets; for
    different positions or grids use :func:`airlab.workflows.template.build`. Memory holds the
    whole group on the device (unlike ``build``).
    """
    from . import regularisers
    from .optim import Adam
    from .spatial import sample

    if isinstance(images, (list, tuple)):
        grid = images[0].grid
        if any(not i.grid.same_as(grid, atol=1e-5) for i in images):
            raise ValueError("register_group needs every image on one grid")
        data = torch.cat([i.data[:, :1].float() for i in images])
    else:
        grid, data = images.grid, images.data[:, :1].float()
    n = data.shape[0]
    if n < 2:
        raise ValueError(f"a group needs at least two images, got {n}")
    data = data.to(device) if device is not None else data
    scale = torch.quantile(data.flatten(1)[:, :: max(1, data[0].numel() // 200_000)], 0.99, dim=1).clamp_min(1e-12)
    normalised = data / scale.view(n, *[1] * (data.dim() - 1))
    spacing = float(np.mean(grid.spacing))
    sigmas = [2 * spacing, spacing, 0.0] if sigmas_mm is None else list(sigmas_mm)
    if len(iterations) != len(sigmas):
        raise ValueError(f"{len(sigmas)} smoothing levels but {len(iterations)} iteration counts")
    transform = BSplineVelocityField(grid.with_spacing(np.asarray(grid.spacing) * exp_shrink),
                                     control_spacing or 8 * spacing, batch_size=n, steps=steps, domain=grid)
    transform = transform.to(device=data.device)
    coefficients = transform.spline.coefficients
    points = grid.points(data.dtype, data.device)
    history = []
    for sigma, count in zip(sigmas, iterations):
        level = smooth_mm(normalised, grid, sigma)
        optimiser = Adam([coefficients], lr=lr)
        values = []
        for _ in range(count):
            optimiser.zero_grad()
            with transform.cached():
                u = transform.displacement(grid)
                warped = sample(level, grid, points + torch.movedim(u, 1, -1), "linear", outside=None)
                mean = warped.mean(0, keepdim=True)
                similarity = (warped - mean).pow(2).mean()
                penalty = regularisers.diffusion(transform.velocity_field(), transform.grid).mean()
                loss = similarity + regularisation * penalty
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                coefficients -= coefficients.mean(0, keepdim=True)
            values.append(float(similarity.detach()))
        history.append(values)
    transform.requires_grad_(False)
    with torch.no_grad():
        u = transform.displacement(grid)
        warped = sample(data.double(), grid, (points + torch.movedim(u, 1, -1)).double(), "bspline", outside=None)
    return GroupResult(transform, Image(warped.mean(0, keepdim=True).float().cpu(), grid), history)
