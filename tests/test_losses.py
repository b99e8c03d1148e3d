"""Similarity losses: exact values, independent reference implementations, gradients, masks, batches."""

import itertools

import numpy as np
import pytest
import torch
from scipy import ndimage

from airlab import Grid, losses
from airlab.losses import (
    LNCC,
    LOSSES,
    MSE,
    NCC,
    NGF,
    NMI,
    SSIM,
    MutualInformation,
    landmark_distance,
    lncc,
    mse,
    mutual_information,
    ncc,
    ngf,
    nmi,
    ssim,
)

SHAPES = {2: (9, 8), 3: (6, 5, 7)}
SPACING = {2: (0.7, 1.9), 3: (0.7, 1.9, 1.3)}  # ITK order, deliberately anisotropic


def smooth(rng, shape, sigma=1.2):
    """Smooth random images ``shape = [N, C, *S]`` in [0, 100] (float64)."""
    arr = ndimage.gaussian_filter(rng.normal(size=shape), (0, 0) + (sigma,) * (len(shape) - 2))
    arr = (arr - arr.min()) / (arr.max() - arr.min()) * 100
    return torch.as_tensor(arr)


def random_weight(rng, shape):
    """Weights in [0, 1] with a block of exact zeros, ``[N, 1, *S]``."""
    w = rng.uniform(0.2, 1.0, size=shape)
    w[(slice(None), slice(None)) + (slice(0, 2),) * (len(shape) - 2)] = 0.0
    return torch.as_tensor(w)


RANGE = (-5.0, 105.0)  # wider than smooth()'s [0, 100]

# Every image loss as a function of (fixed, moving, weight); MI gets explicit ranges so that its
# value does not depend on the (gradient-free) min/max of the perturbed input in gradcheck.
LOSS_FNS = {
    "mse": lambda f, m, w, d: mse(f, m, w),
    "ncc": lambda f, m, w, d: ncc(f, m, w),
    "lncc_box": lambda f, m, w, d: lncc(f, m, w, radius=(1, 2, 1)[:d]),
    "lncc_gaussian": lambda f, m, w, d: lncc(f, m, w, radius=2, kernel="gaussian"),
    "mi": lambda f, m, w, d: mutual_information(f, m, w, bins=8, fixed_range=RANGE, moving_range=RANGE),
    "nmi": lambda f, m, w, d: nmi(f, m, w, bins=8, fixed_range=RANGE, moving_range=RANGE),
    "ngf": lambda f, m, w, d: ngf(f, m, w, spacing=SPACING[d]),
    # a fixed L: the default one (the range of the fixed image) has no gradient
    "ssim": lambda f, m, w, d: ssim(f, m, w, data_range=RANGE[1] - RANGE[0]),
}


# --------------------------------------------------------------------------- gradients
# SSIM's 11-tap windows make a full gradcheck on these shapes slow: test_ssim_gradcheck uses smaller ones
@pytest.mark.parametrize("name", [name for name in LOSS_FNS if name != "ssim"])
@pytest.mark.parametrize("d", [2, 3])
def test_gradcheck(name, d, rng):
    shape = (2, 1, *SHAPES[d]) if d == 2 else (1, 2, *SHAPES[d])
    fixed = smooth(rng, shape).requires_grad_(True)
    moving = smooth(rng, shape).requires_grad_(True)
    weight = random_weight(rng, (shape[0], 1, *shape[2:]))
    fn = LOSS_FNS[name]
    assert fn(fixed, moving, weight, d).shape == (shape[0],)
    assert torch.autograd.gradcheck(lambda f, m: fn(f, m, weight, d), (fixed, moving), eps=1e-6, atol=1e-6)
    # without a weight too (a separate code path)
    assert torch.autograd.gradcheck(lambda m: fn(fixed.detach(), m, None, d), (moving,), eps=1e-6, atol=1e-6)


def test_mi_gradient_with_automatic_range_is_finite(rng):
    fixed, moving = smooth(rng, (1, 1, 12, 11)), smooth(rng, (1, 1, 12, 11)).requires_grad_(True)
    mutual_information(fixed, moving).sum().backward()
    assert torch.isfinite(moving.grad).all() and moving.grad.abs().sum() > 0


# --------------------------------------------------------------------------- hand-computed values
def test_mse_values():
    f = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    m = torch.tensor([[[[1.0, 0.0], [3.0, 8.0]]]])
    assert mse(f, m).tolist() == [5.0]  # (0 + 4 + 0 + 16) / 4
    w = torch.tensor([[[[1.0, 1.0], [0.0, 0.5]]]])
    assert mse(f, m, w).item() == pytest.approx(4.8)  # (4 + 8) / 2.5


