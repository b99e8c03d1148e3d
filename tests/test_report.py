"""The visual QC report: the pictures, a self-contained page, folding, physical aspect, a browser."""

import base64
import io
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

import airlab as al
from airlab import report
from airlab.datasets import example_path, mni152
from airlab.evaluate import jacobian_stats
from airlab.synthetic import random_deformation

HISTORY = [{"stage": "rigid", "level": 0, "shrink": 4.0, "objective": [1.0 - 0.02 * i for i in range(20)]},
           {"stage": "rigid", "level": 1, "shrink": 2.0, "objective": [0.7 - 0.01 * i for i in range(10)]},
           {"stage": "bspline", "level": 0, "shrink": 2.0, "objective": [-0.5 - 0.01 * i for i in range(15)]}]
METRICS = {"command": "register", "preset": "bspline", "metric": "mi", "device": "cpu", "seed": 0,
           "stages": [{"stage": h["stage"], "level": h["level"], "shrink": h["shrink"],
                       "iterations": len(h["objective"]), "final_objective": h["objective"][-1], "time_s": 1.25}
                      for h in HISTORY],
           "registration_time_s": 12.345, "endpoint_error_mm": {"mean": 0.3125, "p95": 0.875},
           "versions": {"airlab": "0.1.0", "torch": torch.__version__}}
FOLD = np.array([int(report.FOLD_COLOUR[i:i + 2], 16) for i in (1, 3, 5)])


def _deformed(fixed):
    deformation = random_deformation(fixed.grid, 1)
    with torch.no_grad():
        return al.resample(fixed, fixed.grid, deformation)


def _folded(grid):
    """A field that compresses x by -3 per mm at the centre: det = 1 - 3 < 0 there."""
    x = grid.points(dtype=torch.float64)[0] - torch.as_tensor(grid.center())
    bump = torch.exp(-(x**2).sum(-1) / (2 * 12.0**2))
    u = torch.zeros(1, grid.ndim, *grid.shape, dtype=torch.float64)
    u[0, 0] = -3.0 * x[..., 0] * bump
    return u


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """A 3D report (displacement given as a transform) and a 2D one with a folded field."""
    out = {}
    fixed = mni152()[0].to(torch.float32)
    moving = _deformed(fixed)
    smooth = random_deformation(fixed.grid, 1, max_displacement=2.0)  # folds nowhere, borders included
    out[3] = tmp_path_factory.mktemp("r3")
    write_report(out[3], fixed, moving, fixed, smooth, HISTORY, METRICS)
    fixed = al.read_image(example_path("mni152_t1_1mm_axial")).to(torch.float32)
    moving = _deformed(fixed)
    out[2] = tmp_path_factory.mktemp("r2")
    write_report(out[2], fixed, moving, moving, _folded(fixed.grid), HISTORY, METRICS)
    return out


def write_report(outdir, *args):
    png, page = report.write_report(outdir, *args)
    assert png == outdir / "report.png" and page == outdir / "report.html"
    return png, page


def _pixels(path) -> np.ndarray:
    return np.asarray(PILImage.open(path).convert("RGB")).astype(int)


def _fold_pixels(path) -> int:
    return int((np.abs(_pixels(path) - FOLD).sum(-1) < 30).sum())


@pytest.mark.parametrize("dim", [2, 3])
def test_png_is_a_reasonable_picture(reports, dim):
    png = reports[dim] / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 50_000 < png.stat().st_size < 1_500_000
    width, height = PILImage.open(png).size
    assert width >= 1500 and height >= 500
    pixels = _pixels(png)
    assert pixels.std() > 30 and (pixels.sum(-1) < 600).mean() > 0.1  # not blank


@pytest.mark.parametrize("dim", [2, 3])
def test_html_is_self_contained(reports, dim):
    page = (reports[dim] / "report.html").read_text(encoding="utf-8")
    assert (reports[dim] / "report.html").stat().st_size < 1_500_000
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"""(src|href)\s*=\s*(?!["']?data:)""", page), "only data: URIs may be loaded"
    assert "<link" not in page and "<script src" not in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 4
    for encoded in images:
        picture = PILImage.open(io.BytesIO(base64.b64decode(encoded)))
        picture.verify()
        assert picture.format == "PNG"


