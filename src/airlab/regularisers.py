"""Regularisers of displacement fields, in physical units on any grid.

Every function takes a displacement ``[N, D, *grid.shape]`` (channel ``c`` is the mm component
``c`` in ITK order) and returns one value per batch element, ``[N]``, to be minimised.

Derivatives are finite differences along the voxel axes (:func:`airlab.filters.index_gradient`, the numbers of
``torch.gradient(edge_order=2)``: central inside, second-order one-sided at the borders, so
fields up to quadratic are differentiated exactly everywhere), taken with respect to the
continuous index and converted to physical coordinates by the chain rule. The index->physical
map ``x = M i + o`` (``M = direction @ diag(spacing)``) is affine, so
``d/dx_j = sum_a (M^-1)[a, j] d/di_a`` with constant coefficients: this is exact for oblique and
anisotropic grids, and applying it twice gives physical second derivatives (no curvature term).

Central differences do not see the odd-even (checkerboard) mode of a field inside the domain:
``diffusion``, both total variations and ``bending_energy`` penalise it only through the
borders. Pair them with a smooth parameterisation (B-spline, smoothed velocity) when that matters.
"""

from __future__ import annotations

import contextlib
import contextvars

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# index_gradient: imported from here by users and tests since before it moved to filters
from .filters import index_gradient, physical_gradient  # noqa: F401
from .spatial import Grid

__all__ = [
    "jacobian",
    "hessian",
    "jacobian_determinant",
    "diffusion",
    "bending_energy",
    "total_variation",
    "total_variation_l1",
    "sparsity",
    "folding_penalty",
    "parameter_norm",
    "shared_derivatives",
    "Diffusion",
    "BendingEnergy",
    "TotalVariation",
    "TotalVariationL1",
    "Sparsity",
    "JacobianFolding",
    "ParameterNorm",
    "squared_norm",
    "ParameterRegulariser",
    "CoefficientL1",
    "CoefficientL2",
    "CoefficientDiffusion",
    "CoefficientTV",
    "CoefficientTVL1",
    "REGULARISERS",
]


# the derivatives of the fields seen in a shared_derivatives() block, per thread (a batch runner
# may register in several threads); None outside such a block
_shared = contextvars.ContextVar("airlab_shared_derivatives", default=None)


@contextlib.contextmanager
def shared_derivatives():
    """Within this block the regularisers differentiate a field once: diffusion and the folding
    penalty of one evaluation (the engine's) share ``physical_gradient``'s derivatives, and the
    backward pass runs through them once. The caller promises not to change a field in place
    inside the block."""
    token = _shared.set({})
    try:
        yield
    finally:
        _shared.reset(token)


def _derivatives(field: torch.Tensor, grid: Grid, rotate: bool = True) -> torch.Tensor:
    """``physical_gradient(field, grid, rotate)``, kept within a :func:`shared_derivatives` block."""
    cache = _shared.get()
    if cache is None:
        return physical_gradient(field, grid, rotate)
    key = (id(field), grid, rotate)
    kept = cache.get(key)
    if kept is None or kept[0] is not field:
        # the field itself is kept with its derivatives, so that its id is not reused in the block
        kept = cache[key] = (field, physical_gradient(field, grid, rotate))
    return kept[1]


def _check(displacement: torch.Tensor, grid: Grid, differentiate: bool = True) -> None:
    d = grid.ndim
    shape = tuple(displacement.shape)
    if len(shape) != d + 2 or shape[1] != d or shape[2:] != grid.shape:
        raise ValueError(
            f"displacement of shape {shape} does not fit the grid: "
            f"expected [N, {d}, *{grid.shape}]"
        )
    if not displacement.is_floating_point():
        raise ValueError(f"displacement must be floating point, got {displacement.dtype}")
    if differentiate and min(grid.size) < 3:
        raise ValueError(f"finite differences need 3 voxels along every axis, grid size is {grid.size}")


