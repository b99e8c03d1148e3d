"""Real pairs of different brains, built at benchmark time from packages (nothing else is downloaded).

    python benchmarks/real_cases.py                                   # airlab (default preset) and ANTs SyN
    python benchmarks/real_cases.py --tools identity,airlab,airlab-lncc,ants,elastix
    python benchmarks/real_cases.py --tools none --config benchmarks/configs/real_mi64_lr4_cs20_reg10x.yaml ...
    python benchmarks/real_cases.py --results OUT/rows.json ...      # add rows to an earlier run's table

Case ``colin27-mni2`` (DESIGN.md, "Real anatomy decides"):

- fixed: the MNI152 2009a T1 at 2 mm (``nilearn.datasets.load_mni152_template(resolution=2)``,
  from the nilearn wheel), skull-stripped with nilearn's brain mask (``load_mni152_brain_mask``).
- moving: Colin27 (``ch2bet.nii.gz``, already skull-stripped, from Debian's ``mricron-data``),
  smoothed and resampled to 2 mm on its own grid, then only its header moved: the grid is turned
  by 10 degrees about an oblique axis through its centre and shifted by 12 mm, as a different
  position in the scanner would put it. The voxel data stay as they were.
- tissue labels (1 CSF, 2 grey matter, 3 white matter): ``ants.kmeans_segmentation(k=3)``
  (Atropos, k-means initialisation, MRF 0.1) inside each image's brain mask, the same call on
  each image, independent of every registration tool.

Measures per tool, from the displacement field it wrote (ITK convention, fixed grid, mm, LPS):
the moving labels carried onto the fixed grid with nearest-neighbour interpolation, Dice per
tissue and the mean of grey and white matter (the headline), HD95 per tissue, SDlogJ (std of
the log Jacobian determinant) and the folded-voxel count inside the fixed brain mask (folding on
the whole grid too), and the wall time of the whole process (python start to outputs written).

The data are cached in ``--cache`` (default ``$AIRLAB_REAL_CACHE`` or ``~/.cache/airlab/real``):
``mricron/`` (the extracted package) and ``colin27-mni2/`` (the case's images and labels). The
Debian package is fetched with ``apt-get download mricron-data`` when ``ch2bet.nii.gz`` is not
there yet; ``$AIRLAB_MRICRON_DIR`` may name a folder that already holds ``ch2bet.nii.gz``.

compare.py can use :func:`build_real_case` (files, labels, masks) and :func:`measure_real`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
REAL_CASES = ["colin27-mni2"]
TISSUES = {1: "csf", 2: "gm", 3: "wm"}
# the header motion of the moving image: a rotation about an oblique axis through the grid's
# centre and a shift, both fixed so that every run builds the same case
ROTATION_DEGREES = 10.0
ROTATION_AXIS = (1.0, 0.5, 0.3)  # LPS, normalised below
SHIFT_MM = 12.0
SHIFT_DIRECTION = (0.6, -0.8, 0.0)  # LPS unit vector: 7.2 mm along x, -9.6 mm along y
# a version of the construction; bump it when anything above or below changes the files
CASE_VERSION = 1


@dataclass
class RealCase:
    """A pair of different subjects. Paths are files every tool reads; labels are on each image's
    own grid (tensor order, the arrays SimpleITK's GetArrayFromImage gives)."""

    name: str
    fixed: Path
    moving: Path
    fixed_labels: Path  # 1 CSF, 2 GM, 3 WM on the fixed grid
    moving_labels: Path  # the same on the moving grid
    fixed_mask: Path  # brain mask on the fixed grid (where SDlogJ and folding count)
    moving_mask: Path
    description: str = ""


# ------------------------------------------------------------------------------ sources
def default_cache() -> Path:
    return Path(os.environ.get("AIRLAB_REAL_CACHE", Path.home() / ".cache" / "airlab" / "real"))


def mricron_templates(cache: Path) -> Path:
    """The folder holding mricron-data's templates (ch2bet.nii.gz, ...): extracted from the Debian
    package into ``cache/mricron`` the first time (``apt-get download`` needs no root once the
    package lists are there; ``apt-get update`` is tried when they are not)."""
    given = os.environ.get("AIRLAB_MRICRON_DIR")
    if given:
        folder = Path(given)
        if not (folder / "ch2bet.nii.gz").is_file():
            raise RuntimeError(f"$AIRLAB_MRICRON_DIR={given} holds no ch2bet.nii.gz")
        return folder
    folder = cache / "mricron" / "usr" / "share" / "mricron" / "templates"
    if (folder / "ch2bet.nii.gz").is_file():
        return folder
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise RuntimeError(
            "Colin27 comes from the Debian package mricron-data, but apt-get/dpkg are not available here. "
            "On a Debian/Ubuntu machine run `apt-get download mricron-data && dpkg -x mricron-data_*.deb DIR` "
            "and set AIRLAB_MRICRON_DIR=DIR/usr/share/mricron/templates")
    with tempfile.TemporaryDirectory(prefix="mricron-") as tmp:
        get = lambda: subprocess.run(["apt-get", "download", "mricron-data"], cwd=tmp,  # noqa: E731
                                     capture_output=True, text=True)
        done = get()
        if done.returncode != 0:  # no package lists yet: refresh them (root only) and try once more
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
            done = get()
        debs = sorted(Path(tmp).glob("mricron-data_*.deb"))
        if done.returncode != 0 or not debs:
            raise RuntimeError("`apt-get download mricron-data` failed (is a Debian archive with the package "
                               f"reachable?): {(done.stderr or done.stdout).strip()[-300:]}")
        (cache / "mricron").mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg", "-x", str(debs[0]), str(cache / "mricron")], check=True)
    if not (folder / "ch2bet.nii.gz").is_file():
        raise RuntimeError(f"mricron-data was extracted but {folder / 'ch2bet.nii.gz'} is missing")
    return folder


def _nilearn_mni152_2mm() -> tuple[sitk.Image, sitk.Image]:
    """nilearn's 2 mm MNI152 2009a T1 and brain mask (both from files inside the wheel, resampled
    there; nothing is downloaded), as SimpleITK images (NIfTI's RAS read as ITK's LPS)."""
    try:
        from nilearn import datasets
    except ImportError:
        raise RuntimeError("the MNI152 template comes from nilearn's wheel: pip install nilearn") from None
    out = []
    with tempfile.TemporaryDirectory(prefix="mni152-") as tmp:
        for name, image in (("t1", datasets.load_mni152_template(resolution=2)),
                            ("mask", datasets.load_mni152_brain_mask(resolution=2))):
            path = Path(tmp) / f"{name}.nii.gz"
            image.to_filename(str(path))
            out.append(sitk.ReadImage(str(path)))
    return out[0], out[1]


# --------------------------------------------------------------------------- building
def _resample_2mm(image: sitk.Image) -> sitk.Image:
    """1 mm -> 2 mm over the same extent (voxel edges kept), after a Gaussian that takes the
    1 mm resolution to about 2 mm (FWHM sqrt(2^2 - 1^2) mm)."""
    sigma = math.sqrt(2.0**2 - 1.0**2) / (2 * math.sqrt(2 * math.log(2)))
    smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), sigma)
    spacing = np.array(image.GetSpacing())
    size = np.ceil(np.array(image.GetSize()) * spacing / 2.0).astype(int)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    # first 2 mm voxel centre: half a voxel (1 mm) inside the first 1 mm voxel's outer edge
    corner = np.array(image.GetOrigin()) - direction @ (spacing / 2)
    origin = corner + direction @ np.full(3, 1.0)
    ref = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    ref.SetSpacing((2.0, 2.0, 2.0))
    ref.SetOrigin(tuple(origin))
    ref.SetDirection(image.GetDirection())
    out = sitk.Resample(smooth, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.Clamp(out, sitk.sitkFloat32, 0.0)  # no negative ringing at the brain's edge


def _rotation(axis, degrees) -> np.ndarray:
    a = np.asarray(axis, dtype=float)
    a /= np.linalg.norm(a)
    t = np.deg2rad(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def move_header(image: sitk.Image, rotation: np.ndarray, shift: np.ndarray) -> sitk.Image:
    """The same voxels with the header moved: every voxel's physical point x becomes
    ``R (x - c) + c + shift``, c the grid's physical centre."""
    out = sitk.Image(image)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    origin = np.array(image.GetOrigin())
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()]))
    out.SetDirection(tuple((rotation @ direction).ravel()))
    out.SetOrigin(tuple(rotation @ (origin - centre) + centre + shift))
    return out


