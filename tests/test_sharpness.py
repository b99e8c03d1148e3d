"""Sharpness: the measure on hand-checkable images, the matching blur, and the stage option."""

import math

import numpy as np
import pytest
import torch

import airlab as al
from airlab.filters import smooth_mm
from airlab.losses import MSE
from airlab.pipelines import ConfigError, load_config
from airlab.pyramid import Level
from airlab.registration import Registration, Stage
from airlab.sharpness import foreground, match_sharpness, matching_sigma, sharpness
from airlab.transforms import Affine, DenseVelocityField

from conftest import smooth_image


def test_sharpness_of_a_ramp_is_its_slope_over_its_spread():
    """A ramp along x: |gradient| is its slope (per mm) everywhere, the standard deviation of m
    equally spaced values is slope * spacing * sqrt((m^2 - 1) / 12), so the measure is
    1 / (spacing * sqrt((m^2 - 1) / 12)) inside the region, whatever the slope."""
    n, spacing = 40, 2.0
    grid = al.Grid((n, 12), (spacing, 0.5))
    ramp = (1.0 + 3.0 * torch.arange(n, dtype=torch.float64) / n).expand(12, n)[None, None]
    region = torch.zeros_like(ramp, dtype=torch.bool)
    region[..., 5:-5, 5:35] = True
    m = 30
    expected = 1.0 / (spacing * math.sqrt((m * m - 1) / 12))
    assert sharpness(ramp, grid, region) == pytest.approx(expected, rel=1e-9)
    assert sharpness(7.0 * ramp, grid, region) == pytest.approx(expected, rel=1e-9)


def test_foreground_leaves_out_the_boundary():
    image = torch.zeros(1, 1, 30, 30)
    image[..., 5:25, 5:25] = 1.0
    region = foreground(image)
    assert int(region.sum()) == 14 * 14  # eroded by three voxels on each side
    mask = torch.zeros_like(image)
    mask[..., :10, :] = 1.0
    assert not foreground(image, mask)[..., 10:, :].any()


def _blob(grid, seed=0):
    return smooth_image(grid, np.random.default_rng(seed), sigma=2.0) + 10.0  # no background: all foreground


def test_more_blur_reads_less_sharp():
    grid = al.Grid((64, 64), (1.0, 1.0))
    image = _blob(grid)
    values = [sharpness(smooth_mm(image, grid, s), grid) for s in (0.0, 0.5, 1.0, 2.0)]
    assert values == sorted(values, reverse=True) and values[-1] < 0.8 * values[0]


@pytest.mark.parametrize("spacing", [1.0, 0.5])
def test_matching_sigma_recovers_a_known_blur(spacing):
    """An image and its copy blurred by 1 mm: the sigma that makes the image as unsharp as the copy
    is about 1 mm, on a 1 mm and a 0.5 mm grid alike (the measure is in physical units)."""
    n = int(64 / spacing)
    grid = al.Grid((n, n), (spacing, spacing))
    image = smooth_mm(_blob(al.Grid((n, n)), 1), grid, 1.0)  # a smooth image with detail at ~1 mm
    blurred = smooth_mm(image, grid, 1.0)
    region = foreground(image)
    sigma = matching_sigma(image, grid, sharpness(blurred, grid, region), region, max_sigma_mm=3.0)
    assert sigma == pytest.approx(1.0, abs=0.1)
    assert matching_sigma(blurred, grid, sharpness(image, grid, region), region) == 0.0
    # the search stops at 1.5 voxels by default
    assert matching_sigma(image, grid, 0.0, region) == pytest.approx(1.5 * spacing)


def test_match_sharpness_smooths_only_the_sharper_image():
    grid = al.Grid((48, 40), (1.0, 1.0))
    image = smooth_mm(_blob(grid, 2), grid, 0.8).float()
    blurred = smooth_mm(image, grid, 1.2).float()
    for fixed, moving, which in ((image, blurred, "fixed"), (blurred, image, "moving")):
        f, m, (found,) = match_sharpness(fixed, grid, None, moving, grid, None)
        assert found.smoothed == which and found.sigma_mm == pytest.approx(1.2, abs=0.15)
        untouched = m if which == "fixed" else f
        assert torch.equal(untouched, moving if which == "fixed" else fixed)
        assert sharpness(f, grid) == pytest.approx(sharpness(m, grid), rel=0.01)
    f, m, (found,) = match_sharpness(image, grid, None, image.clone(), grid, None)
    assert found.smoothed is None and found.sigma_mm == 0.0 and torch.equal(f, image) and torch.equal(m, image)


