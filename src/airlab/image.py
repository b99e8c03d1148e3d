"""Images in physical space and their input/output through SimpleITK."""

from __future__ import annotations

import os
import tempfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .errors import ImageIOError, InputError
from .spatial import Grid, sample

__all__ = ["Image", "ImageIOError", "as_image", "read_image", "write_image", "resample"]

# Unsigned types torch cannot compute with are widened on reading and restored on writing.
_WIDEN = {np.dtype(np.uint16): np.dtype(np.int32), np.dtype(np.uint32): np.dtype(np.int64)}


@dataclass(frozen=True)
class Image:
    """A batch of images ``data [N, C, *grid.shape]`` on one physical grid.

    ``file_dtype`` remembers the pixel type an image was read with (for example ``uint16``,
    which torch cannot compute with) so that writing it back keeps the type.
    """

    data: torch.Tensor
    grid: Grid
    file_dtype: str | None = None

    def __post_init__(self):
        d = self.grid.ndim
        if not isinstance(self.data, torch.Tensor):
            raise TypeError(f"Image data must be a torch.Tensor, got {type(self.data).__name__}")
        if self.data.dim() != d + 2 or tuple(self.data.shape[2:]) != self.grid.shape:
            raise ValueError(
                f"image tensor of shape {tuple(self.data.shape)} does not fit a {d}D grid of "
                f"shape {self.grid.shape}; expected [N, C, *{self.grid.shape}]"
            )

    @property
    def ndim(self) -> int:
        return self.grid.ndim

    @property
    def is_label(self) -> bool:
        """Integer images are label maps: they are resampled with nearest neighbour."""
        return not self.data.is_floating_point() and self.data.dtype != torch.bool

    def to(self, *args, **kwargs) -> "Image":
        return replace(self, data=self.data.to(*args, **kwargs))

    # ----------------------------------------------------------------- SimpleITK
    @classmethod
    def from_sitk(cls, image: sitk.Image) -> "Image":
        array = sitk.GetArrayFromImage(image)  # [*shape] or [*shape, C]
        grid = Grid.from_sitk(image)
        file_dtype = None
        if array.dtype in _WIDEN:
            file_dtype = array.dtype.name
            array = array.astype(_WIDEN[array.dtype])
        if image.GetNumberOfComponentsPerPixel() > 1:
            array = np.moveaxis(array, -1, 0)
        else:
            array = array[None]
        return cls(torch.from_numpy(np.ascontiguousarray(array))[None], grid, file_dtype)

    @classmethod
    def from_nibabel(cls, image) -> "Image":
        """From a nibabel image (RAS affine) to LPS physical space, as SimpleITK reads the file."""
        return _nibabel_to_image(image)

    def to_nibabel(self, index: int = 0):
        """Element ``index`` of the batch as a ``nibabel.Nifti1Image`` (RAS affine)."""
        import nibabel

        g = self.grid
        d = g.ndim
        m = np.eye(4)
        lin = np.asarray(g.direction_matrix) * np.asarray(g.spacing)
        m[:d, :d], m[:d, 3] = lin, g.origin
        m = np.diag([-1.0, -1.0, 1.0, 1.0]) @ m
        array = self.data[index].detach().cpu().numpy()
        array = array.transpose(0, *range(d, 0, -1))  # [C, *index axes]
        array = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
        if d == 2:
            array = array[:, :, None] if array.ndim == 2 else array[:, :, None, :]
        if array.dtype == np.bool_:
            array = array.astype(np.uint8)
        return nibabel.Nifti1Image(array, m)

    def to_sitk(self, index: int = 0, dtype=None) -> sitk.Image:
        """Element ``index`` of the batch as a SimpleITK image (vector image if C > 1)."""
        array = self.data[index].detach().cpu().numpy()
        dtype = np.dtype(dtype) if dtype is not None else None
        if dtype is None and self.file_dtype is not None and self.is_label:
            dtype = np.dtype(self.file_dtype)
        if dtype is not None:
            if np.issubdtype(dtype, np.integer) and array.size:
                info = np.iinfo(dtype)
                if array.min() < info.min or array.max() > info.max:
                    raise ValueError(f"values do not fit {dtype.name}")
            array = array.astype(dtype)
        if array.dtype == np.bool_:
            array = array.astype(np.uint8)
        vector = array.shape[0] > 1
        array = np.moveaxis(array, 0, -1) if vector else array[0]
        out = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=vector)
        self.grid.apply_to_sitk(out)
        return out


