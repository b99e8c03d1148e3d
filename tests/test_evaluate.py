"""Evaluation measures against hand-computed values, and their input checks."""

import math

import numpy as np
import pytest
import torch

from airlab import Grid
from airlab.evaluate import dice, endpoint_error, hd95, jacobian_stats, tre

from conftest import oblique_grid, random_rotation, smooth_field


# --------------------------------------------------------------------------- dice
def test_dice_known_overlaps():
    a = np.zeros((10, 10), dtype=np.int16)
    b = np.zeros((10, 10), dtype=np.int16)
    a[0:4, 0:5] = 1  # 20 voxels
    b[2:6, 0:5] = 1  # 20 voxels, 10 shared -> 0.5
    a[8:10, 8:10] = 2  # only in a -> 0
    a[6:8, 0:3] = 3
    b[6:8, 0:3] = 3  # identical -> 1
    out = dice(a, b)
    assert out == {1: 0.5, 2: 0.0, 3: 1.0, "mean": 0.5}
    assert dice(torch.as_tensor(a), torch.as_tensor(b)) == out
    assert dice(a > 0, b > 0)[1] == pytest.approx(2 * 16 / (30 + 26))  # overlaps 10 + 6

    explicit = dice(a, b, labels=[1, 7])
    assert explicit[1] == 0.5 and math.isnan(explicit[7]) and explicit["mean"] == 0.5


def test_dice_errors():
    a = np.zeros((4, 4), dtype=int)
    with pytest.raises(ValueError, match="differ in shape"):
        dice(a, np.zeros((4, 5), dtype=int))
    with pytest.raises(ValueError, match="must be integer"):
        dice(a, a.astype(np.float32))


# --------------------------------------------------------------------------- hd95
def _cubes(shape, shift, d):
    a = np.zeros(shape, dtype=np.uint8)
    b = np.zeros(shape, dtype=np.uint8)
    a[(slice(3, 9),) * d] = 1
    b[(slice(3, 9),) * (d - 1) + (slice(3 + shift, 9 + shift),)] = 1  # along the last axis (x)
    return a, b


@pytest.mark.parametrize("d", [2, 3])
def test_hd95_of_shifted_cubes_is_the_shift_in_mm(d, rng):
    spacing = (0.7, 1.9, 2.6)[:d]
    shape = (14,) * d
    a, b = _cubes(shape, 2, d)
    straight = Grid(shape, spacing)
    oblique = Grid(shape, spacing, origin=rng.normal(size=d) * 10, direction=random_rotation(d, rng).ravel())
    for grid in (straight, oblique):
        assert hd95(a, b, grid) == {1: pytest.approx(2 * 0.7), "mean": pytest.approx(2 * 0.7)}
        assert hd95(a, a, grid)[1] == 0.0
    # the shift along tensor axis 0 is ITK axis d-1
    assert hd95(np.swapaxes(a, 0, -1), np.swapaxes(b, 0, -1), straight)[1] == pytest.approx(2 * spacing[-1])


def test_hd95_empty_labels_and_errors(rng):
    grid = Grid((8, 8), (1.0, 2.0))
    a = np.zeros((8, 8), dtype=int)
    b = np.zeros((8, 8), dtype=int)
    a[2:5, 2:5] = 1
    b[2:5, 2:5] = 1
    a[6:8, 6:8] = 2  # only in a
    out = hd95(a, b, grid, labels=[1, 2, 3])
    assert out[1] == 0.0 and out[2] == math.inf and math.isnan(out[3]) and out["mean"] == math.inf
    with pytest.raises(ValueError, match="do not match the grid"):
        hd95(a, b, Grid((8, 9)))
    with pytest.raises(ValueError, match="orthonormal"):
        hd95(a, b, Grid((8, 8), direction=(1.0, 0.5, 0.0, 1.0)))
    with pytest.raises(ValueError, match="must be integer"):
        hd95(a * 1.0, b, grid)


