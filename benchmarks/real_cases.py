"""Real pairs of different subjects, built at benchmark time from packages (nothing else is downloaded).

    python benchmarks/real_cases.py                                   # colin27-mni2: airlab (default preset), ANTs SyN
    python benchmarks/real_cases.py --cases coronal-2d,ratlung-2d --tools identity,airlab,airlab-intersubject,ants,elastix
    python benchmarks/real_cases.py --tools none --config benchmarks/configs/real_mi64_lr4_cs20_reg10x.yaml ...
    python benchmarks/real_cases.py --results OUT/rows.json ...      # add rows to an earlier run's table

The cases (DESIGN.md, "Real anatomy decides"); an arrow reads moving -> fixed:

- ``colin27-mni2`` (also ``colin-mni-2mm``): Colin27 -> MNI152 2009a at 2 mm. Fixed: nilearn's
  MNI152 2009a T1 at 2 mm (``load_mni152_template(resolution=2)``, from the wheel), skull-stripped
  with nilearn's brain mask. Moving: Colin27 (``ch2bet.nii.gz``, already skull-stripped, from
  Debian's ``mricron-data``), smoothed and resampled to 2 mm on its own grid, then only its header
  moved: the grid turned by 10 degrees about an oblique axis through its centre and shifted by
  12 mm, as a different position in the scanner would put it. The voxel data stay as they were.
- ``colin-mni-2mm-rev``: the same two images the other way round, MNI152 -> Colin27 (fixed: the
  moved Colin27, moving: MNI152; the same files, labels and masks).
- ``colin-mni-1mm``: Colin27 -> MNI152 2009a at 1 mm (nilearn's 1 mm template; Colin27's own
  1 mm grid, header moved as above). Slow for every tool; not in the defaults.
- ``coronal-2d``: a 2D inter-subject pair, dipy's ``t1_coronal_slice.npy`` (another person's
  skull-stripped T1, 256 x 256, 1 mm pixels as dipy's own tests use it, grid centred on the
  scanner origin) -> the MNI152 2009a 1 mm coronal slice that matches it best (the slice whose
  normalised cross-correlation with the dipy slice is highest after a 2D affine SimpleITK
  registration; :func:`pick_slice`). dipy's file comes from the installed dipy, or from its wheel
  (``pip download dipy --no-deps``) unpacked into the cache.
- ``ratlung-2d``: real breathing motion, ``RatLungSlice1.mha`` -> ``RatLungSlice2.mha`` (Debian
  ``insighttoolkit5-examples``, 128 x 128, 1 mm). No tissue labels: one threshold rule
  (:func:`lung_mask`) gives the lungs on both images (label 1) and the body (where SDlogJ and
  folding count).

Tissue labels of the brain cases (1 CSF, 2 grey matter, 3 white matter):
``ants.kmeans_segmentation(k=3)`` (Atropos, k-means initialisation, MRF 0.1) inside each image's
brain mask, the same call on each image, independent of every registration tool.

Measures per tool, from the displacement field it wrote (ITK convention, fixed grid, mm, LPS):
the moving labels carried onto the fixed grid with nearest-neighbour interpolation, Dice per
label and the headline mean (grey and white matter for the brains, the lungs for the rat), HD95
per label, SDlogJ (std of the log Jacobian determinant) and the folded-voxel count inside the
fixed brain (body) mask (folding on the whole grid too), and the wall time of the whole process
(python start to outputs written).

The data are cached in ``--cache`` (default ``$AIRLAB_REAL_CACHE`` or ``~/.cache/airlab/real``):
``mricron/``, ``itk-examples/``, ``dipy/`` (what was extracted from the packages) and one folder
per case (its images, labels and masks). A Debian package is fetched with ``apt-get download``
and unpacked with ``dpkg -x`` only when its files are not there yet; ``$AIRLAB_MRICRON_DIR`` may
name a folder that already holds ``ch2bet.nii.gz``, ``$AIRLAB_ITK_EXAMPLES_DIR`` one that holds
``RatLungSlice1.mha``.

compare.py uses :func:`build_real_case` (files, labels, masks), :func:`tool_command`,
:func:`run_tool` and :func:`markdown` (``compare.py --real-cases``).
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
REAL_CASES = ["colin27-mni2", "colin-mni-2mm-rev", "colin-mni-1mm", "coronal-2d", "ratlung-2d"]
ALIASES = {"colin-mni-2mm": "colin27-mni2"}
DEFAULT_CASES = ["colin27-mni2"]
TISSUES = {1: "csf", 2: "gm", 3: "wm"}
LUNG = {1: "lung"}
# the header motion of the moving image: a rotation about an oblique axis through the grid's
# centre and a shift, both fixed so that every run builds the same case
ROTATION_DEGREES = 10.0
ROTATION_AXIS = (1.0, 0.5, 0.3)  # LPS, normalised below
SHIFT_MM = 12.0
SHIFT_DIRECTION = (0.6, -0.8, 0.0)  # LPS unit vector: 7.2 mm along x, -9.6 mm along y
# a version of the construction; bump it when anything above or below changes the files
CASE_VERSION = 1
# the same for the cases added later (each has its own folder and stamp)
NEW_CASE_VERSION = 1
# coronal-2d: the MNI152 coronal slices searched for the best match (RAS y in mm, nilearn 1 mm)
CORONAL_SEARCH_MM = (-40, 20)


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
    labels: dict = field(default_factory=lambda: dict(TISSUES))  # label value -> name
    headline: tuple = (2, 3)  # the labels whose mean Dice is the case's headline
    headline_name: str = "GM/WM"


# ------------------------------------------------------------------------------ sources
def default_cache() -> Path:
    return Path(os.environ.get("AIRLAB_REAL_CACHE", Path.home() / ".cache" / "airlab" / "real"))


def debian_files(cache: Path, package: str, folder: str, wanted: str, env: str, target: str) -> Path:
    """The folder ``folder`` (a path inside the package) holding ``wanted``, from the Debian package
    ``package`` extracted into ``cache/<target>`` the first time (``apt-get download`` needs no
    root once the package lists are there; ``apt-get update`` is tried when they are not).
    ``$env`` may name a folder that already holds ``wanted``."""
    given = os.environ.get(env)
    if given:
        if not (Path(given) / wanted).is_file():
            raise RuntimeError(f"${env}={given} holds no {wanted}")
        return Path(given)
    target = cache / target
    found = target / folder
    if (found / wanted).is_file():
        return found
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise RuntimeError(
            f"{wanted} comes from the Debian package {package}, but apt-get/dpkg are not available here. "
            f"On a Debian/Ubuntu machine run `apt-get download {package} && dpkg -x {package}_*.deb DIR` "
            f"and set {env}=DIR/{folder}")
    with tempfile.TemporaryDirectory(prefix=f"{package}-") as tmp:
        get = lambda: subprocess.run(["apt-get", "download", package], cwd=tmp,  # noqa: E731
                                     capture_output=True, text=True)
        done = get()
        if done.returncode != 0:  # no package lists yet: refresh them (root only) and try once more
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
            done = get()
        debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if done.returncode != 0 or not debs:
            raise RuntimeError(f"`apt-get download {package}` failed (is a Debian archive with the package "
                               f"reachable?): {(done.stderr or done.stdout).strip()[-300:]}")
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg", "-x", str(debs[0]), str(target)], check=True)
    if not (found / wanted).is_file():
        raise RuntimeError(f"{package} was extracted but {found / wanted} is missing")
    return found


def mricron_templates(cache: Path) -> Path:
    """The folder holding mricron-data's templates (ch2bet.nii.gz, ...), extracted into
    ``cache/mricron`` (the folder name kept from the first version of this script)."""
    return debian_files(cache, "mricron-data", "usr/share/mricron/templates", "ch2bet.nii.gz", "AIRLAB_MRICRON_DIR",
                        "mricron")


def itk_examples(cache: Path) -> Path:
    """The folder of insighttoolkit5-examples' data (RatLungSlice1.mha, ...)."""
    return debian_files(cache, "insighttoolkit5-examples", "usr/share/doc/insighttoolkit5-examples/examples/Data",
                        "RatLungSlice1.mha", "AIRLAB_ITK_EXAMPLES_DIR", "itk-examples")


