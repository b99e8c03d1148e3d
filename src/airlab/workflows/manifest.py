"""The pairs of a batch: a CSV manifest, or one fixed image and a glob of moving ones.

Everything is checked before any pair starts: a missing column, an empty or duplicate id, an id
that is not a plain folder name, a path that does not exist. Each problem is one
:class:`~airlab.errors.ManifestError` naming the row (the header is row 1).
"""

from __future__ import annotations

import csv
import glob
from dataclasses import dataclass
from pathlib import Path

from ..errors import ManifestError

__all__ = ["Pair", "COLUMNS", "OPTIONAL", "read_manifest", "glob_pairs", "check_pairs"]

COLUMNS = ("id", "fixed", "moving")
OPTIONAL = ("fixed_mask", "moving_mask", "fixed_labels", "moving_labels")
# names the batch writes beside the pair folders; a pair may not take them
RESERVED = {"results.csv", "index.html"}


@dataclass(frozen=True)
class Pair:
    """One registration of a batch; paths are absolute."""

    id: str
    fixed: Path
    moving: Path
    fixed_mask: Path | None = None
    moving_mask: Path | None = None
    fixed_labels: Path | None = None
    moving_labels: Path | None = None

    @property
    def labelled(self) -> bool:
        return self.fixed_labels is not None and self.moving_labels is not None


def _check_id(value: str, where: str) -> str:
    value = value.strip()
    if not value:
        raise ManifestError(f"{where}: the id is empty")
    # the id is a folder name under OUTROOT: nothing that could leave it or hide in it
    if value in (".", "..") or value.startswith(".") or any(c in value for c in "/\\\0") or value in RESERVED:
        raise ManifestError(f"{where}: id {value!r} is not a plain folder name (no '/', '\\', leading '.', "
                            f"or {', '.join(sorted(RESERVED))})")
    return value


def _check_unique(pairs: list[Pair], rows: list[str]) -> None:
    seen: dict[str, str] = {}
    for pair, where in zip(pairs, rows):
        if pair.id in seen:
            raise ManifestError(f"{where}: duplicate id {pair.id!r} (also {seen[pair.id]})")
        seen[pair.id] = where


def read_manifest(path, *, fixed_mask=None, moving_mask=None) -> list[Pair]:
    """The pairs of a CSV manifest: columns ``id,fixed,moving`` and optionally ``fixed_mask,
    moving_mask,fixed_labels,moving_labels`` (empty cells: none). Relative paths are relative
    to the manifest's folder, so a manifest and its images move together. ``fixed_mask`` and
    ``moving_mask`` apply to rows that name none."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM from spreadsheet programs is not a column name
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"manifest {path}: cannot read it ({exc})") from None
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise ManifestError(f"manifest {path}, row 1: missing column(s) {', '.join(missing)} "
                            f"(expected id,fixed,moving[,{','.join(OPTIONAL)}])")
    unknown = [h for h in header if h not in COLUMNS + OPTIONAL]
    if unknown:
        raise ManifestError(f"manifest {path}, row 1: unknown column(s) {', '.join(unknown)} "
                            f"(known: {','.join(COLUMNS + OPTIONAL)})")
    reader.fieldnames = header
    base = path.resolve().parent
    pairs, rows = [], []
    for n, row in enumerate(reader, start=2):
        where = f"manifest {path}, row {n}"
        if None in row:
            raise ManifestError(f"{where}: more cells than columns")
        cells = {k: (v or "").strip() for k, v in row.items()}
        if not any(cells.values()):
            continue  # a blank line
        files = {}
        for column in COLUMNS[1:] + OPTIONAL:
            value = cells.get(column, "")
            if not value:
                if column in COLUMNS:
                    raise ManifestError(f"{where}: no {column} image")
                continue
            file = Path(value).expanduser()
            file = file if file.is_absolute() else base / file
            if not file.exists():
                raise ManifestError(f"{where}: {column} {value} does not exist")
            files[column] = file
        files.setdefault("fixed_mask", Path(fixed_mask).resolve() if fixed_mask else None)
        files.setdefault("moving_mask", Path(moving_mask).resolve() if moving_mask else None)
        if ("fixed_labels" in files) != ("moving_labels" in files):
            raise ManifestError(f"{where}: fixed_labels and moving_labels go together")
        pairs.append(Pair(_check_id(cells["id"], where), **files))
        rows.append(where)
    if not pairs:
        raise ManifestError(f"manifest {path}: no pairs")
    _check_unique(pairs, rows)
    return pairs


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".tif", ".tiff", ".png", ".dcm"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def glob_pairs(fixed, moving_glob: str, *, fixed_mask=None, moving_mask=None) -> list[Pair]:
    """One fixed image and every file matching ``moving_glob`` (``**`` recurses); each pair's id
    is the moving file's name without its extension."""
    fixed = Path(fixed)
    if not fixed.exists():
        raise ManifestError(f"--fixed {fixed} does not exist")
    files = sorted(Path(p).resolve() for p in glob.glob(str(Path(moving_glob).expanduser()), recursive=True))
    files = [f for f in files if f != fixed.resolve()]
    if not files:
        raise ManifestError(f"--moving {moving_glob!r} matches no file")
    wheres = [f"--moving {f}" for f in files]
    pairs = [Pair(_check_id(_stem(f), w), fixed.resolve(), f,
                  Path(fixed_mask).resolve() if fixed_mask else None,
                  Path(moving_mask).resolve() if moving_mask else None) for f, w in zip(files, wheres)]
    _check_unique(pairs, wheres)
    return pairs


def check_pairs(pairs: list[Pair]) -> None:
    """The checks of a manifest for pairs made in Python: at least one, ids plain and unique,
    the files there."""
    if not pairs:
        raise ManifestError("no pairs to register")
    wheres = [f"pair {n + 1} ({p.id!r})" for n, p in enumerate(pairs)]
    for pair, where in zip(pairs, wheres):
        if not isinstance(pair, Pair):
            raise ManifestError(f"{where}: expected an airlab.batch.Pair, not {type(pair).__name__}")
        _check_id(pair.id, where)
        for name in ("fixed", "moving") + OPTIONAL:
            value = getattr(pair, name)
            if value is not None and not Path(value).exists():
                raise ManifestError(f"{where}: {name} {value} does not exist")
    _check_unique(pairs, wheres)
