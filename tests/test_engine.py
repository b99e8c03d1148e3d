"""The engine's mechanics on small 2D images: stages, optimisers, callbacks, seeds, batches,
custom terms, demons, and the errors bad inputs must raise."""

import numpy as np
import pytest
import torch
from torch import nn

import airlab as al
from airlab.datasets import example_path
from airlab.demons import demons
from airlab.losses import MSE, NCC
from airlab.pipelines import preset, pyramid
from airlab.registration import Level, Registration, RegistrationError, Stage
from airlab.regularisers import Diffusion
from airlab.synthetic import ground_truth, random_deformation
from airlab.transforms import Affine, BSplineTransform, Composite, Rigid, Translation


@pytest.fixture(scope="module")
def slice2mm():
    """The 1 mm axial MNI slice at 2 mm: 99 x 117 pixels, quick to register."""
    full = al.read_image(example_path("mni152_t1_1mm_axial")).to(torch.float32)
    grid = full.grid.with_spacing(2.0)
    from airlab.filters import smooth_mm

    data = al.sample(smooth_mm(full.data, full.grid, 1.0), full.grid, grid.points(torch.float32), "linear", None)
    return al.Image(data, grid)


@pytest.fixture(scope="module")
def pair(slice2mm):
    deformation = random_deformation(slice2mm.grid, 7, max_displacement=4.0)
    with torch.no_grad():
        moving = al.resample(slice2mm, slice2mm.grid, deformation)
    truth, _ = ground_truth(deformation, slice2mm.grid)
    return slice2mm, moving, truth


def _epe(transform, truth, image):
    brain = image.data[0, 0] > 20
    with torch.no_grad():
        est = transform.displacement(image.grid)
    return float((est - truth.field).norm(dim=1)[0][brain].mean())


def _quick(stages):
    return Registration(stages, progress=False)


def test_affine_then_bspline_improves_on_affine(pair):
    fixed, moving, truth = pair
    stages = preset("bspline", fixed.grid)
    result = _quick(stages)(fixed, moving)
    affine_only = _quick(preset("affine", fixed.grid))(fixed, moving)
    assert _epe(result.transform, truth, fixed) < 0.6 * _epe(affine_only.transform, truth, fixed)
    # one linear transform survives the rigid -> affine chain, the deformation acts first
    assert isinstance(result.transform, Composite) and isinstance(result.transform[1], Affine)
    assert isinstance(result.linear_part(), Affine)
    # rigid only at the coarsest level, then the affine stage's two levels
    assert [h["stage"] for h in result.history][:3] == ["rigid", "affine", "affine"]
    assert all(h["iterations"] >= 1 and len(h["objective"]) == h["iterations"] for h in result.history)


def test_seed_makes_runs_repeat_exactly(pair):
    fixed, moving, _ = pair
    a = _quick(preset("bspline", fixed.grid)).run(fixed, moving)
    b = _quick(preset("bspline", fixed.grid)).run(fixed, moving)
    pts = fixed.grid.points(torch.float32)
    with torch.no_grad():
        assert torch.equal(a.transform(pts), b.transform(pts))


def test_custom_loss_regulariser_and_transform_plug_in(pair):
    fixed, moving, truth = pair

    class L1(nn.Module):  # a new similarity in four lines
        def forward(self, fixed, moving, weight=None, grid=None):
            w = weight if weight is not None else torch.ones_like(fixed[:, :1])
            return ((fixed - moving).abs() * w).flatten(1).sum(1) / w.flatten(1).sum(1)

    class Shift(Translation):  # a new transform: a translation that only moves along x
        def translation_vector(self):
            return self.translation * torch.tensor([1.0, 0.0], dtype=self.translation.dtype)

    shifted = Translation(2, translation=[3.0, 0.0])
    with torch.no_grad():
        moved = al.resample(fixed, fixed.grid, shifted)
    result = Registration([Stage(lambda g, n: Shift(2, n), [(1.0, L1())], levels=[Level(2, 2.0, 150), Level(1, 0.0, 100)],
                                 lr=0.3)], progress=False, initialisation=None)(fixed, moved)
    assert abs(float(result.transform.translation_vector()[0, 0]) + 3.0) < 0.1
    assert float(result.transform.translation_vector()[0, 1]) == 0.0
    # a regulariser of one's own on a deformable stage
    stage = Stage(lambda g, n: BSplineTransform(g, 20.0, n), [(1.0, MSE())], [(1.0, Diffusion())],
                  levels=[Level(1, 0.0, 30)], optimizer="field-adam", lr=0.25)
    out = Registration([stage], progress=False)(fixed, moving)
    assert "Diffusion" in out.history[0]["final_terms"]


