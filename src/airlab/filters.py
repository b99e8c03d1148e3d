"""The numeric tools on image tensors ``[N, C, *spatial]``, one copy of each: 1D kernels (Gaussian,
box), their banded convolution matrices, separable products with one matrix per axis (filtering
and separable interpolation), Gaussian smoothing in voxels or mm, and finite-difference
gradients along the index axes or in physical units."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .grid import Grid

__all__ = ["apply_axis_weights", "box_kernel", "convolution_matrix", "convolve_axis", "gaussian_kernel",
           "gaussian_operators", "gaussian_smooth", "index_gradient", "mirror_index", "physical_gradient", "smooth_mm",
           "spatial_gradient", "stencil_axis"]


def gaussian_kernel(sigma: float, truncate: float = 3.0, dtype=None, device=None, *,
                    radius: int | None = None) -> torch.Tensor:
    """Normalised 1D Gaussian with standard deviation ``sigma`` (voxels), ``radius`` taps either
    side (default ``ceil(truncate * sigma)``, at least 1)."""
    if radius is None:
        radius = max(int(math.ceil(truncate * sigma)), 1)
    x = torch.arange(-radius, radius + 1, dtype=dtype or torch.get_default_dtype(), device=device)
    k = torch.exp(-0.5 * (x / sigma).square())
    return k / k.sum()


def box_kernel(radius: int, dtype=None, device=None) -> torch.Tensor:
    """Normalised 1D box of ``2 radius + 1`` taps."""
    k = torch.ones(2 * radius + 1, dtype=dtype or torch.get_default_dtype(), device=device)
    return k / k.sum()


def convolution_matrix(kernel: torch.Tensor, n: int, padding: str = "replicate") -> torch.Tensor:
    """``[n, n]`` banded matrix of the convolution with ``kernel`` (odd length, centred) along an
    axis of ``n`` samples. ``padding="replicate"`` folds the taps beyond the ends into the edge
    columns (no intensity loss at the borders); ``"zeros"`` drops them (for weighted window sums,
    where voxels beyond the border carry no weight)."""
    if padding not in ("replicate", "zeros"):
        raise ValueError(f"unknown padding {padding!r}; choose 'replicate' or 'zeros'")
    r = kernel.numel() // 2
    rows = torch.arange(n, device=kernel.device).view(-1, 1)
    cols = rows + torch.arange(-r, r + 1, device=kernel.device)
    taps = kernel.expand(n, -1)
    if padding == "zeros":
        taps = torch.where((cols >= 0) & (cols < n), taps, torch.zeros_like(taps))
    cols = cols.clamp(0, n - 1)
    return kernel.new_zeros(n, n).index_put((rows.expand_as(cols).reshape(-1), cols.reshape(-1)),
                                            taps.reshape(-1), accumulate=True)


def _along(data: torch.Tensor, matrix: torch.Tensor, axis: int) -> torch.Tensor:
    if axis % data.dim() == data.dim() - 1:  # the last axis: the same product, without the moves
        return (data.reshape(-1, data.shape[-1]) @ matrix.T).view(*data.shape[:-1], matrix.shape[0])
    moved = torch.movedim(data, axis, -1)
    # one flat matrix product: matmul would otherwise batch many tiny products over the moved
    # (non-contiguous) axes, several times slower on CPU, forward and backward
    flat = moved.reshape(-1, moved.shape[-1]) @ matrix.T
    return torch.movedim(flat.view(*moved.shape[:-1], matrix.shape[0]), -1, axis)


def apply_axis_weights(data: torch.Tensor, matrices: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Contract ``data [N, C, *S]`` with one ``[out, in]`` matrix per axis (ITK order; ``None``
    leaves an axis alone): separable filtering and separable interpolation alike.

    On CPU a product with a banded matrix is several times faster than ``conv1d`` or ``conv3d``
    with a 1D-shaped kernel at the sizes of a pyramid (whose backward is slower still), and on
    CUDA it runs in full float32 by default, whereas cuDNN convolutions default to TF32, too
    coarse for the ``E[x^2] - E[x]^2`` of local moments.
    """
    out = data
    for a, m in enumerate(matrices):
        if m is not None:
            out = _along(out, m, out.dim() - 1 - a)
    return out


