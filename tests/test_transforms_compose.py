"""transforms/compose.py: the order of a Composite, its inverse, batches and its errors."""

import pytest
import torch

from airlab.transforms import Affine, Composite, Rigid, Translation

from conftest import make_transform, oblique_grid


def test_the_first_transform_acts_first():
    a = Translation(2, translation=[[1.0, 2.0]], dtype=torch.float64)
    b = Affine(2, matrix=[[[2.0, 0.0], [0.0, 3.0]]], dtype=torch.float64)
    x = torch.tensor([[[1.0, 1.0], [0.0, -1.0]]], dtype=torch.float64)
    # b(a(x)) = diag(2, 3) (x + (1, 2)) by hand
    expected = torch.tensor([[[4.0, 9.0], [2.0, 3.0]]], dtype=torch.float64)
    torch.testing.assert_close(Composite(a, b)(x), expected)
    torch.testing.assert_close(Composite(b, a)(x), torch.tensor([[[3.0, 5.0], [1.0, -1.0]]], dtype=torch.float64))
    chain = Composite(a, b)
    assert len(chain) == 2 and chain[0] is a and chain[1] is b


@pytest.mark.parametrize("d", [2, 3])
def test_the_inverse_undoes_the_chain(d, rng):
    grid = oblique_grid(d, rng)
    chain = Composite(make_transform("rigid", grid, rng, 2), make_transform("affine", grid, rng, 2))
    x = torch.as_tensor(rng.normal(size=(2, 15, d)) * 20)
    with torch.no_grad():
        torch.testing.assert_close(chain.inverse()(chain(x)), x, rtol=0, atol=1e-9)


def test_a_single_transform_broadcasts_over_a_batch():
    chain = Composite(Rigid(3, batch_size=4), Translation(3, batch_size=1))
    assert chain.batch_size == 4 and chain(torch.zeros(4, 5, 3)).shape == (4, 5, 3)


def test_errors():
    with pytest.raises(ValueError, match="at least one transform"):
        Composite()
    with pytest.raises(ValueError, match="different dimensions"):
        Composite(Translation(2), Translation(3))
    with pytest.raises(ValueError, match=r"batch sizes \[2, 3\]"):
        Composite(Translation(2, batch_size=2), Translation(2, batch_size=3))
