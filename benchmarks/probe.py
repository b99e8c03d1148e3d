"""One pipeline, quickly, on every kind of case: what tuning a preset needs, in one process.

    python benchmarks/probe.py intersubject diffeomorphic my.yaml --what real,synth,contrast,slice,fair \
        [--case colin27-mni2,coronal-2d] [--threads 1] [--set lr=0.5 --set decay=false]

Each argument is a preset name or a YAML pipeline (airlab's ``--config`` schema); ``--set KEY=VALUE``
(a YAML value, repeatable) changes a key of every pipeline's last stage first, so that a row of a
tuning table is one command. Measures, in this process (no start-up or writing; process time, so
that runs on a shared machine compare):

- ``real``: each real case of ``real_cases.py`` (``--case``, a comma list), scored as there (Dice
  per tissue or lung mask, SDlogJ, folded voxels in the mask);
- ``synth``, ``contrast``: ``accuracy.py``'s 2 mm MNI case, seed 1 (mean and p95 endpoint error in
  grey and white matter), the second with grey and white matter swapped;
- ``slice``: ``accuracy.py``'s 1 mm axial slice (2D), the mean endpoint error over its three seeds;
- ``match``: on the ``synth`` case, the correlation (inside grey and white matter) of the fixed
  image with the moving one warped by the true transform, sampled linearly and as a cubic
  B-spline, and by the pipeline's transform, sampled linearly: whether the truth is the optimum
  of a linearly sampled objective (docs/architecture.md, "Interpolation while optimising");
- ``fair``: a known-deformation case built without the cubic interpolation that makes
  ``accuracy.py``'s moving images: both images are nilearn's 1 mm MNI152 smoothed and
  downsampled to 2 mm by the same filter, the moving one deformed at 1 mm first (the same
  deformation as ``synth``), so that no registration's interpolation matches how the case was made.

For exploration; the committed comparisons are ``compare.py`` and ``real_cases.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def pipeline(name: str, changes: list[str] = ()):
    """The pipeline ``name`` (a preset or a YAML file), its last stage changed by ``KEY=VALUE`` items."""
    import yaml
    from airlab.pipelines import PipelineConfig, load_config

    config = load_config(name) if name.endswith((".yaml", ".yml")) else PipelineConfig(preset=name).resolve()
    if not changes:
        return config
    update = {}
    for item in changes:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set wants KEY=VALUE, got {item!r}")
        update[key.strip()] = yaml.safe_load(value)
    stages = list(config.stages)
    last = stages[-1].model_dump(exclude_unset=True) | update
    stages[-1] = type(stages[-1]).model_validate(last)
    return config.model_copy(update={"stages": stages})


def real(config, case_name: str) -> dict:
    import airlab as al
    import real_cases as rc
    from airlab.transforms import write_displacement_field

    case = rc.build_real_case(case_name, log=lambda *a: None)
    start = time.process_time()
    result = al.register(str(case.fixed), str(case.moving), config=config)
    seconds = time.process_time() - start
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "displacement.nii.gz"
        out = result.outputs
        write_displacement_field(out.displacement, out.fixed.grid, path)
        row = rc.measure_real(case, path)
    return row | {"cpu_s": seconds, "sharpness": _sharpness(result.history)}


def _sharpness(history) -> list:
    """Per level of a stage with ``match_sharpness``: which image was smoothed, by how many mm."""
    return [[h["stage"], h["level"], h["sharpness"][0]["smoothed"], h["sharpness"][0]["sigma_mm"]]
            for h in history if "sharpness" in h]


def synthetic(config, contrast: bool) -> dict:
    import accuracy
    from airlab.datasets import mni152

    fixed, labels = mni152()
    start = time.process_time()
    history = []
    row = accuracy.measure(config, fixed, labels, 1, contrast=contrast, history=history)
    return row | {"cpu_s": time.process_time() - start, "sharpness": _sharpness(history)}


def axial_slice(config) -> dict:
    import accuracy
    import airlab as al
    from airlab.datasets import example_path

    axial = al.read_image(example_path("mni152_t1_1mm_axial")).to(torch.float32)
    start = time.process_time()
    errors = [accuracy.measure(config, axial, None, seed)["mean"] for seed in (1, 2, 3)]
    return {"mean_mm": round(sum(errors) / 3, 3), "seeds_mm": [round(e, 3) for e in errors],
            "cpu_s": round((time.process_time() - start) / 3, 1)}


def match(config) -> dict:
    import accuracy
    import airlab as al
    from airlab.datasets import mni152
    from airlab.registration import Registration

    fixed, labels = mni152()
    _, moving, truth = accuracy.case(fixed, labels, 1)
    brain = labels.data[0, 0] > 0

    def correlation(transform, interpolation):
        with torch.no_grad():
            warped = al.resample(moving, fixed.grid, transform, interpolation=interpolation).data[0, 0]
        pair = torch.stack([fixed.data[0, 0][brain].double(), warped[brain].double()])
        return round(float(torch.corrcoef(pair)[0, 1]), 5)

    result = Registration(config.build(fixed.grid), progress=False, **config.registration_options())(fixed, moving)
    return {"truth_linear": correlation(truth, "linear"), "truth_cubic": correlation(truth, "bspline"),
            "found_linear": correlation(result.transform, "linear")}


def fair_case():
    import airlab as al
    from airlab.pyramid import downsample, level_grid
    from airlab.synthetic import ground_truth, random_deformation
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    with tempfile.TemporaryDirectory() as folder:
        load_mni152_template(resolution=1).to_filename(f"{folder}/t1.nii.gz")
        load_mni152_brain_mask(resolution=1).to_filename(f"{folder}/mask.nii.gz")
        t1 = al.read_image(f"{folder}/t1.nii.gz").to(torch.float32)
        mask = al.read_image(f"{folder}/mask.nii.gz")
    t1 = al.Image(t1.data * (mask.data > 0), t1.grid)
    grid = level_grid(t1.grid, 2.0)
    deformation = random_deformation(grid, 1)
    with torch.no_grad():
        deformed = al.resample(t1, t1.grid, deformation, interpolation="bspline")
        fixed = al.Image(downsample(t1.data, t1.grid, grid, 0.85), grid)
        moving = al.Image(downsample(deformed.data, t1.grid, grid, 0.85), grid)
    truth, _ = ground_truth(deformation, grid)
    brain = (fixed.data[0, 0] > 0.15 * fixed.data.max()).numpy()
    return fixed, moving, truth, brain


def fair(config, case) -> dict:
    from airlab.evaluate import endpoint_error
    from airlab.registration import Registration

    fixed, moving, truth, brain = case
    start = time.process_time()
    result = Registration(config.build(fixed.grid), progress=False, **config.registration_options())(fixed, moving)
    seconds = time.process_time() - start
    with torch.no_grad():
        found = result.transform.displacement(fixed.grid)[0].numpy()
    return endpoint_error(found, truth.field[0].numpy(), mask=brain) | {"cpu_s": seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipelines", nargs="+", help="preset names or YAML pipelines")
    parser.add_argument("--what", default="real,synth,contrast",
                        help="comma list of real, synth, contrast, slice, match, fair")
    parser.add_argument("--case", default="colin27-mni2", help="real cases, a comma list (real_cases.py's names)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a key of each pipeline's last stage (a YAML value; repeatable)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    what = set(args.what.split(","))
    fair_data = fair_case() if "fair" in what else None
    for name in args.pipelines:
        config, row = pipeline(name, args.set), {"pipeline": name}
        if args.set:
            row["set"] = args.set
        cases = args.case.split(",")
        for case in cases if "real" in what else ():
            r = real(config, case)
            dice = {k: round(v, 4) for k, v in r.items() if k.startswith("dice")}
            key = "real" if len(cases) == 1 else case
            row[key] = dice | {"sdlogj": round(r["sdlogj"], 3), "folding": r["folding"], "cpu_s": round(r["cpu_s"], 1)}
            if r["sharpness"]:
                row[key]["sharpness"] = r["sharpness"]
        for key, contrast in (("synth", False), ("contrast", True)):
            if key in what:
                r = synthetic(config, contrast)
                row[key] = {"mean_mm": round(r["mean"], 3), "p95_mm": round(r["p95"], 3), "folding": r["folding"],
                            "cpu_s": round(r["cpu_s"], 1)}
                if r["sharpness"]:
                    row[key]["sharpness"] = r["sharpness"]
        if "slice" in what:
            row["slice"] = axial_slice(config)
        if "match" in what:
            row["match"] = match(config)
        if "fair" in what:
            r = fair(config, fair_data)
            row["fair"] = {"mean_mm": round(r["mean"], 3), "p95_mm": round(r["p95"], 3), "cpu_s": round(r["cpu_s"], 1)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
