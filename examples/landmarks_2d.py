"""Landmarks in the objective (AirLab had point sets only for evaluation): an affine
registration of the shipped slice to a smoothly deformed copy, without and with 12 paired
landmarks (a Slicer .fcsv and an elastix .pts, written and read back); prints the TRE at the
landmarks and at 12 other points.

    python examples/landmarks_2d.py [--fast]
"""

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import arguments, quick, slice_2d

import airlab as al
from airlab.evaluate import tre
from airlab.landmarks import read_points, write_points
from airlab.pipelines import preset_pipeline
from airlab.synthetic import random_deformation


def main():
    args = arguments(__doc__)
    fixed = slice_2d()
    deformation = random_deformation(fixed.grid, seed=3, max_displacement=10.0, control_points=5, dtype=torch.float64)
    with torch.no_grad():
        moving = al.resample(fixed, fixed.grid, deformation.float(), interpolation="bspline")
    rng = np.random.default_rng(0)
    points = fixed.grid.center() + rng.uniform(-0.3, 0.3, size=(24, 2)) * fixed.grid.extent()
    # moving(x) = fixed(D(x)), so the moving point of a fixed point p is D^-1(p)
    targets = deformation.inverse_points(torch.as_tensor(points)[None])[0][0].numpy()
    folder = Path(tempfile.mkdtemp())
    write_points(folder / "fixed.fcsv", np.c_[points[:12], np.zeros(12)])  # Slicer's points are 3D
    write_points(folder / "moving.pts", targets[:12])
    pipeline = quick(preset_pipeline("affine")) if args.fast else preset_pipeline("affine")
    for weight in (0.0, 0.01, 1.0):  # none, the default, strong
        start = time.perf_counter()
        result = al.register(fixed, moving, config=pipeline, fixed_points=folder / "fixed.fcsv",
                             moving_points=read_points(folder / "moving.pts"), landmark_weight=weight)
        mapped = result.transform.transform_points(points)
        print(f"affine, landmark weight {weight}: TRE {tre(mapped[:12], targets[:12])['mean']:.3f} mm at the "
              f"landmarks, {tre(mapped[12:], targets[12:])['mean']:.3f} mm elsewhere (before "
              f"{tre(points, targets)['mean']:.3f} mm), {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
