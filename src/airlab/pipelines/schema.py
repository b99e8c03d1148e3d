"""Registration pipelines as data: the schema of ``airlab register --config FILE``, of the
presets shipped as YAML beside this module, and of the ``pipeline`` that metrics.json records.

A config either picks a preset and adjusts it, or writes the stages out::

    preset: diffeomorphic        # optional: rigid, affine, bspline, diffeomorphic, smooth, intersubject
    metric: mi                   # the deformable stage's similarity (presets only)
    seed: 0
    stages:                      # optional: replaces the preset's stages
      - name: rigid
        transform: rigid         # translation, rigid, similarity, affine, bspline, velocity, dense-velocity, wendland
        losses: [{name: ncc}]
        levels: [{shrink: 4, sigma: 4, iterations: 100}]
        lr: 0.5
      - name: deformable
        transform: velocity      # a B-spline velocity, exponentiated (diffeomorphic)
        control_spacing: 40      # mm at the first level, halved at every later level
        losses: [{name: mi, bins: 64}]
        regularisers: [{name: bending, weight: 0.1}]
        iterations: [100, 60, 25] # per level, coarse to fine, the last at full resolution
        optimizer: field-adam
        lr: 0.25                 # field-adam: the largest step, mm (lr_unit: voxel for fixed voxels)

A stage's pyramid is either ``levels`` written out, or sized from the fixed image (the coarsest
level has 25-50 voxels along its longest axis, smoothing sigma half the level spacing) with
``iterations`` per level and ``pyramid`` saying which levels the list names: ``finest`` (the
default: the last entry at full resolution), ``coarsest`` (the first entries from the coarsest
level on) or ``all`` (every level; a shorter list is padded at the coarse end with its first
value). ``strides`` lists per-level sublattice strides for the finest of those levels (the
stage's first level is never strided). ``interpolation`` is one value for every level, or a
list aligned with the levels from the finest one back and padded at the coarse end with its
first value (``[linear, bspline]``: cubic on the finest level, linear on the coarser ones).

Every key is checked: an unknown key or a wrong type is reported with its place in the file.
A pipeline is a pydantic model: it compares equal to another with the same content, pickles,
and :meth:`PipelineConfig.resolve` writes a preset out as stages.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError, field_validator,
                      model_validator)

from ..errors import ConfigError
from .names import (LATTICE_REGULARISERS, LINEAR_TRANSFORMS, LOSS_OPTIONS, METRICS, PRESETS, REGULARISER_OPTIONS,
                    TRANSFORM_NAMES)

# The engine (and with it PyTorch) is imported where a pipeline is built, not where it is
# validated: a batch runner's parent process validates and sends pipelines, nothing more.
if TYPE_CHECKING:
    from ..pyramid import Level
    from ..registration import Stage
    from ..spatial import Grid

__all__ = ["ConfigError", "PipelineConfig", "StageConfig", "TermConfig", "LevelConfig", "load_config", "pyramid",
           "PRESETS", "METRICS"]


def pyramid(grid: Grid, iterations: list[int] | int, *, finest: int = 1, coarsest_voxels: int = 25) -> list[Level]:
    """Levels coarse to fine with shrink factors 2**k, down to ``finest``; a list of iterations
    shorter than the pyramid is padded at the coarse end with its first value."""
    from ..pyramid import Level

    factors = [1]
    while max(grid.size) / (factors[-1] * 2) >= coarsest_voxels:
        factors.append(factors[-1] * 2)
    factors = [f for f in reversed(factors) if f >= finest] or [finest]
    if isinstance(iterations, int):
        iterations = [iterations] * len(factors)
    iterations = list(iterations)[-len(factors):]
    iterations = [iterations[0]] * (len(factors) - len(iterations)) + iterations
    spacing = float(np.mean(grid.spacing))
    return [Level(shrink=f, sigma=0.5 * spacing * f if f > 1 else 0.0, iterations=n) for f, n in zip(factors, iterations)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TermConfig(BaseModel):
    """A loss or regulariser: its registry name, weight, and constructor arguments."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str
    weight: float = 1.0

    def options(self) -> dict:
        return dict(self.model_extra or {})


class LevelConfig(_Strict):
    shrink: float = Field(1.0, ge=1.0)
    sigma: float = Field(0.0, ge=0.0)
    iterations: int = Field(100, ge=0)
    stride: int = Field(1, ge=1)
    interpolation: Literal["linear", "bspline"] | None = None  # None: the stage's


