"""Applications of the engine: files in, outputs written. The command line and every batch or
Dask worker call these, nothing else.

The names are imported on first use (PEP 562), so that ``airlab.workflows.staging`` (which the
command line needs for every command) does not bring in the engine."""

from __future__ import annotations

import importlib

__all__ = ["OUTPUTS", "Outputs", "as_image", "register_pair", "register_files", "write_outputs", "staged_output"]

_LAZY = {**dict.fromkeys(["OUTPUTS", "Outputs", "as_image", "register_files", "register_pair", "write_outputs"],
                         "pairwise"),
         "staged_output": "staging"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # once: later look-ups do not come here
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
