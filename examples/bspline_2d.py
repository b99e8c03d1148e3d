"""A cubic B-spline free-form deformation (AirLab's BsplineTransformation) recovering a known
smooth deformation of the shipped slice: the ``bspline`` preset (rigid, affine, B-spline with
mutual information and bending energy, control points refined at every level).

    python examples/bspline_2d.py [--fast]
"""

import time

import torch
from _common import arguments, moved, quick, report, slice_2d

from airlab.pipelines import preset_pipeline
from airlab.synthetic import random_deformation
from airlab.workflows import register_pair


def main():
    args = arguments(__doc__)
    fixed = slice_2d()
    moving, truth = moved(fixed, random_deformation(fixed.grid, seed=0, dtype=torch.float64))
    pipeline = preset_pipeline("bspline")
    start = time.perf_counter()
    out = register_pair(fixed, moving, quick(pipeline) if args.fast else pipeline)
    report("B-spline 2D", fixed, out.displacement.field[0], truth, time.perf_counter() - start)


if __name__ == "__main__":
    main()
