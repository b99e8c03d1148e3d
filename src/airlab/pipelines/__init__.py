"""Pipelines as data: the schema, the presets shipped as YAML, and loading a file.

The names are imported on first use (PEP 562): ``airlab.pipelines.names`` (the preset and
metric names the command line offers) is importable without pydantic, YAML or the engine."""

from __future__ import annotations

from .._lazy import lazy_names

from .names import METRICS, PRESETS

__all__ = ["PipelineConfig", "StageConfig", "TermConfig", "LevelConfig", "ConfigError", "load_config", "validate",
           "preset", "preset_pipeline", "default_metric", "metric_term", "pyramid", "PRESETS", "METRICS"]

_LAZY = {"preset": "presets",
         **dict.fromkeys(["ConfigError", "LevelConfig", "PipelineConfig", "StageConfig", "TermConfig", "load_config",
                          "pyramid", "validate", "default_metric", "metric_term", "preset_pipeline"], "schema")}


__getattr__, __dir__ = lazy_names(__name__, _LAZY, __all__)
