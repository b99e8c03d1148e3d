"""Measures of registration quality: numpy arrays or torch tensors in, python floats out.

Label maps and masks are spatial arrays in tensor order (``grid.shape``); displacement fields
are ``[D, *shape]`` or ``[1, D, *shape]`` (mm, components in ITK order); points are ``[P, D]``
in mm. Percentiles are numpy's default (linear interpolation).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .regularisers import jacobian_determinant
from .spatial import Grid

__all__ = ["dice", "hd95", "jacobian_stats", "determinant_stats", "endpoint_error", "tre"]


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _label_maps(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _numpy(a), _numpy(b)
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}")
    for x in (a, b):
        if not (np.issubdtype(x.dtype, np.integer) or x.dtype == bool):
            raise ValueError(f"label maps must be integer (or bool) arrays, got {x.dtype}")
    return a, b


def _labels(a: np.ndarray, b: np.ndarray, labels) -> list[int]:
    if labels is None:
        return [int(v) for v in np.union1d(np.unique(a), np.unique(b)) if v != 0]
    return [int(v) for v in labels]


def _with_mean(values: dict) -> dict:
    # labels absent from both images (nan) say nothing about the registration
    scored = [v for v in values.values() if not math.isnan(v)]
    values["mean"] = float(np.mean(scored)) if scored else math.nan
    return values


def _summary(values: np.ndarray) -> dict:
    return {
        "mean": float(np.mean(values)),
        "median": float(np.median(values)),
        "p95": float(np.percentile(values, 95)),
        "max": float(np.max(values)),
    }


def dice(a, b, labels=None) -> dict:
    """Dice overlap ``2|A&B| / (|A|+|B|)`` per label, plus ``"mean"`` over the labels.

    ``labels`` defaults to the union of the non-zero labels of ``a`` and ``b``. A label absent
    from both images scores nan and is left out of the mean.
    """
    a, b = _label_maps(a, b)
    out = {}
    for label in _labels(a, b, labels):
        in_a, in_b = a == label, b == label
        total = int(in_a.sum()) + int(in_b.sum())
        out[label] = 2.0 * int((in_a & in_b).sum()) / total if total else math.nan
    return _with_mean(out)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (or on the array border)."""
    from scipy import ndimage  # here and below only: scipy.ndimage costs 0.1 s to import (the report needs none)

    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure, border_value=0)


def _directed_p95(from_surface: np.ndarray, to_surface: np.ndarray, sampling) -> float:
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(~to_surface, sampling=sampling)
    return float(np.percentile(distance[from_surface], 95))


def hd95(a, b, grid: Grid, labels=None) -> dict:
    """95th-percentile symmetric surface distance (mm) per label, plus ``"mean"``.

    The larger of the two directed 95th percentiles between the surfaces (boundary voxels,
    face connectivity) of ``a == label`` and ``b == label``. Distances are measured along the
    voxel axes with the grid spacing; the direction matrix of a real image is a rotation,
    which preserves distances, so this is also right for oblique grids (a sheared direction
    is refused). A label present in only one image scores inf; absent from both, nan.
    """
    a, b = _label_maps(a, b)
    if a.shape != grid.shape:
        raise ValueError(f"label maps of shape {a.shape} do not match the grid shape {grid.shape}")
    rot = grid.direction_matrix
    if not np.allclose(rot @ rot.T, np.eye(grid.ndim), atol=1e-4):
        raise ValueError(f"hd95 needs an orthonormal direction matrix, got {grid.direction}")
    sampling = tuple(reversed(grid.spacing))  # tensor axis order
    out = {}
    for label in _labels(a, b, labels):
        in_a, in_b = a == label, b == label
        if not in_a.any() or not in_b.any():
            out[label] = math.inf if in_a.any() or in_b.any() else math.nan
            continue
        # every surface voxel lies in the bounding box of both masks: crop to it for speed
        box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(in_a | in_b))
        sa, sb = _surface(in_a[box]), _surface(in_b[box])
        out[label] = max(_directed_p95(sa, sb, sampling), _directed_p95(sb, sa, sampling))
    return _with_mean(out)


def _field(x, name: str) -> np.ndarray:
    """``[D, *shape]`` from ``[D, *shape]`` or ``[1, D, *shape]``."""
    x = _numpy(x)
    if x.ndim >= 3 and x.shape[0] == 1 and x.shape[1] == x.ndim - 2:
        x = x[0]
    if x.ndim not in (3, 4) or x.shape[0] != x.ndim - 1:
        raise ValueError(f"{name} must be [D, *shape] or [1, D, *shape] (D spatial axes), got {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    return x


def _mask(mask, shape: tuple[int, ...]) -> np.ndarray:
    if mask is None:
        return np.ones(shape, dtype=bool)
    m = _numpy(mask)
    if m.shape != shape:
        raise ValueError(f"mask of shape {m.shape} does not match the spatial shape {shape}")
    m = m.astype(bool)
    if not m.any():
        raise ValueError("mask selects no voxels")
    return m


def jacobian_stats(displacement, grid: Grid, mask=None) -> dict:
    """Statistics of ``det(I + J)`` over the (masked) voxels of ``grid``.

    ``log_jacobian_std`` is Learn2Reg's SDlogJ: the standard deviation of
    ``log(clip(det, 1e-9, 1e9))``; folded voxels are included, clipped, so folding inflates it.
    """
    field = _field(displacement, "displacement")
    expected = (grid.ndim, *grid.shape)
    if field.shape != expected:
        raise ValueError(f"displacement of shape {field.shape} does not fit the grid: expected {expected}")
    keep = _mask(mask, grid.shape)
    # float64: determinants near zero decide the folding count
    with torch.no_grad():
        t = torch.as_tensor(field, dtype=torch.float64)
        det = jacobian_determinant(t[None], grid)[0].numpy()[keep]
    return determinant_stats(det)


def determinant_stats(det) -> dict:
    """The statistics of :func:`jacobian_stats` from Jacobian determinants already computed."""
    det = np.asarray(det, dtype=np.float64).ravel()
    folded = int((det <= 0).sum())
    return {
        "folding_fraction": folded / det.size,
        "folding_count": folded,
        "det_min": float(det.min()),
        "det_max": float(det.max()),
        "log_jacobian_std": float(np.log(np.clip(det, 1e-9, 1e9)).std()),
    }


def endpoint_error(displacement_a, displacement_b, mask=None) -> dict:
    """``|a - b|`` (mm) over the (masked) voxels: mean, median, p95 and max."""
    a, b = _field(displacement_a, "displacement_a"), _field(displacement_b, "displacement_b")
    if a.shape != b.shape:
        raise ValueError(f"displacement fields differ in shape: {a.shape} vs {b.shape}")
    keep = _mask(mask, a.shape[1:])
    error = np.linalg.norm(a.astype(np.float64) - b, axis=0)
    return _summary(error[keep])


def tre(mapped_points, target_points) -> dict:
    """Target registration error: Euclidean distances (mm) between paired ``[P, D]`` points."""
    p, q = _numpy(mapped_points).astype(np.float64), _numpy(target_points).astype(np.float64)
    if p.shape != q.shape:
        raise ValueError(f"point sets differ in shape: {p.shape} vs {q.shape}")
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"points must be a non-empty [P, D] array, got shape {p.shape}")
    if not (np.isfinite(p).all() and np.isfinite(q).all()):
        raise ValueError("points contain nan or inf")
    return _summary(np.linalg.norm(p - q, axis=1))
