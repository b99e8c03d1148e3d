"""Displacement fields: the fixed-point inverse and its residual."""

import torch

from airlab import Grid
from airlab.transforms import DisplacementField

from conftest import smooth_field


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
