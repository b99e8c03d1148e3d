"""The ``airlab`` command."""

from __future__ import annotations

import gc
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import click

from .errors import AirlabError
from .landmarks import LANDMARK_WEIGHT
from .pipelines.names import METRICS, PRESETS
from .workflows.staging import staged_output

EXIT_FAILURE, EXIT_USAGE = 1, 2
_CONSOLE = "airlab.console"  # ctx.meta key: set by run(), i.e. this process ends with the command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="airlab")
@click.option("--debug", is_flag=True, help="Show the full traceback of errors.")
def main(debug: bool):
    """airlab: image registration in physical space on PyTorch.

    Transforms map fixed physical points to moving physical points (ITK's convention);
    outputs are read by SimpleITK, ITK, ANTs (antsApplyTransforms) and 3D Slicer.
    """


INTERPOLATION_CHOICES = ["linear", "nearest", "bspline", "label"]


def _device(name: str):
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise click.UsageError("--device cuda: no CUDA device is available")
    return name


def _read(path: Path):
    from .image import read_image

    return read_image(path)


@contextmanager
def _engine_imports(ctx):
    """Import the engine (torch, SimpleITK, numpy, pydantic: ~190,000 objects that live as long
    as the process) with the cyclic garbage collector off: its full passes over them while they
    load free nothing and took ~0.1 s of each `airlab register` (2 cores). In the console process
    (run()) what they made is then frozen, so later passes skip it too; in-process callers (tests,
    CliRunner) only get the collector back as it was."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if ctx.meta.get(_CONSOLE):
            gc.freeze()
        if enabled:
            gc.enable()


@main.command()
@click.argument("fixed", type=click.Path(exists=True, path_type=Path))
@click.argument("moving", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", "outdir", type=click.Path(path_type=Path), required=True, help="Folder for the results.")
@click.option("--preset", type=click.Choice(PRESETS), default="diffeomorphic",
              show_default=True, help="Pipeline: rigid; affine (rigid, affine); then a deformation after "
              "them: diffeomorphic (a dense diffeomorphism, accurate on real anatomy and on smooth deformations); smooth (a B-spline "
              "velocity: smoother, 0.4-0.65x the time in 3D; the default until 2026-12-07); intersubject (a dense "
              "diffeomorphism sampled linearly: faster, less exact on smooth deformations); bspline (a B-spline "
              "displacement, not diffeomorphic).")
@click.option("--metric", type=click.Choice(METRICS), default=None,
              help="Similarity of the deformable stage (default: mutual information, which works within and "
              "across contrasts).")
@click.option("--fixed-mask", type=click.Path(exists=True, path_type=Path), help="Only voxels inside it count.")
@click.option("--moving-mask", type=click.Path(exists=True, path_type=Path), help="Only voxels inside it count.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the engine's random source.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML pipeline: a preset to adjust, or stages written out (see airlab.pipelines), or the "
              "metrics.json of an earlier run (replays its pipeline). Options given on the command line win "
              "over the file.")
@click.option("--fixed-points", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Landmarks in FIXED (CSV, Slicer .fcsv/.mrk.json, elastix .pts, VTK); TRE goes into metrics.json.")
@click.option("--moving-points", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The corresponding landmarks in MOVING, same order.")
@click.option("--landmark-weight", type=click.FloatRange(min=0), default=LANDMARK_WEIGHT, show_default=True,
              help="Weight (per mm^2) of the landmarks' mean squared distance in every stage's objective; "
              "0 only measures their TRE.")
@click.option("--quiet", is_flag=True, help="No progress bars or summary.")
@click.option("--no-report", is_flag=True, help="Skip report.png and report.html (saves a few seconds per pair).")
@click.option("--overwrite", is_flag=True, help="Replace airlab outputs already in OUTDIR (nothing else is touched).")
@click.pass_context
def register(ctx, fixed, moving, outdir, preset, metric, fixed_mask, moving_mask, device, seed, config_path,
             fixed_points, moving_points, landmark_weight, quiet, no_report, overwrite):
    """Register MOVING to FIXED; write warped.nii.gz (MOVING on FIXED's grid),
    displacement.nii.gz (the whole transform as an ITK displacement field on FIXED's grid:
    mm, LPS, fixed point -> moving point), affine.txt (the linear part, ITK format) and
    metrics.json (what ran, objectives, timings, versions) into OUTDIR, and a visual check of the
    result: report.png and report.html (self-contained)."""
    with _engine_imports(ctx):
        from .workflows import register_files

    if (fixed_points is None) != (moving_points is None):
        raise click.UsageError("--fixed-points and --moving-points go together")
    pipeline, preset, metric, seed, device, record = _pipeline(ctx, config_path, preset, metric, seed, device)
    out = register_files(fixed, moving, outdir, pipeline, fixed_mask=fixed_mask, moving_mask=moving_mask,
                         device=_device(device), seed=seed, progress=not quiet, report=not no_report,
                         overwrite=overwrite, preset=preset, metric=metric, record=record, fixed_points=fixed_points,
                         moving_points=moving_points, landmark_weight=landmark_weight)
    if not quiet:
        click.echo(f"airlab register: {preset or 'config'} in {out.metrics['registration_time_s']:.1f} s; results in "
                   f"{outdir}/ (report: {outdir / 'report.html'})")
        if "tre_mm" in out.metrics:
            click.echo(f"  landmarks: TRE {out.metrics['tre_before_mm']['mean']:.2f} mm before, "
                       f"{out.metrics['tre_mm']['mean']:.2f} mm after (mean of {out.metrics['landmarks']['count']})")


def _pipeline(ctx, config_path, preset, metric, seed, device):
    """The pipeline to run, from --preset/--metric and --config (options given on the command line
    win over the file), with the preset, metric, seed and device that apply and what to record."""
    from .pipelines import PipelineConfig, load_config

    if config_path is None:
        return PipelineConfig(preset=preset).resolve(metric=metric), preset, metric, seed, device, None
    pipeline = load_config(config_path)
    explicit = lambda name: ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT  # noqa: E731
    if pipeline.stages and not explicit("preset") and metric is not None:
        raise click.UsageError(f"--metric applies to presets; the stages in {config_path} name their own losses")
    seed = seed if explicit("seed") or pipeline.seed is None else pipeline.seed
    device = device if explicit("device") or pipeline.device is None else pipeline.device
    preset = preset if explicit("preset") else (None if pipeline.stages else pipeline.preset)
    metric = metric or (pipeline.metric if preset == pipeline.preset else None)
    record = {"config": {"file": str(config_path), **pipeline.model_dump(mode="json", exclude_none=True)}}
    return pipeline.resolve(preset, metric), preset, metric, seed, device, record


@main.command()
@click.argument("manifest", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", "outroot", type=click.Path(path_type=Path), required=True,
              help="Folder for the results: OUTROOT/ID/ per pair, OUTROOT/results.csv, OUTROOT/index.html.")
@click.option("--fixed", "fixed", type=click.Path(exists=True, path_type=Path),
              help="Instead of MANIFEST: one fixed image (a template) for every image that --moving matches.")
@click.option("--moving", "moving_glob", help="Instead of MANIFEST: a glob of moving images (quote it; ** recurses); "
              "each pair's id is the file name without its extension.")
@click.option("--preset", type=click.Choice(PRESETS), default="diffeomorphic", show_default=True,
              help="Pipeline, as for 'airlab register'.")
@click.option("--metric", type=click.Choice(METRICS), default=None, help="Similarity of the deformable stage.")
@click.option("--fixed-mask", type=click.Path(exists=True, path_type=Path),
              help="For pairs whose manifest row names no fixed_mask.")
@click.option("--moving-mask", type=click.Path(exists=True, path_type=Path),
              help="For pairs whose manifest row names no moving_mask.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="On Dask, 'auto' is decided by each worker.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the engine's random source.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML pipeline (or an earlier metrics.json), as for 'airlab register'.")
@click.option("--quiet", is_flag=True, help="No progress and no summary (errors still go to stderr).")
@click.option("--no-report", is_flag=True, help="Skip report.png and report.html (index.html then has no thumbnails).")
@click.option("--overwrite", is_flag=True, help="Replace airlab outputs in the folder of a pair that did not finish "
              "(finished pairs are skipped; nothing else is touched).")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Register up to N pairs whose images share grids at once, through the engine's batch "
              "dimension (a batch that runs out of memory is split). With Dask, each worker registers "
              "such batches, smaller where that gives every worker one.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Run K local worker processes (a Dask LocalCluster), each with its share of the cores.")
@click.option("--retries", type=click.IntRange(min=0), default=1, show_default=True,
              help="Try a failed pair this many more times before recording it as failed.")
@click.option("--scheduler", help="Address of a running dask.distributed scheduler (tcp://host:8786).")
@click.option("--cluster", help="local:N starts a Dask LocalCluster of N worker processes for this run.")
@click.pass_context
def batch(ctx, manifest, outroot, fixed, moving_glob, preset, metric, fixed_mask, moving_mask, device, seed,
          config_path, quiet, no_report, overwrite, batch_size, workers, retries, scheduler, cluster):
    """Register many pairs: each pair's 'airlab register' outputs go to OUTROOT/ID/; one row per
    pair (status, error, times, device, final objective; Dice, HD95, SDlogJ, folding) goes to
    OUTROOT/results.csv and an overview of the QC reports to OUTROOT/index.html.

    MANIFEST is a CSV with columns id,fixed,moving and optionally fixed_mask, moving_mask,
    fixed_labels, moving_labels (relative paths are relative to the manifest's folder); or give
    --fixed F --moving 'GLOB'. A rerun of the same command skips finished pairs. Exit code 1 if
    any pair failed (see results.csv), 2 for a bad manifest (nothing is started)."""
    from .progress import batch_progress
    from .workflows.batch import Settings, run_pairs
    from .workflows.manifest import glob_pairs, read_manifest

    if (manifest is None) == (fixed is None and moving_glob is None):
        raise click.UsageError("give either MANIFEST or --fixed F --moving 'GLOB'")
    if manifest is None and (fixed is None or moving_glob is None):
        raise click.UsageError("--fixed and --moving go together")
    if scheduler and cluster:
        raise click.UsageError("--scheduler and --cluster exclude each other")
    if manifest is not None:
        pairs = read_manifest(manifest, fixed_mask=fixed_mask, moving_mask=moving_mask)
    else:
        pairs = glob_pairs(fixed, moving_glob, fixed_mask=fixed_mask, moving_mask=moving_mask)
    pipeline, preset, metric, seed, device, record = _pipeline(ctx, config_path, preset, metric, seed, device)
    if device == "cuda" and not scheduler:
        _device(device)  # refused before any pair when this machine, which runs them, has no CUDA device
    settings = Settings(pipeline, preset, metric, seed, device, not no_report, record, overwrite)
    summary = run_pairs(pairs, outroot, settings, retries=retries, batch_size=batch_size, workers=workers,
                        scheduler=scheduler, cluster=cluster, progress=None if quiet else batch_progress())
    if not quiet:
        click.echo(f"airlab batch: {summary.done} of {len(summary.rows)} pairs done, {len(summary.failed)} failed; "
                   f"{summary.results}, overview {summary.index}")
    for row in summary.failed:
        click.echo(f"airlab batch: {row['id']} failed: {row['error']}", err=True)
    if summary.failed:
        ctx.exit(EXIT_FAILURE)


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", "outdir", type=click.Path(path_type=Path), required=True,
              help="Folder for the results: template.nii.gz, iterations/, images/NAME/, metrics.json, history.csv, "
              "report.html.")
@click.option("--iterations", type=click.IntRange(min=1), default=4, show_default=True,
              help="Rounds of register-average-shape update after the initial template.")
@click.option("--preset", type=click.Choice(PRESETS), default="smooth", show_default=True,
              help="Pipeline of each image to the template, as for 'airlab register' (smooth: a B-spline "
              "velocity, 0.4-0.65x the time of diffeomorphic's in 3D).")
@click.option("--metric", type=click.Choice(METRICS), default=None, help="Similarity of the deformable stage.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML pipeline (or an earlier metrics.json), as for 'airlab register'.")
@click.option("--initial", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Start from this template (its grid is the template's) instead of the affine-aligned average.")
@click.option("--sharpen", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Unsharp-mask amount applied to each iteration's average (0: none).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="On Dask, 'auto' is decided by each worker.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the engine's random source.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Register up to N images on one grid at once through the engine's batch dimension.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Run K local worker processes (a Dask LocalCluster).")
@click.option("--retries", type=click.IntRange(min=0), default=1, show_default=True,
              help="Try a failed registration this many more times before stopping.")
@click.option("--scheduler", help="Address of a running dask.distributed scheduler (tcp://host:8786).")
@click.option("--cluster", help="local:N starts a Dask LocalCluster of N worker processes for this run.")
@click.option("--quiet", is_flag=True, help="No progress and no summary.")
@click.option("--no-report", is_flag=True, help="Skip report.html and the per-image QC reports.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier template run in OUTDIR (nothing else is touched).")
@click.pass_context
def template(ctx, images, outdir, iterations, preset, metric, config_path, initial, sharpen, device, seed, batch_size,
             workers, retries, scheduler, cluster, quiet, no_report, overwrite):
    """Build an unbiased template of IMAGES (two or more): start from their affine-aligned
    average (or --initial), then --iterations times register every image to the template,
    average the warped images and move the average by the inverse of the group's mean
    displacement. Writes template.nii.gz, iterations/template_XX.nii.gz, each image's
    'airlab register' files (to the final template) in images/NAME/, metrics.json and
    history.csv (sharpness and the group's distance per iteration) and report.html.
    A rerun of the same command resumes after the last finished iteration."""
    from .workflows.template import TemplateProgress, build

    if scheduler and cluster:
        raise click.UsageError("--scheduler and --cluster exclude each other")
    pipeline, preset, metric, seed, device, record = _pipeline(ctx, config_path, preset, metric, seed, device)
    if device == "cuda" and not scheduler:
        _device(device)
    summary = build(list(images), outdir, iterations=iterations, preset=preset, metric=metric, pipeline=pipeline,
                    initial=initial, device=device, seed=seed, sharpen=sharpen, report=not no_report,
                    overwrite=overwrite, retries=retries, batch_size=batch_size, workers=workers,
                    scheduler=scheduler, cluster=cluster, progress=None if quiet else TemplateProgress(),
                    record=record)
    if not quiet:
        last = summary.history[-1]
        resumed = "" if summary.resumed_from is None else f" (resumed after iteration {summary.resumed_from})"
        click.echo(f"airlab template: {len(summary.images)} images, {iterations} iterations{resumed}; "
                   f"sharpness {last['sharpness']:.4g}, group distance {summary.final['group_distance_mm']:.3f} mm; "
                   f"{summary.template}" + ("" if no_report else f" (report: {outdir / 'report.html'})"))


@main.command()
@click.argument("image", type=click.Path(exists=True, path_type=Path))
@click.option("-t", "--transform", "transform_path", type=click.Path(exists=True, path_type=Path), required=True,
              help="An OUTDIR of 'airlab register' (its displacement.nii.gz), a displacement field, or an ITK "
              "transform file (.txt, .tfm, .mat, .h5).")
@click.option("-r", "--reference", type=click.Path(exists=True, path_type=Path), required=True,
              help="Image whose grid the result takes (the fixed image).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output image file.")
@click.option("--interpolation", type=click.Choice(INTERPOLATION_CHOICES), default=None,
              help="Default: nearest for integer (label) images, linear otherwise. 'label' moves label "
              "boundaries smoothly.")
@click.option("--points", type=click.Path(exists=True, path_type=Path),
              help="Also map landmarks in the reference's space (CSV of x,y[,z] mm LPS, Slicer .fcsv/.mrk.json, "
              "elastix .pts, VTK); the mapped points are written next to OUT as <OUT stem>_points.csv.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def warp(image, transform_path, reference, output, interpolation, points, overwrite):
    """Apply a found transform to IMAGE, resampling it onto REFERENCE's grid."""
    import numpy as np
    import torch

    from .image import resample, write_image
    from .transforms import read_transform

    path = transform_path / "displacement.nii.gz" if transform_path.is_dir() else transform_path
    if not path.exists():
        raise click.UsageError(f"{transform_path} holds no displacement.nii.gz")
    output = Path(output)
    points_out = output.with_name(output.name.split(".")[0] + "_points.csv") if points else None
    names = [output.name] + ([points_out.name] if points_out else [])
    with staged_output(output.parent if str(output.parent) else Path("."), names, overwrite) as stage:
        moving = _read(image)
        ref = _read(reference)
        transform = read_transform(path, dtype=torch.float64)
        if transform.ndim != moving.ndim or ref.ndim != moving.ndim:
            raise click.ClickException(
                f"dimensions differ: image {moving.ndim}D, reference {ref.ndim}D, transform {transform.ndim}D"
            )
        with torch.no_grad():
            out = resample(moving.to(torch.float64) if moving.data.is_floating_point() else moving, ref.grid,
                           transform, interpolation=interpolation)
        if out.data.is_floating_point():
            out = out.to(torch.float32)
        write_image(out, stage / output.name)
        if points_out:
            table = _read_points(points, ref.grid)
            mapped = transform.transform_points(table)
            header = ",".join("xyz"[: moving.ndim])
            np.savetxt(stage / points_out.name, mapped, delimiter=",", header=header, comments="", fmt="%.6f")


@main.command()
@click.option("-o", "--output", "outdir", type=click.Path(path_type=Path), default=Path("airlab-demo"),
              show_default=True, help="Folder for the results.")
@click.option("--preset", type=click.Choice(PRESETS), default="bspline",
              show_default=True, help="Pipeline to run.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the known deformation.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--overwrite", is_flag=True, help="Replace earlier demo outputs in the folder.")
def demo(outdir: Path, preset: str, seed: int, quiet: bool, overwrite: bool):
    """Register a real example pair shipped with airlab: the 2 mm MNI152 template (fixed) and the
    template deformed by a known, seeded smooth deformation (moving). Writes what
    'airlab register' writes, plus fixed.nii.gz and moving.nii.gz, and adds to metrics.json the
    error against the known answer (mm, inside the brain) and a check that SimpleITK,
    resampling moving with displacement.nii.gz, reproduces warped.nii.gz."""
    from .workflows.demo import run_demo

    metrics = run_demo(outdir, preset=preset, seed=seed, progress=not quiet, overwrite=overwrite)
    error = metrics["endpoint_error_mm"]
    click.echo(f"airlab demo: results in {outdir}/ (fixed, moving, warped, displacement, affine, metrics, report)")
    click.echo(f"  {preset}: {metrics['registration_time_s']:.1f} s; known deformation up to "
               f"{metrics['known_displacement_max_mm']:.1f} mm; error in the brain {error['mean']:.2f} mm mean, "
               f"{error['p95']:.2f} mm 95th percentile; {metrics['folding_voxels']} folded voxels")
    click.echo(f"  SimpleITK resampling with displacement.nii.gz vs warped.nii.gz: max difference "
               f"{metrics['sitk_vs_airlab_max_abs_difference']:.2e} (intensity range {metrics['intensity_range']:.0f})")
    click.echo(f"  report: {outdir / 'report.html'}")


@main.command()
@click.option("-t", "--transform", "transform_path", type=click.Path(exists=True, path_type=Path), required=True,
              help="An OUTDIR of 'airlab register' or its displacement.nii.gz (a displacement field on the fixed grid).")
@click.option("--fixed-labels", type=click.Path(exists=True, path_type=Path), help="Label map on the fixed image.")
@click.option("--moving-labels", type=click.Path(exists=True, path_type=Path),
              help="Label map on the moving image; warped onto the fixed grid (nearest) and compared.")
@click.option("--labels", "label_list", type=str, help="Comma-separated labels to score (default: all non-zero).")
@click.option("--fixed-points", type=click.Path(exists=True, path_type=Path),
              help="Landmarks in fixed space (CSV of x,y[,z] mm LPS, Slicer .fcsv/.mrk.json, elastix .pts, VTK).")
@click.option("--moving-points", type=click.Path(exists=True, path_type=Path),
              help="The corresponding landmarks in moving space, same order (an elastix index file cannot be "
              "converted here: the moving grid is unknown).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the measures as JSON here.")
@click.option("--overwrite", is_flag=True, help="Replace the JSON file if it exists.")
def evaluate(transform_path, fixed_labels, moving_labels, label_list, fixed_points, moving_points, json_path, overwrite):
    """Measure a registration the way Learn2Reg does: Dice and HD95 per label (with
    --fixed-labels/--moving-labels), folding (% of voxels with a non-positive Jacobian
    determinant) and the standard deviation of the log-Jacobian, and TRE for landmark pairs
    (with --fixed-points/--moving-points)."""
    import torch

    from .evaluate import dice, hd95, jacobian_stats, tre
    from .image import resample
    from .transforms import read_displacement_field

    if (fixed_labels is None) != (moving_labels is None):
        raise click.UsageError("--fixed-labels and --moving-labels go together")
    if (fixed_points is None) != (moving_points is None):
        raise click.UsageError("--fixed-points and --moving-points go together")
    path = transform_path / "displacement.nii.gz" if transform_path.is_dir() else transform_path
    if not path.exists():
        raise click.UsageError(f"{transform_path} holds no displacement.nii.gz")
    field = read_displacement_field(path, dtype=torch.float64)
    grid = field.grid
    jac = jacobian_stats(field.field.detach()[0].numpy(), grid)
    report = {"transform": str(path), "folding_percent": 100.0 * jac["folding_fraction"],
              "folding_voxels": jac["folding_count"], "log_jacobian_std": jac["log_jacobian_std"],
              "jacobian_min": jac["det_min"], "jacobian_max": jac["det_max"]}
    if fixed_labels is not None:
        fl, ml = _read(fixed_labels), _read(moving_labels)
        for what, img in (("fixed", fl), ("moving", ml)):
            if not img.is_label:
                raise click.ClickException(f"the {what} labels are not an integer label map")
            if img.ndim != grid.ndim:
                raise click.ClickException(f"the {what} labels are {img.ndim}D, the transform is {grid.ndim}D")
        if not fl.grid.same_as(grid, atol=1e-4):
            raise click.ClickException("the fixed labels are not on the transform's (fixed) grid")
        wanted = [int(v) for v in label_list.split(",")] if label_list else None
        with torch.no_grad():
            warped = resample(ml, grid, field, interpolation="nearest")
        a, b = warped.data[0, 0].numpy(), fl.data[0, 0].numpy()
        report["dice"] = {str(k): v for k, v in dice(a, b, labels=wanted).items()}
        report["hd95_mm"] = {str(k): v for k, v in hd95(a, b, grid, labels=wanted).items()}
    if fixed_points is not None:
        fp, mp = _read_points(fixed_points, grid), _read_points(moving_points, None, grid.ndim)
        if fp.shape != mp.shape:
            raise click.ClickException(f"{len(fp)} fixed points but {len(mp)} moving points; they pair by row")
        report["tre_mm"] = tre(field.transform_points(fp), mp)
        report["tre_before_mm"] = tre(fp, mp)
    if json_path is not None:
        json_path = Path(json_path)
        with staged_output(json_path.parent if str(json_path.parent) else Path("."), [json_path.name], overwrite) as st:
            (st / json_path.name).write_text(json.dumps(report, indent=2))
    _print_report(report)


def _print_report(report: dict) -> None:
    rows = [("folding (% of voxels)", f"{report['folding_percent']:.4f}"),
            ("SD of log-Jacobian", f"{report['log_jacobian_std']:.4f}"),
            ("Jacobian min / max", f"{report['jacobian_min']:.3f} / {report['jacobian_max']:.3f}")]
    for label, value in report.get("dice", {}).items():
        rows.append((f"Dice {label}", f"{value:.4f}"))
    for label, value in report.get("hd95_mm", {}).items():
        rows.append((f"HD95 {label} (mm)", f"{value:.3f}"))
    if "tre_mm" in report:
        rows.append(("TRE mean / p95 (mm)", f"{report['tre_mm']['mean']:.3f} / {report['tre_mm']['p95']:.3f}"))
        rows.append(("TRE before (mm)", f"{report['tre_before_mm']['mean']:.3f}"))
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        click.echo(f"{name:<{width}}  {value}")


def _read_points(path: Path, grid, ndim: int | None = None):
    """``[P, D]`` landmarks (mm, LPS) of any format :mod:`airlab.landmarks` reads."""
    from .landmarks import read_points

    return read_points(path, grid=grid, ndim=ndim)


def _out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, (MemoryError, torch.OutOfMemoryError))


def _exit(code: int):
    """``sys.exit`` after a command that finished: the interpreter's last garbage collection at
    exit walks every object torch & co. made, 0.35 s of each `airlab register` (2 cores);
    gc.freeze() leaves them out of it. atexit handlers, flushing and module teardown run as before."""
    gc.freeze()
    sys.exit(code)


def _short_openmp_spin() -> None:
    """Let PyTorch's OpenMP workers spin 10 000 times, not libgomp's default 300 000, before they
    sleep after a parallel operation (unless the user set ``GOMP_SPINCOUNT``). Must run before
    torch is imported. A spinning worker holds a core that ``airlab.compiled``'s loop threads need:
    on 2 threads a finest level's cubic sample took 15 ms instead of 8, and a whole ``c_q95``
    registration of a 2 mm pair 16% more time (docs/architecture.md, "Threads")."""
    import os

    os.environ.setdefault("GOMP_SPINCOUNT", "10000")


def run():  # pragma: no cover - console entry point with friendly errors
    """``airlab``: errors are one line on stderr; exit 2 for usage (and unusable input given
    before any work), 1 for failures; ``--debug`` shows the traceback instead."""
    _short_openmp_spin()
    debug = False
    try:
        with main.make_context("airlab", sys.argv[1:]) as ctx:
            ctx.meta[_CONSOLE] = True
            debug = ctx.params["debug"]
            main.invoke(ctx)
        _exit(0)
    except click.exceptions.Exit as exc:
        _exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(EXIT_FAILURE)
    except click.ClickException as exc:
        if debug:
            raise
        click.echo(f"airlab: error: {exc.format_message()}", err=True)
        sys.exit(EXIT_USAGE if isinstance(exc, click.UsageError) else EXIT_FAILURE)
    except AirlabError as exc:
        if debug:
            raise
        click.echo(f"airlab: error: {' '.join(str(exc).split())}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - one line, no traceback, for users
        if debug:
            raise
        text = " ".join(str(exc).split())
        if _out_of_memory(exc):
            text = f"out of memory ({text or type(exc).__name__}); try --device cpu or smaller images"
        click.echo(f"airlab: error: {text or type(exc).__name__}", err=True)
        sys.exit(EXIT_FAILURE)
