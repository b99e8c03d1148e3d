"""Pipelines as data: presets are YAML of the --config schema, pipelines compare equal, pickle,
and a run replayed from its metrics.json gives the same field."""

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml

import airlab as al
from airlab.datasets import example_path
from airlab.pipelines import PRESETS, load_config, preset, preset_pipeline
from airlab.synthetic import random_deformation

FIXED = example_path("mni152_t1_1mm_axial")


@pytest.mark.parametrize("name", PRESETS)
def test_a_preset_equals_the_yaml_that_names_it_and_its_written_out_form(tmp_path, name):
    from_preset = preset_pipeline(name, metric="lncc")
    (tmp_path / "named.yaml").write_text(f"preset: {name}\nmetric: lncc\n")
    assert load_config(tmp_path / "named.yaml").resolve() == from_preset
    (tmp_path / "written.yaml").write_text(yaml.safe_dump(from_preset.model_dump(mode="json", exclude_none=True)))
    assert load_config(tmp_path / "written.yaml") == from_preset
    assert pickle.loads(pickle.dumps(from_preset)) == from_preset


def test_built_stages_pickle_without_closures():
    grid = al.read_image(FIXED).grid
    stages = preset("smooth", grid)
    again = pickle.loads(pickle.dumps(stages))
    assert [s.transform for s in again] == [s.transform for s in stages]
    assert all(s.on_level is None for s in stages)
    t = again[-1].transform(grid, 1)
    assert type(t).__name__ == "BSplineVelocityField" and t.refine_levels and t.exp_shrink == 4


def test_the_default_deforms_with_a_dense_velocity_and_smooth_with_a_bspline_velocity():
    """Since 2026-12-07 the default "diffeomorphic" preset is a dense velocity (the most accurate
    on real anatomy); the B-spline velocity it held before is the "smooth" preset, unchanged."""
    grid = al.Grid([99, 117, 95], [2.0, 2.0, 2.0])
    *linear, dense = preset("diffeomorphic", grid)
    assert [s.name for s in linear] == ["rigid", "affine"]
    velocity = dense.transform(grid, 1)
    assert type(velocity).__name__ == "DenseVelocityField"
    assert [(lv.shrink, lv.iterations, lv.stride) for lv in dense.levels] == [(4, 50, 1), (2, 40, 2), (1, 100, 2)]
    assert [type(r).__name__ for _, r in dense.regularisers] == ["Diffusion", "JacobianFolding"]
    *_, smooth = preset("smooth", grid)
    assert type(smooth.transform(grid, 1)).__name__ == "BSplineVelocityField"


def test_the_metric_replaces_the_deformable_similarity_and_mi_the_linear_ones():
    lncc = preset_pipeline("bspline", metric="lncc")
    assert [s.losses[0].name for s in lncc.stages] == ["ncc", "ncc", "lncc"]
    mi = preset_pipeline("bspline", metric="nmi")
    assert [s.losses[0].name for s in mi.stages] == ["nmi", "nmi", "nmi"]
    assert [s.losses[0].name for s in preset_pipeline("rigid", metric="lncc").stages] == ["ncc"]


def test_stage_levels_follow_the_pyramid_rules():
    grid = al.Grid([99, 117, 95], [2.0, 2.0, 2.0])
    rigid, affine, deformable = preset("smooth", grid)
    assert [(lv.shrink, lv.iterations, lv.stride) for lv in rigid.levels] == [(4, 100, 1)]
    assert [(lv.shrink, lv.iterations, lv.stride) for lv in affine.levels] == [(4, 100, 1), (2, 60, 2)]
    assert [(lv.shrink, lv.iterations, lv.stride) for lv in deformable.levels] == [(4, 100, 1), (2, 60, 2),
                                                                                   (1, 25, 2)]
    # control points every 5 voxels of the finest level, doubled per coarser level
    assert deformable.transform.options["control_spacing"] == 5 * 2.0 * 4


def airlab(*args):
    done = subprocess.run([sys.executable, "-m", "airlab", *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    return done.returncode, done.stdout, done.stderr


def test_a_run_replayed_from_its_metrics_gives_the_same_field(tmp_path):
    fixed = al.read_image(FIXED).to(torch.float32)
    with torch.no_grad():
        moving = al.resample(fixed, fixed.grid, random_deformation(fixed.grid, 5))
    al.write_image(moving, tmp_path / "moving.nii.gz")
    (tmp_path / "quick.yaml").write_text(
        "seed: 3\nstages:\n"
        "  - {name: affine, transform: affine, losses: [{name: ncc}], iterations: [30], pyramid: coarsest, lr: 0.2}\n"
        "  - {name: warp, transform: velocity, losses: [{name: lncc, radius: 2}],\n"
        "     regularisers: [{name: bending, weight: 0.1}], iterations: [20, 10], strides: [2],\n"
        "     optimizer: field-adam, lr: 0.25}\n")
    code, _, err = airlab("register", FIXED, tmp_path / "moving.nii.gz", "-o", tmp_path / "a", "--config",
                          tmp_path / "quick.yaml", "--quiet", "--no-report")
    assert code == 0, err
    recorded = json.loads((tmp_path / "a" / "metrics.json").read_text(encoding="utf-8"))
    assert recorded["pipeline"]["stages"][1]["transform"] == "velocity" and recorded["seed"] == 3
    code, _, err = airlab("register", FIXED, tmp_path / "moving.nii.gz", "-o", tmp_path / "b", "--config",
                          tmp_path / "a" / "metrics.json", "--quiet", "--no-report")
    assert code == 0, err
    a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / d / "displacement.nii.gz"))) for d in "ab")
    assert np.abs(a).max() > 0.5 and np.abs(a - b).max() < 1e-6
    assert json.loads((tmp_path / "b" / "metrics.json").read_text(encoding="utf-8"))["pipeline"] == recorded["pipeline"]


def test_a_bad_metrics_file_is_a_config_error_naming_it(tmp_path):
    (tmp_path / "metrics.json").write_text('{"command": "register", "pipeline": {"stages": []}}')
    with pytest.raises(al.ConfigError, match="metrics.json: .*give a 'preset' or a list of 'stages'"):
        load_config(tmp_path / "metrics.json")
    (tmp_path / "broken.json").write_text('{"command": ')
    with pytest.raises(al.ConfigError, match="broken.json is not valid JSON"):
        load_config(tmp_path / "broken.json")
