"""`airlab.register`: the forms Python users hold go in, and come back out."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import airlab as al
from airlab.datasets import example_path
from airlab.synthetic import random_deformation

FIXED = example_path("mni152_t1_1mm_axial")
OBLIQUE_3D = al.Grid([7, 6, 5], [0.8, 1.1, 2.5], [3.0, -4.0, 12.0],
                     [0.0, 0.6, 0.8, 1.0, 0.0, 0.0, 0.0, 0.8, -0.6])


def test_nibabel_and_simpleitk_read_a_file_into_the_same_image(tmp_path):
    nibabel = pytest.importorskip("nibabel")
    data = torch.arange(7 * 6 * 5, dtype=torch.float32).reshape(1, 1, 5, 6, 7)
    al.write_image(al.Image(data, OBLIQUE_3D), tmp_path / "x.nii.gz")
    by_sitk = al.read_image(tmp_path / "x.nii.gz")
    by_nib = al.Image.from_nibabel(nibabel.load(tmp_path / "x.nii.gz"))
    assert torch.equal(by_nib.data.float(), by_sitk.data.float())
    assert by_nib.grid.same_as(by_sitk.grid, atol=1e-5)
    back = al.Image.from_nibabel(by_sitk.to_nibabel())
    assert torch.equal(back.data.float(), data) and back.grid.same_as(OBLIQUE_3D, atol=1e-5)


@pytest.fixture(scope="module")
def pair():
    fixed = al.read_image(FIXED).to(torch.float32)
    with torch.no_grad():
        moving = al.resample(fixed, fixed.grid, random_deformation(fixed.grid, 2))
    return fixed, moving


def test_register_takes_paths_images_and_simpleitk_images_alike(pair, tmp_path):
    fixed, moving = pair
    al.write_image(moving, tmp_path / "moving.nii.gz")
    by_path = al.register(str(FIXED), tmp_path / "moving.nii.gz", preset="affine")
    by_sitk = al.register(fixed.to_sitk(), moving.to_sitk(), preset="affine")
    by_image = al.register(fixed, moving, preset="affine")
    a, b, c = (r.displacement_field().field for r in (by_path, by_sitk, by_image))
    assert not c.requires_grad and c.numpy().shape == (1, 2, *fixed.grid.shape)
    assert torch.allclose(a, c, atol=1e-5) and torch.allclose(b, c, atol=1e-5)
    warped = by_image.warp(moving.to_sitk())
    assert isinstance(warped.to_sitk(), sitk.Image) and warped.grid.same_as(fixed.grid)
    assert by_image.outputs.metrics["pipeline"]["stages"][-1]["transform"] == "affine"
    with pytest.raises(al.InputError, match="the moving image must be a path"):
        al.register(fixed, np.zeros((3, 3)))
