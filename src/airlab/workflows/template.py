"""``airlab template``: an unbiased template of a group of images (Guimond et al. 2000; Avants et
al. 2010), built from the pairwise workflow and the batch runner.

1. Iteration 0: every image is registered to the first one with the ``affine`` preset and the
   warped images are averaged, then moved by the inverse of the group's mean affine
   displacement (the affine-aligned average, centred). With ``initial``, that image is
   iteration 0 instead and its grid is the template's.
2. Iterations 1..K: every image is registered to the current template with the pipeline given
   (``smooth`` by default: a B-spline velocity, in 0.4-0.65x the time of the dense ``diffeomorphic``),
   through :func:`airlab.workflows.batch.run_pairs` (in this process, in device batches, or on
   Dask). The warped images are averaged, each weighted by
   where it holds data (a streamed :class:`~airlab.groupwise.RunningMean`: one image and one
   field in memory at a time, read back from the files the registrations wrote), optionally
   sharpened, and moved by the inverse of the mean displacement of the group (the shape
   update: :func:`~airlab.groupwise.shape_update`).
3. Every image is registered once more to the final template; its ``airlab register`` files go
   to ``OUTDIR/images/<name>/`` (with ``results.csv`` and ``index.html`` beside them).

OUTDIR then holds ``template.nii.gz``, ``iterations/template_XX.nii.gz`` (and ``.json``, its
numbers) per iteration, ``metrics.json`` and ``history.csv`` (per iteration the template's
sharpness, the group's mean distance to the template it was registered to, the norm of the
mean displacement the shape update removed) and ``report.html`` (the template's planes per
iteration). Each iteration's numbers and then its template are written atomically, the template
last; a rerun of the same command resumes after the last finished iteration (and inside an
iteration, after the last finished registration). ``iterations/run.json`` records what the
run is made of; a different group or pipeline in the same OUTDIR is refused unless
``overwrite``. Intensities: each image is scaled by the group's mean 99th percentile over its
own before averaging (the template keeps the group's units).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import GroupError, OutputExistsError, RegistrationError
from ..pipelines import PipelineConfig
from .batch import Settings, open_client, run_pairs
from .manifest import Pair
from .pairwise import OUTPUTS

__all__ = ["build", "TemplateSummary", "image_names", "GENERATOR"]

GENERATOR = "airlab template"
WORK = ".airlab-template-work"  # registrations of the iteration under way; removed after it
ROOT_FILES = ["template.nii.gz", "metrics.json", "history.csv", "report.html"]
BATCH_FILES = ["results.csv", "index.html"]
_EXTENSIONS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".tif", ".tiff", ".png", ".dcm", ".img", ".hdr")


@dataclass
class TemplateSummary:
    """Where the results are and the numbers per iteration (``history[k]`` for template k)."""

    outdir: Path
    template: Path
    history: list[dict]
    final: dict
    resumed_from: int | None = None
    images: dict = field(default_factory=dict)  # name -> OUTDIR/images/<name>


def _stem(name: str) -> str:
    for ext in _EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def image_names(paths: list[Path]) -> list[str]:
    """Each image's folder name under ``OUTDIR/images/``: its file name without the extension,
    with as many parent folders as make it unique, joined by ``_`` (``sub-01/t1.nii.gz`` and
    ``sub-02/t1.nii.gz`` become ``sub-01_t1`` and ``sub-02_t1``)."""
    parts = [Path(p).parts[:-1] + (_stem(Path(p).name),) for p in paths]
    depth = [1] * len(parts)
    while True:
        names = ["_".join(q[-d:]).lstrip("_/") or "image" for q, d in zip(parts, depth)]
        clash = {n for n in names if names.count(n) > 1}
        grow = [i for i, n in enumerate(names) if n in clash and depth[i] < len(parts[i])]
        if not grow:
            return names
        for i in grow:
            depth[i] += 1


def _header(path: Path):
    """``(Grid, components)`` from an image's header (no voxels read); GroupError if unreadable."""
    import SimpleITK as sitk

    from ..image import itk_reason
    from ..spatial import Grid

    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise GroupError(f"cannot read image {path}: {itk_reason(exc)}") from None
    return Grid(reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()), \
        reader.GetNumberOfComponents()


