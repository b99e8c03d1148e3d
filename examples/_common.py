"""What the examples share: the shipped images, a known transform to recover, its error, and
``--fast`` (a few iterations per level, for the tests that run every example)."""

from __future__ import annotations

import argparse

import numpy as np
import torch

import airlab as al
from airlab.datasets import example_path
from airlab.evaluate import endpoint_error
from airlab.synthetic import ground_truth


def arguments(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--fast", action="store_true", help="a few iterations per level (a smoke run)")
    return parser.parse_args()


def slice_2d() -> al.Image:
    """The shipped 1 mm axial MNI152 slice."""
    return al.read_image(example_path("mni152_t1_1mm_axial")).to(torch.float32)


def volume_3d(fast: bool) -> al.Image:
    """The shipped 2 mm MNI152 volume (4 mm with ``fast``)."""
    image = al.read_image(example_path("mni152_t1_2mm")).to(torch.float32)
    if fast:
        with torch.no_grad():
            image = al.resample(image, image.grid.with_spacing(4.0))
    return image


def known_affine(grid: al.Grid, seed: int = 0) -> al.transforms.Affine:
    """A random affine about the image centre: up to 8 degrees, 8 % scaling and shear, 6 mm."""
    rng = np.random.default_rng(seed)
    d = grid.ndim
    matrix = np.eye(d) + rng.uniform(-0.08, 0.08, size=(d, d))
    angle = np.deg2rad(8.0)
    if d == 2:
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    else:
        rotation = torch.tensor([[angle, -angle / 2, angle / 3]], dtype=torch.float64)
        rot = al.transforms.rotation_matrix(rotation)[0].numpy()
    return al.transforms.Affine(d, matrix=torch.as_tensor(rot @ matrix), translation=rng.uniform(-6, 6, size=d),
                                center=grid.center(), dtype=torch.float64)


def moved(fixed: al.Image, transform) -> tuple[al.Image, torch.Tensor]:
    """``fixed`` deformed by ``transform`` (the moving image), and the displacement field a
    registration of it to ``fixed`` should find."""
    with torch.no_grad():
        moving = al.resample(fixed, fixed.grid, transform.to(torch.float32), interpolation="bspline")
    truth, _ = ground_truth(transform, fixed.grid)
    return moving, truth.field[0]


def report(name: str, fixed: al.Image, found: torch.Tensor, truth: torch.Tensor, seconds: float) -> float:
    """Print the mean endpoint error (mm) inside the head, before and after; return it."""
    head = (fixed.data[0, 0] > 0.1 * fixed.data.max()).numpy()
    error = endpoint_error(found.detach().reshape(truth.shape).numpy(), truth.numpy(), mask=head)
    before = endpoint_error(np.zeros(truth.shape, dtype=np.float32), truth.numpy(), mask=head)
    print(f"{name}: mean endpoint error {error['mean']:.3f} mm (before {before['mean']:.3f} mm), "
          f"95th percentile {error['p95']:.3f} mm, {seconds:.1f} s")
    return error["mean"]


def quick(pipeline, iterations: int = 8):
    """``pipeline`` with at most ``iterations`` per level (for ``--fast``)."""
    stages = []
    for s in pipeline.resolve().stages:
        if s.levels is not None:
            levels = [lv.model_copy(update={"iterations": min(lv.iterations, iterations)}) for lv in s.levels]
            stages.append(s.model_copy(update={"levels": levels}))
        else:
            its = 100 if s.iterations is None else s.iterations
            its = min(its, iterations) if isinstance(its, int) else [min(n, iterations) for n in its]
            stages.append(s.model_copy(update={"iterations": its}))
    return pipeline.model_copy(update={"stages": stages})
