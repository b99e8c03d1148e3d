"""airlab.compiled's loops (3D, CPU) against the grid_sample paths they replace, and against scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from airlab import compiled, splines
from airlab.grid import sample_index
from airlab.splines import cell_range, node_gradient, prefilter, sample_cubic


def _index(rng, shape, n, points, spread=3.0):
    size = np.array(shape[::-1], dtype=float)
    return torch.as_tensor(rng.uniform(-spread, size - 1 + spread, size=(n, points, len(shape))))


@pytest.mark.parametrize("shape", [(7, 6, 8), (1, 5, 7), (2, 9, 1), (3, 1, 4)])
@pytest.mark.parametrize("boundary", ["mirror", "border"])
def test_values_are_the_fetches_values(shape, boundary, rng):
    """Every boundary and grid (axes of one and two voxels included), several images and
    channels, points far beyond the edges: the same spline to double precision."""
    coefficients = torch.as_tensor(rng.normal(size=(2, 3, *shape)))
    index = _index(rng, shape, 2, 400, spread=2.5 * max(shape))
    ours, kept, slope = compiled.sample_cubic(coefficients, index, boundary)
    assert kept is None and slope is None
    assert torch.allclose(ours, splines._evaluate_fetches(coefficients, index, boundary), atol=1e-10)


def test_mirror_is_scipys_at_any_distance(rng):
    data = rng.normal(size=(6, 7, 8))
    index = rng.uniform(-2.5, 3.5, size=(300, 3)) * (np.array(data.shape[::-1]) - 1)
    coefficients = prefilter(torch.as_tensor(data)[None, None])
    ours = compiled.sample_cubic(coefficients, torch.as_tensor(index)[None])[0][0, 0]
    theirs = ndimage.map_coordinates(data, index[:, ::-1].T, order=3, mode="mirror")
    assert np.allclose(ours.numpy(), theirs, atol=1e-10)


def test_clamp_and_slope_are_sample_cubics(rng, monkeypatch):
    """Values, the clamp to each cell's range and the gradient with respect to the points, as
    the grid_sample path gives them (forced by turning the loop off)."""
    shape = (9, 8, 7)
    data = torch.as_tensor(rng.normal(size=(1, 1, *shape)))
    data[..., 2:5, 2:5] += 4.0  # a hard edge, where the cubic rings and the clamp acts
    coefficients = prefilter(data)
    spline = (coefficients, node_gradient(coefficients))
    index = _index(rng, shape, 1, 3000, spread=1.5).requires_grad_(True)
    weights = torch.as_tensor(rng.normal(size=(1, 1, 3000)))

    def run():
        out = sample_cubic(*spline, index, bounds=cell_range(data))
        (grad,) = torch.autograd.grad((out * weights).sum(), index)
        return out.detach(), grad

    ours = run()
    monkeypatch.setattr(compiled, "can_sample_cubic", lambda *args: False)
    theirs = run()
    assert torch.allclose(ours[0], theirs[0], atol=1e-10)
    # a value within rounding of its cell's bound may be kept on one path and clamped on the
    # other: its gradient is then the slope on one and zero on the other
    agree = torch.isclose(ours[1], theirs[1], atol=1e-10).all(-1)
    assert agree.float().mean() > 0.999
    flipped = ~agree
    assert ((ours[1][flipped] == 0).all(-1) | (theirs[1][flipped] == 0).all(-1)).all()
    assert (ours[1] != 0).any(-1).float().mean() > 0.5


def test_slope_is_the_linear_sample_of_the_node_gradient(rng):
    shape = (6, 9, 7)
    coefficients = torch.as_tensor(rng.normal(size=(1, 1, *shape)))
    gradient = node_gradient(coefficients)
    index = _index(rng, shape, 1, 500, spread=2.0)
    slope = compiled.sample_cubic(coefficients, index, "mirror", gradient=gradient)[2]
    assert torch.allclose(slope.view(1, 3, 500), sample_index(gradient, index, "border"), atol=1e-12)


def test_threads_split_the_points_without_changing_a_number(rng):
    shape = (20, 24, 22)
    coefficients = torch.as_tensor(rng.normal(size=(1, 1, *shape)), dtype=torch.float32)
    index = _index(rng, shape, 1, 40000).to(torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = compiled.sample_cubic(coefficients, index)[0]
        torch.set_num_threads(4)
        assert compiled._threads(40000) == 4
        four = compiled.sample_cubic(coefficients, index)[0]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, four)


def test_float32_is_closer_to_the_spline_than_the_fetches(rng):
    """The sum runs in double precision: float32 inputs lose only their own rounding."""
    coefficients = torch.as_tensor(rng.normal(size=(1, 1, 12, 13, 11)))
    index = _index(rng, (12, 13, 11), 1, 2000).to(torch.float32).to(torch.float64)
    exact = compiled.sample_cubic(coefficients, index)[0]
    ours = compiled.sample_cubic(coefficients.float(), index.float())[0].double()
    fetches = splines._evaluate_fetches(coefficients.float(), index.float(), "mirror").double()
    assert (ours - exact).abs().max() < (fetches - exact).abs().max()


def test_a_diverged_point_is_nan_and_leaves_the_others_alone(rng):
    shape = (7, 8, 9)
    data = torch.as_tensor(rng.normal(size=(1, 1, *shape)))
    coefficients = prefilter(data)
    index = _index(rng, shape, 1, 50)
    broken = index.clone()
    broken[0, 3] = float("nan")
    broken[0, 4, 1] = float("inf")
    broken[0, 5, 2] = 1e30
    out, kept, slope = compiled.sample_cubic(coefficients, broken, bounds=cell_range(data), gradient=node_gradient(coefficients))
    good = torch.ones(50, dtype=torch.bool)
    good[3:6] = False
    assert torch.isnan(out[0, 0, ~good]).all() and not kept[0, 0, ~good].any() and (slope[0, 0, :, ~good] == 0).all()
    clean = compiled.sample_cubic(coefficients, index, bounds=cell_range(data))[0]
    assert torch.equal(out[0, 0, good], clean[0, 0, good])


def test_an_expanded_batch_reads_the_one_image(rng):
    coefficients = torch.as_tensor(rng.normal(size=(1, 1, 5, 6, 7)))
    index = _index(rng, (5, 6, 7), 3, 100)
    ours = compiled.sample_cubic(coefficients.expand(3, 1, 5, 6, 7), index)[0]
    for b in range(3):
        assert torch.equal(ours[b], compiled.sample_cubic(coefficients, index[b : b + 1])[0][0])


def test_the_loops_apply_in_3d_where_no_gradient_is_wanted():
    coefficients = torch.zeros(1, 1, 4, 5, 6)
    index = torch.zeros(1, 3, 3)
    assert compiled.can_sample_cubic(coefficients, index)
    assert not compiled.can_sample_cubic(coefficients, index.double())
    assert not compiled.can_sample_cubic(coefficients[..., 0], index[..., :2])  # 2D: grid_sample is vectorised
    assert compiled.can_square(torch.zeros(1, 3, 4, 5, 6)) and not compiled.can_square(torch.zeros(1, 2, 5, 6))
    assert not compiled.can_sample_cubic(coefficients.requires_grad_(True), index)
    with torch.no_grad():
        assert compiled.can_sample_cubic(coefficients, index)


def test_expanded_points_are_read_for_every_image(rng):
    coefficients = torch.as_tensor(rng.normal(size=(3, 1, 5, 6, 7)))
    index = _index(rng, (5, 6, 7), 1, 50)
    ours = compiled.sample_cubic(coefficients, index.expand(3, -1, -1))[0]
    assert torch.allclose(ours, splines._evaluate_fetches(coefficients, index.expand(3, -1, -1), "mirror"), atol=1e-10)


@pytest.mark.parametrize("shape", [(7, 6, 8), (1, 5, 7), (3, 1, 4)])
def test_a_squaring_is_grid_samples(shape, rng):
    """Displacements of up to a third of the grid, so that many points leave it and read the
    border, in grid_sample's normalised units; two fields of a batch kept apart."""
    from airlab.grid import Grid, grid_sample

    d = len(shape)
    u = torch.as_tensor(rng.uniform(-0.6, 0.6, size=(2, d, *shape)))
    grid = Grid(shape[::-1])
    identity = grid.index_to_normalized(grid.indices(torch.float64))
    expected = u + grid_sample(u, identity + torch.movedim(u, 1, -1), "border")
    assert torch.allclose(compiled.square(u), expected, atol=1e-12)


