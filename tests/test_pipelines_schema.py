"""`--config`: YAML pipelines, validated with messages that name the key."""

import json
import subprocess
import sys

import pytest
import torch

import airlab as al
from airlab.pipelines import ConfigError, load_config
from airlab.datasets import example_path
from airlab.registration import Stage
from airlab.synthetic import random_deformation

FIXED = example_path("mni152_t1_1mm_axial")

PIPELINE = """\
seed: 3
stages:
  - name: rigid
    transform: rigid
    losses: [{name: ncc}]
    levels: [{shrink: 4, sigma: 4, iterations: 30}]
    lr: 0.5
  - name: deformable
    transform: bspline
    losses: [{name: mi, bins: 32}, {name: ngf, weight: 0.5, eps: 0.2}]
    regularisers: [{name: bending, weight: 0.1}]
    iterations: [20, 10]
    optimizer: field-adam
    lr: 0.25
"""


def airlab(*args):
    done = subprocess.run([sys.executable, "-m", "airlab", *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    return done.returncode, done.stdout, done.stderr


@pytest.fixture(scope="module")
def moving(tmp_path_factory):
    root = tmp_path_factory.mktemp("config")
    fixed = al.read_image(FIXED).to(torch.float32)
    with torch.no_grad():
        al.write_image(al.resample(fixed, fixed.grid, random_deformation(fixed.grid, 2)), root / "moving.nii.gz")
    return root / "moving.nii.gz"


def test_stages_are_built_as_written(tmp_path):
    (tmp_path / "p.yaml").write_text(PIPELINE)
    config = load_config(tmp_path / "p.yaml")
    stages = config.build(al.read_image(FIXED).grid)
    assert [s.name for s in stages] == ["rigid", "deformable"]
    assert all(isinstance(s, Stage) for s in stages)
    assert [(lv.shrink, lv.sigma, lv.iterations) for lv in stages[0].levels] == [(4, 4, 30)]
    assert [lv.iterations for lv in stages[1].levels] == [20, 10]
    (w1, mi), (w2, ngf) = stages[1].losses
    assert (w1, mi.bins, w2, ngf.eps) == (1.0, 32, 0.5, 0.2)
    assert stages[1].optimizer == "field-adam" and stages[0].lr == 0.5 and config.seed == 3


def test_register_runs_a_written_pipeline(tmp_path, moving):
    (tmp_path / "p.yaml").write_text(PIPELINE)
    code, out, err = airlab("register", FIXED, moving, "-o", tmp_path / "out", "--config", tmp_path / "p.yaml",
                            "--quiet")
    assert code == 0, err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    assert [s["stage"] for s in metrics["stages"]] == ["rigid", "deformable", "deformable"]
    assert [s["iterations"] <= n for s, n in zip(metrics["stages"], (30, 20, 10))] == [True] * 3
    assert metrics["seed"] == 3 and metrics["config"]["file"].endswith("p.yaml") and metrics["preset"] is None


def test_a_preset_in_the_file_and_the_command_line_wins(tmp_path, moving):
    (tmp_path / "p.yaml").write_text("preset: affine\nmetric: nmi\nseed: 5\n")
    code, _, err = airlab("register", FIXED, moving, "-o", tmp_path / "out", "--config", tmp_path / "p.yaml",
                          "--seed", "7", "--quiet", "--no-report")
    assert code == 0, err
    assert not (tmp_path / "out" / "report.html").exists() and not (tmp_path / "out" / "report.png").exists()
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    assert (metrics["preset"], metrics["metric"], metrics["seed"]) == ("affine", "nmi", 7)
    assert [s["stage"] for s in metrics["stages"]][-1] == "affine"


@pytest.mark.parametrize("text, message", [
    ("preset: affine\nsed: 3\n", "sed: unknown key"),
    ("preset: affin\n", "preset: Input should be"),
    ("seed: three\npreset: rigid\n", "seed: Input should be a valid integer"),
    (PIPELINE.replace("lr: 0.5", "lr: fast"), "stages.0.lr: Input should be a valid number"),
    (PIPELINE.replace("lr: 0.5", "lrate: 0.5"), "stages.0.lrate: unknown key"),
    (PIPELINE.replace("name: ncc", "name: xcorr"), "stages.0.losses: unknown loss 'xcorr'"),
    (PIPELINE.replace("bins: 32", "binz: 32"), "loss 'mi' has no option 'binz'"),
    (PIPELINE.replace("name: bending", "name: elastic"), "unknown regulariser 'elastic'"),
    (PIPELINE.replace("transform: bspline", "transform: spline"), "stages.1.transform: unknown transform 'spline'"),
    ("stages: [\n", "not valid YAML"),
    ("- rigid\n", "must be a mapping"),
    ("seed: 1\n", "give a 'preset' or a list of 'stages'"),
])
def test_bad_configs_are_usage_errors_naming_the_key(tmp_path, moving, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError, match=None) as info:
        load_config(tmp_path / "bad.yaml")
    assert message in str(info.value) and "bad.yaml" in str(info.value)
    out = tmp_path / "out"
    code, stdout, err = airlab("register", FIXED, moving, "-o", out, "--config", tmp_path / "bad.yaml")
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_metric_with_written_stages_is_refused(tmp_path, moving):
    (tmp_path / "p.yaml").write_text(PIPELINE)
    code, _, err = airlab("register", FIXED, moving, "-o", tmp_path / "out", "--config", tmp_path / "p.yaml",
                          "--metric", "mse")
    assert code == 2 and "--metric applies to presets" in err


def test_the_readme_pipeline_is_valid(tmp_path):
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "readme.yaml").write_text(block)
    stages = load_config(tmp_path / "readme.yaml").build(al.read_image(FIXED).grid)
    assert [s.name for s in stages] == ["rigid", "deformable"] and len(stages[1].levels) == 3


def test_stage_interpolation(tmp_path):
    """``interpolation: bspline`` reaches the stage; anything else is refused with the key named."""
    base = "stages:\n  - transform: affine\n    losses: [{{name: mse}}]\n    interpolation: {v}\n"
    path = tmp_path / "c.yaml"
    path.write_text(base.format(v="bspline"))
    assert load_config(path).stages[0].build(0, al.Grid([20, 20], [1.0, 1.0])).interpolation == "bspline"
    path.write_text(base.format(v="cubic"))
    with pytest.raises(ConfigError, match="interpolation"):
        load_config(path)


def test_interpolation_per_level_is_aligned_like_iterations(tmp_path):
    """A list names the finest levels and is padded at the coarse end with its first value; a
    level written out keeps its own; a wrong value in the list names the key."""
    path = tmp_path / "c.yaml"
    stage = ("stages:\n  - transform: dense-velocity\n    losses: [{{name: mse}}]\n    iterations: [10, 10, 10]\n"
             "    pyramid: all\n    interpolation: {v}\n")
    grid = al.Grid([100, 100], [1.0, 1.0])  # three levels: 100 / 2 and / 4 voxels are >= 25
    path.write_text(stage.format(v="[linear, bspline]"))
    levels = load_config(path).stages[0].build_levels(grid)
    assert [lv.interpolation for lv in levels] == ["linear", "linear", "bspline"]
    path.write_text(stage.format(v="[bspline, linear, bspline, linear]"))  # longer than the pyramid: the finest
    assert [lv.interpolation for lv in load_config(path).stages[0].build_levels(grid)] == ["linear", "bspline",
                                                                                            "linear"]
    path.write_text("stages:\n  - transform: dense-velocity\n    losses: [{name: mse}]\n    interpolation: [linear]\n"
                    "    levels: [{shrink: 2}, {shrink: 1, interpolation: bspline}]\n")
    assert [lv.interpolation for lv in load_config(path).stages[0].build_levels(grid)] == ["linear", "bspline"]
    path.write_text(stage.format(v="[linear, cubic]"))
    with pytest.raises(ConfigError, match="interpolation"):
        load_config(path)


def test_options_that_do_not_apply_are_refused(tmp_path):
    """Keys of the dense velocity and its optimiser that would be silently ignored elsewhere stop
    the command with the key named."""
    base = "stages:\n  - transform: {t}\n    losses: [{{name: mse}}]\n    optimizer: {o}\n    {extra}\n"
    for t, o, extra, message in (("bspline", "adam", "exact_gradient: false", "dense-velocity"),
                                 ("dense-velocity", "lbfgs", "gradient_sigma: 1.0", "adam or field-adam")):
        path = tmp_path / "c.yaml"
        path.write_text(base.format(t=t, o=o, extra=extra))
        with pytest.raises(ConfigError, match=message):
            load_config(path)
    path.write_text(base.format(t="bspline", o="adam", extra="lr_unit: voxel"))
    with pytest.raises(ConfigError, match="field-adam"):
        load_config(path)
    path.write_text(base.format(t="bspline", o="adam", extra="lr_quantile: 0.95"))
    with pytest.raises(ConfigError, match="lr_quantile.*field-adam"):
        load_config(path)
    path.write_text(base.format(t="dense-velocity", o="field-adam", extra="lr_quantile: 1.5"))
    with pytest.raises(ConfigError, match="lr_quantile"):
        load_config(path)
    path.write_text(base.format(t="dense-velocity", o="field-adam", extra="gradient_sigma: 1.0\n    lr_quantile: 0.95"))
    stage = load_config(path).stages[0].build(0, al.Grid([20, 20], [1.0, 1.0]))
    assert stage.gradient_sigma == 1.0 and stage.transform.name == "dense-velocity"
    assert stage.lr_quantile == 0.95


def test_the_schemas_name_tables_are_the_registries():
    """The schema validates from pipelines/names.py without importing the engine; those tables
    must say what the registries say."""
    import inspect

    from airlab.losses import LOSSES
    from airlab.pipelines import names
    from airlab.regularisers import REGULARISERS, ParameterRegulariser
    from airlab.transforms import TRANSFORMS

    assert names.TRANSFORM_NAMES == tuple(TRANSFORMS)
    assert names.LOSS_OPTIONS == {k: tuple(inspect.signature(v).parameters) for k, v in LOSSES.items()}
    assert names.REGULARISER_OPTIONS == {k: tuple(inspect.signature(v).parameters) for k, v in REGULARISERS.items()}
    assert names.LATTICE_REGULARISERS == tuple(k for k, v in REGULARISERS.items() if issubclass(v, ParameterRegulariser))


def test_validating_a_pipeline_imports_no_torch():
    code = ("import sys; from airlab.pipelines import load_config, preset_pipeline, PRESETS; "
            "[preset_pipeline(p, metric=m) for p in PRESETS for m in (None, 'lncc', 'mi')]; "
            "import pickle; from airlab.workflows.batch import Settings; "
            "pickle.dumps(Settings(preset_pipeline('intersubject'))); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_a_loss_added_to_the_registry_at_run_time_is_accepted(monkeypatch):
    from airlab.losses import LOSSES, NCC
    from airlab.pipelines import validate

    class Mine(NCC):
        def __init__(self, eps: float = 1e-8, scale: float = 1.0):
            super().__init__(eps)

    monkeypatch.setitem(LOSSES, "mine", Mine)
    stage = {"transform": "affine", "losses": [{"name": "mine", "scale": 2.0}]}
    assert validate({"stages": [stage]}, "test").stages[0].losses[0].name == "mine"
    with pytest.raises(ConfigError, match="loss 'mine' has no option 'bins'"):
        validate({"stages": [{**stage, "losses": [{"name": "mine", "bins": 3}]}]}, "test")
    with pytest.raises(ConfigError, match="unknown loss 'theirs'"):
        validate({"stages": [{**stage, "losses": [{"name": "theirs"}]}]}, "test")


def test_the_benchmark_configs_are_valid():
    """The pipelines that docs/ cite as rerunnable (benchmarks/configs/) still load."""
    from pathlib import Path

    files = sorted((Path(__file__).parents[1] / "benchmarks" / "configs").rglob("*.yaml"))
    assert len(files) >= 20
    for path in files:
        load_config(path)


@pytest.mark.parametrize("unit, spacing, expected", [("mm", [2.0, 2.0, 2.0], 2.0), ("voxel", [2.0, 2.0, 2.0], 4.0),
                                                     ("voxel", [1.0, 1.0], 2.0), ("voxel", [1.0, 2.0, 3.0], 4.0)])
def test_lr_in_voxels_is_the_step_in_the_fixed_images_mean_spacing(tmp_path, unit, spacing, expected):
    path = tmp_path / "c.yaml"
    path.write_text("stages:\n  - transform: dense-velocity\n    losses: [{name: mse}]\n    optimizer: field-adam\n"
                    f"    lr: 2.0\n    lr_unit: {unit}\n")
    grid = al.Grid([40] * len(spacing), spacing)
    assert load_config(path).stages[0].build(0, grid).lr == pytest.approx(expected)
