"""Every transform, 2D and 3D, on oblique anisotropic grids, against SimpleITK."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from airlab import Image, resample
from airlab.transforms import from_sitk, read_transform, to_sitk, write_transform

from conftest import KINDS, make_transform, oblique_grid, overlapping_grid, smooth_image

SITK_INTERP = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}


def _interior(moving_grid, transform, reference_grid, margin=2.0):
    """Reference voxels whose mapped position lies ``margin`` voxels inside the moving image."""
    with torch.no_grad():
        pts = transform(reference_grid.points(torch.float64))
        idx = moving_grid.physical_to_index(pts)[0].numpy()
    return ((idx > margin) & (idx < np.asarray(moving_grid.size) - 1 - margin)).all(-1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d", [2, 3])
def test_points_match_sitk(kind, d, rng):
    moving = oblique_grid(d, rng)
    fixed = overlapping_grid(moving, rng)
    t = make_transform(kind, fixed, rng, dtype=torch.float32)
    tx = to_sitk(t)
    # points inside, near and outside the domain of the deformable transforms
    pts = fixed.index_to_physical(torch.as_tensor(rng.uniform(-3, np.asarray(fixed.size) + 2, (300, d)))).numpy()
    ours = t.transform_points(pts)
    theirs = np.array([tx.TransformPoint(p) for p in pts.tolist()])
    assert ours.shape == pts.shape
    assert np.abs(ours - theirs).max() < 1e-4


@pytest.mark.parametrize("interpolation", ["linear", "nearest", "bspline"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d", [2, 3])
def test_resample_matches_sitk(kind, d, interpolation, rng):
    moving = oblique_grid(d, rng)
    fixed = overlapping_grid(moving, rng)
    data = smooth_image(moving, rng).float()
    t = make_transform(kind, fixed, rng, dtype=torch.float32)
    ours = resample(Image(data, moving), fixed, t, interpolation=interpolation, outside=-5.0)
    assert ours.grid == fixed
    reference = sitk.Image(fixed.size, sitk.sitkFloat32)
    fixed.apply_to_sitk(reference)
    theirs = sitk.Resample(Image(data, moving).to_sitk(), reference, to_sitk(t), SITK_INTERP[interpolation], -5.0)
    a, b = ours.data[0, 0].detach().numpy(), sitk.GetArrayFromImage(theirs)
    inner = _interior(moving, t.double(), fixed)
    assert inner.sum() > 0.2 * inner.size, "test geometry leaves too little overlap"
    err = np.abs(a - b)[inner]
    if interpolation == "nearest":
        # float32 vs float64 positions may round a handful of exact half-way points differently
        assert (err > 1e-4).mean() < 0.002
    else:
        assert err.max() < 1e-4 * 100.0  # 1e-4 of the intensity range


@pytest.mark.parametrize("suffix", [".txt", ".tfm", ".mat", ".h5"])
@pytest.mark.parametrize("kind", ["translation", "rigid", "similarity", "affine"])
@pytest.mark.parametrize("d", [2, 3])
def test_linear_file_round_trip(kind, d, suffix, rng, tmp_path):
    fixed = oblique_grid(d, rng)
    t = make_transform(kind, fixed, rng)
    path = tmp_path / f"t{suffix}"
    write_transform(t, path)
    assert sitk.ReadTransform(str(path)) is not None
    back = read_transform(path, dtype=torch.float64)
    pts = rng.normal(size=(50, d)) * 40
    assert np.abs(back.transform_points(pts) - t.transform_points(pts)).max() < 1e-5
    # the kind survives where ITK has one
    assert type(back).__name__ == type(t).__name__ or suffix == ".mat"


@pytest.mark.parametrize("kind", ["bspline", "displacement", "velocity", "composite"])
@pytest.mark.parametrize("d", [2, 3])
def test_deformable_round_trip(kind, d, rng, tmp_path):
    fixed = oblique_grid(d, rng)
    t = make_transform(kind, fixed, rng)
    pts = fixed.index_to_physical(torch.as_tensor(rng.uniform(0, np.asarray(fixed.size) - 1, (80, d)))).numpy()
    expected = t.transform_points(pts)
    # in memory through SimpleITK
    assert np.abs(from_sitk(to_sitk(t)).transform_points(pts) - expected).max() < 1e-5
    # through files: ITK transform files, and displacement-field images for dense fields
    suffixes = [".h5"] if kind != "bspline" else [".txt", ".h5"]
    if kind in ("displacement", "velocity"):
        suffixes.append(".nii.gz")
    for suffix in suffixes:
        path = tmp_path / f"t{suffix}"
        write_transform(t, path)
        back = read_transform(path, dtype=torch.float64)
        assert np.abs(back.transform_points(pts) - expected).max() < 1e-5, suffix


def test_ants_style_mat_file(rng, tmp_path):
    """ANTs writes ``AffineTransform_float_3_3`` MATLAB v4 files; they read back exactly."""
    from scipy.io import savemat

    m = np.eye(3) + rng.normal(size=(3, 3)) * 0.05
    t, c = rng.normal(size=3), rng.normal(size=3) * 10
    params = np.concatenate([m.ravel(), t]).astype(np.float32)
    path = tmp_path / "ants0GenericAffine.mat"
    savemat(path, {"AffineTransform_float_3_3": params[:, None], "fixed": c.astype(np.float32)[:, None]}, format="4")
    back = read_transform(path, dtype=torch.float64)
    pts = rng.normal(size=(20, 3)) * 30
    m32, t32, c32 = params[:9].reshape(3, 3).astype(float), params[9:].astype(float), c.astype(np.float32).astype(float)
    expected = (pts - c32) @ m32.T + c32 + t32
    assert np.abs(back.transform_points(pts) - expected).max() < 1e-4


def test_composite_order_matches_itk(rng):
    """``Composite(a, b)(x) == b(a(x))`` and ITK's composite agrees."""
    fixed = oblique_grid(3, rng)
    a = make_transform("bspline", fixed, rng)
    b = make_transform("affine", fixed, rng)
    pts = rng.normal(size=(30, 3)) * 5 + fixed.center()
    from airlab.transforms import Composite

    both = Composite(a, b)
    assert np.allclose(both.transform_points(pts), b.transform_points(a.transform_points(pts)))
    tx = to_sitk(both)
    assert np.allclose([tx.TransformPoint(p) for p in pts.tolist()], both.transform_points(pts), atol=1e-8)


