"""Outputs that appear whole or not at all, and never over the user's files."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputExistsError

__all__ = ["staged_output"]


@contextmanager
def staged_output(outdir: Path, names: list[str], overwrite: bool):
    """Write into a temporary folder beside ``outdir`` and move the files into place only when
    everything succeeded; never touch a file of the user's unless ``overwrite`` and it is one of
    ``names``."""
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise OutputExistsError(f"output {outdir} exists and is not a folder")
    clashes = [n for n in names if (outdir / n).exists()]
    if clashes and not overwrite:
        raise OutputExistsError(f"{outdir} already holds {', '.join(clashes)}; pass --overwrite to replace them")
    parent = outdir.parent if outdir.parent.exists() else Path(tempfile.gettempdir())
    stage = Path(tempfile.mkdtemp(prefix=".airlab-", dir=parent))
    try:
        yield stage
        outdir.mkdir(parents=True, exist_ok=True)
        # metrics.json moves last: a folder that holds it is complete (a batch rerun skips it)
        for name in sorted(names, key=lambda n: n == "metrics.json"):
            if (stage / name).exists():
                shutil.move(str(stage / name), str(outdir / name))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
