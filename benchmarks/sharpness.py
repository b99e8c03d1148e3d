"""The sharpness of the fixed and the moving image at each level of a stage's pyramid, and the
Gaussian sigma that would match them (airlab.sharpness; docs/architecture.md, "Sharpness matching").

    python benchmarks/sharpness.py [CONFIG.yaml] --case synth,colin-mni-2mm-rev,colin27-mni2,coronal-2d,ratlung-2d \
        [--stage -1] [--erode 3] [--threads 1]

``synth`` is ``accuracy.py``'s 2 mm MNI case, seed 1 (the moving image a deformed copy of the
fixed one); the other names are ``real_cases.py``'s. The images are prepared as the engine
prepares them (intensities normalised, the stage's levels smoothed and downsampled). Measures only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def pair(name: str):
    import airlab as al

    if name == "synth":
        import accuracy
        from airlab.datasets import mni152

        fixed, labels = mni152()
        _, moving, _ = accuracy.case(fixed, labels, 1)
        return fixed.to(torch.float32), moving.to(torch.float32)
    import real_cases as rc

    case = rc.build_real_case(name, log=lambda *a: None)
    return al.read_image(str(case.fixed)).to(torch.float32), al.read_image(str(case.moving)).to(torch.float32)


def main():
    from airlab.inputs import prepare_pair
    from airlab.pipelines import load_config
    from airlab.pyramid import Pyramid
    from airlab.sharpness import ERODE_VOXELS, match_sharpness

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(HERE / "configs" / "intersubject_cubic.yaml"))
    parser.add_argument("--case", default="synth,colin-mni-2mm-rev,colin27-mni2,coronal-2d,ratlung-2d")
    parser.add_argument("--stage", type=int, default=-1, help="which stage's levels (default: the last)")
    parser.add_argument("--erode", type=int, default=None, help="voxels the foreground is eroded by "
                        "(default: airlab.sharpness.ERODE_VOXELS, what the stage option uses)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    for name in args.case.split(","):
        fixed, moving = pair(name)
        p = prepare_pair(fixed, moving)
        pyramid = Pyramid(p.fixed, fixed.grid, p.fixed_mask, p.moving, moving.grid, p.moving_mask)
        for level in config.build(fixed.grid)[args.stage].levels:
            data = pyramid[level]
            _, _, (match,) = match_sharpness(data.fixed, data.grid, data.fixed_weight, data.moving, data.moving_grid,
                                             data.moving_mask, erode=args.erode or ERODE_VOXELS)
            grid = data.moving_grid if match.smoothed == "moving" else data.grid
            voxel = sum(grid.spacing) / grid.ndim
            print(json.dumps({"case": name, "shrink": level.shrink, "level_sigma_mm": level.sigma,
                              "fixed_spacing": [round(s, 3) for s in data.grid.spacing],
                              "moving_spacing": [round(s, 3) for s in data.moving_grid.spacing]}
                             | match.as_dict() | {"sigma_voxels": round(match.sigma_mm / voxel, 3),
                                                  "ratio": round(match.moving / match.fixed, 4)}), flush=True)


if __name__ == "__main__":
    main()
