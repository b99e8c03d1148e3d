"""Register one pair (or a batch of same-grid pairs) and write the command-line contract's files.

``register_files`` is what ``airlab register`` runs: read the inputs, register them with a
pipeline, write warped.nii.gz, displacement.nii.gz, inverse_displacement.nii.gz (when every
stage has an exact inverse: linear and velocity stages), affine.txt, metrics.json and the
report into OUTDIR, staged so that OUTDIR gets all of them or nothing.
"""

from __future__ import annotations

import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..evaluate import determinant_stats
from ..image import Image, as_image, resample, write_image  # as_image: re-exported (airlab.workflows)
from ..landmarks import LANDMARK_WEIGHT
from ..pipelines import PipelineConfig, default_metric
from ..progress import Observer
from ..regularisers import jacobian_determinant
from ..registration import Registration, Result
from ..spatial import inside
from ..transforms import (DisplacementField, LinearTransform, StationaryVelocityField, Transform,
                          write_displacement_field, write_transform)
from .staging import staged_output

__all__ = ["OUTPUTS", "Outputs", "as_image", "as_points", "register_pair", "write_outputs", "register_files",
           "register_batch", "write_files"]

OUTPUTS = ["warped.nii.gz", "displacement.nii.gz", "inverse_displacement.nii.gz", "affine.txt", "metrics.json",
           "report.png", "report.html"]


@dataclass
class Outputs:
    """What one registration produced: the engine's result, the moving image on the fixed grid,
    the whole transform sampled there, and the record of what ran."""

    result: Result
    warped: Image
    displacement: DisplacementField  # on the fixed grid, [N, D, *shape] mm, ITK convention
    metrics: dict
    fixed: Image
    moving: Image
    inverse: DisplacementField | None = None  # on the moving grid, moving -> fixed points
    fixed_mask: Image | None = None


def invertible(result: Result) -> bool:
    """Whether every stage has an exact inverse (linear transforms, velocity fields)."""
    return all(isinstance(t, (LinearTransform, StationaryVelocityField)) for t in result.stages)


@torch.no_grad()
def inverse_on_moving_grid(result: Result, moving_grid) -> tuple[DisplacementField, dict]:
    """The inverse transform sampled on the moving grid, and its consistency
    ``|T(T^-1(y)) - y|`` (mm) over the moving voxels whose inverse lands in the fixed image."""
    inverse = result.transform.inverse()
    field = inverse.displacement(moving_grid)
    y = moving_grid.points(field.dtype, field.device)
    x = y + torch.movedim(field, 1, -1)
    error = (result.transform(x) - y).norm(dim=-1)
    counted = inside(result.fixed_grid.physical_to_index(x), result.fixed_grid.size)
    error = error[counted] if bool(counted.any()) else error.flatten()
    stats = {"mean": float(error.mean()), "max": float(error.max()), "voxels": int(error.numel())}
    return DisplacementField(moving_grid, field.shape[0], field), stats


def _versions() -> dict:
    import SimpleITK as sitk

    from .. import __version__

    return {"airlab": __version__, "torch": torch.__version__, "SimpleITK": sitk.Version_VersionString(),
            "python": platform.python_version()}


def as_points(value, grid, what: str = "points"):
    """``[P, D]`` float64 landmarks (mm, LPS) from a landmark file (any format of
    :mod:`airlab.landmarks`; index files refer to ``grid``) or an array."""
    import numpy as np

    from ..landmarks import read_points

    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        return read_points(value, grid=grid)
    value = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value, dtype=float)
    if value.ndim != 2 or value.shape[1] != grid.ndim or not np.isfinite(value).all():
        raise InputError(f"{what} must be finite [P, {grid.ndim}] coordinates (mm), got shape {value.shape}")
    return value


