"""Applications of the engine: files in, outputs written. The command line and every batch or
Dask worker call these, nothing else."""

from .pairwise import OUTPUTS, Outputs, as_image, register_files, register_pair, write_outputs
from .staging import staged_output

__all__ = ["OUTPUTS", "Outputs", "as_image", "register_pair", "register_files", "write_outputs", "staged_output"]
