"""synthetic.py: seeded deformations within the bounds asked for, their inverse, and the swap of
grey and white matter's contrast."""

import numpy as np
import pytest
import torch

from airlab import Grid
from airlab.synthetic import ground_truth, invert_grey_white, random_deformation
from airlab.transforms import BSplineTransform, Rigid

GRID = Grid((40, 36), (1.5, 2.0), (10.0, -5.0))
GRID3 = Grid((20, 18, 16), (2.0, 1.5, 2.5), (0.0, 4.0, -3.0))


def _field(t, grid):
    with torch.no_grad():
        return t.displacement(grid)


@pytest.mark.parametrize("grid", [GRID, GRID3], ids=["2d", "3d"])
def test_the_same_seed_gives_the_same_deformation_and_another_a_different_one(grid):
    a, b, c = (random_deformation(grid, seed) for seed in (7, 7, 8))
    assert torch.equal(_field(a, grid), _field(b, grid))
    assert float((_field(a, grid) - _field(c, grid)).abs().max()) > 0.5


@pytest.mark.parametrize("grid", [GRID, GRID3], ids=["2d", "3d"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_parts_stay_within_the_requested_bounds(grid, seed):
    t = random_deformation(grid, seed, max_displacement=3.0, max_rotation_deg=5.0, max_translation=2.0)
    bspline, rigid = t[0], t[1]
    assert isinstance(bspline, BSplineTransform) and isinstance(rigid, Rigid)
    # the B-spline is scaled so that its largest displacement on the grid is exactly the one asked for
    peak = float(_field(bspline, grid).norm(dim=1).max())
    assert peak == pytest.approx(3.0, rel=1e-5)
    assert float(rigid.rotation.detach().norm()) <= np.deg2rad(5.0) + 1e-7
    assert float(rigid.translation.detach().norm()) <= 2.0 + 1e-6
    assert torch.allclose(rigid.center, torch.as_tensor(grid.center(), dtype=rigid.center.dtype))


def test_the_deformation_is_smooth():
    """Six knots per axis over the grid: neighbouring voxels move by much less than the peak, and
    x + u(x) does not fold (its Jacobian determinant stays positive)."""
    u = _field(random_deformation(GRID, 3, max_displacement=4.0, max_rotation_deg=0.0, max_translation=0.0), GRID)[0]
    mm = torch.as_tensor(GRID.spacing, dtype=u.dtype)
    step = max(float(u.diff(dim=1).abs().max() / mm[1]), float(u.diff(dim=2).abs().max() / mm[0]))
    assert step < 0.5  # mm per mm (about the peak over the 20 mm between knots): far from folding
    du_dy, du_dx = np.gradient(u.double().numpy(), GRID.spacing[1], GRID.spacing[0], axis=(1, 2))
    det = (1 + du_dx[0]) * (1 + du_dy[1]) - du_dy[0] * du_dx[1]
    assert det.min() > 0.5


def test_too_few_control_points_are_refused():
    with pytest.raises(ValueError, match="control_points must be at least 4"):
        random_deformation(GRID, 0, control_points=3)


def test_ground_truth_inverts_the_deformation_inside_the_grid():
    t = random_deformation(GRID, 5, max_displacement=3.0)
    field, residual = ground_truth(t, GRID)
    pts = GRID.points(torch.float32)
    with torch.no_grad():
        back = t(field(pts))  # the deformation after its inverse: the identity
    idx = GRID.indices(torch.float32)[0]
    inner = ((idx > 5) & (idx < torch.as_tensor(GRID.size) - 6)).all(-1)
    assert float((back - pts).norm(dim=-1)[0][inner].max()) < 1e-3
    assert float(residual[0][inner].max()) < 1e-3


def test_invert_grey_white_swaps_the_two_and_keeps_the_background():
    data = torch.tensor([0.0, 30.0, 60.0, 90.0, 100.0, 45.0, -5.0])
    out = invert_grey_white(data, grey=30.0, white=60.0)
    # 0 -> 0, grey -> white, white -> grey, the maximum -> 0.8 grey; linear in between; below 0 clamps
    expected = torch.tensor([0.0, 60.0, 30.0, 30.0 + (24.0 - 30.0) * 30.0 / 40.0, 24.0, 45.0, 0.0])
    assert torch.allclose(out, expected)
    with pytest.raises(ValueError, match="expected 0 < grey"):
        invert_grey_white(data, grey=60.0, white=30.0)
