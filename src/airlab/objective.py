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
from .regularisers import ParameterRegulariser, shared_derivatives
from .spatial import inside, sample, sample_at_index
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
        self._points: dict = {}  # see _components_first
        self._before: dict = {}  # see _index_map

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

    def moving_index(self, t: Transform, previous: Transform | None, data: LevelData, points: torch.Tensor):
        """``(index, fixed, displacement)`` as :meth:`mapped_points`, with the moving image's
        continuous indices ``[N, P, D]`` in place of physical points, or ``None`` where the
        stages before are not one linear map (or the stage is symmetric).

        A linear map before, and the moving grid's physical -> index map after, are one matrix
        ``K``: ``index = K (x + u(x))``, one ``[D, D] x [D, P]`` product with the components
        first, instead of two affine maps of ``[P, D]`` points (each a skinny matrix product of
        about ten times the cost) and a third for the inside test; their backward goes with
        them. A linear stage's own matrix joins ``K``, with its gradient."""
        if self.symmetric or not (previous is None or isinstance(previous, LinearTransform)):
            return None
        grid, d = data.grid, data.grid.ndim
        dtype = points.dtype
        after = self._index_map(previous, data, points.device)
        x = self._components_first(points)  # [1, D, P]
        disp = None
        if isinstance(t, LinearTransform) and not self.regularisers:
            matrix = after.to(dtype) @ t.homogeneous()  # a linear stage: its gradient flows through it
        else:
            disp = t.displacement(grid)
            matrix = after.to(dtype)
            x = x + disp.reshape(disp.shape[0], d, -1)
        n = max(matrix.shape[0], x.shape[0])
        matrix = matrix.expand(n, d + 1, d + 1)
        index = torch.baddbmm(matrix[:, :d, d:], matrix[:, :d, :d], x.expand(n, d, x.shape[2]))
        return index.transpose(1, 2), data.fixed, disp

    def _index_map(self, previous: Transform | None, data: LevelData, device) -> torch.Tensor:
        """The moving grid's physical -> index matrix times the linear stages before, ``[N or 1,
        D + 1, D + 1]`` in float64 (not on MPS), kept while neither changes: the stages before
        are fixed while this one optimises, and building their matrix from its parameters was
        about forty small operations per iteration (a sixteenth of a 2D one's). Their parameters
        and buffers are compared with a copy kept beside the matrix, a few operations."""
        wide = torch.float64 if torch.device(device).type != "mps" else torch.float32  # MPS has no float64
        state = [] if previous is None else [t.detach() for t in (*previous.parameters(), *previous.buffers())]
        key = (id(previous), data.moving_grid, wide, str(device))
        kept = self._before.get(key)
        if (kept is None or kept[0] is not previous or len(kept[1]) != len(state)
                or not all(torch.equal(a, b) for a, b in zip(kept[1], state))):
            after = torch.as_tensor(data.moving_grid.physical_to_index_matrix(), dtype=wide, device=device)[None]
            if previous is not None:
                after = after @ previous.homogeneous().detach().to(wide)
            if len(self._before) >= 16:
                self._before.clear()
            # holds ``previous`` too, so that its id is not reused while kept
            kept = self._before[key] = (previous, [t.clone() for t in state], after)
        return kept[2]

    def _components_first(self, points: torch.Tensor) -> torch.Tensor:
        """``points [1, *shape, D]`` as ``[1, D, P]``, kept for the level's few point sets (one per
        sublattice of a strided level)."""
        key = (points.data_ptr(), tuple(points.shape), points.dtype, points.device)
        if key not in self._points:
            if len(self._points) >= 64:
                self._points.clear()
            flat = points.reshape(points.shape[0], -1, points.shape[-1])
            # holds ``points`` too, so that its memory (the key) is not reused while kept
            self._points[key] = (points, flat.transpose(1, 2).contiguous())
        return self._points[key][1]

    def forward(self, t: Transform, previous: Transform | None, data: LevelData, points: torch.Tensor, *,
                check_overlap: bool = False) -> Evaluation:
        mapped = self.moving_index(t, previous, data, points)
        if mapped is None:
            y, fixed, disp = self.mapped_points(t, previous, data, points)
            index = data.moving_grid.physical_to_index(y.reshape(y.shape[0], -1, y.shape[-1]))
        else:
            index, fixed, disp = mapped
        shape = points.shape[1:-1]
        # a level that samples cubically carries the moving image's spline (Registration sets it)
        spline = data.moving_spline
        interpolation = "linear" if spline is None else "bspline"
        warped = sample_at_index(data.moving, data.moving_grid, index, interpolation, outside=None, spline=spline)
        warped = warped.reshape(*warped.shape[:2], *shape)
        index = index.detach()
        weight = inside(index, data.moving_grid.size).unsqueeze(1).to(warped.dtype).reshape(-1, 1, *shape)
        if data.fixed_weight is not None:
            weight = weight * data.fixed_weight
        if data.moving_mask is not None:
            # detached: masks say which voxels count; the optimiser must not gain by moving them
            mask = sample_at_index(data.moving_mask.to(index.dtype), data.moving_grid, index, "linear", outside=0.0)
            weight = weight * mask.reshape(*mask.shape[:2], *shape)
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
        with shared_derivatives():  # diffusion and folding differentiate the field once
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