def _check_group(images, initial):
    """Paths, names and grids of the group, or one GroupError before anything is created."""
    paths = [Path(p).resolve() for p in images]
    if len(paths) < 2:
        raise GroupError(f"a template needs at least two images, got {len(paths)}")
    for p in paths + ([Path(initial)] if initial is not None else []):
        if not p.exists():
            raise GroupError(f"image {p} does not exist")
    if len(set(paths)) != len(paths):
        raise GroupError("an image is given twice: " + ", ".join(sorted({str(p) for p in paths if paths.count(p) > 1})))
    names = image_names(paths)
    for name, p in zip(names, paths):
        if not name or name.startswith(".") or name in BATCH_FILES:
            raise GroupError(f"image {p}: its name {name!r} cannot be a folder under images/")
    seen: dict[str, Path] = {}
    for name, p in zip(names, paths):
        if name in seen:
            raise GroupError(f"images {seen[name]} and {p} have the same name {name!r}; rename one "
                             "(each gets the folder images/<name>/)")
        seen[name] = p
    grids = []
    for p in paths + ([Path(initial)] if initial is not None else []):
        grid, components = _header(p)
        if components != 1:
            raise GroupError(f"image {p} has {components} components; templates of multi-channel images are not "
                             "supported yet")
        grids.append(grid)
    dims = {g.ndim for g in grids}
    if len(dims) > 1:
        raise GroupError("the images mix " + " and ".join(f"{d}D" for d in sorted(dims)) + " images")
    return paths, names, grids[: len(paths)]


def _write_atomic(path: Path, write) -> None:
    """``write(tmp)`` then rename over ``path``: a reader sees the old file or the new one."""
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=".airlab-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_json(path: Path, value) -> None:
    _write_atomic(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2), encoding="utf-8"))


def _write_image(path: Path, image) -> None:
    from ..image import write_image

    _write_atomic(path, lambda tmp: write_image(image, tmp))


