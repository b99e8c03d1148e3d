"""Gradients, inverses and batching of transforms."""

import numpy as np
import pytest
import torch

from airlab import Grid, Image, resample, sample
from airlab.transforms import (
    Affine,
    Composite,
    DisplacementField,
    Rigid,
    StationaryVelocityField,
    Translation,
    rotation_matrix,
)
from airlab.transforms.linear import rotation_vector_from_matrix

from conftest import KINDS, make_transform, oblique_grid, smooth_field, smooth_image


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


@pytest.mark.parametrize("kind", ["translation", "rigid", "similarity", "affine"])
@pytest.mark.parametrize("d", [2, 3])
def test_linear_inverse_is_exact(kind, d, rng):
    t = make_transform(kind, oblique_grid(d, rng), rng, batch=2)
    pts = torch.as_tensor(rng.normal(size=(2, 20, d)) * 30)
    assert torch.allclose(t.inverse()(t(pts)), pts, atol=1e-10)
    assert torch.allclose(t(t.inverse()(pts)), pts, atol=1e-10)


def test_singular_affine_inverse_raises():
    m = np.array([[1.0, 2.0, 0], [2.0, 4.0, 0], [0, 0, 1]])
    with pytest.raises(ValueError, match="singular"):
        Affine(3, matrix=m).inverse()


def test_velocity_inverse_composes_to_identity(rng):
    grid = Grid((40, 36, 32), (1.5, 1.0, 2.0), (3, -7, 11), oblique_grid(3, rng).direction)
    v = smooth_field(grid, rng, 2, magnitude=4.0, sigma=4.0)
    t = StationaryVelocityField(grid, 2, v)
    inv = t.inverse()
    assert inv.velocity is t.velocity  # shared parameter
    pts = grid.points(torch.float64)
    with torch.no_grad():
        round_trip = Composite(inv, t)(pts) - pts
        back = Composite(t, inv)(pts) - pts
    idx = grid.indices(torch.float64)[0]
    inner = ((idx > 6) & (idx < torch.as_tensor(grid.size) - 7)).all(-1)
    voxel = min(grid.spacing)
    for err in (round_trip, back):
        assert float(err.norm(dim=-1)[:, inner].max()) < 0.05 * voxel


def test_velocity_is_diffeomorphic_for_large_smooth_fields(rng):
    grid = Grid((48, 48), (1.0, 1.0))
    t = StationaryVelocityField(grid, 1, smooth_field(grid, rng, 1, magnitude=8.0, sigma=5.0))
    with torch.no_grad():
        u = t.field()[0].numpy()
    # Jacobian determinant of x + u(x) stays positive
    gy, gx = np.gradient(u[1]), np.gradient(u[0])
    det = (1 + gx[1]) * (1 + gy[0]) - gx[0] * gy[1]
    assert det.min() > 0


def test_displacement_inverse_reports_residual(rng):
    grid = Grid((30, 28, 26), (1.2, 1.0, 1.5), (0, 0, 0))
    t = DisplacementField(grid, 1, smooth_field(grid, rng, 1, magnitude=3.0, sigma=4.0))
    inv = t.inverse()
    assert inv.residual is not None and float(inv.residual.max()) < 0.01
    pts = grid.points(torch.float64)
    idx = grid.indices(torch.float64)[0]
    inner = ((idx > 4) & (idx < torch.as_tensor(grid.size) - 5)).all(-1)
    with torch.no_grad():
        err = (t(inv(pts)) - pts).norm(dim=-1)[0][inner]
    assert float(err.max()) < 0.02


def test_displacement_inverse_of_folding_field_says_so():
    grid = Grid((20, 20), (1.0, 1.0))
    u = torch.zeros(1, 2, 20, 20, dtype=torch.float64)
    u[0, 0, :, 8:12] = torch.tensor([4.0, 1.0, -1.0, -4.0])  # columns cross each other: folding
    inv = DisplacementField(grid, 1, u).inverse(iterations=50)
    assert float(inv.residual.max()) > 0.5


