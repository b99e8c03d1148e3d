"""The registration engine: stages of pyramid levels minimising a weighted objective.

``objective = sum_i w_i * loss_i(fixed, moving o T) + sum_j w_j * reg_j(displacement of the stage)``
``            [+ w_l * mean_p |T(fixed_point_p) - moving_point_p|^2]`` (landmarks, when given)

A :class:`Stage` says which transform to optimise, with which terms, optimiser and pyramid; a
:class:`Registration` runs stages in order, each starting from the transform the previous ones
found (kept fixed), and returns a :class:`Result` whose ``transform`` maps fixed physical points
to moving physical points for the whole pipeline.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from .errors import RegistrationError
from .image import Image, as_image, resample
from .inputs import initial_translation, prepare_pair
from .landmarks import LANDMARK_WEIGHT, landmark_loss, landmark_pairs
from .optim import Adam, FieldAdam
from .progress import default_progress
from .pyramid import Level, LevelData, Pyramid, level_grid, strided_views
from .regularisers import ParameterRegulariser
from .spatial import Grid, inside, sample
from .transforms import Composite, LinearTransform, StationaryVelocityField, Transform, Affine

__all__ = ["Level", "Stage", "Registration", "Result", "RegistrationError", "initial_translation", "compose_linear",
           "term_names"]


TransformFactory = Callable[[Grid, int], Transform]


@dataclass
class Stage:
    """One stage of a registration.

    Args:
        transform: ``(fixed_grid, batch_size) -> Transform``, called when the stage starts, or a
            ready transform.
        losses: ``[(weight, loss_module), ...]``; a loss module is called as
            ``loss(fixed, warped, weight=mask, grid=level_grid) -> [N]``.
        regularisers: ``[(weight, module), ...]`` called as ``reg(displacement, level_grid) -> [N]``
            on the displacement of this stage's transform alone; a
            :class:`~airlab.regularisers.ParameterRegulariser` is called as
            ``reg(*transform.coefficient_lattice())`` on its coefficients instead.
        levels: the pyramid, coarse to fine.
        optimizer: ``"adam"``, ``"field-adam"`` (:class:`~airlab.optim.FieldAdam`, for
            deformable transforms), ``"lbfgs"``, or ``(param_groups) -> torch.optim.Optimizer``.
        lr: step size. For linear transforms it is in mm; rotations, scales and matrix entries
            get ``lr / radius`` with ``radius`` the fixed image's radius of gyration, so that a
            step moves the image by about ``lr`` mm whatever the parameter.
        decay: anneal the step size over each level (cosine, down to 1/20 of ``lr``). Adam's
            steps do not shrink by themselves as the gradient vanishes; without decay it hovers
            around the optimum of a flat objective (local correlation, mutual information).
        tolerance, patience: stop a level early when the objective improved by less than
            ``tolerance`` (relative) over the last ``patience`` iterations.
        on_level: an optional ``(transform, level_index, level_grid) -> None`` hook run before
            each level, after the transform's own :meth:`~airlab.transforms.Transform.start_level`
            (which refines B-splines and regrids velocities when they were built to). Pipelines
            built from data never use it: a closure does not pickle.
        symmetric: for velocity fields: compare ``fixed o exp(-v/2)`` with
            ``moving o exp(v/2)`` in the space halfway between them, so neither image is
            favoured; the result is still ``exp(v)``, and its inverse ``exp(-v)`` is free.
        regulariser_shrink: regularisers see the stage's displacement on the level grid with
            this many times its spacing. Smooth transforms (B-splines, spline velocities) lose
            nothing at 2 and it saves most of their cost; use 1 for free-form dense fields,
            whose checkerboard modes only the full grid sees.
        gradient_sigma: for ``"adam"`` and ``"field-adam"``: smooth the gradient of field
            parameters (velocities, displacements, B-spline coefficients) with a Gaussian of this
            many of their voxels before each step (fluid-like updates).
        interpolation: how the moving image is sampled while optimising: ``"linear"`` or
            ``"bspline"`` (cubic B-spline, its coefficients computed once per level; the gradient
            with respect to the points that of :func:`~airlab.splines.sample_cubic`). Linear
            interpolation blurs the moving image by an amount that depends on where a point falls
            between voxels, so the best match of a fine transform is off the true one by that
            texture; cubic sampling costs more per step and removes most of it.
        match_sharpness: at every level, smooth the sharper of the two images (before the
            moving image's B-spline prefilter) by the Gaussian that makes it as sharp as the
            other (:mod:`airlab.sharpness`), so that a blur mismatch between different
            acquisitions is not matched by the transform; the history records the sharpness
            values and the sigma of each level under ``"sharpness"``. Off in every preset: on the
            real pairs measured it did not recover cubic sampling's loss, and it reads a change
            of contrast as sharpness (docs/architecture.md, "Sharpness matching").
    """

    transform: TransformFactory | Transform
    losses: Sequence[tuple[float, nn.Module]]
    regularisers: Sequence[tuple[float, nn.Module]] = ()
    levels: Sequence[Level] = (Level(),)
    optimizer: str | Callable = "adam"
    lr: float = 0.1
    decay: bool = True
    tolerance: float = 1e-5
    patience: int = 20
    on_level: Callable | None = None
    regulariser_shrink: float = 1.0
    symmetric: bool = False
    gradient_sigma: float = 0.0
    interpolation: str = "linear"
    match_sharpness: bool = False
    name: str = "stage"


@dataclass
class Result:
    """What a registration found: ``transform`` maps fixed to moving physical points."""

    transform: Transform
    stages: list[Transform]
    history: list[dict] = field(default_factory=list)
    wall_time: float = 0.0
    fixed_grid: Grid | None = None
    outputs: object = None  # airlab.register() puts the workflow's Outputs here

    def displacement_field(self):
        """The whole transform as a :class:`~airlab.transforms.DisplacementField` on the fixed grid."""
        from .transforms import DisplacementField

        with torch.no_grad():
            field = self.transform.displacement(self.fixed_grid)
        dense = DisplacementField(self.fixed_grid, field.shape[0], field)
        dense.requires_grad_(False)  # a result, not something to optimise
        return dense

    def linear_part(self) -> LinearTransform | None:
        """The composed linear stages as one affine (``None`` without linear stages)."""
        linear = [t for t in self.stages if isinstance(t, LinearTransform)]
        if not linear:
            return None
        return compose_linear(linear)

    def warp(self, moving, *, interpolation: str | None = None, outside: float = 0.0) -> Image:
        """``moving`` (an Image, path, SimpleITK or nibabel image) resampled onto the fixed grid."""
        if self.fixed_grid is None:
            raise ValueError("the result does not know the fixed grid")
        moving = as_image(moving, "moving image")
        with torch.no_grad():
            return resample(moving, self.fixed_grid, self.transform, interpolation=interpolation, outside=outside)


def compose_linear(transforms: Sequence[LinearTransform]) -> Affine:
    """One affine equal to applying ``transforms`` in order, about the first one's centre."""
    h = None
    for t in transforms:
        m = t.homogeneous().detach()
        h = m if h is None else m @ h
    d = transforms[0].ndim
    c = transforms[0].center.detach()
    lin, off = h[:, :d, :d], h[:, :d, d]
    # y = M x + off = M (x - c) + c + t  =>  t = off + M c - c
    t = off + (lin @ c.unsqueeze(-1)).squeeze(-1) - c
    return Affine(d, h.shape[0], matrix=lin, translation=t, center=c.clone())


# --------------------------------------------------------------------------- engine
def _chain(done: list[Transform], prior: Transform | None) -> Transform | None:
    """Fixed point -> moving point through the stages found so far (last stage acts first)."""
    chain = list(reversed(done)) + ([prior] if prior is not None else [])
    if not chain:
        return None
    return chain[0] if len(chain) == 1 else Composite(*chain)


def _param_groups(transform: Transform, lr: float, radius: float) -> list[dict]:
    """Per-parameter steps in comparable physical units (see :class:`Stage`)."""
    angular = {"rotation", "linear", "log_scale"}
    groups = []
    for name, p in transform.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        groups.append({"params": [p], "lr": lr / radius if leaf in angular else lr, "name": name})
    return groups


def _make_optimizer(spec, groups, gradient_sigma: float = 0.0):
    if callable(spec):
        return spec(groups)
    if spec == "adam":
        return Adam(groups, gradient_sigma=gradient_sigma)
    if spec == "field-adam":
        return FieldAdam(groups, gradient_sigma=gradient_sigma)
    if spec == "lbfgs":
        params = [p for g in groups for p in g["params"]]
        return torch.optim.LBFGS(params, lr=1.0, max_iter=1, history_size=20, line_search_fn="strong_wolfe")
    raise ValueError(f"unknown optimizer {spec!r}; choose 'adam', 'field-adam', 'lbfgs' or pass a factory")


def term_names(stage: Stage) -> list[str]:
    """One name per loss and regulariser of ``stage`` (the class name, numbered where a class
    occurs twice), under which the history records each term."""
    names = [type(m).__name__ for _, m in list(stage.losses) + list(stage.regularisers)]
    out, seen = [], {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if names.count(n) == 1 else f"{n}.{seen[n]}")
    return out


def _start_from_linear(t: LinearTransform, done: list[Transform]) -> bool:
    """Set an affine stage that follows linear stages to where they ended; True when it did, and
    the caller then replaces them by it, so that the final chain holds one linear transform
    (rigid -> affine gives one affine)."""
    if not done or not all(isinstance(x, LinearTransform) for x in done) or not isinstance(t, Affine):
        return False
    start = compose_linear(done)
    with torch.no_grad():
        t.center.copy_(start.center.to(t.center))
        t.linear.copy_(start.linear.to(t.linear))
        t.translation.copy_(start.translation.to(t.translation))
    return True


class _Convergence:
    """Per-pair early stopping: a pair whose objective improved by less than ``tolerance``
    (relative) over ``lag`` iterations is done; the level ends when every pair is."""

    def __init__(self, tolerance: float, lag: int):
        self.tolerance, self.lag = tolerance, lag
        self.values: list[torch.Tensor] = []

    def update(self, per_pair: torch.Tensor) -> torch.Tensor | None:
        """Record this iteration's objectives ``[N]``; the pairs that are done, once known."""
        self.values.append(per_pair)
        if len(self.values) <= self.lag:
            return None
        old = self.values[-1 - self.lag]
        return old - per_pair <= self.tolerance * old.abs().clamp_min(1e-12)


_EVENTS = ("level_start", "iteration", "level_end")


@dataclass
class _Callback:
    """A plain callable observes the iterations."""

    function: Callable[[dict], None]

    def iteration(self, info: dict) -> None:
        self.function(info)


class Registration:
    """Run :class:`Stage` s on a fixed and a moving image (or batches of them).

    Args:
        stages: the pipeline, e.g. ``[rigid, affine, deformable]``.
        initialisation: ``"moments"`` (centres of mass), ``"centres"`` (grid centres) or ``None``;
            used when the first stage's transform is linear and no ``initial`` transform is given.
        normalise: rescale intensities (1st..99th percentile -> 0..1) before registering.
        progress: report progress on stderr (a bar per level on a terminal, one line per level
            otherwise); or an observer object of :mod:`airlab.progress`.
        callbacks: observers: callables called after every iteration with a dict (stage, level,
            iteration, objective, terms, transform), or objects with ``level_start``,
            ``iteration``, ``level_end`` methods.
        seed: seeds the random numbers of stochastic terms (none of the built-in ones is: on CPU
            the engine repeats exactly by construction) inside a forked generator state, so the
            global torch RNG is left as it was.
    """

    def __init__(self, stages: Sequence[Stage], *, initialisation: str | None = "moments", normalise: bool = True,
                 progress=True, callbacks: Sequence = (), seed: int | None = 0):
        if not stages:
            raise ValueError("a registration needs at least one stage")
        for stage in stages:
            if stage.interpolation not in ("linear", "bspline"):
                raise ValueError(f"stage {stage.name!r}: interpolation {stage.interpolation!r}; choose 'linear' or "
                                 "'bspline'")
        self.stages = list(stages)
        self.initialisation = initialisation
        self.normalise = normalise
        self.observers = [obs if any(hasattr(obs, e) for e in _EVENTS) else _Callback(obs) for obs in callbacks]
        if progress is True:
            self.observers.append(default_progress())
        elif progress:
            self.observers.append(progress)
        self.seed = seed

    def __call__(self, fixed: Image, moving: Image, **kwargs) -> Result:
        return self.run(fixed, moving, **kwargs)

    def _emit(self, event: str, info: dict) -> None:
        for obs in self.observers:
            method = getattr(obs, event, None)
            if method is not None:
                method(info)

    def run(self, fixed: Image, moving: Image, *, fixed_mask: Image | None = None, moving_mask: Image | None = None,
            initial: Transform | None = None, device=None, dtype=torch.float32, fixed_points=None,
            moving_points=None, landmark_weight: float = LANDMARK_WEIGHT) -> Result:
        """Register; ``fixed_points``/``moving_points`` (``[P, D]`` or ``[N, P, D]`` mm, paired
        by row) add ``landmark_weight`` times :func:`~airlab.landmarks.landmark_loss` to every
        stage's objective (weight 0: the points are not used)."""
        landmarks = (fixed_points, moving_points, landmark_weight)
        if self.seed is None:
            return self._run(fixed, moving, fixed_mask, moving_mask, initial, device, dtype, landmarks)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return self._run(fixed, moving, fixed_mask, moving_mask, initial, device, dtype, landmarks)

    def _run(self, fixed, moving, fixed_mask, moving_mask, initial, device, dtype,
             landmarks=(None, None, 0.0)) -> Result:
        start = time.perf_counter()
        pair = prepare_pair(fixed, moving, fixed_mask=fixed_mask, moving_mask=moving_mask, device=device, dtype=dtype,
                            normalise_intensities=self.normalise)
        device = pair.fixed.device
        landmarks = landmark_pairs(*landmarks, ndim=fixed.ndim, batch=pair.batch, device=device, dtype=dtype)
        done: list[Transform] = []  # stage transforms, fixed once their stage is over
        prior = None
        if initial is not None:
            prior = initial.to(device=device, dtype=dtype)
            for p in prior.parameters():
                p.requires_grad_(False)
        history: list[dict] = []
        pyramid = Pyramid(pair.fixed, fixed.grid, pair.fixed_mask, pair.moving, moving.grid, pair.moving_mask)
        for s, stage in enumerate(self.stages):
            t = stage.transform if isinstance(stage.transform, Transform) else stage.transform(fixed.grid, pair.batch)
            t = t.to(device=device, dtype=dtype)
            if isinstance(t, LinearTransform):
                if _start_from_linear(t, done):
                    done.clear()
                elif not done and prior is None and self.initialisation:
                    cf, tr = initial_translation(fixed, moving, self.initialisation, pair.fixed_mask, pair.moving_mask)
                    with torch.no_grad():
                        t.center.copy_(cf.to(t.center).expand_as(t.center))
                        t.translation.copy_(tr.to(t.center).expand_as(t.translation))
            previous = _chain(done, prior)
            for li, level in enumerate(stage.levels):
                found = None
                if stage.match_sharpness:
                    matched, found = pyramid.matched(level)
                    data = dataclasses.replace(matched)
                else:
                    data = dataclasses.replace(pyramid[level])  # a stage may set its regulariser grid
                if stage.interpolation == "bspline":
                    data.moving_spline = pyramid.spline(level, matched=stage.match_sharpness)
                if stage.regularisers and stage.regulariser_shrink > 1:
                    data.regulariser_grid = level_grid(data.grid, stage.regulariser_shrink)
                t.start_level(li, data.grid)
                if stage.on_level is not None:
                    stage.on_level(t, li, data.grid)
                history.append(self._run_level(stage, s, li, level, t, previous, data, pair.radius, landmarks))
                if found is not None:
                    history[-1]["sharpness"] = [m.as_dict() for m in found]
            for p in t.parameters():
                p.requires_grad_(False)
            done.append(t)
        return Result(_chain(done, prior), done, history, time.perf_counter() - start, fixed.grid)

    # ------------------------------------------------------------------ pieces
    def _terms(self, stage, names, t, previous, data: LevelData, points, landmarks=None):
        fixed = data.fixed
        if stage.symmetric:
            if not isinstance(t, StationaryVelocityField):
                raise ValueError(f"a symmetric stage needs a velocity field, not {type(t).__name__}")
            disp = t.scaled(0.5).displacement(data.grid)
            back = t.scaled(-0.5).displacement(data.grid)
            source = data.full or data  # a strided view samples the whole fixed level
            fixed = sample(source.fixed, source.grid, points + torch.movedim(back, 1, -1), "linear", outside=None)
            y = points + torch.movedim(disp, 1, -1)
        elif isinstance(t, LinearTransform) and not stage.regularisers:
            y = t(points)  # a linear stage maps the points; no field is needed
        else:
            disp = t.displacement(data.grid)  # [N, D, *shape]: this stage's own motion
            y = points + torch.movedim(disp, 1, -1)
        if previous is not None:
            y = previous(y)
        if stage.interpolation == "bspline":
            warped = sample(data.moving, data.moving_grid, y, "bspline", outside=None, spline=data.moving_spline)
        else:
            warped = sample(data.moving, data.moving_grid, y, "linear", outside=None)
        index = data.moving_grid.physical_to_index(y.detach())
        weight = inside(index, data.moving_grid.size).unsqueeze(1).to(warped.dtype)
        if data.fixed_weight is not None:
            weight = weight * data.fixed_weight
        if data.moving_mask is not None:
            # detached: masks say which voxels count; the optimiser must not gain by moving them
            weight = weight * sample(data.moving_mask, data.moving_grid, y.detach(), "linear", outside=0.0)
        if float(weight.flatten(1).sum(1).min()) < 1.0:
            raise RegistrationError("the images do not overlap: no fixed voxel maps inside the moving image")
        terms = {}
        total = 0.0
        fixed = fixed.expand(warped.shape[0], *fixed.shape[1:])
        weight = weight.expand(warped.shape[0], *weight.shape[1:])
        names = iter(names)
        for w, loss in stage.losses:
            v = loss(fixed, warped, weight=weight, grid=data.grid)
            terms[next(names)] = v.detach()
            total = total + w * v
        if any(not isinstance(reg, ParameterRegulariser) for _, reg in stage.regularisers):
            reg_grid = data.regulariser_grid or data.grid
            reg_disp = disp if reg_grid is data.grid else t.displacement(reg_grid)
        for w, reg in stage.regularisers:
            # a coefficient penalty sees the lattice the optimiser moves, not the field it spans
            v = reg(*t.coefficient_lattice()) if isinstance(reg, ParameterRegulariser) else reg(reg_disp, reg_grid)
            terms[next(names)] = v.detach()
            total = total + w * v
        if landmarks is not None:
            fixed_points, moving_points, w = landmarks
            mapped = t(fixed_points)  # this stage acts first, then the ones found before it
            v = landmark_loss(previous(mapped) if previous is not None else mapped, moving_points)
            terms["landmarks"] = v.detach()
            total = total + w * v
        return total, terms

    def _run_level(self, stage, s, li, level, t, previous, data: LevelData, radius, landmarks=None) -> dict:
        views = strided_views(data, level.stride)
        points = [v.grid.points(dtype=data.fixed.dtype, device=data.fixed.device) for v in views]
        names = term_names(stage)
        # a strided objective varies with the sublattice: compare values of the same one
        monitor = _Convergence(stage.tolerance, -(-stage.patience // len(views)) * len(views))
        optimizer = _make_optimizer(stage.optimizer, _param_groups(t, stage.lr, radius), stage.gradient_sigma)
        # cosine annealing by hand: any optimiser with param_groups, and no torch.optim.lr_scheduler,
        # which would import torch._dynamo (see optim.py)
        decay = stage.decay and level.iterations > 1 and not isinstance(optimizer, torch.optim.LBFGS)
        base = [g["lr"] for g in optimizer.param_groups]
        values: list[float] = []
        label = f"{stage.name} level {li + 1}/{len(stage.levels)}"
        self._emit("level_start", {"stage": s, "stage_name": stage.name, "level": li, "label": label,
                                   "max_iterations": level.iterations})
        level_start = time.perf_counter()
        terms = {}
        # Early stopping is per pair: a converged pair keeps its parameters while the others go
        # on, so a batch ends where its pairs would have ended alone (not for LBFGS, whose line
        # search couples the pairs).
        params = [p for p in t.parameters() if p.requires_grad]
        separable = (t.batch_size > 1 and not isinstance(optimizer, torch.optim.LBFGS)
                     and all(p.shape[0] == t.batch_size for p in params))
        frozen: dict[int, list[torch.Tensor]] = {}
        evaluated: dict = {}
        try:
            for it in range(level.iterations):
                def closure():
                    for p in params:
                        p.grad = None
                    k = it % len(views)
                    with t.cached():
                        total, evaluated["terms"] = self._terms(stage, names, t, previous, views[k], points[k],
                                                                landmarks)
                    evaluated["total"] = total.detach()
                    loss = total.sum()  # summing keeps every batch element's gradient its own
                    loss.backward()
                    return loss

                loss = optimizer.step(closure)
                if frozen:
                    with torch.no_grad():
                        for n, saved in frozen.items():
                            for p, v in zip(params, saved):
                                p[n] = v
                if decay:
                    factor = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (it + 1) / level.iterations))
                    for g, b in zip(optimizer.param_groups, base):
                        g["lr"] = b * factor
                terms = evaluated["terms"]
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise RegistrationError(f"the objective became {value} in {stage.name}, level {li + 1}")
                values.append(value)
                if self.observers:
                    self._emit("iteration", {"stage": s, "stage_name": stage.name, "level": li, "iteration": it,
                                             "objective": value, "terms": {k: v.tolist() for k, v in terms.items()},
                                             "transform": t})
                converged = monitor.update(evaluated["total"].double().cpu().expand(t.batch_size))
                if converged is not None:
                    converged[list(frozen)] = True
                    if bool(converged.all()):
                        break
                    if separable:
                        for n in converged.nonzero().flatten().tolist():
                            frozen.setdefault(n, [p.detach()[n].clone() for p in params])
        finally:
            elapsed = time.perf_counter() - level_start
            self._emit("level_end", {"stage": s, "stage_name": stage.name, "level": li, "label": label,
                                     "iterations": len(values), "objective": values[-1] if values else None,
                                     "time_s": elapsed})
        return {"stage": stage.name, "level": li, "shrink": level.shrink, "sigma_mm": level.sigma, "stride": level.stride,
                "grid_size": list(data.grid.size), "iterations": len(values), "objective": values,
                "final_terms": {k: v.tolist() for k, v in terms.items()},
                "time_s": round(elapsed, 3)}