def _p99(path: Path) -> float:
    from ..image import read_image

    data = read_image(path).data.float().flatten()
    return float(np.percentile(data[:: max(1, data.numel() // 1_000_000)].numpy(), 99))


# ------------------------------------------------------------------------------ the output folder
def _ours_in_images(folder: Path) -> list[Path]:
    """Pair folders under images/ that this workflow wrote (their metrics.json says so)."""
    out = []
    if folder.is_dir():
        for sub in sorted(folder.iterdir()):
            metrics = sub / "metrics.json"
            if sub.is_dir() and metrics.is_file():
                try:
                    if "template_iteration" in json.loads(metrics.read_text(encoding="utf-8")):
                        out.append(sub)
                except (ValueError, OSError):
                    pass
    return out


def _clear_images(outdir: Path) -> None:
    for sub in _ours_in_images(outdir / "images"):
        for name in OUTPUTS:
            (sub / name).unlink(missing_ok=True)
    for name in BATCH_FILES:
        (outdir / "images" / name).unlink(missing_ok=True)


def _clear(outdir: Path) -> None:
    """Remove what an earlier template run wrote into ``outdir``, and nothing else."""
    for name in ROOT_FILES:
        (outdir / name).unlink(missing_ok=True)
    its = outdir / "iterations"
    if its.is_dir():
        for f in its.iterdir():
            if f.name == "run.json" or re.fullmatch(r"template_\d+\.(nii\.gz|json)", f.name):
                f.unlink()
    _clear_images(outdir)
    shutil.rmtree(outdir / WORK, ignore_errors=True)


def _prepare_outdir(outdir: Path, state: dict, overwrite: bool) -> dict:
    """Check ``outdir`` against the run about to start; return the saved state to resume from
    (``{}`` for a fresh start)."""
    if outdir.exists() and not outdir.is_dir():
        raise OutputExistsError(f"output {outdir} exists and is not a folder")
    run_file = outdir / "iterations" / "run.json"
    saved = {}
    if run_file.is_file():
        try:
            saved = json.loads(run_file.read_text(encoding="utf-8"))
        except ValueError:
            saved = {}
        if saved.get("generator") != GENERATOR:
            raise OutputExistsError(f"{run_file} was not written by airlab template; choose another output folder")
    same = saved and all(saved.get(k) == v for k, v in state.items() if k != "final_iteration")
    if same and not overwrite:
        return saved
    clashes = [n for n in ROOT_FILES if (outdir / n).exists()]
    clashes += [f"iterations/{f.name}" for f in sorted((outdir / "iterations").glob("template_*"))]
    clashes += [f"images/{p.name}/" for p in _ours_in_images(outdir / "images")]
    if saved and not overwrite:
        raise OutputExistsError(f"{outdir} holds a template run of other images or settings (iterations/run.json); "
                                "pass --overwrite to replace it, or choose another output folder")
    if clashes and not overwrite:
        raise OutputExistsError(f"{outdir} already holds {', '.join(clashes[:4])}"
                                f"{' ...' if len(clashes) > 4 else ''}; pass --overwrite to replace them")
    if overwrite:
        _clear(outdir)
    return {}


def _finished_iterations(outdir: Path) -> list[dict]:
    """The records of iterations 0, 1, ... whose template was written (consecutive only)."""
    history = []
    while True:
        k = len(history)
        stem = outdir / "iterations" / f"template_{k:02d}"
        if not (Path(f"{stem}.nii.gz").is_file() and Path(f"{stem}.json").is_file()):
            return history
        history.append(json.loads(Path(f"{stem}.json").read_text(encoding="utf-8")))


# ------------------------------------------------------------------------------ one iteration
class _RoundProgress:
    """``run_pairs``'s progress interface, feeding the whole run's observer."""

    def __init__(self, progress):
        self.progress = progress

    def start(self, total: int, finished: int) -> None:
        if self.progress is not None and finished:
            self.progress.registered(finished)

    def pair_done(self, row: dict) -> None:
        if self.progress is not None:
            self.progress.registered(1)


def _register_all(pairs, folder: Path, settings: Settings, *, what: str, client, retries, batch_size, progress):
    summary = run_pairs(pairs, folder, settings, retries=retries, batch_size=batch_size, client=client,
                        progress=_RoundProgress(progress))
    if summary.failed:
        first = summary.failed[0]
        raise RegistrationError(f"{what}: {len(summary.failed)} of {len(pairs)} registrations failed "
                                f"({first['id']}: {first['error']}); rerun the command to retry them (finished ones "
                                "are kept)")
    return summary


def _average(names, paths, folder: Path, grids, scales, mask):
    """Stream a round's results out of ``folder``: each image warped again from its original
    through the displacement its registration wrote, with cubic B-spline interpolation (the
    linear interpolation of warped.nii.gz took 10% of a 3 mm slice's sharpness), averaged with
    the weight of where it holds data; the mean displacement; and each image's mean distance
    (mm) over ``mask``. One image and one field are in memory at a time."""
    from ..groupwise import RunningMean, coverage, displacement_norm
    from ..image import Image, read_image, resample
    from ..transforms import read_displacement_field

    image_mean, field_mean, distances = RunningMean(), RunningMean(), {}
    grid = None
    for name, path, image_grid, scale in zip(names, paths, grids, scales):
        transform = read_displacement_field(folder / name / "displacement.nii.gz", dtype=torch.float64)
        transform.requires_grad_(False)
        u, grid = transform.field.detach(), transform.grid
        with torch.no_grad():
            warped = resample(read_image(path).to(torch.float64), grid, transform, interpolation="bspline")
        image_mean.add(warped.data * scale, coverage(u, grid, image_grid))
        field_mean.add(u)
        distances[name] = displacement_norm(u, mask)
        del warped, u, transform
    return Image(image_mean.mean.float(), grid), field_mean.mean, distances


def _template_image(average, mean_field, sharpen_amount, shape_step, mask):
    from ..groupwise import displacement_norm, sharpen, shape_update

    sharp = sharpen(average, sharpen_amount)
    moved, residual = shape_update(sharp, mean_field, step=shape_step)
    return moved, {"mean_displacement_mm": displacement_norm(mean_field, mask),
                   "max_mean_displacement_mm": float(mean_field[0].norm(dim=0).max()),
                   "shape_update_residual_mm": residual}


class TemplateProgress:
    """The run's progress: a bar over every registration with the ETA on a terminal, a line per
    iteration otherwise."""

    def __init__(self, bar: bool | None = None):
        self.bar = sys.stderr.isatty() if bar is None else bar
        self._bar = None

    def start(self, total: int, finished: int) -> None:
        self.total, self.count, self.started, self.at_start = total, finished, time.perf_counter(), finished
        if self.bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=finished, desc="template", unit="registration", dynamic_ncols=True)
        elif finished:
            print(f"airlab template: {finished} of {total} registrations finished earlier", file=sys.stderr,
                  flush=True)

    def registered(self, count: int) -> None:
        self.count += count
        if self._bar is not None:
            self._bar.update(count)

    def iteration_done(self, record: dict, total_iterations: int) -> None:
        text = (f"iteration {record['iteration']}/{total_iterations}: sharpness {record['sharpness']:.4g}, group "
                f"distance {record.get('group_distance_mm') or 0:.3f} mm")
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=True)
            return
        done = self.count - self.at_start
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done * (self.total - self.count) if done else float("nan")
        print(f"airlab template: {text}; {self.count}/{self.total} registrations, about {eta:.0f} s left",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# ------------------------------------------------------------------------------ the run
def build(images, outdir, *, iterations: int = 4, preset: str | None = "smooth", metric: str | None = None,
          config=None, initial=None, device: str = "auto", seed: int | None = 0, sharpen: float = 0.0,
          shape_step: float = 1.0, report: bool = True, overwrite: bool = False, retries: int = 0,
          batch_size: int = 1, workers: int = 1, client=None, scheduler: str | None = None,
          cluster: str | None = None, progress=None, keep_work: bool = False, record: dict | None = None,
          pipeline: PipelineConfig | None = None) -> TemplateSummary:
    """Build a template of ``images`` (paths) into ``outdir``; the Python face of
    ``airlab template`` (see the module's docstring for the algorithm and the files).

    ``preset``/``metric``/``config`` choose the pipeline of iterations 1..K and of the final
    registrations (as for :func:`airlab.register`); ``initial`` (a path) replaces the
    affine-aligned average as iteration 0. ``sharpen``: unsharp-mask amount applied to each
    average (0: none). ``shape_step`` scales the mean displacement removed by the shape update.
    ``client``/``scheduler``/``cluster``/``workers``/``batch_size``/``retries``: where and how
    the registrations run, as for :func:`airlab.batch.run`. ``progress``: a
    :class:`TemplateProgress` (or ``None``). ``keep_work`` keeps each iteration's registrations
    in ``OUTDIR/.airlab-template-work/iter_XX/`` (for measuring them). ``pipeline``: a resolved
    pipeline that replaces ``preset``/``config`` (``preset`` is then recorded as given). A rerun
    resumes."""
    from ..image import Image, read_image
    from ..pipelines import load_config

    if iterations < 1:
        raise GroupError(f"iterations must be >= 1, got {iterations}")
    if not (0 < shape_step <= 1.0) or sharpen < 0:
        raise GroupError("shape_step must be in (0, 1] and sharpen >= 0")
    if batch_size > 1 and (client is not None or scheduler or cluster or workers > 1):
        raise GroupError("--batch-size applies to one local device; with Dask each worker takes one image")
    outdir = Path(outdir)
    paths, names, grids = _check_group(images, initial)
    if pipeline is not None:
        pipeline = pipeline.resolve()
    elif config is None:
        pipeline = PipelineConfig(preset=preset).resolve(metric=metric)
    else:
        pipeline = (config if isinstance(config, PipelineConfig) else load_config(config)).resolve(metric=metric)
        preset = None
    affine = PipelineConfig(preset="affine").resolve()
    state = {"generator": GENERATOR, "images": [str(p) for p in paths],
             "initial": str(Path(initial).resolve()) if initial is not None else None,
             "pipeline": pipeline.model_dump(mode="json", exclude_none=True),
             "affine_pipeline": affine.model_dump(mode="json", exclude_none=True) if initial is None else None,
             "seed": seed, "sharpen": sharpen, "shape_step": shape_step}
    saved = _prepare_outdir(outdir, state, overwrite)
    (outdir / "iterations").mkdir(parents=True, exist_ok=True)
    if saved:
        state = saved
    else:
        state["scales"] = None
        state["final_iteration"] = None
        _write_json(outdir / "iterations" / "run.json", state)
    history = _finished_iterations(outdir)[: iterations + 1]
    resumed_from = len(history) - 1 if history else None
    for stale in [*outdir.glob(".airlab-*"), *(outdir / "iterations").glob(".airlab-*")]:
        if stale.is_file():  # a file being written when a run was killed
            stale.unlink(missing_ok=True)
    if state.get("final_iteration") not in (None, iterations):
        _clear_images(outdir)  # registered to another iteration's template
    start = time.perf_counter()
    if state.get("scales") is None:
        p99 = [_p99(p) for p in paths]
        state["scales"] = [float(np.mean(p99) / v) if v > 0 else 1.0 for v in p99]
        _write_json(outdir / "iterations" / "run.json", state)
    scales = state["scales"]
    n = len(paths)
    rounds = (0 if initial is not None else 1) + iterations + 1
    done_rounds = max(0, len(history) - (1 if initial is not None else 0))
    if progress is not None:
        progress.start(n * rounds, n * done_rounds)
    work = outdir / WORK
    common = dict(retries=retries, batch_size=batch_size, progress=progress)
    dask_client, to_close = open_client(client, scheduler, cluster, workers)
    record = {**(record or {}), "template_run": str(outdir)}
    try:
        # ---- iteration 0: the initial template
        if not history:
            t0 = time.perf_counter()
            if initial is not None:
                first = read_image(initial).to(torch.float32)
                entry = {"iteration": 0, "initial": str(initial)}
            else:
                settings = Settings(affine, "affine", None, seed, device, False, {**record, "template_iteration": 0})
                folder = work / "iter_00"
                pairs = [Pair(nm, paths[0], p) for nm, p in zip(names, paths)]
                _register_all(pairs, folder, settings, what="iteration 0 (affine)", client=dask_client, **common)
                from ..groupwise import foreground

                mask = foreground(read_image(paths[0]).data.float())
                average, mean_field, distances = _average(names, paths, folder, grids, scales, mask)
                first, numbers = _template_image(average, mean_field, 0.0, shape_step, mask)
                entry = {"iteration": 0, "registrations": "affine", "fixed": str(paths[0]), **numbers,
                         "group_distance_mm": float(np.mean(list(distances.values()))), "distance_mm": distances}
            history.append(_finish_iteration(outdir, first, entry, t0, work, keep_work, progress, iterations))
        # ---- iterations 1..K
        for k in range(len(history), iterations + 1):
            t0 = time.perf_counter()
            fixed = outdir / "iterations" / f"template_{k - 1:02d}.nii.gz"
            settings = Settings(pipeline, preset, metric, seed, device, False, {**record, "template_iteration": k})
            folder = work / f"iter_{k:02d}"
            pairs = [Pair(nm, fixed, p) for nm, p in zip(names, paths)]
            _register_all(pairs, folder, settings, what=f"iteration {k}", client=dask_client, **common)
            from ..groupwise import foreground

            mask = foreground(read_image(fixed).data.float())
            average, mean_field, distances = _average(names, paths, folder, grids, scales, mask)
            template, numbers = _template_image(average, mean_field, sharpen, shape_step, mask)
            entry = {"iteration": k, "registrations": "deformable", **numbers,
                     "group_distance_mm": float(np.mean(list(distances.values()))), "distance_mm": distances}
            history.append(_finish_iteration(outdir, template, entry, t0, work, keep_work, progress, iterations))
        # ---- the final registrations, to the final template
        final_template = read_image(outdir / "iterations" / f"template_{iterations:02d}.nii.gz")
        _write_image(outdir / "template.nii.gz", final_template)
        if state.get("final_iteration") != iterations:
            state["final_iteration"] = iterations
            _write_json(outdir / "iterations" / "run.json", state)
        settings = Settings(pipeline, preset, metric, seed, device, report,
                            {**record, "template_iteration": iterations}, overwrite=overwrite)
        pairs = [Pair(nm, (outdir / "template.nii.gz").resolve(), p) for nm, p in zip(names, paths)]
        _register_all(pairs, outdir / "images", settings, what="the final registrations", client=dask_client,
                      **common)
    finally:
        for thing in to_close:
            thing.close()
        if progress is not None:
            progress.close()
    from ..groupwise import displacement_norm, foreground
    from ..transforms import read_displacement_field

    mask = foreground(final_template.data.float())
    distances = {nm: displacement_norm(read_displacement_field(outdir / "images" / nm / "displacement.nii.gz",
                                                               dtype=torch.float64).field.detach(), mask)
                 for nm in names}
    final = {"template": "template.nii.gz", "iteration": iterations,
             "group_distance_mm": float(np.mean(list(distances.values()))), "distance_mm": distances}
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    _write_history(outdir, history, final)
    if report:
        from ..report import write_template_report

        write_template_report(outdir, [outdir / "iterations" / f"template_{k:02d}.nii.gz" for k in range(iterations + 1)],
                              history, final)
    metrics = {"command": "template", "images": [str(p) for p in paths], "names": names,
               "initial": state["initial"], "iterations": iterations, "preset": preset, "metric": metric,
               "device": device, "seed": seed, "sharpen": sharpen, "shape_step": shape_step,
               "intensity_scales": dict(zip(names, scales)), "history": history, "final": final,
               "wall_time_s": round(time.perf_counter() - start, 3), "resumed_from_iteration": resumed_from,
               "pipeline": state["pipeline"], **(record or {})}
    _write_json(outdir / "metrics.json", metrics)  # last: a folder holding it is a finished run
    return TemplateSummary(outdir, outdir / "template.nii.gz", history, final, resumed_from,
                           {nm: outdir / "images" / nm for nm in names})


def _finish_iteration(outdir, template, entry, t0, work, keep_work, progress, iterations) -> dict:
    """Record iteration k: its numbers, then its template (atomically, last), then drop its work."""
    from ..groupwise import sharpness

    k = entry["iteration"]
    entry["sharpness"] = sharpness(template)
    entry["time_s"] = round(time.perf_counter() - t0, 3)
    _write_json(outdir / "iterations" / f"template_{k:02d}.json", entry)
    _write_image(outdir / "iterations" / f"template_{k:02d}.nii.gz", template)
    if not keep_work:
        shutil.rmtree(work / f"iter_{k:02d}", ignore_errors=True)
    if progress is not None:
        progress.iteration_done(entry, iterations)
    return entry


HISTORY_COLUMNS = ["iteration", "registrations", "sharpness", "group_distance_mm", "mean_displacement_mm",
                   "max_mean_displacement_mm", "shape_update_residual_mm", "time_s"]


def _write_history(outdir: Path, history: list[dict], final: dict) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, HISTORY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for entry in history:
        writer.writerow({k: entry.get(k, "") for k in HISTORY_COLUMNS})
    writer.writerow({"iteration": "final", "registrations": "deformable",
                     "group_distance_mm": final["group_distance_mm"]})
    _write_atomic(outdir / "history.csv", lambda tmp: tmp.write_text(buffer.getvalue(), encoding="utf-8"))
