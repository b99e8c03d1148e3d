"""Names a package imports on first use (PEP 562), so that importing it stays cheap."""

from __future__ import annotations

import importlib
import importlib.util
import sys


def lazy_names(package: str, names: dict[str, str], public: list[str], *, submodules: bool = False):
    """``(__getattr__, __dir__)`` for ``package``: each of ``names`` (name -> submodule that defines
    it) is imported when first asked for, then kept in the package; with ``submodules``, any other
    public name that is a submodule (``airlab.evaluate``) is imported the same way."""
    module = sys.modules[package]

    def __getattr__(name: str):
        if name in names:
            value = getattr(importlib.import_module(f".{names[name]}", package), name)
        elif submodules and not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
            value = importlib.import_module(f".{name}", package)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(module, name, value)  # once: later look-ups do not come here
        return value

    def __dir__():
        return sorted(set(vars(module)) | set(public))

    return __getattr__, __dir__
