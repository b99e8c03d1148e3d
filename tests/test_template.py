"""Template building (`airlab template`, airlab.template): the numerics, a small 2D group with a
known mean shape, and the command line end to end (resume, bad input, SimpleITK-readable files).

The group: the shipped MNI axial slice at 3 mm warped by seeded smooth deformations D_i (image i
is MNI o D_i). With v_i the exact inverse of D_i, the template in the middle of the group sees
the slice through G = (id + mean v_i)^-1, and a template's position error is
|mean_i D_i(T_i(x)) - G(x)| for the transforms T_i found from it to the images."""

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
from airlab.datasets import example_path
from airlab.errors import GroupError, OutputExistsError
from airlab.groupwise import RunningMean, foreground, shape_update, sharpen, sharpness
from airlab.synthetic import ground_truth, random_deformation
from airlab.template import TemplateProgress, build, image_names
from airlab.transforms import DisplacementField, Translation, invert_displacement, read_displacement_field

N = 4


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    root = tmp_path_factory.mktemp("group")
    full = al.read_image(example_path("mni152_t1_1mm_axial")).to(torch.float32)
    grid = full.grid.with_spacing(3.0)
    deformations, paths, mean_inverse = [], [], RunningMean()
    with torch.no_grad():
        base = al.resample(full, grid)
        for i in range(N):
            d = random_deformation(grid, i, max_displacement=6.0)
            al.write_image(al.resample(base, grid, d, interpolation="bspline"), root / f"s{i}.nii.gz")
            mean_inverse.add(ground_truth(d, grid)[0].field.detach().double())
            deformations.append(d.double())
            paths.append(root / f"s{i}.nii.gz")
        w, _ = invert_displacement(mean_inverse.mean, grid)
        truth = al.resample(base.to(torch.float64), grid, DisplacementField(grid, 1, w), interpolation="bspline")
    g_true = grid.points(torch.float64) + torch.movedim(w, 1, -1)
    return {"root": root, "paths": paths, "grid": grid, "base": base, "deformations": deformations,
            "g_true": g_true, "truth": truth, "mask": foreground(truth.data)}


@pytest.fixture(scope="module")
def built(group, tmp_path_factory):
    """The group's template, one iteration, its registrations kept."""
    out = tmp_path_factory.mktemp("built") / "run"
    return out, build(group["paths"], out, iterations=1, report=False, keep_work=True)


def airlab(*args):
    done = subprocess.run([sys.executable, "-m", "airlab", "template", *map(str, args)], capture_output=True,
                          text=True, timeout=600)
    return done.returncode, done.stdout, done.stderr


# ------------------------------------------------------------------------------ numerics
def test_running_mean_weighted_and_holds_nothing_it_is_given():
    rng = np.random.default_rng(0)
    values = [torch.as_tensor(rng.normal(size=(1, 1, 5, 6))) for _ in range(7)]
    weights = [torch.as_tensor(rng.uniform(0, 1, size=(1, 1, 5, 6))) for _ in range(7)]
    mean = RunningMean()
    alive = []
    for v, w in zip(values, weights):
        given = v.clone()
        alive.append(weakref.ref(given))
        mean.add(given, w)
        del given
    assert all(ref() is None for ref in alive)  # streamed: nothing kept but the sums
    expected = sum(v * w for v, w in zip(values, weights)) / sum(weights)
    assert torch.allclose(mean.mean, expected, atol=1e-12)
    plain = RunningMean()
    for v in values:
        plain.add(v)
    assert torch.allclose(plain.mean, torch.stack(values).mean(0), atol=1e-12) and plain.count == 7
    zero = RunningMean()
    zero.add(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    assert torch.equal(zero.mean, torch.zeros(1, 1, 2, 2))


def test_shape_update_removes_the_mean_displacement(group):
    """A template seen through a shift t (the group's mean displacement is t) comes back."""
    base, grid = group["base"], group["grid"]
    shift = Translation(2, translation=[4.5, -3.0], dtype=torch.float64)
    with torch.no_grad():
        shifted = al.resample(base.to(torch.float64), grid, shift, interpolation="bspline")
        u = shift.displacement(grid)
    moved, residual = shape_update(shifted, u)
    inner = torch.zeros(grid.shape, dtype=torch.bool)
    inner[5:-5, 5:-5] = True
    error = (moved.data[0, 0] - base.data[0, 0].double()).abs()[inner]
    assert residual < 1e-3
    assert float(error.mean()) < 0.01 * float(base.data.max()), float(error.mean())


def test_sharpness_sees_blur_and_sharpen_restores_it(group):
    base = group["base"]
    from airlab.filters import smooth_mm

    blurred = al.Image(smooth_mm(base.data, base.grid, 3.0), base.grid)
    mask = foreground(base.data)
    assert sharpness(blurred, mask) < 0.8 * sharpness(base, mask)
    assert sharpness(sharpen(blurred, 1.0), mask) > 1.1 * sharpness(blurred, mask)
    assert sharpen(base, 0.0) is base


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


def _epe(mapped, group):
    return float((mapped - group["g_true"]).norm(dim=-1)[0][group["mask"]].mean())


def test_template_is_nearer_the_true_mean_than_the_affine_average(group, built):
    out, summary = built
    work = out / ".airlab-template-work"
    grid = group["grid"]
    # the plain affine average is template_00 seen through the mean affine transform M0 (it is
    # not centred): registrations to it are those to template_00 composed with M0
    m0 = sum(read_displacement_field(work / "iter_00" / f"s{i}" / "displacement.nii.gz",
                                     dtype=torch.float64).field.detach() for i in range(N)) / N
    plain = _epe(_where_in_slice(work / "iter_01", group, grid.points(torch.float64) + torch.movedim(m0, 1, -1)),
                 group)
    final = _epe(_where_in_slice(out / "images", group), group)
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


# ------------------------------------------------------------------------------ without a template
def test_groupwise_registration_finds_the_implicit_mean(group):
    """All images to their implicit mean through the batch dimension: centred (EPE well under
    the plain average's, which is centred only to first order) and as sharp as the true mean."""
    from airlab.groupwise import register_group

    images = [al.read_image(p) for p in group["paths"]]
    result = register_group(images)
    grid, mask = group["grid"], group["mask"]
    with torch.no_grad():
        u = result.transform.displacement(grid).double()
    points = grid.points(torch.float64) + torch.movedim(u, 1, -1)
    with torch.no_grad():
        mapped = sum(d(points[i:i + 1]) for i, d in enumerate(group["deformations"])) / N
        plain = sum(d(grid.points(torch.float64)) for d in group["deformations"]) / N
    assert _epe(mapped, group) < 0.2 and _epe(mapped, group) < 0.6 * _epe(plain, group)
    assert float(u.mean(0).norm(dim=0).mean()) < 0.05  # the velocities average to zero: the mean map is ~identity
    average = al.Image(torch.cat([i.data for i in images]).mean(0, keepdim=True), grid)
    rmse = lambda image: float((image.data[0, 0].double() - group["truth"].data[0, 0])[mask].pow(2).mean().sqrt())  # noqa: E731
    assert rmse(result.template) < 0.3 * rmse(average)
    assert sharpness(result.template, mask) > 0.95 * sharpness(group["truth"], mask)
    assert result.history[-1][-1] < 0.1 * result.history[0][0]
