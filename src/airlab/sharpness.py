"""How sharp an image is, and the Gaussian blur that makes the sharper of two images as sharp as
the other (a stage's ``match_sharpness``; docs/architecture.md, "Sharpness matching").

The measure is the mean gradient magnitude (per mm) inside the foreground divided by the
intensity standard deviation there: 1/mm, independent of the intensity scale and comparable
between grids of different spacings. Blurring lowers it; :func:`matching_sigma` finds by bisection
the sigma (mm) at which the sharper image reads as sharp as the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .filters import physical_gradient, smooth_mm
from .grid import Grid

__all__ = ["SharpnessMatch", "foreground", "match_sharpness", "matching_sigma", "sharpness"]

FOREGROUND_FRACTION = 0.05  # of the image's maximum, where no mask is given
ERODE_VOXELS = 3
MAX_SIGMA_VOXELS = 1.5


def foreground(data: torch.Tensor, mask: torch.Tensor | None = None, fraction: float = FOREGROUND_FRACTION,
               erode: int = ERODE_VOXELS) -> torch.Tensor:
    """Where ``data [1, 1, *S]`` is measured: ``mask > 0.5``, or intensity above ``fraction`` of
    the maximum, eroded by ``erode`` voxels (a cube), so that the boundary of the object does not
    count: the edge between a skull-stripped or masked-out brain and the background is not the
    anatomy's sharpness (measured with one voxel, Colin27 read sharper than the hard-masked MNI
    template; from three on, the other way round). Where erosion leaves fewer than 64 voxels, the
    region is eroded less."""
    inside = mask > 0.5 if mask is not None else data > fraction * data.max()
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[data.dim() - 3]
    outside = (~inside).to(data.dtype if data.is_floating_point() else torch.float32)
    region = inside
    for _ in range(max(erode, 1)):
        outside = pool(outside, 3, stride=1, padding=1)
        eroded = outside < 0.5
        if int(eroded.sum()) < 64:
            break
        region = eroded
    return region


def sharpness(data: torch.Tensor, grid: Grid, region: torch.Tensor | None = None) -> float:
    """Mean gradient magnitude (per mm) over the intensity standard deviation inside ``region``
    (default: :func:`foreground`) of one image ``[1, 1, *S]``; 1/mm."""
    if region is None:
        region = foreground(data)
    data = data.double()
    values = data[region]
    if values.numel() < 2:
        raise ValueError("no foreground to measure sharpness in")
    gradient = physical_gradient(data, grid, rotate=False, edge_order=1).norm(dim=2)
    return float(gradient[region].mean() / values.std(unbiased=False).clamp_min(1e-12))


def matching_sigma(data: torch.Tensor, grid: Grid, target: float, region: torch.Tensor | None = None, *,
                   max_sigma_mm: float | None = None, steps: int = 14) -> float:
    """The Gaussian sigma (mm) for which ``data`` smoothed reads ``target`` sharpness inside
    ``region``, by bisection on ``[0, max_sigma_mm]`` (default 1.5 of its mean voxel spacing):
    0 when it is not sharper than ``target``, the upper end when even that is too sharp."""
    if region is None:
        region = foreground(data)
    high = MAX_SIGMA_VOXELS * float(sum(grid.spacing)) / grid.ndim if max_sigma_mm is None else max_sigma_mm
    if sharpness(data, grid, region) <= target:
        return 0.0
    if sharpness(smooth_mm(data, grid, high), grid, region) >= target:
        return high
    low = 0.0
    for _ in range(steps):
        middle = 0.5 * (low + high)
        if sharpness(smooth_mm(data, grid, middle), grid, region) > target:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


@dataclass
class SharpnessMatch:
    """What :func:`match_sharpness` found for one pair: the two sharpness values (1/mm), which
    image was smoothed (``"fixed"``, ``"moving"`` or ``None``) and by how much (mm)."""

    fixed: float
    moving: float
    smoothed: str | None
    sigma_mm: float

    def as_dict(self) -> dict:
        return {"fixed": round(self.fixed, 5), "moving": round(self.moving, 5), "smoothed": self.smoothed,
                "sigma_mm": round(self.sigma_mm, 4)}


def _one(data: torch.Tensor, n: int) -> torch.Tensor:
    return data[n:n + 1] if data.shape[0] > 1 else data


def match_sharpness(fixed: torch.Tensor, fixed_grid: Grid, fixed_mask: torch.Tensor | None, moving: torch.Tensor,
                    moving_grid: Grid, moving_mask: torch.Tensor | None, *, erode: int = ERODE_VOXELS
                    ) -> tuple[torch.Tensor, torch.Tensor, list[SharpnessMatch]]:
    """``(fixed, moving, matches)``: the pair (``[N or 1, 1, *S]`` each) with the sharper image of
    every pair smoothed to the other's sharpness (per pair; a shared fixed image smoothed for
    one pair of a batch becomes one copy per pair). Multi-channel images are measured on their
    first channel and smoothed on all. ``erode``: see :func:`foreground`."""
    batch = max(fixed.shape[0], moving.shape[0])
    fixed_out, moving_out, matches = [], [], []
    for n in range(batch):
        f, m = _one(fixed, n), _one(moving, n)
        fm = None if fixed_mask is None else _one(fixed_mask, n)
        mm = None if moving_mask is None else _one(moving_mask, n)
        f_region, m_region = foreground(f[:, :1], fm, erode=erode), foreground(m[:, :1], mm, erode=erode)
        sf, sm = sharpness(f[:, :1], fixed_grid, f_region), sharpness(m[:, :1], moving_grid, m_region)
        smoothed, sigma = None, 0.0
        if sm > sf:
            sigma = matching_sigma(m[:, :1], moving_grid, sf, m_region)
            if sigma > 0:
                smoothed, m = "moving", smooth_mm(m, moving_grid, sigma).to(m.dtype)
        elif sf > sm:
            sigma = matching_sigma(f[:, :1], fixed_grid, sm, f_region)
            if sigma > 0:
                smoothed, f = "fixed", smooth_mm(f, fixed_grid, sigma).to(f.dtype)
        fixed_out.append(f)
        moving_out.append(m)
        matches.append(SharpnessMatch(sf, sm, smoothed, sigma))
    if batch == 1:
        return fixed_out[0], moving_out[0], matches
    if fixed.shape[0] == 1 and all(x.smoothed != "fixed" for x in matches):
        new_fixed = fixed
    else:
        new_fixed = torch.cat(fixed_out)
    new_moving = moving if moving.shape[0] == 1 and all(x.smoothed != "moving" for x in matches) else torch.cat(moving_out)
    return new_fixed, new_moving, matches