def mirror_index(index: torch.Tensor, n: int) -> torch.Tensor:
    """Whole-sample mirror boundary (``x[-k] = x[k]``, ``x[n-1+k] = x[n-1-k]``), any distance."""
    if n == 1:
        return torch.zeros_like(index)
    period = 2 * (n - 1)
    m = torch.remainder(index, period)
    return torch.where(m >= n, period - m, m)


def convolve_axis(data: torch.Tensor, kernel: torch.Tensor, axis: int, padding: str = "replicate") -> torch.Tensor:
    """Convolve along one tensor axis with a centred, odd-length ``kernel`` (``conv1d``: for
    kernels too long or axes too long for a banded matrix), the data extended beyond its ends
    by ``padding``: ``"replicate"`` or ``"mirror"`` (:func:`mirror_index`, any distance)."""
    moved = torch.movedim(data, axis, -1)
    n, r = moved.shape[-1], kernel.numel() // 2
    index = torch.arange(-r, n + r, device=data.device)
    index = mirror_index(index, n) if padding == "mirror" else index.clamp(0, n - 1)
    padded = moved.reshape(-1, 1, n)[..., index]
    out = F.conv1d(padded, kernel.view(1, 1, -1))
    return torch.movedim(out.reshape(moved.shape), -1, axis)


def stencil_axis(data: torch.Tensor, weights: Sequence[float], axis: int, padding: str = "mirror") -> torch.Tensor:
    """:func:`convolve_axis` for a short stencil of plain numbers, such as ``(-0.5, 0, 0.5)``: a
    few multiply-adds per sample, zero weights skipped; on CPU four times faster than ``conv1d``."""
    n, r = data.shape[axis], len(weights) // 2
    index = torch.cat((torch.arange(-r, 0, device=data.device), torch.arange(n, n + r, device=data.device)))
    index = mirror_index(index, n) if padding == "mirror" else index.clamp(0, n - 1)
    ends = data.index_select(axis, index)
    # a copy of the inside and a gather of the few outside samples: gathering all is twice as slow
    padded = torch.cat((ends.narrow(axis, 0, r), data, ends.narrow(axis, r, r)), axis)
    return sum(w * padded.narrow(axis, k, n) for k, w in enumerate(weights) if w)


def gaussian_operators(size: Sequence[int], sigma: Sequence[float] | float, truncate: float = 3.0, dtype=None,
                       device=None) -> list[torch.Tensor | None]:
    """What :func:`gaussian_smooth` applies along each axis of an image of ``size`` (ITK order):
    ``None`` (sigma 0), the banded ``[n, n]`` matrix, or, along axes too long for one, the 1D
    kernel. A caller that smooths images of one size many times builds them once."""
    d = len(size)
    sigma = [float(sigma)] * d if isinstance(sigma, (int, float)) else [float(s) for s in sigma]
    if len(sigma) != d:
        raise ValueError(f"{len(sigma)} sigmas for a {d}D image")
    operators = []
    for n, s in zip(size, sigma):
        kernel = gaussian_kernel(s, truncate, dtype, device) if s > 0 else None
        # the banded matrix does n instead of 2r + 1 multiplications per sample, hence the limit
        if kernel is not None and n <= max(256, 16 * kernel.numel()):
            kernel = convolution_matrix(kernel, n)
        operators.append(kernel)
    return operators


