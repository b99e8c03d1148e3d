"""Registration pipelines written as YAML (``airlab register --config FILE``).

A config either picks a preset and adjusts it, or writes the stages out::

    preset: diffeomorphic        # optional: rigid, affine, bspline, diffeomorphic
    metric: mi                   # the deformable stage's similarity (presets only)
    seed: 0
    stages:                      # optional: replaces the preset's stages
      - name: rigid
        transform: rigid         # translation, rigid, similarity, affine, bspline, velocity
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
        lr: 0.25

Every key is checked: an unknown key or a wrong type is reported with its place in the file.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError, field_validator,
                      model_validator)

from .losses import LOSSES
from .presets import PRESETS, METRICS, preset, pyramid
from .regularisers import REGULARISERS
from .registration import Level, Stage
from .spatial import Grid

__all__ = ["ConfigError", "PipelineConfig", "load_config"]

TRANSFORMS = ("translation", "rigid", "similarity", "affine", "bspline", "velocity")


class ConfigError(ValueError):
    """The config cannot be used; the message names the file, the key and the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TermConfig(BaseModel):
    """A loss or regulariser: its registry name, weight, and constructor arguments."""

    model_config = ConfigDict(extra="allow")
    name: str
    weight: float = 1.0

    def options(self) -> dict:
        return dict(self.model_extra or {})


class LevelConfig(_Strict):
    shrink: float = Field(1.0, ge=1.0)
    sigma: float = Field(0.0, ge=0.0)
    iterations: int = Field(100, ge=0)
    stride: int = Field(1, ge=1)


class StageConfig(_Strict):
    name: str | None = None
    transform: Literal[TRANSFORMS]
    losses: list[TermConfig] = Field(min_length=1)
    regularisers: list[TermConfig] = []
    levels: list[LevelConfig] | None = None
    iterations: Annotated[list[NonNegativeInt], Field(min_length=1)] | NonNegativeInt | None = None
    optimizer: Literal["adam", "field-adam", "lbfgs"] = "adam"
    lr: float = Field(0.1, gt=0)
    decay: bool = True
    tolerance: float = Field(1e-5, ge=0)
    patience: int = Field(20, ge=1)
    control_spacing: float | None = Field(None, gt=0)
    steps: int = Field(4, ge=0)
    regulariser_shrink: float = Field(1.0, ge=1.0)
    symmetric: bool = False

    @field_validator("losses")
    @classmethod
    def _known_losses(cls, terms):
        return _known(terms, LOSSES, "loss")

    @field_validator("regularisers")
    @classmethod
    def _known_regularisers(cls, terms):
        return _known(terms, REGULARISERS, "regulariser")

    @model_validator(mode="after")
    def _one_pyramid(self):
        if self.levels is not None and self.iterations is not None:
            raise ValueError("give either 'levels' or 'iterations', not both")
        if self.symmetric and self.transform != "velocity":
            raise ValueError("'symmetric' needs transform: velocity")
        return self


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

    def build(self, fixed_grid: Grid, preset_name: str | None = None, metric: str | None = None) -> list[Stage]:
        """The stages for images on ``fixed_grid``; ``preset_name``/``metric`` (from the command
        line) win over the file's."""
        if not self.stages:
            return preset(preset_name or self.preset, fixed_grid, metric=metric or self.metric)
        return [_stage(s, i, fixed_grid) for i, s in enumerate(self.stages)]


def _known(terms, registry, what):
    for t in terms:
        if t.name not in registry:
            raise ValueError(f"unknown {what} {t.name!r}; choose from {', '.join(registry)}")
        accepted = inspect.signature(registry[t.name]).parameters
        for key in t.options():
            if key not in accepted:
                raise ValueError(f"{what} {t.name!r} has no option {key!r}; it takes {', '.join(accepted) or 'none'}")
    return terms


def _stage(cfg: StageConfig, index: int, grid: Grid) -> Stage:
    from .presets import _refine_after_first, _velocity_on_level
    from .transforms import Affine, BSplineTransform, BSplineVelocityField, Rigid, Similarity, Translation

    if cfg.levels is not None:
        levels = [Level(**lv.model_dump()) for lv in cfg.levels]
    else:
        its = cfg.iterations if cfg.iterations is not None else 100
        # a list names its levels, the last at full resolution; a number fills the whole pyramid
        levels = pyramid(grid, its)[-len(its):] if isinstance(its, list) else pyramid(grid, its)
    d = grid.ndim
    on_level = None
    spacing = cfg.control_spacing or 5.0 * float(np.mean(grid.spacing)) * 2 ** (len(levels) - 1)
    linear = {"translation": Translation, "rigid": Rigid, "similarity": Similarity, "affine": Affine}
    if cfg.transform in linear:
        kind = linear[cfg.transform]
        factory = lambda g, n: kind(d, n)  # noqa: E731
    elif cfg.transform == "bspline":
        factory = lambda g, n: BSplineTransform(g, spacing, n)  # noqa: E731
        on_level = _refine_after_first
    else:
        factory = lambda g, n: BSplineVelocityField(g, spacing, n, steps=cfg.steps, domain=g)  # noqa: E731
        on_level = _velocity_on_level
    return Stage(
        factory,
        [(t.weight, LOSSES[t.name](**t.options())) for t in cfg.losses],
        [(t.weight, REGULARISERS[t.name](**t.options())) for t in cfg.regularisers],
        levels=levels, optimizer=cfg.optimizer, lr=cfg.lr, decay=cfg.decay, tolerance=cfg.tolerance,
        patience=cfg.patience, on_level=on_level, regulariser_shrink=cfg.regulariser_shrink,
        symmetric=cfg.symmetric, name=cfg.name or f"{cfg.transform} {index + 1}",
    )


def _where(loc) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def load_config(path: str | Path) -> PipelineConfig:
    """Read and validate a YAML pipeline; :class:`ConfigError` names the first problem."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"config {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of keys to values, not {type(raw).__name__}")
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        more = f" (and {len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
        raise ConfigError(f"config {path}: {_where(err['loc'])}: {msg}{more}") from None
