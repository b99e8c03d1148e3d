"""Input checks, normalisation and initialisation (airlab.inputs): every problem is refused with
one line naming the image and the field, before any work."""

import numpy as np
import pytest
import torch

import airlab as al
from airlab.errors import AirlabError, InputError, RegistrationError
from airlab.inputs import check_geometry, normalise, prepare_pair, quantile
from airlab.losses import MSE
from airlab.registration import Level, Registration, Stage
from airlab.transforms import Translation


def _image(spacing=(2.0, 2.0, 2.0), direction=None, shape=(12, 10, 8)):
    data = torch.rand(1, 1, *reversed(shape), generator=torch.Generator().manual_seed(0))
    return al.Image(data, al.Grid(list(shape), list(spacing), [0.0] * len(shape), direction))


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 4097])
def test_quantile_by_selection_is_torch_quantile(n):
    values = torch.randn(n, generator=torch.Generator().manual_seed(n)) ** 3
    for q in (0.0, 0.01, 0.5, 0.99, 1.0):
        assert quantile(values, q) == pytest.approx(float(torch.quantile(values, q)), rel=1e-6, abs=1e-7)


def test_normalise_maps_percentiles_to_unit_range():
    x = torch.linspace(0, 100, 1001).reshape(1, 1, 11, 91)
    out = normalise(x, None)
    assert float(out.flatten().kthvalue(11).values) == pytest.approx(0.0, abs=1e-6)
    assert float(out.flatten().kthvalue(991).values) == pytest.approx(1.0, abs=1e-6)


def test_a_unit_error_in_the_header_is_refused_before_any_allocation():
    """A moving header saying 1e-9 mm made the pyramid ask for a 192 GB smoothing kernel."""
    fixed = _image()
    moving = _image(spacing=(1e-9, 1e-9, 1e-9))
    with pytest.raises(RegistrationError, match="moving image's spacing along x is 1e-09 mm"):
        prepare_pair(fixed, moving)
    with pytest.raises(RegistrationError, match=r"moving image's voxels .* times smaller than the fixed"):
        prepare_pair(fixed, _image(spacing=(1e-3, 1e-3, 1e-3)))


