"""Checks, normalisation and initialisation of a pair: everything the engine needs to know
about its inputs before any work, in one place.

Every check raises :class:`~airlab.errors.RegistrationError` (an :class:`~airlab.errors.InputError`)
with one line naming the image and the field, before memory is allocated for the work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import RegistrationError
from .image import Image, resample
from .spatial import Grid

__all__ = ["PreparedPair", "prepare_pair", "check_geometry", "check_pair_geometry", "check_image", "check_mask",
           "check_contrast", "normalise", "quantile", "initial_translation", "radius_of_gyration"]

# Plausible physical spacings (mm): from electron microscopy (1 nm) to a coarse atlas in metres.
# A header outside that range is a unit error, and the pyramid would size kernels from it.
SPACING_RANGE_MM = (1e-6, 1e6)
# Two images of one registration whose voxels differ more than this are a header error (a unit
# mix-up): smoothing the finer one at the coarser one's scale would need absurd kernels.
MAX_SPACING_RATIO = 1e3
_ORTHONORMAL_TOLERANCE = 1e-3


def check_geometry(grid: Grid, what: str) -> None:
    """Refuse implausible headers: spacing out of :data:`SPACING_RANGE_MM`, directions that are
    not orthonormal."""
    lo, hi = SPACING_RANGE_MM
    for axis, s in zip("xyz", grid.spacing):
        if not lo <= s <= hi:
            raise RegistrationError(f"the {what} image's spacing along {axis} is {s:g} mm, outside the plausible "
                                    f"{lo:g}..{hi:g} mm: check the header's units")
    d = np.asarray(grid.direction, dtype=float).reshape(grid.ndim, grid.ndim)
    error = float(np.abs(d.T @ d - np.eye(grid.ndim)).max())
    if error > _ORTHONORMAL_TOLERANCE:
        raise RegistrationError(f"the {what} image's direction cosines are not orthonormal (|D^T D - I| = {error:.3g}); "
                                "the header is corrupt or holds a shear")


def check_pair_geometry(fixed: Grid, moving: Grid) -> None:
    check_geometry(fixed, "fixed")
    check_geometry(moving, "moving")
    ratio = float(np.mean(fixed.spacing)) / float(np.mean(moving.spacing))
    if not 1 / MAX_SPACING_RATIO <= ratio <= MAX_SPACING_RATIO:
        finer, coarser = ("moving", "fixed") if ratio > 1 else ("fixed", "moving")
        raise RegistrationError(
            f"the {finer} image's voxels ({min(fixed.spacing if finer == 'fixed' else moving.spacing):g} mm) are "
            f"{max(ratio, 1 / ratio):.3g} times smaller than the {coarser} image's: check the headers' units")


def check_image(image: Image, what: str) -> None:
    data = image.data
    if not data.is_floating_point():
        return
    bad = ~torch.isfinite(data)
    if bad.any():
        raise RegistrationError(
            f"the {what} image has {int(bad.sum())} NaN or infinite voxel(s); "
            "replace them or mask them out"
        )


def check_mask(mask: Image | None, image: Image, what: str) -> torch.Tensor | None:
    """The mask as 0/1 on the image's grid (resampled by nearest neighbour if it is on another)."""
    if mask is None:
        return None
    if mask.ndim != image.ndim:
        raise RegistrationError(f"the {what} mask is {mask.ndim}D but the {what} image is {image.ndim}D")
    m = mask.data
    if not mask.grid.same_as(image.grid, atol=1e-4):
        m = resample(mask, image.grid, interpolation="nearest").data
    m = (m > 0).to(torch.get_default_dtype() if not image.data.is_floating_point() else image.data.dtype)
    if m.sum() == 0:
        raise RegistrationError(f"the {what} mask is empty (no non-zero voxel on the {what} grid)")
    return m


def check_contrast(data: torch.Tensor, mask: torch.Tensor | None, what: str) -> None:
    for n in range(data.shape[0]):
        x = data[n]
        if mask is not None:
            x = x[:, mask[min(n, mask.shape[0] - 1), 0] > 0]
        if float(x.max() - x.min()) <= 0:
            raise RegistrationError(f"the {what} image is constant{' inside its mask' if mask is not None else ''}: "
                                    "there is nothing to register")