def dipy_coronal_slice(cache: Path) -> np.ndarray:
    """dipy's ``t1_coronal_slice.npy`` (256 x 256 float64, rows superior -> inferior): from the
    installed dipy when there is one (found without importing it), else from dipy's wheel
    (``pip download dipy --no-deps``) unpacked into ``cache/dipy`` once."""
    import importlib.util
    import zipfile

    name = "t1_coronal_slice.npy"
    spec = importlib.util.find_spec("dipy")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            if (Path(root) / "data" / "files" / name).is_file():
                return np.load(Path(root) / "data" / "files" / name)
    cached = cache / "dipy" / name
    if not cached.is_file():
        with tempfile.TemporaryDirectory(prefix="dipy-") as tmp:
            done = subprocess.run([sys.executable, "-m", "pip", "download", "dipy", "--no-deps", "--only-binary=:all:",
                                   "-d", tmp, "-q"], capture_output=True, text=True)
            wheels = sorted(Path(tmp).glob("dipy-*.whl"))
            if done.returncode != 0 or not wheels:
                raise RuntimeError("dipy's t1_coronal_slice.npy: dipy is not installed and `pip download dipy` failed "
                                   f"(pip install dipy): {(done.stderr or done.stdout).strip()[-300:]}")
            with zipfile.ZipFile(wheels[0]) as wheel:
                data = wheel.read(f"dipy/data/files/{name}")
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_bytes(data)
    return np.load(cached)


