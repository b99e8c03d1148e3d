"""Cubic B-splines and per-axis interpolation weights, against scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.interpolate import BSpline

from airlab.splines import (bspline_interpolate, cell_range, cubic_axis_weights, cubic_derivatives, cubic_weights,
                            evaluate, linear_axis_weights, node_gradient, prefilter, sample_cubic)


def test_cubic_weights_are_scipys_basis():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)[:-1]
    basis = BSpline.basis_element([-2, -1, 0, 1, 2], extrapolate=False)
    # knot floor(u) - 1 + k sits at offset k - 1 from floor(u): its weight is B3(t - (k - 1))
    expected = np.stack([basis(t.numpy() - (k - 1)) for k in range(4)], axis=-1)
    assert np.allclose(cubic_weights(t).numpy(), expected, atol=1e-14)
    assert torch.allclose(cubic_weights(t).sum(-1), torch.ones_like(t))


def test_cubic_derivatives_are_the_weights_derivatives():
    t = torch.rand(50, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    for k in range(4):
        (g,) = torch.autograd.grad(cubic_weights(t)[:, k].sum(), t)
        assert torch.allclose(g, cubic_derivatives(t.detach())[:, k], atol=1e-14)


@pytest.mark.parametrize("shape", [(9, 11), (6, 7, 8)])
def test_interpolation_equals_scipy_map_coordinates(shape, rng):
    data = rng.normal(size=shape)
    d = len(shape)
    index = rng.uniform(-0.4, np.array(shape[::-1]) - 0.6, size=(40, d))  # ITK order: x first
    ours = bspline_interpolate(torch.as_tensor(data)[None, None], torch.as_tensor(index)[None])[0, 0]
    # scipy's coordinates run along the array axes: the reverse of ITK's order
    theirs = ndimage.map_coordinates(data, index[:, ::-1].T, order=3, mode="mirror")
    assert np.allclose(ours.numpy(), theirs, atol=1e-10)


@pytest.mark.parametrize("shape", [(9, 11), (6, 7, 8), (2, 9)])
def test_mirror_boundary_equals_scipy_at_any_distance(shape, rng):
    # the mirror is folded into the points (a symmetric spline) and fetched from padded knots;
    # a grid of two voxels on an axis keeps grid_sample's reflection
    data = rng.normal(size=shape)
    d = len(shape)
    index = rng.uniform(-2.5, 3.5, size=(300, d)) * (np.array(shape[::-1]) - 1)
    ours = bspline_interpolate(torch.as_tensor(data)[None, None], torch.as_tensor(index)[None])[0, 0]
    theirs = ndimage.map_coordinates(data, index[:, ::-1].T, order=3, mode="mirror")
    assert np.allclose(ours.numpy(), theirs, atol=1e-9)


def test_evaluate_gradcheck_beyond_the_edges(rng):
    coefficients = torch.as_tensor(rng.normal(size=(1, 1, 5, 6)), dtype=torch.float64).requires_grad_(True)
    index = torch.as_tensor(rng.uniform(-3.0, 8.0, size=(1, 9, 2)), dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(evaluate, (coefficients, index))


def test_prefilter_interpolates_and_keeps_the_batch_apart(rng):
    data = torch.as_tensor(rng.normal(size=(3, 2, 7, 9)))
    coefficients = prefilter(data)
    single = torch.cat([prefilter(data[i:i + 1]) for i in range(3)])
    assert torch.allclose(coefficients, single, atol=1e-14)
    nodes = torch.stack(torch.meshgrid(torch.arange(9.0), torch.arange(7.0), indexing="xy"), -1).reshape(1, -1, 2)
    values = evaluate(coefficients, nodes.double().expand(3, -1, -1))
    assert torch.allclose(values, data.flatten(2), atol=1e-10)


def test_float32_follows_float64(rng):
    data = torch.as_tensor(rng.normal(size=(1, 1, 8, 9)))
    index = torch.as_tensor(rng.uniform(0, 7, size=(1, 30, 2)))
    high = bspline_interpolate(data, index)
    low = bspline_interpolate(data.float(), index.float())
    assert low.dtype == torch.float32 and torch.allclose(low.double(), high, atol=1e-5)


def test_evaluate_gradcheck(rng):
    coefficients = torch.as_tensor(rng.normal(size=(2, 1, 5, 6)), dtype=torch.float64).requires_grad_(True)
    index = torch.as_tensor(rng.uniform(0.1, 3.9, size=(2, 7, 2)), dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(evaluate, (coefficients, index))


@pytest.mark.parametrize("d", [2, 3])
def test_node_gradient_is_the_splines_derivative_at_the_voxels(d, rng):
    shape = (5, 6, 7)[:d]
    coefficients = torch.as_tensor(rng.normal(size=(1, 1, *shape)))
    grads = node_gradient(coefficients)  # [1, D, *S], component a along ITK axis a
    nodes = torch.stack(torch.meshgrid(*[torch.arange(float(n)) for n in shape[::-1]], indexing="ij"), -1)
    nodes = nodes.permute(*range(d - 1, -1, -1), d).reshape(1, -1, d).double()  # tensor order of the voxels
    h = 1e-5
    for a in range(d):
        step = torch.zeros(d, dtype=torch.float64)
        step[a] = h
        numeric = (evaluate(coefficients, nodes + step) - evaluate(coefficients, nodes - step)) / (2 * h)
        assert torch.allclose(grads[:, a].flatten(), numeric.flatten(), atol=1e-7)


def test_linear_axis_weights_are_numpys_interp(rng):
    n = 6
    samples = rng.normal(size=n)
    position = torch.as_tensor(rng.uniform(-2, n + 1, size=25))
    weights = linear_axis_weights(position, n, outside=False)
    assert np.allclose(weights.numpy() @ samples, np.interp(position.numpy(), np.arange(n), samples), atol=1e-12)
    masked = linear_axis_weights(position, n, outside=True)
    inside = ((position >= -0.5) & (position < n - 0.5)).numpy()
    assert np.allclose(masked.numpy()[inside], weights.numpy()[inside]) and not masked.numpy()[~inside].any()


def test_cubic_axis_weights_evaluate_the_spline_along_an_axis(rng):
    n = 8
    coefficients = torch.as_tensor(rng.normal(size=n))
    position = torch.as_tensor(rng.uniform(-1.5, n + 0.5, size=30))
    matrix = cubic_axis_weights(position, n, boundary="border")
    # "border": knots beyond the ends repeat the edge coefficient; scipy's basis j is centred on
    # its knot t_j + 2, so knot j - 3 of the padded coefficients has t_j = j - 5
    padded = np.concatenate([[coefficients[0]] * 3, coefficients.numpy(), [coefficients[-1]] * 3])
    spline = BSpline(np.arange(len(padded) + 4) - 5.0, padded, 3)
    assert np.allclose((matrix @ coefficients).numpy(), spline(position.numpy()), atol=1e-12)
    valid = position > 2
    assert not cubic_axis_weights(position, n, valid=valid)[~valid].any()


@pytest.mark.parametrize("shape", [(9, 11), (6, 7, 8)])
def test_cell_range_is_scipys_two_voxel_min_and_max_filter(shape, rng):
    data = rng.normal(size=(2, 1, *shape))
    low, high = cell_range(torch.as_tensor(data))
    # size 2 with origin -1: voxels i and i + 1 along each axis; scipy's "mirror" is x[n] = x[n - 2]
    for b in range(2):
        assert np.array_equal(low[b, 0].numpy(), ndimage.minimum_filter(data[b, 0], size=2, mode="mirror", origin=-1))
        assert np.array_equal(high[b, 0].numpy(), ndimage.maximum_filter(data[b, 0], size=2, mode="mirror", origin=-1))


@pytest.mark.parametrize("d", [2, 3])
def test_clamped_cubic_samples_stay_within_their_cell(d, rng):
    """Beside a hard edge (a bright block on black, as a masked template's border) an
    interpolating cubic overshoots the values around it; clamped, each sample lies within the
    range of the 2**D voxels of its cell, is the spline's own value wherever that already did,
    and has the spline's gradient there and none where it was clamped."""
    shape = (12, 10, 9)[:d]
    image = np.zeros(shape)
    image[tuple(slice(3, n - 3) for n in shape)] = 1.0
    image += 0.05 * rng.normal(size=shape)
    data = torch.as_tensor(image)[None, None]
    coefficients = prefilter(data)
    spline = (coefficients, node_gradient(coefficients))
    index = torch.as_tensor(rng.uniform(0, np.array(shape[::-1]) - 1, size=(1, 2000, d))).requires_grad_(True)
    free = sample_cubic(*spline, index)
    clamped = sample_cubic(*spline, index, bounds=cell_range(data))
    # the cell's 2**D voxels, read directly (ITK order: the array axes reversed)
    corner = np.floor(index.detach()[0].numpy()).astype(int)[:, ::-1]
    corners = [image[tuple(np.minimum(corner[:, a] + step[a], shape[a] - 1) for a in range(d))]
               for step in np.ndindex(*(2,) * d)]
    lo, hi = np.min(corners, axis=0), np.max(corners, axis=0)
    values, unclamped = clamped[0, 0].detach().numpy(), free[0, 0].detach().numpy()
    outside = (unclamped < lo) | (unclamped > hi)
    assert outside.mean() > 0.05  # the cubic does ring here
    assert np.all(values >= lo - 1e-12) and np.all(values <= hi + 1e-12)
    assert np.array_equal(values[~outside], unclamped[~outside])
    weights = torch.as_tensor(rng.normal(size=(1, 1, 2000)))
    (g_free,) = torch.autograd.grad((free * weights).sum(), index)
    (g_clamped,) = torch.autograd.grad((clamped * weights).sum(), index)
    assert torch.equal(g_clamped[0][torch.as_tensor(~outside)], g_free[0][torch.as_tensor(~outside)])
    assert torch.all(g_clamped[0][torch.as_tensor(outside)] == 0)


def test_clamp_beyond_the_edges_uses_the_border_cell_and_survives_nan(rng):
    """A point outside the grid is clamped to the range of the nearest border cell (its corner
    clamped into the grid, as "border" padding reads it), exactly; a NaN point (a diverged
    transform) raises nothing and changes no other point's sample."""
    shape = (7, 9, 8)
    data = torch.as_tensor(rng.normal(size=(2, 2, *shape)))
    low, high = cell_range(data)
    coefficients = prefilter(data)
    spline = (coefficients, node_gradient(coefficients))
    index = torch.as_tensor(rng.uniform(-3, np.array(shape[::-1]) + 2, size=(2, 500, 3)))
    out = sample_cubic(*spline, index, bounds=(low, high))
    corner = np.clip(np.floor(index.numpy()), 0, np.array(shape[::-1]) - 1).astype(int)[..., ::-1]
    for b in range(2):
        at = tuple(corner[b, :, a] for a in range(3))
        for c in range(2):
            lo, hi = low[b, c].numpy()[at], high[b, c].numpy()[at]
            values = out[b, c].numpy()
            assert np.all((values >= lo) & (values <= hi))
            assert np.any(values == lo) and np.any(values == hi)  # the bounds themselves, not a neighbour's
    broken = index.clone()
    broken[1, 7] = float("nan")
    out_nan = sample_cubic(*spline, broken, bounds=(low, high))
    keep = torch.ones(2, 500, dtype=torch.bool)
    keep[1, 7] = False
    assert torch.equal(out_nan.transpose(1, 2)[keep], out.transpose(1, 2)[keep])


@pytest.mark.parametrize("shape", [(9, 11), (6, 7, 8)])
def test_fused_fetches_are_the_fetches_one_by_one(shape, rng, monkeypatch):
    # the 2**D fetches in one grid_sample call (few points) against one call each (many points)
    from airlab import splines

    d = len(shape)
    data = torch.as_tensor(rng.normal(size=(2, 2, *shape)), dtype=torch.float32)
    index = torch.as_tensor(rng.uniform(-3.0, 12.0, size=(2, 70, d)), dtype=torch.float32)

    def run():
        c, i = data.clone().requires_grad_(True), index.clone().requires_grad_(True)
        out = splines._evaluate_fetches(c, i, "mirror")
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        return out.detach(), c.grad, i.grad

    fused = run()
    monkeypatch.setattr(splines, "_FUSED_FETCHES", 0)
    one_by_one = run()
    assert torch.equal(fused[0], one_by_one[0])  # the same products, added in the same order
    for a, b in zip(fused[1:], one_by_one[1:]):
        assert torch.allclose(a, b, atol=1e-5)