def test_itk_rigid_types_import_as_rigid(rng):
    e = sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.1, -0.2, 0.3, (4.0, 5.0, 6.0))
    t = from_sitk(e)
    assert type(t).__name__ == "Rigid"
    pts = rng.normal(size=(10, 3)) * 20
    assert np.allclose(t.transform_points(pts), [e.TransformPoint(p) for p in pts.tolist()], atol=1e-10)


@pytest.mark.parametrize("d", [2, 3])
def test_bspline_domain_corners(d, rng):
    """The domain's first and last voxels lie exactly on the B-spline's valid-region limits.
    ITK's answer there depends on rounding (it moves a point within 4 ULPs of the upper limit
    inside, and counts the rest by a strict comparison); ours counts them all as inside, on
    both evaluation paths, and agrees with ITK wherever ITK counts them inside too."""
    domain = oblique_grid(d, rng)
    t = make_transform("bspline", domain, rng)
    tx = to_sitk(t)
    corners = np.array(np.meshgrid(*[[0, s - 1] for s in domain.size], indexing="ij")).reshape(d, -1).T
    pts = domain.index_to_physical(torch.as_tensor(corners, dtype=torch.float64)).numpy()
    theirs = np.array([tx.TransformPoint(p) for p in pts.tolist()])
    ours = t.transform_points(pts)
    assert (np.abs(ours - pts).max(1) > 1e-3).all()  # every corner moves
    itk_inside = np.abs(theirs - pts).max(1) > 0
    assert itk_inside.any() and np.abs(ours - theirs)[itk_inside].max() < 1e-6
    with torch.no_grad():
        field = t.displacement(domain)[0].reshape(d, -1).T.numpy()  # tensor order: x fastest
    flat = [int(np.ravel_multi_index(tuple(c[::-1]), domain.shape)) for c in corners]
    assert np.abs(pts + field[flat] - ours).max() < 1e-9