def _nilearn_mni152(resolution: int = 2) -> tuple[sitk.Image, sitk.Image]:
    """nilearn's MNI152 2009a T1 and brain mask at 1 or 2 mm (both from files inside the wheel,
    resampled there for 2 mm; nothing is downloaded), as SimpleITK images (NIfTI's RAS read as
    ITK's LPS)."""
    try:
        from nilearn import datasets
    except ImportError:
        raise RuntimeError("the MNI152 template comes from nilearn's wheel: pip install nilearn") from None
    out = []
    with tempfile.TemporaryDirectory(prefix="mni152-") as tmp:
        for name, image in (("t1", datasets.load_mni152_template(resolution=resolution)),
                            ("mask", datasets.load_mni152_brain_mask(resolution=resolution))):
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
    t1, mask = _nilearn_mni152(2)
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


def _case_files(cache: Path, name: str) -> tuple[Path, dict, Path]:
    folder = cache / name
    names = {k: folder / f"{k}.nii.gz" for k in ("fixed", "moving", "fixed_labels", "moving_labels",
                                                 "fixed_mask", "moving_mask")}
    return folder, names, folder / "case.json"


def _cached(names: dict, stamp: Path, version: int) -> bool:
    return stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")).get("version") == version and all(
        p.is_file() for p in names.values())


def _write_case(names: dict, stamp: Path, images: dict, info: dict, labels: dict, log, name: str) -> None:
    for key, image in images.items():
        sitk.WriteImage(image, str(names[key]), useCompression=True)
    counts = {side: {labels[k]: int((sitk.GetArrayFromImage(images[f"{side}_labels"]) == k).sum()) for k in labels}
              for side in ("fixed", "moving")}
    stamp.write_text(json.dumps({"version": NEW_CASE_VERSION, **info, "label_voxels": counts}, indent=2),
                     encoding="utf-8")
    log(f"[{name}] label voxels {counts}")


def build_colin_mni_2mm_rev(cache: Path | None = None, *, log=print) -> RealCase:
    """MNI152 -> Colin27 at 2 mm: colin27-mni2's files the other way round (nothing new is built)."""
    forward = build_colin27_mni2(cache, log=log)
    return RealCase("colin-mni-2mm-rev", fixed=forward.moving, moving=forward.fixed,
                    fixed_labels=forward.moving_labels, moving_labels=forward.fixed_labels,
                    fixed_mask=forward.moving_mask, moving_mask=forward.fixed_mask, description=(
                        "MNI152 2009a (nilearn, 2 mm, skull-stripped) onto Colin27 (mricron-data ch2bet, 2 mm, header "
                        "turned 10 deg and shifted 12 mm): colin27-mni2 reversed; labels: ants.kmeans_segmentation k=3"))


