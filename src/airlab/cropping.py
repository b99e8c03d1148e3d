"""Cropping to the foreground and removing the CT table (AirLab's ``auto_crop_image_filter`` and
``remove_bed_filter``).

Registration does not need either (masks restrict the objective); they make large scans smaller
and take the table out before it can pull a similarity measure. Both keep the exact geometry: a
cropped image's voxels lie at the same physical points as before, so transforms found on the
cropped image apply to the original unchanged.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .errors import InputError
from .image import Image
from .spatial import Grid

__all__ = ["crop", "foreground_box", "auto_crop", "remove_bed"]


def crop(image: Image, lower: Sequence[int], upper: Sequence[int]) -> Image:
    """The voxels of ``image`` with ITK indices ``lower <= i < upper`` (per axis), on a grid with
    the same spacing and direction whose origin is the physical point of ``lower``."""
    g = image.grid
    lower, upper = np.asarray(lower, dtype=int), np.asarray(upper, dtype=int)
    if lower.shape != (g.ndim,) or upper.shape != (g.ndim,) or (lower < 0).any() or (upper > g.size).any() \
            or (upper <= lower).any():
        raise InputError(f"crop box {tuple(lower.tolist())}..{tuple(upper.tolist())} is not inside the image "
                         f"of size {g.size}")
    origin = (g.index_to_physical_matrix() @ np.append(lower, 1.0))[: g.ndim]
    # tensor axis 2 + k is ITK axis d - 1 - k
    slices = [slice(None), slice(None)] + [slice(lower[a], upper[a]) for a in reversed(range(g.ndim))]
    return Image(image.data[tuple(slices)], Grid(upper - lower, g.spacing, origin, g.direction), image.file_dtype)


def foreground_box(image: Image, *, background: float = 0.0, margin_mm: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """ITK index bounds ``(lower, upper)`` (upper exclusive) of the voxels that differ from
    ``background`` in any batch element or channel, widened by ``margin_mm`` on each side (whole
    voxels, at least the margin) and clipped to the image."""
    if not margin_mm >= 0:
        raise InputError(f"the crop margin must be >= 0 mm, got {margin_mm}")
    g = image.grid
    found = (image.data != background).flatten(0, 1).any(0)  # [*shape]
    if not bool(found.any()):
        raise InputError(f"nothing to crop to: every voxel equals the background value {background:g}")
    hits = torch.nonzero(found).flip(1).cpu().numpy()  # [K, D] in ITK index order
    pad = np.array([math.ceil(margin_mm / s - 1e-9) for s in g.spacing])
    lower = np.maximum(hits.min(0) - pad, 0)
    upper = np.minimum(hits.max(0) + 1 + pad, g.size)
    return lower, upper


def auto_crop(image: Image, *, background: float = 0.0, margin_mm: float = 0.0) -> Image:
    """``image`` cropped to the bounding box of its voxels that differ from ``background``, with
    ``margin_mm`` to spare on each side (see :func:`foreground_box`)."""
    return crop(image, *foreground_box(image, background=background, margin_mm=margin_mm))


def remove_bed(image: Image, *, lower: float = -300.0, upper: float = 3071.0, opening_mm: float = 3.0,
               fill: float = -1024.0, crop_to_body: bool = False) -> tuple[Image, Image]:
    """The body of a CT scan without the table: ``(image, body mask)``.

    The body is the largest connected component of ``lower <= I <= upper`` (HU) after a
    morphological opening with a ball of ``opening_mm`` (which cuts the thin links between the
    table and the body), with its enclosed cavities filled (lungs, bowel gas). Voxels outside it
    become ``fill``; the mask is a uint8 label image (1 inside). ``crop_to_body`` crops both to
    the body's bounding box.
    """
    if image.data.shape[:2] != (1, 1):
        raise InputError(f"remove_bed takes one single-channel image, got data of shape {tuple(image.data.shape)}")
    if not lower < upper or not opening_mm >= 0:
        raise InputError(f"remove_bed needs lower < upper and opening_mm >= 0, got {lower}, {upper}, {opening_mm}")
    body = sitk.BinaryThreshold(image.to_sitk(dtype=np.float64), lower, upper, 1, 0)
    radius = [int(round(opening_mm / s)) for s in image.grid.spacing]
    if any(radius):
        body = sitk.BinaryMorphologicalOpening(body, radius, sitk.sitkBall)
    largest = sitk.RelabelComponent(sitk.ConnectedComponent(body), sortByObjectSize=True) == 1
    mask = torch.from_numpy(sitk.GetArrayFromImage(sitk.BinaryFillhole(largest)).astype(np.uint8))[None, None]
    if not bool(mask.any()):
        raise InputError(f"no body found: no voxel lies between {lower:g} and {upper:g} after the opening")
    data = torch.where(mask.bool().to(image.data.device), image.data, torch.as_tensor(fill, dtype=image.data.dtype))
    out, body_mask = Image(data, image.grid, image.file_dtype), Image(mask, image.grid)
    if crop_to_body:
        box = foreground_box(body_mask)
        out, body_mask = crop(out, *box), crop(body_mask, *box)
    return out, body_mask
