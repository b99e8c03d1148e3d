"""The objective: named, weighted terms; weights as tensors; the overlap it reports."""

from __future__ import annotations

import contextlib

import pytest
import torch

from airlab import compiled
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


@pytest.mark.parametrize("stage_kind", ["dense after affine", "dense alone", "affine", "affine after rigid"])
def test_moving_index_gives_the_physical_path_numbers(stage_kind):
    """The engine maps the fixed points to the moving image's indices with one matrix (the
    linear stages before, the moving grid's physical -> index map, a linear stage's own
    matrix): the values, overlap and gradients of composing the transforms point by point
    (mapped_points, then the moving grid's map), on an oblique moving grid, in 3D."""
    from airlab.losses import MutualInformation
    from airlab.pyramid import LevelData
    from airlab.spatial import Grid
    from airlab.splines import cell_range, node_gradient, prefilter
    from airlab.transforms import DenseVelocityField, Rigid

    g = torch.Generator().manual_seed(3)
    fixed_grid = Grid([14, 12, 10], [2.0, 2.0, 2.5], [-14.0, -12.0, -10.0])
    turned = Rigid(3, rotation=torch.tensor([[0.2, -0.1, 0.3]]))
    moving_grid = Grid([16, 13, 11], [1.8, 2.1, 2.4], [-15.0, -13.0, -12.0],
                       turned.matrix()[0].detach().numpy().ravel())
    fixed = torch.rand(1, 1, *fixed_grid.shape, generator=g, dtype=torch.float64)
    moving = torch.rand(1, 1, *moving_grid.shape, generator=g, dtype=torch.float64)
    coefficients = prefilter(moving)
    # a moving mask on one case: it is sampled at the same indices
    mask = (moving > 0.3).float() if stage_kind == "dense alone" else None
    data = LevelData(grid=fixed_grid, fixed=fixed, fixed_weight=None, moving=moving, moving_grid=moving_grid,
                     moving_mask=mask, moving_spline=(coefficients, node_gradient(coefficients), *cell_range(moving)))
    previous = None
    if stage_kind.endswith("after affine"):
        previous = Affine(3, matrix=torch.eye(3) + 0.05 * torch.randn(1, 3, 3, generator=g),
                          translation=torch.tensor([[2.0, -1.0, 0.5]]))
    elif stage_kind.endswith("after rigid"):
        previous = Rigid(3, rotation=torch.tensor([[-0.1, 0.2, 0.05]]), translation=torch.tensor([[1.0, 2.0, -1.0]]))
    if previous is not None:
        previous.requires_grad_(False).double()
    if stage_kind.startswith("dense"):
        t = DenseVelocityField(fixed_grid, grid_shrink=2.0)
        with torch.no_grad():
            t.velocity.copy_(torch.randn(t.velocity.shape, generator=g))
        stage = Stage(None, losses=[(1.0, MutualInformation())], regularisers=[(0.2, Diffusion())])
    else:
        t = Affine(3, matrix=torch.eye(3) + 0.03 * torch.randn(1, 3, 3, generator=g),
                   translation=torch.tensor([[1.0, 0.5, -2.0]]))
        stage = Stage(None, losses=[(1.0, MSE())])
    t.double()
    points = fixed_grid.points(dtype=torch.float64)

    def evaluate(fused: bool):
        objective = Objective(stage, dtype=torch.float64)
        if not fused:
            objective.moving_index = lambda *args: None
        t.zero_grad()
        e = objective(t, previous, data, points)
        e.total.sum().backward()
        return e, [p.grad.clone() for p in t.parameters()]

    assert Objective(stage).moving_index(t, previous, data, points) is not None
    for loops in (True, False):  # the CPU's compiled cubic loop, and the PyTorch path (as on a GPU)
        with contextlib.nullcontext() if loops else compiled.disabled():
            (fast, fast_grads), (slow, slow_grads) = evaluate(True), evaluate(False)
        torch.testing.assert_close(fast.total, slow.total, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fast.overlap, slow.overlap, rtol=1e-12, atol=0)
        for a, b in zip(fast_grads, slow_grads):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_moving_index_leaves_symmetric_stages_and_nonlinear_chains_to_the_points(level):
    t = velocity(level.grid)
    points = level.grid.points(dtype=torch.float32)
    assert Objective(Stage(None, losses=[(1.0, MSE())], symmetric=True)).moving_index(t, None, level, points) is None
    assert Objective(Stage(None, losses=[(1.0, MSE())])).moving_index(t, velocity(level.grid), level, points) is None


def test_the_linear_stages_before_are_read_again_when_they_change(level):
    """moving_index keeps the matrix of the stages before while they stay as they are; a change
    of their parameters in place (a new version) is seen at the next evaluation."""
    stage = Stage(None, losses=[(1.0, MSE())], regularisers=[(0.1, Diffusion())])
    objective = Objective(stage)
    t = velocity(level.grid)
    points = level.grid.points(dtype=torch.float32)
    before = Affine(2, center=level.grid.center())
    first = objective(t, before, level, points).total.detach()
    assert torch.equal(objective(t, before, level, points).total.detach(), first)
    with torch.no_grad():
        next(before.parameters()).add_(0.05)
    changed = objective(t, before, level, points).total.detach()
    fresh = Objective(stage)(t, before, level, points).total.detach()
    assert torch.equal(changed, fresh) and not torch.equal(changed, first)
