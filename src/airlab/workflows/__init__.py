"""Applications of the engine: files in, outputs written. The command line and every batch or
Dask worker call these, nothing else.

The names are imported on first use (PEP 562), so that ``airlab.workflows.staging`` (which the
command line needs for every command) does not bring in the engine."""

from __future__ import annotations

from .._lazy import lazy_names

__all__ = ["OUTPUTS", "Outputs", "as_image", "register_pair", "register_files", "write_outputs", "staged_output"]

_LAZY = {**dict.fromkeys(["OUTPUTS", "Outputs", "as_image", "register_files", "register_pair", "write_outputs"],
                         "pairwise"),
         "staged_output": "staging"}


__getattr__, __dir__ = lazy_names(__name__, _LAZY, __all__)
