"""workflows/demo.py: the demo run in-process (each stage cut to its coarsest level and a few
iterations), scored against the known deformation and SimpleITK's reading of the field, staged."""

from dataclasses import replace

import pytest

from airlab.errors import OutputExistsError
from airlab.pipelines import PipelineConfig
from airlab.workflows.demo import DEMO_OUTPUTS, run_demo


def test_the_demo_writes_its_files_and_scores_itself(tmp_path, monkeypatch):
    full = PipelineConfig.build
    monkeypatch.setattr(PipelineConfig, "build", lambda self, grid: [
        replace(s, levels=[replace(s.levels[0], iterations=3)]) for s in full(self, grid)])
    metrics = run_demo(tmp_path / "d", preset="affine", seed=2)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == sorted(DEMO_OUTPUTS)
    assert metrics["command"] == "demo" and metrics["deformation_seed"] == 2 and metrics["preset"] == "affine"
    # the inverse of a B-spline peaking at 7 mm, a rotation of up to 4 degrees about the centre
    # (some 15 mm at the corners) and a translation of up to 4 mm
    assert 0 < metrics["known_displacement_max_mm"] < 7.0 + 15.0 + 4.0
    assert 0 < metrics["endpoint_error_mm"]["mean"] < metrics["known_displacement_max_mm"]
    # SimpleITK warps the moving image with the written field as airlab did (float32 written)
    assert metrics["sitk_vs_airlab_max_abs_difference"] < 1e-2 * metrics["intensity_range"]
    assert metrics["folding_voxels"] == 0  # an affine transform does not fold
    with pytest.raises(OutputExistsError):
        run_demo(tmp_path / "d", preset="affine")
    assert not list(tmp_path.glob(".airlab-*"))
