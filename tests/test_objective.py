"""The objective: named, weighted terms; weights as tensors; the overlap it reports."""

from __future__ import annotations

import pytest
import torch

from airlab.errors import RegistrationError
from airlab.landmarks import landmark_loss
from airlab.losses import LNCC, MSE
from airlab.objective import Objective, term_names
from airlab.pyramid import Level, prepare_level
from airlab.regularisers import Diffusion
from airlab.registration import Stage
from airlab.transforms import Affine, StationaryVelocityField


@pytest.fixture(scope="module")
def level(pair):
    fixed, moving, _ = pair
    return prepare_level(Level(2, 1.0), fixed.data, fixed.grid, None, moving.data, moving.grid, None)


def velocity(grid, seed=0):
    t = StationaryVelocityField(grid)
    with torch.no_grad():
        t.velocity.copy_(torch.randn(t.velocity.shape, generator=torch.Generator().manual_seed(seed)))
    return t


def test_terms_are_named_and_two_of_a_kind_are_numbered():
    stage = Stage(None, losses=[(1.0, LNCC()), (0.5, LNCC(radius=3)), (1.0, MSE())],
                  regularisers=[(0.1, Diffusion())])
    assert term_names(stage) == ["LNCC.1", "LNCC.2", "MSE", "Diffusion"]


def test_total_is_the_weighted_sum_of_the_terms(level):
    stage = Stage(None, losses=[(1.0, LNCC()), (0.5, MSE())], regularisers=[(0.25, Diffusion())])
    objective = Objective(stage)
    t = velocity(level.grid)
    points = level.grid.points(dtype=torch.float32)
    e = objective(t, None, level, points)
    # by hand: the terms are the modules' own values
    assert set(e.terms) == {"LNCC", "MSE", "Diffusion"}
    with torch.no_grad():
        disp = t.displacement(level.grid)
    assert torch.allclose(e.terms["Diffusion"], Diffusion()(disp, level.grid))
    expected = e.terms["LNCC"] + 0.5 * e.terms["MSE"] + 0.25 * e.terms["Diffusion"]
    assert torch.allclose(e.total.detach(), expected)
    assert e.overlap.shape == (1,) and float(e.overlap) > 1000


def test_weights_are_tensors_that_gradients_reach(level):
    """The door to an unrolled registration: d total / d weight_i is term i."""
    stage = Stage(None, losses=[(1.0, MSE())], regularisers=[(0.3, Diffusion())])
    objective = Objective(stage, dtype=torch.float64)
    assert objective.weights.dtype == torch.float64
    objective.weights.requires_grad_(True)
    t = velocity(level.grid).to(dtype=torch.float64)
    data = level
    data64 = type(level)(**{**level.__dict__, "fixed": level.fixed.double(), "moving": level.moving.double()})
    e = objective(t, None, data64, data.grid.points(dtype=torch.float64))
    (grad,) = torch.autograd.grad(e.total.sum(), objective.weights)
    assert torch.allclose(grad, torch.stack([e.terms["MSE"][0], e.terms["Diffusion"][0]]))


def test_landmarks_are_a_weighted_term(level):
    stage = Stage(None, losses=[(1.0, MSE())])
    fixed_points = torch.tensor([[[0.0, 0.0], [10.0, -5.0]]])
    moving_points = fixed_points + 2.0
    objective = Objective(stage, (fixed_points, moving_points, 0.7))
    t = Affine(2)
    e = objective(t, None, level, level.grid.points(dtype=torch.float32))
    assert torch.allclose(e.terms["landmarks"], landmark_loss(fixed_points, moving_points))
    assert torch.allclose(e.total.detach(), e.terms["MSE"] + 0.7 * e.terms["landmarks"])


def test_no_overlap_is_refused_when_asked(level):
    stage = Stage(None, losses=[(1.0, MSE())])
    far = Affine(2, translation=torch.tensor([[1e4, 0.0]]))
    points = level.grid.points(dtype=torch.float32)
    objective = Objective(stage)
    with pytest.raises(RegistrationError, match="do not overlap"):
        objective(far, None, level, points, check_overlap=True)
