"""Wendland kernel transform: kernel values by hand, the compact-neighbourhood sum against a sum
over every knot, gradients, the diffeomorphic variant, and a YAML pipeline on the shipped slice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import oblique_grid

from airlab import Grid
from airlab.errors import ConfigError
from airlab.pipelines.schema import validate
from airlab.transforms import KernelVelocityField, TransformSpec, WendlandTransform, wendland


@pytest.mark.parametrize("order,values", [
    # (1-r)^4 (4r+1); (1-r)^6 (35r^2+18r+3)/3; (1-r)^8 (32r^3+25r^2+8r+1), at r = 0, 0.5, 0.25, 1, 1.5
    (2, [1.0, 0.5**4 * 3, 0.75**4 * 2, 0.0, 0.0]),
    (4, [1.0, 0.5**6 * (35 / 4 + 9 + 3) / 3, 0.75**6 * (35 / 16 + 4.5 + 3) / 3, 0.0, 0.0]),
    (6, [1.0, 0.5**8 * (4 + 6.25 + 4 + 1), 0.75**8 * (0.5 + 25 / 16 + 2 + 1), 0.0, 0.0]),
])
def test_kernel_values(order, values):
    r = torch.tensor([0.0, 0.5, 0.25, 1.0, 1.5], dtype=torch.float64)
    np.testing.assert_allclose(wendland(r, order).numpy(), values, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="order"):
        wendland(r, 3)


def _random(t: WendlandTransform, seed=0):
    with torch.no_grad():
        t.coefficients.copy_(torch.randn(t.coefficients.shape, generator=torch.Generator().manual_seed(seed),
                                         dtype=t.coefficients.dtype))
    return t


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("order", [2, 6])
def test_matches_a_sum_over_every_knot(d, order):
    rng = np.random.default_rng(d)
    grid = oblique_grid(d, rng)
    t = _random(WendlandTransform(grid, 4.5, support=7.0, order=order, dtype=torch.float64))
    x = grid.points(torch.float64).reshape(1, -1, d)[:, ::7]
    knots = t.control.points(torch.float64).reshape(-1, d)  # every knot, [M, D]
    r = torch.cdist(x[0], knots) / 7.0  # [P, M]
    expected = x[0] + wendland(r, order) @ t.coefficients[0].reshape(d, -1).T
    torch.testing.assert_close(t(x)[0], expected, rtol=1e-10, atol=1e-10)
    # the dense field is the same sum
    field = t.displacement(grid)
    torch.testing.assert_close(torch.movedim(field, 1, -1).reshape(1, -1, d)[:, ::7], expected[None] - x)


@pytest.mark.parametrize("d", [2, 3])
def test_gradcheck(d):
    grid = Grid((7, 6, 5)[:d], (1.5, 2.0, 1.0)[:d], (3.0, -2.0, 1.0)[:d])
    t = _random(WendlandTransform(grid, 4.0, support=5.0, dtype=torch.float64), 1)
    x = grid.points(torch.float64).reshape(1, -1, d)[:, ::13].clone().requires_grad_(True)
    c = t.coefficients.detach().clone().requires_grad_(True)
    from torch.func import functional_call

    assert torch.autograd.gradcheck(lambda c, x: functional_call(t, {"coefficients": c}, (x,)), (c, x),
                                    fast_mode=True)


def test_diffeomorphic_variant_inverts_and_does_not_fold():
    from airlab.regularisers import jacobian_determinant

    grid = Grid((40, 36), (1.0, 1.0), (-20.0, -18.0))
    kernel = WendlandTransform(grid, 6.0, dtype=torch.float64)
    with torch.no_grad():  # a large velocity: the plain kernel field with these coefficients folds
        kernel.coefficients.copy_(torch.randn(kernel.coefficients.shape, generator=torch.Generator().manual_seed(2),
                                              dtype=torch.float64) * 2)
    t = KernelVelocityField(grid, kernel, steps=7)
    with torch.no_grad():
        assert float(jacobian_determinant(kernel.displacement(grid), grid).min()) < 0
        assert float(jacobian_determinant(t.displacement(grid), grid).min()) > 0
        x = grid.points(torch.float64)[:, 8:-8, 8:-8]
        back = t.inverse()(t(x))
    assert float((back - x).norm(dim=-1).max()) < 0.4  # linear interpolation on a 1 mm grid


def test_registry_and_schema():
    grid = Grid((30, 20), (1.0, 2.0))
    t = TransformSpec("wendland", {"control_spacing": 6.0, "order": 6, "support": 9.0})(grid, 2)
    assert isinstance(t, WendlandTransform) and t.order == 6 and t.support == 9.0 and t.coefficients.shape[:2] == (2, 2)
    v = TransformSpec("wendland", {"control_spacing": 6.0, "diffeomorphic": True})(grid, 1)
    assert isinstance(v, KernelVelocityField) and v.kernel.support == 12.0
    stage = {"transform": "wendland", "losses": [{"name": "mse"}], "order": 2, "diffeomorphic": True,
             "symmetric": True}
    built = validate({"stages": [stage]}, "test").build(grid)[0]
    assert built.transform.options == {"control_spacing": 8.0 * 1.5, "steps": 4, "exp_shrink": 4.0, "support": None,
                                       "order": 2, "diffeomorphic": True}
    with pytest.raises(ConfigError, match="order: only for transform: wendland"):
        validate({"stages": [{**stage, "transform": "bspline", "diffeomorphic": None, "symmetric": False}]}, "test")
    with pytest.raises(ConfigError, match="order"):
        validate({"stages": [{**stage, "order": 3}]}, "test")
    with pytest.raises(ConfigError, match="symmetric"):
        validate({"stages": [{**stage, "diffeomorphic": False}]}, "test")


PIPELINE = """
stages:
  - {name: rigid, transform: rigid, losses: [{name: ncc}], iterations: [100], pyramid: coarsest, lr: 0.5}
  - {name: affine, transform: affine, losses: [{name: ncc}], iterations: [100, 60], pyramid: coarsest,
     strides: [2], lr: 0.2}
  - name: kernel
    transform: wendland
    order: 4
    losses: [{name: mi, bins: 64}]
    regularisers: [{name: bending, weight: 0.1}]
    iterations: [60, 30]
    pyramid: coarsest
    optimizer: field-adam
    lr: 0.25
    regulariser_shrink: 2
