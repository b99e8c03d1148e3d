"""AirLab's kernel_registration_2d with Wendland kernels: compactly supported radial kernels
(C4) on a lattice every 8 mm reaching 16 mm, after rigid and affine stages; ``--diffeomorphic``
exponentiates the kernel field as a velocity. The pipeline is the YAML one of
``kernel_2d.yaml`` beside this file (``airlab register F M -o out --config kernel_2d.yaml``).

    python examples/kernel_2d.py [--fast] [--diffeomorphic]
"""

import sys
import time
from pathlib import Path

import torch
from _common import moved, quick, report, slice_2d

from airlab.pipelines import load_config
from airlab.synthetic import random_deformation
from airlab.workflows import register_pair


def main():
    fast, diffeomorphic = "--fast" in sys.argv, "--diffeomorphic" in sys.argv
    fixed = slice_2d()
    moving, truth = moved(fixed, random_deformation(fixed.grid, seed=0, dtype=torch.float64))
    pipeline = load_config(Path(__file__).with_name("kernel_2d.yaml"))
    if diffeomorphic:
        stages = list(pipeline.stages)
        stages[-1] = stages[-1].model_copy(update={"diffeomorphic": True})
        pipeline = pipeline.model_copy(update={"stages": stages})
    start = time.perf_counter()
    out = register_pair(fixed, moving, quick(pipeline) if fast else pipeline)
    name = "Wendland velocity 2D" if diffeomorphic else "Wendland 2D"
    report(name, fixed, out.displacement.field[0], truth, time.perf_counter() - start)


if __name__ == "__main__":
    main()
