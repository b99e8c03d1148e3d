"""AirLab's demons_registration_2d: diffeomorphic demons (Gaussian fluid and diffusion
regularisation) after an affine registration, on a known deformation of the shipped slice.

    python examples/demons_2d.py [--fast]
"""

import time

import torch
from _common import arguments, moved, quick, report, slice_2d

from airlab.demons import demons
from airlab.pipelines import preset_pipeline
from airlab.registration import Level
from airlab.synthetic import random_deformation
from airlab.workflows import register_pair


def main():
    args = arguments(__doc__)
    fixed = slice_2d()
    moving, truth = moved(fixed, random_deformation(fixed.grid, seed=0, dtype=torch.float64))
    start = time.perf_counter()
    affine = preset_pipeline("affine")
    linear = register_pair(fixed, moving, quick(affine) if args.fast else affine).result.transform
    n = 8 if args.fast else 1
    levels = [Level(4, 4.0, 60 // n), Level(2, 2.0, 40 // n), Level(1, 0.0, 30 // n)]
    result = demons(fixed, moving, levels=levels, initial=linear)
    with torch.no_grad():
        found = result.transform.displacement(fixed.grid)[0]
    report("demons 2D", fixed, found, truth, time.perf_counter() - start)


if __name__ == "__main__":
    main()
