"""Transforms to and from SimpleITK objects, ITK transform files and displacement-field images.

airlab and ITK share the convention (fixed physical point -> moving physical point, LPS, mm),
so conversion is a change of parameterisation, never of meaning. The files written here are
read by SimpleITK/ITK, elastix (through ITK), ANTs (``antsApplyTransforms``) and 3D Slicer.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import ImageIOError, TransformIOError
from ..image import Image, itk_reason, read_image, write_sitk
from ..spatial import Grid
from .base import Transform
from .bspline import BSplineTransform
from .compose import Composite
from .dense import DisplacementField
from .linear import Affine, LinearTransform, Rigid, Similarity, Translation, rotation_vector_from_matrix
from .velocity import StationaryVelocityField

__all__ = [
    "to_sitk",
    "from_sitk",
    "write_transform",
    "read_transform",
    "write_displacement_field",
    "read_displacement_field",
    "TransformIOError",
]

_IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def _is_image_path(path: Path) -> bool:
    return str(path).lower().endswith(_IMAGE_SUFFIXES)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _pick(transform: Transform, index: int | None) -> int:
    if index is None:
        if transform.batch_size != 1:
            raise ValueError(
                f"the transform holds a batch of {transform.batch_size}; pass index= to export one"
            )
        return 0
    if not 0 <= index < transform.batch_size:
        raise IndexError(f"index {index} out of range for a batch of {transform.batch_size}")
    return index


def _versor(rotation_vector: np.ndarray) -> list[float]:
    theta = float(np.linalg.norm(rotation_vector))
    if theta < 1e-300:
        return [0.0, 0.0, 0.0]
    v = np.sin(theta / 2) * rotation_vector / theta
    if np.cos(theta / 2) < 0:  # ITK keeps the versor's scalar part non-negative
        v = -v
    return v.tolist()


def _displacement_image(field: torch.Tensor, grid: Grid, dtype=np.float64) -> sitk.Image:
    array = np.moveaxis(_np(field), 0, -1).astype(dtype)  # [*shape, D]
    image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=True)
    grid.apply_to_sitk(image)
    return image


def to_sitk(transform: Transform, index: int | None = None) -> sitk.Transform:
    """One element of ``transform``'s batch as the most specific SimpleITK transform."""
    k = _pick(transform, index)
    d = transform.ndim
    if isinstance(transform, Composite):
        out = sitk.CompositeTransform(d)
        # ITK applies the last transform added first
        for t in reversed(transform.transforms):
            out.AddTransform(to_sitk(t, min(k, t.batch_size - 1)))
        return out
    if isinstance(transform, LinearTransform):
        c = _np(transform.center[k]).tolist()
        t = _np(transform.translation_vector()[k]).tolist()
        if type(transform) is Translation:
            return sitk.TranslationTransform(d, t)
        if type(transform) in (Rigid, Similarity):
            r = _np(transform.rotation[k])
            scale = float(_np(transform.scale()[k])[0]) if isinstance(transform, Similarity) else None
            if d == 2:
                out = sitk.Similarity2DTransform() if scale is not None else sitk.Euler2DTransform()
                params = ([scale] if scale is not None else []) + [float(r[0])] + t
            else:
                out = sitk.Similarity3DTransform() if scale is not None else sitk.VersorRigid3DTransform()
                params = _versor(r) + t + ([scale] if scale is not None else [])
            out.SetFixedParameters(c)
            out.SetParameters(params)
            return out
        out = sitk.AffineTransform(d)
        out.SetMatrix(_np(transform.matrix()[k]).ravel().tolist())
        out.SetTranslation(t)
        out.SetCenter(c)
        return out
    if isinstance(transform, BSplineTransform):
        g = transform.control
        out = sitk.BSplineTransform(d, 3)
        out.SetFixedParameters(list(g.size) + list(g.origin) + list(g.spacing) + list(g.direction))
        out.SetParameters(_np(transform.coefficients[k]).ravel().tolist())
        return out
    if isinstance(transform, (DisplacementField, StationaryVelocityField)):
        field = transform.displacement(transform.grid)[min(k, transform.batch_size - 1)]
        return sitk.DisplacementFieldTransform(_displacement_image(field, transform.grid))
    raise TypeError(
        f"cannot express {type(transform).__name__} as an ITK transform; "
        "export it as a displacement field on a grid (write_displacement_field)"
    )


_RIGID = ("Euler2DTransform", "Euler3DTransform", "VersorRigid3DTransform", "Rigid2DTransform", "Rigid3DTransform")
_SIMILARITY = ("Similarity2DTransform", "Similarity3DTransform")