def test_ncc_values(rng):
    f = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(1, 1, 2, 2)
    m = torch.tensor([1.0, 3.0, 2.0, 4.0], dtype=torch.float64).view(1, 1, 2, 2)
    assert ncc(f, m, eps=0).item() == pytest.approx(0.2, abs=1e-12)  # cov 1, variances 1.25
    assert ncc(f, m).item() == pytest.approx(0.2, abs=1e-8)  # eps only guards constant images
    x = smooth(rng, (2, 1, 10, 9))
    assert torch.allclose(ncc(x, 3 * x + 2), torch.zeros(2, dtype=x.dtype), atol=1e-8)
    assert torch.allclose(ncc(x, -0.5 * x + 7), torch.full((2,), 2.0, dtype=x.dtype), atol=1e-8)


def test_landmark_distance():
    mapped = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]], [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]])
    target = torch.tensor([[[3.0, 4.0, 0.0], [1.0, 2.0, 2.0]], [[1.0, 1.0, 2.0], [0.0, 0.0, 0.0]]])
    assert landmark_distance(mapped, target).tolist() == [12.5, 0.5]  # (25 + 0) / 2, (1 + 0) / 2
    with pytest.raises(ValueError, match=r"mapped \(2, 2, 3\) and target \(2, 3\)"):
        landmark_distance(mapped, target[0])


# --------------------------------------------------------------------------- LNCC
def lncc_reference(f, m, w, radius_itk, kernel):
    """Brute force: explicit windows, weighted local moments, no eps (``[N, C, *S]`` numpy)."""
    radius = radius_itk[::-1]  # tensor axis order
    taps = []
    for r in radius:
        x = np.arange(-r, r + 1, dtype=float)
        taps.append(np.ones_like(x) if kernel == "box" else np.exp(-0.5 * (x / (r / 2)) ** 2))
    spatial = f.shape[2:]
    out = np.zeros(f.shape[:2])
    for n, c in np.ndindex(*f.shape[:2]):
        cc = np.zeros(spatial)
        for p in np.ndindex(*spatial):
            num = sf = sm = sff = smm = sfm = 0.0
            for off in itertools.product(*[range(-r, r + 1) for r in radius]):
                q = tuple(a + o for a, o in zip(p, off))
                if not all(0 <= a < s for a, s in zip(q, spatial)):
                    continue
                k = np.prod([taps[a][o + radius[a]] for a, o in enumerate(off)]) * w[n, 0][q]
                fv, mv = f[n, c][q], m[n, c][q]
                num, sf, sm = num + k, sf + k * fv, sm + k * mv
                sff, smm, sfm = sff + k * fv * fv, smm + k * mv * mv, sfm + k * fv * mv
            mf, mm = sf / num, sm / num
            cov, vf, vm = sfm / num - mf * mm, sff / num - mf**2, smm / num - mm**2
            cc[p] = cov**2 / (vf * vm)
        out[n, c] = 1 - (cc * w[n, 0]).sum() / w[n, 0].sum()
    return out.mean(1)


