"""grid.py: the linear fetch's split of one image over the CPU threads, and the grid checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from airlab.grid import Grid, cpu_split, grid_sample, is_diagonal

from conftest import oblique_grid


def _points(rng, d, n):
    """``n`` random normalised points, shaped ``[1, 1, (1,) n, d]`` as grid_sample takes them."""
    return torch.as_tensor(rng.uniform(-1.2, 1.2, size=(1, *([1] * (d - 1)), n, d)))


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("parts", [2, 3, 7])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
def test_split_and_single_call_give_the_same_numbers(d, parts, padding, rng):
    """The two paths cpu_split chooses between: identical values (each point is sampled alone,
    whichever batch element holds it) and gradients equal to rounding, whatever the thread count.
    ``parts`` that do not divide the points exercise the padding."""
    data = torch.as_tensor(rng.normal(size=(1, 2, *(7, 9, 8)[:d]))).requires_grad_()
    grid = _points(rng, d, 1001).requires_grad_()
    split = grid_sample(data, grid, padding, parts=parts)
    single = grid_sample(data, grid, padding, parts=1)
    assert split.shape == single.shape == (1, 2, *grid.shape[1:-1])
    assert torch.equal(split, single)
    assert torch.equal(single, F.grid_sample(data, grid, "bilinear", padding, align_corners=True))
    weights = torch.as_tensor(rng.normal(size=single.shape))
    g_split = torch.autograd.grad((split * weights).sum(), (data, grid))
    g_single = torch.autograd.grad((single * weights).sum(), (data, grid))
    assert torch.equal(g_split[1], g_single[1])  # per point: no sum across parts
    assert torch.allclose(g_split[0], g_single[0], atol=1e-12, rtol=0)


def test_cpu_split_policy(rng):
    """A split only for one image on CPU with at least 1024 points per thread in 3D, 8192 in 2D;
    the default asks torch for the thread count, and that is the only hidden input."""
    volume = torch.zeros(1, 1, 4, 4, 4, dtype=torch.float64)
    points = _points(rng, 3, 4096)
    assert cpu_split(volume, points, threads=4) == 4
    assert cpu_split(volume, points, threads=5) == 1  # 819 points a thread: not worth it
    assert cpu_split(volume, points, threads=1) == 1
    assert cpu_split(volume.expand(2, -1, -1, -1, -1), points.expand(2, -1, -1, -1, -1), threads=4) == 1  # a batch runs in parallel
    assert cpu_split(volume, points) == cpu_split(volume, points, threads=torch.get_num_threads())
    one = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    assert cpu_split(one, _points(rng, 2, 4096), threads=4) == 1  # 1024 points a thread: not in 2D
    assert cpu_split(one, _points(rng, 2, 32768), threads=4) == 4
    assert cpu_split(one, _points(rng, 2, 32768), threads=5) == 1
    if torch.cuda.is_available():
        assert cpu_split(volume.cuda(), points.cuda(), threads=4) == 1


def test_grid_sample_rejects_a_bad_split(rng):
    data = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="parts"):
        grid_sample(data, _points(rng, 2, 10).expand(2, -1, -1, -1), parts=2)
    with pytest.raises(ValueError, match="parts"):
        grid_sample(data[:1], _points(rng, 2, 10), parts=0)


def test_is_diagonal():
    assert is_diagonal(np.diag([2.0, -3.0, 0.5]))
    off = np.diag([2.0, 3.0]) + np.array([[0, 1e-12], [0, 0]])
    assert not is_diagonal(off)  # atol 0: exact zeros only
    assert is_diagonal(off, atol=1e-9) and not is_diagonal(off, atol=1e-13)


def test_orthonormal_and_axis_aligned(rng):
    assert Grid((4, 5)).orthonormal and Grid((4, 5)).axis_aligned
    flip = np.array([[0, -1, 0], [1, 0, 0], [0, 0, -1.0]])  # permutes and flips axes
    assert Grid((4, 5, 6), direction=flip.ravel()).axis_aligned
    oblique = oblique_grid(3, rng)
    assert oblique.orthonormal and not oblique.axis_aligned
    sheared = Grid((4, 5), direction=(1.0, 0.2, 0.0, 1.0))
    assert not sheared.orthonormal and not sheared.axis_aligned


def test_aligned_with(rng):
    """Any spacing, origin and axis flips keep the index map diagonal; another direction does not."""
    oblique = oblique_grid(3, rng)
    coarse = Grid((5, 4, 3), np.asarray(oblique.spacing) * 3, np.asarray(oblique.origin) + 1.5, oblique.direction)
    flipped = Grid(oblique.size, oblique.spacing, oblique.origin,
                   (oblique.direction_matrix @ np.diag([1.0, -1.0, 1.0])).ravel())
    assert coarse.aligned_with(oblique) and oblique.aligned_with(coarse) and flipped.aligned_with(oblique)
    m = coarse.index_map(oblique)
    assert np.allclose(m @ np.array([1.0, 2.0, 0.0, 1.0]),
                       oblique.physical_to_index_matrix() @ coarse.index_to_physical_matrix() @ [1, 2, 0, 1.0])
    assert not oblique_grid(3, rng).aligned_with(oblique)
    assert not Grid((4, 5)).aligned_with(Grid((4, 5, 6)))