"""


def test_yaml_pipeline_registers_the_shipped_slice(tmp_path):
    import yaml

    from airlab.datasets import example_path
    from airlab.evaluate import endpoint_error
    from airlab.image import read_image, resample
    from airlab.pipelines import load_config
    from airlab.synthetic import ground_truth, random_deformation
    from airlab.workflows import register_pair

    fixed = read_image(example_path("mni152_t1_1mm_axial")).to(torch.float32)
    deformation = random_deformation(fixed.grid, 0)
    with torch.no_grad():
        moving = resample(fixed, fixed.grid, deformation, interpolation="bspline")
    truth, _ = ground_truth(deformation, fixed.grid)
    brain = (fixed.data[0, 0] > 0.1 * fixed.data.max()).numpy()
    (tmp_path / "wendland.yaml").write_text(PIPELINE)
    (tmp_path / "affine.yaml").write_text(yaml.safe_dump({"stages": yaml.safe_load(PIPELINE)["stages"][:2]}))
    errors = {}
    for name in ("affine", "wendland"):
        out = register_pair(fixed, moving, load_config(tmp_path / f"{name}.yaml"))
        found = out.displacement.field[0].detach().numpy()
        errors[name] = endpoint_error(found, truth.field[0].numpy(), mask=brain)["mean"]
    assert type(out.result.stages[-1]).__name__ == "WendlandTransform"
    # measured 0.77 mm vs 1.22 mm (the full-length pipeline of docs reaches 0.23 mm)
    assert errors["wendland"] < 0.75 * errors["affine"], errors


def test_kernel_weight_caches_are_attributes_that_copy_and_pickle():
    """The B-spline's and Wendland's per-grid weights are attributes from ``__init__`` (issue 12):
    a filled cache travels with a deep copy or a pickle, and the copy evaluates the same."""
    import copy
    import pickle

    from airlab.transforms import BSplineTransform

    grid = Grid((12, 10), (1.5, 1.2))
    bspline = BSplineTransform(grid, 5.0, dtype=torch.float64)
    restored = BSplineTransform.from_control_grid(bspline.control, bspline.coefficients.detach())
    for t in (bspline, restored, WendlandTransform(grid, 5.0, dtype=torch.float64)):
        cache = t._grid_weights if isinstance(t, WendlandTransform) else t._axis_weights
        assert cache == {}
        with torch.no_grad():
            t.coefficients.normal_()
        field = t.displacement(grid)
        assert len(cache) == 1
        for other in (copy.deepcopy(t), pickle.loads(pickle.dumps(t))):
            torch.testing.assert_close(other.displacement(grid), field, rtol=0, atol=0)
