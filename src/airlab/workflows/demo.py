"""``airlab demo``: the shipped MNI152 template registered to a copy deformed by a known, seeded
smooth deformation, scored against the known answer and against SimpleITK's reading of the
written field."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from .pairwise import OUTPUTS, register_pair, write_outputs
from .staging import staged_output

__all__ = ["DEMO_OUTPUTS", "run_demo"]

DEMO_OUTPUTS = ["fixed.nii.gz", "moving.nii.gz"] + OUTPUTS


def run_demo(outdir: Path, *, preset: str = "bspline", seed: int = 0, progress=False,
             overwrite: bool = False) -> dict:
    """Run the demo into ``outdir`` (staged, like ``register``); return its metrics."""
    import SimpleITK as sitk

    from ..datasets import mni152
    from ..evaluate import endpoint_error, jacobian_stats
    from ..image import resample, write_image
    from ..pipelines import preset_pipeline
    from ..synthetic import ground_truth, random_deformation

    start = time.perf_counter()
    fixed, labels = mni152()
    fixed = fixed.to(torch.float32)
    deformation = random_deformation(fixed.grid, seed)
    with torch.no_grad():
        moving = resample(fixed, fixed.grid, deformation, interpolation="bspline")
    truth, _ = ground_truth(deformation, fixed.grid)
    brain = (labels.data[0, 0] > 0).numpy()
    with staged_output(outdir, DEMO_OUTPUTS, overwrite) as stage:
        write_image(fixed, stage / "fixed.nii.gz")
        write_image(moving, stage / "moving.nii.gz")
        out = register_pair(fixed, moving, preset_pipeline(preset), device="cpu", seed=0, progress=progress,
                            preset=preset)
        write_outputs(out, stage, report=False)
        found = out.displacement.field.detach()[0].numpy()
        error = endpoint_error(found, truth.field[0].numpy(), mask=brain)
        # what another tool makes of the exported field
        field = sitk.ReadImage(str(stage / "displacement.nii.gz"), sitk.sitkVectorFloat64)
        by_sitk = sitk.Resample(sitk.ReadImage(str(stage / "moving.nii.gz")), sitk.ReadImage(str(stage / "fixed.nii.gz")),
                                sitk.DisplacementFieldTransform(field), sitk.sitkLinear, 0.0)
        ours = sitk.GetArrayFromImage(sitk.ReadImage(str(stage / "warped.nii.gz")))
        out.metrics.update({
            "command": "demo",
            "deformation_seed": seed,
            "known_displacement_max_mm": float(np.linalg.norm(truth.field[0].numpy(), axis=0).max()),
            "endpoint_error_mm": error,
            "folding_voxels": jacobian_stats(found, fixed.grid)["folding_count"],
            "sitk_vs_airlab_max_abs_difference": float(np.abs(sitk.GetArrayFromImage(by_sitk) - ours)[brain].max()),
            "intensity_range": float(fixed.data.max() - fixed.data.min()),
            "wall_time_s": round(time.perf_counter() - start, 3),
        })
        (stage / "metrics.json").write_text(json.dumps(out.metrics, indent=2))
        from ..report import write_report

        write_report(stage, fixed, moving, out.warped, torch.as_tensor(found), out.result.history, out.metrics,
                     linear=out.result.linear_part())
    return out.metrics