def build_colin_mni_1mm(cache: Path | None = None, *, log=print) -> RealCase:
    """Colin27 -> MNI152 2009a at 1 mm: nilearn's 1 mm template (skull-stripped with its mask) and
    Colin27's ch2bet on its own 1 mm grid, the header moved as in colin27-mni2."""
    cache = Path(cache or default_cache())
    name = "colin-mni-1mm"
    folder, names, stamp = _case_files(cache, name)
    case = RealCase(name, **names, description=(
        "Colin27 (mricron-data ch2bet, 1 mm, header turned 10 deg and shifted 12 mm) onto MNI152 2009a "
        "(nilearn, 1 mm, skull-stripped); labels: ants.kmeans_segmentation k=3 on each"))
    if _cached(names, stamp, NEW_CASE_VERSION):
        return case
    folder.mkdir(parents=True, exist_ok=True)
    log(f"[{name}] building the case in {folder} (two Atropos segmentations at 1 mm: minutes)")
    t1, mask = _nilearn_mni152(1)
    mask = sitk.Cast(mask > 0, sitk.sitkUInt8)
    mask.CopyInformation(t1)
    fixed = sitk.Cast(t1, sitk.sitkFloat32) * sitk.Cast(mask, sitk.sitkFloat32)
    moving = sitk.Clamp(sitk.Cast(sitk.ReadImage(str(mricron_templates(cache) / "ch2bet.nii.gz")), sitk.sitkFloat32),
                        sitk.sitkFloat32, 0.0)
    moving_mask = _brain_mask(moving)
    rotation = _rotation(ROTATION_AXIS, ROTATION_DEGREES)
    shift = SHIFT_MM * np.asarray(SHIFT_DIRECTION) / np.linalg.norm(SHIFT_DIRECTION)
    moving, moving_mask = move_header(moving, rotation, shift), move_header(moving_mask, rotation, shift)
    images = {"fixed": fixed, "moving": moving, "fixed_labels": segment(fixed, mask),
              "moving_labels": segment(moving, moving_mask), "fixed_mask": mask, "moving_mask": moving_mask}
    _write_case(names, stamp, images, {"rotation_degrees": ROTATION_DEGREES, "rotation_axis": ROTATION_AXIS,
                                       "shift_mm": list(map(float, shift))}, TISSUES, log, name)
    return case


def _quick_affine_ncc(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image | None = None) -> float:
    """NCC of ``fixed`` and ``moving`` after a quick 2D affine SimpleITK registration (centres of
    mass, then correlation over two levels), inside ``fixed_mask`` (or the whole grid)."""
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    init = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(fixed.GetDimension()),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsCorrelation()
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=60)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2])
    reg.SetSmoothingSigmasPerLevel([2, 1])
    reg.SetInitialTransform(init, inPlace=False)
    try:
        found = reg.Execute(fixed, moving)
    except RuntimeError:  # a candidate too different to overlap: the worst score
        return -1.0
    warped = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, found, sitk.sitkLinear, 0.0))
    a = sitk.GetArrayFromImage(fixed)
    keep = np.ones(a.shape, bool) if fixed_mask is None else sitk.GetArrayFromImage(fixed_mask) > 0
    x, y = a[keep] - a[keep].mean(), warped[keep] - warped[keep].mean()
    return float((x * y).sum() / (np.sqrt((x * x).sum() * (y * y).sum()) + 1e-12))


def pick_slice(candidates: list, moving: sitk.Image, masks: list | None = None) -> tuple[int, list]:
    """The index of the 2D image in ``candidates`` that matches ``moving`` best (highest NCC after a
    quick 2D affine registration, :func:`_quick_affine_ncc`), and every candidate's score."""
    scores = [_quick_affine_ncc(c, moving, None if masks is None else masks[i]) for i, c in enumerate(candidates)]
    return int(np.argmax(scores)), scores


def _coronal(volume: sitk.Image, j: int) -> sitk.Image:
    """The coronal slice ``j`` (ITK index axis 1) of an LPS volume as a 2D image (x, z)."""
    size = list(volume.GetSize())
    size[1] = 0
    return sitk.Extract(volume, size, [0, j, 0])


