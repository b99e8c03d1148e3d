"""The compiled loops of :mod:`airlab.compiled` (numba), in a module of their own so that numba
is imported, and the loops compiled or loaded from numba's disk cache, only when one is first
used.

- ``cubic3``: per point, the 64 knots, folded at the boundary, summed in double precision; where
  asked, the value clamped to its cell's range and the slope interpolated linearly.
- ``square3``: one squaring of scaling and squaring.
- ``parzen_joint``/``parzen_joint_grad``: the Parzen joint histogram of mutual information and
  its adjoint.

``start``/``stop``: the range of points (or planes) a call fills: one range per thread.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# Beyond this an index is a diverged transform, not a position (and would overflow an integer).
_FAR = 1e9


@njit(inline="always")
def _tap(j, n, mirror):
    """Knot ``j`` of an axis of ``n`` knots: mirrored about the end knots (ITK's
    interpolator; any distance) or the edge knot repeated."""
    if not mirror:
        return min(max(j, 0), n - 1)
    if n == 1:
        return 0
    period = 2 * (n - 1)
    m = j % period  # numba follows Python: m >= 0
    return period - m if m >= n else m


@njit(inline="always")
def _taps(first, n, mirror, out):
    """The four knots from ``first`` on (``out``): folded only where they leave the grid, which
    an integer modulo per knot would otherwise cost at every point."""
    if first >= 0 and first + 3 < n:
        for k in range(4):
            out[k] = first + k
    else:
        for k in range(4):
            out[k] = _tap(first + k, n, mirror)


@njit(inline="always")
def _weights(t):
    t2 = t * t
    t3 = t2 * t
    w0 = (1.0 - t) ** 3 / 6.0
    w1 = (3.0 * t3 - 6.0 * t2 + 4.0) / 6.0
    w2 = (-3.0 * t3 + 3.0 * t2 + 3.0 * t + 1.0) / 6.0
    w3 = t3 / 6.0
    return w0, w1, w2, w3


@njit(inline="always")
def _linear(u, n):
    """grid_sample's border rule along one axis: the two knots and the upper weight."""
    u = min(max(u, 0.0), n - 1.0)
    i0 = int(math.floor(u))
    i1 = min(i0 + 1, n - 1)
    return i0, i1, u - i0


@njit(nogil=True, cache=True)
def cubic3(coef, index, mirror, low, high, grad, out, kept, slope, start, stop):
    """Points ``start..stop`` of ``index [N, 3, P]`` (components first) on the spline ``coef [N or
    1, C, Z, Y, X]`` into ``out [N, C, P]``; with ``low``/``high`` (else empty) the clamp and
    ``kept``; with ``slope`` non-empty, ``grad [N or 1, 3 C, Z, Y, X]`` interpolated into it."""
    nz, ny, nx = coef.shape[2], coef.shape[3], coef.shape[4]
    bounded = low.shape[0] > 0
    sloped = slope.shape[0] > 0
    kx = np.empty(4, np.int64)
    ky = np.empty(4, np.int64)
    kz = np.empty(4, np.int64)
    for n in range(index.shape[0]):
        cn = n if coef.shape[0] > 1 else 0
        for c in range(coef.shape[1]):
            # each channel's volumes taken once, outside the point loop: a view per point and
            # channel cost a fifth of the loop
            spline = coef[cn, c]
            lo3 = low[cn, c] if bounded else spline
            hi3 = high[cn, c] if bounded else spline
            gx = grad[cn, 3 * c] if sloped else spline
            gy = grad[cn, 3 * c + 1] if sloped else spline
            gz = grad[cn, 3 * c + 2] if sloped else spline
            for p in range(start, stop):
                x, y, z = index[n, 0, p], index[n, 1, p], index[n, 2, p]
                if not (abs(x) < _FAR and abs(y) < _FAR and abs(z) < _FAR):  # NaN too
                    out[n, c, p] = np.nan
                    if bounded:
                        kept[n, c, p] = False
                    if sloped:
                        slope[n, c, 0, p] = slope[n, c, 1, p] = slope[n, c, 2, p] = 0.0
                    continue
                fx, fy, fz = math.floor(x), math.floor(y), math.floor(z)
                wx = _weights(x - fx)
                wy = _weights(y - fy)
                wz = _weights(z - fz)
                _taps(int(fx) - 1, nx, mirror, kx)
                _taps(int(fy) - 1, ny, mirror, ky)
                _taps(int(fz) - 1, nz, mirror, kz)
                x0, x1, x2, x3 = kx[0], kx[1], kx[2], kx[3]
                acc = 0.0
                for k in range(4):
                    zk = kz[k]
                    plane = 0.0
                    for j in range(4):
                        yj = ky[j]
                        plane += wy[j] * (wx[0] * spline[zk, yj, x0] + wx[1] * spline[zk, yj, x1]
                                          + wx[2] * spline[zk, yj, x2] + wx[3] * spline[zk, yj, x3])
                    acc += wz[k] * plane
                if bounded:
                    cx = min(max(int(fx), 0), nx - 1)
                    cy = min(max(int(fy), 0), ny - 1)
                    cz = min(max(int(fz), 0), nz - 1)
                    lo, hi = lo3[cz, cy, cx], hi3[cz, cy, cx]
                    kept[n, c, p] = lo <= acc <= hi
                    acc = min(max(acc, lo), hi)
                out[n, c, p] = acc
                if sloped:
                    a0, a1, tx = _linear(x, nx)
                    b0, b1, ty = _linear(y, ny)
                    c0, c1, tz = _linear(z, nz)
                    slope[n, c, 0, p] = _trilinear(gx, a0, a1, tx, b0, b1, ty, c0, c1, tz)
                    slope[n, c, 1, p] = _trilinear(gy, a0, a1, tx, b0, b1, ty, c0, c1, tz)
                    slope[n, c, 2, p] = _trilinear(gz, a0, a1, tx, b0, b1, ty, c0, c1, tz)


