"""Visual QC of a registration: ``report.png`` and a self-contained ``report.html``.

Every panel is a plane of physical space (LPS) sampled at isotropic spacing, so oblique and
anisotropic grids look as they do in a viewer and moving and fixed images are compared where
they actually are, without assuming they share a grid.
"""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path

import numpy as np
import torch

from .evaluate import determinant_stats
from .image import Image
from .regularisers import jacobian_determinant
from .spatial import Grid, sample
from .transforms import Transform

__all__ = ["write_report", "write_template_report"]

# name, horizontal axis, vertical axis, normal axis, vertical coordinate grows downwards
PLANES_3D = [("axial", 0, 1, 2, True), ("coronal", 0, 2, 1, False), ("sagittal", 1, 2, 0, False)]
ENDS = ["RL", "AP", "IS"]  # LPS: the low and high end of each physical axis
FOLD_COLOUR = "#39ff14"  # absent from the diverging colour map, so folds cannot be misread


class _Plane:
    def __init__(self, name, h, v, normal, down, grid: Grid, centre, max_pixels=400):
        corners = np.array(np.meshgrid(*[[0, n - 1] for n in grid.size], indexing="ij")).reshape(grid.ndim, -1)
        phys = grid.index_to_physical_matrix()[: grid.ndim] @ np.vstack([corners, np.ones(corners.shape[1])])
        lo, hi = phys.min(1), phys.max(1)
        step = max(min(grid.spacing), max(hi[h] - lo[h], hi[v] - lo[v]) / max_pixels)
        hs = np.arange(lo[h], hi[h] + 1e-6, step)
        vs = np.arange(lo[v], hi[v] + 1e-6, step) if down else np.arange(hi[v], lo[v] - 1e-6, -step)
        pts = np.broadcast_to(np.asarray(centre, float), (len(vs), len(hs), grid.ndim)).copy()
        pts[..., h], pts[..., v] = hs[None, :], vs[:, None]
        self.h, self.v, self.hs, self.vs = h, v, hs, vs
        self.label = name if normal is None else f"{name}, {'xyz'[normal]} = {centre[normal]:.1f} mm"
        self.points = torch.as_tensor(pts)[None]
        half, dv = step / 2, (step / 2 if down else -step / 2)  # imshow's extent: outer edges of the outer pixels
        self.extent = (hs[0] - half, hs[-1] + half, vs[-1] + dv, vs[0] - dv)

    def sample(self, data: torch.Tensor, grid: Grid, interpolation="linear") -> np.ndarray:
        """``[C, rows, cols]``; NaN outside the image."""
        return sample(data.detach().cpu().float(), grid, self.points, interpolation, float("nan"))[0].numpy()


def _planes(fixed: Image, window) -> list[_Plane]:
    # through the centre of mass of the fixed foreground: the middle of the grid may be empty
    arr = fixed.data[0, 0].detach().cpu().float().numpy()
    mask = arr > window[0] + 0.1 * (window[1] - window[0])
    if mask.any():
        tensor_idx = [np.average(np.arange(n), weights=mask.sum(tuple(b for b in range(mask.ndim) if b != a)))
                      for a, n in enumerate(mask.shape)]
        centre = fixed.grid.index_to_physical_matrix()[: fixed.ndim] @ np.append(tensor_idx[::-1], 1.0)
    else:
        centre = fixed.grid.center()
    if fixed.ndim == 2:
        return [_Plane("x-y plane", 0, 1, None, True, fixed.grid, centre)]
    return [_Plane(*p, fixed.grid, centre) for p in PLANES_3D]


def _window(image: Image) -> tuple[float, float]:
    lo, hi = np.percentile(image.data[0, 0].detach().cpu().float().numpy(), [1, 99])
    return float(lo), float(hi) if hi > lo else float(lo) + 1.0


