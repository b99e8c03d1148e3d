"""Ready-made pipelines that work without tuning: ``rigid``, ``affine``, ``bspline``,
``diffeomorphic``, shipped as YAML beside this module (the same schema as ``--config``).

Pyramids are sized from the fixed image (the coarsest level has about 25-50 voxels along its
longest axis; smoothing sigma is half the level spacing), so the same preset serves a 2D
slice, a 2 mm and a 1 mm brain. Intensities are normalised by the engine, so the regulariser
weights mean the same on every image.
"""

from __future__ import annotations

import functools
from importlib import resources

from ..registration import Stage
from ..spatial import Grid
from .schema import LINEAR, METRICS, PRESETS, PipelineConfig, TermConfig, validate

__all__ = ["PRESETS", "METRICS", "preset", "preset_pipeline", "metric_term", "default_metric"]


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
        stages.append(stage.model_copy(update={"losses": [linear if stage.transform in LINEAR else term]}))
    return pipeline.model_copy(update={"stages": stages})


def preset(name: str, fixed_grid: Grid, *, metric: str | None = None) -> list[Stage]:
    """The engine's stages of preset ``name`` for images on ``fixed_grid``."""
    return preset_pipeline(name, metric=metric).build(fixed_grid)