@pytest.mark.parametrize("kernel", ["box", "gaussian"])
@pytest.mark.parametrize("d", [2, 3])
def test_lncc_matches_brute_force(kernel, d, rng):
    shape = (2, 1, 7, 8) if d == 2 else (1, 1, 4, 5, 6)
    f = torch.as_tensor(rng.normal(size=shape))  # noise: no flat windows, so eps can be ~0
    m = torch.as_tensor(rng.normal(size=shape)) + 0.5 * f
    w = torch.as_tensor(rng.uniform(0.1, 1.0, size=(shape[0], 1, *shape[2:])))
    radius = (1, 2) if d == 2 else (2, 1, 1)  # ITK order: x radius first
    ours = lncc(f, m, w, radius=radius, kernel=kernel, eps=1e-14)
    ref = lncc_reference(f.numpy(), m.numpy(), w.numpy(), radius, kernel)
    assert np.allclose(ours.numpy(), ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("d", [2, 3])
def test_lncc_affine_intensity_map(d, rng):
    x = smooth(rng, (2, 1, *SHAPES[d]), sigma=1.0)
    exact = lncc(x, x, radius=1, eps=1e-14)
    assert torch.allclose(exact, torch.zeros_like(exact), atol=1e-9)
    ref = lncc(x, x, radius=2)
    assert (ref >= 0).all() and (ref < 0.02).all()  # only eps keeps it above 0
    # standardisation makes eps relative: an affine intensity map changes nothing at all
    for a, b in ((3.0, 2.0), (-0.01, 50.0)):
        assert torch.allclose(lncc(x, a * x + b, radius=2), ref, rtol=0, atol=1e-10)
        gauss = lncc(x, a * x + b, radius=2, kernel="gaussian")
        assert torch.allclose(gauss, lncc(x, x, radius=2, kernel="gaussian"), rtol=0, atol=1e-10)
    # and unrelated images are far from a match
    assert (lncc(x, smooth(rng, x.shape, sigma=1.0), radius=2) > 0.3).all()


def test_lncc_float32_large_intensities(rng):
    """Intensities around 10^4 (CT-like offset) must not break the E[x^2] - E[x]^2 moments."""
    x = smooth(rng, (1, 1, 20, 21))
    ref = lncc(x, 0.5 * x, radius=2)
    got = lncc((x + 1e4).float(), (0.5 * x + 3e4).float(), radius=2)
    assert got.dtype == torch.float32
    assert abs(got.item() - ref.item()) < 1e-4


# --------------------------------------------------------------------------- mutual information
def cubic_bspline(x):
    x = np.abs(x)
    return np.where(x < 1, 2 / 3 - x**2 + x**3 / 2, np.where(x < 2, (2 - x) ** 3 / 6, 0.0))


def mi_reference(f, m, w, bins, normalized, f_range=None, m_range=None):
    """Dense Parzen histogram (a [voxels, bins] kernel matrix) and entropies, numpy, per (n, c)."""
    out = np.zeros(f.shape[:2])
    for n, c in np.ndindex(*f.shape[:2]):
        weights = w[n, 0].ravel() if w is not None else np.ones(f[n, c].size)
        kernels = []
        for img, rng_ in ((f[n, c].ravel(), f_range), (m[n, c].ravel(), m_range)):
            lo, hi = rng_ if rng_ is not None else (img[weights > 0].min(), img[weights > 0].max())
            u = np.clip(1 + (img - lo) / (hi - lo) * (bins - 3), 1, bins - 2)
            kernels.append(cubic_bspline(np.arange(bins)[None, :] - u[:, None]))  # [V, bins]
        joint = (kernels[0] * weights[:, None]).T @ kernels[1]
        p = joint / joint.sum()

        def h(q):
            q = q[q > 0]
            return -(q * np.log(q)).sum()

        hf, hm, hj = h(p.sum(1)), h(p.sum(0)), h(p)
        out[n, c] = (hf + hm) / hj if normalized else hf + hm - hj
    return -out.mean(1)


@pytest.mark.parametrize("voxels_per_slice", [None, 100])
@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("d", [2, 3])
def test_mi_matches_dense_reference(normalized, d, voxels_per_slice, rng, monkeypatch):
    if voxels_per_slice:  # the histogram is accumulated (and differentiated) slice by slice
            monkeypatch.setattr(losses, "_HISTOGRAM_SLICE", voxels_per_slice)
    shape = (2, 2, 11, 12) if d == 2 else (1, 2, 21, 20, 22)  # 3D: 18480 voxels over both channels
    f = smooth(rng, shape)
    m = 0.3 * f + smooth(rng, shape)
    w = random_weight(rng, (shape[0], 1, *shape[2:]))
    for bins in (8, 20):
        ours = mutual_information(f, m, w, bins=bins, normalized=normalized)
        ref = mi_reference(f.numpy(), m.numpy(), w.numpy(), bins, normalized)
        assert np.allclose(ours.numpy(), ref, rtol=0, atol=1e-10)
    ours = mutual_information(
        f, m, None, bins=16, normalized=normalized, fixed_range=(10, 90), moving_range=(0, 150)
    )
    ref = mi_reference(f.numpy(), m.numpy(), None, 16, normalized, (10, 90), (0, 150))
    assert np.allclose(ours.numpy(), ref, rtol=0, atol=1e-10)
    if voxels_per_slice:
        small = [x[..., :6, :7, :5] if d == 3 else x[..., :6, :7] for x in (f, m, w)]
        f_, m_ = (x.clone().requires_grad_() for x in small[:2])
        assert torch.autograd.gradcheck(lambda a, b: mutual_information(
            a, b, small[2], bins=8, normalized=normalized, fixed_range=RANGE, moving_range=(-5, 150)),
            (f_, m_), eps=1e-6, atol=1e-6)


def test_mi_of_an_image_with_itself(rng):
    x = smooth(rng, (1, 1, 30, 31))
    shuffled = x.flatten()[torch.as_tensor(rng.permutation(x.numel()))].view_as(x)
    mi_self = -mutual_information(x, x).item()
    # MI(x, x) = 2 H(x) - H(x, x); H(x) from the independent Parzen marginal
    u = 1 + (x.numpy().ravel() - x.min().item()) / (x.max() - x.min()).item() * 29
    p = cubic_bspline(np.arange(32)[None, :] - u[:, None]).sum(0) / u.size
    entropy = -(p[p > 0] * np.log(p[p > 0])).sum()
    assert 0.5 * entropy < mi_self < entropy  # Parzen smoothing costs a little, not a lot
    assert mi_self > 10 * -mutual_information(x, shuffled).item()
    nmi_self = -nmi(x, x).item()
    assert 1.3 < nmi_self <= 2 and nmi_self > -nmi(x, shuffled).item() + 0.2
    # bin coordinates are invariant to an affine intensity map (a decreasing one mirrors them)
    for a, b in ((2.5, -3.0), (-1.0, 0.0)):
        assert mutual_information(x, a * x + b).item() == pytest.approx(-mi_self, abs=1e-10)
        assert nmi(x, a * x + b).item() == pytest.approx(-nmi_self, abs=1e-10)
    # an image independent of x: MI = 0 exactly when the moving image is constant
    assert mutual_information(x, torch.full_like(x, 3.0)).item() == pytest.approx(0.0, abs=1e-12)


def test_mi_float32_uniform_background(rng):
    """A large uniform background must not bias a float32 histogram (chunked accumulation).

    Accumulating this 10^6-voxel volume in a single float32 histogram is off by ~1e-4.
    """
    shape = (1, 1, 100, 100, 100)
    f = torch.zeros(shape, dtype=torch.float64)
    f[..., 25:75, 25:75, 25:75] = torch.as_tensor(rng.uniform(0, 100, size=(50, 50, 50)))
    m = f + torch.as_tensor(rng.uniform(0, 5, size=shape))
    ref = mutual_information(f, m, bins=16)
    got = mutual_information(f.float(), m.float(), bins=16)
    assert got.dtype == torch.float32 and abs(got.item() - ref.item()) < 1e-6


# --------------------------------------------------------------------------- NGF
def ramps(d, spacing):
    """Physical coordinates x, y(, z) of a grid's voxels as images ``[1, 1, *S]``."""
    pts = Grid(SHAPES[d][::-1], spacing).points(torch.float64)  # [1, *S, D], ITK components
    return [pts[..., a].unsqueeze(1) for a in range(d)]


@pytest.mark.parametrize("d", [2, 3])
def test_ngf_values_in_physical_units(d):
    spacing = SPACING[d]
    coords = ramps(d, spacing)
    x, diagonal = coords[0], sum(coords)
    eps = 0.1
    # uniform gradients: cos^2 = 1/d between x and the diagonal, scaled by the relative eps
    expected = 1 - (1 / d) / (1 + eps**2) ** 2
    assert ngf(x, diagonal, spacing=spacing, eps=eps).item() == pytest.approx(expected, abs=1e-12)
    assert ngf(x, coords[1], spacing=spacing).item() == pytest.approx(1.0, abs=1e-12)  # orthogonal
    same = 1 - 1 / (1 + eps**2) ** 2
    assert ngf(x, -3 * x + 1, spacing=spacing, eps=eps).item() == pytest.approx(same, abs=1e-12)
    # ignoring the spacing (or reversing it) gets the angle wrong
    assert abs(ngf(x, diagonal, spacing=spacing[::-1], eps=eps).item() - expected) > 0.05
    assert abs(ngf(x, diagonal, spacing=None, eps=eps).item() - expected) > 0.05


def test_ngf_relative_eps(rng):
    x, y = smooth(rng, (2, 1, 12, 13)), smooth(rng, (2, 1, 12, 13))
    ref = ngf(x, y, spacing=(1.0, 2.0))
    assert torch.allclose(ngf(0.01 * x + 5, 40 * y - 1, spacing=(1.0, 2.0)), ref, rtol=0, atol=1e-12)
    assert (ngf(x, x, spacing=(1.0, 2.0), eps=1e-6) < 1e-6).all()


# --------------------------------------------------------------------------- SSIM
def ssim_reference(f, m, w=None, data_range=None):
    """scipy: Gaussian sums (sigma 1.5, radius 5, zero padding) renormalised by the window's
    weight, then the weighted mean of the SSIM map (``[N, C, *S]`` numpy -> ``[N]``)."""
    g = lambda x: ndimage.gaussian_filter(x, 1.5, truncate=3.5, mode="constant", cval=0.0)  # noqa: E731
    out = np.zeros(f.shape[:2])
    for n, c in np.ndindex(*f.shape[:2]):
        x, y = f[n, c], m[n, c]
        wn = np.ones_like(x) if w is None else w[min(n, len(w) - 1), 0]
        L = data_range or np.ptp(x[wn > 0])
        k = np.maximum(g(wn), 1e-300)  # windows with no weight at all are not counted anyway
        mx, my = g(wn * x) / k, g(wn * y) / k
        vx, vy, cxy = g(wn * x * x) / k - mx**2, g(wn * y * y) / k - my**2, g(wn * x * y) / k - mx * my
        c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
        s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        out[n, c] = 1 - (s * wn).sum() / wn.sum()
    return out.mean(1)


def _ssim_pair(rng, shape):
    f = smooth(rng, shape)
    return f, 0.6 * f + 0.4 * smooth(rng, shape) + 7.0  # related, but not identical


@pytest.mark.parametrize("d", [2, 3])
def test_ssim_matches_references(d, rng):
    shape = (2, 1, 16, 13) if d == 2 else (2, 1, 12, 11, 13)  # scikit-image needs 11 voxels
    f, m = _ssim_pair(rng, shape)
    w = random_weight(rng, (2, 1, *shape[2:]))
    for weight in (None, w, w[:1]):
        ref = ssim_reference(f.numpy(), m.numpy(), None if weight is None else weight.numpy())
        np.testing.assert_allclose(ssim(f, m, weight).numpy(), ref, rtol=0, atol=1e-12)
    ref = ssim_reference(f.numpy(), m.numpy(), data_range=250.0)
    np.testing.assert_allclose(ssim(f, m, data_range=250.0).numpy(), ref, rtol=0, atol=1e-12)
    # the default L is per batch element: a batch is its single calls
    singles = torch.cat([ssim(f[i : i + 1], m[i : i + 1], w[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(ssim(f, m, w), singles, rtol=0, atol=1e-14)
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        return
    inner = (Ellipsis,) + (slice(5, -5),) * d  # scikit-image reflects at the border, then crops it
    ours = losses._ssim_map(f, m, None, data_range=None, sigma=1.5)[0]
    for i in range(2):
        a, b = f[i, 0].numpy(), m[i, 0].numpy()
        mssim, full = structural_similarity(
            a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=np.ptp(a), full=True
        )
        np.testing.assert_allclose(ours[i, 0][inner].numpy(), full[inner], rtol=0, atol=1e-12)
        assert ours[i, 0][inner].mean().item() == pytest.approx(mssim, abs=1e-12)


@pytest.mark.parametrize("d", [2, 3])
def test_ssim_mask_keeps_one_half(d, rng):
    shape = (1, 1, 8, 14) if d == 2 else (1, 1, 5, 6, 12)
    f, m = _ssim_pair(rng, shape)
    w = torch.zeros(1, 1, *shape[2:], dtype=f.dtype)
    w[..., :6] = 1
    half = lambda x: x[..., :6].contiguous()  # noqa: E731
    value = ssim(f, m, w)
    torch.testing.assert_close(value, ssim(half(f), half(m)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(value.numpy(), ssim_reference(half(f).numpy(), half(m).numpy()), rtol=0, atol=1e-12)
    assert abs(value.item() - ssim(f, m).item()) > 1e-3


def test_ssim_identical_images_range_and_scale(rng):
    x, y = _ssim_pair(rng, (2, 1, 9, 8))
    w = random_weight(rng, (2, 1, 9, 8))
    zero = torch.zeros(2, dtype=x.dtype)
    torch.testing.assert_close(ssim(x, x), zero, rtol=0, atol=1e-14)
    torch.testing.assert_close(ssim(x, x, w), zero, rtol=0, atol=1e-14)
    # float32 far from zero: the moments are taken relative to the fixed mean, in units of L
    big = (x + 1e4).float()
    assert ssim(big, big).abs().max().item() < 1e-6
    torch.testing.assert_close(ssim(big, (y + 1e4).float()).double(), ssim(x + 1e4, y + 1e4), rtol=0, atol=1e-5)
    # the default L is the range of the fixed image inside the mask
    inside = x[1, 0][w[1, 0] > 0]
    L = (inside.max() - inside.min()).item()
    torch.testing.assert_close(ssim(x[1:], y[1:], w[1:]), ssim(x[1:], y[1:], w[1:], data_range=L))
    # images and L scaled together: the same value; the loss stays within [0, 2]
    torch.testing.assert_close(ssim(3 * x, 3 * y, data_range=30.0), ssim(x, y, data_range=10.0))
    assert ((ssim(x, -y) > 0) & (ssim(x, -y) <= 2)).all()


@pytest.mark.parametrize("d", [2, 3])
def test_ssim_gradcheck(d, rng):
    shape = (2, 1, 5, 6) if d == 2 else (1, 1, 3, 4, 5)
    f, m = _ssim_pair(rng, shape)
    w = random_weight(rng, (shape[0], 1, *shape[2:]))
    f.requires_grad_(True), m.requires_grad_(True)
    # both images with a given L (the default one has no gradient, so it must not move with f)
    assert torch.autograd.gradcheck(lambda a, b: ssim(a, b, w, data_range=110.0), (f, m), eps=1e-6, atol=1e-6)
    # the moving image with the default L, without and with a weight (random projections: fast)
    fd = f.detach()
    assert torch.autograd.gradcheck(lambda v: ssim(fd, v), (m,), eps=1e-6, atol=1e-6, fast_mode=True)
    assert torch.autograd.gradcheck(lambda v: SSIM()(fd, v, w), (m,), eps=1e-6, atol=1e-6, fast_mode=True)


# --------------------------------------------------------------------------- masks, batches, channels
@pytest.mark.parametrize("name", list(LOSS_FNS))
@pytest.mark.parametrize("d", [2, 3])
def test_values_outside_the_mask_do_not_matter(name, d, rng):
    shape = (1, 1, *(s + 4 for s in SHAPES[d]))
    fixed, moving = smooth(rng, shape), smooth(rng, shape)
    weight = torch.zeros(1, 1, *shape[2:], dtype=torch.float64)
    inner = (Ellipsis,) + (slice(3, -3),) * d
    weight[inner] = torch.as_tensor(rng.uniform(0.3, 1.0, size=weight[inner].shape))
    # NGF differentiates, so it sees one voxel beyond the mask: change only voxels further out
    far = torch.ones_like(weight, dtype=torch.bool)
    far[(Ellipsis,) + (slice(2, -2),) * d] = False
    fn = LOSS_FNS[name]
    if name in ("mi", "nmi"):  # the automatic range is taken over the mask
        fn = lambda f, m, w, d: mutual_information(f, m, w, bins=12, normalized=name == "nmi")  # noqa: E731
    ref = fn(fixed, moving, weight, d)
    noise = lambda: torch.as_tensor(rng.normal(scale=1e3, size=shape))  # noqa: E731
    changed = fn(torch.where(far, noise(), fixed), torch.where(far, noise(), moving), weight, d)
    assert torch.allclose(changed, ref, rtol=0, atol=1e-10)
    # and a boolean mask is the same as a 0/1 weight
    assert torch.allclose(fn(fixed, moving, weight > 0, d), fn(fixed, moving, (weight > 0).double(), d))


@pytest.mark.parametrize("name", list(LOSS_FNS))
def test_batch_equals_single_calls(name, rng):
    d = 3
    shape = (3, 1, *SHAPES[d])
    fixed, moving = smooth(rng, shape), smooth(rng, shape)
    fn = LOSS_FNS[name]
    for weight in (random_weight(rng, (3, 1, *shape[2:])), random_weight(rng, (1, 1, *shape[2:])), None):
        batch = fn(fixed, moving, weight, d)
        singles = []
        for i in range(3):
            w_i = weight if weight is None or len(weight) == 1 else weight[i : i + 1]
            singles.append(fn(fixed[i : i + 1], moving[i : i + 1], w_i, d))
        assert torch.allclose(batch, torch.cat(singles), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(LOSS_FNS))
def test_channels_are_averaged(name, rng):
    d = 2
    shape = (2, 2, *SHAPES[d])
    fixed, moving, weight = smooth(rng, shape), smooth(rng, shape), random_weight(rng, (2, 1, *shape[2:]))
    fn = LOSS_FNS[name]
    per_channel = [fn(fixed[:, c : c + 1], moving[:, c : c + 1], weight, d) for c in range(2)]
    expected = (per_channel[0] + per_channel[1]) / 2
    assert torch.allclose(fn(fixed, moving, weight, d), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(LOSS_FNS))
def test_float32_in_float32_out(name, rng):
    shape = (1, 1, *SHAPES[3])
    fixed, moving = smooth(rng, shape), smooth(rng, shape)
    value32 = LOSS_FNS[name](fixed.float(), moving.float(), None, 3)
    assert value32.dtype == torch.float32
    assert torch.allclose(value32.double(), LOSS_FNS[name](fixed, moving, None, 3), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- validation
def test_error_messages(rng):
    f, m = smooth(rng, (2, 1, 6, 7)), smooth(rng, (2, 1, 6, 7))
    with pytest.raises(ValueError, match=r"fixed \(2, 1, 6, 7\) and moving \(2, 1, 7, 6\)"):
        mse(f, m.transpose(2, 3))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\] or \[N, C, D, H, W\]"):
        ncc(f[0], m[0])
    with pytest.raises(ValueError, match="weight must have shape"):
        ncc(f, m, torch.ones(2, 2, 6, 7))
    with pytest.raises(ValueError, match="weight must have shape"):
        ncc(f, m, torch.ones(3, 1, 6, 7))
    empty = torch.ones(2, 1, 6, 7)
    empty[1] = 0
    with_options = (lambda *a: lncc(*a, radius=1), lambda *a: ngf(*a, spacing=None))
    for fn in (mse, ncc, mutual_information, nmi, ssim, *with_options):
        with pytest.raises(ValueError, match=r"mask is empty .* \[1\]"):
            fn(f, m, empty)
    with pytest.raises(ValueError, match="unknown LNCC kernel"):
        lncc(f, m, radius=1, kernel="triangle")
    with pytest.raises(ValueError, match="radius must be non-negative integers"):
        lncc(f, m, radius=1.5)
    with pytest.raises(ValueError, match="one value per axis"):
        lncc(f, m, radius=(1, 2, 3))
    with pytest.raises(ValueError, match="bins must be an integer >= 4"):
        mutual_information(f, m, bins=3)
    with pytest.raises(ValueError, match="moving_range must be"):
        mutual_information(f, m, moving_range=(5, 5))
    with pytest.raises(ValueError, match="spacing must be positive"):
        ngf(f, m, spacing=(1.0, 0.0))
    with pytest.raises(ValueError, match="needs the grid"):
        LNCC(radius_mm=3)(f, m)
    with pytest.raises(ValueError, match=r"grid of shape \(7, 6\) does not match"):
        NGF()(f, m, grid=Grid((6, 7)))
    with pytest.raises(ValueError, match=r"fixed \(2, 1, 6, 7\) and moving \(2, 1, 7, 6\)"):
        ssim(f, m.transpose(2, 3))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\] or \[N, C, D, H, W\], got shape \(2, 1, 7\)"):
        ssim(f[:, :, 0], m[:, :, 0])  # 1D
    with pytest.raises(ValueError, match="data_range must be positive"):
        ssim(f, m, data_range=0)
    with pytest.raises(ValueError, match="sigma must be positive"):
        SSIM(sigma=0)
    with pytest.raises(ValueError, match=r"grid of shape \(7, 6\) does not match"):
        SSIM()(f, m, grid=Grid((6, 7)))


# --------------------------------------------------------------------------- modules
def test_modules_match_functions(rng):
    grid = Grid((9, 8, 7), (0.8, 2.6, 1.4))  # ITK size; tensor shape (7, 8, 9)
    shape = (2, 1, *grid.shape)
    f, m, w = smooth(rng, shape), smooth(rng, shape), random_weight(rng, (2, 1, *grid.shape))
    assert set(LOSSES) == {"mse", "ncc", "lncc", "mi", "nmi", "ngf", "ssim"}
    cases = [
        (LOSSES["mse"](), mse(f, m, w)),
        (NCC(), ncc(f, m, w)),
        (LNCC(radius=(1, 2, 1), kernel="gaussian"), lncc(f, m, w, radius=(1, 2, 1), kernel="gaussian")),
        (MutualInformation(bins=16), mutual_information(f, m, w, bins=16)),
        (NMI(bins=16), mutual_information(f, m, w, bins=16, normalized=True)),
        (NGF(eps=0.2), ngf(f, m, w, spacing=grid.spacing, eps=0.2)),
        (MSE(), mse(f, m, w)),
        (LOSSES["ssim"](), ssim(f, m, w)),
        (SSIM(data_range=50, sigma=1.0), ssim(f, m, w, data_range=50.0, sigma=1.0)),
    ]
    for module, expected in cases:
        assert torch.equal(module(f, m, w, grid=grid), expected), module
    # radius in mm: round(3 / spacing) per axis, half up, at least 1 -> (4, 1, 2) voxels (ITK)
    module = LNCC(radius_mm=3.0)
    assert module.voxel_radius(grid) == (4, 1, 2)
    assert torch.equal(module(f, m, w, grid=grid), lncc(f, m, w, radius=(4, 1, 2)))
    assert LNCC(radius_mm=(0.1, 3.9, 2.1)).voxel_radius(grid) == (1, 2, 2)
    assert "radius_mm=3.0" in repr(module)
    assert "data_range=None, sigma=1.5" in repr(SSIM())


def test_mutual_information_module_keeps_its_fixed_side_only_while_the_inputs_are_the_same():
    # the module keeps the fixed side across calls; the function computes it every time
    from airlab.losses import MutualInformation, mutual_information

    g = torch.Generator().manual_seed(3)
    fixed, moving = torch.rand(1, 1, 12, 13, generator=g), torch.rand(1, 1, 12, 13, generator=g)
    weight = (torch.rand(1, 1, 12, 13, generator=g) > 0.2).float()
    module = MutualInformation(bins=16)

    def agree():
        assert torch.equal(module(fixed, moving, weight), mutual_information(fixed, moving, weight, bins=16))

    agree()
    agree()  # from the kept side
    weight[0, 0, 3, 4] = 1 - weight[0, 0, 3, 4]  # the moving border crossed a voxel
    agree()
    weight.view(-1)[(fixed * weight).argmax()] = 0  # and uncovered the brightest: a new bin range
    agree()
    fixed.mul_(2).add_(torch.rand(1, 1, 12, 13, generator=g))  # a new fixed image in the same memory
    agree()
    for k in range(12):  # more sublattices than it keeps
        agree_view = fixed[..., k % 3::3, :], moving[..., k % 3::3, :], weight[..., k % 3::3, :]
        assert torch.equal(module(*agree_view), mutual_information(*agree_view, bins=16))
    assert len(module._kept.entries) <= module._kept.size


@pytest.mark.parametrize("normalized", [False, True])
def test_information_from_a_joint_histogram_has_autograds_gradient(normalized):
    # the written derivative against autograd through the plain formula, with empty bins
    g = torch.Generator().manual_seed(5)
    joint = torch.rand(2, 7, 7, dtype=torch.float64, generator=g) * (torch.rand(2, 7, 7, generator=g) > 0.3)
    joint[1, 2, :] = 0  # an empty fixed bin: a zero marginal too
    tiny = torch.finfo(torch.float64).tiny

    def plain(j):
        p = j / j.sum((1, 2), keepdim=True)
        h = [-(q * q.clamp_min(tiny).log()).sum(dims) for q, dims in ((p.sum(2), 1), (p.sum(1), 1), (p, (1, 2)))]
        return (h[0] + h[1]) / h[2] if normalized else h[0] + h[1] - h[2]

    weights = torch.tensor([0.7, -1.3], dtype=torch.float64)
    a, b = joint.clone().requires_grad_(True), joint.clone().requires_grad_(True)
    ours, theirs = losses._Information.apply(a, normalized), plain(b)
    assert torch.equal(ours, theirs)
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    full = (joint + 0.05).requires_grad_(True)  # no empty bin: finite differences are defined everywhere
    assert torch.autograd.gradcheck(lambda j: losses._Information.apply(j, normalized), (full,))


def test_mutual_information_module_keeps_one_fixed_side_per_fixed_image():
    # a new bin range of the same fixed image replaces its entry: at a 1 mm level an entry is
    # some 200 MB, and the range changes whenever the moving border uncovers an extreme voxel
    from airlab.losses import MutualInformation, mutual_information

    g = torch.Generator().manual_seed(4)
    fixed, moving = torch.rand(1, 1, 9, 10, generator=g), torch.rand(1, 1, 9, 10, generator=g)
    weight = torch.ones(1, 1, 9, 10)
    module = MutualInformation(bins=12)
    for k in range(5):  # each round uncovers a new brightest voxel: five ranges of one image
        weight.view(-1)[(fixed * weight).argmax()] = 0
        assert torch.equal(module(fixed, moving, weight), mutual_information(fixed, moving, weight, bins=12))
        assert len(module._kept.entries) == 1
    other = fixed.flip(-1)
    assert torch.equal(module(other, moving, weight), mutual_information(other, moving, weight, bins=12))
    assert len(module._kept.entries) == 2


def test_mutual_information_module_keeps_no_fixed_side_of_a_large_image(monkeypatch):
    from airlab.losses import MutualInformation, _KeptFixedSide, mutual_information

    monkeypatch.setattr(_KeptFixedSide, "voxels", 89)
    g = torch.Generator().manual_seed(6)
    small, large = torch.rand(1, 1, 9, 9, generator=g), torch.rand(1, 1, 9, 10, generator=g)
    module = MutualInformation(bins=12)
    for fixed in (large, small):
        moving = torch.rand(fixed.shape, generator=g)
        assert torch.equal(module(fixed, moving), mutual_information(fixed, moving, bins=12))
    assert [e[0].shape for e in module._kept.entries] == [small.flatten(2).shape]
