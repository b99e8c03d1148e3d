"""airlab: image registration in physical space on PyTorch.

``import airlab`` loads nothing heavy: the public names below (and every submodule, as
``airlab.evaluate`` etc.) are imported on first use (PEP 562), so that ``airlab --help`` or a
Dask scheduler process does not pay for torch, SimpleITK, pydantic or matplotlib.
"""

from __future__ import annotations

import importlib
import importlib.util

from .errors import AirlabError, ConfigError, ImageIOError, InputError, RegistrationError, TransformIOError

__version__ = "0.1.0"

__all__ = ["Grid", "Image", "read_image", "write_image", "resample", "sample", "register", "transforms",
           "AirlabError", "InputError", "RegistrationError", "ConfigError", "ImageIOError", "TransformIOError",
           "__version__"]

# public name -> the submodule that defines it; imported when first asked for
_LAZY = {"register": "api", "Image": "image", "read_image": "image", "write_image": "image", "resample": "image",
         "Grid": "spatial", "sample": "spatial"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)  # a submodule: airlab.transforms, airlab.evaluate, ...
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # once: later look-ups do not come here
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
