"""Gaussian smoothing against scipy.ndimage."""

import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from airlab import Grid
from airlab.filters import gaussian_smooth, smooth_mm


@pytest.mark.parametrize("shape", [(9, 30, 41), (5, 300, 7)])  # (5, 300, 7): the long axis takes the conv path
def test_gaussian_smooth_matches_scipy(shape, rng):
    x = rng.normal(size=shape)
    sigma = [1.3, 0.0, 2.5]  # ITK order (x, y, z); tensor axes run (z, y, x)
    ours = gaussian_smooth(torch.as_tensor(x)[None, None], sigma)[0, 0].numpy()
    ref = x
    for axis, s in zip((2, 1, 0), sigma):
        if s > 0:
            ref = ndi.gaussian_filter1d(ref, s, axis=axis, mode="nearest", radius=math.ceil(3 * s))
    assert np.abs(ours - ref).max() < 1e-12


def test_smooth_mm_is_in_physical_units(rng):
    grid = Grid((40, 30), (0.5, 2.0))
    x = torch.as_tensor(rng.normal(size=(1, 1, 30, 40)))
    assert torch.allclose(smooth_mm(x, grid, 2.0), gaussian_smooth(x, [4.0, 1.0]))
    assert smooth_mm(x, grid, 0.0) is x


def test_gaussian_smooth_keeps_gradients(rng):
    x = torch.as_tensor(rng.normal(size=(1, 1, 6, 7)), dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: gaussian_smooth(t, [1.0, 0.7]), (x,))
