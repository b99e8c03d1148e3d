"""Velocity fields: the exponential, inverses that share the parameter, dense velocities on the pyramid."""

import numpy as np
import pytest
import torch

from airlab import Grid
from airlab.transforms import Composite, StationaryVelocityField

from conftest import oblique_grid, smooth_field


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
    # the same field; to rounding, as the first order squares without autograd (airlab.compiled)
    assert torch.allclose(fields[0], fields[1], rtol=0, atol=1e-12)
    cosine = float((grads[0] * grads[1]).sum() / (grads[0].norm() * grads[1].norm()))
    assert cosine > 0.99