def from_sitk(tx: sitk.Transform, dtype=None) -> Transform:
    """The airlab transform equal to a SimpleITK transform (batch size 1)."""
    dtype = dtype or torch.get_default_dtype()
    tx = tx.Downcast() if hasattr(tx, "Downcast") else tx
    name = tx.GetName()
    d = tx.GetDimension()
    if name == "CompositeTransform":
        parts = [tx.GetNthTransform(i) for i in range(tx.GetNumberOfTransforms())]
        if not parts:
            raise ValueError("the ITK composite transform is empty")
        items = [from_sitk(p, dtype) for p in reversed(parts)]
        return items[0] if len(items) == 1 else Composite(*items)
    if name == "IdentityTransform":
        return Translation(d, dtype=dtype)
    if name == "TranslationTransform":
        return Translation(d, translation=tx.GetOffset(), dtype=dtype)
    if name == "BSplineTransform":
        if tx.GetOrder() != 3:
            raise ValueError(f"only cubic B-spline transforms are supported, got order {tx.GetOrder()}")
        fp = np.asarray(tx.GetFixedParameters())
        grid = Grid(fp[:d].round().astype(int), fp[2 * d : 3 * d], fp[d : 2 * d], fp[3 * d :])
        coeffs = torch.as_tensor(np.asarray(tx.GetParameters()), dtype=dtype)
        return BSplineTransform.from_control_grid(grid, coeffs.reshape(1, d, *grid.shape))
    if name == "DisplacementFieldTransform":
        field = tx.GetDisplacementField()
        return _field_from_image(Image.from_sitk(field), "the ITK displacement-field transform", dtype)
    if hasattr(tx, "GetMatrix"):
        m = np.reshape(tx.GetMatrix(), (d, d))
        c, t = np.asarray(tx.GetCenter()), np.asarray(tx.GetTranslation())
        scale = abs(np.linalg.det(m)) ** (1.0 / d)
        if name in _RIGID or name in _SIMILARITY:
            rot = m / scale
            r = [np.arctan2(rot[1, 0], rot[0, 0])] if d == 2 else rotation_vector_from_matrix(rot)
            if name in _SIMILARITY:
                return Similarity(d, rotation=r, translation=t, scale=scale, center=c, dtype=dtype)
            return Rigid(d, rotation=r, translation=t, center=c, dtype=dtype)
        return Affine(d, matrix=m, translation=t, center=c, dtype=dtype)
    raise ValueError(f"ITK transform type {name} is not supported")


def _field_from_image(image: Image, what: str, dtype) -> DisplacementField:
    d = image.ndim
    if image.data.shape[1] != d:
        raise ValueError(
            f"{what} is not a displacement field: it has {image.data.shape[1]} component(s) per "
            f"voxel, a {d}D field needs {d}"
        )
    data = image.data.to(dtype)
    if not torch.isfinite(data).all():
        raise ValueError(f"{what} holds NaN or infinite displacements")
    return DisplacementField(image.grid, displacement=data)


# --------------------------------------------------------------------------- files
def write_displacement_field(transform: Transform, grid: Grid, path, *, index: int | None = None,
                             dtype=np.float32) -> None:
    """Write ``transform`` as a displacement field on ``grid`` (ITK convention: vectors in mm,
    LPS components, fixed point -> moving point), e.g. ``displacement.nii.gz``."""
    k = _pick(transform, index)
    with torch.no_grad():
        field = transform.displacement(grid)
    field = field[min(k, field.shape[0] - 1)]
    image = _displacement_image(field, grid, dtype)
    try:
        write_sitk(image, path)
    except (RuntimeError, OSError) as exc:
        raise TransformIOError(f"cannot write displacement field {path}: {itk_reason(exc)}") from None


def read_displacement_field(path, dtype=None) -> DisplacementField:
    """Read a displacement-field image (ITK/ANTs convention) as a :class:`DisplacementField`."""
    try:
        image = read_image(path)
    except ImageIOError as exc:
        raise TransformIOError(str(exc).replace("cannot read image", "cannot read displacement field")) from None
    try:
        return _field_from_image(image, f"{path}", dtype or torch.get_default_dtype())
    except ValueError as exc:
        raise TransformIOError(f"cannot read displacement field {path}: {exc}") from None


def write_transform(transform: Transform, path, *, index: int | None = None, grid: Grid | None = None) -> None:
    """Write an ITK transform file (.txt, .tfm, .mat, .h5), or a displacement-field image when
    the path names an image format (then ``grid`` says where to sample it)."""
    path = Path(path)
    if _is_image_path(path):
        if grid is None:
            grid = getattr(transform, "grid", None)
        if grid is None:
            raise ValueError(f"writing {path} as a displacement field needs grid=")
        write_displacement_field(transform, grid, path, index=index)
        return
    tx = to_sitk(transform, index)
    try:
        sitk.WriteTransform(tx, str(path))
    except RuntimeError as exc:
        raise TransformIOError(f"cannot write transform {path}: {itk_reason(exc)}") from None


def read_transform(path: str | os.PathLike, dtype=None) -> Transform:
    """Read an ITK transform file (.txt, .tfm, ANTs' binary .mat, .h5) or a displacement field."""
    path = Path(path)
    if not path.is_file():
        raise TransformIOError(f"cannot read transform {path}: no such file")
    if _is_image_path(path):
        return read_displacement_field(path, dtype)
    try:
        tx = sitk.ReadTransform(str(path))
    except RuntimeError as exc:
        raise TransformIOError(f"cannot read transform {path}: {itk_reason(exc)}") from None
    try:
        return from_sitk(tx, dtype)
    except ValueError as exc:
        raise TransformIOError(f"cannot read transform {path}: {exc}") from None