def test_html_holds_the_numbers(reports):
    page = (reports[3] / "report.html").read_text(encoding="utf-8")
    finals = [f"<td>{s['final_objective']:.6g}</td>" for s in METRICS["stages"]]
    for text in ["bspline", "<td>mi</td>", "<td>cpu</td>", "12.345", "0.3125", "0.875", "SD of log-Jacobian",
                 "folding (% of voxels)", "airlab 0.1.0", *finals]:
        assert text in page, text


def test_folding_is_counted_and_highlighted(reports):
    fixed = al.read_image(example_path("mni152_t1_1mm_axial"))
    expected = jacobian_stats(_folded(fixed.grid), fixed.grid)["folding_count"]
    assert expected > 0
    page = (reports[2] / "report.html").read_text(encoding="utf-8")
    assert f"<td>{expected}</td>" in page
    assert _fold_pixels(reports[2] / "report.png") > 20
    assert _fold_pixels(reports[3] / "report.png") == 0  # a smooth deformation: nothing highlighted


def test_planes_keep_physical_aspect():
    """Voxels of 1 x 3 mm: the panel covers 59 x 57 mm, not 60 x 20 voxels."""
    image = al.Image(torch.rand(1, 1, 20, 60), al.Grid((60, 20), (1.0, 3.0), (5.0, -7.0)))
    (plane,) = report._planes(image, report._window(image))
    left, right, bottom, top = plane.extent
    assert right - left == pytest.approx(60.0) and bottom - top == pytest.approx(58.0)
    values = plane.sample(image.data, image.grid)[0]
    assert values.shape == (58, 60) and np.isfinite(values).all()


def test_planes_are_in_physical_orientation():
    """A flipped direction shows the same picture as the plain grid with the same points."""
    data = torch.rand(1, 1, 9, 11, 13)
    plain = al.Image(data, al.Grid((13, 11, 9), (1.0, 2.0, 1.5), (0.0, 0.0, 0.0)))
    flipped = al.Image(data.flip(2, 4), al.Grid((13, 11, 9), (1.0, 2.0, 1.5), (12.0, 0.0, 16 * 0.75),
                                                 (-1, 0, 0, 0, 1, 0, 0, 0, -1)))
    for a, b in zip(report._planes(plain, (0.0, 1.0)), report._planes(flipped, (0.0, 1.0))):
        assert a.extent == pytest.approx(b.extent)
        assert np.allclose(a.sample(plain.data, plain.grid), b.sample(flipped.data, flipped.grid), atol=1e-6)


# --------------------------------------------------------------------------- a real browser
def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("AIRLAB_REQUIRE_BROWSER") == "1":
            pytest.fail("AIRLAB_REQUIRE_BROWSER=1 but no chromium is installed")
        pytest.skip("chromium is not installed")
    return path


def _browse(page, tmp_path, *args) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", *args, page.as_uri()]
    # the page holds non-ASCII text; decode it whatever the locale
    return subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace", timeout=60)


def test_browser_renders_the_report(reports, tmp_path):
    page = reports[3] / "report.html"
    shot = tmp_path / "shot.png"
    done = _browse(page, tmp_path, f"--screenshot={shot}", "--window-size=1400,3000")
    assert shot.exists(), done.stderr[-2000:]
    pixels = _pixels(shot)
    assert pixels.std() > 30 and (pixels.sum(-1) < 600).mean() > 0.05
    done = _browse(page, tmp_path, "--virtual-time-budget=5000", "--dump-dom")
    rendered = re.search(r'id="rendered"[^>]*>(\d+) of (\d+)<', done.stdout)
    assert rendered, done.stderr[-2000:]
    assert rendered.group(1) == rendered.group(2) == "4"