def test_a_squaring_spreads_nan_only_where_it_is(rng):
    u = torch.as_tensor(rng.uniform(-0.1, 0.1, size=(1, 3, 6, 7, 8)))
    broken = u.clone()
    broken[0, 1, 2, 3, 4] = float("nan")
    out, clean = compiled.square(broken), compiled.square(u)
    assert torch.isnan(out[0, :, 2, 3, 4]).all()
    # elsewhere a point reads the NaN voxel only if one of its corners is that voxel
    far = torch.ones(6, 7, 8, dtype=torch.bool)
    far[1:4, 2:5, 3:6] = False
    assert torch.equal(out[0][:, far], clean[0][:, far])


def test_exponential_is_the_same_with_and_without_the_loop(rng, monkeypatch):
    from airlab.grid import Grid
    from airlab.transforms.velocity import exponential

    grid = Grid((12, 10, 9), (1.5, 2.0, 1.0), direction=np.eye(3)[[1, 0, 2]].ravel())
    v = torch.as_tensor(rng.normal(size=(1, 3, 9, 10, 12)) * 2.0)
    ours = exponential(v, grid, steps=5)
    monkeypatch.setattr(compiled, "can_square", lambda u: False)
    assert torch.allclose(ours, exponential(v, grid, steps=5), atol=1e-10)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork on this platform")
