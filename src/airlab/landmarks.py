"""Landmark files: read and write the point lists users have, as ``[P, D]`` physical points
(mm, ITK/LPS components, airlab's convention).

Formats, chosen by the file name (and, for ``.txt``, by the first word):

- CSV (``.csv``, other ``.txt``): rows ``x,y[,z]``; an optional header row and an optional
  first column of labels (text).
- 3D Slicer fiducials (``.fcsv``): its ``# CoordinateSystem`` header says LPS or RAS (``0`` is
  RAS, ``1`` LPS); files without it are RAS, as old Slicer wrote them.
- 3D Slicer markups (``.mrk.json``, ``.json``): ``coordinateSystem`` per markup, LPS when absent
  (the schema's default).
- elastix/transformix (``.pts``, ``.txt`` starting with ``point`` or ``index``): ``point`` rows
  are mm; ``index`` rows are voxel indices, converted with the image grid they refer to. A
  ``.pts`` without that header is AirLab's: whitespace-separated rows in mm.
- VTK legacy polydata (``.vtk``): the ``POINTS`` section, taken as LPS (ITK writes them so).

RAS and LPS differ by the sign of x and y. Slicer and VTK files are 3D; for a 2D image their
points must have z = 0, which is dropped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .errors import InputError

__all__ = ["read_points", "write_points", "FORMATS", "landmark_loss", "landmark_pairs", "LANDMARK_WEIGHT"]

FORMATS = ("csv", "fcsv", "json", "pts", "vtk")
_RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])
# per mm^2: 10 mm off costs about as much as the image similarities' range (about 1); at the
# optimum a few tenths of a mm then weigh little against the images
LANDMARK_WEIGHT = 0.01


def _format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".fcsv"):
        return "fcsv"
    if name.endswith(".json"):
        return "json"
    if name.endswith(".vtk"):
        return "vtk"
    if name.endswith(".pts"):
        return "pts"
    return "csv"


def _finite(points: np.ndarray, path, ndim: int | None) -> np.ndarray:
    """Check the points' shape and values; a 3D Slicer/VTK list for a 2D image loses its z = 0."""
    if points.ndim != 2 or points.shape[0] == 0:
        raise InputError(f"landmarks {path}: no points")
    if not np.isfinite(points).all():
        raise InputError(f"landmarks {path}: a coordinate is nan or infinite")
    if ndim is not None and points.shape[1] != ndim:
        if ndim == 2 and points.shape[1] == 3 and np.all(points[:, 2] == 0):
            points = points[:, :2]
        else:
            raise InputError(f"landmarks {path}: {points.shape[1]}D points for a {ndim}D image")
    if points.shape[1] not in (2, 3):
        raise InputError(f"landmarks {path}: {points.shape[1]} coordinates per point; expected 2 or 3")
    return points


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _read_csv(path: Path, text: str) -> np.ndarray:
    rows = [[c.strip() for c in re.split(r"[,;\t]", ln)] for ln in text.splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]
    if rows and all(_number(c) is None for c in rows[0]):
        rows = rows[1:]  # a header: column names
    # a first column of text in every row holds labels
    if rows and all(_number(r[0]) is None for r in rows):
        rows = [r[1:] for r in rows]
    if not rows:
        return np.zeros((0, 0))
    widths = {len(r) for r in rows}
    if len(widths) > 1:
        raise InputError(f"landmarks {path}: rows have different numbers of columns ({sorted(widths)})")
    values = [[_number(c) for c in r] for r in rows]
    for i, r in enumerate(values):
        if None in r:
            raise InputError(f"landmarks {path}: row {i + 1} holds {rows[i][r.index(None)]!r}, not a number")
    return np.array(values, dtype=float).reshape(len(values), -1)


def _read_fcsv(path: Path, text: str) -> np.ndarray:
    system, columns, rows = "RAS", None, []
    for ln in text.splitlines():
        if ln.startswith("#"):
            key, _, value = ln[1:].partition("=")
            key, value = key.strip().lower(), value.strip()
            if key == "coordinatesystem":
                system = {"0": "RAS", "1": "LPS"}.get(value, value.upper())
            elif key == "columns":
                columns = [c.strip() for c in value.split(",")]
        elif ln.strip():
            rows.append(ln.split(","))
    if system not in ("RAS", "LPS"):
        raise InputError(f"landmarks {path}: coordinate system {system!r}; expected LPS or RAS")
    at = [columns.index(k) for k in "xyz"] if columns and set("xyz") <= set(columns) else [1, 2, 3]
    try:
        points = np.array([[float(r[i]) for i in at] for r in rows], dtype=float).reshape(len(rows), 3)
    except (ValueError, IndexError):
        raise InputError(f"landmarks {path}: a row lacks numeric x, y, z columns") from None
    return points * _RAS_TO_LPS if system == "RAS" else points


