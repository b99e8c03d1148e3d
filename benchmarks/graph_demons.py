"""Demons with Gaussian and with graph-diffusion regularisation on issue 3's 2 mm case (seed 1),
after the affine preset's stages, for docs/benchmarks.md (issue 16).

    python benchmarks/graph_demons.py
"""

import time

import torch

import airlab as al
from airlab.datasets import mni152
from airlab.demons import demons
from airlab.evaluate import endpoint_error, jacobian_stats
from airlab.pipelines import preset
from airlab.registration import Registration
from airlab.synthetic import ground_truth, random_deformation


def main():
    fixed, labels = mni152()
    fixed = fixed.to(torch.float32)
    deformation = random_deformation(fixed.grid, 1)
    with torch.no_grad():
        moving = al.resample(fixed, fixed.grid, deformation, interpolation="bspline")
    truth, _ = ground_truth(deformation, fixed.grid)
    brain = (labels.data[0, 0] > 0).numpy()
    affine = Registration(preset("affine", fixed.grid), progress=False)(fixed, moving)
    print("| case | demons regulariser | time s | mean EPE mm | p95 EPE mm | folding voxels |")
    print("|---|---|---|---|---|---|")
    for kind, scale in (("gaussian", None), ("graph", 3.0), ("graph", 10.0)):
        start = time.perf_counter()
        result = demons(fixed, moving, initial=affine.transform, regulariser=kind, edge_scale=scale or 10.0)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            found = result.transform.displacement(fixed.grid)[0].numpy()
        err = endpoint_error(found, truth.field[0].numpy(), mask=brain)
        name = kind if scale is None else f"{kind}, edge_scale {scale:g}"
        print(f"| mni2 | {name} | {seconds:.1f} | {err['mean']:.3f} | {err['p95']:.3f} | "
              f"{jacobian_stats(found, fixed.grid)['folding_count']} |", flush=True)


if __name__ == "__main__":
    main()