def build_coronal_2d(cache: Path | None = None, *, log=print) -> RealCase:
    """dipy's coronal T1 slice (another person) -> the best-matching MNI152 2009a 1 mm coronal slice."""
    cache = Path(cache or default_cache())
    name = "coronal-2d"
    folder, names, stamp = _case_files(cache, name)
    case = RealCase(name, **names, description=(
        "dipy's t1_coronal_slice.npy (1 mm) onto the best-matching coronal slice of MNI152 2009a (nilearn, 1 mm, "
        "skull-stripped); labels: ants.kmeans_segmentation k=3 on each"))
    if _cached(names, stamp, NEW_CASE_VERSION):
        return case
    folder.mkdir(parents=True, exist_ok=True)
    log(f"[{name}] building the case in {folder}")
    array = dipy_coronal_slice(cache).astype(np.float32)
    moving = sitk.GetImageFromArray(array)  # index 0: columns (left-right), index 1: rows (superior -> inferior)
    moving.SetSpacing((1.0, 1.0))
    moving.SetDirection((-1.0, 0.0, 0.0, -1.0))  # columns along -x as MNI152's, rows downwards (-z)
    moving.SetOrigin((127.5, 127.5))  # the grid's centre at the scanner's origin
    moving_mask = _brain_mask(moving)
    moving = moving * sitk.Cast(moving_mask, sitk.sitkFloat32)
    t1, mask = _nilearn_mni152(1)
    mask = sitk.Cast(mask > 0, sitk.sitkUInt8)
    mask.CopyInformation(t1)
    volume = sitk.Cast(t1, sitk.sitkFloat32) * sitk.Cast(mask, sitk.sitkFloat32)
    # RAS y (mm) of the coronal index j: LPS y = origin_y + direction_yy * j, RAS y = -LPS y
    origin_y, dir_y = volume.GetOrigin()[1], volume.GetDirection()[4]
    js = [j for j in range(volume.GetSize()[1]) if CORONAL_SEARCH_MM[0] <= -(origin_y + dir_y * j) <= CORONAL_SEARCH_MM[1]]
    candidates, cmasks = [_coronal(volume, j) for j in js], [_coronal(mask, j) for j in js]
    best, scores = pick_slice(candidates, moving, cmasks)
    j = js[best]
    log(f"[{name}] MNI152 coronal slice {j} (RAS y {-(origin_y + dir_y * j):+.0f} mm), NCC {scores[best]:.3f} "
        f"after a 2D affine (range {min(scores):.3f}-{max(scores):.3f})")
    fixed, fixed_mask = candidates[best], cmasks[best]
    images = {"fixed": fixed, "moving": moving, "fixed_labels": segment(fixed, fixed_mask),
              "moving_labels": segment(moving, moving_mask), "fixed_mask": fixed_mask, "moving_mask": moving_mask}
    _write_case(names, stamp, images, {"mni_coronal_index": j, "mni_ras_y_mm": -(origin_y + dir_y * j),
                                       "ncc_after_affine": {str(jj): round(sc, 4) for jj, sc in zip(js, scores)}},
                TISSUES, log, name)
    return case


def lung_mask(image: sitk.Image, *, fraction: float = 0.5, sigma: float = 1.0,
              min_fraction: float = 0.01) -> tuple[sitk.Image, sitk.Image]:
    """The lungs and the body of a chest slice by one threshold rule, the same for every image.

    Dark = below ``fraction`` x the median of the image smoothed by a Gaussian of ``sigma`` voxels,
    opened by one voxel. Dark pieces that touch the image's border are the air around the body;
    the other dark pieces larger than ``min_fraction`` of the image are the lungs (holes, the
    vessels, filled). Body: everything but the border-touching air. Returns (lungs, body), 0/1."""
    smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), sigma)
    threshold = fraction * float(np.median(sitk.GetArrayFromImage(smooth)))
    dark = sitk.BinaryMorphologicalOpening(sitk.BinaryThreshold(smooth, -1e30, threshold, 1, 0),
                                           [1] * image.GetDimension())
    pieces = sitk.GetArrayFromImage(sitk.ConnectedComponent(dark))
    edges = [np.take(pieces, i, axis=a) for a in range(pieces.ndim) for i in (0, -1)]
    outside = {int(v) for v in np.unique(np.concatenate([e.ravel() for e in edges])) if v}
    ids, counts = np.unique(pieces[pieces > 0], return_counts=True)
    lungs = np.isin(pieces, [int(i) for i, c in zip(ids, counts)
                             if int(i) not in outside and c > min_fraction * pieces.size])
    body = ~np.isin(pieces, list(outside))
    out = []
    for a in (lungs, body):
        m = sitk.GetImageFromArray(a.astype(np.uint8))
        m.CopyInformation(image)
        out.append(sitk.BinaryFillhole(m))
    return out[0], out[1]