def test_lbfgs_and_callbacks(pair):
    fixed, moving, _ = pair
    seen = []
    stage = Stage(lambda g, n: Rigid(2, n), [(1.0, NCC())], levels=[Level(2, 2.0, 15)], optimizer="lbfgs")
    result = Registration([stage], progress=False, callbacks=[seen.append])(fixed, moving)
    assert len(seen) == result.history[0]["iterations"] > 0
    assert {"stage", "level", "iteration", "objective", "terms", "transform"} <= set(seen[0])
    assert seen[-1]["objective"] <= seen[0]["objective"]


def test_batch_of_pairs(pair):
    fixed, moving, _ = pair
    moving2 = al.Image(torch.flip(moving.data, dims=[-1]).contiguous(), moving.grid)
    both = al.Image(torch.cat([moving.data, moving2.data]), moving.grid)
    stages = lambda: [Stage(lambda g, n: Affine(2, n), [(1.0, MSE())], levels=[Level(2, 2.0, 40)], decay=True,
                            tolerance=0.0)]  # noqa: E731
    batched = Registration(stages(), progress=False)(fixed, both)
    assert batched.transform.batch_size == 2
    single = Registration(stages(), progress=False)(fixed, moving)
    pts = fixed.grid.points(torch.float32)
    with torch.no_grad():
        assert torch.allclose(batched.transform(pts)[0], single.transform(pts)[0], atol=1e-3)


def test_demons_recovers_the_deformation(pair):
    fixed, moving, truth = pair
    affine = _quick(preset("affine", fixed.grid)[:2])(fixed, moving)
    result = demons(fixed, moving, initial=affine.transform,
                    levels=[Level(4, 4.0, 60), Level(2, 2.0, 60), Level(1, 0.0, 40)])
    assert _epe(result.transform, truth, fixed) < 0.6 * _epe(affine.transform, truth, fixed)
    from airlab.evaluate import jacobian_stats

    field = result.stages[0].field.detach()[0]
    assert jacobian_stats(field, result.stages[0].grid)["folding_count"] == 0


def test_stages_share_pyramid_levels(pair, monkeypatch):
    """rigid, affine and the deformable stage start on the same coarse levels: each (shrink,
    sigma) is smoothed and downsampled once per registration, not once per stage."""
    from airlab import pyramid as pyramids

    fixed, moving, _ = pair
    calls = []
    original = pyramids.prepare_level
    monkeypatch.setattr(pyramids, "prepare_level", lambda level, *a: calls.append(level) or original(level, *a))
    stages = preset("bspline", fixed.grid)
    for stage in stages:
        for level in stage.levels:
            level.iterations = 2
    result = _quick(stages)(fixed, moving)
    levels = {(lv.shrink, lv.sigma) for stage in stages for lv in stage.levels}
    assert len(result.history) == sum(len(stage.levels) for stage in stages) > len(levels) == len(calls)


def test_pyramid_is_sized_from_the_image():
    small = pyramid(al.Grid((40, 40)), 50)
    large = pyramid(al.Grid((400, 300, 200)), [100, 50, 20])
    assert [lv.shrink for lv in small] == [1]
    assert [lv.shrink for lv in large] == [16, 8, 4, 2, 1]  # coarsest: 25 voxels along x
    assert [lv.iterations for lv in large] == [100, 100, 100, 50, 20]
    assert [lv.sigma for lv in large] == [8.0, 4.0, 2.0, 1.0, 0.0]


# --------------------------------------------------------------------------- bad input
def _one_stage():
    return Registration([Stage(lambda g, n: Translation(g.ndim, n), [(1.0, MSE())], levels=[Level(1, 0.0, 2)])],
                        progress=False)


def test_nan_pixels_are_refused(pair):
    fixed, moving, _ = pair
    bad = moving.data.clone()
    bad[0, 0, 10, 10] = float("nan")
    with pytest.raises(RegistrationError, match="moving image has 1 NaN"):
        _one_stage()(fixed, al.Image(bad, moving.grid))


def test_constant_image_is_refused(pair):
    fixed, moving, _ = pair
    with pytest.raises(RegistrationError, match="fixed image is constant"):
        _one_stage()(al.Image(torch.ones_like(fixed.data), fixed.grid), moving)