_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


def _nibabel_to_image(image) -> "Image":
    array = np.asanyarray(image.dataobj)
    if array.ndim not in (2, 3, 4):
        raise ValueError(f"a nibabel image of shape {array.shape} is not a 2D or 3D image")
    affine = np.asarray(image.affine, dtype=float)
    if array.ndim == 2:  # a 2D NIfTI is 3D with one slice; keep the in-plane geometry
        m = (_LPS_FROM_RAS @ affine[:3, :3])[:2, :2]
        origin = (_LPS_FROM_RAS @ affine[:3, 3])[:2]
    else:
        m = _LPS_FROM_RAS @ affine[:3, :3]
        origin = _LPS_FROM_RAS @ affine[:3, 3]
    spacing = np.linalg.norm(m, axis=0)
    channels = array.reshape(*array.shape[:3], -1) if array.ndim == 4 else array[..., None]
    d = len(spacing)
    data = np.moveaxis(channels, -1, 0).transpose(0, *range(d, 0, -1))  # [C, *reversed index axes]
    if data.dtype in _WIDEN:
        data = data.astype(_WIDEN[data.dtype])
    grid = Grid(list(array.shape[:d]), spacing, origin, (m / spacing).reshape(-1))
    return Image(torch.from_numpy(np.ascontiguousarray(data))[None], grid)


