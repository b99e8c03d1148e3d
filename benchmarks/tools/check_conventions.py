"""Check each tool's displacement.nii.gz convention on an easy case with a known answer.

    python benchmarks/tools/check_conventions.py [--tools airlab,elastix,ants,fireants]

Moving is the shipped 1 mm axial slice (direction diag(-1, -1): LPS, so a sign slip in a
component shows) translated so that moving(y) = fixed(y + s) with s = (6, -4) mm; every fixed
point x then maps to the moving point x - s, and the right displacement field is -s = (-6, 4) mm
everywhere. For each tool this prints the median displacement in the brain (should be about
(-6, 4)), the share of brain pixels within 1 mm of it, and how far the tool's own warped.nii.gz
is from SimpleITK resampling the moving image with displacement.nii.gz (about 0 when the field is
the transform the tool applied; SimpleITK reads it as an ITK displacement field).
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

import airlab as al
from airlab.datasets import example_path
from airlab.transforms import Translation

HERE = Path(__file__).resolve().parent
SHIFT = np.array([6.0, -4.0])


def command(tool, fixed, moving, out):
    if tool == "airlab":
        exe = Path(sys.executable).with_name("airlab")
        airlab = [str(exe)] if exe.exists() else [sys.executable, "-m", "airlab"]
        return airlab + ["register", str(fixed), str(moving), "-o", str(out), "--preset", "diffeomorphic", "--quiet",
                         "--device", "cpu"]
    return [sys.executable, str(HERE / f"run_{tool}.py"), str(fixed), str(moving), str(out), "--device", "cpu"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tools", default="airlab,elastix,ants,fireants")
    args = parser.parse_args()
    image = al.read_image(example_path("mni152_t1_1mm_axial")).to(torch.float32)
    with torch.no_grad():
        moving = al.resample(image, image.grid, Translation(2, translation=SHIFT.tolist()), interpolation="bspline")
    brain = image.data[0, 0].numpy() > 20
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        al.write_image(image, tmp / "fixed.nii.gz")
        al.write_image(moving, tmp / "moving.nii.gz")
        for tool in args.tools.split(","):
            out = tmp / tool
            done = subprocess.run(command(tool, tmp / "fixed.nii.gz", tmp / "moving.nii.gz", out),
                                  capture_output=True, text=True)
            if done.returncode:
                print(f"{tool:9s} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
                continue
            field = sitk.ReadImage(str(out / "displacement.nii.gz"), sitk.sitkVectorFloat64)
            same_grid = (field.GetSize() == (197, 233) and np.allclose(field.GetOrigin(), image.grid.origin)
                         and np.allclose(field.GetDirection(), image.grid.direction))
            d = sitk.GetArrayFromImage(field)[brain]  # [P, 2], components x, y (LPS)
            median = np.median(d, axis=0)
            within = np.mean(np.linalg.norm(d + SHIFT, axis=1) < 1.0)
            reference = sitk.ReadImage(str(tmp / "fixed.nii.gz"), sitk.sitkFloat32)
            # DisplacementFieldTransform takes over the image's buffer: give it a copy
            transform = sitk.DisplacementFieldTransform(sitk.Image(field))
            # elastix writes its result image with cubic B-spline interpolation, the others linear
            interpolator = sitk.sitkBSpline if tool == "elastix" else sitk.sitkLinear
            by_sitk = sitk.Resample(sitk.ReadImage(str(tmp / "moving.nii.gz"), sitk.sitkFloat32), reference,
                                    transform, interpolator, 0.0)
            own = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz"), sitk.sitkFloat32))
            gap = np.abs(sitk.GetArrayFromImage(by_sitk) - own)[brain]
            print(f"{tool:9s} on fixed grid: {same_grid}; median displacement ({median[0]:+.3f}, {median[1]:+.3f}) mm "
                  f"(expected ({-SHIFT[0]:+.0f}, {-SHIFT[1]:+.0f})); within 1 mm: {100 * within:.1f}% of the brain; "
                  f"own warped vs SimpleITK with the field: mean {gap.mean():.3g}, max {gap.max():.3g} "
                  f"(intensity range {float(image.data.max()):.0f})")


if __name__ == "__main__":
    main()
