"""workflows/pairwise.py: files in, the contract's files out (staged), what metrics.json records,
landmarks checked before any work, and the inverse on the moving grid."""

import json

import numpy as np
import pytest
import torch
import yaml

import airlab as al
from airlab.errors import ImageIOError, InputError, OutputExistsError
from airlab.pipelines import load_config
from airlab.registration import Result
from airlab.transforms import BSplineTransform, Composite, Rigid
from airlab.workflows.pairwise import OUTPUTS, as_points, inverse_on_moving_grid, invertible, register_files

# a rigid stage on one level: seconds on the 2 mm slice
PIPELINE = {"stages": [{"name": "rigid", "transform": "rigid", "losses": [{"name": "mse"}], "iterations": [15],
                        "pyramid": "coarsest", "lr": 0.5}]}


@pytest.fixture
def files(pair, tmp_path):
    fixed, moving, _ = pair
    al.write_image(fixed, tmp_path / "fixed.nii.gz")
    al.write_image(moving, tmp_path / "moving.nii.gz")
    (tmp_path / "rigid.yaml").write_text(yaml.safe_dump(PIPELINE), encoding="utf-8")
    return tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz", load_config(tmp_path / "rigid.yaml")


def test_register_files_writes_the_contract_and_records_what_ran(files, tmp_path):
    fixed, moving, pipeline = files
    out = register_files(fixed, moving, tmp_path / "out", pipeline, report=False, record={"note": "mine"})
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    # a rigid transform: no report asked for, everything else of the contract
    assert written == sorted(set(OUTPUTS) - {"report.png", "report.html"})
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["fixed"] == str(fixed) and metrics["note"] == "mine" and metrics["seed"] == 0
    assert metrics["pipeline"]["stages"][0]["transform"] == "rigid"
    assert [s["iterations"] for s in metrics["stages"]] == [15]
    assert metrics["inverse_consistency_mm"]["max"] < 1e-3  # a rigid transform inverts exactly
    jacobian = metrics["jacobian"]  # and keeps volumes
    assert jacobian["det_min"] == pytest.approx(1.0, abs=1e-4) and jacobian["det_max"] == pytest.approx(1.0, abs=1e-4)
    warped = al.read_image(tmp_path / "out" / "warped.nii.gz")
    assert torch.allclose(warped.data, out.warped.data)
    assert not list(tmp_path.glob(".airlab-*"))


def test_a_failing_pair_writes_nothing_and_existing_outputs_are_kept(files, tmp_path):
    fixed, moving, pipeline = files
    with pytest.raises(ImageIOError):
        register_files(fixed, tmp_path / "missing.nii.gz", tmp_path / "out", pipeline, report=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".airlab-*"))
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "warped.nii.gz").write_bytes(b"mine")
    with pytest.raises(OutputExistsError):
        register_files(fixed, moving, tmp_path / "kept", pipeline, report=False)
    assert (tmp_path / "kept" / "warped.nii.gz").read_bytes() == b"mine"


def test_landmarks_are_checked_before_any_work(files, tmp_path):
    fixed, moving, pipeline = files
    grid = al.read_image(fixed).grid
    with pytest.raises(InputError, match="need both fixed and moving points"):
        register_files(fixed, moving, tmp_path / "out", pipeline, fixed_points=np.zeros((3, 2)))
    with pytest.raises(InputError, match="3 fixed points but 2 moving points"):
        register_files(fixed, moving, tmp_path / "out", pipeline, fixed_points=np.zeros((3, 2)),
                       moving_points=np.zeros((2, 2)))
    assert not (tmp_path / "out").exists()
    assert as_points(None, grid) is None
    points = as_points(torch.tensor([[1, 2], [3, 4]]), grid)
    assert points.dtype == np.float64 and points.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    for bad in (np.zeros((3, 3)), np.array([[0.0, np.nan]])):
        with pytest.raises(InputError, match=r"fixed points must be finite \[P, 2\]"):
            as_points(bad, grid, "fixed points")


def test_the_inverse_on_the_moving_grid_is_exact_for_a_rigid_transform():
    fixed_grid = al.Grid((30, 24), (1.5, 2.0), (0.0, 0.0))
    moving_grid = al.Grid((26, 28), (2.0, 1.5), (1.0, -2.0))
    rigid = Rigid(2, rotation=[[0.1]], translation=[[2.0, -1.0]], center=fixed_grid.center(), dtype=torch.float64)
    result = Result(rigid, [rigid], fixed_grid=fixed_grid)
    assert invertible(result)
    field, stats = inverse_on_moving_grid(result, moving_grid)
    y = moving_grid.points(torch.float64)
    expected = torch.movedim(rigid.inverse()(y) - y, -1, 1)
    torch.testing.assert_close(field.field.detach(), expected)
    assert stats["max"] < 1e-10 and 0 < stats["voxels"] < np.prod(moving_grid.size)  # only those landing inside
    spline = BSplineTransform(fixed_grid, 10.0)
    assert not invertible(Result(Composite(spline, rigid.float()), [rigid.float(), spline], fixed_grid=fixed_grid))