def test_empty_mask_is_refused(pair):
    fixed, moving, _ = pair
    mask = al.Image(torch.zeros_like(fixed.data, dtype=torch.uint8), fixed.grid)
    with pytest.raises(RegistrationError, match="fixed mask is empty"):
        _one_stage()(fixed, moving, fixed_mask=mask)


def test_dimension_mismatch_is_refused(pair):
    fixed, _, _ = pair
    volume = al.Image(torch.rand(1, 1, 4, 5, 6), al.Grid((6, 5, 4)))
    with pytest.raises(RegistrationError, match="3D moving image to a 2D fixed image"):
        _one_stage()(fixed, volume)


def test_no_overlap_is_refused(pair):
    fixed, moving, _ = pair
    far = al.Image(moving.data, al.Grid(moving.grid.size, moving.grid.spacing, np.add(moving.grid.origin, 5000.0),
                                          moving.grid.direction))
    with pytest.raises(RegistrationError, match="do not overlap"):
        Registration([Stage(lambda g, n: Translation(2, n), [(1.0, MSE())], levels=[Level(1, 0.0, 2)])],
                     progress=False, initialisation=None)(fixed, far)


def test_masks_restrict_the_objective(pair):
    fixed, moving, _ = pair
    mask = torch.zeros_like(fixed.data, dtype=torch.uint8)
    mask[..., 30:80, 20:80] = 1
    result = _quick(preset("affine", fixed.grid))(fixed, moving, fixed_mask=al.Image(mask, fixed.grid),
                                                 moving_mask=al.Image(mask, moving.grid))
    assert result.history[-1]["iterations"] > 0


def test_symmetric_velocity_stage(pair):
    fixed, moving, truth = pair
    stages = preset("diffeomorphic", fixed.grid)
    stages[-1].symmetric = True
    result = _quick(stages)(fixed, moving)
    affine = _quick(preset("affine", fixed.grid))(fixed, moving)
    assert _epe(result.transform, truth, fixed) < 0.6 * _epe(affine.transform, truth, fixed)
    velocity = result.stages[-1]
    pts = fixed.grid.points(torch.float32)
    with torch.no_grad():  # the inverse comes free and undoes the deformation
        there_and_back = velocity.inverse()(velocity(pts)) - pts
    inner = (fixed.data[0, 0] > 20)
    assert float(there_and_back.norm(dim=-1)[0][inner].max()) < 0.05 * min(fixed.grid.spacing)
    with pytest.raises(ValueError, match="symmetric stage needs a velocity field"):
        stages = preset("bspline", fixed.grid)
        stages[-1].symmetric = True
        _quick(stages)(fixed, moving)


@pytest.mark.parametrize("metric", ["mse", "ncc", "lncc", "mi", "nmi", "ngf"])
def test_every_metric_registers(pair, metric):
    fixed, moving, truth = pair
    result = _quick(preset("bspline", fixed.grid, metric=metric))(fixed, moving)
    affine = _quick(preset("affine", fixed.grid))(fixed, moving)
    assert _epe(result.transform, truth, fixed) < 0.7 * _epe(affine.transform, truth, fixed)


@pytest.mark.parametrize("name", ["bspline", "diffeomorphic"])
def test_a_batch_ends_where_its_pairs_end_alone(slice2mm, name):
    """N pairs through the batch dimension give the N single results: per-pair early stopping
    freezes a converged pair while the others go on (the tolerance here makes them stop at
    different iterations)."""
    fixed = slice2mm
    movings = []
    for seed in (4, 5, 6):
        with torch.no_grad():
            movings.append(al.resample(fixed, fixed.grid, random_deformation(fixed.grid, seed)).data)

    def stages():
        out = preset(name, fixed.grid)
        for stage in out:
            stage.tolerance, stage.patience = 2e-3, 5
            for level in stage.levels:
                level.iterations = min(level.iterations, 30)
        return out

    batched = Registration(stages(), progress=False)(fixed, al.Image(torch.cat(movings), fixed.grid))
    singles = [Registration(stages(), progress=False)(fixed, al.Image(m, fixed.grid)) for m in movings]
    iterations = [[h["iterations"] for h in r.history] for r in singles]
    assert len({tuple(i) for i in iterations}) > 1, "the pairs should stop at different iterations"
    assert [h["iterations"] for h in batched.history] == [max(col) for col in zip(*iterations)]
    with torch.no_grad():
        together = batched.transform.displacement(fixed.grid)
        for n, single in enumerate(singles):
            alone = single.transform.displacement(fixed.grid)[0]
            assert (together[n] - alone).abs().max() < 1e-3, f"pair {n}"


