"""The contract every spatial transform follows."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from ..spatial import Grid


class Transform(nn.Module):
    """A batch of spatial transforms mapping fixed physical points to moving physical points.

    This is ITK's "pull" convention: resampling a moving image onto a fixed grid evaluates the
    moving image at ``transform(fixed_points)``. Subclasses implement :meth:`forward` on points
    ``[N, *P, D]`` in mm (ITK/LPS components) and hold their parameters as a batch of ``N``.
    """

    def __init__(self, ndim: int, batch_size: int = 1):
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"only 2D and 3D transforms are supported, got {ndim}D")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.ndim = ndim
        self.batch_size = batch_size

    # ----------------------------------------------------------------- to implement
    def forward(self, points: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self) -> "Transform":
        raise NotImplementedError(f"{type(self).__name__} has no inverse")

    # ----------------------------------------------------------------- engine hooks
    def start_level(self, level_index: int, level_grid: Grid) -> None:
        """Called by the engine before each pyramid level of the stage that optimises this
        transform: a family that changes its parameters between levels (B-spline refinement,
        moving a velocity's exponentiation grid) does it here. The engine builds the optimiser
        after this call."""

    def cached(self):
        """A block within which the transform may keep what it computed (the parameters do not
        change inside it): the engine evaluates one objective inside it."""
        return contextlib.nullcontext(self)

    # ----------------------------------------------------------------- shared
    def _check_points(self, points: torch.Tensor) -> torch.Tensor:
        if points.shape[-1] != self.ndim:
            raise ValueError(
                f"points have {points.shape[-1]} components but the transform is {self.ndim}D"
            )
        if points.dim() < 2:
            raise ValueError(f"points must be [N, *P, {self.ndim}], got shape {tuple(points.shape)}")
        if self.batch_size != 1 and points.shape[0] not in (1, self.batch_size):
            raise ValueError(
                f"points batch {points.shape[0]} does not match the transform batch {self.batch_size}"
            )
        return points

    def _reference_tensor(self) -> torch.Tensor | None:
        for t in list(self.parameters()) + list(self.buffers()):
            if t.is_floating_point():
                return t
        return None

    def transform_points(self, points):
        """Map landmark coordinates (mm). Accepts ``[P, D]`` or ``[N, P, D]``, numpy or torch.

        An unbatched array is mapped by every transform of the batch (result ``[N, P, D]``;
        ``[P, D]`` again when the batch size is 1). Numpy in, numpy out.
        """
        as_numpy = isinstance(points, np.ndarray) or not isinstance(points, torch.Tensor)
        ref = self._reference_tensor()
        t = torch.as_tensor(
            np.asarray(points) if as_numpy else points,
            dtype=ref.dtype if ref is not None else torch.float64,
            device=ref.device if ref is not None else None,
        )
        unbatched = t.dim() == 2
        if unbatched:
            t = t.unsqueeze(0)
        out = self(self._check_points(t))
        if unbatched and out.shape[0] == 1:
            out = out[0]
        return out.detach().cpu().numpy() if as_numpy else out

    def displacement(self, grid: Grid) -> torch.Tensor:
        """The transform as a displacement field ``[N, D, *grid.shape]`` (mm, ITK convention)."""
        ref = self._reference_tensor()
        dtype = ref.dtype if ref is not None else torch.get_default_dtype()
        points = grid.points(dtype=dtype, device=ref.device if ref is not None else None)
        disp = self(points) - points
        return torch.movedim(disp, -1, 1)

    def inverse_points(self, points: torch.Tensor, iterations: int = 100, tolerance: float = 1e-6):
        """Numerically invert this transform at ``points [N, *P, D]``: find ``y`` with
        ``self(y) == points`` by the fixed-point iteration ``y <- y - (self(y) - points)``.

        Exact to ``tolerance`` mm wherever the displacement is a contraction (no folding).
        Returns ``(y, residual)`` with ``residual [N, *P] = |self(y) - points|`` (mm): large
        where there is no inverse (for example where a deformation with limited support
        pushes points out of its domain).
        """
        with torch.no_grad():
            y = points
            left, stalled = None, 0
            for _ in range(iterations):
                err = self(y) - points
                open_ = int((err.norm(dim=-1) >= tolerance).sum())
                # stop when all converged, or when only points without an inverse remain
                stalled = stalled + 1 if left is not None and open_ >= left else 0
                if open_ == 0 or stalled >= 3:
                    break
                left = open_
                y = y - err
            residual = (self(y) - points).norm(dim=-1)
        return y, residual

    def extra_repr(self) -> str:
        return f"ndim={self.ndim}, batch_size={self.batch_size}"

    def coefficient_lattice(self) -> tuple[torch.Tensor, Grid]:
        """``(coefficients [N, D, *lattice.shape], lattice)`` of a kernel-on-a-lattice transform:
        what the ``coefficients-*`` regularisers penalise. Only lattice families have one."""
        raise ValueError(f"{type(self).__name__} has no coefficient lattice: coefficient penalties need "
                         f"a B-spline, B-spline velocity or Wendland transform")
