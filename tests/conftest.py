"""Shared fixtures: oblique anisotropic grids, smooth images, transforms of every kind."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

import airlab as al
from airlab import Grid, Image
from airlab.datasets import example_path
from airlab.groupwise import RunningMean, foreground
from airlab.registration import Registration
from airlab.synthetic import ground_truth, random_deformation
from airlab.transforms import (
    Affine,
    BSplineTransform,
    Composite,
    DisplacementField,
    Rigid,
    Similarity,
    StationaryVelocityField,
    Translation,
    invert_displacement,
)

KINDS = ("translation", "rigid", "similarity", "affine", "bspline", "displacement", "velocity", "composite")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_rotation(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    q = q @ np.diag(np.sign(np.diag(r)))
    if np.linalg.det(q) < 0:  # proper rotation, like a scanner's direction cosines
        q[:, 0] *= -1
    return q


def oblique_grid(d: int, rng: np.random.Generator, size=None) -> Grid:
    """Anisotropic spacing, non-zero origin, random direction cosines."""
    size = size or ((17, 15, 13)[:d] if d == 3 else (23, 19))
    spacing = rng.uniform(0.7, 2.2, size=d)
    origin = rng.uniform(-30, 30, size=d)
    return Grid(size, spacing, origin, random_rotation(d, rng).ravel())


def overlapping_grid(moving: Grid, rng: np.random.Generator, size=None) -> Grid:
    """Another oblique grid centred inside ``moving`` and smaller than it."""
    d = moving.ndim
    size = size or ((14, 12, 11)[:d] if d == 3 else (18, 16))
    spacing = rng.uniform(0.8, 1.6, size=d)
    direction = random_rotation(d, rng)
    extent = (np.asarray(size) - 1) * spacing
    origin = moving.center() - direction @ (extent / 2)
    return Grid(size, spacing, origin, direction.ravel())


def smooth_image(grid: Grid, rng: np.random.Generator, channels: int = 1, sigma: float = 1.5) -> torch.Tensor:
    arr = rng.normal(size=(channels, *grid.shape))
    arr = np.stack([ndimage.gaussian_filter(a, sigma) for a in arr])
    arr = (arr - arr.min()) / (arr.max() - arr.min()) * 100.0
    return torch.as_tensor(arr)[None]


def smooth_field(grid: Grid, rng: np.random.Generator, batch: int, magnitude: float, sigma: float = 3.0):
    """Random smooth vector field ``[batch, D, *shape]`` whose largest vector is ``magnitude`` mm."""
    d = grid.ndim
    arr = rng.normal(size=(batch, d, *grid.shape))
    arr = ndimage.gaussian_filter(arr, sigma=(0, 0) + (sigma,) * d, mode="nearest")
    arr *= magnitude / np.linalg.norm(arr, axis=1).max()
    return torch.as_tensor(arr)


def make_transform(kind: str, domain: Grid, rng: np.random.Generator, batch: int = 1, dtype=torch.float64):
    """A transform of ``kind`` with random, moderate parameters, defined over ``domain``."""
    d = domain.ndim
    nrot = 1 if d == 2 else 3
    center = domain.center() + rng.normal(size=d)

    def vec(k, scale):
        return rng.normal(size=(batch, k)) * scale

    if kind == "translation":
        return Translation(d, batch, translation=vec(d, 2.0), dtype=dtype)
    if kind == "rigid":
        return Rigid(d, batch, rotation=vec(nrot, 0.15), translation=vec(d, 2.0), center=center, dtype=dtype)
    if kind == "similarity":
        scale = np.exp(rng.normal(size=(batch, 1)) * 0.05)
        return Similarity(d, batch, vec(nrot, 0.15), vec(d, 2.0), scale, center=center, dtype=dtype)
    if kind == "affine":
        m = np.eye(d) + rng.normal(size=(batch, d, d)) * 0.06
        return Affine(d, batch, matrix=m, translation=vec(d, 2.0), center=center, dtype=dtype)
    if kind == "bspline":
        t = BSplineTransform(domain, control_spacing=np.asarray(domain.spacing) * 4, batch_size=batch, dtype=dtype)
        with torch.no_grad():
            t.coefficients.copy_(torch.as_tensor(rng.normal(size=t.coefficients.shape) * 1.5))
        return t
    if kind == "displacement":
        return DisplacementField(domain, batch, smooth_field(domain, rng, batch, 2.5), dtype=dtype)
    if kind == "velocity":
        return StationaryVelocityField(domain, batch, smooth_field(domain, rng, batch, 2.5), dtype=dtype)
    if kind == "composite":
        return Composite(
            make_transform("bspline", domain, rng, batch, dtype), make_transform("affine", domain, rng, batch, dtype)
        )
    raise ValueError(kind)


def to_sitk_image(data: torch.Tensor, grid: Grid) -> sitk.Image:
    return Image(data, grid).to_sitk()


@pytest.fixture
def rng(request):
    # a stable seed per test so failures reproduce
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


# The engine's small 2D case, shared by the engine, demons, pyramid, input and preset tests
@pytest.fixture(scope="module")
def slice2mm():
    """The 1 mm axial MNI slice at 2 mm: 99 x 117 pixels, quick to register."""
    full = al.read_image(example_path("mni152_t1_1mm_axial")).to(torch.float32)
    grid = full.grid.with_spacing(2.0)
    from airlab.filters import smooth_mm

    data = al.sample(smooth_mm(full.data, full.grid, 1.0), full.grid, grid.points(torch.float32), "linear", None)
    return al.Image(data, grid)


@pytest.fixture(scope="module")
def pair(slice2mm):
    deformation = random_deformation(slice2mm.grid, 7, max_displacement=4.0)
    with torch.no_grad():
        moving = al.resample(slice2mm, slice2mm.grid, deformation)
    truth, _ = ground_truth(deformation, slice2mm.grid)
    return slice2mm, moving, truth


def brain_epe(transform, truth, image):
    """Mean endpoint error (mm) inside the brain (intensity > 20) of ``transform`` against ``truth``."""
    brain = image.data[0, 0] > 20
    with torch.no_grad():
        est = transform.displacement(image.grid)
    return float((est - truth.field).norm(dim=1)[0][brain].mean())


def quick(stages):
    """A Registration of ``stages`` without a progress bar."""
    return Registration(stages, progress=False)


# A group with a known mean shape, shared by the groupwise and template tests. The shipped MNI
# axial slice at 3 mm warped by seeded smooth deformations D_i (image i is MNI o D_i). With v_i the
# exact inverse of D_i, the template in the middle of the group sees the slice through
# G = (id + mean v_i)^-1, and a template's position error is |mean_i D_i(T_i(x)) - G(x)| for the
# transforms T_i found from it to the images.
GROUP_SIZE = 4


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    root = tmp_path_factory.mktemp("group")
    full = al.read_image(example_path("mni152_t1_1mm_axial")).to(torch.float32)
    grid = full.grid.with_spacing(3.0)
    deformations, paths, mean_inverse = [], [], RunningMean()
    with torch.no_grad():
        base = al.resample(full, grid)
        for i in range(GROUP_SIZE):
            d = random_deformation(grid, i, max_displacement=6.0)
            al.write_image(al.resample(base, grid, d, interpolation="bspline"), root / f"s{i}.nii.gz")
            mean_inverse.add(ground_truth(d, grid)[0].field.detach().double())
            deformations.append(d.double())
            paths.append(root / f"s{i}.nii.gz")
        w, _ = invert_displacement(mean_inverse.mean, grid)
        truth = al.resample(base.to(torch.float64), grid, DisplacementField(grid, 1, w), interpolation="bspline")
    g_true = grid.points(torch.float64) + torch.movedim(w, 1, -1)
    return {"root": root, "paths": paths, "grid": grid, "base": base, "deformations": deformations,
            "g_true": g_true, "truth": truth, "mask": foreground(truth.data)}


def group_epe(mapped, group):
    """Mean distance (mm) in the foreground between ``mapped`` points and the true mean shape."""
    return float((mapped - group["g_true"]).norm(dim=-1)[0][group["mask"]].mean())
