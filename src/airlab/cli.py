"""The ``airlab`` command."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import click

EXIT_FAILURE, EXIT_USAGE = 1, 2


class OutputExists(click.UsageError):
    pass


@contextmanager
def staged_output(outdir: Path, names: list[str], overwrite: bool):
    """Write into a temporary folder beside ``outdir`` and move the files into place only when
    everything succeeded; never touch a file of the user's unless ``overwrite`` and it is one of
    ``names``."""
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise click.UsageError(f"output {outdir} exists and is not a folder")
    clashes = [n for n in names if (outdir / n).exists()]
    if clashes and not overwrite:
        raise OutputExists(f"{outdir} already holds {', '.join(clashes)}; pass --overwrite to replace them")
    parent = outdir.parent if outdir.parent.exists() else Path(tempfile.gettempdir())
    stage = Path(tempfile.mkdtemp(prefix=".airlab-", dir=parent))
    try:
        yield stage
        outdir.mkdir(parents=True, exist_ok=True)
        for name in names:
            if (stage / name).exists():
                shutil.move(str(stage / name), str(outdir / name))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="airlab")
def main():
    """airlab: image registration in physical space on PyTorch."""


DEMO_OUTPUTS = ["fixed.nii.gz", "moving.nii.gz", "warped.nii.gz", "displacement.nii.gz", "affine.txt", "metrics.json"]


@main.command()
@click.option("-o", "--output", "outdir", type=click.Path(path_type=Path), default=Path("airlab-demo"),
              show_default=True, help="Folder for the results.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the known deformation.")
@click.option("--overwrite", is_flag=True, help="Replace earlier demo outputs in the folder.")
def demo(outdir: Path, seed: int, overwrite: bool):
    """Warp the shipped MNI152 template (2 mm) by a known deformation, export the exact inverse
    in ITK formats and check with SimpleITK that the exports reproduce airlab's resampling.

    Writes fixed.nii.gz, moving.nii.gz (the template deformed), warped.nii.gz (moving brought
    back onto fixed by the known inverse), displacement.nii.gz (that inverse as an ITK
    displacement field), affine.txt (its linear part) and metrics.json.
    """
    import numpy as np
    import SimpleITK as sitk
    import torch

    from . import resample, write_image
    from .datasets import mni152
    from .synthetic import ground_truth, random_deformation
    from .transforms import write_displacement_field, write_transform

    torch.set_grad_enabled(False)
    start = time.perf_counter()
    fixed, labels = mni152()
    fixed = fixed.to(torch.float32)
    deformation = random_deformation(fixed.grid, seed)
    moving = resample(fixed, fixed.grid, deformation, interpolation="bspline")
    truth, residual = ground_truth(deformation, fixed.grid)
    warped = resample(moving, fixed.grid, truth)
    brain = labels.data[0, 0] > 0
    with staged_output(outdir, DEMO_OUTPUTS, overwrite) as stage:
        write_image(fixed, stage / "fixed.nii.gz")
        write_image(moving, stage / "moving.nii.gz")
        write_image(warped, stage / "warped.nii.gz")
        write_displacement_field(truth, fixed.grid, stage / "displacement.nii.gz")
        write_transform(deformation[1].inverse(), stage / "affine.txt")
        # what another tool makes of the exported field
        field = sitk.ReadImage(str(stage / "displacement.nii.gz"), sitk.sitkVectorFloat64)
        by_sitk = sitk.Resample(sitk.ReadImage(str(stage / "moving.nii.gz")), sitk.ReadImage(str(stage / "fixed.nii.gz")),
                                sitk.DisplacementFieldTransform(field), sitk.sitkLinear, 0.0)
        diff = np.abs(sitk.GetArrayFromImage(by_sitk) - warped.data[0, 0].numpy())
        recovered = np.abs(warped.data[0, 0] - fixed.data[0, 0]).numpy()
        metrics = {
            "command": "demo",
            "seed": seed,
            "grid": {"size": fixed.grid.size, "spacing": fixed.grid.spacing},
            "max_displacement_mm": float(truth.field.norm(dim=1).max()),
            "inverse_residual_in_brain_mm": float(residual[0][brain].max()),
            "sitk_vs_airlab_max_abs_difference": float(diff.max()),
            "warped_vs_fixed_mean_abs_difference_in_brain": float(recovered[brain.numpy()].mean()),
            "intensity_range": float(fixed.data.max() - fixed.data.min()),
            "wall_time_s": round(time.perf_counter() - start, 3),
        }
        (stage / "metrics.json").write_text(json.dumps(metrics, indent=2))
    click.echo(f"airlab demo: results in {outdir}/")
    click.echo(f"  known deformation: up to {metrics['max_displacement_mm']:.2f} mm; "
               f"its inverse is exact to {metrics['inverse_residual_in_brain_mm']:.1e} mm in the brain")
    click.echo(f"  SimpleITK resampling with displacement.nii.gz vs airlab: max difference "
               f"{metrics['sitk_vs_airlab_max_abs_difference']:.2e} (intensity range {metrics['intensity_range']:.0f})")
    click.echo(f"  warped vs fixed in the brain: mean |difference| {metrics['warped_vs_fixed_mean_abs_difference_in_brain']:.2f}")
    click.echo(f"  wall time {metrics['wall_time_s']:.1f} s")


def run():  # pragma: no cover - console entry point with friendly errors
    try:
        code = main(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        click.echo(f"airlab: error: {exc.format_message()}", err=True)
        sys.exit(EXIT_USAGE)
    except click.exceptions.Abort:
        sys.exit(EXIT_FAILURE)
    except Exception as exc:  # noqa: BLE001 - one line, no traceback, for users
        click.echo(f"airlab: error: {exc}", err=True)
        sys.exit(EXIT_FAILURE)