def quantile(values: torch.Tensor, q: float) -> float:
    """``torch.quantile(values, q)`` (linear interpolation) by selection instead of a full
    sort: half the time on a brain volume, and no size limit."""
    position = q * (values.numel() - 1)
    k = math.floor(position)
    lo = float(values.kthvalue(k + 1).values)
    if position == k:
        return lo
    return lo + (position - k) * (float(values.kthvalue(k + 2).values) - lo)


def normalise(data: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Map intensities so that the 1st..99th percentiles (inside the mask) span 0..1, per image
    and channel: regulariser weights then mean the same on every image."""
    out = []
    for n in range(data.shape[0]):
        chans = []
        for c in range(data.shape[1]):
            x = data[n, c]
            vals = x[mask[min(n, mask.shape[0] - 1), 0] > 0] if mask is not None else x.reshape(-1)
            if vals.numel() > 2_000_000:  # a strided subset is plenty
                vals = vals[:: vals.numel() // 1_000_000 + 1]
            vals = vals.float()
            lo, hi = quantile(vals, 0.01), quantile(vals, 0.99)
            if hi - lo <= 1e-12 * max(abs(hi), 1.0):
                lo, hi = float(vals.min()), float(vals.max())
            chans.append((x - lo) / (hi - lo if hi > lo else 1.0))
        out.append(torch.stack(chans))
    return torch.stack(out)


def _index_moments(w: torch.Tensor, second: bool = False):
    """Weighted moments of the voxel indices of ``w [*S]`` (float64, weights >= 0, not all zero):
    ``(mean [D], E[i i^T] [D, D] or None)``, index components in ITK order. Sums of ``w`` along
    axes, times ``arange``: no ``[*S, D]`` array of positions (at 1 mm the points of two images
    and a mask took over a second)."""
    d = w.dim()
    axis = [d - 1 - a for a in range(d)]  # the tensor axis of index component a
    total = w.sum()
    ramp = [torch.arange(w.shape[axis[a]], dtype=w.dtype, device=w.device) for a in range(d)]

    def along(*keep):  # w summed over every axis but ``keep`` (in increasing order)
        others = [k for k in range(d) if k not in keep]
        return w.sum(dim=others) if others else w  # sum(dim=[]) would sum everything

    mean = torch.zeros(d, dtype=w.dtype, device=w.device)
    moments = torch.zeros(d, d, dtype=w.dtype, device=w.device) if second else None
    for a in range(d):
        marginal = along(axis[a])
        mean[a] = (marginal * ramp[a]).sum() / total
        if second:
            moments[a, a] = (marginal * ramp[a].square()).sum() / total
            for b in range(a):  # axis[b] > axis[a]: the pair's marginal has axes (a's, b's)
                value = (along(axis[a], axis[b]) * ramp[a][:, None] * ramp[b][None, :]).sum() / total
                moments[a, b] = moments[b, a] = value
    return mean, moments


def _center_of_mass(data: torch.Tensor, grid: Grid, mask: torch.Tensor | None) -> torch.Tensor:
    """Intensity-weighted centre ``[N, D]`` (mm), using intensities above the image minimum (the
    grid's centre where no voxel is above it)."""
    w = data.mean(1)
    w = w - w.flatten(1).amin(1).view(-1, *([1] * grid.ndim))
    if mask is not None:
        w = w * mask[:, 0]
    centre = torch.as_tensor((np.asarray(grid.size, dtype=float) - 1) / 2, dtype=w.dtype, device=w.device)
    index = torch.stack([_index_moments(wn)[0] if bool(wn.sum() > 0) else centre for wn in w])
    return grid.index_to_physical(index)


def initial_translation(fixed: Image, moving: Image, method: str = "moments", fixed_mask=None, moving_mask=None):
    """Centres ``(fixed_centre [N, D], translation [N, D])`` aligning moving to fixed by their
    geometric centres (``"centres"``) or intensity centres of mass (``"moments"``)."""
    if method == "centres":
        cf = torch.as_tensor(fixed.grid.center(), dtype=torch.float64)[None]
        cm = torch.as_tensor(moving.grid.center(), dtype=torch.float64)[None]
    elif method == "moments":
        cf = _center_of_mass(fixed.data.double(), fixed.grid, None if fixed_mask is None else fixed_mask.double())
        cm = _center_of_mass(moving.data.double(), moving.grid, None if moving_mask is None else moving_mask.double())
    else:
        raise ValueError(f"unknown initialisation {method!r}; choose 'moments', 'centres' or None")
    return cf, cm - cf


def radius_of_gyration(grid: Grid, mask: torch.Tensor | None) -> float:
    """Radius of gyration of the fixed domain (mm): how far a unit rotation moves points. From
    the index moments: the mean squared distance to the centre is the trace of the covariance
    carried through the index -> physical matrix."""
    inside = None if mask is None else (mask[0, 0] > 0).to(torch.float64)
    if inside is None or not bool(inside.any()):
        n = torch.as_tensor(grid.size, dtype=torch.float64)
        covariance = torch.diag((n.square() - 1) / 12)  # of 0, 1, ..., n - 1
    else:
        mean, moments = _index_moments(inside, second=True)
        covariance = moments - torch.outer(mean, mean)
    a = torch.as_tensor(grid.index_to_physical_matrix()[: grid.ndim, : grid.ndim], dtype=torch.float64,
                        device=covariance.device)
    return float(torch.trace(a @ covariance @ a.T).clamp_min(0).sqrt().clamp_min(1.0))


@dataclass
class PreparedPair:
    """A checked pair on the device: intensities (normalised if asked), 0/1 masks, the batch size
    and the fixed domain's radius of gyration (the scale of rotational steps)."""

    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_grid: Grid
    moving_grid: Grid
    fixed_mask: torch.Tensor | None
    moving_mask: torch.Tensor | None
    batch: int
    radius: float


def prepare_pair(fixed: Image, moving: Image, *, fixed_mask: Image | None = None, moving_mask: Image | None = None,
                 device=None, dtype=torch.float32, normalise_intensities: bool = True) -> PreparedPair:
    """Check a pair (dimensions, channels, batch, geometry, finite values, masks, contrast) and
    move it to ``device``; every problem is one :class:`RegistrationError` naming the image."""
    if fixed.ndim != moving.ndim:
        raise RegistrationError(f"cannot register a {moving.ndim}D moving image to a {fixed.ndim}D fixed image")
    if fixed.data.shape[1] != moving.data.shape[1]:
        raise RegistrationError(f"fixed has {fixed.data.shape[1]} channel(s) but moving has {moving.data.shape[1]}")
    nf, nm = fixed.data.shape[0], moving.data.shape[0]
    if nf != nm and 1 not in (nf, nm):
        raise RegistrationError(f"batch sizes differ: fixed {nf}, moving {nm}")
    check_pair_geometry(fixed.grid, moving.grid)
    device = torch.device(device) if device is not None else fixed.data.device
    check_image(fixed, "fixed")
    check_image(moving, "moving")
    fmask = check_mask(fixed_mask, fixed, "fixed")
    mmask = check_mask(moving_mask, moving, "moving")
    f = fixed.data.to(device=device, dtype=dtype)
    m = moving.data.to(device=device, dtype=dtype)
    fmask = None if fmask is None else fmask.to(device=device, dtype=dtype)
    mmask = None if mmask is None else mmask.to(device=device, dtype=dtype)
    check_contrast(f, fmask, "fixed")
    check_contrast(m, mmask, "moving")
    if normalise_intensities:
        f, m = normalise(f, fmask), normalise(m, mmask)
    return PreparedPair(f, m, fixed.grid, moving.grid, fmask, mmask, max(nf, nm),
                        radius_of_gyration(fixed.grid, None if fmask is None else fmask.cpu()))
