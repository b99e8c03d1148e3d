"""Ready-made pipelines that work without tuning: ``rigid``, ``affine``, ``bspline``,
``diffeomorphic`` (the default: a dense velocity), ``smooth`` (a B-spline velocity) and
``intersubject`` (a dense velocity sampled linearly, faster), shipped as YAML beside this module (the same schema
as ``--config``).

Pyramids are sized from the fixed image (the coarsest level has about 25-50 voxels along its
longest axis; smoothing sigma is half the level spacing), so the same preset serves a 2D
slice, a 2 mm and a 1 mm brain. Intensities are normalised by the engine, so the regulariser
weights mean the same on every image.
"""

from __future__ import annotations

from ..registration import Stage
from ..spatial import Grid
# reading and expanding the shipped presets is schema.py's (PipelineConfig.resolve needs it);
# re-exported here, where the presets' names have always been importable
from .schema import METRICS, PRESETS, default_metric, metric_term, preset_pipeline  # noqa: F401

__all__ = ["PRESETS", "METRICS", "preset", "preset_pipeline", "metric_term", "default_metric"]


def preset(name: str, fixed_grid: Grid, *, metric: str | None = None) -> list[Stage]:
    """The engine's stages of preset ``name`` for images on ``fixed_grid``."""
    return preset_pipeline(name, metric=metric).build(fixed_grid)