def segment(image: sitk.Image, mask: sitk.Image) -> sitk.Image:
    """1 CSF, 2 GM, 3 WM: antspyx's k-means-initialised Atropos (k=3, MRF 0.1) inside ``mask``;
    the same call for every image. Atropos orders the classes by mean intensity (T1: CSF < GM < WM)."""
    import ants

    with tempfile.TemporaryDirectory(prefix="seg-") as tmp:
        ip, mp = Path(tmp) / "image.nii.gz", Path(tmp) / "mask.nii.gz"
        sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32), str(ip))
        sitk.WriteImage(sitk.Cast(mask, sitk.sitkUInt8), str(mp))
        seg = ants.kmeans_segmentation(ants.image_read(str(ip)), 3, kmask=ants.image_read(str(mp)), mrf=0.1)
        sp = Path(tmp) / "seg.nii.gz"
        ants.image_write(seg["segmentation"], str(sp))
        labels = sitk.Cast(sitk.ReadImage(str(sp)), sitk.sitkUInt8)
    labels.CopyInformation(image)  # ANTs round-trips the header; keep SimpleITK's bits exactly
    return labels


def _brain_mask(image: sitk.Image) -> sitk.Image:
    """The brain of an already skull-stripped image: non-zero voxels, holes filled, the largest
    connected piece."""
    mask = sitk.BinaryThreshold(image, 1e-3, 1e30, 1, 0)
    mask = sitk.BinaryFillhole(mask)
    pieces = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    return sitk.Cast(pieces == 1, sitk.sitkUInt8)