Interpolation = Literal["linear", "bspline"]


class StageConfig(_Strict):
    name: str | None = None
    transform: str
    losses: list[TermConfig] = Field(min_length=1)
    regularisers: list[TermConfig] = []
    levels: list[LevelConfig] | None = None
    iterations: Annotated[list[NonNegativeInt], Field(min_length=1)] | NonNegativeInt | None = None
    pyramid: Literal["finest", "coarsest", "all"] = "finest"
    strides: list[PositiveInt] | None = None
    optimizer: Literal["adam", "field-adam", "lbfgs"] = "adam"
    lr: float = Field(0.1, gt=0)
    # field-adam's lr is its largest step in mm; "voxel" reads it in the fixed image's voxels
    # (their mean spacing), so that one pipeline steps alike on a 1 mm and a 2 mm image
    lr_unit: Literal["mm", "voxel"] = "mm"
    # field-adam: lr is the step at this quantile of the gradient's entries (1: the largest)
    lr_quantile: float = Field(1.0, gt=0.0, le=1.0)
    decay: bool = True
    tolerance: float = Field(1e-5, ge=0)
    patience: int = Field(20, ge=1)
    control_spacing: float | None = Field(None, gt=0)
    steps: int = Field(4, ge=0)
    exp_shrink: float = Field(4.0, ge=1.0)
    regulariser_shrink: float = Field(1.0, ge=1.0)
    symmetric: bool = False
    gradient_sigma: float = Field(0.0, ge=0.0)
    exact_gradient: bool = True
    # the moving image's, while optimising: one for every level, or per level (see the module docstring)
    interpolation: Interpolation | Annotated[list[Interpolation], Field(min_length=1)] = "linear"
    match_sharpness: bool = False  # smooth the sharper image of each level to the other's sharpness
    # transform: wendland only (compactly supported radial kernels on one lattice, no refinement)
    support: float | None = Field(None, gt=0)  # kernel radius, mm (default: twice control_spacing)
    order: Literal[2, 4, 6] | None = None  # smoothness C2, C4 (default), C6
    diffeomorphic: bool | None = None  # the kernel field as a velocity, exponentiated

    @field_validator("transform")
    @classmethod
    def _known_transform(cls, name):
        if name not in TRANSFORM_NAMES:
            from ..transforms import TRANSFORMS  # one added at run time

            if name not in TRANSFORMS:
                raise ValueError(f"unknown transform {name!r}; choose from {', '.join(TRANSFORMS)}")
        return name

    @field_validator("losses")
    @classmethod
    def _known_losses(cls, terms):
        return _known(terms, LOSS_OPTIONS, "losses", "LOSSES", "loss")

    @field_validator("regularisers")
    @classmethod
    def _known_regularisers(cls, terms):
        return _known(terms, REGULARISER_OPTIONS, "regularisers", "REGULARISERS", "regulariser")

    @model_validator(mode="after")
    def _one_pyramid(self):
        if self.levels is not None and (self.iterations is not None or self.strides is not None):
            raise ValueError("give either 'levels' or 'iterations' (and 'strides'), not both")
        if self.gradient_sigma > 0 and self.optimizer == "lbfgs":
            raise ValueError("'gradient_sigma' needs optimizer adam or field-adam (L-BFGS takes its own steps)")
        if self.lr_unit == "voxel" and self.optimizer != "field-adam":
            raise ValueError("'lr_unit: voxel' needs optimizer field-adam (whose lr is a step in mm)")
        if self.lr_quantile != 1.0 and self.optimizer != "field-adam":
            raise ValueError("'lr_quantile' needs optimizer field-adam (whose lr is the step of its largest gradient)")
        if not self.exact_gradient and self.transform != "dense-velocity":
            raise ValueError("'exact_gradient: false' applies to transform: dense-velocity")
        wendland_only = [k for k in ("support", "order", "diffeomorphic") if getattr(self, k) is not None]
        if wendland_only and self.transform != "wendland":
            raise ValueError(f"{', '.join(wendland_only)}: only for transform: wendland")
        velocity = self.transform in ("velocity", "dense-velocity") or self.transform == "wendland" and self.diffeomorphic
        lattice = [t.name for t in self.regularisers if _lattice(t.name)]
        if lattice and (self.transform in LINEAR_TRANSFORMS or self.transform == "dense-velocity"):
            raise ValueError(f"regulariser {lattice[0]!r} penalises a coefficient lattice, which transform "
                             f"{self.transform!r} does not have; use it with bspline, velocity or wendland")
        if self.symmetric and not velocity:
            raise ValueError("'symmetric' needs a velocity: transform velocity, dense-velocity, or wendland with "
                             "diffeomorphic: true")
        return self

    def build_levels(self, grid: Grid) -> list[Level]:
        from ..pyramid import Level

        if self.levels is not None:
            levels = [Level(**lv.model_dump()) for lv in self.levels]
        else:
            its = self.iterations if self.iterations is not None else 100
            if isinstance(its, int) or self.pyramid == "all":
                levels = pyramid(grid, its)
            elif self.pyramid == "finest":
                levels = pyramid(grid, its)[-len(its):]
            else:
                levels = pyramid(grid, its[0])[:len(its)]
                for level, n in zip(levels, its):
                    level.iterations = n
            for level, stride in zip(reversed(levels[1:]), reversed(self.strides or [])):
                level.stride = stride
        if isinstance(self.interpolation, list):
            per_level = self.interpolation[-len(levels):]
            per_level = [per_level[0]] * (len(levels) - len(per_level)) + per_level
            for level, interpolation in zip(levels, per_level):
                level.interpolation = level.interpolation or interpolation
        return levels

    def build(self, index: int, grid: Grid) -> Stage:
        from ..losses import LOSSES
        from ..registration import Stage
        from ..regularisers import REGULARISERS
        from ..transforms import TransformSpec

        levels = self.build_levels(grid)
        voxel = float(np.mean(grid.spacing))  # the fixed image's mean spacing, mm
        options = {}
        if self.transform not in LINEAR_TRANSFORMS and self.transform != "dense-velocity":
            # control points every 5 voxels of the finest level, twice that per coarser level
            options["control_spacing"] = self.control_spacing or 5.0 * voxel * 2 ** (len(levels) - 1)
        if self.transform in ("velocity", "dense-velocity") or self.transform == "wendland" and self.diffeomorphic:
            options.update(steps=self.steps, exp_shrink=self.exp_shrink)
        if self.transform == "dense-velocity":
            options.update(exact_gradient=self.exact_gradient)
        if self.transform == "wendland":
            # one lattice for every level (no exact refinement): knots every 8 voxels of the finest level
            options["control_spacing"] = self.control_spacing or 8.0 * voxel
            options.update(support=self.support, order=self.order or 4, diffeomorphic=bool(self.diffeomorphic))
        lr = self.lr * (voxel if self.lr_unit == "voxel" else 1.0)
        return Stage(
            TransformSpec(self.transform, options),
            [(t.weight, LOSSES[t.name](**t.options())) for t in self.losses],
            [(t.weight, REGULARISERS[t.name](**t.options())) for t in self.regularisers],
            levels=levels, optimizer=self.optimizer, lr=lr, decay=self.decay, tolerance=self.tolerance,
            patience=self.patience, regulariser_shrink=self.regulariser_shrink, symmetric=self.symmetric,
            gradient_sigma=self.gradient_sigma, lr_quantile=self.lr_quantile,
            interpolation=self.interpolation[-1] if isinstance(self.interpolation, list) else self.interpolation,
            match_sharpness=self.match_sharpness, name=self.name or f"{self.transform} {index + 1}",
        )