def test_a_forked_child_does_not_inherit_the_thread_pool(rng):
    """A process forked after the loops ran on threads (a worker pool started with fork) must
    start a pool of its own: its parent's threads do not exist in it, and work given to them
    would never run."""
    import os

    shape = (20, 24, 22)
    coefficients = torch.as_tensor(rng.normal(size=(1, 1, *shape)), dtype=torch.float32)
    index = _index(rng, shape, 1, 40000).to(torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        compiled.sample_cubic(coefficients, index)
    finally:
        torch.set_num_threads(threads)
    assert compiled._pool is not None
    pid = os.fork()
    if pid == 0:  # the child checks and leaves at once (no pytest teardown in it)
        os._exit(0 if compiled._pool is None and compiled._pool_size == 0 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _mi_and_gradients(fixed, moving, weight, bins):
    fixed, moving = fixed.clone().requires_grad_(True), moving.clone().requires_grad_(True)
    from airlab.losses import mutual_information

    loss = mutual_information(fixed, moving, weight, bins=bins)
    grads = torch.autograd.grad(loss.sum(), (fixed, moving))
    return loss.detach(), grads


def test_the_parzen_histogram_loop_is_the_scatters(rng, monkeypatch):
    """Mutual information and its gradients (to both images) over two images of two channels
    with a mask, by the loop and by the scatter_add path."""
    fixed = torch.as_tensor(rng.uniform(size=(2, 2, 40, 42, 41)), dtype=torch.float32)
    moving = (0.6 * fixed + 0.4 * torch.as_tensor(rng.uniform(size=fixed.shape), dtype=torch.float32))
    weight = torch.as_tensor(rng.uniform(size=(2, 1, 40, 42, 41)) > 0.3, dtype=torch.float32)
    assert compiled.can_histogram(torch.zeros(4, fixed[0, 0].numel()), torch.zeros(fixed[0, 0].numel()))
    ours = _mi_and_gradients(fixed, moving, weight, 48)
    monkeypatch.setattr(compiled, "can_histogram", lambda *args: False)
    theirs = _mi_and_gradients(fixed, moving, weight, 48)
    assert torch.allclose(ours[0], theirs[0], rtol=1e-6)
    for a, b in zip(ours[1], theirs[1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))


def test_the_parzen_histogram_loop_passes_gradcheck(rng, monkeypatch):
    monkeypatch.setattr(compiled, "_HISTOGRAM_VOXELS", 0)  # the loop at a size gradcheck can afford
    from airlab.losses import mutual_information

    fixed = torch.as_tensor(rng.uniform(size=(1, 1, 4, 5, 6))).requires_grad_(True)
    moving = torch.as_tensor(rng.uniform(size=(1, 1, 4, 5, 6))).requires_grad_(True)
    assert compiled.can_histogram(torch.zeros(4, 120, dtype=torch.float64), torch.zeros(120, dtype=torch.float64))
    weight = torch.as_tensor(rng.uniform(0.2, 1.0, size=(1, 1, 4, 5, 6)))
    # fixed ranges: the default ones (the images' min and max) carry no gradient
    mi = lambda f, m: mutual_information(f, m, weight, bins=8, fixed_range=(-0.5, 1.5),  # noqa: E731
                                         moving_range=(-0.5, 1.5))
    assert torch.autograd.gradcheck(mi, (fixed, moving), eps=1e-6, atol=1e-6)


def test_disabled_sends_every_caller_to_pytorch():
    coefficients, index = torch.zeros(1, 1, 4, 5, 6), torch.zeros(1, 3, 3)
    with compiled.disabled():
        assert not compiled.can_sample_cubic(coefficients, index)
        assert not compiled.can_square(torch.zeros(1, 3, 4, 5, 6))
    assert compiled.can_sample_cubic(coefficients, index)
