"""`airlab register` and `airlab warp` end to end: files in, files out, checked with SimpleITK."""

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import airlab as al
from airlab.datasets import example_path
from airlab.evaluate import dice as dice_of
from airlab.synthetic import ground_truth, random_deformation

FIXED = example_path("mni152_t1_1mm_axial")


def airlab(*args, cwd=None):
    done = subprocess.run([sys.executable, "-m", "airlab", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd)
    return done.returncode, done.stdout, done.stderr


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """The 1 mm MNI slice and a deformed copy, registered once with the default preset."""
    root = tmp_path_factory.mktemp("cli")
    fixed = al.read_image(FIXED).to(torch.float32)
    deformation = random_deformation(fixed.grid, 3)
    with torch.no_grad():
        moving = al.resample(fixed, fixed.grid, deformation)
    al.write_image(moving, root / "moving.nii.gz")
    labels = al.Image((fixed.data > 60).to(torch.int16) + (fixed.data > 120).to(torch.int16), fixed.grid)
    al.write_image(labels, root / "labels.nii.gz")
    with torch.no_grad():
        al.write_image(al.resample(labels, fixed.grid, deformation), root / "moving_labels.nii.gz")
    truth, _ = ground_truth(deformation, fixed.grid)
    points = np.array([[10.0, -20.0], [0.0, 0.0], [-30.5, 15.25], [40.0, 30.0]])
    np.savetxt(root / "fixed_points.csv", points, delimiter=",", header="x,y", comments="")
    np.savetxt(root / "moving_points.csv", truth.transform_points(points), delimiter=",", header="x,y", comments="")
    code, out, err = airlab("register", FIXED, root / "moving.nii.gz", "-o", root / "out", "--quiet")
    assert code == 0, err
    return root


def test_register_writes_the_contract(registered):
    out = registered / "out"
    assert sorted(p.name for p in out.iterdir()) == ["affine.txt", "displacement.nii.gz", "inverse_displacement.nii.gz",
                                                       "metrics.json", "report.html", "report.png", "warped.nii.gz"]
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "data:image/png;base64," in (out / "report.html").read_text(encoding="utf-8")
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["preset"] == "diffeomorphic" and metrics["device"] == "cpu"
    assert [s["stage"] for s in metrics["stages"]][-1] == "diffeomorphic"
    assert all(s["iterations"] > 0 for s in metrics["stages"])
    assert {"airlab", "torch", "SimpleITK"} <= set(metrics["versions"])
    assert sitk.ReadTransform(str(out / "affine.txt")).GetName() == "AffineTransform"


def test_displacement_reproduces_warped_in_simpleitk(registered):
    out = registered / "out"
    field = sitk.ReadImage(str(out / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    moving = sitk.ReadImage(str(registered / "moving.nii.gz"))
    fixed = sitk.ReadImage(str(FIXED))
    assert field.GetSize() == fixed.GetSize() and field.GetOrigin() == fixed.GetOrigin()
    theirs = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(field),
                                                  sitk.sitkLinear, 0.0))
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz")))
    inner = np.zeros(ours.shape, bool)
    inner[5:-5, 5:-5] = True
    value_range = float(sitk.GetArrayFromImage(moving).max())
    assert np.abs(ours - theirs)[inner].max() < 1e-3 * value_range
    # and the registration did its job: warped resembles fixed far more than moving did
    f = sitk.GetArrayFromImage(fixed).astype(float)
    before = np.abs(sitk.GetArrayFromImage(moving) - f).mean()
    assert np.abs(ours - f).mean() < 0.35 * before


def test_warp_labels_keeps_values_and_type(registered, tmp_path):
    code, _, err = airlab("warp", registered / "labels.nii.gz", "-t", registered / "out", "-r", FIXED,
                          "-o", tmp_path / "labels_warped.nii.gz")
    assert code == 0, err
    warped = sitk.ReadImage(str(tmp_path / "labels_warped.nii.gz"))
    assert warped.GetPixelID() == sitk.sitkInt16
    assert set(np.unique(sitk.GetArrayFromImage(warped))) <= {0, 1, 2}


def test_warp_points(registered, tmp_path):
    pts = np.array([[10.0, -20.0], [0.0, 0.0], [-30.5, 15.25]])
    np.savetxt(tmp_path / "pts.csv", pts, delimiter=",", header="x,y", comments="")
    code, _, err = airlab("warp", registered / "moving.nii.gz", "-t", registered / "out" / "displacement.nii.gz",
                          "-r", FIXED, "-o", tmp_path / "w.nii.gz", "--points", tmp_path / "pts.csv")
    assert code == 0, err
    mapped = np.loadtxt(tmp_path / "w_points.csv", delimiter=",", skiprows=1)
    tx = sitk.DisplacementFieldTransform(sitk.ReadImage(str(registered / "out" / "displacement.nii.gz"),
                                                        sitk.sitkVectorFloat64))
    assert np.allclose(mapped, [tx.TransformPoint(p) for p in pts.tolist()], atol=1e-4)


def test_affine_preset_3d_with_masks(tmp_path):
    fixed = example_path("mni152_t1_2mm")
    mask = example_path("mni152_tissue_2mm")
    code, _, err = airlab("register", fixed, fixed, "-o", tmp_path / "o", "--preset", "affine", "--quiet",
                          "--fixed-mask", mask, "--moving-mask", mask)
    assert code == 0, err
    affine = sitk.ReadTransform(str(tmp_path / "o" / "affine.txt"))
    pts = [[10.0, -20.0, 5.0], [-40.0, 30.0, 20.0]]
    assert np.allclose([affine.TransformPoint(p) for p in pts], pts, atol=0.2)  # itself: identity


def test_evaluate_measures(registered, tmp_path):
    code, out, err = airlab("evaluate", "-t", registered / "out", "--fixed-labels", registered / "labels.nii.gz",
                            "--moving-labels", registered / "moving_labels.nii.gz", "--fixed-points",
                            registered / "fixed_points.csv", "--moving-points", registered / "moving_points.csv",
                            "--json", tmp_path / "m.json")
    assert code == 0, err
    report = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    assert report["folding_voxels"] == 0 and report["log_jacobian_std"] > 0
    assert report["dice"]["2"] > 0.9 and set(report["dice"]) == {"1", "2", "mean"}
    assert report["tre_mm"]["mean"] < 0.5 < report["tre_before_mm"]["mean"]
    assert "Dice 2" in out and "TRE" in out
    code, _, err = airlab("evaluate", "-t", registered / "out", "--fixed-labels", registered / "labels.nii.gz")
    assert code == 2 and "go together" in err


# --------------------------------------------------------------------------- bad input
def _one_line(err):
    lines = err.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("airlab: error:")


def test_missing_file(tmp_path):
    code, _, err = airlab("register", FIXED, tmp_path / "absent.nii.gz", "-o", tmp_path / "o")
    assert code == 2 and "absent.nii.gz" in err and "does not exist" in err
    assert not (tmp_path / "o").exists()


def test_dimension_mismatch(tmp_path):
    code, _, err = airlab("register", FIXED, example_path("mni152_t1_2mm"), "-o", tmp_path / "o", "--quiet")
    assert code == 1 and _one_line(err) and "3D moving image to a 2D fixed image" in err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".airlab-*"))


