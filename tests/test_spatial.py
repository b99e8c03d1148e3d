"""Grid geometry and sampling against SimpleITK."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from airlab import Grid, Image, resample, sample
from airlab.splines import bspline_interpolate, evaluate, node_gradient, prefilter

from conftest import DEVICES, oblique_grid, overlapping_grid, random_rotation, smooth_image


@pytest.mark.parametrize("d", [2, 3])
def test_index_physical_match_sitk(d, rng):
    grid = oblique_grid(d, rng)
    image = sitk.Image(grid.size, sitk.sitkFloat32)
    grid.apply_to_sitk(image)
    idx = rng.uniform(-2, 20, size=(40, d))
    ours = grid.index_to_physical(torch.as_tensor(idx)).numpy()
    theirs = np.array([image.TransformContinuousIndexToPhysicalPoint(i) for i in idx.tolist()])
    assert np.abs(ours - theirs).max() < 1e-10
    back = grid.physical_to_index(torch.as_tensor(theirs)).numpy()
    assert np.abs(back - idx).max() < 1e-10
    assert Grid.from_sitk(image) == grid


@pytest.mark.parametrize("d", [2, 3])
def test_normalized_corners(d, rng):
    grid = oblique_grid(d, rng)
    corners = torch.as_tensor([[0.0] * d, [s - 1.0 for s in grid.size]], dtype=torch.float64)
    norm = grid.physical_to_normalized(grid.index_to_physical(corners))
    assert torch.allclose(norm, torch.tensor([[-1.0] * d, [1.0] * d], dtype=torch.float64))


def test_points_layout(rng):
    grid = Grid((4, 3, 2), (1.0, 2.0, 3.0), (10.0, 20.0, 30.0))
    pts = grid.points(torch.float64)
    assert pts.shape == (1, 2, 3, 4, 3)  # tensor order (z, y, x), components (x, y, z)
    assert pts[0, 1, 2, 3].tolist() == [13.0, 24.0, 33.0]


def test_grid_validation():
    with pytest.raises(ValueError, match="spacing must be positive"):
        Grid((3, 3), (1.0, 0.0))
    with pytest.raises(ValueError, match="singular"):
        Grid((3, 3), (1.0, 1.0), (0, 0), (1, 0, 1, 0))
    with pytest.raises(ValueError, match="2D and 3D"):
        Grid((3, 3, 3, 3))
    with pytest.raises(ValueError, match="inconsistent"):
        Grid((3, 3), (1.0, 1.0, 1.0))


def test_with_spacing_keeps_the_centre(rng):
    grid = oblique_grid(3, rng)
    coarse = grid.with_spacing(4.0)
    assert np.allclose(coarse.center(), grid.center())
    assert coarse.spacing == (4.0, 4.0, 4.0) and coarse.direction == grid.direction


@pytest.mark.parametrize("outside", [0.0, -3.5])
@pytest.mark.parametrize("interpolation", ["linear", "nearest", "bspline"])
def test_identity_resample_matches_sitk_everywhere(interpolation, outside, rng):
    """Without a transform the match is exact up to the border, outside value included."""
    moving = oblique_grid(3, rng)
    fixed = overlapping_grid(moving, rng, size=(20, 18, 16))
    data = smooth_image(moving, rng)
    ours = resample(Image(data, moving), fixed, interpolation=interpolation, outside=outside).data[0, 0]
    ref = sitk.Image(fixed.size, sitk.sitkFloat64)
    fixed.apply_to_sitk(ref)
    interp = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}
    theirs = sitk.Resample(Image(data, moving).to_sitk(), ref, sitk.Transform(), interp[interpolation], outside)
    assert np.abs(ours.numpy() - sitk.GetArrayFromImage(theirs)).max() < 1e-8
    assert (ours == outside).any()  # the fixed grid reaches outside the moving image


def test_multichannel_and_labels(rng):
    grid = oblique_grid(2, rng)
    labels = torch.as_tensor(rng.integers(0, 5, size=(1, 1, *grid.shape)), dtype=torch.int16)
    out = resample(Image(labels, grid), overlapping_grid(grid, rng))
    assert out.data.dtype == torch.int16
    assert set(out.data.unique().tolist()) <= set(range(5))
    rgb = smooth_image(grid, rng, channels=3)
    out = resample(Image(rgb, grid), grid)
    assert torch.allclose(out.data, rgb, atol=1e-10)


def test_bspline_prefilter_interpolates(rng):
    data = torch.as_tensor(rng.normal(size=(2, 3, 9, 7, 5)))
    coeffs = prefilter(data)
    kernel = torch.tensor([1 / 6, 4 / 6, 1 / 6], dtype=torch.float64)
    # re-apply the B-spline kernel with mirror boundary along every axis
    out = coeffs
    for axis in (2, 3, 4):
        n = out.shape[axis]
        padded = torch.cat([out.narrow(axis, 1, 1), out, out.narrow(axis, n - 2, 1)], dim=axis)
        out = sum(kernel[k] * padded.narrow(axis, k, n) for k in range(3))
    assert torch.allclose(out, data, atol=1e-12)
    # and evaluation at integer indices returns the samples
    idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in (5, 7, 9)], indexing="ij"), -1)
    vals = bspline_interpolate(data, idx.reshape(1, -1, 3).expand(2, -1, -1))
    assert torch.allclose(vals, data.permute(0, 1, 4, 3, 2).reshape(2, 3, -1), atol=1e-10)


@pytest.mark.parametrize("d", [2, 3])
def test_cubic_sampling_for_registration(d, rng):
    """The registration's cubic sampling (coefficients and node derivatives computed once) gives
    the same values as plain B-spline interpolation; its gradient with respect to the points is
    the exact one at voxel centres, and in between the linear interpolation of those: close to
    the exact one for an image as smooth as a pyramid level (sigma 2 voxels)."""
    grid = oblique_grid(d, rng, size=(14, 12, 11)[:d])
    data = smooth_image(grid, rng, channels=2, sigma=2.0)
    coefficients = prefilter(data)
    spline = (coefficients, node_gradient(coefficients))
    idx = torch.as_tensor(rng.uniform(0, np.asarray(grid.size) - 1, size=(1, 300, d)))
    pts = grid.index_to_physical(idx).requires_grad_(True)
    fast = sample(data, grid, pts, "bspline", outside=None, spline=spline)
    exact = sample(data, grid, pts, "bspline", outside=None)
    assert torch.allclose(fast, exact, atol=1e-12)
    weights = torch.as_tensor(rng.normal(size=fast.shape))
    (g_fast,) = torch.autograd.grad((fast * weights).sum(), pts)
    (g_exact,) = torch.autograd.grad((exact * weights).sum(), pts)
    cos = torch.nn.functional.cosine_similarity(g_fast.flatten(), g_exact.flatten(), dim=0)
    assert cos > 0.97, float(cos)
    # at voxel centres the node derivatives are the spline's own
    nodes = torch.stack(torch.meshgrid(*[torch.arange(2, n - 2, dtype=torch.float64) for n in reversed(grid.size)],
                                       indexing="ij")[::-1], -1).reshape(1, -1, d).requires_grad_(True)
    from airlab.splines import sample_cubic

    (g_nodes,) = torch.autograd.grad((sample_cubic(*spline, nodes) ** 2).sum(), nodes)
    (g_ref,) = torch.autograd.grad((evaluate(coefficients, nodes) ** 2).sum(), nodes)
    assert torch.allclose(g_nodes, g_ref, atol=1e-10)


def test_gradcheck_sample_wrt_points(rng):
    grid = oblique_grid(3, rng, size=(5, 4, 6))
    data = smooth_image(grid, rng, channels=2, sigma=0.8)
    idx = torch.as_tensor(rng.uniform(0.5, np.asarray(grid.size) - 1.5, size=(1, 6, 3)))
    pts = grid.index_to_physical(idx).requires_grad_(True)
    for interpolation in ("linear", "bspline"):
        assert torch.autograd.gradcheck(lambda p: sample(data, grid, p, interpolation), (pts,))


def test_gradcheck_sample_wrt_image(rng):
    grid = Grid((5, 4), (1.3, 0.7))
    data = torch.as_tensor(rng.normal(size=(1, 1, 4, 5))).requires_grad_(True)
    pts = grid.index_to_physical(torch.as_tensor(rng.uniform(0, 3, size=(1, 7, 2))))
    for interpolation in ("linear", "bspline"):
        assert torch.autograd.gradcheck(lambda x: sample(x, grid, pts, interpolation), (data,))


def test_sample_errors(rng):
    grid = Grid((5, 4), (1.0, 1.0))
    with pytest.raises(ValueError, match="does not match"):
        sample(torch.zeros(1, 1, 5, 4), grid, torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match="components"):
        sample(torch.zeros(1, 1, 4, 5), grid, torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="interpolation"):
        sample(torch.zeros(1, 1, 4, 5), grid, torch.zeros(1, 3, 2), "cubic")
    with pytest.raises(ValueError, match="batch"):
        sample(torch.zeros(2, 1, 4, 5), grid, torch.zeros(3, 3, 2))
    with pytest.raises(ValueError, match="3D image onto a 2D grid"):
        resample(Image(torch.zeros(1, 1, 2, 3, 4), Grid((4, 3, 2))), grid)


@pytest.mark.parametrize("device", DEVICES)
def test_device_transparent(device, rng):
    from airlab.transforms import BSplineTransform, Composite, Rigid, StationaryVelocityField

    grid = oblique_grid(3, rng)
    image = Image(smooth_image(grid, rng).float(), grid)
    t = Composite(
        BSplineTransform(grid, 8.0),
        StationaryVelocityField(grid),
        Rigid(3, rotation=[0.1, 0, 0], center=grid.center()),
    )
    cpu = resample(image, grid, t, interpolation="bspline").data
    dev = resample(image.to(device), grid, t.to(device), interpolation="bspline").data
    assert dev.device.type == device
    assert torch.allclose(dev.cpu(), cpu, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gradients_match_cpu(rng):
    from airlab.transforms import Affine

    grid = oblique_grid(3, rng)
    image = Image(smooth_image(grid, rng).float(), grid)
    grads = []
    for device in ("cpu", "cuda"):
        t = Affine(3, center=grid.center()).to(device)
        resample(image.to(device), grid, t).data.square().mean().backward()
        grads.append(t.linear.grad.cpu())
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("outside", [0.0, None])
def test_sample_grid_equals_sample_at_the_points(d, outside, rng):
    """The separable path (target axes along the source's) and the fallback give sample()."""
    from airlab.spatial import sample_grid

    grid = oblique_grid(d, rng)
    data = smooth_image(grid, rng, channels=2).to(torch.float64).expand(3, -1, *grid.shape)
    spacing = np.asarray(grid.spacing) * rng.uniform(0.4, 2.5, size=d)
    size = rng.integers(5, 30, size=d)
    # origin shifted so that part of the target lies beyond the source (outside / border values)
    origin = np.asarray(grid.origin) + grid.direction_matrix @ rng.uniform(-8, 8, size=d)
    aligned = Grid(size, spacing, origin, grid.direction)
    rotated = Grid(size, spacing, origin, random_rotation(d, rng).ravel())
    for target in (aligned, rotated, grid.subgrid(2, [1] * d), grid):
        ref = sample(data, grid, target.points(torch.float64), "linear", outside=outside)
        assert torch.allclose(sample_grid(data, grid, target, outside=outside), ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("d", [2, 3])
def test_sample_grid_with_filters_is_smoothing_then_sampling(d, rng):
    """Filters folded into the interpolation matrices (the engine's pyramid) give what smoothing
    the whole image first and sampling it gives, on aligned and rotated targets."""
    from airlab.filters import convolution_matrix, gaussian_kernel, smooth_mm
    from airlab.spatial import sample_grid

    grid = oblique_grid(d, rng)
    data = smooth_image(grid, rng, channels=2).to(torch.float64)
    sigma = 1.7  # mm
    filters = [convolution_matrix(gaussian_kernel(sigma / s, dtype=torch.float64), n)
               for n, s in zip(grid.size, grid.spacing)]
    smoothed = smooth_mm(data, grid, sigma)
    aligned = grid.with_spacing(np.asarray(grid.spacing) * 2.5)
    rotated = Grid(aligned.size, aligned.spacing, aligned.origin, random_rotation(d, rng).ravel())
    for target in (aligned, rotated):
        ref = sample(smoothed, grid, target.points(torch.float64), "linear", outside=None)
        assert torch.allclose(sample_grid(data, grid, target, outside=None, filters=filters), ref,
                              atol=1e-10, rtol=0)


@pytest.mark.parametrize("d", [2, 3])
def test_interpolation_steps_are_the_matrices(d, rng):
    """Axes with the source's spacing (a dense velocity on a strided level) become views, means
    and blends of two views: the matrices' numbers (bit for bit where every axis is a view or a
    mean), and their gradient; other axes keep their matrix."""
    from airlab.filters import apply_axis_weights
    from airlab.spatial import apply_interpolation, interpolation_matrices, interpolation_steps

    def coarse(level):
        return level.with_spacing(np.asarray(level.spacing) * 2)

    odd = oblique_grid(d, rng, size=(19, 17, 13)[:d])  # the coarse grid's voxels: every other one
    even = oblique_grid(d, rng, size=(18, 16, 12)[:d])  # a quarter of a coarse voxel off them
    pairs = [(coarse(odd), odd.subgrid(2, o)) for o in ([0] * d, [1] * d, [1, 0, 1][:d], [0, 1, 1][:d])]
    pairs += [(coarse(odd), odd), (coarse(odd), odd.subgrid(3, [1] * d)), (coarse(odd), coarse(odd))]
    pairs += [(coarse(even), even.subgrid(2, o)) for o in ([0] * d, [1] * d)]
    source = coarse(odd)  # and a grid of its spacing a quarter of a voxel on: blends
    quarter = source.direction_matrix @ (0.25 * np.asarray(source.spacing))
    pairs += [(source, Grid(np.asarray(source.size) - 1, source.spacing, np.asarray(source.origin) + quarter,
                            source.direction))]
    kinds = set()
    for source, target in pairs:
        x = torch.as_tensor(rng.normal(size=(2, 3, *source.shape)), dtype=torch.float32).requires_grad_()
        steps = interpolation_steps(source, target, 0.0, torch.float32)
        kinds |= {"matrix" if not isinstance(s, tuple) else {0.0: "view", 0.5: "half"}.get(s[2], "blend")
                  for s in steps}
        ours = apply_interpolation(x, steps)
        ref = apply_axis_weights(x, interpolation_matrices(source, target, 0.0, None, torch.float32))
        if all(not isinstance(s, tuple) or s[2] in (0.0, 0.5) for s in steps):
            assert torch.equal(ours, ref), target
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
        w = torch.randn_like(ref)
        (g_ours,) = torch.autograd.grad((ours * w).sum(), x)
        (g_ref,) = torch.autograd.grad((ref * w).sum(), x)
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-6, atol=1e-6)
    assert kinds == {"view", "half", "blend", "matrix"}
    # every sublattice of a strided level of odd sizes (MNI152's, at 1 and 2 mm): no matrix on any
    # axis (with even sizes the outer voxels lie beyond the coarse grid, and take the matrix's border rule)
    for offset in ([0] * d, [1] * d):
        assert all(isinstance(s, tuple) for s in interpolation_steps(coarse(odd), odd.subgrid(2, offset)))


def test_sample_grid_gradient(rng):
    from airlab.spatial import sample_grid

    grid = Grid((5, 4, 3), (2.0, 1.5, 3.0), (1.0, -2.0, 0.5))
    target = Grid((7, 3, 4), (1.1, 2.0, 2.5), (0.3, -2.5, 1.0))
    x = torch.as_tensor(rng.normal(size=(1, 3, *grid.shape))).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: sample_grid(t, grid, target), (x,))


