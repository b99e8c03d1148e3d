"""Image similarity losses for registration.

Every loss is a pure function of ``fixed`` and ``moving`` (``[N, C, *spatial]``, 2D or 3D, the
same shape) and returns one value per batch element, a tensor ``[N]`` that registration
*minimises*. Multi-channel images give the mean of the per-channel values. Everything follows the
inputs' device and dtype, and one code path serves 2D and 3D.

What a mask means
-----------------
``weight`` (``[N or 1, 1, *spatial]``, values in ``[0, 1]``) says how much each voxel counts. The
engine passes the product of the fixed mask, the warped moving mask and an "inside the moving
image" indicator, so a fractional value is a partially valid voxel. A voxel of weight 0 is
ignored: every statistic (means, variances, local window sums, histograms, intensity ranges) is a
weighted sum, so changing the images where the weight is 0 changes nothing. The one exception is
NGF, whose image gradients are central differences: a voxel inside the mask looks one voxel
beyond it. A weight that is zero everywhere (for any batch element) is an error: the loss would be
undefined, and silently returning 0 or NaN would hide an empty overlap.

NaN and infinite inputs are not checked here (that would cost a device synchronisation on every
call); the engine validates its images once.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import compiled
from .filters import apply_axis_weights, box_kernel, convolution_matrix, gaussian_kernel, index_gradient
from .spatial import Grid
from .splines import cubic_derivatives, cubic_weights

__all__ = [
    "mse",
    "ncc",
    "lncc",
    "mutual_information",
    "nmi",
    "ngf",
    "ssim",
    "landmark_distance",
    "MSE",
    "NCC",
    "LNCC",
    "MutualInformation",
    "NMI",
    "NGF",
    "SSIM",
    "LOSSES",
]

LNCC_KERNELS = ("box", "gaussian")


# --------------------------------------------------------------------------- shared helpers
def _spatial_dims(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, x.dim()))


def _per_channel(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View a per-(batch, channel) tensor ``[N, C]`` so it broadcasts against ``like``."""
    return x.view(*x.shape, *([1] * (like.dim() - 2)))


def _prepare(fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor | None):
    """Validate the inputs and return them as floats, plus the weight's sum per batch element.

    Returns ``(fixed, moving, weight, weight_sum)``; ``weight`` and ``weight_sum`` (``[N or 1, 1]``)
    are ``None`` when no weight is given, so the unweighted path costs no extra multiplications.
    """
    if fixed.shape != moving.shape:
        raise ValueError(
            f"fixed and moving must have the same shape, got fixed {tuple(fixed.shape)} "
            f"and moving {tuple(moving.shape)}"
        )
    if moving.dim() not in (4, 5):
        raise ValueError(
            f"images must be [N, C, H, W] or [N, C, D, H, W], got shape {tuple(moving.shape)}"
        )
    dtype = torch.promote_types(fixed.dtype, moving.dtype)
    if not dtype.is_floating_point:  # integer images (labels, raw scanner data) are welcome
        dtype = torch.get_default_dtype()
    fixed, moving = fixed.to(dtype), moving.to(dtype)
    if weight is None:
        return fixed, moving, None, None
    n, spatial = moving.shape[0], tuple(moving.shape[2:])
    if (
        weight.dim() != moving.dim()
        or weight.shape[1] != 1
        or weight.shape[0] not in (1, n)
        or tuple(weight.shape[2:]) != spatial
    ):
        expected = ", ".join(map(str, spatial))
        raise ValueError(
            f"weight must have shape [{n} or 1, 1, {expected}] to match images of shape "
            f"{tuple(moving.shape)}, got {tuple(weight.shape)}"
        )
    weight = weight.to(dtype)  # boolean masks are welcome
    weight_sum = weight.sum(_spatial_dims(weight))
    # One synchronisation per call, but an empty overlap must not pass silently.
    if not bool((weight_sum > 0).all()):
        empty = torch.nonzero(weight_sum.flatten() <= 0).flatten().tolist()
        raise ValueError(f"the mask is empty (all weights are zero) for batch element(s) {empty}")
    return fixed, moving, weight, weight_sum


def _mean(x: torch.Tensor, weight: torch.Tensor | None, weight_sum: torch.Tensor | None) -> torch.Tensor:
    """Weighted spatial mean of ``x [N, C, *S]`` -> ``[N, C]``."""
    if weight is None:
        return x.mean(_spatial_dims(x))
    return (x * weight).sum(_spatial_dims(x)) / weight_sum


def _check_grid(grid: Grid | None, moving: torch.Tensor) -> None:
    if grid is not None and tuple(grid.shape) != tuple(moving.shape[2:]):
        raise ValueError(
            f"grid of shape {grid.shape} does not match images of shape {tuple(moving.shape)}"
        )


def _per_axis(value, d: int, name: str) -> tuple:
    """A scalar, or a sequence of ``d`` values in ITK order -> tuple of ``d`` values (ITK order)."""
    if isinstance(value, numbers.Number):
        return (value,) * d
    values = tuple(value)
    if len(values) != d:
        raise ValueError(f"{name} needs one value per axis of the {d}D image, got {values!r}")
    return values


