"""Example data shipped inside the package (see ``data/NOTICE`` for its origin and licence)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .image import Image, read_image

__all__ = ["example_path", "mni152"]

EXAMPLES = {
    "mni152_t1_2mm": "mni152_t1_2mm.nii.gz",
    "mni152_tissue_2mm": "mni152_tissue_2mm.nii.gz",
    "mni152_t1_1mm_axial": "mni152_t1_1mm_axial.nii.gz",
}


def example_path(name: str) -> Path:
    """Path of a shipped example file, by name (``mni152_t1_2mm``, ``mni152_tissue_2mm``,
    ``mni152_t1_1mm_axial``)."""
    if name not in EXAMPLES:
        raise KeyError(f"no example named {name!r}; choose from {sorted(EXAMPLES)}")
    return Path(str(resources.files("airlab").joinpath("data", EXAMPLES[name])))


def mni152() -> tuple[Image, Image]:
    """The 2 mm MNI152 T1 template and its tissue labels (1 grey matter, 2 white matter)."""
    return read_image(example_path("mni152_t1_2mm")), read_image(example_path("mni152_tissue_2mm"))
