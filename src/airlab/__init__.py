"""airlab: image registration in physical space on PyTorch."""

from .image import Image, ImageIOError, read_image, resample, write_image
from .spatial import Grid, sample
from . import transforms

__version__ = "0.1.0"

__all__ = ["Grid", "Image", "ImageIOError", "read_image", "write_image", "resample", "sample", "transforms", "__version__"]