def test_match_sharpness_per_pair_of_a_batch():
    grid = al.Grid((40, 40), (1.0, 1.0))
    image = smooth_mm(_blob(grid, 3), grid, 0.8).float()
    blurred = smooth_mm(image, grid, 1.0).float()
    f, m, found = match_sharpness(blurred, grid, None, torch.cat([image, blurred]), grid, None)
    assert [x.smoothed for x in found] == ["moving", None]
    assert f.shape[0] == 1 and m.shape[0] == 2 and torch.equal(m[1:], blurred)
    f, m, found = match_sharpness(image, grid, None, torch.cat([blurred, image]), grid, None)
    assert [x.smoothed for x in found] == ["fixed", None] and f.shape[0] == 2 and torch.equal(f[1:], image)


def test_stage_option_from_the_schema(tmp_path):
    """``match_sharpness: true`` reaches the stage (default off); a value that is not a boolean is
    refused with the key named."""
    base = "stages:\n  - transform: affine\n    losses: [{{name: mse}}]\n    {extra}\n"
    path = tmp_path / "c.yaml"
    grid = al.Grid([20, 20], [1.0, 1.0])
    path.write_text(base.format(extra="match_sharpness: true"))
    assert load_config(path).stages[0].build(0, grid).match_sharpness is True
    path.write_text(base.format(extra="lr: 0.1"))
    assert load_config(path).stages[0].build(0, grid).match_sharpness is False
    path.write_text(base.format(extra="match_sharpness: sometimes"))
    with pytest.raises(ConfigError, match="match_sharpness"):
        load_config(path)


def _register(fixed, moving, match, mask=None):
    def stage():
        return Stage(lambda g, n: DenseVelocityField(g, n, steps=2, grid_shrink=2.0), [(1.0, MSE())],
                     levels=[Level(2.0, 1.0, 5), Level(1.0, 0.0, 5)], optimizer="field-adam", lr=1.0,
                     gradient_sigma=1.0, interpolation="bspline", match_sharpness=match, name="dense")
    affine = Stage(lambda g, n: Affine(g.ndim, n), [(1.0, MSE())], levels=[Level(2.0, 1.0, 5)], lr=0.1,
                   match_sharpness=match)
    return Registration([affine, stage()], progress=False)(fixed, moving, fixed_mask=mask, moving_mask=mask)


def _pair():
    """A texture and a copy of it shifted by whole voxels, and a disk inside them as the mask."""
    grid = al.Grid((40, 36), (1.5, 1.5), (3.0, -2.0))
    y, x = torch.meshgrid(torch.arange(36.0), torch.arange(40.0), indexing="ij")
    disk = ((x - 19.5).square() + (y - 17.5).square() < 15.0 ** 2).float()[None, None]
    image = smooth_mm(_blob(grid, 4), grid, 1.0).float()
    moved = torch.roll(image, shifts=(1, 2), dims=(2, 3))
    return al.Image(image, grid), al.Image(moved, grid), al.Image(disk, grid)


def test_equally_sharp_images_register_as_without_the_option():
    """A moving image that is the fixed one itself: sigma 0 at every level, nothing smoothed, the
    result bit for bit the one without the option."""
    fixed, _, _ = _pair()
    moving = al.Image(fixed.data.clone(), fixed.grid)
    on, off = _register(fixed, moving, True), _register(fixed, moving, False)
    assert all(h["sharpness"][0]["smoothed"] is None for h in on.history)
    assert all("sharpness" not in h for h in off.history)
    with torch.no_grad():
        assert torch.equal(on.transform.displacement(fixed.grid), off.transform.displacement(fixed.grid))


def test_the_sharper_image_is_smoothed_at_every_level():
    """The moving image is the fixed one blurred by 1 mm (2/3 voxel): the fixed one is smoothed by
    about that much at the finest level, and the result changes. (The shifted copy would not do:
    with a few hundred voxels in the mask, the texture that enters and leaves it changes the
    measure by 2%, which reads as half a voxel of blur.)"""
    fixed, _, mask = _pair()
    grid = fixed.grid
    blurred = al.Image(smooth_mm(fixed.data, grid, 1.0).float(), grid)
    result = _register(fixed, blurred, True, mask)
    found = [h["sharpness"][0] for h in result.history]
    assert all(f["smoothed"] in ("fixed", None) for f in found)
    assert found[-1]["smoothed"] == "fixed" and found[-1]["sigma_mm"] == pytest.approx(1.0, abs=0.2)
    plain = _register(fixed, blurred, False, mask)
    with torch.no_grad():
        assert not torch.equal(result.transform.displacement(grid), plain.transform.displacement(grid))
