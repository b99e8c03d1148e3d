"""The shipped presets register the engine's 2D case: with every metric, and the intersubject
preset's dense velocity."""

import numpy as np
import pytest
import torch

from airlab.pipelines import preset

from conftest import brain_epe, quick


@pytest.mark.parametrize("metric", ["mse", "ncc", "lncc", "mi", "nmi", "ngf"])
def test_every_metric_registers(pair, metric):
    fixed, moving, truth = pair
    result = quick(preset("bspline", fixed.grid, metric=metric))(fixed, moving)
    affine = quick(preset("affine", fixed.grid))(fixed, moving)
    assert brain_epe(result.transform, truth, fixed) < 0.7 * brain_epe(affine.transform, truth, fixed)


def test_intersubject_preset_registers_with_a_dense_velocity(pair):
    """The intersubject preset's dense velocity (Gaussian-smoothed updates) recovers a known
    deformation, without folding, and keeps an exact inverse: exp(-v). The deformation here is
    a smooth B-spline, the bspline and diffeomorphic presets' own family, where a dense field
    does less well (they reach < 0.6 of the affine error on this pair); its case is real
    anatomy (benchmarks/real_cases.py)."""
    from airlab.evaluate import jacobian_stats
    from airlab.transforms import DenseVelocityField

    fixed, moving, truth = pair
    result = quick(preset("intersubject", fixed.grid))(fixed, moving)
    affine = quick(preset("affine", fixed.grid))(fixed, moving)
    assert brain_epe(result.transform, truth, fixed) < 0.75 * brain_epe(affine.transform, truth, fixed)
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