def test_a_direction_that_is_not_orthonormal_is_refused():
    sheared = [1.0, 0.3, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    with pytest.raises(RegistrationError, match="fixed image's direction cosines are not orthonormal"):
        check_geometry(_image(direction=sheared).grid, "fixed")
    check_geometry(_image(direction=[0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0]).grid, "fixed")


def test_every_input_error_is_an_airlab_error_and_a_value_error():
    fixed = _image()
    bad = al.Image(fixed.data.clone(), fixed.grid)
    bad.data[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="moving image has 1 NaN") as info:
        prepare_pair(fixed, bad)
    assert isinstance(info.value, AirlabError) and isinstance(info.value, ValueError)


def test_prepared_pair_holds_normalised_intensities_and_masks():
    fixed, moving = _image(), _image(spacing=(1.5, 2.0, 2.5))
    mask = al.Image((fixed.data > 0.5).to(torch.uint8), fixed.grid)
    pair = prepare_pair(fixed, moving, fixed_mask=mask)
    assert pair.batch == 1 and pair.fixed_mask is not None
    inside = pair.fixed[pair.fixed_mask > 0]
    assert float(inside.min()) < 0.05 and np.isclose(float(inside.flatten().kthvalue(int(0.99 * inside.numel())).values), 1.0,
                                                     atol=0.05)


# ----------------------------------------------------------------- refused by the engine (2D case)
def _one_stage():
    return Registration([Stage(lambda g, n: Translation(g.ndim, n), [(1.0, MSE())], levels=[Level(1, 0.0, 2)])],
                        progress=False)


def test_nan_pixels_are_refused(pair):
    fixed, moving, _ = pair
    bad = moving.data.clone()
    bad[0, 0, 10, 10] = float("nan")
    with pytest.raises(RegistrationError, match="moving image has 1 NaN"):
        _one_stage()(fixed, al.Image(bad, moving.grid))


def test_constant_image_is_refused(pair):
    fixed, moving, _ = pair
    with pytest.raises(RegistrationError, match="fixed image is constant"):
        _one_stage()(al.Image(torch.ones_like(fixed.data), fixed.grid), moving)


def test_empty_mask_is_refused(pair):
    fixed, moving, _ = pair
    mask = al.Image(torch.zeros_like(fixed.data, dtype=torch.uint8), fixed.grid)
    with pytest.raises(RegistrationError, match="fixed mask is empty"):
        _one_stage()(fixed, moving, fixed_mask=mask)


def test_dimension_mismatch_is_refused(pair):
    fixed, _, _ = pair
    volume = al.Image(torch.rand(1, 1, 4, 5, 6), al.Grid((6, 5, 4)))
    with pytest.raises(RegistrationError, match="3D moving image to a 2D fixed image"):
        _one_stage()(fixed, volume)


def test_no_overlap_is_refused(pair):
    fixed, moving, _ = pair
    far = al.Image(moving.data, al.Grid(moving.grid.size, moving.grid.spacing, np.add(moving.grid.origin, 5000.0),
                                          moving.grid.direction))
    with pytest.raises(RegistrationError, match="do not overlap"):
        Registration([Stage(lambda g, n: Translation(2, n), [(1.0, MSE())], levels=[Level(1, 0.0, 2)])],
                     progress=False, initialisation=None)(fixed, far)


def _oblique_grid(shape):
    """An anisotropic grid turned about two axes (3D) or one (2D), away from the origin."""
    d = len(shape)
    if d == 3:
        a, b = 0.3, -0.5
        rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
        direction = (rz @ rx).ravel().tolist()
    else:
        direction = [np.cos(0.4), -np.sin(0.4), np.sin(0.4), np.cos(0.4)]
    return al.Grid(list(shape), [1.3, 0.7, 2.1][:d], [-40.0, 12.0, 7.5][:d], direction)


@pytest.mark.parametrize("shape", [(13, 9, 7), (17, 11)])
def test_centre_of_mass_and_radius_of_gyration_match_the_voxel_positions(shape):
    """The moments come from sums along axes; the reference takes every voxel's position."""
    from airlab.inputs import _center_of_mass, radius_of_gyration

    grid = _oblique_grid(shape)
    g = torch.Generator().manual_seed(len(shape))
    data = torch.rand(2, 2, *reversed(shape), generator=g, dtype=torch.float64)
    mask = (torch.rand(1, 1, *reversed(shape), generator=g) > 0.4).double()
    points = grid.points(torch.float64)  # [1, *S, D]
    for m in (None, mask):
        w = data.mean(1) - data.mean(1).flatten(1).amin(1).view(-1, *([1] * len(shape)))
        w = w if m is None else w * m[:, 0]
        expected = (w.unsqueeze(-1) * points).flatten(1, -2).sum(1) / w.flatten(1).sum(1, keepdim=True)
        torch.testing.assert_close(_center_of_mass(data, grid, m), expected, rtol=0, atol=1e-9)
        kept = points.reshape(-1, len(shape)) if m is None else points.reshape(-1, len(shape))[m.reshape(-1) > 0]
        radius = float((kept - kept.mean(0)).square().sum(-1).mean().sqrt())
        assert radius_of_gyration(grid, m) == pytest.approx(radius, rel=1e-12)


def test_centre_of_mass_of_a_flat_image_is_the_grid_centre():
    from airlab.inputs import _center_of_mass

    grid = _oblique_grid((6, 5, 4))
    centre = _center_of_mass(torch.ones(1, 1, 4, 5, 6, dtype=torch.float64), grid, None)
    np.testing.assert_allclose(centre[0].numpy(), grid.center(), atol=1e-9)