def _read_json(path: Path, text: str) -> np.ndarray:
    try:
        markups = json.loads(text)["markups"]
        points = []
        for m in markups:
            system = str(m.get("coordinateSystem", "LPS")).upper()
            if system not in ("RAS", "LPS"):
                raise InputError(f"landmarks {path}: coordinate system {system!r}; expected LPS or RAS")
            p = np.array([c["position"] for c in m.get("controlPoints", [])], dtype=float).reshape(-1, 3)
            points.append(p * _RAS_TO_LPS if system == "RAS" else p)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"landmarks {path}: not a Slicer markups file ({type(exc).__name__}: {exc})") from None
    return np.concatenate(points) if points else np.zeros((0, 3))


def _read_pts(path: Path, text: str, grid) -> np.ndarray:
    words = text.split()
    kind = words[0].lower() if words else ""
    if words and _number(words[0]) is not None:  # AirLab's (and DIR-Lab's) .pts: rows, no header
        return _read_csv(path, "\n".join(",".join(ln.split()) for ln in text.splitlines() if ln.strip()))
    if kind not in ("point", "index") or len(words) < 2 or _number(words[1]) is None:
        raise InputError(f"landmarks {path}: an elastix point file starts with 'point' or 'index' and the count")
    count = int(float(words[1]))
    lines = [ln.split() for ln in text.splitlines()[2:] if ln.strip()]
    if len(lines) != count:
        raise InputError(f"landmarks {path}: the header says {count} points, the file holds {len(lines)}")
    values = _read_csv(path, "\n".join(",".join(ln) for ln in lines))
    if kind == "index":
        if grid is None:
            raise InputError(f"landmarks {path}: voxel indices need the image they refer to")
        import torch

        if values.shape[1] != grid.ndim:
            raise InputError(f"landmarks {path}: {values.shape[1]}D indices for a {grid.ndim}D image")
        values = grid.index_to_physical(torch.as_tensor(values, dtype=torch.float64)).numpy()
    return values


def _read_vtk(path: Path, text: str) -> np.ndarray:
    match = re.search(r"^\s*POINTS\s+(\d+)\s+\w+", text, re.MULTILINE | re.IGNORECASE)
    if match is None or "ASCII" not in text.upper().split("POINTS")[0]:
        raise InputError(f"landmarks {path}: not an ASCII VTK legacy file with a POINTS section")
    count = int(match.group(1))
    tokens = text[match.end():].split()[: 3 * count]
    values = [_number(t) for t in tokens]
    if len(values) < 3 * count or None in values:
        raise InputError(f"landmarks {path}: POINTS says {count} points; the numbers that follow do not")
    return np.array(values, dtype=float).reshape(count, 3)


