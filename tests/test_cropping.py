"""Cropping keeps the geometry exactly (against SimpleITK); the table is removed from a CT phantom."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import airlab as al
from airlab.cropping import auto_crop, crop, foreground_box, remove_bed
from airlab.errors import InputError

from conftest import random_rotation


def _oblique(size, spacing, seed=0):
    rng = np.random.default_rng(seed)
    d = len(size)
    return al.Grid(size, spacing, rng.uniform(-50, 50, d), random_rotation(d, rng).flatten())


@pytest.mark.parametrize("size,spacing", [((30, 24), (1.5, 0.7)), ((20, 18, 16), (1.5, 2.0, 3.0))])
def test_auto_crop_matches_simpleitk(size, spacing):
    grid = _oblique(size, spacing)
    gen = torch.Generator().manual_seed(0)
    data = torch.zeros(1, 1, *grid.shape)
    inner = tuple(slice(3 + k, n - 4 - k) for k, n in enumerate(grid.shape))
    data[(0, 0, *inner)] = torch.rand(*[s.stop - s.start for s in inner], generator=gen) + 0.5
    image = al.Image(data, grid)
    reference = image.to_sitk()
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(reference != 0, sitk.sitkUInt8))
    box = stats.GetBoundingBox(1)  # (index..., size...)
    d = grid.ndim
    lower, upper = foreground_box(image)
    assert tuple(lower) == box[:d] and tuple(upper - lower) == box[d:]
    cropped = auto_crop(image)
    roi = sitk.RegionOfInterest(reference, box[d:], box[:d])
    np.testing.assert_allclose(cropped.grid.origin, roi.GetOrigin(), atol=1e-9)
    assert cropped.grid.size == roi.GetSize() and cropped.grid.spacing == roi.GetSpacing()
    np.testing.assert_allclose(cropped.grid.direction, roi.GetDirection(), atol=1e-12)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(cropped.to_sitk()), sitk.GetArrayFromImage(roi))
    # the same physical points: resampling the original onto the cropped grid changes nothing
    with torch.no_grad():
        again = al.resample(image, cropped.grid)
    torch.testing.assert_close(again.data, cropped.data, atol=1e-5, rtol=0)
    # a margin in mm: whole voxels, at least the margin, clipped to the image
    pad = np.ceil(8.0 / np.asarray(spacing) - 1e-9).astype(int)
    wide_lower, wide_upper = foreground_box(image, margin_mm=8.0)
    np.testing.assert_array_equal(wide_lower, np.maximum(lower - pad, 0))
    np.testing.assert_array_equal(wide_upper, np.minimum(upper + pad, grid.size))
    assert (wide_lower < lower).any() and (wide_lower == 0).any()  # the margin reached the border


def test_crop_refusals():
    image = al.Image(torch.zeros(1, 1, 6, 5), al.Grid((5, 6)))
    with pytest.raises(InputError, match="nothing to crop to"):
        auto_crop(image)
    with pytest.raises(InputError, match="margin"):
        foreground_box(image, margin_mm=-1.0)
    with pytest.raises(InputError, match=r"crop box \(0, 0\)..\(6, 6\) is not inside"):
        crop(image, (0, 0), (6, 6))


def _phantom():
    """A CT-like volume: air, an ellipsoidal body (40 HU) with an enclosed lung (-800 HU), and
    a table (300 HU) below it joined to the body by a thin strut."""
    grid = al.Grid((48, 40, 30), (1.5, 1.5, 2.0), (10.0, -20.0, 5.0))
    z, y, x = np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij")
    body = ((x - 24) / 18.0) ** 2 + ((y - 17) / 12.0) ** 2 + ((z - 15) / 11.0) ** 2 <= 1
    lung = ((x - 24) / 7.0) ** 2 + ((y - 17) / 5.0) ** 2 + ((z - 15) / 5.0) ** 2 <= 1
    table = (y >= 33) & (y <= 34)
    strut = (x == 24) & (z == 15) & (y > 25) & (y < 33)
    volume = np.full(grid.shape, -1000.0, dtype=np.float32)
    volume[body] = 40.0
    volume[lung] = -800.0
    volume[table | strut] = 300.0
    return al.Image(torch.from_numpy(volume)[None, None], grid), body, table | strut


def test_remove_bed_keeps_the_body_and_drops_the_table():
    image, body, table = _phantom()
    out, mask = remove_bed(image)
    m = mask.data[0, 0].numpy().astype(bool)
    assert mask.is_label and mask.grid is image.grid
    assert (m == body).mean() > 0.995 and not m[table & ~body].any()
    values = out.data[0, 0].numpy()
    assert (values[table & ~body] == -1024.0).all()
    np.testing.assert_array_equal(values[m], image.data[0, 0].numpy()[m])  # the lung kept its -800 HU
    # without the opening the strut joins the table to the body
    _, joined = remove_bed(image, opening_mm=0.0)
    assert joined.data[0, 0].numpy().astype(bool)[table].all()
    cropped, cropped_mask = remove_bed(image, crop_to_body=True)
    assert cropped.grid.size == cropped_mask.grid.size and np.prod(cropped.grid.size) < 0.5 * np.prod(image.grid.size)
    with torch.no_grad():
        torch.testing.assert_close(al.resample(out, cropped.grid).data, cropped.data, atol=1e-2, rtol=0)  # float32 points
    with pytest.raises(InputError, match="one single-channel image"):
        remove_bed(al.Image(image.data.expand(2, 1, *image.grid.shape), image.grid))
    with pytest.raises(InputError, match="no body found"):
        remove_bed(image, lower=5000.0, upper=6000.0)
