"""Pipelines as data: the schema, the presets shipped as YAML, and loading a file."""

from .presets import METRICS, PRESETS, default_metric, metric_term, preset, preset_pipeline
from .schema import ConfigError, LevelConfig, PipelineConfig, StageConfig, TermConfig, load_config, pyramid, validate

__all__ = ["PipelineConfig", "StageConfig", "TermConfig", "LevelConfig", "ConfigError", "load_config", "validate",
           "preset", "preset_pipeline", "default_metric", "metric_term", "pyramid", "PRESETS", "METRICS"]
