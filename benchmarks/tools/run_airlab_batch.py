"""airlab's batched Python API: one process registers FIXED with N MOVING images at once.

    python run_airlab_batch.py FIXED OUTDIR MOVING [MOVING ...] [--preset P] [--metric M] [--device D]

The moving images (all on one grid) are stacked along the batch dimension and registered in a
single ``Registration(...)(fixed, moving)`` call; pair i's results go to OUTDIR/pair{i}/
(displacement.nii.gz, warped.nii.gz), the same files ``airlab register`` writes.
"""

import argparse
from pathlib import Path

import torch

import airlab as al
from airlab.pipelines import preset
from airlab.registration import Registration
from airlab.transforms import write_displacement_field


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("fixed")
    parser.add_argument("outdir", type=Path)
    parser.add_argument("moving", nargs="+")
    parser.add_argument("--preset", default="diffeomorphic")
    parser.add_argument("--metric", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    fixed = al.read_image(args.fixed).to(torch.float32)
    movings = [al.read_image(m).to(torch.float32) for m in args.moving]
    if any(not m.grid.same_as(movings[0].grid) for m in movings):
        raise SystemExit("run_airlab_batch: the moving images must share one grid")
    moving = al.Image(torch.cat([m.data for m in movings]), movings[0].grid)
    result = Registration(preset(args.preset, fixed.grid, metric=args.metric), progress=False)(
        fixed, moving, device=args.device)
    transform = result.transform.to("cpu")
    with torch.no_grad():
        warped = al.resample(moving, fixed.grid, transform)
    for i in range(len(movings)):
        out = args.outdir / f"pair{i}"
        out.mkdir(parents=True, exist_ok=True)
        write_displacement_field(transform, fixed.grid, out / "displacement.nii.gz", index=i)
        al.write_image(al.Image(warped.data[i:i + 1], fixed.grid), out / "warped.nii.gz")


if __name__ == "__main__":
    main()
