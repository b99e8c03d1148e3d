"""Template building (`airlab template`, airlab.template, workflows/template.py): a small 2D group
with a known mean shape (conftest's ``group``), and the command line end to end (resume, bad
input, SimpleITK-readable files). The numerics are in test_groupwise.py."""

import json
import os
import subprocess
import sys
import weakref

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import airlab as al
from airlab.errors import GroupError, OutputExistsError
from airlab.groupwise import sharpness
from airlab.template import TemplateProgress, build, image_names
from airlab.transforms import read_displacement_field

from conftest import GROUP_SIZE as N
from conftest import group_epe


@pytest.fixture(scope="module")
def built(group, tmp_path_factory):
    """The group's template, one iteration, its registrations kept."""
    out = tmp_path_factory.mktemp("built") / "run"
    return out, build(group["paths"], out, iterations=1, report=False, keep_work=True)


def airlab(*args):
    done = subprocess.run([sys.executable, "-m", "airlab", "template", *map(str, args)], capture_output=True,
                          text=True, timeout=600)
    return done.returncode, done.stdout, done.stderr


def test_averaging_reads_one_image_at_a_time(group, built, monkeypatch):
    """The round's average streams from the files: at most one image read is alive at a time."""
    import airlab.image as image_module
    from airlab.workflows import template as workflow

    out = built[0]
    real, live, peak = image_module.read_image, weakref.WeakSet(), [0]

    def counting(path, **kw):
        image = real(path, **kw)
        live.add(image)
        peak[0] = max(peak[0], len(live))
        return image

    monkeypatch.setattr(image_module, "read_image", counting)
    grids = [group["grid"]] * 3
    average, field, distances = workflow._average([p.name.split(".")[0] for p in group["paths"][:3]],
                                                  group["paths"][:3], out / workflow.WORK / "iter_01", grids,
                                                  [1.0] * 3, group["mask"])
    assert peak[0] == 1 and len(distances) == 3
    assert average.data.shape == (1, 1, *group["grid"].shape) and field.shape == (1, 2, *group["grid"].shape)


# ------------------------------------------------------------------------------ the template
def _where_in_slice(folder, group, before=None):
    """mean_i D_i(T_i(x)) for the registrations T_i in ``folder``."""
    points = group["grid"].points(torch.float64)
    total = 0
    for i, d in enumerate(group["deformations"]):
        t = read_displacement_field(folder / f"s{i}" / "displacement.nii.gz", dtype=torch.float64)
        with torch.no_grad():
            total = total + d(t.requires_grad_(False)(points if before is None else before))
    return total / N


def test_template_is_nearer_the_true_mean_than_the_affine_average(group, built):
    out, summary = built
    work = out / ".airlab-template-work"
    grid = group["grid"]
    # the plain affine average is template_00 seen through the mean affine transform M0 (it is
    # not centred): registrations to it are those to template_00 composed with M0
    m0 = sum(read_displacement_field(work / "iter_00" / f"s{i}" / "displacement.nii.gz",
                                     dtype=torch.float64).field.detach() for i in range(N)) / N
    plain = group_epe(_where_in_slice(work / "iter_01", group, grid.points(torch.float64) + torch.movedim(m0, 1, -1)),
                 group)
    final = group_epe(_where_in_slice(out / "images", group), group)
    assert final < 0.5 * plain, (final, plain)
    assert final < 0.5, final  # mm, on 3 mm voxels
    template = al.read_image(out / "template.nii.gz")
    mask = group["mask"]
    # as sharp as the slice itself (within 10%), sharper than the affine average
    assert sharpness(template, mask) > 0.9 * sharpness(group["base"], mask)
    assert summary.history[1]["sharpness"] > summary.history[0]["sharpness"]
    rmse = lambda image: float((image.data[0, 0].double() - group["truth"].data[0, 0])[mask].pow(2).mean().sqrt())  # noqa: E731
    assert rmse(template) < 0.7 * rmse(al.read_image(out / "iterations" / "template_00.nii.gz"))
    assert set(summary.final["distance_mm"]) == {f"s{i}" for i in range(N)}


class _Interrupt(TemplateProgress):
    def iteration_done(self, record, total):
        if record["iteration"] == 1:
            raise KeyboardInterrupt


