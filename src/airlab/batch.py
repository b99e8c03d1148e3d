"""``airlab.batch.run``: many pairs on one device or a Dask cluster (see ``airlab batch``).

Kept out of ``import airlab``; Dask is imported only when a run uses it."""

from .workflows.batch import Settings, Summary, run, run_pairs
from .workflows.manifest import Pair, glob_pairs, read_manifest

__all__ = ["run", "run_pairs", "Settings", "Summary", "Pair", "read_manifest", "glob_pairs"]
