"""AirLab's diffeomorphic_bspline_2d: a B-spline velocity field exponentiated by scaling and
squaring (the ``smooth`` preset, which was ``diffeomorphic`` until 2026-12-07), so the result cannot fold; prints the error and the
number of folded pixels.

    python examples/diffeomorphic_2d.py [--fast]
"""

import time

import torch
from _common import arguments, moved, quick, report, slice_2d

from airlab.evaluate import jacobian_stats
from airlab.pipelines import preset_pipeline
from airlab.synthetic import random_deformation
from airlab.workflows import register_pair


def main():
    args = arguments(__doc__)
    fixed = slice_2d()
    moving, truth = moved(fixed, random_deformation(fixed.grid, seed=1, max_displacement=10.0, dtype=torch.float64))
    pipeline = preset_pipeline("smooth")
    start = time.perf_counter()
    out = register_pair(fixed, moving, quick(pipeline) if args.fast else pipeline)
    found = out.displacement.field[0]
    report("diffeomorphic 2D", fixed, found, truth, time.perf_counter() - start)
    folded = jacobian_stats(found.detach().numpy(), fixed.grid)["folding_count"]
    print(f"folded pixels: {folded}; inverse consistency {out.metrics['inverse_consistency_mm']['mean']:.4f} mm")


if __name__ == "__main__":
    main()