def test_corrupt_header(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    code, _, err = airlab("register", FIXED, bad, "-o", tmp_path / "o", "--quiet")
    assert code == 1 and _one_line(err) and "bad.nii.gz" in err
    assert not (tmp_path / "o").exists()


def test_nan_image(tmp_path):
    image = al.read_image(FIXED).to(torch.float32)
    image.data[0, 0, 50, 50] = float("nan")
    al.write_image(image, tmp_path / "nan.mha")  # ITK's NIfTI reader turns NaN into 0; MetaImage keeps it
    code, _, err = airlab("register", FIXED, tmp_path / "nan.mha", "-o", tmp_path / "o", "--quiet")
    assert code == 1 and _one_line(err) and "NaN" in err


def test_empty_mask(tmp_path):
    image = al.read_image(FIXED)
    al.write_image(al.Image(torch.zeros_like(image.data, dtype=torch.uint8), image.grid), tmp_path / "m.nii.gz")
    code, _, err = airlab("register", FIXED, FIXED, "-o", tmp_path / "o", "--quiet", "--fixed-mask", tmp_path / "m.nii.gz")
    assert code == 1 and _one_line(err) and "mask is empty" in err


def test_existing_outputs_are_kept(registered, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "warped.nii.gz").write_text("mine")
    (out / "notes.txt").write_text("also mine")
    code, _, err = airlab("register", FIXED, registered / "moving.nii.gz", "-o", out, "--quiet", "--preset", "rigid")
    assert code == 2 and _one_line(err) and "--overwrite" in err
    assert (out / "warped.nii.gz").read_text(encoding="utf-8") == "mine"
    code, _, err = airlab("register", FIXED, registered / "moving.nii.gz", "-o", out, "--quiet", "--preset", "rigid",
                          "--overwrite")
    assert code == 0, err
    assert (out / "notes.txt").read_text(encoding="utf-8") == "also mine"  # --overwrite touches only airlab's outputs
    assert sitk.ReadImage(str(out / "warped.nii.gz")).GetSize() == sitk.ReadImage(str(FIXED)).GetSize()


def test_debug_shows_the_traceback(tmp_path):
    code, _, err = airlab("--debug", "register", FIXED, example_path("mni152_t1_2mm"), "-o", tmp_path / "o", "--quiet")
    assert code != 0 and "Traceback" in err


def test_help_is_complete():
    for cmd in ([], ["register"], ["warp"], ["evaluate"], ["demo"]):
        code, out, _ = airlab(*cmd, "--help")
        assert code == 0 and "Usage" in out
    _, out, _ = airlab("register", "--help")
    for option in ("--preset", "--metric", "--fixed-mask", "--moving-mask", "--device", "--seed", "--quiet", "--overwrite"):
        assert option in out


def test_progress_in_logs_is_one_line_per_level(registered, tmp_path):
    code, out, err = airlab("register", FIXED, registered / "moving.nii.gz", "-o", tmp_path / "o", "--preset", "rigid")
    assert code == 0, err
    lines = err.strip().splitlines()
    assert lines and all(ln.startswith("rigid level ") and "iterations" in ln for ln in lines)
    assert "\r" not in err and "results in" in out and "report.html" in out


def test_demo_says_where_the_report_is(tmp_path, monkeypatch):
    """The demo in-process, each stage cut to its coarsest level and a few iterations: quick."""
    from dataclasses import replace

    from click.testing import CliRunner

    from airlab import cli
    from airlab.pipelines import PipelineConfig

    full = PipelineConfig.build
    monkeypatch.setattr(PipelineConfig, "build", lambda self, grid: [
        replace(s, levels=[replace(s.levels[0], iterations=3)]) for s in full(self, grid)])
    done = CliRunner().invoke(cli.main, ["demo", "-o", str(tmp_path / "d"), "--quiet"])
    assert done.exit_code == 0, done.output
    assert f"report: {tmp_path / 'd' / 'report.html'}" in done.output
    assert (tmp_path / "d" / "report.png").exists() and not list(tmp_path.glob(".airlab-*"))


def test_garbage_collector_is_frozen_only_in_the_console_process():
    """The console process freezes the engine's objects out of the collector (its passes over
    them cost ~0.5 s of each `airlab register`); in-process callers get the collector as it was."""
    import gc

    from airlab import cli

    class Ctx:
        meta = {}

    frozen = gc.get_freeze_count()
    with cli._engine_imports(Ctx()):
        assert not gc.isenabled()
    assert gc.isenabled() and gc.get_freeze_count() == frozen
    code = ("import atexit, gc, sys; atexit.register(lambda: print('frozen:', gc.get_freeze_count() > 0)); "
            "sys.argv = ['airlab', '--version']; from airlab.cli import run; run()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "frozen: True" in done.stdout


@pytest.mark.parametrize("given", [None, "300000"])
def test_the_command_shortens_openmp_spinning_unless_told(given):
    """The console entry point sets GOMP_SPINCOUNT before torch loads (libgomp reads it once),
    keeping a value the user gave; in-process callers (the library) are left alone."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"} | ({"GOMP_SPINCOUNT": given} if given else {})
    code = ("import atexit, os, sys; atexit.register(lambda: print('spin:', os.environ.get('GOMP_SPINCOUNT'), "
            "'torch' in sys.modules)); sys.argv = ['airlab', '--version']; from airlab.cli import run; run()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert f"spin: {given or 10000} False" in done.stdout


@pytest.mark.parametrize("error", ["MemoryError()", "torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2 GiB')"])
def test_running_out_of_memory_is_one_line_and_leaves_nothing(tmp_path, error):
    """Memory runs out inside the engine (simulated: a real one would need a machine's worth of
    data): one line, exit 1, no output folder, no staging folder left behind."""
    script = (
        "import sys, torch\n"
        "import airlab.registration as r\n"
        f"def fail(*a, **k): raise {error}\n"
        "r.Registration.run = fail\n"
        "from airlab.cli import run\n"
        f"sys.argv = ['airlab', 'register', {str(FIXED)!r}, {str(FIXED)!r}, '-o', {str(tmp_path / 'out')!r}]\n"
        "run()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1 and "out of memory" in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_inverse_carries_fixed_labels_onto_the_moving_grid(registered, tmp_path):
    """The diffeomorphic preset writes its inverse on MOVING's grid (moving point -> fixed point):
    labels drawn on the fixed image, warped with it, land where the moving image has them."""
    root = registered
    inverse = sitk.ReadImage(str(root / "out" / "inverse_displacement.nii.gz"), sitk.sitkVectorFloat64)
    # SimpleITK takes it as a displacement field (and takes the image's buffer: give it a copy)
    assert sitk.DisplacementFieldTransform(sitk.Image(inverse)).GetDimension() == 2
    moving = sitk.ReadImage(str(root / "moving.nii.gz"))
    assert inverse.GetSize() == moving.GetSize() and np.allclose(inverse.GetOrigin(), moving.GetOrigin())
    code, _, err = airlab("warp", root / "labels.nii.gz", "-t", root / "out" / "inverse_displacement.nii.gz",
                          "-r", root / "moving.nii.gz", "-o", tmp_path / "on_moving.nii.gz")
    assert code == 0, err
    carried = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "on_moving.nii.gz")))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "moving_labels.nii.gz")))
    identity = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "labels.nii.gz")))
    code, _, err = airlab("warp", root / "moving_labels.nii.gz", "-t", root / "out", "-r", FIXED,
                          "-o", tmp_path / "on_fixed.nii.gz")
    assert code == 0, err
    forward = dice_of(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "on_fixed.nii.gz"))), identity)
    dice, before = dice_of(carried, truth), dice_of(identity, truth)
    # as good as the forward direction (label 1 is a thin rim: 0.85 both ways), far above no registration
    assert all(dice[k] > forward[k] - 0.02 and dice[k] > before[k] + 0.05 for k in (1, 2)) and dice["mean"] > 0.9
    metrics = json.loads((root / "out" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["inverse_consistency_mm"]["mean"] < 0.05 and metrics["inverse_consistency_mm"]["max"] < 0.5