def test_a_moving_image_elsewhere_in_space_is_shown_on_its_own_planes(tmp_path):
    """Another scanner's coordinates put the moving image 200 mm away: its panels were black."""
    fixed = al.read_image(example_path("mni152_t1_1mm_axial")).to(torch.float32)
    g = fixed.grid
    far = al.Image(fixed.data.clone(), al.Grid(g.size, g.spacing, np.asarray(g.origin) + [200.0, -50.0], g.direction))
    planes = report._planes(fixed, report._window(fixed))
    zero = torch.zeros(1, 2, *g.shape)
    views = report._views(fixed, far, fixed, zero, torch.ones(1, *g.shape), planes, (fixed.data > 50).float())
    assert views[0]["moving_plane"] is not None and np.isfinite(views[0]["moving"]).mean() > 0.9
    near = report._views(fixed, fixed, fixed, zero, torch.ones(1, *g.shape), planes, (fixed.data > 50).float())
    assert near[0]["moving_plane"] is None
    png, _ = write_report(tmp_path, fixed, far, fixed, zero[:, :2], HISTORY, METRICS)
    assert png.stat().st_size > 10_000


def test_deformation_panels_show_the_deformable_part_relative_to_the_linear_one():
    """T = L o D: the panels take D (L^-1 T), not the affine's shift and scale."""
    grid = al.Grid([20, 24], [1.5, 1.0], [3.0, -7.0])
    linear = al.transforms.Affine(2, 1, matrix=torch.tensor([[[1.2, 0.1], [-0.05, 0.9]]], dtype=torch.float64),
                                  translation=torch.tensor([[15.0, -8.0]], dtype=torch.float64),
                                  center=torch.tensor([[10.0, 5.0]], dtype=torch.float64))
    deformable = _folded(grid) * 0.1  # smooth, known
    field = al.transforms.DisplacementField(grid, 1, deformable)
    whole = al.transforms.Composite(field, linear).displacement(grid).detach()
    relative = report._relative_to_linear(whole, grid, linear)
    assert torch.allclose(relative, deformable, atol=1e-9)


def test_a_determinant_given_by_the_caller_is_the_relative_one():
    """write_report(determinant=det T) shows det T / det L, the deformable part's determinant."""
    from airlab.regularisers import jacobian_determinant

    grid = al.Grid([20, 24], [1.5, 1.0], [3.0, -7.0], [0.6, -0.8, 0.8, 0.6])
    linear = al.transforms.Affine(2, 1, matrix=torch.tensor([[[1.2, 0.1], [-0.05, 0.9]]], dtype=torch.float64),
                                  translation=torch.tensor([[15.0, -8.0]], dtype=torch.float64))
    field = al.transforms.DisplacementField(grid, 1, _folded(grid) * 0.1)
    whole = al.transforms.Composite(field, linear).displacement(grid).detach()
    relative = jacobian_determinant(report._relative_to_linear(whole, grid, linear), grid)
    given = jacobian_determinant(whole, grid) / torch.linalg.det(linear.matrix()[0])
    assert torch.allclose(given, relative, atol=1e-9)


def test_the_report_with_and_without_a_given_determinant_agrees(tmp_path):
    from airlab.regularisers import jacobian_determinant

    grid = al.Grid([20, 24], [1.5, 1.0], [3.0, -7.0])
    image = al.Image(torch.rand(1, 1, *grid.shape, generator=torch.Generator().manual_seed(0)), grid)
    linear = al.transforms.Affine(2, 1, matrix=torch.tensor([[[1.1, 0.1], [-0.05, 0.9]]], dtype=torch.float64))
    field = al.transforms.DisplacementField(grid, 1, _folded(grid) * 0.1)
    whole = al.transforms.Composite(field, linear).displacement(grid).detach()
    tables = []
    for name, det in (("computed", None), ("given", jacobian_determinant(whole, grid)[0])):
        (tmp_path / name).mkdir()
        _, html = report.write_report(tmp_path / name, image, image, image, whole, [], {}, linear=linear,
                                      determinant=det)
        tables.append(re.findall(r"<td>(.*?)</td>", html.read_text(encoding="utf-8")))
    assert tables[0] and tables[0] == tables[1]