def build_colin27_mni2(cache: Path | None = None, *, log=print) -> RealCase:
    cache = Path(cache or default_cache())
    folder = cache / "colin27-mni2"
    names = {k: folder / f"{k}.nii.gz" for k in ("fixed", "moving", "fixed_labels", "moving_labels",
                                                 "fixed_mask", "moving_mask")}
    stamp = folder / "case.json"
    case = RealCase("colin27-mni2", **names, description=(
        "Colin27 (mricron-data ch2bet, 2 mm, header turned 10 deg and shifted 12 mm) onto MNI152 2009a "
        "(nilearn, 2 mm, skull-stripped); labels: ants.kmeans_segmentation k=3 on each"))
    if stamp.is_file() and json.loads(stamp.read_text()).get("version") == CASE_VERSION and all(
            p.is_file() for p in names.values()):
        return case
    folder.mkdir(parents=True, exist_ok=True)
    log(f"[colin27-mni2] building the case in {folder}")
    t1, mask = _nilearn_mni152_2mm()
    mask = sitk.Cast(mask > 0, sitk.sitkUInt8)
    mask.CopyInformation(t1)
    fixed = sitk.Cast(t1, sitk.sitkFloat32) * sitk.Cast(mask, sitk.sitkFloat32)
    colin = sitk.ReadImage(str(mricron_templates(cache) / "ch2bet.nii.gz"))
    moving = _resample_2mm(colin)
    moving_mask = _brain_mask(moving)
    rotation = _rotation(ROTATION_AXIS, ROTATION_DEGREES)
    shift = SHIFT_MM * np.asarray(SHIFT_DIRECTION) / np.linalg.norm(SHIFT_DIRECTION)
    moving, moving_mask = move_header(moving, rotation, shift), move_header(moving_mask, rotation, shift)
    fixed_labels, moving_labels = segment(fixed, mask), segment(moving, moving_mask)
    for key, image in (("fixed", fixed), ("moving", moving), ("fixed_labels", fixed_labels),
                       ("moving_labels", moving_labels), ("fixed_mask", mask), ("moving_mask", moving_mask)):
        sitk.WriteImage(image, str(names[key]), useCompression=True)
    counts = {side: {TISSUES[k]: int((sitk.GetArrayFromImage(img) == k).sum()) for k in TISSUES}
              for side, img in (("fixed", fixed_labels), ("moving", moving_labels))}
    stamp.write_text(json.dumps({"version": CASE_VERSION, "rotation_degrees": ROTATION_DEGREES,
                                 "rotation_axis": ROTATION_AXIS, "shift_mm": list(map(float, shift)),
                                 "label_voxels": counts}, indent=2))
    log(f"[colin27-mni2] label voxels {counts}")
    return case


