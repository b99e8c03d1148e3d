"""Spatial transforms: each maps fixed physical points (mm) to moving physical points."""

from .base import Transform
from .bspline import BSplineTransform, control_grid
from .compose import Composite
from .dense import DisplacementField, invert_displacement
from .itkio import (
    TransformIOError,
    from_sitk,
    read_displacement_field,
    read_transform,
    to_sitk,
    write_displacement_field,
    write_transform,
)
from .linear import Affine, LinearTransform, Rigid, Similarity, Translation, rotation_matrix
from .velocity import BSplineVelocityField, DenseVelocityField, StationaryVelocityField, exponential
from .wendland import KernelVelocityField, WendlandTransform, wendland
from .registry import TRANSFORMS, TransformSpec

__all__ = [
    "Transform",
    "LinearTransform",
    "Translation",
    "Rigid",
    "Similarity",
    "Affine",
    "rotation_matrix",
    "BSplineTransform",
    "control_grid",
    "DisplacementField",
    "invert_displacement",
    "StationaryVelocityField",
    "BSplineVelocityField",
    "DenseVelocityField",
    "exponential",
    "Composite",
    "to_sitk",
    "from_sitk",
    "read_transform",
    "write_transform",
    "read_displacement_field",
    "write_displacement_field",
    "TransformIOError",
    "WendlandTransform",
    "KernelVelocityField",
    "wendland",
    "TRANSFORMS",
    "TransformSpec",
]
