"""airlab: image registration in physical space on PyTorch."""

from .api import register
from .errors import AirlabError, ConfigError, ImageIOError, InputError, RegistrationError, TransformIOError
from .image import Image, read_image, resample, write_image
from .spatial import Grid, sample
from . import transforms

__version__ = "0.1.0"

__all__ = ["Grid", "Image", "read_image", "write_image", "resample", "sample", "register", "transforms",
           "AirlabError", "InputError", "RegistrationError", "ConfigError", "ImageIOError", "TransformIOError",
           "__version__"]