def build_ratlung_2d(cache: Path | None = None, *, log=print) -> RealCase:
    """Breathing: RatLungSlice1 -> RatLungSlice2 (insighttoolkit5-examples), lungs by :func:`lung_mask`."""
    cache = Path(cache or default_cache())
    name = "ratlung-2d"
    folder, names, stamp = _case_files(cache, name)
    case = RealCase(name, **names, labels=dict(LUNG), headline=(1,), headline_name="lung", description=(
        "RatLungSlice1.mha onto RatLungSlice2.mha (insighttoolkit5-examples, 128x128, 1 mm); labels: the lungs by "
        "one threshold rule (0.5 x median after a 1-voxel Gaussian, pieces not touching the border, holes filled)"))
    if _cached(names, stamp, NEW_CASE_VERSION):
        return case
    folder.mkdir(parents=True, exist_ok=True)
    log(f"[{name}] building the case in {folder}")
    data = itk_examples(cache)
    fixed = sitk.Cast(sitk.ReadImage(str(data / "RatLungSlice2.mha")), sitk.sitkFloat32)
    moving = sitk.Cast(sitk.ReadImage(str(data / "RatLungSlice1.mha")), sitk.sitkFloat32)
    (fixed_lungs, fixed_body), (moving_lungs, moving_body) = lung_mask(fixed), lung_mask(moving)
    images = {"fixed": fixed, "moving": moving, "fixed_labels": fixed_lungs, "moving_labels": moving_lungs,
              "fixed_mask": fixed_body, "moving_mask": moving_body}
    _write_case(names, stamp, images, {"fixed": "RatLungSlice2.mha", "moving": "RatLungSlice1.mha"}, LUNG, log, name)
    return case


BUILDERS = {"colin27-mni2": build_colin27_mni2, "colin-mni-2mm-rev": build_colin_mni_2mm_rev,
            "colin-mni-1mm": build_colin_mni_1mm, "coronal-2d": build_coronal_2d, "ratlung-2d": build_ratlung_2d}


def case_names(text: str) -> list[str]:
    """A comma list of case names (aliases allowed; 'all' for every case) -> the canonical names."""
    names = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        for n in (REAL_CASES if item == "all" else [ALIASES.get(item, item)]):
            if n not in BUILDERS:
                raise ValueError(f"unknown real case {item!r}; choose from {', '.join(REAL_CASES + list(ALIASES))}, all")
            if n not in names:
                names.append(n)
    return names


def build_real_case(name: str, cache: Path | None = None, *, log=print) -> RealCase:
    name = ALIASES.get(name, name)
    if name not in BUILDERS:
        raise ValueError(f"unknown real case {name!r}; choose from {', '.join(REAL_CASES)}")
    return BUILDERS[name](cache, log=log)