def build_real_case(name: str, cache: Path | None = None, *, log=print) -> RealCase:
    if name == "colin27-mni2":
        return build_colin27_mni2(cache, log=log)
    raise ValueError(f"unknown real case {name!r}; choose from {', '.join(REAL_CASES)}")


# ----------------------------------------------------------------------------- measuring
def measure_real(case: RealCase, displacement: Path | None) -> dict:
    """Dice/HD95 per tissue, mean GM/WM Dice, SDlogJ and folding of one tool's field
    (``None``: the identity, i.e. the headers alone)."""
    import torch

    import airlab as al
    from airlab.evaluate import dice, hd95, jacobian_stats
    from airlab.transforms import read_displacement_field

    fixed_labels = al.read_image(case.fixed_labels)
    moving_labels = al.read_image(case.moving_labels)
    brain = al.read_image(case.fixed_mask).data[0, 0].numpy() > 0
    grid = fixed_labels.grid
    with torch.no_grad():
        if displacement is None:
            warped = al.resample(moving_labels, grid, interpolation="nearest")
            field = np.zeros((3, *grid.shape))
        else:
            found = read_displacement_field(displacement, dtype=torch.float64)
            field = found.displacement(grid)[0].numpy()  # the field itself when already on the fixed grid
            warped = al.resample(moving_labels, grid, found.to(torch.float32), interpolation="nearest")
    a = warped.data[0, 0].numpy().astype(np.int16)
    b = fixed_labels.data[0, 0].numpy().astype(np.int16)
    d, h = dice(a, b, labels=list(TISSUES)), hd95(a, b, grid, labels=list(TISSUES))
    jac, jac_all = jacobian_stats(field, grid, mask=brain), jacobian_stats(field, grid)
    row = {f"dice_{n}": d[k] for k, n in TISSUES.items()} | {f"hd95_{n}": h[k] for k, n in TISSUES.items()}
    row["dice_gmwm"] = (d[2] + d[3]) / 2
    row["hd95_gmwm"] = (h[2] + h[3]) / 2
    row.update(sdlogj=jac["log_jacobian_std"], folding=jac["folding_count"], folding_grid=jac_all["folding_count"],
               det_min=jac["det_min"])
    return row


# ------------------------------------------------------------------------------- running
def airlab_command(case: RealCase, out: Path, args: list[str]) -> list[str]:
    exe = Path(sys.executable).with_name("airlab")
    airlab = [str(exe)] if exe.exists() else [sys.executable, "-m", "airlab"]
    return airlab + ["register", str(case.fixed), str(case.moving), "-o", str(out), "--quiet", "--no-report",
                     "--overwrite", *args]


def tool_command(tool: str, case: RealCase, out: Path, device: str) -> list[str] | None:
    """The process of a named tool (None for the identity, which runs nothing)."""
    if tool == "identity":
        return None
    if tool == "airlab":
        return airlab_command(case, out, ["--device", device])
    if tool.startswith("airlab-"):  # airlab-affine, airlab-bspline: a preset; airlab-lncc, ...: a metric
        what = tool.split("-", 1)[1]
        flag = "--preset" if what in ("rigid", "affine", "bspline", "diffeomorphic", "intersubject") else "--metric"
        return airlab_command(case, out, [flag, what, "--device", device])
    if tool in ("ants", "elastix", "fireants"):
        return [sys.executable, str(HERE / "tools" / f"run_{tool}.py"), str(case.fixed), str(case.moving), str(out),
                "--device", device]
    raise ValueError(f"unknown tool {tool!r}")


def run_tool(label: str, cmd: list[str] | None, case: RealCase, out: Path, timeout: float) -> dict:
    from compare import run_process  # the whole-process clock and peak memory of compare.py

    row = {"case": case.name, "tool": label, "command": shlex.join(cmd) if cmd else None}
    if cmd is None:
        return row | {"seconds": 0.0, "peak_mb": None} | measure_real(case, None)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    seconds, mb, error = run_process(cmd, out / "log.txt", timeout)
    if error:
        return row | {"error": error}
    row |= {"seconds": seconds, "peak_mb": mb}
    if (out / "metrics.json").is_file():  # airlab's own clock: registration alone, without start-up and I/O
        row["registration_s"] = json.loads((out / "metrics.json").read_text()).get("registration_time_s")
    return row | measure_real(case, out / "displacement.nii.gz")


