"""The geometry of an image: its grid and the coordinate frames of a point.

This is the only module that knows about the three frames a point can be expressed in:

- *index*: continuous voxel index in ITK order ``(i, j, k)``; ``i`` runs along the last tensor
  axis (width), exactly like SimpleITK's ``TransformPhysicalPointToContinuousIndex``;
- *physical*: world coordinates in mm, ITK/LPS convention,
  ``x = origin + direction @ (spacing * index)``;
- *normalized*: the ``[-1, 1]`` coordinates of :func:`torch.nn.functional.grid_sample` with
  ``align_corners=True`` (``-1`` and ``+1`` are the centres of the first and last voxels).

The linear fetch (``grid_sample``, the only caller of PyTorch's, and ``sample_index`` on continuous
indices) is here too, because it is where normalised coordinates are built.

Point tensors always have their components last (``[..., D]``) in ITK order; image tensors are
``[N, C, *spatial]`` with spatial axes in the reverse order (``[D, H, W]`` = ``(k, j, i)``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Grid", "cpu_split", "grid_sample", "inside", "is_diagonal", "sample_index"]


def _floats(values: Sequence[float], name: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except TypeError as exc:
        raise ValueError(f"{name} must be a sequence of numbers, got {values!r}") from exc
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} must be finite, got {out}")
    return out


@dataclass(frozen=True)
class Grid:
    """Geometry of a regular sampling grid, exactly as SimpleITK reports it.

    ``size``, ``spacing`` and ``origin`` are in ITK order (x, y, z); ``direction`` is the
    row-major direction-cosine matrix flattened, as ``SimpleITK.Image.GetDirection()`` returns it.
    """

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def __init__(self, size, spacing=None, origin=None, direction=None):
        size = tuple(int(s) for s in size)
        d = len(size)
        if d not in (2, 3):
            raise ValueError(f"only 2D and 3D grids are supported, got size {size}")
        if any(s < 1 for s in size):
            raise ValueError(f"grid size must be positive, got {size}")
        spacing = _floats(spacing if spacing is not None else (1.0,) * d, "spacing")
        origin = _floats(origin if origin is not None else (0.0,) * d, "origin")
        if direction is None:
            direction = np.eye(d).ravel()
        direction = _floats(np.asarray(direction, dtype=float).ravel(), "direction")
        if len(spacing) != d or len(origin) != d or len(direction) != d * d:
            raise ValueError(
                f"inconsistent grid: size {size}, spacing {spacing}, origin {origin}, "
                f"direction with {len(direction)} entries (expected {d * d})"
            )
        if any(s <= 0 for s in spacing):
            raise ValueError(f"spacing must be positive, got {spacing}")
        if abs(np.linalg.det(np.reshape(direction, (d, d)))) < 1e-8:
            raise ValueError(f"direction matrix is singular: {direction}")
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)

    # ----------------------------------------------------------------- description
    @property
    def ndim(self) -> int:
        return len(self.size)

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape in tensor order (reversed ``size``)."""
        return tuple(reversed(self.size))

    @property
    def numel(self) -> int:
        return int(np.prod(self.size))

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.reshape(self.direction, (self.ndim, self.ndim))

    # The axis checks, one home (issue 12): fast paths that skip a rotation or a matmul ask here.
    # An engine iteration asks them several times of the same few grids, and each numpy check
    # cost tens of microseconds, a coarse level's fetch: computed once per grid (or pair), as a
    # frozen Grid allows.
    @functools.cached_property
    def orthonormal(self) -> bool:
        """Is the direction a rotation or reflection (to 1e-6)? All scanner images: then norms of
        derivatives need no rotation to world axes."""
        m = self.direction_matrix
        return bool(np.allclose(m @ m.T, np.eye(self.ndim), atol=1e-6))

    @functools.cached_property
    def axis_aligned(self) -> bool:
        """Is the direction a signed permutation? Then world axes are grid axes up to order and sign."""
        m = np.abs(self.direction_matrix)
        return bool(np.allclose(m, np.round(m), atol=1e-6)) and self.orthonormal

    def index_map(self, other: "Grid") -> np.ndarray:
        """Homogeneous matrix from this grid's continuous index to ``other``'s."""
        return other.physical_to_index_matrix() @ self.index_to_physical_matrix()

    @functools.lru_cache(maxsize=256)
    def aligned_with(self, other: "Grid", atol: float = 1e-9) -> bool:
        """Does each axis of this grid run along the same axis of ``other`` (any spacing, origin
        and sign)? Then resampling between them is separable: one small matrix per axis."""
        return self.ndim == other.ndim and is_diagonal(self.index_map(other)[: self.ndim, : self.ndim], atol)

    def index_to_physical_matrix(self) -> np.ndarray:
        """Homogeneous ``(D+1, D+1)`` matrix mapping index to physical coordinates (float64)."""
        d = self.ndim
        m = np.eye(d + 1)
        m[:d, :d] = self.direction_matrix @ np.diag(self.spacing)
        m[:d, d] = self.origin
        return m

    def physical_to_index_matrix(self) -> np.ndarray:
        return np.linalg.inv(self.index_to_physical_matrix())

    def index_to_normalized_matrix(self) -> np.ndarray:
        d = self.ndim
        m = np.eye(d + 1)
        for a, s in enumerate(self.size):
            # a single voxel has no extent; any normalised value addresses it
            scale = 2.0 / (s - 1) if s > 1 else 1.0
            m[a, a] = scale
            m[a, d] = -1.0 if s > 1 else 0.0
        return m

    def physical_to_normalized_matrix(self) -> np.ndarray:
        return self.index_to_normalized_matrix() @ self.physical_to_index_matrix()

    def center(self) -> np.ndarray:
        """Physical position of the grid centre (mean of the corner voxel centres)."""
        idx = (np.asarray(self.size, dtype=float) - 1.0) / 2.0
        return self.index_to_physical_matrix()[: self.ndim] @ np.append(idx, 1.0)

    def extent(self) -> np.ndarray:
        """Physical length along each grid axis, from first to last voxel centre."""
        return (np.asarray(self.size) - 1) * np.asarray(self.spacing)

    @functools.lru_cache(maxsize=256)
    def same_as(self, other: "Grid", atol: float = 1e-6) -> bool:
        return (
            self.size == other.size
            and np.allclose(self.spacing, other.spacing, rtol=0, atol=atol)
            and np.allclose(self.origin, other.origin, rtol=0, atol=atol)
            and np.allclose(self.direction, other.direction, rtol=0, atol=atol)
        )

    def __repr__(self) -> str:
        fmt = lambda v: "(" + ", ".join(f"{x:.6g}" for x in v) + ")"  # noqa: E731
        return (
            f"Grid(size={self.size}, spacing={fmt(self.spacing)}, origin={fmt(self.origin)}, "
            f"direction={fmt(self.direction)})"
        )

    # ----------------------------------------------------------------- conversions
    @staticmethod
    def _apply(matrix: np.ndarray, points: torch.Tensor) -> torch.Tensor:
        return _apply_matrix(matrix, points)

    def index_to_physical(self, index: torch.Tensor) -> torch.Tensor:
        return self._apply(self.index_to_physical_matrix(), index)

    def physical_to_index(self, points: torch.Tensor) -> torch.Tensor:
        return self._apply(self.physical_to_index_matrix(), points)

    def index_to_normalized(self, index: torch.Tensor) -> torch.Tensor:
        return self._apply(self.index_to_normalized_matrix(), index)

    def physical_to_normalized(self, points: torch.Tensor) -> torch.Tensor:
        return self._apply(self.physical_to_normalized_matrix(), points)

    def physical_to_normalized_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """Map displacement vectors (mm) to normalised displacements (no translation)."""
        m = torch.as_tensor(
            self.physical_to_normalized_matrix()[: self.ndim, : self.ndim],
            dtype=vectors.dtype,
            device=vectors.device,
        )
        return vectors @ m.T

    def indices(self, dtype=None, device=None) -> torch.Tensor:
        """Voxel indices ``[1, *shape, D]`` (components in ITK order)."""
        dtype = dtype or torch.get_default_dtype()
        axes = [torch.arange(n, dtype=dtype, device=device) for n in self.shape]
        mesh = torch.meshgrid(*axes, indexing="ij")  # tensor order (k, j, i)
        return torch.stack(mesh[::-1], dim=-1).unsqueeze(0)

    def points(self, dtype=None, device=None) -> torch.Tensor:
        """Physical coordinates of every voxel centre, ``[1, *shape, D]``."""
        return self.index_to_physical(self.indices(dtype, device))

    # ----------------------------------------------------------------- derived grids
    def with_spacing(self, spacing: Sequence[float] | float) -> "Grid":
        """A grid over (about) the same physical extent, centred identically, with new spacing."""
        spacing = np.broadcast_to(np.asarray(spacing, dtype=float), (self.ndim,))
        size = np.maximum(np.floor(self.extent() / spacing + 1e-6).astype(int) + 1, 1)
        new_extent = (size - 1) * spacing
        origin = self.center() - self.direction_matrix @ (new_extent / 2.0)
        return Grid(size, spacing, origin, self.direction)

    def subgrid(self, stride: int, offset: Sequence[int]) -> "Grid":
        """Every ``stride``-th voxel along each axis, starting at index ``offset`` (ITK order)."""
        offset = np.asarray(offset, dtype=int)
        if stride < 1 or offset.shape != (self.ndim,) or (offset < 0).any() or (offset >= stride).any():
            raise ValueError(f"bad subgrid: stride {stride}, offset {tuple(offset)}")
        size = np.maximum(-(-(np.asarray(self.size) - offset) // stride), 1)
        origin = self.index_to_physical_matrix() @ np.append(offset, 1.0)
        return Grid(size, np.asarray(self.spacing) * stride, origin[: self.ndim], self.direction)

    # ----------------------------------------------------------------- SimpleITK
    @classmethod
    def from_sitk(cls, image) -> "Grid":
        return cls(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    def apply_to_sitk(self, image) -> None:
        """Stamp this geometry on a SimpleITK image of the same size."""
        if tuple(image.GetSize()) != self.size:
            raise ValueError(f"image size {image.GetSize()} does not match grid size {self.size}")
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)


_AFFINE_TENSORS: dict = {}


def _apply_matrix(matrix: np.ndarray, points: torch.Tensor) -> torch.Tensor:
    """The homogeneous ``matrix`` applied to ``points [..., D]``."""
    if points.shape[-1] != matrix.shape[0] - 1:
        raise ValueError(f"points have {points.shape[-1]} components, the grid is {matrix.shape[0] - 1}D")
    dtype = points.dtype if points.is_floating_point() else torch.get_default_dtype()
    diagonal, shift, linear = _affine_tensors(matrix, dtype, points.device)
    if diagonal:
        # axis-aligned (every index <-> normalised map, most images): 5x faster than a matmul
        return torch.addcmul(shift, points.to(dtype), linear)
    return points.to(dtype) @ linear + shift


def _affine_tensors(matrix: np.ndarray, dtype: torch.dtype, device) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """``(diagonal, shift, scale or linear^T)`` of a homogeneous ``matrix`` as tensors, kept per
    matrix, dtype and device: an engine iteration maps points with the same few matrices many
    times, and making the two small tensors each time was four operations a call."""
    key = (matrix.tobytes(), matrix.shape, dtype, str(device))
    kept = _AFFINE_TENSORS.get(key)
    if kept is None:
        d = matrix.shape[0] - 1
        linear = matrix[:d, :d]
        diagonal = is_diagonal(linear)
        shift = torch.as_tensor(matrix[:d, d].copy(), dtype=dtype, device=device)
        weights = np.diag(linear).copy() if diagonal else linear.T.copy()
        if len(_AFFINE_TENSORS) >= 256:
            _AFFINE_TENSORS.clear()
        kept = _AFFINE_TENSORS[key] = (diagonal, shift, torch.as_tensor(weights, dtype=dtype, device=device))
    return kept


def is_diagonal(matrix: np.ndarray, atol: float = 0.0) -> bool:
    """Is every off-diagonal entry of the square ``matrix`` within ``atol`` of zero (each axis maps
    onto one axis)? ``atol=0`` asks for exact zeros."""
    m = np.asarray(matrix)
    return not bool((np.abs(m - np.diag(np.diag(m))) > atol).any())


def inside(index: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """ITK's buffer test: a continuous index is inside if -0.5 <= i < size - 0.5 on every axis."""
    hi = torch.as_tensor([s - 0.5 for s in size], dtype=index.dtype, device=index.device)
    return ((index >= -0.5) & (index < hi)).all(dim=-1)


def cpu_split(data: torch.Tensor, grid: torch.Tensor, threads: int | None = None) -> int:
    """How many parts :func:`grid_sample` splits one image's points into: the one place where the
    thread count chooses a code path (a measured speed optimisation, not a change of numbers).

    On CPU, PyTorch's kernel runs batch elements in parallel but the points of one element on
    one thread. A single image is therefore expanded (a view, no copy) over one batch element per
    thread, each sampling its share of the points: measured on 2 threads, 141k points of a 2 mm
    brain, forward and backward 20.9 -> 8.9 ms. Below 1024 points a thread (3D; 8192 in 2D, where
    a point's four taps cost less) the split costs more than it saves
    (``benchmarks/split_threshold.py``, forward and backward on 2 threads: 2D 4800 points 66 us
    in one part, 118 us in two; 16 384 points 141 and 150, about even; 37 000 points 282 and
    220; 3D 1200 points 113 and 130, 2048 points 172 and 161), and batches or GPUs are parallel
    already: 1 (no split). ``threads`` defaults to ``torch.get_num_threads()``.
    """
    threads = torch.get_num_threads() if threads is None else threads
    points = math.prod(grid.shape[1:-1])  # from the shape: indexing would cost tensor operations
    per_thread = 1024 if grid.shape[-1] == 3 else 8192
    if data.device.type != "cpu" or data.shape[0] != 1 or threads < 2 or points < per_thread * threads:
        return 1
    return threads


def grid_sample(data: torch.Tensor, grid: torch.Tensor, padding_mode: str = "zeros",
                parts: int | None = None) -> torch.Tensor:
    """``F.grid_sample(data, grid, "bilinear", padding_mode, align_corners=True)``, with the points
    of a single image split into ``parts`` batch elements (default :func:`cpu_split`: one per CPU
    thread where that is faster). The values are exactly those of one call whatever ``parts``;
    gradients agree to rounding (the image's is summed over the parts).
    """
    parts = cpu_split(data, grid) if parts is None else parts
    if parts < 1 or (parts > 1 and data.shape[0] != 1):
        raise ValueError(f"grid_sample: {parts} parts of a batch of {data.shape[0]} (a split needs one image)")
    if parts == 1:
        return F.grid_sample(data, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)
    c, d = data.shape[1], grid.shape[-1]
    points = math.prod(grid.shape[1:-1])
    flat = grid.reshape(-1, d)
    pad = -points % parts
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad, d)])
    split = flat.view(parts, *([1] * (d - 1)), -1, d)
    out = F.grid_sample(data.expand(parts, *data.shape[1:]), split, mode="bilinear", padding_mode=padding_mode,
                        align_corners=True)
    out = out.reshape(parts, c, -1).transpose(0, 1).reshape(1, c, -1)[..., :points]
    return out.reshape(1, c, *grid.shape[1:-1])


@functools.lru_cache(maxsize=64)
def _normalizing_matrix(size: tuple[int, ...]) -> np.ndarray:
    """``Grid(size).index_to_normalized_matrix()``, kept per size: a sample at indices needs only
    the size, and building a Grid (its checks) cost more than the fetch of a coarse level."""
    return Grid(size).index_to_normalized_matrix()


def sample_index(data: torch.Tensor, index: torch.Tensor, boundary: str = "border") -> torch.Tensor:
    """Linear interpolation of ``data [N, C, *S]`` at continuous indices ``index [N, P, D]``.

    ``boundary`` extends the data beyond its outermost voxel centres: ``"border"`` repeats the
    edge value, ``"mirror"`` reflects about the edge voxel centre (``x[-k] = x[k]``).
    Returns ``[N, C, P]``.
    """
    n, p, d = index.shape
    norm = _apply_matrix(_normalizing_matrix(tuple(reversed(data.shape[2:]))), index)
    norm = norm.reshape(n, *([1] * (d - 1)), p, d)
    padding = {"border": "border", "mirror": "reflection"}[boundary]
    out = grid_sample(data, norm, padding)
    return out.reshape(n, data.shape[1], p)
