"""groupwise.py: the template's numerics (streamed weighted means, the shape update, sharpness)
and groupwise registration to the implicit mean, on conftest's ``group``."""

import weakref

import numpy as np
import torch

import airlab as al
from airlab.groupwise import RunningMean, foreground, shape_update, sharpen, sharpness
from airlab.transforms import Translation

from conftest import GROUP_SIZE, group_epe


def test_running_mean_weighted_and_holds_nothing_it_is_given():
    rng = np.random.default_rng(0)
    values = [torch.as_tensor(rng.normal(size=(1, 1, 5, 6))) for _ in range(7)]
    weights = [torch.as_tensor(rng.uniform(0, 1, size=(1, 1, 5, 6))) for _ in range(7)]
    mean = RunningMean()
    alive = []
    for v, w in zip(values, weights):
        given = v.clone()
        alive.append(weakref.ref(given))
        mean.add(given, w)
        del given
    assert all(ref() is None for ref in alive)  # streamed: nothing kept but the sums
    expected = sum(v * w for v, w in zip(values, weights)) / sum(weights)
    assert torch.allclose(mean.mean, expected, atol=1e-12)
    plain = RunningMean()
    for v in values:
        plain.add(v)
    assert torch.allclose(plain.mean, torch.stack(values).mean(0), atol=1e-12) and plain.count == 7
    zero = RunningMean()
    zero.add(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    assert torch.equal(zero.mean, torch.zeros(1, 1, 2, 2))


def test_shape_update_removes_the_mean_displacement(group):
    """A template seen through a shift t (the group's mean displacement is t) comes back."""
    base, grid = group["base"], group["grid"]
    shift = Translation(2, translation=[4.5, -3.0], dtype=torch.float64)
    with torch.no_grad():
        shifted = al.resample(base.to(torch.float64), grid, shift, interpolation="bspline")
        u = shift.displacement(grid)
    moved, residual = shape_update(shifted, u)
    inner = torch.zeros(grid.shape, dtype=torch.bool)
    inner[5:-5, 5:-5] = True
    error = (moved.data[0, 0] - base.data[0, 0].double()).abs()[inner]
    assert residual < 1e-3
    assert float(error.mean()) < 0.01 * float(base.data.max()), float(error.mean())


def test_sharpness_sees_blur_and_sharpen_restores_it(group):
    base = group["base"]
    from airlab.filters import smooth_mm

    blurred = al.Image(smooth_mm(base.data, base.grid, 3.0), base.grid)
    mask = foreground(base.data)
    assert sharpness(blurred, mask) < 0.8 * sharpness(base, mask)
    assert sharpness(sharpen(blurred, 1.0), mask) > 1.1 * sharpness(blurred, mask)
    assert sharpen(base, 0.0) is base


def test_groupwise_registration_finds_the_implicit_mean(group):
    """All images to their implicit mean through the batch dimension: centred (EPE well under
    the plain average's, which is centred only to first order) and as sharp as the true mean."""
    from airlab.groupwise import register_group

    images = [al.read_image(p) for p in group["paths"]]
    result = register_group(images)
    grid, mask = group["grid"], group["mask"]
    with torch.no_grad():
        u = result.transform.displacement(grid).double()
    points = grid.points(torch.float64) + torch.movedim(u, 1, -1)
    with torch.no_grad():
        mapped = sum(d(points[i:i + 1]) for i, d in enumerate(group["deformations"])) / GROUP_SIZE
        plain = sum(d(grid.points(torch.float64)) for d in group["deformations"]) / GROUP_SIZE
    assert group_epe(mapped, group) < 0.2 and group_epe(mapped, group) < 0.6 * group_epe(plain, group)
    assert float(u.mean(0).norm(dim=0).mean()) < 0.05  # the velocities average to zero: the mean map is ~identity
    average = al.Image(torch.cat([i.data for i in images]).mean(0, keepdim=True), grid)
    rmse = lambda image: float((image.data[0, 0].double() - group["truth"].data[0, 0])[mask].pow(2).mean().sqrt())  # noqa: E731
    assert rmse(result.template) < 0.3 * rmse(average)
    assert sharpness(result.template, mask) > 0.95 * sharpness(group["truth"], mask)
    assert result.history[-1][-1] < 0.1 * result.history[0][0]
