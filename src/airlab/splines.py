"""Interpolation weights and uniform cubic B-splines: basis weights, the per-axis weight
matrices of linear and cubic interpolation (the one home of both), the interpolating prefilter
and evaluation.

Shared by cubic B-spline image interpolation (:func:`bspline_interpolate`, which matches ITK's
``BSplineInterpolateImageFunction`` of order 3 with its mirror boundary) and the B-spline
free-form deformation (:class:`airlab.transforms.BSplineTransform`, whose coefficients are used
directly, as ITK's ``BSplineTransform`` does).

Everything here works on continuous indices in ITK axis order (component ``a`` indexes tensor
axis ``-1 - a``).
"""

from __future__ import annotations

import itertools
import math

import torch

from . import compiled
from .filters import convolve_axis, mirror_index, stencil_axis
from .grid import sample_index

_POLE = math.sqrt(3.0) - 2.0


# The four cubic B-spline weights and their derivatives as polynomials in t, highest power
# first: evaluated together by Horner's rule, three fused multiply-adds over all four instead of
# some twenty operations (each of them a pass, and on a coarse level an operation's overhead)
_WEIGHTS = ((-1 / 6, 1 / 2, -1 / 2, 1 / 6), (1 / 2, -1.0, 0.0, 2 / 3), (-1 / 2, 1 / 2, 1 / 2, 1 / 6), (1 / 6, 0.0, 0.0, 0.0))
_DERIVATIVES = ((-1 / 2, 1.0, -1 / 2), (3 / 2, -2.0, 0.0), (-3 / 2, 1.0, 1 / 2), (1 / 2, 0.0, 0.0))
_COEFFICIENTS: dict = {}


def _horner(t: torch.Tensor, table, dim: int) -> torch.Tensor:
    """The polynomials of ``table`` (one row of coefficients, highest power first, per output)
    at ``t``, stacked along ``dim``. Computed with the outputs first, where each is a contiguous
    run (with them last, a broadcast over four entries made the passes several times slower),
    and moved to ``dim`` as a view."""
    key = (id(table), t.dim(), t.dtype, t.device)
    columns = _COEFFICIENTS.get(key)
    if columns is None:
        shape = (len(table), *([1] * t.dim()))
        columns = _COEFFICIENTS[key] = [torch.tensor([row[k] for row in table], dtype=t.dtype, device=t.device).view(shape)
                                        for k in range(len(table[0]))]
    t = t.unsqueeze(0)
    out = torch.addcmul(columns[1], columns[0], t)
    for c in columns[2:]:
        out = torch.addcmul(c, out, t)
    return out.movedim(0, dim)


