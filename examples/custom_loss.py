"""The laboratory: a new similarity measure in a few lines, registered on the shipped MNI slice.

    python examples/custom_loss.py

The loss below (a Charbonnier, i.e. smooth L1, difference) is plain PyTorch; the engine gives it
gradients, a multi-resolution pyramid, masks, batching and any device.
"""

import torch
from torch import nn

import airlab as al
from airlab.datasets import example_path
from airlab.pipelines import preset
from airlab.registration import Registration
from airlab.synthetic import ground_truth, random_deformation


class Charbonnier(nn.Module):
    """sqrt((f - m)^2 + eps^2), averaged over the voxels the engine weights."""

    def __init__(self, eps: float = 0.01):
        super().__init__()
        self.eps = eps

    def forward(self, fixed, moving, weight=None, grid=None):
        w = torch.ones_like(fixed[:, :1]) if weight is None else weight
        cost = torch.sqrt((fixed - moving) ** 2 + self.eps**2)
        return (cost * w).flatten(1).sum(1) / w.flatten(1).sum(1)


def main():
    fixed = al.read_image(example_path("mni152_t1_1mm_axial")).to(torch.float32)
    deformation = random_deformation(fixed.grid, seed=0)
    with torch.no_grad():
        moving = al.resample(fixed, fixed.grid, deformation)
    truth, _ = ground_truth(deformation, fixed.grid)

    stages = preset("bspline", fixed.grid)
    stages[-1].losses = [(1.0, Charbonnier())]  # swap the deformable stage's similarity
    result = Registration(stages, progress=False)(fixed, moving)

    brain = fixed.data[0, 0] > 20
    with torch.no_grad():
        error = (result.transform.displacement(fixed.grid) - truth.field).norm(dim=1)[0][brain]
    print(f"mean endpoint error {error.mean():.3f} mm in the brain, {result.wall_time:.1f} s")


if __name__ == "__main__":
    main()