# --------------------------------------------------------------------------- jacobian
@pytest.mark.parametrize("d", [2, 3])
def test_jacobian_stats_of_affine_fields(d, rng):
    grid = oblique_grid(d, rng, size=(7, 6, 5)[:d] if d == 3 else (9, 8))
    x = grid.points(dtype=torch.float64)[0]
    a = np.diag([0.5] + [0.0] * (d - 1))  # det(I + A) = 1.5
    field = torch.movedim(x @ torch.as_tensor(a).T, -1, 0)
    stats = jacobian_stats(field, grid)
    assert stats["folding_count"] == 0 and stats["folding_fraction"] == 0.0
    assert stats["det_min"] == pytest.approx(1.5) and stats["det_max"] == pytest.approx(1.5)
    assert stats["log_jacobian_std"] == pytest.approx(0.0, abs=1e-9)

    flip = np.zeros((1, d, *grid.shape))
    flip[0, 0] = -2 * x[..., 0].numpy()  # u_x = -2 x: det = -1 everywhere
    stats = jacobian_stats(flip, grid)
    assert stats["folding_count"] == grid.numel and stats["folding_fraction"] == 1.0
    assert stats["det_max"] == pytest.approx(-1.0)


def test_jacobian_stats_match_numpy_reference(rng):
    # identity grid: physical derivatives are np.gradient's (edge_order=2, as the regularisers)
    grid = Grid((12, 11, 10))
    field = smooth_field(grid, rng, batch=1, magnitude=6.0, sigma=1.5)[0].numpy()
    grads = [np.gradient(field[c], edge_order=2) for c in range(3)]  # per component, tensor axes
    jac = np.stack([np.stack(g[::-1], axis=-1) for g in grads], axis=-2)  # [..., i, j] in ITK order
    det = np.linalg.det(np.eye(3) + jac)
    mask = np.zeros(grid.shape, dtype=bool)
    mask[2:-2, 1:-1, :] = True
    ref = det[mask]
    assert (ref <= 0).any(), "the reference field should fold somewhere"

    stats = jacobian_stats(torch.as_tensor(field)[None], grid, mask=mask)
    assert stats["folding_count"] == int((ref <= 0).sum())
    assert stats["folding_fraction"] == pytest.approx((ref <= 0).mean())
    assert stats["det_min"] == pytest.approx(ref.min()) and stats["det_max"] == pytest.approx(ref.max())
    assert stats["log_jacobian_std"] == pytest.approx(np.log(np.clip(ref, 1e-9, 1e9)).std())


def test_jacobian_stats_errors():
    grid = Grid((6, 5))
    with pytest.raises(ValueError, match="does not fit the grid"):
        jacobian_stats(np.zeros((2, 6, 5)), grid)
    with pytest.raises(ValueError, match=r"\[D, \*shape\]"):
        jacobian_stats(np.zeros((3, 5, 6)), grid)
    with pytest.raises(ValueError, match="mask of shape"):
        jacobian_stats(np.zeros((2, 5, 6)), grid, mask=np.ones((6, 5)))
    with pytest.raises(ValueError, match="selects no voxels"):
        jacobian_stats(np.zeros((2, 5, 6)), grid, mask=np.zeros((5, 6)))


# --------------------------------------------------------------------------- errors in mm
def test_endpoint_error_of_constant_fields():
    a = np.zeros((3, 4, 5, 6))
    a[:] = np.array([1.0, 2.0, 2.0])[:, None, None, None]  # |(1, 2, 2)| = 3 mm
    b = np.zeros_like(a)
    assert endpoint_error(a, b) == {"mean": 3.0, "median": 3.0, "p95": 3.0, "max": 3.0}
    batched = torch.as_tensor(a)[None], torch.as_tensor(b, dtype=torch.float32)[None]
    assert endpoint_error(*batched) == endpoint_error(a, b)

    b[:, 0] = a[:, 0]  # first slice exact; the mask keeps only it
    mask = np.zeros((4, 5, 6), dtype=bool)
    mask[0] = True
    assert endpoint_error(a, b, mask=mask)["max"] == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        endpoint_error(a, b[:, :3])
    with pytest.raises(ValueError, match="floating point"):
        endpoint_error(a.astype(int), b)


def test_tre_of_known_points():
    target = np.zeros((4, 3))
    mapped = np.array([[0.0, 0, 0], [3, 0, 0], [0, 4, 0], [3, 4, 0]])  # distances 0, 3, 4, 5
    assert tre(mapped, target) == {"mean": 3.0, "median": 3.5, "p95": pytest.approx(4.85), "max": 5.0}
    assert tre(torch.as_tensor(mapped), target)["max"] == 5.0
    with pytest.raises(ValueError, match="differ in shape"):
        tre(mapped, target[:3])
    with pytest.raises(ValueError, match=r"non-empty \[P, D\]"):
        tre(mapped[None], target[None])
    with pytest.raises(ValueError, match="nan or inf"):
        tre(mapped * np.nan, target)
