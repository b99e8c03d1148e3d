"""Accuracy of the presets on issue 3's cases, as a markdown table.

    python benchmarks/accuracy.py [--quick] [--config FILE ...]

``--config`` adds rows for YAML pipelines (airlab's ``--config`` schema) on every case, beside
the presets, so that a pipeline tuned elsewhere (benchmarks/configs/, the real-anatomy case)
is checked against the known deformations too.

Fixed: the shipped 2 mm MNI152 template (and its 1 mm axial slice for 2D). Moving: the template
warped by a seeded smooth deformation (cubic B-spline, 6 control points per axis, up to 7 mm;
rotation up to 4 degrees; translation up to 4 mm). Truth: the exact inverse. Errors in mm inside
grey and white matter. Same construction as tests/test_registration.py.
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import airlab as al
from airlab.datasets import example_path, mni152
from airlab.evaluate import dice, endpoint_error, jacobian_stats
from airlab.pipelines import PipelineConfig, load_config, preset
from airlab.registration import Registration
from airlab.synthetic import ground_truth, invert_grey_white, random_deformation


def case(fixed, labels, seed, contrast=False):
    deformation = random_deformation(fixed.grid, seed)
    with torch.no_grad():
        moving = al.resample(fixed, fixed.grid, deformation, interpolation="bspline")
    if contrast:
        f, lab = fixed.data[0, 0], labels.data[0, 0]
        moving = al.Image(invert_grey_white(moving.data, float(f[lab == 1].median()), float(f[lab == 2].median())),
                          moving.grid)
    truth, _ = ground_truth(deformation, fixed.grid)
    return deformation, moving, truth


def measure(name, fixed, labels, seed, metric=None, contrast=False, history=None):
    """One case's errors; ``history`` (a list), when given, receives the registration's history."""
    deformation, moving, truth = case(fixed, labels, seed, contrast)
    start = time.perf_counter()
    if isinstance(name, PipelineConfig):
        registration = Registration(name.build(fixed.grid), progress=False, **name.registration_options())
    else:
        registration = Registration(preset(name, fixed.grid, metric=metric), progress=False)
    result = registration(fixed, moving)
    seconds = time.perf_counter() - start
    if history is not None:
        history.extend(result.history)
    brain = (labels.data[0, 0] > 0).numpy() if labels is not None else (fixed.data[0, 0] > 20).numpy()
    with torch.no_grad():
        est = result.transform.displacement(fixed.grid)[0].numpy()
    err = endpoint_error(est, truth.field[0].numpy(), mask=brain)
    row = {"mean": err["mean"], "p95": err["p95"], "folding": jacobian_stats(est, fixed.grid)["folding_count"],
           "seconds": seconds, "gm_dice": float("nan")}
    if labels is not None:
        with torch.no_grad():
            moved = al.resample(labels, labels.grid, deformation, interpolation="label")
            back = result.warp(moved, interpolation="label")
        row["gm_dice"] = dice(back.data[0, 0], labels.data[0, 0], labels=[1])[1]
    return row


def truth_dice(fixed, labels, seed):
    """Grey-matter Dice when the *exact* inverse brings the moving labels back: the ceiling the
    label transfer itself allows at 2 mm, for nearest and for label interpolation."""
    deformation, _, truth = case(fixed, labels, seed)
    out = {}
    with torch.no_grad():
        for mode in ("nearest", "label"):
            moved = al.resample(labels, labels.grid, deformation, interpolation=mode)
            back = al.resample(moved, labels.grid, truth, interpolation=mode)
            out[mode] = dice(back.data[0, 0], labels.data[0, 0], labels=[1])[1]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed per case instead of three")
    parser.add_argument("--config", nargs="*", default=[], help="YAML pipelines to measure on the cases too")
    parser.add_argument("--only-configs", action="store_true", help="skip the presets' rows")
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    fixed, labels = mni152()
    fixed = fixed.to(torch.float32)
    axial = al.read_image(example_path("mni152_t1_1mm_axial")).to(torch.float32)
    seeds = [1] if args.quick else [1, 2, 3]
    cases = [
        ("MNI 2 mm", "diffeomorphic", fixed, labels, None, False),
        ("MNI 2 mm", "smooth", fixed, labels, None, False),
        ("MNI 2 mm", "bspline", fixed, labels, None, False),
        ("MNI 2 mm, grey/white inverted", "bspline", fixed, labels, "mi", True),
        ("MNI 2 mm, grey/white inverted", "diffeomorphic", fixed, labels, "mi", True),
        ("MNI 2 mm, grey/white inverted", "smooth", fixed, labels, "mi", True),
        ("axial slice 1 mm", "diffeomorphic", axial, None, None, False),
        ("axial slice 1 mm", "smooth", axial, None, None, False),
        ("axial slice 1 mm", "bspline", axial, None, None, False),
    ]
    if args.only_configs:
        cases = []
    names = {}
    for path in args.config:
        pipeline = load_config(path)
        names[id(pipeline)] = Path(path).stem
        cases += [("MNI 2 mm", pipeline, fixed, labels, None, False),
                  ("MNI 2 mm, grey/white inverted", pipeline, fixed, labels, None, True),
                  ("axial slice 1 mm", pipeline, axial, None, None, False)]
    print(f"airlab {al.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, seeds {seeds}\n")
    print("| case | preset | mean EPE mm | p95 EPE mm | GM Dice | folding voxels | time s |")
    print("|---|---|---|---|---|---|---|")
    for label, name, f, lab, metric, contrast in cases:
        rows = [measure(name, f, lab, s, metric, contrast) for s in seeds]
        avg = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        shown = name if isinstance(name, str) else names[id(name)]
        print(f"| {label} | {shown} | {avg['mean']:.3f} | {avg['p95']:.3f} | {avg['gm_dice']:.3f} | "
              f"{int(sum(r['folding'] for r in rows))} | {avg['seconds']:.1f} |", flush=True)
    ceiling = [truth_dice(fixed, labels, s) for s in seeds]
    print("\nGM Dice with the exact inverse (the ceiling of the label transfer): "
          + ", ".join(f"{mode} {np.mean([c[mode] for c in ceiling]):.3f}" for mode in ("nearest", "label")))


if __name__ == "__main__":
    main()