# --------------------------------------------------------------------------- MSE and NCC
def mse(fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean of squared intensity differences, ``[N]``."""
    fixed, moving, weight, weight_sum = _prepare(fixed, moving, weight)
    return _mean((fixed - moving).square(), weight, weight_sum).mean(1)


def ncc(
    fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """``1 - NCC``: one minus the global (weighted) normalised cross-correlation, ``[N]``.

    ``NCC = cov(f, m) / sqrt(var(f) var(m) + eps)`` with weighted moments, so the loss runs from
    0 (``m = a f + b`` with ``a > 0``) to 2 (``a < 0``). ``eps`` is absolute, in the units of
    ``var(f) var(m)`` (intensity^4), and only keeps a constant image finite (its NCC is 0).
    """
    fixed, moving, weight, weight_sum = _prepare(fixed, moving, weight)
    # Centre first (two passes) rather than E[fm] - E[f]E[m]: the latter cancels badly in float32
    # for images with a large mean.
    df = fixed - _per_channel(_mean(fixed, weight, weight_sum), fixed)
    dm = moving - _per_channel(_mean(moving, weight, weight_sum), moving)
    cov = _mean(df * dm, weight, weight_sum)
    var_f = _mean(df.square(), weight, weight_sum)
    var_m = _mean(dm.square(), weight, weight_sum)
    return 1 - (cov / torch.sqrt(var_f * var_m + eps)).mean(1)


# --------------------------------------------------------------------------- LNCC
def _lncc_window(radius: int, kernel: str, dtype, device) -> torch.Tensor | None:
    """Normalised 1D window of length ``2 r + 1`` (``None`` for ``r = 0``: no smoothing)."""
    if radius == 0:
        return None
    if kernel == "box":
        return box_kernel(radius, dtype, device)
    return gaussian_kernel(radius / 2.0, dtype=dtype, device=device, radius=radius)  # truncated at 2 sigma


def _standardise(x: torch.Tensor, weight, weight_sum) -> torch.Tensor:
    """Subtract the weighted mean and divide by the weighted standard deviation (per channel)."""
    mean = _mean(x, weight, weight_sum)
    x = x - _per_channel(mean, x)
    var = _mean(x.square(), weight, weight_sum)
    # A constant image leaves only rounding noise of order eps * |mean| after centring; scaling
    # that up to unit variance would invent structure, so such an image is left at zero.
    noise = (16 * torch.finfo(x.dtype).eps * mean.detach().abs()).square()
    std = torch.where(var > noise, var, torch.ones_like(var)).sqrt()
    return x / _per_channel(std, x)


def lncc(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    radius,
    kernel: str = "box",
    eps: float = 1e-5,
) -> torch.Tensor:
    """Local normalised cross-correlation, ``1 - mean(cc)``, ``[N]``.

    ``cc = cov^2 / (var_f var_m + eps)`` (ANTs' squared convention: anti-correlation counts as a
    match, and the loss is 0 only where both images are locally affine in each other) with local
    weighted moments over a window centred at each voxel:

    - ``radius``: window half-width in voxels, an int or one int per axis in ITK order (x, y, z);
      0 on an axis means no extent along it;
    - ``kernel="box"``: a ``(2 r + 1)`` box, as ANTs' CC; ``"gaussian"``: a Gaussian of
      ``sigma = r / 2`` truncated at ``r`` (two sigmas), so both kernels have the same support
      and the Gaussian emphasises the centre.

    Local moments are ratios of weighted window sums, ``sum(k w x) / sum(k w)``, so masked-out
    voxels and voxels beyond the border do not enter any window; the final mean is weighted by
    ``weight``. Each image is first standardised by its global weighted mean and standard deviation:
    that keeps ``E[x^2] - E[x]^2`` accurate in float32 for images with large intensities, and makes
    ``eps`` relative (variances are in units of the image's global variance), so the same ``eps``
    suits CT in HU and MR in [0, 1]. LNCC is invariant to that scaling except through ``eps``.
    Windows with (relative) local variance product well below ``eps`` -- flat regions -- give
    ``cc ~ 0``, as in ANTs.

    The windows are applied as separable 1D convolutions, one axis at a time (banded matrices,
    :func:`airlab.filters.apply_axis_weights`).
    """
    fixed, moving, weight, weight_sum = _prepare(fixed, moving, weight)
    if kernel not in LNCC_KERNELS:
        raise ValueError(f"unknown LNCC kernel {kernel!r}; choose from {LNCC_KERNELS}")
    d = moving.dim() - 2
    radii = _per_axis(radius, d, "radius")
    if not all(isinstance(r, numbers.Integral) and not isinstance(r, bool) and r >= 0 for r in radii):
        raise ValueError(f"radius must be non-negative integers (voxels), got {radius!r}")
    windows = [_lncc_window(int(r), kernel, moving.dtype, moving.device) for r in radii]

    f = _standardise(fixed, weight, weight_sum)
    m = _standardise(moving, weight, weight_sum)
    _, _, var_f, var_m, cov = _local_moments(f, m, weight, windows)
    cc = cov.square() / (var_f * var_m + eps)
    return 1 - _mean(cc, weight, weight_sum).mean(1)


def _local_moments(f: torch.Tensor, m: torch.Tensor, weight, windows):
    """Weighted local means, variances and covariance of ``f, m [N, C, *S]`` over ``windows``
    (one 1D window or ``None`` per axis, ITK order).

    Each moment is a ratio of window sums, ``sum(k w x) / sum(k w)``, so voxels of weight 0 and
    voxels beyond the border enter no window. Returns ``(mean_f, mean_m, var_f, var_m, cov)``.
    """
    n, c, spatial = f.shape[0], f.shape[1], f.shape[2:]
    # zero padding: voxels beyond the border carry no weight, so windows are truncated there
    matrices = [None if k is None else convolution_matrix(k, size, "zeros") for k, size in zip(windows, spatial[::-1])]
    w = weight if weight is not None else f.new_ones((1, 1, *spatial))
    # Local weight; positive wherever w is, since every window contains its centre voxel.
    tiny = torch.finfo(f.dtype).eps ** 2  # only guards windows with no weight at all
    local_w = apply_axis_weights(w, matrices).clamp_min(tiny).unsqueeze(2)  # [Nw, 1, 1, *S]
    wf, wm = w * f, w * m
    sums = torch.stack((wf, wm, wf * f, wm * m, wf * m), dim=2)  # [N, C, 5, *S]
    local = apply_axis_weights(sums.reshape(n * c * 5, 1, *spatial), matrices)
    mean_f, mean_m, ff, mm, fm = (local.view(n, c, 5, *spatial) / local_w).unbind(2)
    var_f = (ff - mean_f.square()).clamp_min(0)  # rounding can push a flat window below 0
    var_m = (mm - mean_m.square()).clamp_min(0)
    return mean_f, mean_m, var_f, var_m, fm - mean_f * mean_m


# --------------------------------------------------------------------------- mutual information
def _bin_range(x: torch.Tensor, weight, bins: int, value_range) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, scale)``, each ``[N, C, 1]`` (or scalars for a given range), of
    :func:`_bin_coordinates`: ``u = 1 + (x - lo) * scale``. Without gradient: the range is a
    binning choice, not something to optimise."""
    with torch.no_grad():
        if value_range is None:
            xd = x.detach()
            if weight is None:
                lo, hi = xd.amin(-1, keepdim=True), xd.amax(-1, keepdim=True)
            else:
                inside = weight > 0
                lo = torch.where(inside, xd, math.inf).amin(-1, keepdim=True)
                hi = torch.where(inside, xd, -math.inf).amax(-1, keepdim=True)
        else:
            lo, hi = (torch.as_tensor(v, dtype=x.dtype, device=x.device) for v in value_range)
        width = hi - lo
        # a constant image puts everything in one place (and has zero entropy contribution)
        scale = torch.where(width > 0, (bins - 3) / width, torch.zeros_like(width))
    return lo, scale


def _bin_coordinates(x: torch.Tensor, weight, bins: int, value_range) -> torch.Tensor:
    """Continuous bin coordinates ``u`` in ``[1, bins - 2]`` for ``x [N, C, V]``.

    ``[min, max]`` (over voxels of positive weight, per batch element and channel, or the given
    range) maps linearly onto ``[1, bins - 2]``: the cubic B-spline centred at ``u`` then touches
    bins ``floor(u) - 1 .. floor(u) + 2``, all inside ``[0, bins - 1]``, so no mass is lost at the
    ends. Values outside a given range are clamped into the end bins (no gradient there).
    """
    lo, scale = _bin_range(x, weight, bins, value_range)
    return (1 + (x - lo) * scale).clamp(1, bins - 2)


def _parzen(u: torch.Tensor, bins: int):
    """First touched bin (``long``) and the offset ``t = u - knot`` in ``[0, 1]`` whose cubic
    B-spline weights (:func:`cubic_weights`) spread ``u`` over 4 bins."""
    # Clamping the knot to bins - 3 lets u = bins - 2 use t = 1 (same spline value, last weight 0)
    # instead of touching a bin past the end.
    knot = torch.floor(u.detach()).clamp(1, bins - 3)
    return (knot - 1).long(), u - knot


# Voxels per scatter or gather: the [16, voxels] float64 terms (4 MB) stay in cache (32k voxels
# measured 1.5-2x faster than 256k)
_HISTOGRAM_SLICE = 1 << 15


class _JointHistogram(torch.autograd.Function):
    """``[histograms, bins, bins]`` Parzen joint histogram in ``acc`` precision.

    ``first [V]``: flat index of each voxel's first touched (histogram, fixed, moving) bin on the
    ``(bins - 3) x (bins - 3)`` lattice of first bins; ``wf [4, V]``: the fixed Parzen weights;
    ``tm [V]``: the moving offsets, whose weights are ``wm = cubic_weights(tm)``. A voxel adds
    ``wf[a] * wm[b]`` to bin ``first + (a, b)``.

    The 16 offsets are the 16 rows of one ``scatter_add`` (3x faster than an ``index_add`` per
    offset, which runs on one thread); ``fold`` adds each row's 4 x 4 blocks into place.
    Accumulating in float64 keeps a bin that collects millions of identical contributions (a
    uniform background) exact without chunked partial sums. The gradient is written out: each
    voxel gathers its 4 x 4 block of ``dL/djoint`` and contracts it with the other side's
    weights, where autograd would keep and reduce [16, V] float64 products and differentiate the
    spline weights op by op. On the CPU, for a level of many voxels, both directions are one
    compiled pass over the voxels instead (:func:`airlab.compiled.parzen_joint`).
    """

    @staticmethod
    def forward(ctx, wf, tm, first, histograms: int, bins: int, acc: torch.dtype):
        ctx.histograms, ctx.bins = histograms, bins
        ctx.compiled = acc == torch.float64 and compiled.can_histogram(wf, tm)
        if ctx.compiled:
            ctx.save_for_backward(wf, tm, first, None)
            return compiled.parzen_joint(wf, tm, first, histograms, bins)
        wm = cubic_weights(tm, dim=0)
        ctx.save_for_backward(wf, tm, first, wm)  # wm for the backward pass: kept, not computed again
        lattice = histograms * (bins - 3) ** 2
        rows = torch.zeros(16, lattice, dtype=acc, device=wm.device)
        for lo in range(0, first.shape[0], _HISTOGRAM_SLICE):
            part = slice(lo, lo + _HISTOGRAM_SLICE)
            src = (wf[:, None, part].to(acc) * wm[None, :, part].to(acc)).reshape(16, -1)
            rows.scatter_add_(1, first[part].expand(16, -1), src)
        blocks = rows.view(16, histograms, -1).transpose(0, 1)  # [histograms, 4 x 4 offsets, first bins]
        return F.fold(blocks, (bins, bins), kernel_size=4).view(histograms, bins, bins)

    @staticmethod
    def backward(ctx, grad):
        wf, tm, first, wm = ctx.saved_tensors
        h, bins = ctx.histograms, ctx.bins
        if ctx.compiled:
            grads = compiled.parzen_joint_grad(wf, tm, first, bins, grad, *ctx.needs_input_grad[:2])
            return *grads, None, None, None, None
        # unfold is fold's adjoint: dL/d(row of offset (a, b)) at each first bin
        blocks = F.unfold(grad.reshape(h, 1, bins, bins).to(tm.dtype), kernel_size=4)  # [h, 16, first bins]
        rows = blocks.transpose(0, 1).reshape(16, -1)
        grad_wf = torch.empty_like(wf) if ctx.needs_input_grad[0] else None
        grad_tm = torch.empty_like(tm) if ctx.needs_input_grad[1] else None
        for lo in range(0, first.shape[0], _HISTOGRAM_SLICE):
            part = slice(lo, lo + _HISTOGRAM_SLICE)
            g = rows.gather(1, first[part].expand(16, -1)).view(4, 4, -1)  # [a, b, voxels]
            if grad_tm is not None:
                grad_wm = (g * wf[:, None, part]).sum(0)
                torch.sum(grad_wm * cubic_derivatives(tm[part], dim=0), 0, out=grad_tm[part])
            if grad_wf is not None:
                torch.sum(g * wm[None, :, part], 1, out=grad_wf[:, part])
        return grad_wf, grad_tm, None, None, None, None


def _validate_range(value_range, name: str):
    if value_range is None:
        return None
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"{name} must be (low, high) with high > low, got {tuple(value_range)!r}")
    return lo, hi


def mutual_information(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    bins: int = 32,
    normalized: bool = False,
    fixed_range: tuple[float, float] | None = None,
    moving_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Parzen-window (Mattes) mutual information: ``-MI``, or ``-NMI`` if ``normalized``; ``[N]``.

    Each voxel adds its weight to the joint histogram spread over ``4 x 4`` bins by the outer
    product of cubic B-spline kernels of its fixed and moving bin coordinates (see
    :func:`_bin_coordinates`; ranges are computed without gradient). Marginals are the joint's
    row and column sums, ``MI = H(F) + H(M) - H(F, M)`` and ``NMI = (H(F) + H(M)) / H(F, M)``
    (natural logarithms). Because of the Parzen smoothing, ``MI(x, x)`` is a little below
    ``H(x)`` and ``NMI(x, x)`` below 2.

    The histogram is accumulated in float64 by one ``scatter_add`` per slice of voxels, with a
    hand-written gradient (see :class:`_JointHistogram`); memory is O(voxels).
    Gradients reach ``moving`` (and ``fixed``, if it requires them) through the B-spline weights.
    Histograms are per batch element and channel.
    """
    if not isinstance(bins, numbers.Integral) or bins < 4:
        raise ValueError(f"bins must be an integer >= 4 (the B-spline kernel spans 4 bins), got {bins!r}")
    return _mutual_information(fixed, moving, weight, bins, normalized, _validate_range(fixed_range, "fixed_range"),
                               _validate_range(moving_range, "moving_range"), None)


def _fixed_parzen(f: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each voxel of ``f [N, C, V]`` binned by ``(lo, scale)`` (:func:`_bin_range`): the flat
    index of its first touched (histogram, fixed bin) pair, to which the moving bin is added
    (``[N, C, V]``, int32), and its four Parzen weights, ``[4, N, C, V]``."""
    n, c = f.shape[:2]
    first_f, tf = _parzen((1 + (f - lo) * scale).clamp(1, bins - 2), bins)
    histogram = torch.arange(n * c, device=f.device).view(n, c, 1)
    return ((histogram * (bins - 3) + first_f) * (bins - 3)).int(), cubic_weights(tf, dim=0)


def _fixed_side(f: torch.Tensor, w: torch.Tensor | None, bins: int, value_range,
                kept: "_KeptFixedSide | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed image's part of the joint histogram's input: :func:`_fixed_parzen` (from
    ``kept`` where it holds it), with the Parzen weights times the voxel weights as
    ``[4, N * C * V]``."""
    n, c = f.shape[:2]
    lo, scale = _bin_range(f, w, bins, value_range)
    base, wf = kept.get(f, lo, scale, bins) if kept is not None else _fixed_parzen(f, lo, scale, bins)
    if w is not None:
        wf = wf * w
    return base, wf.expand(4, n, c, -1).reshape(4, -1)


class _KeptFixedSide:
    """:func:`_fixed_parzen` for the last few fixed images a module saw, each with its latest bin
    range: a registration evaluates the same fixed voxels (a level's, or one of its few
    sublattices) again and again, and their bin range changes only when the moving image's
    border uncovers the brightest or the darkest of them (the voxel weight, which changes
    whenever that border crosses a voxel, is applied afterwards). The fixed side was about a
    third of the loss's operations. An entry is used while the image equals its kept copy, so a
    change in place is seen. A new range replaces the image's entry rather than adding one.

    Only images of up to ``voxels`` voxels (per batch element and channel) are kept, so that
    the entries stay under some 50 MB: the saving is the per-operation overhead of a small
    level, which a large one does not feel, and an entry of a 1 mm brain's full-resolution level
    is some 200 MB (docs/architecture.md, "The step's small operations, continued")."""

    size = 8  # a strided 3D level's sublattices
    voxels = 1 << 18  # a 512 x 512 slice; a strided 2 mm brain's sublattice has 141 600

    def __init__(self):
        self.entries: list[tuple] = []

    def get(self, f: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, bins: int):
        if f.shape[-1] > self.voxels:
            return _fixed_parzen(f, lo, scale, bins)
        copy = None
        for i, entry in enumerate(self.entries):
            if entry[3] == bins and _equal(entry[0], f):
                if _equal(entry[1], lo) and _equal(entry[2], scale):
                    return entry[4]
                copy = self.entries.pop(i)[0]  # the same image in a new range: the old side goes first
                break
        entry = None  # not kept alive while the new side is computed
        side = _fixed_parzen(f, lo, scale, bins)
        self.entries = [(f.clone() if copy is None else copy, lo, scale, bins, side), *self.entries[: self.size - 1]]
        return side


def _equal(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


def _mutual_information(fixed, moving, weight, bins: int, normalized: bool, fixed_range, moving_range,
                        kept: _KeptFixedSide | None) -> torch.Tensor:
    fixed, moving, weight, weight_sum = _prepare(fixed, moving, weight)
    n, c = moving.shape[:2]
    f, m = fixed.flatten(2), moving.flatten(2)  # [N, C, V]
    w = weight.flatten(2) if weight is not None else None  # [Nw, 1, V]

    if f.requires_grad or (w is not None and w.requires_grad):
        kept = None
    base, wf = _fixed_side(f, w, bins, fixed_range, kept)
    first_m, tm = _parzen(_bin_coordinates(m, w, bins, moving_range), bins)
    first = (base + first_m).flatten()
    acc = torch.float64 if moving.device.type != "mps" else moving.dtype  # MPS has no float64
    joint = _JointHistogram.apply(wf, tm.reshape(-1), first, n * c, bins, acc)
    value = _Information.apply(joint, normalized)
    return -value.view(n, c).mean(1).to(moving.dtype)


class _Information(torch.autograd.Function):
    """``joint [H, bins, bins]`` (unnormalised) -> ``MI = H(F) + H(M) - H(F, M)`` or ``NMI = (H(F)
    + H(M)) / H(F, M)`` per histogram, ``[H]``, with the derivative written out: autograd through
    the normalisation, the marginals and the three entropies was some thirty small operations,
    more than the rest of a coarse level's loss. With ``p = joint / S`` and ``l(q) = log q + 1``
    (``log tiny`` for an empty bin: ``q log q`` is taken with ``q`` clamped inside the log), ``dMI /
    dp_ij = l(p_ij) - l(p_i.) - l(p_.j)``, and the normalisation turns a gradient ``G`` in ``p``
    into ``(G - sum(G p)) / S`` in ``joint``."""

    @staticmethod
    def forward(ctx, joint, normalized):
        tiny = torch.finfo(joint.dtype).tiny
        total = joint.sum((1, 2), keepdim=True)
        p = joint / total
        parts = (p.sum(2), p.sum(1), p)
        logs = [q.clamp_min(tiny).log() for q in parts]
        h_f, h_m, h_joint = (-(q * lq).sum(tuple(range(1, q.dim()))) for q, lq in zip(parts, logs))
        ctx.save_for_backward(total, *parts, *logs, h_f + h_m, h_joint)
        ctx.normalized, ctx.tiny = normalized, tiny
        return (h_f + h_m) / h_joint if normalized else h_f + h_m - h_joint

    @staticmethod
    def backward(ctx, grad):
        total, pf, pm, p, log_f, log_m, log_joint, marginal, h_joint = ctx.saved_tensors
        # l(q) = d(q log q)/dq: log q + 1, or log tiny where q is below the clamp (no gradient through it)
        l_f, l_m, l_joint = (lq + (q >= ctx.tiny) for q, lq in ((pf, log_f), (pm, log_m), (p, log_joint)))
        d_marginal = -(l_f.unsqueeze(2) + l_m.unsqueeze(1))  # d(H(F) + H(M)) / dp
        if ctx.normalized:
            g = (d_marginal + l_joint * (marginal / h_joint).view(-1, 1, 1)) * (grad / h_joint).view(-1, 1, 1)
        else:
            g = (d_marginal + l_joint) * grad.view(-1, 1, 1)
        return (g - (g * p).sum((1, 2), keepdim=True)) / total, None


def nmi(fixed, moving, weight=None, *, bins=32, fixed_range=None, moving_range=None) -> torch.Tensor:
    """``-NMI`` with ``NMI = (H(F) + H(M)) / H(F, M)``; see :func:`mutual_information`."""
    return mutual_information(
        fixed, moving, weight, bins=bins, normalized=True, fixed_range=fixed_range, moving_range=moving_range
    )


# --------------------------------------------------------------------------- NGF
def _axis_gradients(x: torch.Tensor, spacing: Sequence[float]) -> list[torch.Tensor]:
    """Central differences along each tensor axis in physical units (one-sided at the border).

    Axes of size 1 have no gradient and are skipped. The components are along the grid axes, not
    the world axes; NGF only uses dot products and norms, which the (orthonormal) direction
    cosines preserve, so the direction matrix is not needed.
    """
    d = x.dim() - 2
    steps = tuple(reversed(spacing))  # ITK order -> tensor axis order
    return [index_gradient(x, 2 + k, float(steps[k]), edge_order=1) for k in range(d) if x.shape[2 + k] > 1]


def ngf(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    spacing: Sequence[float] | None,
    eps: float = 0.1,
) -> torch.Tensor:
    """Normalised gradient fields (Haber & Modersitzki): ``1 - mean(cos^2)``, ``[N]``.

    ``cos^2 = (gf . gm)^2 / ((|gf|^2 + eps_f^2) (|gm|^2 + eps_m^2))`` with gradients by central
    differences in physical units (``spacing`` in ITK order; ``None`` means 1 along every axis).

    ``eps`` is *relative*: ``eps_f^2 = eps^2 * mean(|gf|^2)`` over the mask (RMS gradient), and
    likewise for the moving image, so the loss does not depend on intensity units
    (``ngf(f, a m + b) == ngf(f, m)``) and gradients weaker than ``eps`` times the typical one
    are treated as noise. The edge scales are part of the function (they carry gradient).
    Values outside the mask enter through the differences of voxels next to its boundary.
    """
    fixed, moving, weight, weight_sum = _prepare(fixed, moving, weight)
    d = moving.dim() - 2
    spacing = (1.0,) * d if spacing is None else tuple(float(s) for s in _per_axis(spacing, d, "spacing"))
    if any(not s > 0 for s in spacing):
        raise ValueError(f"spacing must be positive, got {spacing}")

    def fields(x):
        grads = _axis_gradients(x, spacing)
        if not grads:  # a single voxel has no gradient
            zero = torch.zeros_like(x)
            return [zero], zero, torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)
        norm2 = sum(g.square() for g in grads)
        scale2 = _mean(norm2, weight, weight_sum)
        scale2 = torch.where(scale2 > 0, scale2, torch.ones_like(scale2))  # constant image
        return grads, norm2, eps**2 * scale2

    gf, nf, ef = fields(fixed)
    gm, nm, em = fields(moving)
    dot = sum(a * b for a, b in zip(gf, gm))
    cos2 = dot.square() / ((nf + _per_channel(ef, nf)) * (nm + _per_channel(em, nm)))
    return 1 - _mean(cos2, weight, weight_sum).mean(1)


# --------------------------------------------------------------------------- SSIM
SSIM_K1, SSIM_K2 = 0.01, 0.03  # Wang et al. 2004


def _data_range(fixed: torch.Tensor, weight) -> torch.Tensor:
    """``max - min`` of ``fixed`` over voxels of positive weight, ``[N, C]``, without gradient
    (like MI's bin range it is a setting, not something to optimise); 1 for a constant image."""
    with torch.no_grad():
        x = fixed.detach().flatten(2)
        if weight is None:
            lo, hi = x.amin(-1), x.amax(-1)
        else:
            inside = (weight > 0).flatten(2)
            lo = torch.where(inside, x, math.inf).amin(-1)
            hi = torch.where(inside, x, -math.inf).amax(-1)
        width = hi - lo
        return torch.where(width > 0, width, torch.ones_like(width))


def _check_ssim_options(data_range, sigma) -> None:
    if data_range is not None and not float(data_range) > 0:
        raise ValueError(f"data_range must be positive (the intensity range L), got {data_range!r}")
    if not float(sigma) > 0:
        raise ValueError(f"sigma must be positive (voxels), got {sigma!r}")


def _ssim_map(fixed, moving, weight, *, data_range, sigma):
    """Per-voxel SSIM ``[N, C, *S]``, and the prepared ``weight, weight_sum``; see :func:`ssim`."""
    fixed, moving, weight, weight_sum = _prepare(fixed, moving, weight)
    _check_ssim_options(data_range, sigma)
    if data_range is None:
        scale = _data_range(fixed, weight)
    else:
        scale = torch.full(fixed.shape[:2], float(data_range), dtype=fixed.dtype, device=fixed.device)
    # SSIM does not change when both images and L are scaled together, and (the offset being
    # added back to the means) its variances do not see a common offset: working in units of L,
    # relative to the fixed image's mean, keeps E[x^2] - E[x]^2 accurate in float32 and makes
    # C1, C2 plain numbers.
    offset = _per_channel(_mean(fixed.detach(), weight, weight_sum), fixed)
    scale = _per_channel(scale, fixed)
    f, m = (fixed - offset) / scale, (moving - offset) / scale
    # scipy's and scikit-image's radius, int(3.5 sigma + 0.5): the 11-tap window of Wang et al.
    # for sigma 1.5
    window = gaussian_kernel(float(sigma), dtype=f.dtype, device=f.device, radius=int(3.5 * float(sigma) + 0.5))
    windows = [window] * (f.dim() - 2)
    mean_f, mean_m, var_f, var_m, cov = _local_moments(f, m, weight, windows)
    mean_f, mean_m = mean_f + offset / scale, mean_m + offset / scale
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    luminance = (2 * mean_f * mean_m + c1) / (mean_f.square() + mean_m.square() + c1)
    structure = (2 * cov + c2) / (var_f + var_m + c2)  # contrast and structure together
    return luminance * structure, weight, weight_sum


def ssim(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    data_range: float | None = None,
    sigma: float = 1.5,
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) as a loss: ``1 - mean(SSIM)``, ``[N]``.

    ``SSIM = (2 mu_f mu_m + C1) (2 cov + C2) / ((mu_f^2 + mu_m^2 + C1) (var_f + var_m + C2))``
    with local weighted moments over a Gaussian window (``sigma`` voxels, truncated at
    ``int(3.5 sigma + 0.5)``, applied separably) and ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``.
    ``L`` is ``data_range``, or by default ``max - min`` of ``fixed`` over the mask (per batch
    element and channel, without gradient). The loss runs from 0 (identical images) to 2.

    As in :func:`lncc`, masked-out voxels and voxels beyond the border enter no window (windows
    are truncated and renormalised there), and the mean is weighted by ``weight``. Inside the
    image, at least ``int(3.5 sigma + 0.5)`` voxels from the border, the map is scikit-image's
    ``structural_similarity(gaussian_weights=True, use_sample_covariance=False)``; scikit-image
    reflects the image at the border instead and averages only the inside.
    """
    s, weight, weight_sum = _ssim_map(fixed, moving, weight, data_range=data_range, sigma=sigma)
    return 1 - _mean(s, weight, weight_sum).mean(1)


# --------------------------------------------------------------------------- landmarks
def landmark_distance(mapped: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared Euclidean distance between point sets ``[N, P, D]`` (mm) -> ``[N]`` (mm^2)."""
    if mapped.shape != target.shape or mapped.dim() != 3:
        raise ValueError(
            f"landmarks must both be [N, P, D] of the same shape, got mapped {tuple(mapped.shape)} "
            f"and target {tuple(target.shape)}"
        )
    return (mapped - target).square().sum(-1).mean(-1)


# --------------------------------------------------------------------------- modules
class MSE(nn.Module):
    """:func:`mse` as a module."""

    def forward(self, fixed, moving, weight=None, grid: Grid | None = None) -> torch.Tensor:
        _check_grid(grid, moving)
        return mse(fixed, moving, weight)


class NCC(nn.Module):
    """:func:`ncc` as a module."""

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, fixed, moving, weight=None, grid: Grid | None = None) -> torch.Tensor:
        _check_grid(grid, moving)
        return ncc(fixed, moving, weight, eps=self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class LNCC(nn.Module):
    """:func:`lncc` as a module.

    The window is ``radius`` voxels (int or ITK-ordered tuple), or, if ``radius_mm`` is given
    (scalar or ITK-ordered tuple), ``round(radius_mm / spacing)`` voxels per axis (half up, at
    least 1) on the ``grid`` passed to :meth:`forward`, so one configuration suits every
    resolution level of a pyramid.
    """

    def __init__(self, radius=2, kernel: str = "box", radius_mm=None, eps: float = 1e-5):
        super().__init__()
        if kernel not in LNCC_KERNELS:
            raise ValueError(f"unknown LNCC kernel {kernel!r}; choose from {LNCC_KERNELS}")
        self.radius, self.kernel, self.radius_mm, self.eps = radius, kernel, radius_mm, eps

    def voxel_radius(self, grid: Grid | None):
        """The window radius in voxels (ITK order) this module uses on ``grid``."""
        if self.radius_mm is None:
            return self.radius
        if grid is None:
            raise ValueError("LNCC(radius_mm=...) needs the grid (for its spacing); pass grid=...")
        mm = _per_axis(self.radius_mm, grid.ndim, "radius_mm")
        return tuple(max(1, int(math.floor(float(r) / s + 0.5))) for r, s in zip(mm, grid.spacing))

    def forward(self, fixed, moving, weight=None, grid: Grid | None = None) -> torch.Tensor:
        _check_grid(grid, moving)
        return lncc(fixed, moving, weight, radius=self.voxel_radius(grid), kernel=self.kernel, eps=self.eps)

    def extra_repr(self) -> str:
        size = f"radius_mm={self.radius_mm}" if self.radius_mm is not None else f"radius={self.radius}"
        return f"{size}, kernel={self.kernel!r}, eps={self.eps}"


class MutualInformation(nn.Module):
    """:func:`mutual_information` as a module."""

    def __init__(self, bins: int = 32, normalized: bool = False, fixed_range=None, moving_range=None):
        super().__init__()
        if not isinstance(bins, numbers.Integral) or bins < 4:
            raise ValueError(f"bins must be an integer >= 4 (the B-spline kernel spans 4 bins), got {bins!r}")
        self.bins, self.normalized = int(bins), bool(normalized)
        self.fixed_range = _validate_range(fixed_range, "fixed_range")
        self.moving_range = _validate_range(moving_range, "moving_range")

        self._kept = _KeptFixedSide()

    def forward(self, fixed, moving, weight=None, grid: Grid | None = None) -> torch.Tensor:
        _check_grid(grid, moving)
        return _mutual_information(fixed, moving, weight, self.bins, self.normalized, self.fixed_range,
                                   self.moving_range, self._kept)

    def extra_repr(self) -> str:
        return f"bins={self.bins}, normalized={self.normalized}"


class NMI(MutualInformation):
    """:func:`nmi` as a module."""

    def __init__(self, bins: int = 32, fixed_range=None, moving_range=None):
        super().__init__(bins, True, fixed_range, moving_range)


class NGF(nn.Module):
    """:func:`ngf` as a module; the spacing comes from ``grid`` (unit spacing without one)."""

    def __init__(self, eps: float = 0.1):
        super().__init__()
        self.eps = eps

    def forward(self, fixed, moving, weight=None, grid: Grid | None = None) -> torch.Tensor:
        _check_grid(grid, moving)
        spacing = grid.spacing if grid is not None else None
        return ngf(fixed, moving, weight, spacing=spacing, eps=self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class SSIM(nn.Module):
    """:func:`ssim` as a module (the window is in voxels, so ``grid`` is only checked)."""

    def __init__(self, data_range: float | None = None, sigma: float = 1.5):
        super().__init__()
        _check_ssim_options(data_range, sigma)
        self.data_range = None if data_range is None else float(data_range)
        self.sigma = float(sigma)

    def forward(self, fixed, moving, weight=None, grid: Grid | None = None) -> torch.Tensor:
        _check_grid(grid, moving)
        return ssim(fixed, moving, weight, data_range=self.data_range, sigma=self.sigma)

    def extra_repr(self) -> str:
        return f"data_range={self.data_range}, sigma={self.sigma}"


LOSSES = {"mse": MSE, "ncc": NCC, "lncc": LNCC, "mi": MutualInformation, "nmi": NMI, "ngf": NGF, "ssim": SSIM}