def _panel(ax, plane: _Plane, array, letters=True, **kw):
    ax.set_facecolor("black")
    im = ax.imshow(array, extent=plane.extent, interpolation="nearest", **kw)
    ax.set_xticks([]), ax.set_yticks([])
    if letters:
        lo_h, hi_h = ENDS[plane.h]
        top, bottom = ENDS[plane.v] if plane.vs[0] < plane.vs[-1] else ENDS[plane.v][::-1]
        for x, y, t in ((0.02, 0.5, lo_h), (0.98, 0.5, hi_h), (0.5, 0.97, top), (0.5, 0.03, bottom)):
            # inside the axes: nothing for the layout to make room for, and measuring every
            # letter was most of constrained layout's work
            ax.text(x, y, t, transform=ax.transAxes, color="w", fontsize=7, ha="center", va="center", alpha=0.8,
                    in_layout=False)
    return im


def _axes(fig, planes, titles):
    axes = fig.subplots(len(planes), len(titles), squeeze=False)
    for ax, title in zip(axes[0], titles):
        ax.set_title(title, fontsize=9)
    for row, plane in zip(axes, planes):
        row[0].set_ylabel(plane.label, fontsize=8)
    return axes


def _draw_images(fig, planes, views):
    own = views[0].get("moving_plane") is not None
    axes = _axes(fig, planes, ["fixed", "moving (before; own planes)" if own else "moving (before)", "warped (after)"])
    for row, v in zip(axes, views):
        for ax, key in zip(row, ("fixed", "moving", "warped")):
            _panel(ax, v["moving_plane"] if key == "moving" and own else v["plane"], v[key], cmap="gray", vmin=0, vmax=1)
        if own:
            row[1].text(0.5, 0.1, "no overlap with fixed:\nshown on its own planes", transform=row[1].transAxes,
                        color="#ffb000", fontsize=7, ha="center")
    fig.suptitle("Images (1st-99th percentile window)", fontsize=11)