@njit(inline="always")
def _trilinear(g, x0, x1, tx, y0, y1, ty, z0, z1, tz):
    """``g [Z, Y, X]`` between the corners ``(x0 or x1, y0 or y1, z0 or z1)``, upper weights ``t``."""
    s0 = (1 - ty) * ((1 - tx) * g[z0, y0, x0] + tx * g[z0, y0, x1]) \
        + ty * ((1 - tx) * g[z0, y1, x0] + tx * g[z0, y1, x1])
    s1 = (1 - ty) * ((1 - tx) * g[z1, y0, x0] + tx * g[z1, y0, x1]) \
        + ty * ((1 - tx) * g[z1, y1, x0] + tx * g[z1, y1, x1])
    return (1 - tz) * s0 + tz * s1


@njit(nogil=True, cache=True)
def square3(u, out, start, stop):
    """One squaring of scaling and squaring, ``u(x) + u(x + u(x))`` on planes ``start..stop`` of
    ``u [N, 3, Z, Y, X]`` in grid_sample's normalised units (border extension)."""
    nz, ny, nx = u.shape[2], u.shape[3], u.shape[4]
    sx, sy, sz = (nx - 1) / 2.0, (ny - 1) / 2.0, (nz - 1) / 2.0
    for n in range(u.shape[0]):
        ux, uy, uz = u[n, 0], u[n, 1], u[n, 2]  # taken once: a view per voxel costs
        for z in range(start, stop):
            for y in range(ny):
                for x in range(nx):
                    px = x + ux[z, y, x] * sx
                    py = y + uy[z, y, x] * sy
                    pz = z + uz[z, y, x] * sz
                    if not (abs(px) < _FAR and abs(py) < _FAR and abs(pz) < _FAR):
                        for a in range(3):
                            out[n, a, z, y, x] = np.nan
                        continue
                    x0, x1, tx = _linear(px, nx)
                    y0, y1, ty = _linear(py, ny)
                    z0, z1, tz = _linear(pz, nz)
                    out[n, 0, z, y, x] = ux[z, y, x] + _trilinear(ux, x0, x1, tx, y0, y1, ty, z0, z1, tz)
                    out[n, 1, z, y, x] = uy[z, y, x] + _trilinear(uy, x0, x1, tx, y0, y1, ty, z0, z1, tz)
                    out[n, 2, z, y, x] = uz[z, y, x] + _trilinear(uz, x0, x1, tx, y0, y1, ty, z0, z1, tz)


@njit(inline="always")
def _derivatives(t):
    t2 = t * t
    return -0.5 * (1.0 - t) ** 2, 1.5 * t2 - 2.0 * t, -1.5 * t2 + t + 0.5, 0.5 * t2


@njit(inline="always")
def _lattice(f, side):
    """Histogram, first fixed bin and first moving bin of a flat index on the lattice of first
    bins (``(histogram * side + fixed) * side + moving``)."""
    h = f // (side * side)
    r = f - h * side * side
    i = r // side
    return h, i, r - i * side


@njit(nogil=True, cache=True)
def parzen_joint(wf, tm, first, side, out, start, stop):
    """Voxels ``start..stop`` into the joint histograms ``out [H, bins, bins]`` (float64): voxel
    ``v`` adds ``wf[a, v] * wm[b]`` to bin ``(i + a, j + b)`` of its histogram, ``wm`` the cubic
    weights of ``tm[v]`` and ``(h, i, j)`` its ``first`` on the lattice of first bins."""
    for v in range(start, stop):
        h, i, j = _lattice(first[v], side)
        wm = _weights(tm[v])
        for a in range(4):
            x = wf[a, v]
            for b in range(4):
                out[h, i + a, j + b] += x * wm[b]


@njit(nogil=True, cache=True)
def parzen_joint_grad(wf, tm, first, side, grad, grad_wf, grad_tm, start, stop):
    """The adjoint of :func:`parzen_joint` for ``grad [H, bins, bins]``: ``grad_wf [4, V]`` and
    ``grad_tm [V]`` (each skipped where empty) on voxels ``start..stop``."""
    want_wf = grad_wf.shape[1] > 0
    want_tm = grad_tm.shape[0] > 0
    for v in range(start, stop):
        h, i, j = _lattice(first[v], side)
        t = tm[v]
        wm = _weights(t)
        dm = _derivatives(t)
        total = 0.0
        for a in range(4):
            row = grad[h, i + a]
            if want_wf:
                grad_wf[a, v] = row[j] * wm[0] + row[j + 1] * wm[1] + row[j + 2] * wm[2] + row[j + 3] * wm[3]
            if want_tm:
                total += wf[a, v] * (row[j] * dm[0] + row[j + 1] * dm[1] + row[j + 2] * dm[2] + row[j + 3] * dm[3])
        if want_tm:
            grad_tm[v] = total