def gaussian_smooth(data: torch.Tensor, sigma: Sequence[float] | float, truncate: float = 3.0, *,
                    operators: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Gaussian smoothing with ``sigma`` in voxels per axis (ITK order); 0 leaves an axis alone.
    ``operators``: :func:`gaussian_operators` of this size, sigma, dtype and device, built earlier."""
    if not data.is_floating_point():
        data = data.to(torch.get_default_dtype())
    if operators is None:
        operators = gaussian_operators(data.shape[2:][::-1], sigma, truncate, data.dtype, data.device)
    out = data
    for a, op in enumerate(operators):
        if op is not None:
            axis = out.dim() - 1 - a
            out = _along(out, op, axis) if op.dim() == 2 else convolve_axis(out, op, axis)
    return out


def smooth_mm(data: torch.Tensor, grid: Grid, sigma_mm: float, truncate: float = 3.0) -> torch.Tensor:
    """Gaussian smoothing with a physical ``sigma_mm`` on ``grid``."""
    if sigma_mm <= 0:
        return data if data.is_floating_point() else data.to(torch.get_default_dtype())
    return gaussian_smooth(data, [sigma_mm / s for s in grid.spacing], truncate)


def _differences_into(x: torch.Tensor, dim: int, scale: float, edge_order: int, out: torch.Tensor) -> None:
    """:func:`index_gradient` of ``x`` along ``dim`` written into ``out`` (a view of x's shape):
    central differences inside, and at each end the difference with the extrapolated sample,
    computed as the padded form computes it, so the numbers are the same to the bit."""
    n = x.shape[dim]
    torch.sub(x.narrow(dim, 2, n - 2), x.narrow(dim, 0, n - 2), out=out.narrow(dim, 1, n - 2))
    x0, x1 = x.narrow(dim, 0, 1), x.narrow(dim, 1, 1)
    y0, y1 = x.narrow(dim, n - 1, 1), x.narrow(dim, n - 2, 1)
    if edge_order == 1:
        before, after = 2 * x0 - x1, 2 * y0 - y1
    else:
        before = 3 * (x0 - x1) + x.narrow(dim, 2, 1)
        after = 3 * (y0 - y1) + x.narrow(dim, n - 3, 1)
    torch.sub(x1, before, out=out.narrow(dim, 0, 1))
    torch.sub(after, y1, out=out.narrow(dim, n - 1, 1))
    out.mul_(scale)


def _differences_adjoint_into(g: torch.Tensor, dim: int, scale: float, edge_order: int, out: torch.Tensor,
                              accumulate: bool) -> None:
    """The adjoint of :func:`_differences_into` applied to ``g``, written (or added) into ``out``."""
    n = g.shape[dim]
    part = torch.empty_like(out) if accumulate else out
    # the padded form's central differences, read back: z[k] = g[k - 2] - g[k] on the n + 2
    # padded samples, of which the inner n are the field's own
    torch.sub(g.narrow(dim, 0, n - 2), g.narrow(dim, 2, n - 2), out=part.narrow(dim, 1, n - 2))
    torch.neg(g.narrow(dim, 1, 1), out=part.narrow(dim, 0, 1))
    part.narrow(dim, n - 1, 1).copy_(g.narrow(dim, n - 2, 1))
    first, last = -g.narrow(dim, 0, 1), g.narrow(dim, n - 1, 1)  # the two extrapolated samples'
    taps = (2.0, -1.0) if edge_order == 1 else (3.0, -3.0, 1.0)
    for k, w in enumerate(taps):
        part.narrow(dim, k, 1).add_(first, alpha=w)
        part.narrow(dim, n - 1 - k, 1).add_(last, alpha=w)
    if accumulate:
        out.add_(part, alpha=scale)
    else:
        out.mul_(scale)


class _Differences(torch.autograd.Function):
    """Finite differences of ``field`` along several ``dims``, stacked at ``axis`` (or, with
    ``axis`` None, along one dim in field's shape). Written into one output, with the adjoint
    written out for the backward pass: autograd through the padding, the concatenation and the
    slices of the padded form made about three times the passes over the field and filled a
    zero buffer per slice (docs/architecture.md, "Regularisers: differences with a written
    adjoint")."""

    @staticmethod
    def forward(ctx, field, dims, scales, edge_order, axis):
        ctx.dims, ctx.scales, ctx.edge_order, ctx.axis = dims, scales, edge_order, axis
        ctx.shape = field.shape
        if axis is None:
            out = torch.empty(field.shape, dtype=field.dtype, device=field.device)
            _differences_into(field, dims[0], scales[0], edge_order, out)
            return out
        shape = list(field.shape)
        shape.insert(axis, len(dims))
        out = torch.empty(shape, dtype=field.dtype, device=field.device)
        for k, (dim, scale) in enumerate(zip(dims, scales)):
            _differences_into(field, dim, scale, edge_order, out.select(axis, k))
        return out

    @staticmethod
    def backward(ctx, grad):
        out = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device)
        if ctx.axis is None:
            _differences_adjoint_into(grad, ctx.dims[0], ctx.scales[0], ctx.edge_order, out, False)
        else:
            for k, (dim, scale) in enumerate(zip(ctx.dims, ctx.scales)):
                _differences_adjoint_into(grad.select(ctx.axis, k), dim, scale, ctx.edge_order, out, k > 0)
        return out, None, None, None, None


def _check_differences(field: torch.Tensor, dim: int, edge_order: int) -> None:
    if edge_order not in (1, 2):
        raise ValueError(f"edge_order must be 1 or 2, got {edge_order}")
    if field.shape[dim] < edge_order + 1:
        raise ValueError(f"differences of order {edge_order} need {edge_order + 1} samples along the axis, "
                         f"got {field.shape[dim]}")


def index_gradient(field: torch.Tensor, dim: int, spacing: float = 1.0, edge_order: int = 2) -> torch.Tensor:
    """``torch.gradient(field, spacing=spacing, dim=dim, edge_order=edge_order)[0]`` in a few
    operations.

    Extending the field by one extrapolated sample at each end (linear, ``x[-1] = 2 x[0] - x[1]``,
    or quadratic, ``x[-1] = 3 x[0] - 3 x[1] + x[2]``) turns the one-sided border differences into
    central ones. ``torch.gradient`` builds the borders and the inside separately: about ten
    times the operations, forward and backward, which dominates a regulariser on the coarse
    grids where it is evaluated. The backward pass is the operator's adjoint, written out
    (:class:`_Differences`).
    """
    dim = dim % field.dim()
    _check_differences(field, dim, edge_order)
    return _Differences.apply(field, (dim,), (0.5 / spacing,), edge_order, None)


def physical_gradient(field: torch.Tensor, grid: Grid, rotate: bool = True, edge_order: int = 2) -> torch.Tensor:
    """``d field_c / dx_j`` of ``field [N, C, *grid.shape]`` as ``[N, C, D, *shape]`` (per mm, ITK
    component order), by :func:`index_gradient` along the index axes and the chain rule through
    direction and spacing: exact on oblique and anisotropic grids.

    ``rotate=False`` differentiates along the grid axes in mm instead: the same up to the
    rotation of the grid's (orthonormal) direction, which norms over ``j`` do not see.
    """
    d = grid.ndim
    # tensor axis d + 1 - a is ITK index axis a
    dims = tuple(d + 1 - a for a in range(d))
    for dim in dims:
        _check_differences(field, dim, edge_order)
    if not rotate:
        return _Differences.apply(field, dims, tuple(0.5 / float(grid.spacing[a]) for a in range(d)), edge_order, 2)
    by_index = _Differences.apply(field, dims, (0.5,) * d, edge_order, 2)
    m_inv = torch.as_tensor(grid.physical_to_index_matrix()[:d, :d], dtype=field.dtype, device=field.device)
    return torch.einsum("nca...,aj->ncj...", by_index, m_inv)


def spatial_gradient(data: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Physical gradient (per mm, ITK component order) of every channel: ``[N, C * D, *shape]``,
    channel-major (``[c0/dx, c0/dy, ..., c1/dx, ...]``). Central differences inside, one-sided
    (first order) at the border; correct on oblique grids."""
    return physical_gradient(data, grid, edge_order=1).flatten(1, 2)