# ----------------------------------------------------------------------------- measuring
def measure_real(case: RealCase, displacement: Path | None) -> dict:
    """Dice/HD95 per label, the headline mean Dice (``dice_mean``; for the brains also
    ``dice_gmwm``), SDlogJ and folding of one tool's field (``None``: the identity, i.e. the
    headers alone)."""
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
            field = np.zeros((grid.ndim, *grid.shape))
        else:
            found = read_displacement_field(displacement, dtype=torch.float64)
            field = found.displacement(grid)[0].numpy()  # the field itself when already on the fixed grid
            warped = al.resample(moving_labels, grid, found.to(torch.float32), interpolation="nearest")
    a = warped.data[0, 0].numpy().astype(np.int16)
    b = fixed_labels.data[0, 0].numpy().astype(np.int16)
    labels = case.labels
    d, h = dice(a, b, labels=list(labels)), hd95(a, b, grid, labels=list(labels))
    jac, jac_all = jacobian_stats(field, grid, mask=brain), jacobian_stats(field, grid)
    row = {f"dice_{n}": d[k] for k, n in labels.items()} | {f"hd95_{n}": h[k] for k, n in labels.items()}
    row["dice_mean"] = float(np.mean([d[k] for k in case.headline]))
    row["hd95_mean"] = float(np.mean([h[k] for k in case.headline]))
    row["headline"] = case.headline_name
    if case.labels == TISSUES:  # the names of the first version's rows
        row["dice_gmwm"], row["hd95_gmwm"] = row["dice_mean"], row["hd95_mean"]
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
        flag = "--preset" if what in ("rigid", "affine", "bspline", "diffeomorphic", "intersubject", "smooth") else "--metric"
        return airlab_command(case, out, [flag, what, "--device", device])
    if tool in ("ants", "elastix", "fireants"):
        return [sys.executable, str(HERE / "tools" / f"run_{tool}.py"), str(case.fixed), str(case.moving), str(out),
                "--device", device]
    if tool == "ants-syncc":  # ANTs' inter-subject recipe: slow (half an hour a 2 mm brain on 2 cores)
        return [sys.executable, str(HERE / "tools" / "run_ants.py"), str(case.fixed), str(case.moving), str(out),
                "--device", device, "--transform", "SyNCC"]
    raise ValueError(f"unknown tool {tool!r}")


def run_tool(label: str, cmd: list[str] | None, case: RealCase, out: Path, timeout: float, *, repeats: int = 1,
             repeat_under: float = 60.0) -> dict:
    """One tool's row: its process run ``repeats`` times (only while the first run took less than
    ``repeat_under`` s; time: the median), the accuracy of the first run's field."""
    from compare import cpu_seconds, run_process  # the whole-process clock and peak memory of compare.py

    row = {"case": case.name, "tool": label, "command": shlex.join(cmd) if cmd else None}
    if cmd is None:
        return row | {"seconds": 0.0, "peak_mb": None} | measure_real(case, None)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    seconds, mb, error = run_process(cmd, out / "log.txt", timeout)
    if error:
        return row | {"error": error}
    times, cpu = [seconds], cpu_seconds(out / "log.txt")
    for rep in range(1, repeats if seconds < repeat_under else 1):  # later runs only time, in a scratch folder
        again = out.parent / f"{out.name}.rep{rep}"
        shutil.rmtree(again, ignore_errors=True)
        again.mkdir(parents=True)
        more, more_mb, error = run_process([str(again) if a == str(out) else a for a in cmd], again / "log.txt", timeout)
        shutil.rmtree(again, ignore_errors=True)
        if error:
            return row | {"error": f"repeat {rep}: {error}"}
        times.append(more)
        mb = max(mb, more_mb)
    row |= {"seconds": float(np.median(times)), "peak_mb": mb, "cpu_s": cpu}  # cpu_s: the first run's
    if len(times) > 1:
        row["repeats"] = times
    if (out / "metrics.json").is_file():  # airlab's own clock: registration alone, without start-up and I/O
        row["registration_s"] = json.loads((out / "metrics.json").read_text()).get("registration_time_s")
    return row | measure_real(case, out / "displacement.nii.gz")


def fmt(value, digits):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def _dice_labels(r: dict) -> str:
    names = [k[5:] for k in r if k.startswith("dice_") and k not in ("dice_mean", "dice_gmwm")]
    return " / ".join(f"{n} {fmt(r[f'dice_{n}'], 3)}" for n in names)