class PipelineConfig(_Strict):
    preset: Literal[PRESETS] | None = None
    metric: Literal[METRICS] | None = None
    seed: int | None = None
    device: Literal["auto", "cpu", "cuda"] | None = None
    initialisation: Literal["moments", "centres", "none"] = "moments"
    normalise: bool = True
    stages: list[StageConfig] | None = None

    @model_validator(mode="after")
    def _something_to_run(self):
        if self.preset is None and not self.stages:
            raise ValueError("give a 'preset' or a list of 'stages'")
        if self.stages and self.metric is not None:
            raise ValueError("'metric' applies to presets; with 'stages', name each stage's losses")
        return self

    def resolve(self, preset: str | None = None, metric: str | None = None) -> "PipelineConfig":
        """This pipeline with its stages written out: the preset (``preset``/``metric``, from the
        command line, win over the file's) expanded into the stages it stands for. What
        metrics.json records, and what replays the run."""
        name = preset or (None if self.stages else self.preset)
        if name is None:
            if metric is not None:
                raise ConfigError("a metric applies to presets; these stages name their own losses")
            return self
        stages = preset_pipeline(name, metric=metric or (self.metric if self.preset == name else None)).stages
        return self.model_copy(update={"preset": None, "metric": None, "stages": stages})

    def build(self, fixed_grid: Grid) -> list[Stage]:
        """The engine's stages for images on ``fixed_grid``."""
        return [s.build(i, fixed_grid) for i, s in enumerate(self.resolve().stages)]

    def registration_options(self) -> dict:
        """The keyword arguments of :class:`~airlab.registration.Registration` this file sets."""
        return {"initialisation": None if self.initialisation == "none" else self.initialisation,
                "normalise": self.normalise}


