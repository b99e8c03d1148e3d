"""A template of real, different brains: airlab template against ants.build_template (issue 15).

    python benchmarks/template_real.py [--out DIR] [--iterations 4] [--ants-iterations 3]

The group of 6 (``benchmarks/real_cases.py``'s case, built from packages): the MNI152 2009a T1
at 2 mm (skull-stripped), Colin27 (2 mm, its header turned 10 degrees and shifted 12 mm), and
two copies of each deformed by seeded smooth deformations (``synthetic.random_deformation``
seeds 1-4 on each image's own grid; their tissue labels carried along with nearest neighbour).
Tissue labels (1 CSF, 2 GM, 3 WM): ``ants.kmeans_segmentation`` on each original image (the
case's labels).

Both tools get the same images in the same order (MNI first). airlab: ``airlab.template.build``
(default ``smooth`` preset, called ``diffeomorphic`` before 2026-12-07; ``--iterations``); its per-image registrations to the final
template are in ``images/``. ANTs: ``ants.build_template`` (its defaults: SyN, 3 iterations,
gradient step 0.2, starting from the plain average), then each image registered to the final
template with ``ants.registration(type_of_transform="SyN")`` (the step a user takes to get the
transforms, counted in its time).

Measure, the same for both: the template segmented with the same call (k-means Atropos, k=3,
inside the template's foreground), each image's labels carried onto the template grid through
its transform (nearest neighbour), Dice per tissue against the template's segmentation; the
table gives the group's mean GM/WM Dice and each tissue's mean. Time: process CPU time of each
tool's part with one thread (OMP/ITK threads = 1; the machine is shared, wall times are not
comparable) and wall time. Sharpness: :func:`airlab.groupwise.sharpness` (mean gradient magnitude
in the foreground) over the foreground's 99th intensity percentile, so that templates of different
intensity scales compare; the inputs' values are printed beside. ``--score-existing`` scores the
templates and transforms a finished run left in ``--out`` without building them again (no times).
A picture of the three planes of both templates is written to
``docs/template_real.png`` with ``--picture``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_cases import build_real_case, segment  # noqa: E402

import airlab as al  # noqa: E402
from airlab.evaluate import dice  # noqa: E402
from airlab.synthetic import random_deformation  # noqa: E402


def make_group(out: Path):
    case = build_real_case("colin27-mni2")
    sources = [("mni", case.fixed, case.fixed_labels), ("colin", case.moving, case.moving_labels)]
    group = [(name, Path(img), Path(lab)) for name, img, lab in sources]
    for seed, (name, img, lab) in zip((1, 2, 3, 4), [sources[0], sources[0], sources[1], sources[1]]):
        image, labels = al.read_image(img).to(torch.float32), al.read_image(lab)
        d = random_deformation(image.grid, seed)
        with torch.no_grad():
            al.write_image(al.resample(image, image.grid, d, interpolation="bspline"), out / f"{name}_def{seed}.nii.gz")
            al.write_image(al.resample(labels, labels.grid, d, interpolation="nearest"),
                           out / f"{name}_def{seed}_labels.nii.gz")
        group.append((f"{name}_def{seed}", out / f"{name}_def{seed}.nii.gz", out / f"{name}_def{seed}_labels.nii.gz"))
    return group


def template_labels(template: Path) -> sitk.Image:
    image = sitk.ReadImage(str(template), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    lo, hi = np.percentile(array, [1, 99])
    mask = sitk.BinaryThreshold(image, float(lo + 0.1 * (hi - lo)), 1e30, 1, 0)
    mask = sitk.BinaryFillhole(mask)
    mask = sitk.Cast(sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True) == 1, sitk.sitkUInt8)
    return segment(image, mask)


def dice_to_template(template: Path, warped_labels: list[np.ndarray]) -> dict:
    reference = sitk.GetArrayFromImage(template_labels(template))
    per = [dice(w, reference, labels=[1, 2, 3]) for w in warped_labels]
    out = {t: float(np.mean([p[k] for p in per])) for k, t in ((1, "csf"), (2, "gm"), (3, "wm"))}
    out["gm_wm"] = (out["gm"] + out["wm"]) / 2
    return out


def relative_sharpness(path) -> float:
    from airlab.groupwise import foreground, sharpness

    image = al.read_image(str(path)).to(torch.float64)
    inside = foreground(image.data).bool().reshape(image.data.shape)
    return sharpness(image) / float(torch.quantile(image.data[inside], 0.99))


def run_airlab(group, out: Path, iterations: int) -> dict:
    from airlab.template import TemplateProgress, build

    cpu, wall = time.process_time(), time.perf_counter()
    # a rerun into the same --out resumes (and then measures only the resumed part's time)
    summary = build([p for _, p, _ in group], out, iterations=iterations, progress=TemplateProgress(bar=False))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    warped = []
    reference = al.read_image(summary.template)
    for (_, _, labels), folder in zip(group, summary.images.values()):  # the group's order
        field = al.transforms.read_displacement_field(folder / "displacement.nii.gz",
                                                      dtype=torch.float64).requires_grad_(False)
        with torch.no_grad():
            moved = al.resample(al.read_image(labels), reference.grid, field, interpolation="nearest")
        warped.append(moved.data[0, 0].numpy())
    run_wall = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["wall_time_s"]
    return {"template": summary.template, "cpu_s": cpu, "wall_s": wall, "run_wall_s": run_wall,
            "resumed_from": summary.resumed_from, "sharpness": relative_sharpness(summary.template),
            **dice_to_template(summary.template, warped)}


def run_ants(group, out: Path, iterations: int, existing: bool = False) -> dict:
    import ants

    out.mkdir(parents=True, exist_ok=True)
    images = [ants.image_read(str(p)) for _, p, _ in group]
    if existing:
        template = ants.image_read(str(out / "template.nii.gz"))
        transforms = [[str(out / f"final{k}_final{k}_1Warp.nii.gz"), str(out / f"final{k}_final{k}_0GenericAffine.mat")]
                      for k in range(len(images))]
        return {"template": out / "template.nii.gz", "cpu_s": float("nan"), "wall_s": float("nan"),
                "sharpness": relative_sharpness(out / "template.nii.gz"),
                **dice_to_template(out / "template.nii.gz", warp_labels(group, template, transforms, out))}
    cpu, wall = time.process_time(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ants-template-") as tmp:
        template = ants.build_template(image_list=images, iterations=iterations, output_dir=tmp)
        ants.image_write(template, str(out / "template.nii.gz"))
        transforms = []
        for k, image in enumerate(images):
            reg = ants.registration(template, image, type_of_transform="SyN", outprefix=f"{tmp}/final{k}_")
            for f in reg["fwdtransforms"]:
                target = out / f"final{k}_{Path(f).name}"
                Path(f).replace(target) if Path(f).exists() else None
            transforms.append([str(out / f"final{k}_{Path(f).name}") for f in reg["fwdtransforms"]])
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"template": out / "template.nii.gz", "cpu_s": cpu, "wall_s": wall,
            "sharpness": relative_sharpness(out / "template.nii.gz"),
            **dice_to_template(out / "template.nii.gz", warp_labels(group, template, transforms, out))}


def warp_labels(group, template, transforms, out: Path) -> list[np.ndarray]:
    import ants

    warped = []
    for (_, _, labels), tx in zip(group, transforms):
        moved = ants.apply_transforms(fixed=template, moving=ants.image_read(str(labels)), transformlist=tx,
                                      interpolator="nearestNeighbor")
        path = out / "moved_labels.nii.gz"
        ants.image_write(moved, str(path))
        warped.append(sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.int16))
    return warped


def picture(rows: list[tuple[str, Path]], path: Path) -> None:
    from matplotlib.figure import Figure

    from airlab.report import _panel, _planes, _window

    images = [(label, al.read_image(p)) for label, p in rows]
    planes = _planes(images[0][1], _window(images[0][1]))
    fig = Figure(figsize=(2.6 * len(planes), 2.5 * len(images)), layout="constrained")
    axes = fig.subplots(len(images), len(planes), squeeze=False)
    for row, (label, image) in zip(axes, images):
        lo, hi = _window(image)
        for ax, plane in zip(row, planes):
            _panel(ax, plane, (plane.sample(image.data, image.grid)[0] - lo) / (hi - lo), cmap="gray", vmin=0, vmax=1)
        row[0].set_ylabel(label, fontsize=9)
    fig.savefig(path, dpi=90)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--iterations", type=int, default=4, help="airlab template iterations")
    parser.add_argument("--ants-iterations", type=int, default=3, help="ants.build_template iterations (its default)")
    parser.add_argument("--picture", type=Path, default=None, help="write the templates' planes here (PNG)")
    parser.add_argument("--tools", default="airlab,ants")
    parser.add_argument("--score-existing", action="store_true",
                        help="score the templates a finished run left in --out (ANTs is not run again)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory(prefix="airlab-template-real-")
    out = args.out or Path(tmp.name)
    (out / "group").mkdir(parents=True, exist_ok=True)
    group = make_group(out / "group")
    results = {}
    if "airlab" in args.tools:
        results["airlab template"] = run_airlab(group, out / "airlab", args.iterations)
        print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in results["airlab template"].items()}),
              flush=True)
    if "ants" in args.tools:
        results["ants.build_template"] = run_ants(group, out / "ants", args.ants_iterations, args.score_existing)
        print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in results["ants.build_template"].items()}),
              flush=True)
    print(f"\n{len(group)} images: {', '.join(n for n, _, _ in group)}; airlab {al.__version__}, one thread\n")
    inputs = ", ".join(f"{n} {relative_sharpness(p):.4f}" for n, p, _ in group[:2])
    print(f"sharpness (per 99th percentile) of the inputs: {inputs}\n")
    print("| tool | mean GM/WM Dice to its template | CSF | GM | WM | sharpness | process CPU s | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for tool, r in results.items():
        print(f"| {tool} | {r['gm_wm']:.3f} | {r['csf']:.3f} | {r['gm']:.3f} | {r['wm']:.3f} | {r['sharpness']:.4f} | "
              f"{r['cpu_s']:.0f} | {r['wall_s']:.0f} |")
    if args.picture:
        picture([(tool, r["template"]) for tool, r in results.items()], args.picture)
        print(f"\npicture: {args.picture}")


if __name__ == "__main__":
    main()
