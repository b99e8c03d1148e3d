"""The level solver: per-pair convergence, the step-size schedule, checks every few iterations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import airlab as al
from airlab.errors import RegistrationError
from airlab.losses import MSE
from airlab.pipelines import preset
from airlab.registration import Level, Registration, Stage
from airlab.solver import Convergence, cosine_factor, make_optimizer, param_groups
from airlab.transforms import Affine, Rigid


def fields(result, grid):
    with torch.no_grad():
        return result.transform.displacement(grid)


def test_convergence_by_hand():
    monitor = Convergence(tolerance=0.1, lag=2)
    assert monitor.update(torch.tensor([10.0, 10.0])) is None
    assert monitor.update(torch.tensor([9.0, 9.9])) is None
    # 10 -> 8.5 is 15% (not done), 10 -> 9.5 is 5% (done)
    assert monitor.update(torch.tensor([8.5, 9.5])).tolist() == [False, True]


def test_cosine_factor_runs_from_one_to_a_twentieth():
    assert cosine_factor(-1, 10) == pytest.approx(1.0)
    assert cosine_factor(9, 10) == pytest.approx(0.05)
    assert cosine_factor(4, 10) == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi / 2)))


def test_param_groups_scale_angular_parameters_by_the_radius():
    groups = {g["name"]: g["lr"] for g in param_groups(Rigid(2), 0.5, 50.0)}
    assert groups["translation"] == 0.5 and groups["rotation"] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("sgd", param_groups(Rigid(2), 0.5, 50.0))


@pytest.mark.parametrize("check_every", [3, 7])
def test_checking_every_few_iterations_finds_the_same_transform(pair, check_every):
    """A batch whose pairs converge at different iterations (frozen pairs put back to where they
    converged), and LBFGS, whose level ends for all pairs at once."""
    fixed, moving, _ = pair
    with torch.no_grad():
        second = al.resample(moving, moving.grid, Affine(2, translation=torch.tensor([[1.5, -1.0]])))
    movings = al.Image(torch.cat([moving.data, second.data, fixed.data]), moving.grid)
    for stages in (preset("affine", fixed.grid),
                   [Stage(lambda g, n: Affine(2, n), losses=[(1.0, MSE())], levels=[Level(iterations=12)],
                          optimizer="lbfgs")]):
        every = [Registration(stages, progress=False, check_every=k).run(fixed, movings) for k in (1, check_every)]
        assert torch.equal(fields(every[0], fixed.grid), fields(every[1], fixed.grid))
        assert [h["iterations"] for h in every[0].history] == [h["iterations"] for h in every[1].history]
        for a, b in zip(every[0].history, every[1].history):
            # the objective is the batch's sum: only iterations between a pair's convergence and
            # the check may differ (that pair drifted until it was put back), and by little
            assert a["objective"] == pytest.approx(b["objective"], rel=1e-3)


class NanAfter(nn.Module):
    """MSE until ``after`` evaluations, then nan."""

    def __init__(self, after):
        super().__init__()
        self.after, self.calls = after, 0

    def forward(self, fixed, moving, weight=None, grid=None):
        self.calls += 1
        value = MSE()(fixed, moving, weight=weight, grid=grid)
        return value * float("nan") if self.calls > self.after else value


def test_a_non_finite_objective_is_reported_at_the_check(pair):
    fixed, moving, _ = pair
    stage = Stage(lambda g, n: Affine(2, n), losses=[(1.0, NanAfter(5))], levels=[Level(iterations=30)], name="s")
    with pytest.raises(RegistrationError, match="objective became nan in s, level 1"):
        Registration([stage], progress=False, check_every=10).run(fixed, moving)


def test_check_every_must_be_positive():
    with pytest.raises(ValueError, match="check_every"):
        Registration([Stage(lambda g, n: Affine(2, n), losses=[(1.0, MSE())])], check_every=0)


def test_a_level_whose_objective_is_a_constant_runs_and_moves_nothing(pair):
    # a folding penalty alone, with nothing folded: a constant zero, with no gradient to follow
    from airlab.regularisers import JacobianFolding
    from airlab.transforms import DenseVelocityField

    fixed, moving, _ = pair
    stage = Stage(lambda g, n: DenseVelocityField(g, n), losses=[], regularisers=[(1.0, JacobianFolding())],
                  levels=[Level(iterations=3)], optimizer="field-adam")
    result = Registration([stage], progress=False).run(fixed, moving)
    assert result.history[0]["objective"] == [0.0, 0.0, 0.0]
    assert torch.equal(fields(result, fixed.grid), torch.zeros_like(fields(result, fixed.grid)))