def register_pair(fixed, moving, pipeline: PipelineConfig, *, fixed_mask=None, moving_mask=None, device="cpu",
                  seed: int | None = 0, progress=False, preset: str | None = None, metric: str | None = None,
                  fixed_points=None, moving_points=None, landmark_weight: float = LANDMARK_WEIGHT,
                  inverse: bool = True) -> Outputs:
    """Register ``moving`` to ``fixed`` (paths or images) with ``pipeline``; nothing is written.

    ``preset``/``metric`` name what the pipeline was made from, for the record only.
    ``inverse=False`` skips the inverse field (a device batch computes it pair by pair).
    ``fixed_points``/``moving_points`` (landmark files or ``[P, D]`` arrays, paired by row): their
    TRE before and after goes into the metrics, and with ``landmark_weight > 0`` every stage's
    objective also pulls them together (see :class:`~airlab.registration.Registration`)."""
    f, m = as_image(fixed, "fixed image"), as_image(moving, "moving image")
    fm, mm = as_image(fixed_mask, "fixed mask"), as_image(moving_mask, "moving mask")
    fp, mp = as_points(fixed_points, f.grid, "fixed points"), as_points(moving_points, m.grid, "moving points")
    if (fp is None) != (mp is None):
        raise InputError("landmarks need both fixed and moving points")
    if fp is not None and fp.shape != mp.shape:
        raise InputError(f"{len(fp)} fixed points but {len(mp)} moving points; they pair by row")
    resolved = pipeline.resolve().model_copy(update={"seed": seed})  # recorded as it ran
    registration = Registration(resolved.build(f.grid), progress=progress, seed=seed,
                                **resolved.registration_options())
    result = registration(f, m, fixed_mask=fm, moving_mask=mm, device=device, fixed_points=fp, moving_points=mp,
                          landmark_weight=landmark_weight)
    with torch.no_grad():
        # the transform sampled once on the fixed grid both warps the image and is the field
        # written: evaluating a B-spline at every voxel twice took seconds at 2 mm
        field = result.transform.displacement(f.grid)
        dense = DisplacementField(f.grid, field.shape[0], field)
        warped = resample(m.to(device) if m.data.is_floating_point() else m, f.grid, dense).to("cpu")
    if warped.data.is_floating_point():
        warped = Image(warped.data.float(), warped.grid)
    inverse_field, consistency = None, None
    if inverse and invertible(result):
        inverse_field, consistency = inverse_on_moving_grid(result, m.grid)
        inverse_field = inverse_field.to("cpu")
    stages = [{"stage": h["stage"], "level": h["level"], "shrink": h["shrink"], "sigma_mm": h["sigma_mm"],
               "grid_size": h["grid_size"], "iterations": h["iterations"],
               "final_objective": h["objective"][-1] if h["objective"] else None,
               "final_terms": h.get("final_terms", {}), "time_s": h["time_s"]}
              | ({"sharpness": h["sharpness"]} if "sharpness" in h else {}) for h in result.history]
    metrics = {
        "command": "register",
        "preset": preset,
        "metric": (metric or default_metric(preset)) if preset else None,
        "device": str(device),
        "seed": seed,
        "stages": stages,
        "registration_time_s": round(result.wall_time, 3),
        "versions": _versions(),
        "inverse_consistency_mm": consistency,
        # the whole pipeline that ran: `airlab register --config metrics.json` replays it
        "pipeline": resolved.model_dump(mode="json", exclude_none=True),
    }
    if fp is not None:
        metrics.update(_landmark_metrics(result, fp, mp, landmark_weight))
    return Outputs(result, warped, dense.to("cpu"), metrics, f, m, inverse_field, fm)


def _landmark_metrics(result: Result, fixed_points, moving_points, weight: float) -> dict:
    """TRE (mm) of the landmarks before and after; with a batch, over every pair's points."""
    from ..evaluate import tre

    with torch.no_grad():
        mapped = result.transform.transform_points(fixed_points).reshape(-1, fixed_points.shape[1])
    copies = len(mapped) // len(fixed_points)
    target = torch.as_tensor(moving_points).repeat(copies, 1)
    before = torch.as_tensor(fixed_points).repeat(copies, 1)
    return {"landmarks": {"count": len(fixed_points), "weight": weight, "used_in_objective": weight > 0},
            "tre_before_mm": tre(before, target), "tre_mm": tre(mapped, target)}


