"""transforms/registry.py: every family by name builds its transform, a spec pickles and compares
equal, an unknown name is refused with the choices."""

import pickle

import pytest
import torch

from airlab import Grid
from airlab.transforms import (TRANSFORMS, Affine, BSplineTransform, BSplineVelocityField, DenseVelocityField,
                               KernelVelocityField, Rigid, Similarity, TransformSpec, Translation, WendlandTransform)

GRID = Grid((20, 18), (1.5, 1.0), (2.0, -4.0))
EXPECTED = {
    "translation": ({}, Translation),
    "rigid": ({}, Rigid),
    "similarity": ({}, Similarity),
    "affine": ({}, Affine),
    "bspline": ({"control_spacing": 6.0}, BSplineTransform),
    "velocity": ({"control_spacing": 6.0}, BSplineVelocityField),
    "dense-velocity": ({}, DenseVelocityField),
    "wendland": ({"control_spacing": 6.0}, WendlandTransform),
}


def test_every_name_is_covered():
    assert set(TRANSFORMS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_spec_builds_its_family_as_the_identity(name):
    options, kind = EXPECTED[name]
    spec = TransformSpec(name, options)
    t = spec(GRID, 2)
    assert type(t) is kind and t.batch_size == 2 and t.ndim == 2
    pts = GRID.points(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(t(pts.expand(2, *pts.shape[1:])), pts.expand(2, *pts.shape[1:]))
    assert pickle.loads(pickle.dumps(spec)) == spec


def test_options_reach_the_transform():
    t = TransformSpec("bspline", {"control_spacing": 3.0, "refine_levels": False})(GRID, 1)
    assert tuple(t.control.spacing) == (3.0, 3.0) and t.refine_levels is False
    assert isinstance(TransformSpec("wendland", {"control_spacing": 6.0, "diffeomorphic": True})(GRID, 1),
                      KernelVelocityField)


def test_an_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match="unknown transform 'spline'; choose from translation, rigid"):
        TransformSpec("spline")