def itk_reason(exc: Exception) -> str:
    """The informative line of an ITK exception (they span many lines)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        for key in ("Description:", "ERROR:"):
            if key in ln:
                return ln.split(key, 1)[1].strip()
    return lines[-1] if lines else type(exc).__name__


def _read_dicom_series(folder: Path, series: str | None) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    ids = reader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise ImageIOError(f"cannot read image {folder}: folder holds no DICOM series")
    if series is None:
        if len(ids) > 1:
            raise ImageIOError(
                f"cannot read image {folder}: folder holds {len(ids)} DICOM series "
                f"({', '.join(ids)}); choose one with series="
            )
        series = ids[0]
    elif series not in ids:
        raise ImageIOError(f"cannot read image {folder}: no DICOM series {series!r} there")
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series))
    return reader.Execute()


def read_image(path: str | os.PathLike, *, series: str | None = None) -> Image:
    """Read any image SimpleITK reads (NIfTI, NRRD, MetaImage, ...) or a DICOM series folder.

    The result has batch size 1; vector pixels become channels; integer types stay integer.
    """
    path = Path(path)
    if not path.exists():
        raise ImageIOError(f"cannot read image {path}: no such file or folder")
    try:
        if path.is_dir():
            image = _read_dicom_series(path, series)
        else:
            image = sitk.ReadImage(str(path))
    except ImageIOError:
        raise
    except RuntimeError as exc:
        raise ImageIOError(f"cannot read image {path}: {itk_reason(exc)}") from None
    if image.GetDimension() not in (2, 3):
        raise ImageIOError(
            f"cannot read image {path}: {image.GetDimension()}D images are not supported (2D or 3D)"
        )
    return Image.from_sitk(image)


# gzip of the .nii.gz outputs: deflate with run-length matching only (zlib's Z_RLE) at level 1.
# Image intensities and displacements in float32 hardly compress (their low mantissa bits are
# noise), and searching for matches is what costs: on the 2 mm MNI152 case a displacement field
# takes 0.14 s instead of SimpleITK's 0.38 s, 1% larger; a 1 mm one 1.4 s instead of 3.4 s
# (docs/benchmarks.md; benchmarks/nifti_compression.py: SimpleITK 2.2's NIfTI writer ignores its
# compression level, and zlib's levels change these files' size by under 1%).
# The file is an ordinary gzip stream: nibabel, ITK, FSL and AFNI read it as they read any.
GZIP_LEVEL, GZIP_STRATEGY = 1, zlib.Z_RLE
_CHUNK = 1 << 24


def write_sitk(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> None:
    """``SimpleITK.WriteImage``, except that a ``.nii.gz`` file is written uncompressed beside
    its place and gzipped here with :data:`GZIP_STRATEGY` (2.5x faster for float fields, see above)."""
    path = Path(path)
    if not (compress and path.name.lower().endswith(".nii.gz")):
        sitk.WriteImage(image, str(path), compress)
        return
    try:
        handle, raw = tempfile.mkstemp(suffix=".nii", prefix=".airlab-", dir=path.parent)
    except OSError:  # a missing or read-only folder: SimpleITK says so as it always did
        sitk.WriteImage(image, str(path), compress)
        return
    os.close(handle)
    try:
        sitk.WriteImage(image, raw, False)
        deflate = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS, 9, GZIP_STRATEGY)
        with open(raw, "rb") as src, open(path, "wb") as dst:
            while chunk := src.read(_CHUNK):
                dst.write(deflate.compress(chunk))  # zlib lets go of the GIL: files compress in parallel
            dst.write(deflate.flush())
    finally:
        os.unlink(raw)


def as_image(value, what: str = "image") -> Image:
    """An airlab Image from a path, an Image, a SimpleITK image or a nibabel image (``None`` passes).

    Here, below the engine, because ``Result.warp`` and the workflows both take any of these."""
    if value is None or isinstance(value, Image):
        return value
    if isinstance(value, (str, os.PathLike)):
        return read_image(value)
    if isinstance(value, sitk.Image):
        return Image.from_sitk(value)
    if hasattr(value, "affine") and hasattr(value, "dataobj"):
        return Image.from_nibabel(value)
    raise InputError(f"the {what} must be a path, an airlab Image, a SimpleITK image or a nibabel image, "
                     f"not {type(value).__name__}")


def write_image(image: Image, path: str | os.PathLike, *, dtype=None, compress: bool = True) -> None:
    """Write a single image (batch size 1) in the format the file name's extension implies."""
    path = Path(path)
    if image.data.shape[0] != 1:
        raise ValueError(
            f"cannot write image {path}: it holds a batch of {image.data.shape[0]}; "
            "write one element at a time (Image(data[i:i+1], grid))"
        )
    try:
        write_sitk(image.to_sitk(0, dtype), path, compress)
    except (RuntimeError, ValueError, OSError) as exc:
        raise ImageIOError(f"cannot write image {path}: {itk_reason(exc)}") from None


def resample(
    image: Image,
    reference: Grid | Image,
    transform=None,
    *,
    interpolation: str | None = None,
    outside: float = 0.0,
) -> Image:
    """Resample ``image`` onto ``reference`` through ``transform`` (reference -> image points).

    ``interpolation`` defaults to ``"nearest"`` for label (integer) images and ``"linear"``
    otherwise; ``"bspline"`` is cubic B-spline interpolation; ``"label"`` moves label
    boundaries smoothly (largest linearly interpolated indicator). Points that map outside the image
    get ``outside``. A batched transform with a single image gives one result per transform.
    """
    grid = reference.grid if isinstance(reference, Image) else reference
    if grid.ndim != image.ndim:
        raise ValueError(f"cannot resample a {image.ndim}D image onto a {grid.ndim}D grid")
    if interpolation is None:
        interpolation = "nearest" if image.is_label else "linear"
    dtype = image.data.dtype if image.data.is_floating_point() else torch.get_default_dtype()
    points = grid.points(dtype=dtype, device=image.data.device)
    if transform is not None:
        if transform.ndim != image.ndim:
            raise ValueError(f"a {transform.ndim}D transform cannot warp a {image.ndim}D image")
        points = transform(points)
    data = sample(image.data, image.grid, points, interpolation, outside)
    file_dtype = image.file_dtype if interpolation in ("nearest", "label") else None
    return Image(data, grid, file_dtype)
