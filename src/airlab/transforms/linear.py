"""Linear transforms about a centre: ``y = M (x - c) + c + t`` (ITK's MatrixOffsetTransformBase)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .base import Transform

__all__ = [
    "LinearTransform",
    "Translation",
    "Rigid",
    "Similarity",
    "Affine",
    "rotation_matrix",
    "rotation_vector_from_matrix",
]


def _batched(value, batch_size: int, shape: tuple[int, ...], name: str, dtype) -> torch.Tensor:
    """Accept a value for one transform (``shape``) or for the batch (``[N, *shape]``)."""
    if isinstance(value, torch.Tensor) and value.is_floating_point() and dtype is None:
        dtype = value.dtype
    t = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
    t = t.to(dtype if dtype is not None else torch.get_default_dtype())
    if tuple(t.shape) == shape:
        t = t.expand(batch_size, *shape)
    if tuple(t.shape) != (batch_size, *shape):
        raise ValueError(f"{name} must have shape {shape} or {(batch_size, *shape)}, got {tuple(t.shape)}")
    return t.clone()


def rotation_matrix(rotation: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``[N, D, D]`` from angles ``[N, 1]`` (2D) or rotation vectors ``[N, 3]``.

    A rotation vector is the axis times the angle (radians). Going through a unit quaternion
    keeps it smooth everywhere, including at zero rotation, with no gimbal lock.
    """
    if rotation.shape[-1] == 1:
        a = rotation[..., 0]
        c, s = torch.cos(a), torch.sin(a)
        return torch.stack((torch.stack((c, -s), -1), torch.stack((s, c), -1)), -2)
    theta = torch.sqrt(rotation.square().sum(-1) + torch.finfo(rotation.dtype).tiny)
    w = torch.cos(theta / 2)
    # sin(theta/2)/theta, smooth through 0
    xyz = rotation * (0.5 * torch.sinc(theta / (2 * torch.pi))).unsqueeze(-1)
    x, y, z = xyz.unbind(-1)
    rows = (
        (1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)),
        (2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)),
        (2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)),
    )
    return torch.stack([torch.stack(r, -1) for r in rows], -2)