def _draw_alignment(fig, planes, views, limit):
    axes = _axes(fig, planes, ["checkerboard fixed / warped", "fixed − moving (before)", "fixed − warped (after)"])
    for row, v in zip(axes, views):
        tile = max(1, max(v["fixed"].shape) // 8)
        rr, cc = np.indices(v["fixed"].shape) // tile
        _panel(row[0], v["plane"], np.where((rr + cc) % 2 == 0, v["fixed"], v["warped"]), cmap="gray", vmin=0, vmax=1)
        for ax, other in zip(row[1:], ("moving", "warped")):
            if other == "moving" and v["moving_plane"] is not None:  # not in the same place: no difference
                _panel(ax, v["plane"], np.full_like(v["fixed"], np.nan))
                ax.text(0.5, 0.5, "no overlap", transform=ax.transAxes, color="w", fontsize=8, ha="center")
                continue
            im = _panel(ax, v["plane"], v["fixed"] - v[other], cmap="RdBu_r", vmin=-limit, vmax=limit)
    fig.colorbar(im, ax=axes[:, 1:].ravel().tolist(), shrink=0.6, label="normalised intensity difference")
    fig.suptitle("Alignment", fontsize=11)


def _outline(ax, plane, mask):
    if mask.any() and not mask.all():
        ax.contour(plane.hs, plane.vs, mask.astype(float), levels=[0.5], colors="#00e5ff", linewidths=0.6)


def _draw_deformation(fig, planes, views, jac, relative):
    from matplotlib.collections import LineCollection
    from matplotlib.colors import ListedColormap, LogNorm

    part = "deformable part" if relative else "whole transform"
    axes = _axes(fig, planes, [f"grid: {part}", f"det J: {part}"])
    dets = np.concatenate([v["det"][np.isfinite(v["det"]) & (v["det"] > 0)] for v in views] + [np.ones(1)])
    span = float(np.clip(np.percentile(np.abs(np.log2(dets)), 99.5), 0.1, 2.0))
    norm = LogNorm(2.0 ** -span, 2.0 ** span)
    for row, v in zip(axes, views):
        p = v["plane"]
        _panel(row[0], p, v["fixed"], cmap="gray", vmin=-0.3, vmax=1.3)
        x, y = p.hs[None, :] + v["disp"][0], p.vs[:, None] + v["disp"][1]
        k = max(2, round(max(x.shape) / 28))
        lines = [np.stack([x[i], y[i]], -1) for i in range(0, x.shape[0], k)]
        lines += [np.stack([x[:, j], y[:, j]], -1) for j in range(0, x.shape[1], k)]
        row[0].add_collection(LineCollection(lines, colors="#ffb000", linewidths=0.6), autolim=False)
        for ax in row:
            _outline(ax, p, v["foreground"])
        folded = v["det"] <= 0
        im = _panel(row[1], p, np.where(folded, np.nan, v["det"]), cmap="RdBu_r", norm=norm)
        if folded.any():
            # a folded voxel is one pixel: dilate it so that it can be seen at all
            from scipy import ndimage  # here only: scipy.ndimage costs 0.1 s to import

            overlay = np.ma.masked_where(~ndimage.binary_dilation(folded), np.ones(folded.shape))
            _panel(row[1], p, overlay, letters=False, cmap=ListedColormap([FOLD_COLOUR]), vmin=0, vmax=1)
            row[1].text(0.03, 0.05, f"{int(folded.sum())} folded here", transform=row[1].transAxes,
                        color=FOLD_COLOUR, fontsize=7)
    ticks = [2.0 ** (span * t) for t in (-1, -0.5, 0, 0.5, 1)]
    bar = fig.colorbar(im, ax=axes[:, 1].tolist(), shrink=0.6, ticks=ticks, extend="both",
                       label="det J (blue: shrinks, red: grows)")
    bar.ax.set_yticklabels([f"{t:.3g}" for t in ticks])
    bar.ax.minorticks_off()
    fig.suptitle(("Deformation relative to the linear part" if relative else "Deformation") +
                 f": folding (det ≤ 0, green) {jac['folding_count']} voxels "
                 f"({100 * jac['folding_fraction']:.3f} %), SD log-J {jac['log_jacobian_std']:.4f}", fontsize=11)


def _draw_objective(fig, history):
    runs = []  # consecutive levels of one stage share an axis; stages differ in scale
    for h in (h for h in history if h.get("objective")):
        if not runs or runs[-1][0]["stage"] != h["stage"]:
            runs.append([])
        runs[-1].append(h)
    axes = fig.subplots(1, max(len(runs), 1), squeeze=False)[0]
    if not runs:
        axes[0].set_axis_off()
    for i, (ax, levels) in enumerate(zip(axes, runs)):
        start = 0
        for h in levels:
            ax.plot(np.arange(start, start + len(h["objective"])), h["objective"], lw=1.2,
                    label=f"level {h['level'] + 1} (×{h.get('shrink', 1):g})")
            ax.axvline(start, color="0.8", lw=0.6, ls="--")
            start += len(h["objective"])
        ax.set_title(f"{levels[0]['stage']}: final {levels[-1]['objective'][-1]:.5g}", fontsize=9)
        ax.set_xlabel("iteration", fontsize=8), ax.set_ylabel("objective" if i == 0 else "", fontsize=8)
        ax.tick_params(labelsize=7), ax.legend(fontsize=7, frameon=False), ax.grid(alpha=0.3)
    fig.suptitle("Objective per stage and level (lower is better)" if runs else "No iterations recorded", fontsize=11)


def _views(fixed, moving, warped, displacement, det, planes, foreground):
    wf, wm = _window(fixed), _window(moving)
    norm = lambda a, w: (a - w[0]) / (w[1] - w[0])  # noqa: E731
    # moving and warped get the moving image's window: across contrasts the fixed one is meaningless
    views = [{"plane": p,
              "fixed": norm(p.sample(fixed.data, fixed.grid)[0], wf),
              "moving": norm(p.sample(moving.data, moving.grid)[0], wm),
              "warped": norm(p.sample(warped.data, warped.grid)[0], wm),
              "disp": p.sample(displacement, fixed.grid)[[p.h, p.v]],
              "det": p.sample(det[:, None], fixed.grid, "nearest")[0],
              "foreground": p.sample(foreground, fixed.grid, "nearest")[0] > 0.5,
              "moving_plane": None} for p in planes]
    # a moving image elsewhere in physical space (another scanner's coordinates) is not on the
    # fixed image's planes: show it on its own, or its panels are black
    if all(np.isnan(v["moving"]).mean() > 0.9 for v in views):
        for v, p in zip(views, _planes(moving, wm)):
            v["moving"], v["moving_plane"] = norm(p.sample(moving.data, moving.grid)[0], wm), p
    return views


def _relative_to_linear(displacement: torch.Tensor, grid: Grid, linear) -> torch.Tensor:
    """The deformable part ``L^-1(T(x)) - x`` of a whole transform ``T = L o D`` (D acts first):
    the whole transform's grid and Jacobian would show the affine's shift and scale instead."""
    points = grid.points(displacement.dtype)
    mapped = points + torch.movedim(displacement, 1, -1)
    inverse = linear.inverse().to(dtype=displacement.dtype)
    return torch.movedim(inverse(mapped) - points, -1, 1)


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def _render(fig) -> np.ndarray:
    """The figure's RGB pixels at 100 dpi, as ``savefig`` would draw them."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig.set_dpi(100)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _encode(pixels: np.ndarray) -> bytes:
    from PIL import Image as PILImage  # matplotlib's own dependency

    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _stack(rows: list[list[np.ndarray]]) -> np.ndarray:
    """Rows of pictures side by side, the rows one above the other, centred, on white."""
    def pad(a, height, width):
        out = np.full((height, width, 3), 255, np.uint8)
        left = (width - a.shape[1]) // 2
        out[:a.shape[0], left:left + a.shape[1]] = a
        return out

    lines = []
    for row in rows:
        height = max(a.shape[0] for a in row)
        lines.append(np.concatenate([pad(a, height, a.shape[1]) for a in row], axis=1))
    width = max(line.shape[1] for line in lines)
    return np.concatenate([pad(line, line.shape[0], width) for line in lines], axis=0)


def _table(rows, header) -> str:
    def cell(v):
        return html.escape("–" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _summary_rows(metrics: dict, jac: dict) -> list:
    rows = [("folding (voxels with det J ≤ 0)", jac["folding_count"]),
            ("folding (% of voxels)", 100.0 * jac["folding_fraction"]),
            ("SD of log-Jacobian", jac["log_jacobian_std"]),
            ("Jacobian min / max", f"{jac['det_min']:.4g} / {jac['det_max']:.4g}")]
    for key, value in metrics.items():
        if key.startswith("_") or key in ("stages", "versions"):
            continue
        name = re.sub(r"_(s|mm)$", r" (\1)", key).replace("_", " ")
        if isinstance(value, dict):
            rows += [(f"{name}: {k}", v) for k, v in value.items() if not isinstance(v, (dict, list))]
        elif not isinstance(value, list):
            rows.append((name, value))
    return rows


STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1500px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .7em;text-align:left}
th{background:#f4f4f4}td:not(:first-child){font-variant-numeric:tabular-nums}img{max-width:100%;height:auto}
.foot{color:#777;font-size:12px;margin-top:2em}.row{display:flex;flex-wrap:wrap;gap:0 2em;align-items:flex-start}"""

# lets a headless browser confirm that every picture decoded; the page loads nothing from outside
CHECK = """<script>window.addEventListener("load",function(){var i=Array.from(document.images);
document.getElementById("rendered").textContent=i.filter(function(x){return x.complete&&x.naturalWidth>0}).length
+" of "+i.length})</script>"""


def write_report(outdir, fixed: Image, moving: Image, warped: Image, displacement, history: list[dict],
                 metrics: dict, *, linear=None, fixed_mask: Image | None = None,
                 determinant: torch.Tensor | None = None) -> tuple[Path, Path]:
    """Write ``report.png`` and ``report.html`` into ``outdir``; return their paths.

    ``displacement``: the whole transform on ``fixed.grid``, as ``[1, D, *shape]`` or
    ``[D, *shape]`` (mm, ITK convention) or as a transform. ``history``: ``Result.history``.
    ``metrics``: what goes into metrics.json (scalars and dicts of scalars are tabulated).
    ``linear``: the linear part of the transform (``Result.linear_part()``); the deformation
    panels then show the deformable part relative to it. ``fixed_mask``: outlined on them
    (default: the fixed image's foreground). ``determinant``: ``det(I + J)`` of the whole
    displacement on ``fixed.grid``, when the caller has computed it (else it is computed here).
    """
    from matplotlib.figure import Figure  # no pyplot: nothing global changes, no display needed

    outdir = Path(outdir)
    with torch.no_grad():
        if isinstance(displacement, Transform):
            displacement = displacement.displacement(fixed.grid)
        disp = displacement.detach().cpu().to(torch.float64).reshape(1, fixed.ndim, *fixed.grid.shape)
        if linear is not None:
            disp = _relative_to_linear(disp, fixed.grid, linear.to("cpu"))
        # once, float64: it decides the folding count (the same for the deformable part: det T =
        # det L det D with det L > 0, and SD log-J does not see the constant log det L)
        if determinant is None:
            det = jacobian_determinant(disp, fixed.grid)
        else:
            det = determinant.detach().cpu().to(torch.float64).reshape(1, *fixed.grid.shape)
            if linear is not None:
                # x + deformable part = L^-1(T(x)): its determinant is det T / det L
                det = det / torch.linalg.det(linear.to("cpu").matrix().detach()[0].to(torch.float64))
        jac = determinant_stats(det.numpy())
    window = _window(fixed)
    planes = _planes(fixed, window)
    if fixed_mask is not None and fixed_mask.grid.same_as(fixed.grid, atol=1e-4):
        foreground = (fixed_mask.data[:1] > 0).float()
    else:
        foreground = (fixed.data[:1, :1].detach().cpu().float() > window[0] + 0.1 * (window[1] - window[0])).float()
    views = _views(fixed, moving, warped, disp.float(), det.float(), planes, foreground)
    before = np.concatenate([np.abs(v["fixed"] - (v["warped"] if v["moving_plane"] is not None else v["moving"])).ravel()
                             for v in views])
    limit = float(max(np.nanpercentile(before, 99.5), 0.05)) if np.isfinite(before).any() else 1.0

    sections = [("Images", _draw_images, (planes, views), 3),
                ("Alignment", _draw_alignment, (planes, views, limit), 3.6),
                ("Deformation", _draw_deformation, (planes, views, jac, linear is not None), 2.8)]
    row_height = 2.3 * len(planes) + 0.5
    # each section is drawn once: its pixels are the HTML's picture and a tile of report.png
    # (drawing a combined figure as well doubled the report's time, the slowest part of a batch)
    pixels = []
    for title, draw, args, width in sections:
        fig = Figure(figsize=(2.3 * width, row_height), layout="constrained")
        draw(fig, *args)
        pixels.append((title, _render(fig)))
    fig = Figure(figsize=(12, 3.2), layout="constrained")
    _draw_objective(fig, history)
    pixels.append(("Objective", _render(fig)))
    parts = [(title, _encode(p)) for title, p in pixels]

    bits = [f"{metrics.get('preset', 'a')} registration"] + [f"{k} {metrics[k]}" for k in ("metric", "device")
                                                             if k in metrics]
    if "registration_time_s" in metrics:
        bits.append(f"{metrics['registration_time_s']:.1f} s")
    summary = ", ".join(bits)
    width = sum(p.shape[1] for _, p in pixels[:3])
    heading = Figure(figsize=(width / 100, 0.45))
    heading.text(0.5, 0.5, f"airlab QC: {summary}", fontsize=13, fontweight="bold", ha="center", va="center")
    (outdir / "report.png").write_bytes(_encode(_stack([[_render(heading)], [p for _, p in pixels[:3]],
                                                        [pixels[3][1]]])))

    stages = [(s.get("stage"), s.get("level", 0) + 1, s.get("shrink"), s.get("iterations"), s.get("final_objective"),
               s.get("time_s")) for s in metrics.get("stages", [])]
    versions = ", ".join(f"{k} {v}" for k, v in metrics.get("versions", {}).items())
    figures = "".join(f'<section><h2>{t}</h2><img alt="{t}" src="data:image/png;base64,{base64.b64encode(b).decode()}">'
                      "</section>" for t, b in parts)
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>airlab QC report</title>'
            f"<style>{STYLE}</style></head><body><h1>airlab QC report</h1><p>{html.escape(summary)}</p>"
            f'<h2>Numbers</h2><div class="row">{_table(_summary_rows(metrics, jac), ["measure", "value"])}'
            f'{_table(stages, ["stage", "level", "shrink", "iterations", "final objective", "time (s)"])}</div>'
            f'<div class="row">{figures}</div><p class="foot">{html.escape(versions)}</p>'
            f'<p id="rendered" hidden></p>{CHECK}</body></html>')
    (outdir / "report.html").write_text(page, encoding="utf-8")
    return outdir / "report.png", outdir / "report.html"


