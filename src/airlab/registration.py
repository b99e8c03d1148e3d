"""The registration engine: stages of pyramid levels minimising a weighted objective.

A :class:`Stage` says which transform to optimise, with which terms, optimiser and pyramid; a
:class:`Registration` runs stages in order, each starting from the transform the previous ones
found (kept fixed), and returns a :class:`Result` whose ``transform`` maps fixed physical points
to moving physical points for the whole pipeline. The parts: :mod:`airlab.inputs` (checks,
normalisation, initialisation), :mod:`airlab.pyramid` (levels), :mod:`airlab.objective` (the
weighted terms), :mod:`airlab.solver` (one level's optimisation, convergence, events).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from . import compiled
from .errors import RegistrationError
from .image import Image, as_image, resample
from .inputs import initial_translation, prepare_pair
from .landmarks import LANDMARK_WEIGHT, landmark_pairs
from .objective import Objective, term_names
from .pipelines.names import LINEAR_TRANSFORMS
from .progress import as_observer, default_progress
from .pyramid import Level, Pyramid, level_grid
from .solver import solve_level
from .spatial import Grid
from .transforms import Composite, LinearTransform, Transform, Affine
from .transforms.registry import TransformSpec

__all__ = ["Level", "Stage", "Registration", "Result", "RegistrationError", "initial_translation", "compose_linear",
           "term_names"]


TransformFactory = Callable[[Grid, int], Transform]

def _may_run_compiled(stage: "Stage") -> bool:
    """Might the stage use :mod:`airlab.compiled`'s loops: does it sample cubically, or is its
    transform deformable (cubic B-splines, scaling and squaring, also when the result is written)?
    A linear pipeline never loads numba."""
    if stage.interpolation == "bspline" or any(level.interpolation == "bspline" for level in stage.levels):
        return True
    t = stage.transform
    if isinstance(t, TransformSpec):
        return t.name not in LINEAR_TRANSFORMS
    return not isinstance(t, LinearTransform)


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
        lr_quantile: for ``"field-adam"``: ``lr`` is the step of the gradient entry at this
            quantile of the field's entries (1: the largest); larger steps are clipped to
            ``lr`` (:class:`~airlab.optim.FieldAdam`).
        interpolation: how the moving image is sampled while optimising: ``"linear"`` or
            ``"bspline"`` (cubic B-spline, its coefficients computed once per level; the gradient
            with respect to the points that of :func:`~airlab.splines.sample_cubic`). Linear
            interpolation blurs the moving image by an amount that depends on where a point falls
            between voxels, so the best match of a fine transform is off the true one by that
            texture; cubic sampling costs more per step and removes most of it. Its samples are
            clamped to the range of their cell's voxels (no ringing beside a hard edge). A
            level's own ``Level.interpolation`` overrides this on that level.
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
    lr_quantile: float = 1.0
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


class Registration:
    """Run :class:`Stage` s on a fixed and a moving image (or batches of them).

    Args:
        stages: the pipeline, e.g. ``[rigid, affine, deformable]``.
        initialisation: ``"moments"`` (centres of mass), ``"centres"`` (grid centres) or ``None``;
            used when the first stage's transform is linear and no ``initial`` transform is given.
        normalise: rescale intensities (1st..99th percentile -> 0..1) before registering.
        progress: report progress on stderr (a bar per level on a terminal, one line per level
            otherwise); or an :class:`~airlab.progress.Observer`.
        callbacks: :class:`~airlab.progress.Observer` s, or callables called after every
            iteration with a dict (stage, level, iteration, objective, terms, transform).
        seed: seeds the random numbers of stochastic terms (none of the built-in ones is: on CPU
            the engine repeats exactly by construction) inside a forked generator state, so the
            global torch RNG is left as it was.
        check_every: look at the objective on the host (finite, converged, overlapping) every
            this many iterations; ``None``: every iteration on the CPU, where it costs nothing,
            every 10 on other devices, which a host synchronisation stalls. The result is the
            same either way (see :mod:`airlab.solver`); observers get a block's iteration events
            at its check.
    """

    def __init__(self, stages: Sequence[Stage], *, initialisation: str | None = "moments", normalise: bool = True,
                 progress=True, callbacks: Sequence = (), seed: int | None = 0, check_every: int | None = None):
        if not stages:
            raise ValueError("a registration needs at least one stage")
        for stage in stages:
            for interpolation in [stage.interpolation] + [lv.interpolation for lv in stage.levels if lv.interpolation]:
                if interpolation not in ("linear", "bspline"):
                    raise ValueError(f"stage {stage.name!r}: interpolation {interpolation!r}; choose 'linear' or "
                                     "'bspline'")
        self.stages = list(stages)
        self.initialisation = initialisation
        self.normalise = normalise
        self.observers = [as_observer(obs) for obs in callbacks]
        if progress is True:
            self.observers.append(default_progress())
        elif progress:
            self.observers.append(as_observer(progress))
        self.seed = seed
        if check_every is not None and check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        self.check_every = check_every

    def __call__(self, fixed: Image, moving: Image, **kwargs) -> Result:
        return self.run(fixed, moving, **kwargs)

    def _emit(self, event: str, info: dict) -> None:
        for obs in self.observers:
            getattr(obs, event)(info)

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
        if device.type == "cpu" and fixed.ndim == 3 and any(_may_run_compiled(stage) for stage in self.stages):
            compiled.warm_up()  # numba's start-up, begun while the first stages run (it shares the GIL with them)
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
            objective = Objective(stage, landmarks, dtype=dtype, device=device)
            check_every = self.check_every or (1 if device.type == "cpu" else 10)
            for li, level in enumerate(stage.levels):
                found = None
                if stage.match_sharpness:
                    matched, found = pyramid.matched(level)
                    data = dataclasses.replace(matched)
                else:
                    data = dataclasses.replace(pyramid[level])  # a stage may set its regulariser grid
                if (level.interpolation or stage.interpolation) == "bspline":
                    data.moving_spline = pyramid.spline(level, matched=stage.match_sharpness)
                if stage.regularisers and stage.regulariser_shrink > 1:
                    data.regulariser_grid = level_grid(data.grid, stage.regulariser_shrink)
                t.start_level(li, data.grid)
                if stage.on_level is not None:
                    stage.on_level(t, li, data.grid)
                info = {"stage": s, "stage_name": stage.name, "level": li,
                        "label": f"{stage.name} level {li + 1}/{len(stage.levels)}"}
                entry = solve_level(objective, t, previous, data, stage=stage, level=level, radius=pair.radius,
                                    emit=self._emit, info=info, check_every=check_every)
                history.append({"stage": stage.name, "level": li, "shrink": level.shrink, "sigma_mm": level.sigma,
                                "stride": level.stride, "grid_size": list(data.grid.size)} | entry)
                if found is not None:
                    history[-1]["sharpness"] = [m.as_dict() for m in found]
            for p in t.parameters():
                p.requires_grad_(False)
            done.append(t)
        return Result(_chain(done, prior), done, history, time.perf_counter() - start, fixed.grid)
