"""Graph diffusion: the matrix-free Laplacian and Lanczos exponential against dense matrices, in
2D and 3D; edges follow the image; demons with it."""

import numpy as np
import pytest
import torch
from scipy.linalg import expm

from airlab import Grid
from airlab.errors import InputError
from airlab.graph import edge_weights, graph_diffusion, laplacian


def _dense(weights, grid):
    """L as a dense matrix, column by column from unit fields."""
    n = grid.numel
    eye = torch.eye(n, dtype=torch.float64).reshape(n, 1, *grid.shape)
    return laplacian(eye, [w.expand(n, *w.shape[1:]) for w in weights], grid).reshape(n, n).T.numpy()


@pytest.mark.parametrize("shape,spacing", [((9, 7), (1.0, 2.0)), ((5, 4, 6), (1.5, 1.0, 2.0))])
def test_matches_dense_exponential(shape, spacing):
    grid = Grid(shape, spacing)
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 1, *grid.shape, generator=gen, dtype=torch.float64)
    weights = edge_weights(image, grid, scale=3.0)
    lap = _dense(weights, grid)
    # a graph Laplacian: symmetric, rows sum to zero, an edge's weight where expected
    np.testing.assert_allclose(lap, lap.T, atol=1e-12)
    np.testing.assert_allclose(lap.sum(1), 0, atol=1e-12)
    i0, i1 = 0, 1  # neighbours along ITK axis 0 (the last tensor axis)
    w = float(torch.exp(-3.0 * (image.flatten()[1] - image.flatten()[0]).abs()))
    assert lap[i0, i1] == pytest.approx(-w / spacing[0] ** 2)
    field = torch.randn(2, len(shape), *grid.shape, generator=gen, dtype=torch.float64)
    got = graph_diffusion(field, weights, grid, time=2.0).reshape(2 * len(shape), -1).numpy()
    expected = field.reshape(2 * len(shape), -1).numpy() @ expm(-2.0 * lap).T
    np.testing.assert_allclose(got, expected, atol=1e-8)


def test_uniform_weights_smooth_like_a_gaussian():
    from airlab.filters import gaussian_smooth

    grid = Grid((64, 64), (1.0, 1.0))
    field = torch.zeros(1, 1, 64, 64, dtype=torch.float64)
    field[0, 0, 32, 32] = 1.0
    weights = edge_weights(torch.zeros(1, 1, 64, 64, dtype=torch.float64), grid)
    sigma = 2.0
    got = graph_diffusion(field, weights, grid, time=sigma**2 / 2)
    gauss = gaussian_smooth(field, sigma)
    assert float(got.sum()) == pytest.approx(1.0)  # no flux lost
    # the lattice heat kernel spreads exactly like a Gaussian of variance 2t per axis
    x = torch.arange(64, dtype=torch.float64) - 32
    assert float((got[0, 0].sum(0) * x**2).sum()) == pytest.approx(sigma**2, rel=1e-6)
    assert float((got - gauss).abs().max()) < 0.1 * float(gauss.max())


def test_diffusion_stops_at_image_edges():
    grid = Grid((40, 30), (1.0, 1.0))
    image = torch.zeros(1, 1, 30, 40, dtype=torch.float64)
    image[..., 20:] = 1.0  # an edge between x = 19 and x = 20
    field = torch.where(torch.arange(40) < 20, 1.0, -1.0).to(torch.float64).expand(1, 1, 30, 40).clone()
    sliding = graph_diffusion(field, edge_weights(image, grid, scale=10.0), grid, time=8.0)
    blurred = graph_diffusion(field, edge_weights(image * 0, grid), grid, time=8.0)
    assert float(sliding[..., 19].min()) > 0.95 and float(sliding[..., 20].max()) < -0.95
    assert float(blurred[..., 19].max()) < 0.5


def test_bad_arguments():
    grid = Grid((5, 5))
    with pytest.raises(InputError, match="time"):
        graph_diffusion(torch.zeros(1, 2, 5, 5), edge_weights(torch.zeros(1, 1, 5, 5), grid), grid, time=-1)
    with pytest.raises(InputError, match="scale"):
        edge_weights(torch.zeros(1, 1, 5, 5), grid, scale=-1)


def test_demons_with_graph_diffusion_in_3d():
    """The shipped template at 8 mm (24 x 28 x 23), deformed by up to 6 mm."""
    import airlab as al
    from airlab.datasets import mni152
    from airlab.demons import demons
    from airlab.evaluate import jacobian_stats
    from airlab.filters import smooth_mm
    from airlab.registration import Level
    from airlab.synthetic import ground_truth, random_deformation

    t1, _ = mni152()
    grid = t1.grid.with_spacing(8.0)
    with torch.no_grad():
        fixed = al.resample(al.Image(smooth_mm(t1.data.float(), t1.grid, 3.0), t1.grid), grid)
    deformation = random_deformation(grid, 1, max_displacement=6.0, max_rotation_deg=0, max_translation=0)
    with torch.no_grad():
        moving = al.resample(fixed, grid, deformation)
    truth, _ = ground_truth(deformation, grid)
    brain = fixed.data[0, 0] > 0.1 * fixed.data.max()
    before = float(truth.field.norm(dim=1)[0][brain].mean())
    errors = {}
    for kind in ("gaussian", "graph"):
        result = demons(fixed, moving, levels=[Level(2, 8.0, 40), Level(1, 0.0, 40)], regulariser=kind,
                        edge_scale=3.0)
        with torch.no_grad():
            found = result.transform.displacement(grid)
        errors[kind] = float((found - truth.field).norm(dim=1)[0][brain].mean())
        assert jacobian_stats(found[0].numpy(), grid)["folding_count"] == 0
    assert errors["graph"] < 0.6 * before, (errors, before)
    assert errors["graph"] < 1.2 * errors["gaussian"], errors
    with pytest.raises(InputError, match="regulariser"):
        demons(fixed, moving, regulariser="laplace")
