"""Wendland kernel pipelines beside the B-spline preset on issue 3's 2D and 2 mm cases (seed 1),
for docs/benchmarks.md (issue 16).

    python benchmarks/wendland.py

Same cases and measures as accuracy.py (errors in mm inside grey and white matter for 2 mm,
inside the head for the slice, which ships without labels).
"""

import copy
import sys
from pathlib import Path

import torch

import airlab as al
from airlab.datasets import example_path, mni152
from airlab.pipelines import load_config

sys.path.insert(0, str(Path(__file__).parent))
from accuracy import measure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def diffeomorphic(config):
    stages = list(config.stages)
    stages[-1] = stages[-1].model_copy(update={"diffeomorphic": True})
    return config.model_copy(update={"stages": stages})


def main():
    slice_2d = al.read_image(example_path("mni152_t1_1mm_axial")).to(torch.float32)
    t1, labels = mni152()
    cases = [("2d", slice_2d, None, load_config(ROOT / "examples" / "kernel_2d.yaml")),
             ("mni2", t1.to(torch.float32), labels, load_config(ROOT / "benchmarks" / "configs" / "wendland_3d.yaml"))]
    print("| case | pipeline | time s | mean EPE mm | p95 EPE mm | folding voxels |")
    print("|---|---|---|---|---|---|")
    for name, fixed, lab, config in cases:
        for label, pipeline in (("bspline preset", "bspline"), ("wendland C4", config),
                                ("wendland C4, diffeomorphic", diffeomorphic(copy.deepcopy(config)))):
            row = measure(pipeline, fixed, lab, 1)
            print(f"| {name} | {label} | {row['seconds']:.1f} | {row['mean']:.3f} | {row['p95']:.3f} | "
                  f"{row['folding']} |", flush=True)


if __name__ == "__main__":
    main()
