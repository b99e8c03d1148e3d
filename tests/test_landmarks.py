"""Landmark files: round trips per format, Slicer's RAS/LPS convention, bad files."""

from __future__ import annotations

import json


import numpy as np
import pytest
import torch

from airlab import Grid
from airlab.errors import InputError
from airlab.landmarks import read_points, write_points

P3 = np.array([[10.5, -20.25, 3.0], [0.0, 0.0, 0.0], [-30.125, 15.0, 7.75]])
P2 = P3[:, :2]


@pytest.mark.parametrize("name", ["a.csv", "a.fcsv", "a.mrk.json", "a.pts", "a.vtk", "a.txt"])
@pytest.mark.parametrize("points", [P2, P3], ids=["2d", "3d"])
def test_round_trip(tmp_path, name, points):
    path = write_points(tmp_path / name, points)
    np.testing.assert_array_equal(read_points(path, ndim=points.shape[1]), points)


def test_fcsv_ras_is_negated_to_lps(tmp_path):
    # a Slicer 4.10 file: RAS, stated as "0"; and one without the header (RAS too)
    body = "vtkMRMLMarkupsFiducialNode_0,1.5,-2,3,0,0,0,1,1,1,0,F-1,,vtkMRMLScalarVolumeNode1\n"
    head = "# Markups fiducial file version = 4.10\n# CoordinateSystem = 0\n" \
           "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
    (tmp_path / "ras.fcsv").write_text(head + body)
    (tmp_path / "bare.fcsv").write_text(body)
    (tmp_path / "lps.fcsv").write_text(head.replace("= 0", "= LPS") + body)
    np.testing.assert_array_equal(read_points(tmp_path / "ras.fcsv"), [[-1.5, 2.0, 3.0]])
    np.testing.assert_array_equal(read_points(tmp_path / "bare.fcsv"), [[-1.5, 2.0, 3.0]])
    np.testing.assert_array_equal(read_points(tmp_path / "lps.fcsv"), [[1.5, -2.0, 3.0]])


def test_markups_json_ras(tmp_path):
    doc = {"markups": [{"type": "Fiducial", "coordinateSystem": "RAS",
                        "controlPoints": [{"position": [1.0, 2.0, 3.0]}, {"position": [-4.0, 0.5, 6.0]}]}]}
    (tmp_path / "p.mrk.json").write_text(json.dumps(doc))
    np.testing.assert_array_equal(read_points(tmp_path / "p.mrk.json"), [[-1, -2, 3], [4, -0.5, 6]])