def rotation_vector_from_matrix(matrix: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rotation_matrix` for one 3x3 rotation (numpy, float64)."""
    m = np.asarray(matrix, dtype=float)
    # Shepperd: pick the largest quaternion component for a stable extraction
    tr = np.trace(m)
    cands = [tr, m[0, 0], m[1, 1], m[2, 2]]
    i = int(np.argmax(cands))
    if i == 0:
        w = np.sqrt(1 + tr) / 2
        x, y, z = (m[2, 1] - m[1, 2]) / (4 * w), (m[0, 2] - m[2, 0]) / (4 * w), (m[1, 0] - m[0, 1]) / (4 * w)
    elif i == 1:
        x = np.sqrt(max(1 + m[0, 0] - m[1, 1] - m[2, 2], 0)) / 2
        w, y, z = (m[2, 1] - m[1, 2]) / (4 * x), (m[0, 1] + m[1, 0]) / (4 * x), (m[0, 2] + m[2, 0]) / (4 * x)
    elif i == 2:
        y = np.sqrt(max(1 - m[0, 0] + m[1, 1] - m[2, 2], 0)) / 2
        w, x, z = (m[0, 2] - m[2, 0]) / (4 * y), (m[0, 1] + m[1, 0]) / (4 * y), (m[1, 2] + m[2, 1]) / (4 * y)
    else:
        z = np.sqrt(max(1 - m[0, 0] - m[1, 1] + m[2, 2], 0)) / 2
        w, x, y = (m[1, 0] - m[0, 1]) / (4 * z), (m[0, 2] + m[2, 0]) / (4 * z), (m[1, 2] + m[2, 1]) / (4 * z)
    if w < 0:
        w, x, y, z = -w, -x, -y, -z
    v = np.array([x, y, z])
    s = np.linalg.norm(v)
    if s < 1e-15:
        return 2 * v  # small-angle limit
    return v / s * 2 * np.arctan2(s, w)


class LinearTransform(Transform):
    """Base of linear transforms. Subclasses define :meth:`matrix` and :meth:`translation_vector`.

    ``center`` is a buffer ``[N, D]`` (not optimised): rotations and scalings happen about it.
    """

    def __init__(self, ndim: int, batch_size: int = 1, center=None, dtype=None):
        super().__init__(ndim, batch_size)
        center = np.zeros(ndim) if center is None else center
        self.register_buffer("center", _batched(center, batch_size, (ndim,), "center", dtype))
        self._dtype = self.center.dtype

    def _param(self, value, default, shape, name):
        value = default if value is None else value
        return nn.Parameter(_batched(value, self.batch_size, shape, name, self._dtype))

    def matrix(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def translation_vector(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def homogeneous(self) -> torch.Tensor:
        """``[N, D+1, D+1]`` matrices mapping homogeneous fixed points to moving points."""
        m, t, c = self.matrix(), self.translation_vector(), self.center
        offset = c + t - (m @ c.unsqueeze(-1)).squeeze(-1)
        top = torch.cat((m, offset.unsqueeze(-1)), -1)
        bottom = torch.zeros_like(top[:, :1])
        bottom[..., -1] = 1
        return torch.cat((top, bottom), -2)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        points = self._check_points(points)
        m, t, c = self.matrix(), self.translation_vector(), self.center
        n = max(points.shape[0], self.batch_size)
        flat = points.reshape(points.shape[0], -1, self.ndim).to(m.dtype)
        out = (flat - c.unsqueeze(1)) @ m.transpose(-1, -2) + (c + t).unsqueeze(1)
        return out.reshape(n, *points.shape[1:])

    def inverse(self) -> "Affine":
        """The exact inverse as an :class:`Affine` about the same centre."""
        m = self.matrix().detach()
        det = torch.linalg.det(m)
        scale = m.abs().amax(dim=(-1, -2)) ** self.ndim
        bad = (det.abs() <= 1e-12 * scale.clamp_min(1e-300)) | ~torch.isfinite(det)
        if bad.any():
            k = int(torch.nonzero(bad)[0])
            raise ValueError(
                f"cannot invert a singular linear transform (batch element {k}: determinant {float(det[k]):.3g})"
            )
        inv = torch.linalg.inv(m)
        t = -(inv @ self.translation_vector().detach().unsqueeze(-1)).squeeze(-1)
        return Affine(self.ndim, self.batch_size, matrix=inv, translation=t, center=self.center.clone())


class Translation(LinearTransform):
    """``y = x + t``; parameter ``translation [N, D]`` (mm)."""

    def __init__(self, ndim: int, batch_size: int = 1, translation=None, center=None, dtype=None):
        super().__init__(ndim, batch_size, center, dtype)
        self.translation = self._param(translation, np.zeros(ndim), (ndim,), "translation")

    def matrix(self):
        eye = torch.eye(self.ndim, dtype=self.translation.dtype, device=self.translation.device)
        return eye.expand(self.batch_size, -1, -1)

    def translation_vector(self):
        return self.translation

    def inverse(self) -> "Translation":
        return Translation(self.ndim, self.batch_size, -self.translation.detach(), self.center.clone())


class Rigid(LinearTransform):
    """Rotation about ``center`` then translation.

    Parameters: ``rotation`` — ``[N, 1]`` angle in 2D, ``[N, 3]`` rotation vector
    (axis x angle, radians) in 3D — and ``translation [N, D]`` (mm).
    """

    def __init__(self, ndim: int, batch_size: int = 1, rotation=None, translation=None, center=None, dtype=None):
        super().__init__(ndim, batch_size, center, dtype)
        k = 1 if ndim == 2 else 3
        self.rotation = self._param(rotation, np.zeros(k), (k,), "rotation")
        self.translation = self._param(translation, np.zeros(ndim), (ndim,), "translation")

    def matrix(self):
        return rotation_matrix(self.rotation)

    def translation_vector(self):
        return self.translation


class Similarity(Rigid):
    """Rigid plus an isotropic scale; parameter ``log_scale [N, 1]`` keeps the scale positive."""

    def __init__(
        self, ndim: int, batch_size: int = 1, rotation=None, translation=None, scale=None, center=None, dtype=None
    ):
        super().__init__(ndim, batch_size, rotation, translation, center, dtype)
        s = torch.as_tensor(np.asarray(1.0 if scale is None else scale, dtype=float))
        s = s.reshape(-1, 1) if s.numel() > 1 else s.reshape(1)
        if (s <= 0).any():
            raise ValueError(f"similarity scale must be positive, got {s.flatten().tolist()}")
        self.log_scale = self._param(torch.log(s), None, (1,), "scale")

    def scale(self) -> torch.Tensor:
        return torch.exp(self.log_scale)

    def matrix(self):
        return rotation_matrix(self.rotation) * self.scale().unsqueeze(-1)


class Affine(LinearTransform):
    """General linear map: parameters ``matrix [N, D, D]`` and ``translation [N, D]`` (mm)."""

    def __init__(self, ndim: int, batch_size: int = 1, matrix=None, translation=None, center=None, dtype=None):
        super().__init__(ndim, batch_size, center, dtype)
        self.linear = self._param(matrix, np.eye(ndim), (ndim, ndim), "matrix")
        self.translation = self._param(translation, np.zeros(ndim), (ndim,), "translation")

    def matrix(self):
        return self.linear

    def translation_vector(self):
        return self.translation