def fmt(value, digits):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    lines = ["| case | tool | time s | reg. s | mean GM/WM Dice | CSF | GM | WM | HD95 GM/WM mm | SDlogJ | folding |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['tool']} | failed: {r['error'].replace('|', '/')} | | | | | | | | |")
            continue
        lines.append(f"| {r['case']} | {r['tool']} | {fmt(r['seconds'], 1)} | {fmt(r.get('registration_s'), 1)} | **{fmt(r['dice_gmwm'], 3)}** | "
                     f"{fmt(r['dice_csf'], 3)} | {fmt(r['dice_gm'], 3)} | {fmt(r['dice_wm'], 3)} | "
                     f"{fmt(r['hd95_gmwm'], 2)} | {fmt(r['sdlogj'], 3)} | {r['folding']} |")
    lines += ["", "Dice: moving labels (k-means Atropos, 1 CSF 2 GM 3 WM) carried onto the fixed grid by the tool's "
              "field, nearest neighbour. HD95: mean of GM and WM. SDlogJ and folding (voxels with det J <= 0): "
              "inside the fixed brain mask. Time: the whole process, wall clock; reg. s: airlab's registration "
              "alone (metrics.json)."]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="colin27-mni2", choices=REAL_CASES)
    parser.add_argument("--tools", default="airlab,ants",
                        help="comma list: identity, airlab, airlab-PRESET (affine, bspline, intersubject, ...), airlab-METRIC "
                        "(lncc, ncc, mi, ...), ants, elastix, fireants; 'none' for only --config rows")
    parser.add_argument("--config", type=Path, nargs="*", default=[],
                        help="airlab YAML pipelines, one row each (named by the file's stem)")
    parser.add_argument("--airlab-args", action="append", default=[], metavar="'ARGS'",
                        help="extra rows: `airlab register` options, e.g. '--metric lncc --seed 1'")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--cache", type=Path, default=None, help="data cache (default $AIRLAB_REAL_CACHE or "
                        "~/.cache/airlab/real)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "real")
    parser.add_argument("--results", type=Path, default=None,
                        help="a rows JSON to extend (default OUT/rows.json, started afresh)")
    parser.add_argument("--timeout", type=float, default=7200.0)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    try:
        case = build_real_case(args.case, args.cache)
    except RuntimeError as exc:
        parser.exit(2, f"cannot build {args.case}: {exc}\n")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = args.results or out / "rows.json"
    rows = json.loads(results.read_text()) if args.results and results.is_file() else []
    jobs = []
    for tool in [t.strip() for t in args.tools.split(",") if t.strip() and t.strip() != "none"]:
        jobs.append((tool, tool_command(tool, case, out / tool, args.device), out / tool))
    for cfg in args.config:
        jobs.append((f"airlab:{cfg.stem}", airlab_command(case, out / cfg.stem, ["--config", str(cfg.resolve()),
                     "--device", args.device]), out / cfg.stem))
    for i, extra in enumerate(args.airlab_args):
        tag = "airlab " + extra
        folder = out / ("args" + re.sub(r"[^A-Za-z0-9.]+", "_", extra))
        jobs.append((tag, airlab_command(case, folder, [*shlex.split(extra), "--device", args.device]), folder))
    for label, cmd, folder in jobs:
        print(f"[{case.name}] {label} ...", end=" ", flush=True)
        start = time.perf_counter()
        row = run_tool(label, cmd, case, folder, args.timeout)
        rows = [r for r in rows if r["tool"] != label or r["case"] != case.name] + [row]
        results.write_text(json.dumps(rows, indent=2))
        print(row["error"] if "error" in row else f"{row['seconds']:.1f} s, mean GM/WM Dice {row['dice_gmwm']:.3f} "
              f"(measured in {time.perf_counter() - start - row['seconds']:.0f} s)", flush=True)
    table = markdown(rows)
    (out / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