def markdown(rows: list[dict]) -> str:
    lines = ["| case | tool | time s | CPU s | reg. s | mean Dice | Dice per label | HD95 mm | SDlogJ | folding |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = list(dict.fromkeys(r["case"] for r in rows))  # a case's rows together, cases as first met
    for r in sorted(rows, key=lambda r: order.index(r["case"])):
        if "error" in r:
            lines.append(f"| {r['case']} | {r['tool']} | failed: {r['error'].replace('|', '/')} | | | | | | | |")
            continue
        n = len(r.get("repeats") or [])
        mean = r.get("dice_mean", r.get("dice_gmwm"))
        hd = r.get("hd95_mean", r.get("hd95_gmwm"))
        lines.append(f"| {r['case']} | {r['tool']} | {fmt(r['seconds'], 1)}{f' ({n})' if n > 1 else ''} | "
                     f"{fmt(r.get('cpu_s'), 1)} | {fmt(r.get('registration_s'), 1)} | **{fmt(mean, 3)}** ({r.get('headline', 'GM/WM')}) | "
                     f"{_dice_labels(r)} | {fmt(hd, 2)} | {fmt(r['sdlogj'], 3)} | {r['folding']} |")
    lines += ["", "Dice: the moving labels carried onto the fixed grid by the tool's field, nearest neighbour; mean "
              "Dice: of the labels in brackets (brains: k-means Atropos grey and white matter; rat lung: the lungs "
              "by one threshold rule). HD95: mean over the same labels. SDlogJ and folding (voxels with det J <= 0): "
              "inside the fixed brain (body) mask. Time: the whole process, wall clock (\"(3)\": the median of 3 "
              "runs); CPU s: user + system time of the (first) process, all its threads; reg. s: airlab's registration alone "
              "(metrics.json)."]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", "--case", default=",".join(DEFAULT_CASES),
                        help=f"comma list from {', '.join(REAL_CASES)} (alias colin-mni-2mm = colin27-mni2), or all")
    parser.add_argument("--tools", default="airlab,ants",
                        help="comma list: identity, airlab, airlab-PRESET (affine, bspline, intersubject, ...), airlab-METRIC "
                        "(lncc, ncc, mi, ...), ants, ants-syncc (slow), elastix, fireants; 'none' for only --config rows")
    parser.add_argument("--config", type=Path, nargs="*", default=[],
                        help="airlab YAML pipelines, one row each (named by the file's stem)")
    parser.add_argument("--airlab-args", action="append", default=[], metavar="'ARGS'",
                        help="extra rows: `airlab register` options, e.g. '--metric lncc --seed 1'")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--cache", type=Path, default=None, help="data cache (default $AIRLAB_REAL_CACHE or "
                        "~/.cache/airlab/real)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "real",
                        help="outputs: OUT/CASE/TOOL/, OUT/rows.json, OUT/results.md")
    parser.add_argument("--results", type=Path, default=None,
                        help="a rows JSON to extend (default OUT/rows.json, started afresh)")
    parser.add_argument("--timeout", type=float, default=7200.0)
    parser.add_argument("--build-only", action="store_true", help="build (cache) the cases and run no tool")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    try:
        names = case_names(args.cases)
    except ValueError as exc:
        parser.error(str(exc))
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = args.results or out / "rows.json"
    rows = json.loads(results.read_text(encoding="utf-8")) if args.results and results.is_file() else []
    for name in names:
        try:
            case = build_real_case(name, args.cache)
        except RuntimeError as exc:
            parser.exit(2, f"cannot build {name}: {exc}\n")
        if args.build_only:
            print(f"[{name}] built: {case.fixed.parent}")
            continue
        where = out / case.name
        jobs = []
        for tool in [t.strip() for t in args.tools.split(",") if t.strip() and t.strip() != "none"]:
            jobs.append((tool, tool_command(tool, case, where / tool, args.device), where / tool))
        for cfg in args.config:
            jobs.append((f"airlab:{cfg.stem}", airlab_command(case, where / cfg.stem, [
                "--config", str(cfg.resolve()), "--device", args.device]), where / cfg.stem))
        for extra in args.airlab_args:
            folder = where / ("args" + re.sub(r"[^A-Za-z0-9.]+", "_", extra))
            jobs.append(("airlab " + extra, airlab_command(case, folder, [*shlex.split(extra), "--device", args.device]),
                         folder))
        for label, cmd, folder in jobs:
            print(f"[{case.name}] {label} ...", end=" ", flush=True)
            start = time.perf_counter()
            row = run_tool(label, cmd, case, folder, args.timeout)
            rows = [r for r in rows if r["tool"] != label or r["case"] != case.name] + [row]
            results.write_text(json.dumps(rows, indent=2), encoding="utf-8")
            print(row["error"] if "error" in row else f"{row['seconds']:.1f} s, mean {row['headline']} Dice "
                  f"{row['dice_mean']:.3f} (measured in {time.perf_counter() - start - row['seconds']:.0f} s)", flush=True)
    if args.build_only:
        return
    table = markdown(rows)
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