@pytest.mark.parametrize("d", [2, 3])
def test_threaded_grid_sample_is_grid_sample(d, rng):
    """spatial.grid_sample splits one image's points over the CPU threads: same values, same
    gradients for the image and the points as one F.grid_sample call."""
    import torch.nn.functional as F

    from airlab.spatial import grid_sample

    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # an odd count: the points do not divide evenly
    try:
        shape = (7, 9, 8)[:d]
        data = torch.as_tensor(rng.normal(size=(1, 2, *shape))).requires_grad_()
        grid = torch.as_tensor(rng.uniform(-1.2, 1.2, size=(1, 80, 41, d))).requires_grad_()  # > 1024 per thread
        if d == 3:
            grid = grid.unsqueeze(1)
        for padding in ("zeros", "border"):
            ours = grid_sample(data, grid, padding)
            ref = F.grid_sample(data, grid, mode="bilinear", padding_mode=padding, align_corners=True)
            weights = torch.as_tensor(rng.normal(size=ref.shape))
            g_ours = torch.autograd.grad((ours * weights).sum(), (data, grid))
            g_ref = torch.autograd.grad((ref * weights).sum(), (data, grid))
            assert ours.shape == ref.shape and torch.allclose(ours, ref, atol=1e-12, rtol=0)
            assert all(torch.allclose(a, b, atol=1e-10, rtol=0) for a, b in zip(g_ours, g_ref))
    finally:
        torch.set_num_threads(threads)