def write_outputs(outputs: Outputs, folder: Path, *, report: bool = True, started: float | None = None) -> None:
    """Write the contract's files for ``outputs`` into ``folder`` (a staging folder);
    ``started`` (a ``time.perf_counter()`` value) puts the wall time until metrics.json into it."""
    folder = Path(folder)
    linear = outputs.result.linear_part()
    # compressing the outputs is most of the writing (0.5 s for a 2 mm field) and SimpleITK lets
    # go of the GIL while it does: two files at once
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(write_image, outputs.warped, folder / "warped.nii.gz"),
                pool.submit(write_displacement_field, outputs.displacement, outputs.fixed.grid,
                            folder / "displacement.nii.gz")]
        if outputs.inverse is not None:
            jobs.append(pool.submit(write_displacement_field, outputs.inverse, outputs.moving.grid,
                                    folder / "inverse_displacement.nii.gz"))
        if linear is not None:
            jobs.append(pool.submit(write_transform, linear.to("cpu"), folder / "affine.txt"))
        for job in jobs:
            job.result()
    # once per pair, float64 (determinants near zero decide the folding count): metrics.json,
    # results.csv and the report's Jacobian panel all use it
    with torch.no_grad():
        det = jacobian_determinant(outputs.displacement.field.detach()[:1].cpu(), outputs.fixed.grid, torch.float64)
    outputs.metrics["jacobian"] = determinant_stats(det.numpy())
    if started is not None:
        outputs.metrics["wall_time_s"] = round(time.perf_counter() - started, 3)
    (folder / "metrics.json").write_text(json.dumps(outputs.metrics, indent=2))
    if report:
        from ..report import write_report

        # the deformation panels show the deformable part relative to the linear one, where there is one
        deformable = any(not isinstance(t, LinearTransform) for t in outputs.result.stages)
        write_report(folder, outputs.fixed, outputs.moving, outputs.warped, outputs.displacement.field.detach()[:1],
                     outputs.result.history, outputs.metrics, linear=linear if deformable else None,
                     fixed_mask=outputs.fixed_mask, determinant=det)


def register_files(fixed, moving, outdir, pipeline: PipelineConfig, *, fixed_mask=None, moving_mask=None,
                   device="cpu", seed: int | None = 0, progress=False, report: bool = True, overwrite: bool = False,
                   preset: str | None = None, metric: str | None = None, record: dict | None = None,
                   fixed_points=None, moving_points=None, landmark_weight: float = LANDMARK_WEIGHT) -> Outputs:
    """Register the files ``moving`` to ``fixed`` and write the outputs into ``outdir``, staged:
    OUTDIR gets every file or none, and files there are replaced only with ``overwrite`` (and
    only those named like airlab's outputs). ``record`` is added to metrics.json."""
    start = time.perf_counter()
    with staged_output(Path(outdir), list(OUTPUTS), overwrite) as stage:
        out = register_pair(fixed, moving, pipeline, fixed_mask=fixed_mask, moving_mask=moving_mask, device=device,
                            seed=seed, progress=progress, preset=preset, metric=metric, fixed_points=fixed_points,
                            moving_points=moving_points, landmark_weight=landmark_weight)
        out.metrics.update(record or {})
        out.metrics.update({"fixed": _name(fixed), "moving": _name(moving), "fixed_mask": _name(fixed_mask),
                            "moving_mask": _name(moving_mask)})
        if fixed_points is not None:
            out.metrics["landmarks"].update(fixed_points=_name(fixed_points), moving_points=_name(moving_points))
        write_outputs(out, stage, report=report, started=start)
    return out


def _name(value) -> str | None:
    if value is None:
        return None
    return str(value) if isinstance(value, (str, os.PathLike)) else f"<{type(value).__name__}>"


# ---------------------------------------------------------------------------------------------
# Same-grid pairs through the engine's batch dimension (the batch runner's device batches)

def write_files(outputs: Outputs, outdir, *, report: bool = True, overwrite: bool = False,
                started: float | None = None) -> None:
    """Write ``outputs`` (one pair) into ``outdir``, staged like :func:`register_files`."""
    with staged_output(Path(outdir), list(OUTPUTS), overwrite) as stage:
        write_outputs(outputs, stage, report=report, started=started)


def _stack(images: list[Image | None]) -> Image | None:
    if images[0] is None:
        return None
    if all(i is images[0] for i in images):
        return images[0]  # one image for every pair: broadcast, not copied
    return Image(torch.cat([i.data for i in images]), images[0].grid)


def _one(transform, i: int):
    """Pair ``i`` of a batched transform: every parameter and buffer carries the batch first."""
    import copy

    n = transform.batch_size
    single = copy.deepcopy(transform)
    with torch.no_grad():
        for module in single.modules():
            for name, value in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                if value is not None and value.dim() and value.shape[0] == n:
                    piece = value[i:i + 1].clone()
                    if isinstance(value, torch.nn.Parameter):
                        piece = torch.nn.Parameter(piece, requires_grad=False)
                    setattr(module, name, piece)
            if isinstance(module, Transform):
                module.batch_size = 1
    return single


