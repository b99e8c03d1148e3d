"""Template building on a group with a known mean shape (issue 15), as a markdown table.

    python benchmarks/template.py [--images 8] [--iterations 4] [--out DIR]

The group: the shipped 2 mm MNI152 template warped by N seeded smooth deformations ``D_i``
(``benchmarks/accuracy.py``'s construction: seeds 1..N, a cubic B-spline with 6 control points
per axis up to 7 mm, rotation up to 4 degrees, translation up to 4 mm), image ``i`` being
``MNI o D_i``. With ``v_i`` the exact inverse of ``D_i`` (``synthetic.ground_truth``), the
template in the middle of the group sees the MNI anatomy through ``G = (id + mean_i v_i)^-1``
(the transforms from such a template to the images average to the identity); the true mean
shape image is ``MNI o G``.

A template's position error: every image registered to it (``airlab template``'s default ``smooth`` preset, called
``diffeomorphic`` before 2026-12-07) gives
``T_i`` (template point -> image point), so ``D_i o T_i`` says where the template's points are
in the MNI anatomy; the endpoint error is ``|mean_i D_i(T_i(x)) - G(x)|`` (mm) over the brain
(grey and white matter labels carried through ``G``). For the final template the ``T_i`` are
the files in ``OUTDIR/images/``; for iteration 0 (the affine-aligned average, centred) the
registrations of iteration 1; for the plain affine average (every image affinely registered to
image 1 and averaged, not centred: ``A = template_00 o M0`` with ``M0`` the mean affine
transform) the same composed with ``M0``. Sharpness: mean gradient magnitude over the same brain
mask, against the original MNI template's. Intensity RMSE against the true mean shape image.
Times are process CPU time of this process (the machine is shared: wall times are not
comparable) and the run's wall time.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import airlab as al
from airlab.datasets import mni152
from airlab.groupwise import RunningMean, sharpen, sharpness
from airlab.synthetic import ground_truth, random_deformation
from airlab.template import TemplateProgress, build
from airlab.workflows.template import _average
from airlab.transforms import DisplacementField, invert_displacement, read_displacement_field


def group(out: Path, n: int):
    fixed, labels = mni152()
    fixed = fixed.to(torch.float32)
    grid = fixed.grid
    deformations, paths, mean_inverse = [], [], RunningMean()
    for seed in range(1, n + 1):
        d = random_deformation(grid, seed)
        with torch.no_grad():
            al.write_image(al.resample(fixed, grid, d, interpolation="bspline"), out / f"mni_def{seed}.nii.gz")
            truth, _ = ground_truth(d, grid)
            mean_inverse.add(truth.field.detach().double())
        deformations.append(d.double())
        paths.append(out / f"mni_def{seed}.nii.gz")
    with torch.no_grad():
        w, residual = invert_displacement(mean_inverse.mean, grid)
        g_true = DisplacementField(grid, 1, w).requires_grad_(False)
        true_mean = al.resample(fixed.to(torch.float64), grid, g_true, interpolation="bspline")
        brain = al.resample(labels, grid, g_true, interpolation="nearest").data[0, 0] > 0
    points = grid.points(torch.float64)
    return fixed, grid, deformations, paths, points + torch.movedim(w, 1, -1), true_mean, brain


def where_in_mni(folder: Path, names, deformations, points, before=None):
    """``mean_i D_i(T_i(x))`` from the registrations in ``folder`` (``before``: points to map
    first, ``[1, *shape, D]``, for the transforms of a moved template)."""
    total = 0
    for name, d in zip(names, deformations):
        t = read_displacement_field(folder / name / "displacement.nii.gz", dtype=torch.float64).requires_grad_(False)
        with torch.no_grad():
            total = total + d(t(points if before is None else before))
    return total / len(names)


def mean_field(folder: Path, names):
    mean = RunningMean()
    for name in names:
        mean.add(read_displacement_field(folder / name / "displacement.nii.gz", dtype=torch.float64).field.detach())
    return mean.mean


def epe(mapped, g_true, brain):
    err = (mapped - g_true).norm(dim=-1)[0][brain].numpy()
    return float(err.mean()), float(np.percentile(err, 95))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None, help="keep the run here (default: a temporary folder)")
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="airlab-template-bench-")
    out = args.out or Path(tmp.name)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "group"
    data.mkdir(exist_ok=True)
    fixed, grid, deformations, paths, g_true, true_mean, brain = group(data, args.images)
    names = [p.name.split(".")[0] for p in paths]
    cpu, wall = time.process_time(), time.perf_counter()
    build(paths, out / "template", iterations=args.iterations, keep_work=True, overwrite=True,
          progress=TemplateProgress(bar=False))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    run = out / "template"
    work = run / ".airlab-template-work"

    def image_row(image):
        rmse = float((image.data[0, 0].double() - true_mean.data[0, 0])[brain].pow(2).mean().sqrt())
        return sharpness(image, brain), rmse

    reference = sharpness(fixed, brain)
    rows = []
    # the plain affine average: image 1's affine frame, not centred
    m0 = mean_field(work / "iter_00", names)
    before = grid.points(torch.float64) + torch.movedim(m0, 1, -1)
    state = json.loads((run / "iterations" / "run.json").read_text(encoding="utf-8"))
    plain, _, _ = _average(names, paths, work / "iter_00", [grid] * len(paths), state["scales"], brain)
    rows.append(("plain affine average (to image 1)",
                 epe(where_in_mni(work / "iter_01", names, deformations, grid.points(torch.float64), before),
                     g_true, brain), *image_row(plain)))
    for k in range(args.iterations + 1):
        tk = al.read_image(run / "iterations" / f"template_{k:02d}.nii.gz")
        folder = work / f"iter_{k + 1:02d}" if k < args.iterations else run / "images"
        label = "iteration 0: affine average, centred" if k == 0 else f"iteration {k}"
        rows.append((label + (" (template.nii.gz)" if k == args.iterations else ""),
                     epe(where_in_mni(folder, names, deformations, grid.points(torch.float64)), g_true, brain),
                     *image_row(tk)))
    # unsharp masking moves no edge (the EPE stays), only the sharpness and the intensities
    final = al.read_image(run / "template.nii.gz")
    for amount in (0.25, 0.5):
        rows.append((f"template.nii.gz sharpened after the run (--sharpen {amount} on the last average)",
                     rows[-1][1], *image_row(sharpen(final, amount))))
    truth_sharp = sharpness(true_mean, brain)
    print(f"airlab {al.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.images} images, {args.iterations} iterations, smooth preset\n")
    print("| template | mean EPE from true mean mm | p95 EPE mm | intensity RMSE vs true mean | sharpness | "
          "sharpness / original MNI |")
    print("|---|---|---|---|---|---|")
    for label, (mean, p95), sharp, rmse in rows:
        print(f"| {label} | {mean:.3f} | {p95:.3f} | {rmse:.1f} | {sharp:.2f} | {sharp / reference:.3f} |")
    print(f"| true mean shape (MNI o G) | 0 | 0 | 0 | {truth_sharp:.2f} | {truth_sharp / reference:.3f} |")
    print(f"| original MNI template | | | | {reference:.2f} | 1.000 |")
    registrations = args.images * (args.iterations + 2)
    print(f"\n{registrations} registrations ({args.images} affine, the rest smooth): "
          f"{cpu:.0f} s process CPU time, {wall:.0f} s wall; peak resident memory "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