TEMPLATE_GENERATOR = '<meta name="generator" content="airlab template">'


def write_template_report(outdir, templates: list, history: list[dict], final: dict | None = None) -> Path:
    """``report.html`` of a template run: the template's planes (three in 3D) after every
    iteration, on the same planes and window as the final template, and its sharpness and the
    group's distance to it per iteration. ``templates``: paths (or Images) of iterations 0..K,
    read one at a time."""
    from matplotlib.figure import Figure

    from .image import read_image

    outdir = Path(outdir)
    last = templates[-1] if isinstance(templates[-1], Image) else read_image(templates[-1])
    window = _window(last)
    planes = _planes(last, window)
    columns = len(templates)  # iterations left to right, a plane per row
    fig = Figure(figsize=(2.4 * columns + 0.8, 2.6 * len(planes) + 0.6), layout="constrained")
    axes = fig.subplots(len(planes), columns, squeeze=False)
    for row, plane in zip(axes, planes):
        row[0].set_ylabel(plane.label, fontsize=8)
    for k, item in enumerate(templates):
        image = item if isinstance(item, Image) else read_image(item)
        for ax, plane in zip(axes[:, k], planes):
            values = (plane.sample(image.data, image.grid)[0] - window[0]) / (window[1] - window[0])
            _panel(ax, plane, values, cmap="gray", vmin=0, vmax=1)
        entry = history[k] if k < len(history) else {}
        axes[0, k].set_title(f"iteration {k}\nsharpness {entry.get('sharpness', float('nan')):.3g}", fontsize=9)
        del image
    fig.suptitle("Template per iteration (window of the final template)", fontsize=11)
    evolution = _png(fig)

    fig = Figure(figsize=(9, 3), layout="constrained")
    left, right = fig.subplots(1, 2)
    ks = [h["iteration"] for h in history]
    left.plot(ks, [h.get("sharpness") for h in history], "o-")
    left.set_title("sharpness (mean |gradient| in the foreground)", fontsize=9)
    dist = [h.get("group_distance_mm") for h in history]
    right.plot([k for k, d in zip(ks, dist) if d is not None], [d for d in dist if d is not None], "o-",
               label="group to the template registered to")
    moved = [h.get("mean_displacement_mm") for h in history]
    right.plot([k for k, d in zip(ks, moved) if d is not None], [d for d in moved if d is not None], "s--",
               label="mean displacement (shape update)")
    right.set_title("mean distance (mm)", fontsize=9)
    right.legend(fontsize=7, frameon=False)
    from matplotlib.ticker import MaxNLocator

    for ax in (left, right):
        ax.set_xlabel("iteration", fontsize=8), ax.grid(alpha=0.3), ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    curves = _png(fig)

    header = ["iteration", "registrations", "sharpness", "group distance (mm)", "mean displacement removed (mm)",
              "time (s)"]
    table = [(h["iteration"], h.get("registrations", "initial"), h.get("sharpness"), h.get("group_distance_mm"),
              h.get("mean_displacement_mm"), h.get("time_s")) for h in history]
    if final:
        table.append(("final", "deformable", None, final.get("group_distance_mm"), None, None))
    images = "".join(f'<section><h2>{t}</h2><img alt="{t}" src="data:image/png;base64,{base64.b64encode(b).decode()}">'
                     "</section>" for t, b in (("Per iteration", curves), ("Template per iteration", evolution)))
    link = '<p>Each image registered to the final template: <a href="images/index.html">images/index.html</a></p>' \
        if (outdir / "images" / "index.html").exists() else ""
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">{TEMPLATE_GENERATOR}'
            f"<title>airlab template</title><style>{STYLE}</style></head><body><h1>airlab template</h1>"
            f"<p>{len(history) - 1} iterations; the last is template.nii.gz.</p>{link}"
            f"<h2>Numbers</h2>{_table(table, header)}{images}"
            f'<p id="rendered" hidden></p>{CHECK}</body></html>')
    (outdir / "report.html").write_text(page, encoding="utf-8")
    return outdir / "report.html"