class _PerPairObjective(Observer):
    """Observer: each pair's objective per iteration (the engine reports the batch's sum; the
    terms come per pair, and the objective is their weighted sum)."""

    def __init__(self, weights: list[list[float]]):
        self.weights = weights
        self.values: list[list[list[float]]] = []  # [level run][iteration][pair]

    def level_start(self, info: dict) -> None:
        self.values.append([])

    def iteration(self, info: dict) -> None:
        w = self.weights[info["stage"]]
        per_term = [torch.as_tensor(v, dtype=torch.float64) for v in info["terms"].values()]
        total = sum(wk * v for wk, v in zip(w, per_term))
        self.values[-1].append(torch.atleast_1d(total).tolist())


def register_batch(fixed: list, moving: list, pipeline: PipelineConfig, *, fixed_masks=None, moving_masks=None,
                   device="cpu", seed: int | None = 0, preset: str | None = None,
                   metric: str | None = None) -> list[Outputs]:
    """Register the pairs ``(fixed[i], moving[i])`` (paths or images; all fixed images on one
    grid, all moving ones on one grid) in one run of the engine, through its batch dimension;
    return one :class:`Outputs` per pair, as :func:`register_pair` would (the wall time is the
    batch's, and metrics.json says so under ``"batch"``)."""
    n = len(moving)
    read = {}  # a path given for several pairs (the template) is read once and broadcast

    def image(value, what):
        key = str(value) if isinstance(value, (str, os.PathLike)) else id(value)
        if key not in read:
            read[key] = as_image(value, what)
        return read[key]

    fs = [image(v, "fixed image") for v in fixed]
    ms = [image(v, "moving image") for v in moving]
    fms = [image(v, "fixed mask") if v is not None else None for v in (fixed_masks or [None] * n)]
    mms = [image(v, "moving mask") if v is not None else None for v in (moving_masks or [None] * n)]
    for group, what in ((fs, "fixed images"), (ms, "moving images"), (fms, "fixed masks"), (mms, "moving masks")):
        if (any(g is None for g in group) and any(g is not None for g in group)) or any(
                g is not None and not g.grid.same_as(group[0].grid) for g in group):
            raise InputError(f"a batch needs its {what} on one grid")
    stages = pipeline.resolve().build(fs[0].grid)
    # in the order of the engine's term names: losses, then regularisers
    weights = [[w for w, _ in s.losses] + [w for w, _ in s.regularisers] for s in stages]
    observer = _PerPairObjective(weights)
    together = register_pair(_stack(fs), _stack(ms), pipeline, fixed_mask=_stack(fms), moving_mask=_stack(mms),
                             device=device, seed=seed, progress=observer, preset=preset, metric=metric,
                             inverse=False)  # the batch's inverse would be thrown away: its statistics pool the pairs
    return [_pair_of(together, i, n, fs[i], ms[i], fms[i], observer.values) for i in range(n)]


def _pair_of(together: Outputs, i: int, n: int, fixed: Image, moving: Image, fixed_mask, per_pair) -> Outputs:
    result = together.result
    history = []
    for h, values in zip(result.history, per_pair):
        mine = [v[min(i, len(v) - 1)] for v in values]
        terms = {k: [v[min(i, len(v) - 1)]] for k, v in h.get("final_terms", {}).items()}
        history.append({**h, "objective": mine, "final_terms": terms})
    from ..registration import Result

    single = Result(_one(result.transform, i), [_one(t, i) for t in result.stages], history, result.wall_time,
                    result.fixed_grid)
    metrics = json.loads(json.dumps(together.metrics))  # a deep copy
    for s, h in zip(metrics["stages"], history):
        s["final_objective"] = h["objective"][-1] if h["objective"] else None
        s["final_terms"] = h["final_terms"]
    metrics["batch"] = {"size": n, "index": i}
    inverse = None
    if invertible(result):
        # for this pair alone: the batch's consistency statistics would pool every pair
        inverse, metrics["inverse_consistency_mm"] = inverse_on_moving_grid(single, moving.grid)
        inverse = inverse.to("cpu")
    displacement = DisplacementField(together.displacement.grid, 1, together.displacement.field.detach()[i:i + 1])
    warped = Image(together.warped.data[min(i, together.warped.data.shape[0] - 1)][None], together.warped.grid)
    return Outputs(single, warped, displacement, metrics, fixed, moving, inverse, fixed_mask)
