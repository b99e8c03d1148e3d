"""transforms/bspline.py: the control grid, hand-computed values of one knot's basis, ITK's valid
region, refinement that keeps the transform."""

import numpy as np
import pytest
import torch

from airlab import Grid
from airlab.transforms import BSplineTransform, control_grid

from conftest import oblique_grid


@pytest.mark.parametrize("d", [2, 3])
def test_the_control_grid_covers_the_domain_with_one_knot_beyond(d, rng):
    domain = oblique_grid(d, rng)
    control = control_grid(domain, 4.0)
    assert np.allclose(control.spacing, 4.0) and np.allclose(control.direction, domain.direction)
    assert np.allclose(control.center(), domain.center())
    # the mesh covers the extent; the outer knots are the cubic support's extra one per side
    assert ((np.asarray(control.size) - 3) * 4.0 >= domain.extent() - 1e-9).all()
    assert ((np.asarray(control.size) - 4) * 4.0 < domain.extent()).all()
    with pytest.raises(ValueError, match="must be positive"):
        control_grid(domain, 0.0)


@pytest.mark.parametrize("d", [2, 3])
def test_one_knot_moves_points_by_its_cubic_weights(d):
    """With a single coefficient c at knot k: c (2/3)^d at the knot (B3(0) = 4/6), and
    c (23/48) (2/3)^(d-1) half a knot spacing further along x (B3(1/2) = 23/48)."""
    domain = Grid((30, 26, 22)[:d], (1.0, 1.5, 2.0)[:d], (5.0, -3.0, 2.0)[:d])
    t = BSplineTransform(domain, 6.0, dtype=torch.float64)
    k = tuple(s // 2 for s in t.control.shape)  # an interior knot (torch order)
    c = torch.arange(1.0, d + 1, dtype=torch.float64)
    with torch.no_grad():
        t.coefficients[(0, slice(None)) + k] = c
    knot = torch.as_tensor(list(reversed(k)), dtype=torch.float64)  # ITK order
    points = t.control.index_to_physical(torch.stack([knot, knot + torch.eye(d, dtype=torch.float64)[0] / 2]))
    with torch.no_grad():
        moved = t(points[None])[0] - points
    torch.testing.assert_close(moved[0], c * (2 / 3) ** d, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(moved[1], c * (23 / 48) * (2 / 3) ** (d - 1), rtol=1e-12, atol=1e-12)


def test_points_outside_the_valid_region_are_not_moved():
    domain = Grid((20, 20), (1.0, 1.0))
    t = BSplineTransform(domain, 5.0, dtype=torch.float64)
    with torch.no_grad():
        t.coefficients.fill_(1.0)
    inside = torch.as_tensor(domain.center())[None, None]
    far = t.control.index_to_physical(torch.tensor([[[0.5, 3.0], [3.0, t.control.size[1] - 1.5]]],
                                                   dtype=torch.float64))
    with torch.no_grad():
        assert torch.allclose(t(inside) - inside, torch.ones(1, 1, 2, dtype=torch.float64))  # partition of unity
        assert torch.equal(t(far), far)


def test_refine_halves_the_spacing_and_keeps_the_transform(rng):
    domain = Grid((24, 20), (1.5, 1.0), (3.0, -2.0))
    t = BSplineTransform(domain, 8.0, dtype=torch.float64)
    with torch.no_grad():
        t.coefficients.copy_(torch.as_tensor(rng.normal(size=t.coefficients.shape)))
        before = t.displacement(domain)
        t.refine()
        after = t.displacement(domain)
    assert np.allclose(t.control.spacing, 4.0)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-10)
