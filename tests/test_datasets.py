"""The shipped example data: geometry and tissue labels that mean what their names say."""

import numpy as np
import pytest

from airlab.datasets import example_path, mni152


def test_tissue_labels_are_grey_and_white_matter():
    # nilearn stores probabilities x 255; thresholding the raw values at 0.5 once made "grey matter"
    # a rim of background and "white matter" the whole brain. Volumes and T1 intensities catch that.
    image, tissue = mni152()
    assert tissue.grid == image.grid
    t1, labels = image.data[0, 0].float().numpy(), tissue.data[0, 0].numpy()
    voxel_ml = float(np.prod(image.grid.spacing)) / 1000.0
    gm, wm = labels == 1, labels == 2
    assert 700 < gm.sum() * voxel_ml < 1300  # the 2009a template's brain is large: about 1.1 l grey
    assert 450 < wm.sum() * voxel_ml < 800  # and 0.6 l white matter
    head = (t1 > 20) & ~gm & ~wm  # CSF, skull, scalp
    # T1 weighting: white matter brighter than grey, grey brighter than CSF
    assert np.median(t1[wm]) > np.median(t1[gm]) + 20 > np.median(t1[head]) + 40


def test_unknown_example_is_a_clear_error():
    with pytest.raises(KeyError, match="no example named"):
        example_path("mni152_t2")
