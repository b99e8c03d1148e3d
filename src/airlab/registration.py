"""The registration engine: stages of pyramid levels minimising a weighted objective.

``objective = sum_i w_i * loss_i(fixed, moving o T) + sum_j w_j * reg_j(displacement of the stage)``

A :class:`Stage` says which transform to optimise, with which terms, optimiser and pyramid; a
:class:`Registration` runs stages in order, each starting from the transform the previous ones
found (kept fixed), and returns a :class:`Result` whose ``transform`` maps fixed physical points
to moving physical points for the whole pipeline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .filters import convolution_matrix, gaussian_kernel, smooth_mm
from .image import Image, resample
from .optim import Adam, FieldAdam
from .spatial import Grid, inside, sample, sample_grid
from .transforms import Composite, LinearTransform, Transform, Affine

__all__ = ["Level", "Stage", "Registration", "Result", "RegistrationError", "initial_translation"]


class RegistrationError(ValueError):
    """The inputs cannot be registered as given; the message says why."""


@dataclass
class Level:
    """One pyramid level: images resampled to ``shrink`` x the fixed spacing after Gaussian
    smoothing with ``sigma`` mm, then ``iterations`` optimiser steps at most.

    ``stride > 1`` evaluates the similarity on every ``stride``-th fixed voxel along each axis
    (the moving image keeps the level's resolution), moving the sublattice's offset every
    iteration so that each voxel counts once per ``stride**D`` iterations. A smooth transform
    needs far fewer voxels than a fine level has, and each iteration costs ``stride**D`` times
    less; unlike random sampling, runs repeat exactly.
    """

    shrink: float = 1.0
    sigma: float = 0.0
    iterations: int = 100
    stride: int = 1


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
            on the displacement of this stage's transform alone.
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
        on_level: ``(transform, level_index, level_grid) -> None`` hook run before each level
            (B-spline refinement, regridding a velocity field, ...).
        symmetric: for velocity fields: compare ``fixed o exp(-v/2)`` with
            ``moving o exp(v/2)`` in the space halfway between them, so neither image is
            favoured; the result is still ``exp(v)``, and its inverse ``exp(-v)`` is free.
        regulariser_shrink: regularisers see the stage's displacement on the level grid with
            this many times its spacing. Smooth transforms (B-splines, spline velocities) lose
            nothing at 2 and it saves most of their cost; use 1 for free-form dense fields,
            whose checkerboard modes only the full grid sees.
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
    name: str = "stage"


@dataclass
class Result:
    """What a registration found: ``transform`` maps fixed to moving physical points."""

    transform: Transform
    stages: list[Transform]
    history: list[dict] = field(default_factory=list)
    wall_time: float = 0.0
    fixed_grid: Grid | None = None

    def linear_part(self) -> LinearTransform | None:
        """The composed linear stages as one affine (``None`` without linear stages)."""
        linear = [t for t in self.stages if isinstance(t, LinearTransform)]
        if not linear:
            return None
        return compose_linear(linear)

    def warp(self, moving: Image, *, interpolation: str | None = None, outside: float = 0.0) -> Image:
        if self.fixed_grid is None:
            raise ValueError("the result does not know the fixed grid")
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


# --------------------------------------------------------------------------- inputs
def _quantile(values: torch.Tensor, q: float) -> float:
    """``torch.quantile(values, q)`` (linear interpolation) by selection instead of a full
    sort: half the time on a brain volume, and no size limit."""
    position = q * (values.numel() - 1)
    k = math.floor(position)
    lo = float(values.kthvalue(k + 1).values)
    if position == k:
        return lo
    return lo + (position - k) * (float(values.kthvalue(k + 2).values) - lo)


def _normalise(data: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Map intensities so that the 1st..99th percentiles (inside the mask) span 0..1, per image
    and channel: regulariser weights then mean the same on every image."""
    out = []
    for n in range(data.shape[0]):
        chans = []
        for c in range(data.shape[1]):
            x = data[n, c]
            vals = x[mask[min(n, mask.shape[0] - 1), 0] > 0] if mask is not None else x.reshape(-1)
            if vals.numel() > 2_000_000:  # a strided subset is plenty
                vals = vals[:: vals.numel() // 1_000_000 + 1]
            vals = vals.float()
            lo, hi = _quantile(vals, 0.01), _quantile(vals, 0.99)
            if hi - lo <= 1e-12 * max(abs(hi), 1.0):
                lo, hi = float(vals.min()), float(vals.max())
            chans.append((x - lo) / (hi - lo if hi > lo else 1.0))
        out.append(torch.stack(chans))
    return torch.stack(out)


def _check_image(image: Image, what: str) -> None:
    data = image.data
    if not data.is_floating_point():
        return
    bad = ~torch.isfinite(data)
    if bad.any():
        raise RegistrationError(
            f"the {what} image has {int(bad.sum())} NaN or infinite voxel(s); "
            "replace them or mask them out"
        )


def _check_mask(mask: Image | None, image: Image, what: str) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.ndim != image.ndim:
        raise RegistrationError(f"the {what} mask is {mask.ndim}D but the {what} image is {image.ndim}D")
    m = mask.data
    if not mask.grid.same_as(image.grid, atol=1e-4):
        m = resample(mask, image.grid, interpolation="nearest").data
    m = (m > 0).to(torch.get_default_dtype() if not image.data.is_floating_point() else image.data.dtype)
    if m.sum() == 0:
        raise RegistrationError(f"the {what} mask is empty (no non-zero voxel on the {what} grid)")
    return m


def _check_contrast(data: torch.Tensor, mask: torch.Tensor | None, what: str) -> None:
    for n in range(data.shape[0]):
        x = data[n]
        if mask is not None:
            x = x[:, mask[min(n, mask.shape[0] - 1), 0] > 0]
        if float(x.max() - x.min()) <= 0:
            raise RegistrationError(f"the {what} image is constant{' inside its mask' if mask is not None else ''}: "
                                    "there is nothing to register")


def _center_of_mass(data: torch.Tensor, grid: Grid, mask: torch.Tensor | None) -> torch.Tensor:
    """Intensity-weighted centre ``[N, D]`` (mm), using intensities above the image minimum."""
    w = data.mean(1, keepdim=True)
    w = w - w.flatten(1).amin(1).view(-1, 1, *([1] * grid.ndim))
    if mask is not None:
        w = w * mask
    pts = grid.points(dtype=w.dtype, device=w.device)  # [1, *shape, D]
    w = w[:, 0].unsqueeze(-1)
    return (w * pts).flatten(1, -2).sum(1) / w.flatten(1).sum(1, keepdim=True).clamp_min(1e-12)


def initial_translation(fixed: Image, moving: Image, method: str = "moments", fixed_mask=None, moving_mask=None):
    """Centres ``(fixed_centre [N, D], translation [N, D])`` aligning moving to fixed by their
    geometric centres (``"centres"``) or intensity centres of mass (``"moments"``)."""
    if method == "centres":
        cf = torch.as_tensor(fixed.grid.center(), dtype=torch.float64)[None]
        cm = torch.as_tensor(moving.grid.center(), dtype=torch.float64)[None]
    elif method == "moments":
        cf = _center_of_mass(fixed.data.double(), fixed.grid, None if fixed_mask is None else fixed_mask.double())
        cm = _center_of_mass(moving.data.double(), moving.grid, None if moving_mask is None else moving_mask.double())
    else:
        raise ValueError(f"unknown initialisation {method!r}; choose 'moments', 'centres' or None")
    return cf, cm - cf


def _radius(grid: Grid, mask: torch.Tensor | None) -> float:
    """Radius of gyration of the fixed domain (mm): how far a unit rotation moves points."""
    pts = grid.points(torch.float64).reshape(-1, grid.ndim)
    if mask is not None:
        pts = pts[mask[0, 0].reshape(-1).cpu() > 0]
    c = pts.mean(0)
    return float((pts - c).square().sum(-1).mean().sqrt().clamp_min(1.0))


# --------------------------------------------------------------------------- pyramid
@dataclass
class _LevelData:
    grid: Grid
    fixed: torch.Tensor
    fixed_weight: torch.Tensor | None
    moving_grid: Grid
    moving: torch.Tensor
    moving_mask: torch.Tensor | None
    regulariser_grid: Grid | None = None
    full: "_LevelData | None" = None  # the whole level, when this is a strided view of it


def _offsets(stride: int, ndim: int) -> list[tuple[int, ...]]:
    """Sublattice offsets in an order that alternates an offset with its opposite corner, so
    consecutive iterations see well-spread voxels."""
    offs = list(itertools.product(range(stride), repeat=ndim))
    half = len(offs) // 2
    order = [o for i in range(half) for o in (offs[i], offs[-1 - i])]
    return order + (offs[half:half + 1] if len(offs) % 2 else [])


def _strided_views(data: _LevelData, stride: int) -> list[_LevelData]:
    """The level seen through each sublattice of every ``stride``-th fixed voxel."""
    if stride <= 1:
        return [data]
    views = []
    for offset in _offsets(stride, data.grid.ndim):
        # tensor axes run (z, y, x): the reverse of the ITK-ordered offset
        index = (Ellipsis, *(slice(o, None, stride) for o in reversed(offset)))
        views.append(dataclasses.replace(
            data, grid=data.grid.subgrid(stride, offset), fixed=data.fixed[index],
            fixed_weight=None if data.fixed_weight is None else data.fixed_weight[index], full=data))
    return views


def _level_grid(grid: Grid, shrink: float) -> Grid:
    if shrink <= 1.0:
        return grid
    return grid.with_spacing(np.asarray(grid.spacing) * shrink)


def _downsample(data: torch.Tensor, grid: Grid, level_grid: Grid, sigma: float) -> torch.Tensor:
    if level_grid is grid or sigma <= 0:
        smoothed = smooth_mm(data, grid, sigma)
        return smoothed if level_grid is grid else sample_grid(smoothed, grid, level_grid, outside=None)
    # smoothing folded into the downsampling matrices: each axis is filtered at the level's size
    # (the same numbers as smoothing first, several times faster at the coarse levels)
    dtype = data.dtype if data.is_floating_point() else torch.get_default_dtype()
    filters = [convolution_matrix(gaussian_kernel(sigma / s, dtype=torch.float64), n).to(dtype)
               for n, s in zip(grid.size, grid.spacing)]
    return sample_grid(data, grid, level_grid, outside=None, filters=filters)


def _prepare_level(level: Level, fixed, fgrid, fmask, moving, mgrid, mmask) -> _LevelData:
    lg = _level_grid(fgrid, level.shrink)
    mg = _level_grid(mgrid, level.shrink)
    f = _downsample(fixed, fgrid, lg, level.sigma)
    m = _downsample(moving, mgrid, mg, level.sigma)
    fw = None
    if fmask is not None:
        fw = fmask if lg is fgrid else sample(fmask, fgrid, lg.points(fmask.dtype, fmask.device), "nearest", 0.0)
    mm = None
    if mmask is not None:
        mm = mmask if mg is mgrid else sample(mmask, mgrid, mg.points(mmask.dtype, mmask.device), "nearest", 0.0)
    return _LevelData(lg, f, fw, mg, m, mm)


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


def _make_optimizer(spec, groups):
    if callable(spec):
        return spec(groups)
    if spec == "adam":
        return Adam(groups)
    if spec == "field-adam":
        return FieldAdam(groups)
    if spec == "lbfgs":
        params = [p for g in groups for p in g["params"]]
        return torch.optim.LBFGS(params, lr=1.0, max_iter=1, history_size=20, line_search_fn="strong_wolfe")
    raise ValueError(f"unknown optimizer {spec!r}; choose 'adam', 'field-adam', 'lbfgs' or pass a factory")


class Registration:
    """Run :class:`Stage` s on a fixed and a moving image (or batches of them).

    Args:
        stages: the pipeline, e.g. ``[rigid, affine, deformable]``.
        initialisation: ``"moments"`` (centres of mass), ``"centres"`` (grid centres) or ``None``;
            used when the first stage's transform is linear and no ``initial`` transform is given.
        normalise: rescale intensities (1st..99th percentile -> 0..1) before registering.
        progress: report progress on stderr: a bar per stage and level on a terminal (tqdm), one
            line per level otherwise (logs).
        callbacks: called after every iteration with a dict (stage, level, iteration, objective,
            terms, transform).
        seed: seeds ``self.generator``, the random source for stochastic terms (none of the
            built-in ones is: on CPU the engine repeats exactly by construction). The global
            torch RNG is never touched.
    """

    def __init__(self, stages: Sequence[Stage], *, initialisation: str | None = "moments", normalise: bool = True,
                 progress: bool = True, callbacks: Sequence[Callable[[dict], None]] = (), seed: int | None = 0):
        if not stages:
            raise ValueError("a registration needs at least one stage")
        self.stages = list(stages)
        self.initialisation = initialisation
        self.normalise = normalise
        self.progress = progress
        self.callbacks = list(callbacks)
        self.seed = seed
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)

    def __call__(self, fixed: Image, moving: Image, **kwargs) -> Result:
        return self.run(fixed, moving, **kwargs)

    def run(self, fixed: Image, moving: Image, *, fixed_mask: Image | None = None, moving_mask: Image | None = None,
            initial: Transform | None = None, device=None, dtype=torch.float32) -> Result:
        start = time.perf_counter()
        if fixed.ndim != moving.ndim:
            raise RegistrationError(f"cannot register a {moving.ndim}D moving image to a {fixed.ndim}D fixed image")
        if fixed.data.shape[1] != moving.data.shape[1]:
            raise RegistrationError(
                f"fixed has {fixed.data.shape[1]} channel(s) but moving has {moving.data.shape[1]}"
            )
        nf, nm = fixed.data.shape[0], moving.data.shape[0]
        if nf != nm and 1 not in (nf, nm):
            raise RegistrationError(f"batch sizes differ: fixed {nf}, moving {nm}")
        batch = max(nf, nm)
        device = torch.device(device) if device is not None else fixed.data.device
        _check_image(fixed, "fixed")
        _check_image(moving, "moving")
        fmask = _check_mask(fixed_mask, fixed, "fixed")
        mmask = _check_mask(moving_mask, moving, "moving")
        f = fixed.data.to(device=device, dtype=dtype)
        m = moving.data.to(device=device, dtype=dtype)
        fmask = None if fmask is None else fmask.to(device=device, dtype=dtype)
        mmask = None if mmask is None else mmask.to(device=device, dtype=dtype)
        _check_contrast(f, fmask, "fixed")
        _check_contrast(m, mmask, "moving")
        if self.normalise:
            f, m = _normalise(f, fmask), _normalise(m, mmask)
        radius = _radius(fixed.grid, None if fmask is None else fmask.cpu())

        done: list[Transform] = []  # stage transforms, fixed once their stage is over
        prior = None
        if initial is not None:
            prior = initial.to(device=device, dtype=dtype)
            for p in prior.parameters():
                p.requires_grad_(False)
        history: list[dict] = []
        # stages usually share pyramid levels (rigid, affine and the deformable stage all start
        # at the same coarse ones): smooth and downsample each (shrink, sigma) once
        pyramid: dict[tuple[float, float], _LevelData] = {}
        for s, stage in enumerate(self.stages):
            t = stage.transform if isinstance(stage.transform, Transform) else stage.transform(fixed.grid, batch)
            t = t.to(device=device, dtype=dtype)
            if isinstance(t, LinearTransform):
                if not self._continue_linear(t, done) and not done and prior is None and self.initialisation:
                    cf, tr = initial_translation(fixed, moving, self.initialisation, fmask, mmask)
                    with torch.no_grad():
                        t.center.copy_(cf.to(t.center).expand_as(t.center))
                        t.translation.copy_(tr.to(t.center).expand_as(t.translation))
            previous = _chain(done, prior)
            for li, level in enumerate(stage.levels):
                key = (float(level.shrink), float(level.sigma))
                if key not in pyramid:
                    pyramid[key] = _prepare_level(level, f, fixed.grid, fmask, m, moving.grid, mmask)
                data = dataclasses.replace(pyramid[key])  # a stage may set its regulariser grid
                if stage.regularisers and stage.regulariser_shrink > 1:
                    data.regulariser_grid = _level_grid(data.grid, stage.regulariser_shrink)
                if stage.on_level is not None:
                    stage.on_level(t, li, data.grid)
                history.append(self._run_level(stage, s, li, level, t, previous, data, radius))
            for p in t.parameters():
                p.requires_grad_(False)
            done.append(t)
        return Result(_chain(done, prior), done, history, time.perf_counter() - start, fixed.grid)

    # ------------------------------------------------------------------ pieces
    @staticmethod
    def _continue_linear(t: LinearTransform, done: list[Transform]) -> bool:
        """An affine stage after linear stages starts where they ended and replaces them, so the
        final chain holds one linear transform (rigid -> affine gives one affine)."""
        if not done or not all(isinstance(x, LinearTransform) for x in done) or not isinstance(t, Affine):
            return False
        start = compose_linear(done)
        with torch.no_grad():
            t.center.copy_(start.center.to(t.center))
            t.linear.copy_(start.linear.to(t.linear))
            t.translation.copy_(start.translation.to(t.translation))
        done.clear()
        return True

    def _objective(self, stage, t, previous, data: _LevelData, points):
        with t.cached() if hasattr(t, "cached") else contextlib.nullcontext():
            return self._terms(stage, t, previous, data, points)

    def _terms(self, stage, t, previous, data: _LevelData, points):
        fixed = data.fixed
        if stage.symmetric:
            if not hasattr(t, "scaled"):
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
        for w, loss in stage.losses:
            v = loss(fixed, warped, weight=weight, grid=data.grid)
            terms[type(loss).__name__] = v.detach()
            total = total + w * v
        if stage.regularisers:
            reg_grid = data.regulariser_grid or data.grid
            reg_disp = disp if reg_grid is data.grid else t.displacement(reg_grid)
        for w, reg in stage.regularisers:
            v = reg(reg_disp, reg_grid)
            terms[type(reg).__name__] = v.detach()
            total = total + w * v
        return total, terms

    def _run_level(self, stage, s, li, level, t, previous, data: _LevelData, radius) -> dict:
        views = _strided_views(data, level.stride)
        points = [v.grid.points(dtype=data.fixed.dtype, device=data.fixed.device) for v in views]
        # a strided objective varies with the sublattice: compare values of the same one
        lag = -(-stage.patience // len(views)) * len(views)
        optimizer = _make_optimizer(stage.optimizer, _param_groups(t, stage.lr, radius))
        # cosine annealing by hand: any optimiser with param_groups, and no torch.optim.lr_scheduler,
        # which would import torch._dynamo (see optim.py)
        decay = stage.decay and level.iterations > 1 and not isinstance(optimizer, torch.optim.LBFGS)
        base = [g["lr"] for g in optimizer.param_groups]
        values: list[float] = []
        bar = None
        label = f"{stage.name} level {li + 1}/{len(stage.levels)}"
        interactive = self.progress and sys.stderr.isatty()
        if interactive and level.iterations > 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=level.iterations, desc=label, leave=False, dynamic_ncols=True, mininterval=0.5)
        level_start = time.perf_counter()
        terms = {}
        # Early stopping is per pair: a converged pair keeps its parameters while the others go
        # on, so a batch ends where its pairs would have ended alone (not for LBFGS, whose line
        # search couples the pairs).
        params = [p for p in t.parameters() if p.requires_grad]
        separable = (t.batch_size > 1 and not isinstance(optimizer, torch.optim.LBFGS)
                     and all(p.shape[0] == t.batch_size for p in params))
        per_pair: list[torch.Tensor] = []
        frozen: dict[int, list[torch.Tensor]] = {}
        try:
            for it in range(level.iterations):
                def closure():
                    for p in params:
                        p.grad = None
                    k = it % len(views)
                    total, closure.terms = self._objective(stage, t, previous, views[k], points[k])
                    closure.total = total.detach()
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
                terms = closure.terms
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise RegistrationError(f"the objective became {value} in {stage.name}, level {li + 1}")
                values.append(value)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(objective=f"{value:.5g}", refresh=False)
                for cb in self.callbacks:
                    cb({"stage": s, "stage_name": stage.name, "level": li, "iteration": it, "objective": value,
                        "terms": {k: v.tolist() for k, v in terms.items()}, "transform": t})
                per_pair.append(closure.total.double().cpu().expand(t.batch_size))
                if len(per_pair) > lag:
                    old = per_pair[-1 - lag]
                    done = old - per_pair[-1] <= stage.tolerance * old.abs().clamp_min(1e-12)
                    done[list(frozen)] = True
                    if bool(done.all()):
                        break
                    if separable:
                        for n in done.nonzero().flatten().tolist():
                            frozen.setdefault(n, [p.detach()[n].clone() for p in params])
        finally:
            if bar is not None:
                bar.close()
        if self.progress and not interactive and values:
            # logs get one line per level instead of a redrawn bar
            print(f"{label}: {len(values)} iterations, objective {values[-1]:.5g}, "
                  f"{time.perf_counter() - level_start:.1f} s", file=sys.stderr, flush=True)
        return {"stage": stage.name, "level": li, "shrink": level.shrink, "sigma_mm": level.sigma, "stride": level.stride,
                "grid_size": list(data.grid.size), "iterations": len(values), "objective": values,
                "final_terms": {k: v.tolist() for k, v in terms.items()},
                "time_s": round(time.perf_counter() - level_start, 3)}
