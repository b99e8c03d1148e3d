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