def test_adam_is_torch_adam(rng):
    """airlab.optim.Adam (which spares a command-line run torch._dynamo's import) takes the
    same steps as torch.optim.Adam, with param groups, a changed lr and a closure."""
    from airlab.optim import Adam

    target = torch.as_tensor(rng.normal(size=(3, 4)))
    start = [torch.as_tensor(rng.normal(size=(3, 4))), torch.as_tensor(rng.normal(size=5))]
    runs = []
    for make in (Adam, torch.optim.Adam):
        a, b = (nn.Parameter(s.clone()) for s in start)
        opt = make([{"params": [a], "lr": 0.05}, {"params": [b]}], lr=0.01)
        for k in range(30):
            def closure():
                opt.zero_grad()
                loss = (a - target).pow(2).sum() + b.pow(4).sum()
                loss.backward()
                return loss
            opt.step(closure)
            opt.param_groups[0]["lr"] = 0.05 * (1 - k / 40)
        runs.append((a.detach(), b.detach()))
    for ours, theirs in zip(*runs):
        assert torch.allclose(ours, theirs, atol=1e-12, rtol=0)
    assert not torch.allclose(runs[0][0], start[0])


def test_presets_do_not_import_dynamo():
    """torch.optim.Optimizer imports torch._dynamo (about 3 s) on first use; the presets' own
    optimisers and learning-rate decay keep a command-line run free of it."""
    import subprocess
    import sys

    code = (
        "import sys, torch, airlab as al\n"
        "from airlab.pipelines import preset\n"
        "from airlab.registration import Registration\n"
        "from airlab.datasets import example_path\n"
        "f = al.read_image(example_path('mni152_t1_1mm_axial')).to(torch.float32)\n"
        "for name in ('affine', 'diffeomorphic'):\n"
        "    stages = preset(name, f.grid)\n"
        "    for s in stages:\n"
        "        for lv in s.levels: lv.iterations = 2\n"
        "    Registration(stages, progress=False)(f, f)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_intersubject_preset_registers_with_a_dense_velocity(pair):
    """The intersubject preset's dense velocity (Gaussian-smoothed updates) recovers a known
    deformation, without folding, and keeps an exact inverse: exp(-v). The deformation here is
    a smooth B-spline, the bspline and diffeomorphic presets' own family, where a dense field
    does less well (they reach < 0.6 of the affine error on this pair); its case is real
    anatomy (benchmarks/real_cases.py)."""
    from airlab.evaluate import jacobian_stats
    from airlab.transforms import DenseVelocityField

    fixed, moving, truth = pair
    result = _quick(preset("intersubject", fixed.grid))(fixed, moving)
    affine = _quick(preset("affine", fixed.grid))(fixed, moving)
    assert _epe(result.transform, truth, fixed) < 0.75 * _epe(affine.transform, truth, fixed)
    velocity = result.stages[-1]
    assert isinstance(velocity, DenseVelocityField)
    # the velocity followed the pyramid to the finest level: one vector every 2 pixels
    assert np.allclose(velocity.grid.spacing, 2 * np.asarray(fixed.grid.spacing), rtol=0.02)
    with torch.no_grad():
        field = result.transform.displacement(fixed.grid)[0].double().numpy()
        pts = fixed.grid.points(torch.float32)
        back = velocity.inverse()(velocity(pts)) - pts
    assert jacobian_stats(field, fixed.grid)["folding_count"] == 0
    # a rough dense velocity, exponentiated in 2**4 linear steps: less exact than a spline's
    inner = fixed.data[0, 0] > 20
    error = back.norm(dim=-1)[0][inner]
    assert float(error.mean()) < 0.05 * min(fixed.grid.spacing) and float(error.max()) < 0.3 * min(fixed.grid.spacing)


def test_unknown_stage_interpolation_is_refused():
    """A Python-built stage with an interpolation the engine does not know stops at once, instead
    of silently sampling linearly."""
    stage = Stage(Affine, [(1.0, MSE())], interpolation="cubic", name="affine")
    with pytest.raises(ValueError, match="'affine': interpolation 'cubic'"):
        Registration([stage], progress=False)