def test_cli_resumes_after_the_last_iteration_and_writes_readable_files(group, tmp_path):
    """With the affine preset (cheap): the deformable path is the test above's."""
    out, paths = tmp_path / "run", group["paths"][:3]
    with pytest.raises(KeyboardInterrupt):
        build(paths, out, iterations=2, preset="affine", progress=_Interrupt(bar=False))
    first = {k: (out / "iterations" / f"template_{k:02d}.nii.gz").stat().st_mtime_ns for k in (0, 1)}
    assert not (out / "iterations" / "template_02.nii.gz").exists() and not (out / "template.nii.gz").exists()
    code, stdout, stderr = airlab(*paths, "-o", out, "--iterations", 2, "--preset", "affine")
    assert code == 0, stderr
    assert "resumed after iteration 1" in stdout
    assert {k: (out / "iterations" / f"template_{k:02d}.nii.gz").stat().st_mtime_ns for k in (0, 1)} == first
    assert "registrations" in stderr  # progress with what is left
    for path in [out / "template.nii.gz"] + [out / "iterations" / f"template_{k:02d}.nii.gz" for k in range(3)]:
        image = sitk.ReadImage(str(path))
        assert image.GetSize() == group["grid"].size and np.isfinite(sitk.GetArrayFromImage(image)).all()
    for i in range(3):
        folder = out / "images" / f"s{i}"
        for name in ("warped.nii.gz", "displacement.nii.gz", "inverse_displacement.nii.gz", "affine.txt",
                     "metrics.json", "report.html"):
            assert (folder / name).is_file(), (folder, name)
        # the contract: SimpleITK resampling the image with displacement.nii.gz gives warped.nii.gz
        field = sitk.ReadImage(str(folder / "displacement.nii.gz"), sitk.sitkVectorFloat64)
        resampled = sitk.Resample(sitk.ReadImage(str(group["paths"][i])), sitk.ReadImage(str(out / "template.nii.gz")),
                                  sitk.DisplacementFieldTransform(field), sitk.sitkLinear, 0.0)
        warped = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "warped.nii.gz")))
        assert np.abs(sitk.GetArrayFromImage(resampled) - warped).max() < 1e-2 * warped.max()
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert [h["iteration"] for h in metrics["history"]] == [0, 1, 2] and metrics["resumed_from_iteration"] == 1
    assert all(h["sharpness"] > 0 for h in metrics["history"]) and metrics["final"]["group_distance_mm"] > 0
    assert metrics["preset"] == "affine"
    rows = (out / "history.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0].startswith("iteration,registrations,sharpness,group_distance_mm") and len(rows) == 5
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("<img") == 2 and "images/index.html" in page
    assert not (out / ".airlab-template-work").exists()
    # a rerun of the finished command registers nothing again
    registered = {p: p.stat().st_mtime_ns for p in out.glob("*/*/metrics.json")}
    again = build(paths, out, iterations=2, preset="affine")
    assert again.resumed_from == 2 and {p: p.stat().st_mtime_ns for p in out.glob("*/*/metrics.json")} == registered
    # other images into the same folder: refused, nothing touched
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(OutputExistsError, match="other images"):
        build(group["paths"], out, iterations=2, preset="affine")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_bad_input_is_one_line_and_creates_nothing(group, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(GroupError, match="at least two images"):
        build([group["paths"][0]], out)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    code, _, stderr = airlab(group["paths"][0], broken, "-o", out)
    assert code == 2 and stderr.count("\n") == 1 and "broken.nii.gz" in stderr
    assert not out.exists()
    volume = tmp_path / "volume.nii.gz"
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkFloat32), str(volume))
    with pytest.raises(GroupError, match="mix 2D and 3D"):
        build([group["paths"][0], volume], out)
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / "s0.nii.gz").write_bytes(group["paths"][0].read_bytes())
    assert image_names([group["paths"][0], twin / "s0.nii.gz"]) == [f"{group['root'].name}_s0", "twin_s0"]
    assert not out.exists()
    # the user's own template.nii.gz is never replaced without --overwrite
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "template.nii.gz").write_bytes(b"mine")
    with pytest.raises(OutputExistsError):
        build(group["paths"][:2], mine)
    assert (mine / "template.nii.gz").read_bytes() == b"mine" and sorted(os.listdir(mine)) == ["template.nii.gz"]