def test_rotation_vector_round_trip(rng):
    for _ in range(50):
        r = rng.normal(size=3)
        r *= rng.uniform(0, np.pi - 1e-3) / np.linalg.norm(r)
        m = rotation_matrix(torch.as_tensor(r)[None])[0].numpy()
        assert np.allclose(m @ m.T, np.eye(3), atol=1e-12) and np.isclose(np.linalg.det(m), 1)
        assert np.allclose(rotation_vector_from_matrix(m), r, atol=1e-9)


def test_rotation_gradient_is_finite_at_zero():
    r = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    rotation_matrix(r).sum().backward()
    assert torch.isfinite(r.grad).all()
    assert torch.autograd.gradcheck(lambda x: rotation_matrix(x), (r,))


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


@pytest.mark.parametrize("d", [2, 3])
def test_exponential_equals_repeated_composition(d):
    """The exponential squares in normalised units; it must equal squaring with physical
    compositions on an oblique, anisotropic grid."""
    from airlab.transforms.dense import compose_displacements
    from airlab.transforms.velocity import exponential

    rng = np.random.default_rng(3)
    grid = oblique_grid(d, rng, size=(14, 12, 10)[:d])
    v = torch.as_tensor(rng.normal(scale=2.0, size=(2, d, *grid.shape)))
    u = v / 2**5
    for _ in range(5):
        u = compose_displacements(u, u, grid)
    torch.testing.assert_close(exponential(v, grid, 5), u, rtol=0, atol=1e-10)


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


def test_dense_velocity_follows_the_pyramid(rng):
    """A dense velocity lives on each level's grid with ``grid_shrink`` times its spacing: moving
    it to a finer level keeps the transform (linear interpolation of a smooth velocity), and its
    inverse shares the parameter."""
    from airlab.transforms import DenseVelocityField

    fine = Grid((40, 36, 32), (1.5, 1.0, 2.0), (3, -7, 11), oblique_grid(3, rng).direction)
    coarse = fine.with_spacing(np.asarray(fine.spacing) * 2)
    t = DenseVelocityField(fine, 1, steps=5, grid_shrink=2.0, dtype=torch.float64)
    t.start_level(0, coarse)
    assert t.grid.same_as(coarse.with_spacing(np.asarray(coarse.spacing) * 2))
    with torch.no_grad():
        t.velocity.copy_(smooth_field(t.grid, rng, 1, magnitude=3.0, sigma=1.5))
    pts = fine.points(torch.float64)
    idx = fine.indices(torch.float64)[0]
    inner = ((idx > 8) & (idx < torch.as_tensor(fine.size) - 9)).all(-1)
    with torch.no_grad():
        before = t(pts)
        t.start_level(1, fine)
        assert t.grid.same_as(fine.with_spacing(np.asarray(fine.spacing) * 2))
        after = t(pts)
        back = t.inverse()(after)
    assert float((after - before).norm(dim=-1)[:, inner].max()) < 0.05
    assert float((back - pts).norm(dim=-1)[:, inner].max()) < 0.05 * min(fine.spacing)
    assert t.inverse().velocity is t.velocity


def test_dense_velocity_first_order_gradient(rng):
    """``exact_gradient=False`` keeps the transform (the value of exp(v)) and differentiates it as
    v: the gradient is the loss's gradient with respect to the displacement, which for a small
    velocity is the exact gradient to first order."""
    from airlab.transforms import DenseVelocityField

    grid = Grid((20, 18, 16), (1.5, 1.0, 2.0), (3, -7, 11), oblique_grid(3, rng).direction)
    target = smooth_field(grid, rng, 1, magnitude=1.0, sigma=2.0)
    grads, fields = [], []
    for exact in (True, False):
        t = DenseVelocityField(grid, 1, steps=5, grid_shrink=1.0, dtype=torch.float64, exact_gradient=exact)
        with torch.no_grad():
            t.velocity.copy_(smooth_field(grid, np.random.default_rng(3), 1, magnitude=0.05, sigma=2.0))
        u = t.displacement(grid)
        (u - target).square().sum().backward()
        grads.append(t.velocity.grad.clone())
        fields.append(u.detach())
        if not exact:
            assert torch.allclose(t.velocity.grad, 2 * (u.detach() - target))
    assert torch.equal(fields[0], fields[1])
    cosine = float((grads[0] * grads[1]).sum() / (grads[0].norm() * grads[1].norm()))
    assert cosine > 0.99