def read_points(path, *, ndim: int | None = None, grid=None) -> np.ndarray:
    """Landmarks of ``path`` as float64 ``[P, D]`` physical points (mm, LPS).

    ``ndim`` (or ``grid``'s) is the dimension the caller needs; ``grid`` converts elastix index
    files. Raises :class:`~airlab.errors.InputError` naming the file and the problem.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read landmarks {path}: {getattr(exc, 'strerror', None) or exc}") from None
    fmt = _format(path)
    if fmt == "csv" and text.split()[:1] and text.split()[0].lower() in ("point", "index"):
        fmt = "pts"  # elastix writes .txt too
    if fmt == "csv":
        points = _read_csv(path, text)
    elif fmt == "fcsv":
        points = _read_fcsv(path, text)
    elif fmt == "json":
        points = _read_json(path, text)
    elif fmt == "pts":
        points = _read_pts(path, text, grid)
    else:
        points = _read_vtk(path, text)
    return _finite(points, path, ndim if ndim is not None else (grid.ndim if grid is not None else None))


def _as_3d(points: np.ndarray) -> np.ndarray:
    return np.pad(points, ((0, 0), (0, 3 - points.shape[1])))


def write_points(path, points, *, labels=None) -> Path:
    """Write ``[P, D]`` physical points (mm, LPS) in the format the name says; Slicer files are
    written in LPS with that stated, so Slicer reads them as they are."""
    path = Path(path)
    points = np.asarray(points, dtype=float)
    points = _finite(points, path, None)
    labels = [f"F-{i + 1}" for i in range(len(points))] if labels is None else [str(v) for v in labels]
    if len(labels) != len(points):
        raise InputError(f"landmarks {path}: {len(labels)} labels for {len(points)} points")
    fmt = _format(path)
    if fmt == "fcsv":
        head = ("# Markups fiducial file version = 4.11\n# CoordinateSystem = LPS\n"
                "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n")
        body = "".join(f"{i + 1},{float(p[0])!r},{float(p[1])!r},{float(p[2])!r},0,0,0,1,1,1,0,{lab},,\n"
                       for i, (p, lab) in enumerate(zip(_as_3d(points), labels)))
        text = head + body
    elif fmt == "json":
        control = [{"id": str(i + 1), "label": lab, "position": [float(v) for v in p], "positionStatus": "defined"}
                   for i, (p, lab) in enumerate(zip(_as_3d(points), labels))]
        text = json.dumps({"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/"
                                      "Markups/Resources/Schema/markups-schema-v1.0.3.json#",
                           "markups": [{"type": "Fiducial", "coordinateSystem": "LPS", "coordinateUnits": "mm",
                                        "controlPoints": control}]}, indent=2)
    elif fmt == "pts":
        text = f"point\n{len(points)}\n" + "".join(" ".join(repr(float(v)) for v in p) + "\n" for p in points)
    elif fmt == "vtk":
        p3 = _as_3d(points)
        text = ("# vtk DataFile Version 3.0\nairlab landmarks (LPS, mm)\nASCII\nDATASET POLYDATA\n"
                f"POINTS {len(p3)} double\n" + "".join(" ".join(repr(float(v)) for v in p) + "\n" for p in p3)
                + f"VERTICES {len(p3)} {2 * len(p3)}\n" + "".join(f"1 {i}\n" for i in range(len(p3))))
    else:
        header = "label," + ",".join("xyz"[: points.shape[1]])
        text = header + "\n" + "".join(f"{lab}," + ",".join(repr(float(v)) for v in p) + "\n"
                                       for p, lab in zip(points, labels))
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the engine's term
def landmark_loss(mapped, target):
    """Mean squared distance (mm^2) between paired points ``[N, P, D]``: one value per batch
    element. Squared, so that its gradient pulls each point in proportion to how far it is off."""
    return ((mapped - target) ** 2).sum(-1).mean(-1)


def landmark_pairs(fixed_points, moving_points, weight: float, *, ndim: int, batch: int, device, dtype):
    """The engine's ``(fixed [N|1, P, D], moving [N|1, P, D], weight)`` from arrays or tensors,
    or ``None`` when there is no landmark term. Checks pairing, dimension and values."""
    import torch

    if fixed_points is None and moving_points is None:
        return None
    if fixed_points is None or moving_points is None:
        raise InputError("landmarks need both fixed and moving points")
    if not np.isfinite(weight) or weight < 0:
        raise InputError(f"the landmark weight must be a finite number >= 0, got {weight}")
    out = []
    for what, p in (("fixed", fixed_points), ("moving", moving_points)):
        p = torch.as_tensor(np.asarray(p) if not isinstance(p, torch.Tensor) else p).to(device=device, dtype=dtype)
        p = p.unsqueeze(0) if p.dim() == 2 else p
        if p.dim() != 3 or p.shape[-1] != ndim or p.shape[1] == 0 or p.shape[0] not in (1, batch):
            raise InputError(f"{what} points of shape {tuple(p.shape)}: expected [P, {ndim}] or [{batch}, P, {ndim}]")
        if not bool(torch.isfinite(p).all()):
            raise InputError(f"{what} points: a coordinate is nan or infinite")
        out.append(p)
    if out[0].shape[1] != out[1].shape[1]:
        raise InputError(f"{out[0].shape[1]} fixed points but {out[1].shape[1]} moving points; they pair by row")
    return None if weight == 0 else (out[0], out[1], float(weight))
