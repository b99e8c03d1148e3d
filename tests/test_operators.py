"""Every registered loss (losses.LOSSES) and regulariser (regularisers.REGULARISERS), as the engine
builds them by name, through the shared operator checks of tests/operators.py: smoke, a batch of
N equals N singles, float32 agrees with float64, gradcheck. Small oblique grids: seconds.

Exact values and reference implementations are in test_losses.py and test_regularisers.py."""

import numpy as np
import pytest
import torch

from airlab.losses import LOSSES
from airlab.regularisers import REGULARISERS, ParameterRegulariser

from conftest import oblique_grid, smooth_field, smooth_image
from operators import check_batch_equals_singles, check_float32_matches_float64, check_gradcheck, check_smoke

RANGE = (-5.0, 105.0)  # wider than smooth_image's [0, 100]
# Options where a default would make a check meaningless: MI's automatic range is taken from the
# images without a gradient (finite differences would move it), SSIM's default L likewise; the
# folding penalty's default threshold 0 is never reached by a smooth field (a zero gradient).
LOSS_OPTIONS = {
    "mi": dict(bins=8, fixed_range=RANGE, moving_range=RANGE),
    "nmi": dict(bins=8, fixed_range=RANGE, moving_range=RANGE),
    "ssim": dict(data_range=RANGE[1] - RANGE[0], sigma=1.0),
    "lncc": dict(radius=1),
}
REGULARISER_OPTIONS = {"folding": dict(threshold=1.0)}
N = 3


def _grid(d, rng):
    return oblique_grid(d, rng, size=(6, 5, 4)[:d] if d == 3 else (7, 6))


def _images(grid, rng):
    stack = lambda: torch.cat([smooth_image(grid, rng, sigma=1.0) for _ in range(N)])  # noqa: E731
    weight = torch.as_tensor(rng.uniform(0.2, 1.0, size=(N, 1, *grid.shape)))
    weight[(slice(None), slice(None)) + (slice(0, 2),) * grid.ndim] = 0.0  # a block outside the mask
    return stack(), stack(), weight


def _loss(name, grid):
    module = LOSSES[name](**LOSS_OPTIONS.get(name, {}))
    return lambda fixed, moving, weight: module(fixed, moving, weight, grid=grid)


def _regulariser(name, grid):
    module = REGULARISERS[name](**REGULARISER_OPTIONS.get(name, {}))
    # a ParameterRegulariser sees a coefficient lattice: the same call, knots for voxels
    assert isinstance(module, ParameterRegulariser) == name.startswith("coefficients-")
    return lambda field: module(field, grid)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss(name, d, rng):
    grid = _grid(d, rng)
    fixed, moving, weight = _images(grid, rng)
    op = _loss(name, grid)
    for inputs, shared in (((fixed, moving, weight), ()), ((fixed, moving, weight[:1]), (2,)),
                           ((fixed, moving, None), ())):
        check_smoke(op, inputs)
        check_batch_equals_singles(op, inputs, shared=shared)
        check_float32_matches_float64(op, inputs, rtol=1e-4, atol=1e-4)
    # identical images are a better match than different ones (every loss is minimised)
    assert (op(fixed, fixed, weight) < op(fixed, moving, weight)).all()
    check_gradcheck(op, (fixed[:2], moving[:2], weight[:2]), wrt=(0, 1), fast_mode=True)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("name", sorted(REGULARISERS))
def test_regulariser(name, d, rng):
    grid = _grid(d, rng)
    field = smooth_field(grid, rng, N, magnitude=3.0, sigma=1.0)
    op = _regulariser(name, grid)
    value = check_smoke(op, (field,))
    assert (op(torch.zeros_like(field)) < value).all()  # no displacement costs least
    check_batch_equals_singles(op, (field,))
    check_float32_matches_float64(op, (field,), rtol=1e-4, atol=1e-6)
    noisy = field[:2] + torch.as_tensor(np.random.default_rng(0).normal(scale=0.3, size=field[:2].shape))
    check_gradcheck(op, (noisy,), fast_mode=True)