def test_csv_header_and_labels(tmp_path):
    (tmp_path / "p.csv").write_text("name,x,y,z\nA,1,2,3\nB,4,5,6\n")
    (tmp_path / "q.csv").write_text("1;2;3\n4;5;6\n")
    np.testing.assert_array_equal(read_points(tmp_path / "p.csv"), [[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(read_points(tmp_path / "q.csv"), [[1, 2, 3], [4, 5, 6]])


def test_airlab_pts_without_header(tmp_path):
    (tmp_path / "p.pts").write_text("1.5\t-2\t3\n4 5 6\n")  # what AirLab's Points.write wrote
    np.testing.assert_array_equal(read_points(tmp_path / "p.pts"), [[1.5, -2, 3], [4, 5, 6]])


def test_elastix_index_file_uses_the_grid(tmp_path):
    grid = Grid((10, 12), (2.0, 0.5), (5.0, -3.0), (0.0, -1.0, 1.0, 0.0))
    (tmp_path / "p.txt").write_text("index\n2\n1 2\n0 0\n")
    got = read_points(tmp_path / "p.txt", grid=grid)
    # x = origin + direction @ (spacing * index)
    expected = np.array([[5.0 - 1.0, -3.0 + 2.0], [5.0, -3.0]])
    np.testing.assert_allclose(got, expected)
    with pytest.raises(InputError, match="voxel indices need the image"):
        read_points(tmp_path / "p.txt")


@pytest.mark.parametrize("name,text,match", [
    ("a.csv", "1,2\n3,4,5\n", "different numbers of columns"),
    ("a.csv", "1,2,3,4\n", "4 coordinates"),
    ("a.csv", "1,nan\n", "nan"),
    ("a.csv", "1,two\n3,4\n", "not a number"),
    ("a.csv", "x,y\n", "no points"),
    ("a.pts", "point\n3\n1 2\n", "header says 3"),
    ("a.vtk", "# vtk DataFile Version 3.0\nx\nASCII\nDATASET POLYDATA\nPOINTS 2 float\n1 2 3\n", "POINTS says 2"),
    ("a.mrk.json", "{}", "not a Slicer markups"),
    ("a.fcsv", "# CoordinateSystem = XYZ\n1,1,2,3\n", "coordinate system"),
])
def test_bad_files(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(InputError, match=match):
        read_points(tmp_path / name)


def test_dimension_mismatch_and_missing(tmp_path):
    write_points(tmp_path / "a.csv", P2)
    with pytest.raises(InputError, match="2D points for a 3D image"):
        read_points(tmp_path / "a.csv", ndim=3)
    write_points(tmp_path / "b.fcsv", P3)
    with pytest.raises(InputError, match="3D points for a 2D image"):
        read_points(tmp_path / "b.fcsv", ndim=2)
    with pytest.raises(InputError, match="cannot read"):
        read_points(tmp_path / "missing.csv")
    with pytest.raises(InputError, match="nan"):
        write_points(tmp_path / "c.csv", [[1.0, np.nan]])
    assert not (tmp_path / "c.csv").exists()


# --------------------------------------------------------------------------- the engine's term
def test_landmark_term_gradcheck():
    from torch.func import functional_call

    from airlab.landmarks import landmark_loss
    from airlab.transforms import BSplineTransform

    grid = Grid((12, 10), (1.5, 2.0), (-5.0, 3.0))
    t = BSplineTransform(grid, 6.0, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(t.coefficients.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    fixed = grid.index_to_physical(torch.rand(1, 5, 2, generator=gen, dtype=torch.float64) * 8 + 1)
    fixed.requires_grad_(True)
    moving = fixed.detach() + torch.randn(1, 5, 2, generator=gen, dtype=torch.float64)

    def term(coefficients, points):
        return landmark_loss(functional_call(t, {"coefficients": coefficients}, (points,)), moving)

    assert torch.autograd.gradcheck(term, (c, fixed))
    # the value is the mean squared distance, by hand
    expected = ((t(fixed) - moving) ** 2).sum(-1).mean()
    assert torch.allclose(term(t.coefficients, fixed), expected)


def _disk_pair(angle_deg=25.0, shift=(3.0, -2.0)):
    """A blurred disk and the same disk shifted: the images cannot tell a rotation about its
    centre, the landmarks (rotated with it) can."""
    import airlab as al

    grid = Grid((64, 64), (1.0, 1.0), (-31.5, -31.5))
    x = grid.points(dtype=torch.float64)[0]
    disk = lambda centre: torch.sigmoid(20.0 - (x - torch.as_tensor(centre)).norm(dim=-1))  # noqa: E731
    fixed = al.Image(disk((0.0, 0.0))[None, None].float() * 100, grid)
    moving = al.Image(disk(shift)[None, None].float() * 100, grid)
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    fixed_points = np.array([[12.0, 0.0], [0.0, 14.0], [-10.0, -9.0], [6.0, -13.0]])
    moving_points = fixed_points @ rot.T + np.asarray(shift)
    return fixed, moving, fixed_points, moving_points


def test_landmarks_improve_tre():
    import airlab as al

    fixed, moving, fp, mp = _disk_pair()
    without = al.register(fixed, moving, "rigid", fixed_points=fp, moving_points=mp, landmark_weight=0)
    used = al.register(fixed, moving, "rigid", fixed_points=fp, moving_points=mp)
    tre_without, tre_with = without.outputs.metrics["tre_mm"]["mean"], used.outputs.metrics["tre_mm"]["mean"]
    assert without.outputs.metrics["tre_before_mm"]["mean"] > 4.0
    assert tre_without > 3.0  # the disk has no orientation: the images leave the rotation alone
    assert tre_with < 0.3 * tre_without and tre_with < 1.0
    assert "landmarks" in used.history[-1]["final_terms"]
    assert "landmarks" not in without.history[-1]["final_terms"]


def test_engine_refuses_bad_points():
    import airlab as al

    fixed, moving, fp, mp = _disk_pair()
    for kwargs, match in [({"fixed_points": fp, "moving_points": mp[:3]}, "4 fixed points but 3"),
                          ({"fixed_points": np.c_[fp, fp[:, :1]], "moving_points": mp}, r"\[P, 2\]"),
                          ({"fixed_points": fp, "moving_points": np.where(mp > 5, np.nan, mp)}, "finite"),
                          ({"fixed_points": fp}, "both fixed and moving")]:
        with pytest.raises(InputError, match=match):
            al.register(fixed, moving, "rigid", **kwargs)


def test_cli_register_with_landmark_files(tmp_path):
    import subprocess
    import sys

    import airlab as al

    fixed, moving, fp, mp = _disk_pair()
    al.write_image(fixed, tmp_path / "f.nii.gz")
    al.write_image(moving, tmp_path / "m.nii.gz")
    write_points(tmp_path / "f.fcsv", np.c_[fp, np.zeros(len(fp))])  # Slicer's 3D points, z = 0
    write_points(tmp_path / "m.pts", mp)

    def run(*args):
        cmd = [sys.executable, "-m", "airlab", "register", tmp_path / "f.nii.gz", tmp_path / "m.nii.gz", "--quiet",
               "--preset", "rigid", "--fixed-points", tmp_path / "f.fcsv", *args]
        return subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=300)

    done = run("-o", tmp_path / "out", "--moving-points", tmp_path / "m.pts")
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["tre_mm"]["mean"] < 1.0 < metrics["tre_before_mm"]["mean"]
    assert metrics["landmarks"]["count"] == 4 and metrics["landmarks"]["fixed_points"].endswith("f.fcsv")
    assert f"tre (mm): mean</td><td>{metrics['tre_mm']['mean']:.6g}" in (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    # the TRE of airlab evaluate agrees, from the written field
    ev = subprocess.run([sys.executable, "-m", "airlab", "evaluate", "-t", str(tmp_path / "out"), "--fixed-points",
                         str(tmp_path / "f.fcsv"), "--moving-points", str(tmp_path / "m.pts"), "--json",
                         str(tmp_path / "ev.json")], capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr
    assert json.loads((tmp_path / "ev.json").read_text(encoding="utf-8"))["tre_mm"]["mean"] == pytest.approx(
        metrics["tre_mm"]["mean"], abs=0.05)
    # a moving file with a point missing: one line, exit 1, nothing written
    write_points(tmp_path / "short.csv", mp[:3])
    done = run("-o", tmp_path / "bad", "--moving-points", tmp_path / "short.csv")
    assert done.returncode == 1 and "4 fixed points but 3 moving points" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