def _registry(module: str, name: str) -> dict:
    return getattr(importlib.import_module(f"..{module}", __package__), name)


def _known(terms, built_in: dict, module: str, name: str, what: str):
    """Each term's name and options, checked against the built-in table, or against the registry
    (imported only then) for a name the table does not hold."""
    for t in terms:
        accepted = built_in.get(t.name)
        if accepted is None:
            registry = _registry(module, name)
            if t.name not in registry:
                raise ValueError(f"unknown {what} {t.name!r}; choose from {', '.join(registry)}")
            accepted = inspect.signature(registry[t.name]).parameters
        for key in t.options():
            if key not in accepted:
                raise ValueError(f"{what} {t.name!r} has no option {key!r}; it takes {', '.join(accepted) or 'none'}")
    return terms


def _lattice(name: str) -> bool:
    """Whether regulariser ``name`` penalises a coefficient lattice."""
    if name in REGULARISER_OPTIONS:
        return name in LATTICE_REGULARISERS
    from ..regularisers import REGULARISERS, ParameterRegulariser

    return issubclass(REGULARISERS[name], ParameterRegulariser)


def _where(loc) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def validate(raw, source: str) -> PipelineConfig:
    """A pipeline from parsed YAML/JSON; :class:`ConfigError` names ``source``, the key and the
    first problem. A metrics.json written by ``airlab register`` replays the pipeline it records."""
    if isinstance(raw, dict) and raw.get("command") in ("register", "demo") and "pipeline" in raw:
        raw = raw["pipeline"]
    if not isinstance(raw, dict):
        raise ConfigError(f"config {source} must be a mapping of keys to values, not {type(raw).__name__}")
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        more = f" (and {len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
        raise ConfigError(f"config {source}: {_where(err['loc'])}: {msg}{more}") from None


def load_config(path: str | Path) -> PipelineConfig:
    """Read and validate a YAML pipeline (or the metrics.json of a run, to replay it);
    :class:`ConfigError` names the first problem."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else getattr(exc, "lineno", None)
        where = f" (line {line})" if line is not None else ""
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise ConfigError(f"config {path} is not valid {kind}{where}: {getattr(exc, 'problem', None) or getattr(exc, 'msg', exc)}") from None
    return validate(raw, str(path))


# The presets shipped as YAML beside this module, read and expanded here rather than in presets.py
# because PipelineConfig.resolve writes a preset out as stages (presets.py builds them for a grid).
def metric_term(metric: str) -> TermConfig:
    """The similarity term a preset uses for ``metric``."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if metric == "lncc":
        return TermConfig(name="lncc", radius=2)
    if metric in ("mi", "nmi"):
        # fine bins resolve small misalignments; the Parzen window keeps them smooth
        return TermConfig(name=metric, bins=64)
    return TermConfig(name=metric)


@functools.lru_cache(maxsize=None)
def _shipped(name: str) -> PipelineConfig:
    text = resources.files(__package__).joinpath(f"{name}.yaml").read_text()
    import yaml

    return validate(yaml.safe_load(text), f"preset {name}")


def default_metric(name: str) -> str:
    """The deformable (or, for linear presets, the linear) stage's similarity of preset ``name``."""
    return _shipped(name).stages[-1].losses[0].name


def preset_pipeline(name: str, *, metric: str | None = None) -> PipelineConfig:
    """Preset ``name`` as a pipeline with its stages written out. ``metric`` replaces the
    deformable stage's similarity; linear stages take (N)MI when it is asked for and NCC
    otherwise (global statistics suit them; across contrasts only (N)MI works)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    pipeline = _shipped(name)
    if metric is None:
        return pipeline
    term = metric_term(metric)
    linear = term if metric in ("mi", "nmi") else metric_term("ncc")
    stages = []
    for stage in pipeline.stages:
        stages.append(stage.model_copy(update={"losses": [linear if stage.transform in LINEAR_TRANSFORMS else term]}))
    return pipeline.model_copy(update={"stages": stages})
