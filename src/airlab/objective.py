"""What a stage minimises on one pyramid level: named, weighted terms.

``objective = sum_i w_i * loss_i(fixed, moving o T) + sum_j w_j * reg_j(displacement of the stage)``
``            [+ w_l * mean_p |T(fixed_point_p) - moving_point_p|^2]`` (landmarks, when given)

An :class:`Objective` is built from a :class:`~airlab.registration.Stage` once per stage and
evaluated by the level solver (:mod:`airlab.solver`) at every step. Its weights are tensors, so a
caller that unrolls a registration can differentiate with respect to them; it never moves a
value to the host except when asked to check the overlap at once (``check_overlap``): the solver
checks the returned overlap every few iterations instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import RegistrationError
from .landmarks import landmark_loss
from .pyramid import LevelData
from .regularisers import ParameterRegulariser
from .spatial import inside, sample
from .transforms import LinearTransform, StationaryVelocityField, Transform

__all__ = ["Evaluation", "Objective", "term_names"]


def term_names(stage) -> list[str]:
    """One name per loss and regulariser of ``stage`` (the class name, numbered where a class
    occurs twice), under which the history records each term."""
    names = [type(m).__name__ for _, m in list(stage.losses) + list(stage.regularisers)]
    out, seen = [], {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if names.count(n) == 1 else f"{n}.{seen[n]}")
    return out


@dataclass
class Evaluation:
    """One evaluation: ``total [N]`` (differentiable), each term's value ``[N]`` (detached) and
    ``overlap [N]``, the weight of fixed voxels that map inside the moving image (detached;
    below 1 means the images do not overlap)."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    overlap: torch.Tensor


class Objective(nn.Module):
    """The weighted terms of ``stage``, evaluated for its transform on one level's data.

    Args:
        stage: the :class:`~airlab.registration.Stage` (its losses, regularisers, sampling and
            whether it is symmetric).
        landmarks: ``(fixed_points, moving_points, weight)`` from
            :func:`~airlab.landmarks.landmark_pairs`, or ``None``.
        dtype, device: of the weights (the images' own).
    """

    def __init__(self, stage, landmarks=None, *, dtype=torch.float32, device=None):
        super().__init__()
        self.names = term_names(stage)
        self.losses = nn.ModuleList(m for _, m in stage.losses)
        self.regularisers = nn.ModuleList(m for _, m in stage.regularisers)
        weights = [w for w, _ in list(stage.losses) + list(stage.regularisers)]
        self.register_buffer("weights", torch.tensor(weights, dtype=dtype, device=device), persistent=False)
        self.symmetric = stage.symmetric
        self.landmarks = None
        if landmarks is not None:
            fixed_points, moving_points, w = landmarks
            self.landmarks = (fixed_points, moving_points)
            self.register_buffer("landmark_weight", torch.tensor(w, dtype=dtype, device=device), persistent=False)
        # the field regularisers see the displacement; a ParameterRegulariser the coefficient lattice
        self.needs_field = any(not isinstance(r, ParameterRegulariser) for r in self.regularisers)

    def mapped_points(self, t: Transform, previous: Transform | None, data: LevelData, points: torch.Tensor):
        """``(y, fixed, displacement)``: where the level's fixed points land in the moving image,
        the fixed intensities to compare with (resampled half-way for a symmetric stage) and
        this stage's displacement on the level grid (``None`` when not computed)."""
        fixed, disp = data.fixed, None
        if self.symmetric:
            if not isinstance(t, StationaryVelocityField):
                raise ValueError(f"a symmetric stage needs a velocity field, not {type(t).__name__}")
            disp = t.scaled(0.5).displacement(data.grid)
            back = t.scaled(-0.5).displacement(data.grid)
            source = data.full or data  # a strided view samples the whole fixed level
            fixed = sample(source.fixed, source.grid, points + torch.movedim(back, 1, -1), "linear", outside=None)
            y = points + torch.movedim(disp, 1, -1)
        elif isinstance(t, LinearTransform) and not self.regularisers:
            y = t(points)  # a linear stage maps the points; no field is needed
        else:
            disp = t.displacement(data.grid)  # [N, D, *shape]: this stage's own motion
            y = points + torch.movedim(disp, 1, -1)
        if previous is not None:
            y = previous(y)
        return y, fixed, disp

    def forward(self, t: Transform, previous: Transform | None, data: LevelData, points: torch.Tensor, *,
                check_overlap: bool = False) -> Evaluation:
        y, fixed, disp = self.mapped_points(t, previous, data, points)
        # a level that samples cubically carries the moving image's spline (Registration sets it)
        spline = data.moving_spline
        interpolation = "linear" if spline is None else "bspline"
        warped = sample(data.moving, data.moving_grid, y, interpolation, outside=None, spline=spline)
        index = data.moving_grid.physical_to_index(y.detach())
        weight = inside(index, data.moving_grid.size).unsqueeze(1).to(warped.dtype)
        if data.fixed_weight is not None:
            weight = weight * data.fixed_weight
        if data.moving_mask is not None:
            # detached: masks say which voxels count; the optimiser must not gain by moving them
            weight = weight * sample(data.moving_mask, data.moving_grid, y.detach(), "linear", outside=0.0)
        overlap = weight.flatten(1).sum(1)
        if check_overlap:
            check_overlap_of(overlap)
        fixed = fixed.expand(warped.shape[0], *fixed.shape[1:])
        weight = weight.expand(warped.shape[0], *weight.shape[1:])
        terms, total = {}, 0.0
        names, weights = iter(self.names), iter(self.weights)
        for loss in self.losses:
            v = loss(fixed, warped, weight=weight, grid=data.grid)
            terms[next(names)] = v.detach()
            total = total + next(weights) * v
        if self.needs_field:
            reg_grid = data.regulariser_grid or data.grid
            reg_disp = disp if reg_grid is data.grid and disp is not None else t.displacement(reg_grid)
        for reg in self.regularisers:
            # a coefficient penalty sees the lattice the optimiser moves, not the field it spans
            v = reg(*t.coefficient_lattice()) if isinstance(reg, ParameterRegulariser) else reg(reg_disp, reg_grid)
            terms[next(names)] = v.detach()
            total = total + next(weights) * v
        if self.landmarks is not None:
            fixed_points, moving_points = self.landmarks
            mapped = t(fixed_points)  # this stage acts first, then the ones found before it
            v = landmark_loss(previous(mapped) if previous is not None else mapped, moving_points)
            terms["landmarks"] = v.detach()
            total = total + self.landmark_weight * v
        return Evaluation(total, terms, overlap.detach())


def check_overlap_of(overlap: torch.Tensor) -> None:
    """Raise when some pair has less than one fixed voxel's weight inside its moving image."""
    if float(overlap.min()) < 1.0:
        raise RegistrationError("the images do not overlap: no fixed voxel maps inside the moving image")
