"""What airlab raises on purpose: one base class, so that callers (the command line, a batch
runner, a Dask worker) can tell an expected failure with a one-line message from a bug.

Each class also derives from the builtin that it specialises (``ValueError`` for bad input,
``RuntimeError`` for I/O), so code written against the builtins keeps working.
``exit_code`` is what the command line exits with: 2 for a wrong invocation (a config that does
not validate, outputs that would be overwritten, a batch manifest with a bad row), 1 for inputs
that cannot be registered and for failures during the work.
"""

from __future__ import annotations

__all__ = ["AirlabError", "InputError", "RegistrationError", "ConfigError", "ImageIOError", "TransformIOError",
           "OutputExistsError", "ManifestError", "GroupError"]


class AirlabError(Exception):
    """Base of every error airlab raises on purpose; the message is one line for users."""

    exit_code = 1


class InputError(AirlabError, ValueError):
    """An input cannot be used as given (implausible geometry, NaNs, an empty mask, ...)."""


class RegistrationError(InputError):
    """The inputs cannot be registered as given; the message says why."""


class ConfigError(AirlabError, ValueError):
    """A pipeline cannot be used; the message names the file, the key and the problem."""

    exit_code = 2


class ImageIOError(AirlabError, RuntimeError):
    """An image could not be read or written; the message names the file and the reason."""


class TransformIOError(AirlabError, RuntimeError):
    """A transform could not be read or written; the message names the file and the reason."""


class OutputExistsError(AirlabError, FileExistsError):
    """The output folder already holds files that this command would replace."""

    exit_code = 2


class ManifestError(AirlabError, ValueError):
    """A batch manifest cannot be used (a missing column, a duplicate id, a path that does not
    exist); the message names the row. Found before any pair starts."""

    exit_code = 2


class GroupError(AirlabError, ValueError):
    """The images of a template cannot be used as a group (fewer than two, unreadable, mixed
    dimensions, two with the same name); found before anything is created or registered."""

    exit_code = 2
