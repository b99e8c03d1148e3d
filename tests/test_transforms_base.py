"""The contract every transform keeps (translation to composite, 2D and 3D): gradients,
batches, the displacement shortcuts, shapes, dtypes and errors."""

import numpy as np
import pytest
import torch

from airlab import Grid, Image, resample, sample
from airlab.transforms import Affine, Composite, Rigid, Translation

from conftest import KINDS, make_transform, oblique_grid, smooth_image


def _small_grid(d, rng):
    return oblique_grid(d, rng, size=(6, 5, 4)[:d] if d == 3 else (7, 6))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d", [2, 3])
def test_gradcheck_points_wrt_parameters(kind, d, rng):
    grid = _small_grid(d, rng)
    t = make_transform(kind, grid, rng, batch=2)
    pts = grid.index_to_physical(torch.as_tensor(rng.uniform(0, np.asarray(grid.size) - 1, (2, 7, d))))
    names = [n for n, _ in t.named_parameters()]

    def g(*values):
        return torch.func.functional_call(t, dict(zip(names, values)), (pts,))

    inputs = [p.detach().clone().requires_grad_(True) for p in t.parameters()]
    assert torch.autograd.gradcheck(g, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["affine", "bspline", "velocity"])
@pytest.mark.parametrize("interpolation", ["linear", "bspline"])
@pytest.mark.parametrize("d", [2, 3])
def test_gradcheck_resample_wrt_transform(kind, interpolation, d, rng):
    moving = _small_grid(d, rng)
    image = Image(smooth_image(moving, rng, sigma=1.0), moving)
    t = make_transform(kind, moving, rng)
    with torch.no_grad():  # keep the warp modest so samples stay inside
        for p in t.parameters():
            if kind != "affine":
                p.mul_(0.2)
    names = [n for n, _ in t.named_parameters()]

    def g(*values):
        warped = torch.func.functional_call(t, dict(zip(names, values)), (moving.points(torch.float64),))
        return sample(image.data, moving, warped, interpolation, outside=0.0)

    inputs = [p.detach().clone().requires_grad_(True) for p in t.parameters()]
    assert torch.autograd.gradcheck(g, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d", [2, 3])
def test_batch_equals_singles(kind, d, rng):
    moving = oblique_grid(d, rng)
    fixed = _small_grid(d, rng)
    batched = make_transform(kind, fixed, rng, batch=3)
    image = Image(smooth_image(moving, rng), moving)
    pts = torch.as_tensor(rng.normal(size=(9, d)) * 3) + torch.as_tensor(fixed.center())
    warped = resample(image, fixed, batched).data
    mapped = batched.transform_points(pts)
    assert warped.shape[0] == 3 and mapped.shape[0] == 3
    state = batched.state_dict()
    for i in range(3):
        single = make_transform(kind, fixed, rng, batch=1)
        single.load_state_dict({k: v[i : i + 1] for k, v in state.items()})
        assert torch.allclose(single.transform_points(pts), mapped[i], atol=1e-10)
        assert torch.allclose(resample(image, fixed, single).data[0], warped[i], atol=1e-10)


@pytest.mark.parametrize("kind", KINDS + ("velocity-composite",))
@pytest.mark.parametrize("d", [2, 3])
def test_displacement_equals_mapping_the_points(kind, d, rng):
    """Every shortcut of ``displacement(grid)`` (separable B-splines, fields resampled onto
    aligned grids, composites starting with them) is the transform applied to the grid's points."""
    from airlab.transforms.base import Transform

    domain = oblique_grid(d, rng)
    if kind == "velocity-composite":
        t = Composite(make_transform("velocity", domain, rng, 2), make_transform("affine", domain, rng, 2))
    else:
        t = make_transform(kind, domain, rng, batch=2)
    shifted = Grid(domain.size, np.asarray(domain.spacing) * 0.7,
                   np.asarray(domain.origin) + domain.direction_matrix @ rng.uniform(-3, 3, size=d), domain.direction)
    for grid in (domain, domain.with_spacing(np.asarray(domain.spacing) * 1.6), domain.subgrid(2, [1] * d), shifted,
                 oblique_grid(d, rng)):
        with torch.no_grad():
            assert torch.allclose(t.displacement(grid), Transform.displacement(t, grid), atol=1e-9, rtol=0)


def test_points_shapes_and_errors(rng):
    t = Rigid(3, rotation=[0.1, 0.2, 0.3], translation=[1, 2, 3])
    assert t.transform_points(np.zeros((5, 3))).shape == (5, 3)
    assert t(torch.zeros(1, 4, 5, 6, 3)).shape == (1, 4, 5, 6, 3)
    with pytest.raises(ValueError, match="components"):
        t.transform_points(np.zeros((5, 2)))
    with pytest.raises(ValueError, match="batch"):
        Translation(3, batch_size=2)(torch.zeros(3, 5, 3))
    with pytest.raises(ValueError, match="different dimensions"):
        Composite(Translation(2), Translation(3))


def test_device_and_dtype_follow_the_transform(rng):
    t = Affine(2, dtype=torch.float32)
    assert t.transform_points(np.ones((3, 2))).dtype == np.float32
    assert t(torch.ones(1, 3, 2)).dtype == torch.float32