def jacobian(displacement: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``[N, D, D, *shape]`` with entry ``[i, j] = d u_i / d x_j`` (physical coordinates)."""
    _check(displacement, grid)
    return _derivatives(displacement, grid)


def hessian(displacement: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``[N, D, D, D, *shape]`` with entry ``[i, j, k] = d2 u_i / dx_j dx_k``.

    Symmetric in ``j, k`` at every voxel, borders included: the difference operators along
    different index axes act on separate axes, so they commute.
    """
    jac = jacobian(displacement, grid)
    d = grid.ndim
    return physical_gradient(jac.flatten(1, 2), grid).unflatten(1, (d, d))


def _field_derivatives(displacement: torch.Tensor, grid: Grid, order: int) -> torch.Tensor:
    """``du_i/dx_j`` (order 1, ``[N, D, D, *shape]``) or ``d2u_i/dx_j dx_k`` (order 2, ``[N, D * D,
    D, *shape]``) along axes whose frame may differ from the physical one by a rotation.

    Frobenius norms do not change when the derivative frame rotates, so on grids with an
    orthonormal direction (all scanner images) the rotation to physical axes is skipped: it
    costs more than the derivatives.
    """
    _check(displacement, grid)
    rotate = not grid.orthonormal
    out = _derivatives(displacement, grid, rotate)
    if order == 2:
        out = physical_gradient(out.flatten(1, 2), grid, rotate)
    return out


def _gradient_norms(displacement: torch.Tensor, grid: Grid, order: int) -> torch.Tensor:
    """``sum_ij (du_i/dx_j)^2`` (order 1) or ``sum_ijk (d2u_i/dx_j dx_k)^2`` (order 2) per voxel."""
    return _field_derivatives(displacement, grid, order).pow(2).flatten(1, 2).sum(dim=1)


def _voxel_mean(density: torch.Tensor) -> torch.Tensor:
    return density.flatten(1).mean(dim=1)


class _MeanSquare(torch.autograd.Function):
    """``x [N, K, *shape] -> [N]``: the mean over voxels of ``sum_k x_k^2``, as ``pow``, ``sum`` and
    ``mean`` compute it, with the backward pass ``2 x g / voxels`` in one pass over ``x``
    (``pow``'s backward makes three, with a copy of ``x``: a tenth of a 1 mm finest iteration's
    profile)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.pow(2).sum(dim=1).flatten(1).mean(dim=1)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        scale = grad * (2.0 / x[0, 0].numel())
        return x * scale.view(-1, *([1] * (x.dim() - 1)))


def diffusion(displacement: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Mean over voxels of ``sum_ij (du_i/dx_j)^2``."""
    return _MeanSquare.apply(_field_derivatives(displacement, grid, 1).flatten(1, 2))


def bending_energy(displacement: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Mean over voxels of ``sum_i [sum_j (d2u_i/dx_j^2)^2 + 2 sum_{j<k} (d2u_i/dx_j dx_k)^2]``.

    With a symmetric Hessian this is its squared Frobenius norm, which is what is summed.
    """
    return _MeanSquare.apply(_field_derivatives(displacement, grid, 2).flatten(1, 2))


def total_variation(displacement: torch.Tensor, grid: Grid, eps: float = 1e-3) -> torch.Tensor:
    """Isotropic TV: mean over voxels of ``sqrt(sum_ij (du_i/dx_j)^2 + eps^2)``.

    ``eps`` keeps the gradient finite where the field is locally constant.
    """
    squared = _gradient_norms(displacement, grid, 1)
    return _voxel_mean(torch.sqrt(squared + eps**2))


def total_variation_l1(displacement: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Anisotropic TV: mean over voxels of ``sum_ij |du_i/dx_j|`` (mm/mm).

    Unlike :func:`total_variation` this is not rotation invariant: ``x_j`` are the world axes, so
    on an oblique grid the derivatives are rotated to them (skipped when the direction only
    permutes or flips axes, which the sum of absolute values does not see). ``|.|`` is not
    smoothed: its subgradient at 0 is 0, and gradcheck on random fields does not land on a kink.
    """
    _check(displacement, grid)
    grad = _derivatives(displacement, grid, rotate=not grid.axis_aligned)
    return _voxel_mean(grad.abs().flatten(1, 2).sum(dim=1))


def sparsity(displacement: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Mean over voxels of ``sum_i |u_i|`` (mm, world components): favours fields that are zero
    in most places. ``grid`` only checks the shape; no derivatives are taken."""
    _check(displacement, grid, differentiate=False)
    return _voxel_mean(displacement.abs().sum(dim=1))


def parameter_norm(params: torch.Tensor, order: int = 1) -> torch.Tensor:
    """Mean of ``|p|^order`` over each batch element's entries of ``params [N, ...]`` -> ``[N]``.

    A penalty on a transform's parameters rather than on its displacement, for B-spline or kernel
    coefficients (``BSplineTransform.coefficients``, ``[N, D, *control.shape]``, mm): order 1
    favours few active control points, order 2 is weight decay. It needs no grid, and on
    coefficients it depends on the control spacing, so it is not in :data:`REGULARISERS`; a
    stage penalises its coefficients with the ``coefficients-l1``/``coefficients-l2`` terms
    (:class:`CoefficientL1`, :class:`CoefficientL2`: per knot, summed over components).
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    if params.dim() < 2 or not params.is_floating_point():
        raise ValueError(
            f"params must be a floating-point tensor [N, ...] with a batch axis first, "
            f"got shape {tuple(params.shape)} and dtype {params.dtype}"
        )
    p = params.flatten(1)
    return (p.abs() if order == 1 else p.square()).mean(dim=1)


# slices of a 3D field whose determinants are computed together when no gradient is needed:
# the nine derivative volumes of a whole 1 mm field in float64 are 0.6 GB, a slab's a few tens of MB
_SLAB = 16


def jacobian_determinant(displacement: torch.Tensor, grid: Grid, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``det(I + J)`` of the map ``x -> x + u(x)``, ``[N, *shape]``; ``<= 0`` where it folds.

    With ``K`` the derivatives along the grid's axes in mm and ``R`` its direction, ``J = K R^-1``
    and ``det(I + K R^-1) = det(R + K) / det(R)``: no rotation of the derivatives, and the 2x2 or
    3x3 determinant written out per voxel (``torch.linalg.det`` on a million tiny matrices and
    the rotation took most of a 2 mm field's time). Without autograd, a 3D field is taken in
    slabs of slices with one slice of overlap, which gives the same central differences.
    ``dtype``: compute in it (slab by slab: a float32 field's determinants in float64 without a
    float64 copy of the whole field)."""
    _check(displacement, grid)
    n = displacement.shape[2]
    dtype = dtype or displacement.dtype
    if grid.ndim == 2 or n <= _SLAB or (torch.is_grad_enabled() and displacement.requires_grad):
        return _determinant(displacement.to(dtype), grid)
    parts = []
    for start in range(0, n, _SLAB):
        end = min(n, start + _SLAB)
        lo, hi = max(0, start - 1), min(n, end + 1)
        lo = min(lo, max(0, hi - 3))  # three slices at least: the border formula needs them
        parts.append(_determinant(displacement[:, :, lo:hi].to(dtype), grid)[:, start - lo:end - lo])
    return torch.cat(parts, dim=1)


def _determinant(displacement: torch.Tensor, grid: Grid) -> torch.Tensor:
    d = grid.ndim
    k = _derivatives(displacement, grid, rotate=False)  # [N, c, a, *shape]: du_c / d(mm along axis a)
    r = np.asarray(grid.direction, dtype=np.float64).reshape(d, d)
    # one addition and unbinds, not d * d indexings: each would allocate and fill a zero
    # [N, D, D, *shape] tensor in the backward pass
    a = (k + torch.as_tensor(r, dtype=k.dtype, device=k.device).view(d, d, *([1] * d))).unbind(1)
    a = [row.unbind(1) for row in a]
    if d == 2:
        det = a[0][0] * a[1][1] - a[0][1] * a[1][0]
    else:
        det = (a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1])
               - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
               + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0]))
    return det / float(np.linalg.det(r))


def folding_penalty(displacement: torch.Tensor, grid: Grid, threshold: float = 0.0) -> torch.Tensor:
    """Mean over voxels of ``relu(threshold - det(I + J))^2``.

    Zero for a field whose determinant stays above ``threshold``; a small positive threshold
    keeps the optimiser away from the fold rather than stopping it on the edge.
    """
    det = jacobian_determinant(displacement, grid)
    if det.device.type == "cpu" and not bool((det < threshold).any()):
        # nothing below the threshold: the value and its gradient are zeros, and a constant zero
        # spares the backward pass the determinant's branch (a GPU would wait on the test instead)
        return det.new_zeros(det.shape[0])
    return _MeanSquare.apply(F.relu(threshold - det).unsqueeze(1))


# --------------------------------------------------------------------------- modules
class Diffusion(nn.Module):
    def forward(self, displacement: torch.Tensor, grid: Grid) -> torch.Tensor:
        return diffusion(displacement, grid)


class BendingEnergy(nn.Module):
    def forward(self, displacement: torch.Tensor, grid: Grid) -> torch.Tensor:
        return bending_energy(displacement, grid)


class TotalVariation(nn.Module):
    def __init__(self, eps: float = 1e-3):
        super().__init__()
        if not eps > 0:
            raise ValueError(f"eps must be positive (it keeps the gradient finite), got {eps}")
        self.eps = float(eps)

    def forward(self, displacement: torch.Tensor, grid: Grid) -> torch.Tensor:
        return total_variation(displacement, grid, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}"


class TotalVariationL1(nn.Module):
    def forward(self, displacement: torch.Tensor, grid: Grid) -> torch.Tensor:
        return total_variation_l1(displacement, grid)


class Sparsity(nn.Module):
    def forward(self, displacement: torch.Tensor, grid: Grid) -> torch.Tensor:
        return sparsity(displacement, grid)


class ParameterNorm(nn.Module):
    """:func:`parameter_norm` as a module, called as ``penalty(params) -> [N]`` (no grid)."""

    def __init__(self, order: int = 1):
        super().__init__()
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order!r}")
        self.order = int(order)

    def forward(self, params: torch.Tensor) -> torch.Tensor:
        return parameter_norm(params, self.order)

    def extra_repr(self) -> str:
        return f"order={self.order}"


class JacobianFolding(nn.Module):
    def __init__(self, threshold: float = 0.0):
        super().__init__()
        self.threshold = float(threshold)

    def forward(self, displacement: torch.Tensor, grid: Grid) -> torch.Tensor:
        return folding_penalty(displacement, grid, self.threshold)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:g}"


# --------------------------------------------------------------------------- coefficient lattices
def squared_norm(displacement: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Mean over voxels of ``sum_i u_i^2`` (mm^2): :func:`sparsity`'s quadratic counterpart."""
    _check(displacement, grid, differentiate=False)
    return _voxel_mean(displacement.square().sum(dim=1))


class ParameterRegulariser(nn.Module):
    """A penalty on a transform's coefficient lattice instead of its displacement (AirLab's
    ``regulariser.parameter``), called as ``penalty(coefficients, lattice) -> [N]`` with
    ``coefficients [N, D, *lattice.shape]`` and ``lattice`` the knots' Grid (spacing in mm).

    The engine passes ``transform.coefficient_lattice()`` to instances of this class and the
    displacement to every other regulariser. The knots are treated as the voxels of a field, so
    each penalty is the displacement function of the same name on the lattice: one
    implementation, and derivatives in physical units (mm per mm of knot spacing).
    """

    def forward(self, coefficients: torch.Tensor, lattice: Grid) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class CoefficientL1(ParameterRegulariser):
    """Mean over knots of ``sum_i |c_i|``: few active knots (AirLab's parameter sparsity)."""

    def forward(self, coefficients: torch.Tensor, lattice: Grid) -> torch.Tensor:
        return sparsity(coefficients, lattice)


class CoefficientL2(ParameterRegulariser):
    """Mean over knots of ``sum_i c_i^2``: weight decay on the coefficients."""

    def forward(self, coefficients: torch.Tensor, lattice: Grid) -> torch.Tensor:
        return squared_norm(coefficients, lattice)


class CoefficientDiffusion(ParameterRegulariser):
    """:func:`diffusion` of the coefficient lattice (AirLab's parameter ``DiffusionRegulariser``)."""

    def forward(self, coefficients: torch.Tensor, lattice: Grid) -> torch.Tensor:
        return diffusion(coefficients, lattice)


class CoefficientTV(ParameterRegulariser):
    """:func:`total_variation` of the coefficient lattice (AirLab's ``IsotropicTVRegulariser``)."""

    def __init__(self, eps: float = 1e-3):
        super().__init__()
        if not eps > 0:
            raise ValueError(f"eps must be positive (it keeps the gradient finite), got {eps}")
        self.eps = float(eps)

    def forward(self, coefficients: torch.Tensor, lattice: Grid) -> torch.Tensor:
        return total_variation(coefficients, lattice, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}"


class CoefficientTVL1(ParameterRegulariser):
    """:func:`total_variation_l1` of the coefficient lattice (AirLab's anisotropic ``TVRegulariser``)."""

    def forward(self, coefficients: torch.Tensor, lattice: Grid) -> torch.Tensor:
        return total_variation_l1(coefficients, lattice)


# name -> module class; ParameterRegulariser subclasses see the coefficient lattice, the others
# are called as reg(displacement, grid)
REGULARISERS = {
    "diffusion": Diffusion,
    "bending": BendingEnergy,
    "tv": TotalVariation,
    "tv-l1": TotalVariationL1,
    "sparsity": Sparsity,
    "folding": JacobianFolding,
    "coefficients-l1": CoefficientL1,
    "coefficients-l2": CoefficientL2,
    "coefficients-diffusion": CoefficientDiffusion,
    "coefficients-tv": CoefficientTV,
    "coefficients-tv-l1": CoefficientTVL1,
}
