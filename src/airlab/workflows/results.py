"""What a batch reports: one row per pair, measured from the files the pair wrote, in
``OUTROOT/results.csv``, and an overview page ``OUTROOT/index.html``.

Both are rewritten whole (a temporary file renamed over the old one) after every pair, so an
interrupted batch leaves a table of what finished. A file of that name which airlab did not
write is never replaced.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
import tempfile
from pathlib import Path
from urllib.parse import quote

from ..errors import OutputExistsError
from .manifest import Pair

__all__ = ["COLUMNS", "measure", "failed_row", "check_outroot", "write_results", "write_index"]

COLUMNS = ["id", "status", "error", "resumed", "wall_time_s", "registration_time_s", "device", "final_objective",
           "dice_mean", "hd95_mm_mean", "sdlogj", "folding_percent", "batch_size", "folder"]
GENERATOR = '<meta name="generator" content="airlab batch">'


def _number(value, digits=6):
    if value is None:
        return ""
    value = float(value)
    return repr(value) if math.isinf(value) or math.isnan(value) else f"{value:.{digits}g}"


def measure(pair: Pair, folder: Path) -> dict:
    """The row of a finished pair, from its folder: times, device, final objective, SDlogJ and
    folding from metrics.json (SDlogJ and folding from displacement.nii.gz in folders written
    before metrics.json held them); Dice and HD95 (means over labels)
    of the moving labels carried onto the fixed grid (nearest neighbour, as ``airlab
    evaluate``) against the fixed labels, when the manifest gives labels."""
    import torch

    from ..evaluate import dice, hd95, jacobian_stats
    from ..image import read_image, resample
    from ..transforms import read_displacement_field

    metrics = json.loads((folder / "metrics.json").read_text())
    objectives = [s["final_objective"] for s in metrics.get("stages", []) if s.get("final_objective") is not None]
    row = {"id": pair.id, "status": "done", "error": "", "device": metrics.get("device", ""),
           "wall_time_s": _number(metrics.get("wall_time_s")),
           "registration_time_s": _number(metrics.get("registration_time_s")),
           "final_objective": _number(objectives[-1] if objectives else None),
           "batch_size": metrics.get("batch", {}).get("size", 1), "folder": pair.id}
    jac = metrics.get("jacobian")  # written with the pair since 2026-12-05; older folders: from the field
    if jac is None:
        field = read_displacement_field(folder / "displacement.nii.gz", dtype=torch.float64)
        jac = jacobian_stats(field.field.detach()[0].numpy(), field.grid)
    row["sdlogj"] = _number(jac["log_jacobian_std"])
    row["folding_percent"] = _number(100.0 * jac["folding_fraction"])
    if pair.labelled:
        field = read_displacement_field(folder / "displacement.nii.gz", dtype=torch.float64)
        fixed, moving = read_image(pair.fixed_labels), read_image(pair.moving_labels)
        with torch.no_grad():
            warped = resample(moving, field.grid, field, interpolation="nearest")
        if not fixed.grid.same_as(field.grid, atol=1e-4):
            fixed = resample(fixed, field.grid, interpolation="nearest")
        a, b = warped.data[0, 0].numpy(), fixed.data[0, 0].numpy()
        row["dice_mean"] = _number(dice(a, b)["mean"])
        row["hd95_mm_mean"] = _number(hd95(a, b, field.grid)["mean"])
    return row


def failed_row(pair: Pair, error: str) -> dict:
    return {"id": pair.id, "status": "failed", "error": error, "folder": pair.id}


def check_outroot(outroot: Path) -> None:
    """Refuse an OUTROOT whose results.csv or index.html airlab did not write (exit 2)."""
    table, page = outroot / "results.csv", outroot / "index.html"
    if table.exists():
        with open(table, newline="", encoding="utf-8", errors="replace") as f:
            header = next(csv.reader(f), [])
        if header != COLUMNS:
            raise OutputExistsError(f"{table} was not written by airlab batch (its columns differ); "
                                    "choose another output folder")
    if page.exists() and GENERATOR not in page.read_text(encoding="utf-8", errors="replace")[:2000]:
        raise OutputExistsError(f"{page} was not written by airlab batch; choose another output folder")


def _replace(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".airlab-", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def write_results(outroot: Path, rows: list[dict]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})
    _replace(outroot / "results.csv", buffer.getvalue())
    return outroot / "results.csv"


_SORT = """
<script>
// click a column header to sort by it (numbers as numbers; again to reverse)
document.querySelectorAll('th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0], rows = Array.from(body.rows);
    var up = th.dataset.order !== 'up';
    th.dataset.order = up ? 'up' : 'down';
    var key = function (r) { var t = r.cells[col].dataset.v; var x = parseFloat(t); return isNaN(x) ? t : x; };
    rows.sort(function (a, b) {
      var x = key(a), y = key(b), bad = function (v) { return v === ''; };
      if (bad(x) !== bad(y)) return bad(x) ? 1 : -1;  // empty cells last either way
      var c = (typeof x === typeof y) ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === 'number' ? -1 : 1);
      return up ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
</script>
"""

_SHOWN = ["status", "error", "wall_time_s", "final_objective", "dice_mean", "hd95_mm_mean", "sdlogj",
          "folding_percent", "device", "batch_size"]


def write_index(outroot: Path, rows: list[dict]) -> Path:
    """A self-contained page: each pair's thumbnail (its report.png) linking to its
    report.html, and its measures; click a column to sort by it."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["pair", "report"] + _SHOWN)
    lines = []
    for row in rows:
        pid, url = html.escape(str(row["id"])), html.escape(quote(str(row["id"])))
        folder = outroot / str(row["id"])
        link = f'{url}/report.html'
        thumb = (f'<a href="{link}"><img src="{url}/report.png" alt="report of {pid}" loading="lazy"></a>'
                 if (folder / "report.png").exists() else "")
        name = f'<a href="{link}">{pid}</a>' if (folder / "report.html").exists() else pid
        cells = [f'<td data-v="{pid}">{name}</td>', f'<td data-v="">{thumb}</td>']
        for c in _SHOWN:
            v = html.escape(str(row.get(c, "") if row.get(c) is not None else ""))
            cells.append(f'<td data-v="{v}">{v}</td>')
        lines.append(f'<tr class="{html.escape(str(row.get("status", "")))}">{"".join(cells)}</tr>')
    done = sum(r.get("status") == "done" for r in rows)
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8">{GENERATOR}<title>airlab batch: {done}/{len(rows)} pairs</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }} table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 2px 6px; text-align: left; vertical-align: middle; }}
th {{ cursor: pointer; background: #eee; position: sticky; top: 0; }} img {{ height: 90px; }}
tr.failed {{ background: #fdd; }}
</style></head><body>
<h1>airlab batch</h1>
<p>{done} of {len(rows)} pairs done. Click a pair for its QC report; click a column to sort by it.
The same numbers are in <a href="results.csv">results.csv</a>.</p>
<table><thead><tr>{head}</tr></thead><tbody>
{chr(10).join(lines)}
</tbody></table>{_SORT}</body></html>
"""
    _replace(outroot / "index.html", page)
    return outroot / "index.html"