def cubic_weights(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Weights ``[..., 4]`` of the four knots ``floor(u) - 1 .. floor(u) + 2`` for ``t = u - floor(u)``
    (stacked along ``dim``): ``(1 - t)^3 / 6``, ``(3 t^3 - 6 t^2 + 4) / 6``, ``(-3 t^3 + 3 t^2 + 3 t
    + 1) / 6`` and ``t^3 / 6``."""
    return _horner(t, _WEIGHTS, dim)


def cubic_derivatives(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``d/dt`` of :func:`cubic_weights` (stacked along ``dim``)."""
    return _horner(t, _DERIVATIVES, dim)


def _map_index(index: torch.Tensor, n: int, boundary: str) -> torch.Tensor:
    if boundary == "mirror":
        return mirror_index(index, n)
    return index.clamp(0, n - 1)  # "border"


def _mirror_padded(coefficients: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The coefficients with two mirrored knots added on every side, and ``index`` folded into
    the grid and shifted onto them: a spline whose knots mirror about the first and the last
    voxel is itself symmetric there, so the folded point has the same value, and every fetch of
    :func:`evaluate` then lies inside the padded grid. ``grid_sample``'s reflection padding costs
    about twice its border padding on the CPU, and the fetches are most of a cubic sample."""
    folded = []
    for a in range(index.shape[-1]):
        last = coefficients.shape[-1 - a] - 1
        m = torch.remainder(index[..., a], 2 * last)
        folded.append(torch.where(m > last, 2 * last - m, m) + 2)
    padded = torch.nn.functional.pad(coefficients, [2] * (2 * index.shape[-1]), mode="reflect")
    return padded, torch.stack(folded, dim=-1)


def evaluate(coefficients: torch.Tensor, index: torch.Tensor, boundary: str = "mirror") -> torch.Tensor:
    """Evaluate a cubic B-spline with ``coefficients [N, C, *S]`` at continuous ``index [N, P, D]``.

    ``boundary`` is ``"mirror"`` (ITK's interpolator) or ``"border"`` (knots beyond the grid
    repeat the edge knot; callers mask such points themselves). Returns ``[N, C, P]``;
    differentiable with respect to both arguments.

    The B-spline weights are positive, so along each axis the four knots pair into two linear
    fetches at shifted positions (Sigg & Hadwiger, GPU Gems 2, ch. 20): ``2**D`` calls of
    ``grid_sample`` instead of ``4**D`` gathers, and the result is the same spline exactly. On
    the CPU, where no gradient is wanted, :mod:`airlab.compiled` reads the knots directly instead.
    """
    if compiled.can_sample_cubic(coefficients, index):
        return compiled.sample_cubic(coefficients, index, boundary)[0]
    return _evaluate_fetches(coefficients, index, boundary)


# Up to this many fetch points (2**D per point) the fetches are one grid_sample call: on a coarse
# level a call's overhead, not its points, is the cost; beyond it the 2**D position sets of a
# fine 3D level would take memory that one set at a time does not
_FUSED_FETCHES = 1 << 18


def _corner_choices(d: int, device) -> list[torch.Tensor]:
    """Per axis, which of its two fetch positions each of the ``2**D`` corners takes (``[2**D]``
    long each, in ``itertools.product`` order), kept per dimension and device."""
    key = (d, str(device))
    if key not in _CORNERS:
        corners = list(itertools.product((0, 1), repeat=d))
        _CORNERS[key] = [torch.tensor([k[a] for k in corners], device=device) for a in range(d)]
    return _CORNERS[key]


_CORNERS: dict = {}


def _evaluate_fetches(coefficients: torch.Tensor, index: torch.Tensor, boundary: str) -> torch.Tensor:
    """:func:`evaluate` by ``2**D`` linear fetches (any device, differentiable)."""
    if boundary == "mirror" and min(coefficients.shape[2:]) > 2:
        coefficients, index = _mirror_padded(coefficients, index)
        boundary = "border"
    floor = torch.floor(index)
    w = cubic_weights(index - floor, dim=0)  # [4, N, P, D]
    g0, g1 = w[0] + w[1], w[2] + w[3]
    positions = (floor - 1 + w[1] / g0, floor + 1 + w[3] / g1)
    weights = (g0, g1)
    n, p, d = index.shape
    corners = list(itertools.product((0, 1), repeat=d))
    if p * len(corners) <= _FUSED_FETCHES:
        # the same fetches and products, the 2**D position sets side by side in one call
        pos = torch.stack([positions[0], positions[1]], dim=1)  # [N, 2, P, D]
        wts = torch.stack([weights[0], weights[1]], dim=1)
        take = _corner_choices(d, index.device)
        pos = torch.stack([pos[..., a].index_select(1, take[a]) for a in range(d)], dim=-1)  # [N, 2**D, P, D]
        weight = wts[..., 0].index_select(1, take[0])
        for a in range(1, d):
            weight = weight * wts[..., a].index_select(1, take[a])
        fetched = sample_index(coefficients, pos.reshape(n, -1, d), boundary).view(n, -1, len(corners), p)
        terms = weight.unsqueeze(1) * fetched  # [N, C, 2**D, P]
        out = terms[:, :, 0]
        for k in range(1, len(corners)):
            out = out + terms[:, :, k]
        return out
    out = None
    for combo in corners:
        pos = torch.stack([positions[k][..., a] for a, k in enumerate(combo)], dim=-1)
        weight = math.prod(weights[k][..., a] for a, k in enumerate(combo))
        term = weight.unsqueeze(1) * sample_index(coefficients, pos, boundary)
        out = term if out is None else out + term
    return out


def linear_axis_weights(position: torch.Tensor, n: int, outside: bool) -> torch.Tensor:
    """``[len(position), n]`` linear interpolation weights at continuous indices along one axis,
    the edge value repeated beyond the ends; rows outside ITK's buffer are zero if ``outside``."""
    clamped = position.clamp(0, n - 1)
    lo = clamped.floor().clamp(max=max(n - 2, 0))
    w = clamped - lo
    rows = torch.arange(len(position), device=position.device)
    out = position.new_zeros(len(position), n)
    lo = lo.long()
    out[rows, lo] = 1 - w
    if n > 1:
        out[rows, lo + 1] += w
    if outside:
        out = out * ((position >= -0.5) & (position < n - 0.5)).unsqueeze(1).to(out.dtype)
    return out


def cubic_axis_weights(positions: torch.Tensor, n: int, boundary: str = "border", valid=None) -> torch.Tensor:
    """Dense ``[len(positions), n]`` matrix of cubic B-spline weights along one axis.

    Row ``j`` holds the weights of the knots that contribute at continuous index
    ``positions[j]``; rows where ``valid`` is false are zero. Evaluating a tensor-product
    spline on a grid aligned with its knots is then one small matrix product per axis.
    """
    floor = torch.floor(positions)
    w = cubic_weights(positions - floor)
    if valid is not None:
        w = w * valid.unsqueeze(-1).to(w.dtype)
    base = floor.long() - 1
    cols = torch.stack([_map_index(base + k, n, boundary) for k in range(4)], dim=-1)
    rows = torch.arange(positions.shape[0], device=positions.device).unsqueeze(-1).expand_as(cols)
    out = positions.new_zeros(positions.shape[0], n)
    return out.index_put((rows.reshape(-1), cols.reshape(-1)), w.reshape(-1), accumulate=True)


def prefilter(data: torch.Tensor) -> torch.Tensor:
    """Interpolating cubic B-spline coefficients of ``data [N, C, *S]`` (mirror boundary).

    The recursive filter of Unser et al. is applied as its exact, symmetric impulse response
    truncated where the pole's powers fall below the dtype's resolution; that keeps it a
    convolution (fast, batched, differentiable, any device) instead of a sequential recursion.
    """
    if not data.is_floating_point():
        data = data.float()
    eps = torch.finfo(data.dtype).eps
    half = int(math.ceil(math.log(eps * 0.1) / math.log(abs(_POLE))))
    k = torch.arange(-half, half + 1, dtype=data.dtype, device=data.device)
    kernel = (-6 * _POLE / (1 - _POLE**2)) * torch.as_tensor(_POLE, dtype=data.dtype) ** k.abs()
    out = data
    for axis in range(2, data.dim()):
        if out.shape[axis] > 1:
            out = convolve_axis(out, kernel, axis, "mirror")
    return out


def bspline_interpolate(data: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Cubic B-spline interpolation of ``data [N, C, *S]`` at continuous ``index [N, P, D]``."""
    return evaluate(prefilter(data), index, boundary="mirror")


def node_gradient(coefficients: torch.Tensor) -> torch.Tensor:
    """The spline's derivatives at the voxels, ``[N, C * D, *S]`` (component ``a`` of channel
    ``c`` at ``c * D + a``; per unit index). At a knot the cubic B-spline's weights are
    ``1/6, 4/6, 1/6`` and those of its derivative ``-1/2, 0, 1/2``: a central difference of the
    coefficients along the axis, smoothed by the former along every other axis (mirror boundary)."""
    d = coefficients.dim() - 2
    parts = []
    for a in range(d):
        out = stencil_axis(coefficients, (-0.5, 0.0, 0.5), coefficients.dim() - 1 - a)
        for b in range(d):
            if b != a:
                out = stencil_axis(out, (1 / 6, 4 / 6, 1 / 6), coefficients.dim() - 1 - b)
        parts.append(out)
    return torch.stack(parts, dim=2).flatten(1, 2)


def cell_range(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(low, high)``, each ``[N, C, *S]``: at voxel ``i`` the least and the greatest value of the
    ``2**D`` voxels ``i .. i + 1`` (the cell whose first corner ``i`` is), beyond the last voxel
    mirrored as :func:`prefilter`'s boundary is (``x[n] = x[n - 2]``). Min and max over a cube
    are separable: one pairwise pass per axis."""
    low = high = data
    for axis in range(2, data.dim()):
        n = data.shape[axis]
        if n < 2:
            continue
        after = torch.cat([torch.arange(1, n), torch.tensor([n - 2])]).to(data.device)
        low = torch.minimum(low, low.index_select(axis, after))
        high = torch.maximum(high, high.index_select(axis, after))
    return low, high


def _at_corner(tables: tuple[torch.Tensor, ...], index: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each ``table [N, C, *S]`` at the voxel ``floor(index)`` (``index [N, P, D]``), clamped into
    the grid as ``"border"`` padding is: ``[N, C, P]`` each, from one flat index. A gather, where
    ``grid_sample`` at integer points costs four times as much."""
    n, c = tables[0].shape[:2]
    size = tables[0].shape[2:][::-1]  # x, y, z
    flat = torch.zeros(index.shape[:2], dtype=torch.long, device=index.device)
    stride = 1
    for axis, extent in enumerate(size):
        # a NaN point (a diverged transform) reads voxel 0, as grid_sample's reads zeros: no error
        corner = torch.nan_to_num(torch.floor(index[..., axis]), nan=0.0).clamp(0, extent - 1)
        flat += corner.long() * stride
        stride *= extent
    flat = flat.unsqueeze(1).expand(n, c, -1)
    return tuple(table.reshape(n, c, -1).gather(2, flat) for table in tables)


class _CubicSample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, index, coefficients, gradient, boundary, low, high):
        if compiled.can_sample_cubic(coefficients, index):
            # values, clamp and slope in one pass over the points
            bounds = (low, high) if low is not None else None
            slope_from = gradient if ctx.needs_input_grad[0] else None
            out, kept, slope = compiled.sample_cubic(coefficients, index, boundary, bounds, slope_from)
            ctx.save_for_backward(index, gradient, kept, slope)
            return out
        out = _evaluate_fetches(coefficients, index, boundary)
        kept = None
        if low is not None:
            # the cell's first corner; before the grid's first cell "border" gives the first
            # cell's range (such points are outside the image and weigh nothing in a loss)
            lo, hi = _at_corner((low, high), index)
            kept = (out >= lo) & (out <= hi)
            out = torch.minimum(torch.maximum(out, lo), hi)
        ctx.save_for_backward(index, gradient, kept, None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        index, gradient, kept, slope = ctx.saved_tensors
        n, c, p = grad_out.shape
        d = index.shape[-1]
        if kept is not None:
            grad_out = grad_out * kept.to(grad_out.dtype)  # a clamped value is flat in the point
        if slope is None:
            slope = sample_index(gradient, index, "border").reshape(n, c, d, p)
        return (grad_out.unsqueeze(2) * slope).sum(1).transpose(1, 2), None, None, None, None, None


def sample_cubic(coefficients: torch.Tensor, gradient: torch.Tensor, index: torch.Tensor,
                 boundary: str = "mirror", bounds: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """:func:`evaluate` for an image sampled at moving points many times (registration): the same
    values, and as the gradient with respect to ``index`` the spline's derivatives at the voxels
    (:func:`node_gradient`, computed once) interpolated linearly. Differentiating the eight
    fetches of :func:`evaluate` costs ten times a linear sample's forward and backward; this
    costs one more fetch. No gradient flows to the coefficients.

    ``bounds``: the image's :func:`cell_range`. Each value is then clamped to the range of the
    ``2**D`` voxels around its point, where its gradient is zero. An interpolating cubic rings
    beside a hard edge (a masked template's border) with values the image does not hold, which a
    similarity measure reads as anatomy; elsewhere the values are the spline's.
    """
    low, high = bounds if bounds is not None else (None, None)
    return _CubicSample.apply(index, coefficients, gradient, boundary, low, high)
