"""Linear transforms: exact inverses, rotations and their vectors."""

import numpy as np
import pytest
import torch

from airlab.transforms import Affine, rotation_matrix
from airlab.transforms.linear import rotation_vector_from_matrix

from conftest import make_transform, oblique_grid


@pytest.mark.parametrize("kind", ["translation", "rigid", "similarity", "affine"])
@pytest.mark.parametrize("d", [2, 3])
def test_linear_inverse_is_exact(kind, d, rng):
    t = make_transform(kind, oblique_grid(d, rng), rng, batch=2)
    pts = torch.as_tensor(rng.normal(size=(2, 20, d)) * 30)
    assert torch.allclose(t.inverse()(t(pts)), pts, atol=1e-10)
    assert torch.allclose(t(t.inverse()(pts)), pts, atol=1e-10)


def test_singular_affine_inverse_raises():
    m = np.array([[1.0, 2.0, 0], [2.0, 4.0, 0], [0, 0, 1]])
    with pytest.raises(ValueError, match="singular"):
        Affine(3, matrix=m).inverse()


def test_rotation_vector_round_trip(rng):
    for _ in range(50):
        r = rng.normal(size=3)
        r *= rng.uniform(0, np.pi - 1e-3) / np.linalg.norm(r)
        m = rotation_matrix(torch.as_tensor(r)[None])[0].numpy()
        assert np.allclose(m @ m.T, np.eye(3), atol=1e-12) and np.isclose(np.linalg.det(m), 1)
        assert np.allclose(rotation_vector_from_matrix(m), r, atol=1e-9)


def test_rotation_gradient_is_finite_at_zero():
    r = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    rotation_matrix(r).sum().backward()
    assert torch.isfinite(r.grad).all()
    assert torch.autograd.gradcheck(lambda x: rotation_matrix(x), (r,))
