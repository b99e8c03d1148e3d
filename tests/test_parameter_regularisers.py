"""Penalties on the coefficient lattice of kernel transforms (AirLab's regulariser.parameter)."""

import pytest
import torch

from airlab import Grid
from airlab.errors import ConfigError
from airlab.pipelines.schema import validate
from airlab.regularisers import (
    REGULARISERS,
    CoefficientDiffusion,
    CoefficientL1,
    CoefficientL2,
    CoefficientTV,
    CoefficientTVL1,
    ParameterRegulariser,
)
from airlab.transforms import (Affine, BSplineTransform, BSplineVelocityField, KernelVelocityField,
                               WendlandTransform)

NAMES = {"coefficients-l1": CoefficientL1, "coefficients-l2": CoefficientL2,
         "coefficients-diffusion": CoefficientDiffusion, "coefficients-tv": CoefficientTV,
         "coefficients-tv-l1": CoefficientTVL1}


def test_every_lattice_family_exposes_its_coefficients():
    grid = Grid((20, 16), (1.0, 1.5), origin=(3.0, -2.0))
    bspline = BSplineTransform(grid, 5.0, batch_size=2)
    wendland = WendlandTransform(grid, 5.0)
    for t, owner in ((bspline, bspline), (wendland, wendland), (BSplineVelocityField(grid, 5.0), None),
                     (KernelVelocityField(grid, wendland), wendland)):
        coefficients, lattice = t.coefficient_lattice()
        assert coefficients.shape == (t.batch_size, 2, *lattice.shape) and lattice.spacing == (5.0, 5.0)
        # the tensor the optimiser moves, so a penalty on it has a gradient
        assert coefficients.requires_grad and any(coefficients is p for p in t.parameters())
        if owner is not None:
            assert lattice is owner.control
    with pytest.raises(ValueError, match="Affine has no coefficient lattice"):
        Affine(2).coefficient_lattice()


def test_hand_computed_values_on_a_tiny_lattice():
    """Knots 2 mm apart along x and 3 mm along y; ``c = (3 x, -2 y)`` (mm), so the physical
    Jacobian is ``diag(3, -2)`` everywhere: the lattice index spacing must not leak in."""
    lattice = Grid((4, 5), (2.0, 3.0))
    x = torch.arange(4, dtype=torch.float64) * 2.0
    y = torch.arange(5, dtype=torch.float64) * 3.0
    c = torch.stack([3 * x.expand(5, 4), -2 * y[:, None].expand(5, 4)])[None]
    t = BSplineTransform.from_control_grid(lattice, c, dtype=torch.float64)
    coefficients, grid = t.coefficient_lattice()
    one = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(CoefficientDiffusion()(coefficients, grid), one(13.0))
    torch.testing.assert_close(CoefficientTVL1()(coefficients, grid), one(5.0))
    torch.testing.assert_close(CoefficientTV(eps=0.5)(coefficients, grid), one((13.0 + 0.25) ** 0.5))
    # magnitudes per knot, summed over components: mean |3x| + mean |2y| = 9 + 12, and squared
    torch.testing.assert_close(CoefficientL1()(coefficients, grid), one(9.0 + 12.0))
    torch.testing.assert_close(CoefficientL2()(coefficients, grid), one(9 * 56 / 4 + 4 * 270 / 5))


@pytest.mark.parametrize("name", sorted(NAMES))
def test_gradcheck_and_registry(name):
    assert REGULARISERS[name] is NAMES[name] and issubclass(NAMES[name], ParameterRegulariser)
    lattice = Grid((5, 4, 4), (4.0, 5.0, 6.0), direction=(0, 1, 0, -1, 0, 0, 0, 0, 1))
    c = torch.randn(2, 3, *lattice.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    module = NAMES[name](eps=0.1) if name == "coefficients-tv" else NAMES[name]()
    assert module(c, lattice).shape == (2,)
    assert torch.autograd.gradcheck(lambda v: module(v, lattice), (c.requires_grad_(True),), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("transform", ["affine", "rigid", "dense-velocity"])
def test_schema_refuses_a_lattice_penalty_without_a_lattice(transform):
    stage = {"transform": transform, "losses": [{"name": "mse"}],
             "regularisers": [{"name": "coefficients-diffusion", "weight": 0.1}]}
    with pytest.raises(ConfigError, match=f"'coefficients-diffusion' penalises a coefficient lattice, which "
                                          f"transform '{transform}' does not have") as info:
        validate({"stages": [stage]}, "test")
    assert "\n" not in str(info.value)
    built = validate({"stages": [{**stage, "transform": "wendland"}]}, "test").build(Grid((30, 30), (1.0, 1.0)))
    assert isinstance(built[0].regularisers[0][1], CoefficientDiffusion)
    with pytest.raises(ConfigError, match="has no option 'order'"):
        validate({"stages": [{**stage, "transform": "bspline",
                              "regularisers": [{"name": "coefficients-tv", "order": 2}]}]}, "test")


PIPELINE = """
seed: 0
initialisation: none
stages:
  - name: deformable
    transform: bspline
    control_spacing: 16
    losses: [{{name: mse}}]
    regularisers: [{{name: coefficients-diffusion, weight: {weight}}}]
    iterations: [40, 30]
    pyramid: coarsest
    optimizer: field-adam
    lr: 0.5
"""


def test_a_yaml_stage_with_a_coefficient_penalty_registers(tmp_path):
    """The penalty enters the objective and the history, and a weight makes the lattice smoother
    than weight 0 while the images still come closer."""
    from airlab.datasets import example_path
    from airlab.image import read_image, resample
    from airlab.pipelines import load_config
    from airlab.synthetic import random_deformation
    from airlab.workflows import register_pair

    fixed = read_image(example_path("mni152_t1_1mm_axial")).to(torch.float32)
    with torch.no_grad():
        moving = resample(fixed, fixed.grid, random_deformation(fixed.grid, 1), interpolation="bspline")
    before = float((fixed.data - moving.data).square().mean())
    rough, mse = {}, {}
    for weight in (0.0, 0.2):
        (tmp_path / "p.yaml").write_text(PIPELINE.format(weight=weight))
        out = register_pair(fixed, moving, load_config(tmp_path / "p.yaml"))
        stage = out.result.stages[-1]
        assert isinstance(stage, BSplineTransform)
        with torch.no_grad():
            rough[weight] = float(CoefficientDiffusion()(*stage.coefficient_lattice()))
            mse[weight] = float((fixed.data - out.result.warp(moving).data).square().mean())
        assert [("CoefficientDiffusion" in h["final_terms"]) for h in out.result.history] == [True, True]
    # measured: roughness 0.0140 -> 0.0017 (mm/mm)^2, MSE 629 before, 54 and 78 after
    assert rough[0.2] < 0.3 * rough[0.0], rough
    assert mse[0.2] < 0.2 * before and mse[0.0] < 0.2 * before, (before, mse)
