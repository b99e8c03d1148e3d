"""airlab: image registration in physical space on PyTorch.

``import airlab`` loads nothing heavy: the public names below (and every submodule, as
``airlab.evaluate`` etc.) are imported on first use (PEP 562), so that ``airlab --help`` or a
Dask scheduler process does not pay for torch, SimpleITK, pydantic or matplotlib.
"""

from __future__ import annotations

from ._lazy import lazy_names

from .errors import AirlabError, ConfigError, ImageIOError, InputError, RegistrationError, TransformIOError

__version__ = "0.1.0"

__all__ = ["Grid", "Image", "read_image", "write_image", "resample", "sample", "register", "transforms",
           "AirlabError", "InputError", "RegistrationError", "ConfigError", "ImageIOError", "TransformIOError",
           "__version__"]

# public name -> the submodule that defines it; imported when first asked for
_LAZY = {"register": "api", "Image": "image", "read_image": "image", "write_image": "image", "resample": "image",
         "Grid": "grid", "sample": "spatial"}


__getattr__, __dir__ = lazy_names(__name__, _LAZY, __all__, submodules=True)
