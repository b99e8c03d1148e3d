"""FireANTs: affine then greedy deformable registration with the schedule of its quickstart
(docs/quickstart.md: scales 4, 2, 1; affine 200/100/50 iterations, Adam, lr 3e-3; greedy
200/100/25 iterations, compositive, smooth_grad_sigma 1, Adam, lr 0.5; CC kernel 5), files to files.

    python run_fireants.py FIXED MOVING OUTDIR [--metric mi] [--device cpu|cuda]

Writes OUTDIR/displacement.nii.gz (ITK convention: fixed grid, mm, LPS, fixed point -> moving
point) and OUTDIR/warped.nii.gz. --metric mi uses FireANTs' global mutual information loss
(loss_type="mi") in both stages instead of local cross-correlation.
"""

import argparse
from pathlib import Path

import SimpleITK as sitk
import torch
from fireants.io import BatchedImages, Image
from fireants.registration.affine import AffineRegistration
from fireants.registration.greedy import GreedyRegistration


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("fixed")
    parser.add_argument("moving")
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--metric", default=None, help="mi: mutual information instead of local CC")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    args.outdir.mkdir(parents=True, exist_ok=True)
    fixed = BatchedImages([Image.load_file(args.fixed, device=args.device)])
    moving = BatchedImages([Image.load_file(args.moving, device=args.device)])
    loss = {"loss_type": "mi"} if args.metric == "mi" else {"loss_type": "cc", "cc_kernel_size": 5}
    affine = AffineRegistration([4, 2, 1], [200, 100, 50], fixed, moving, optimizer="Adam", optimizer_lr=3e-3,
                                progress_bar=False, **loss)
    affine.optimize()
    greedy = GreedyRegistration(scales=[4, 2, 1], iterations=[200, 100, 25], fixed_images=fixed, moving_images=moving,
                                deformation_type="compositive", smooth_grad_sigma=1, optimizer="adam",
                                optimizer_lr=0.5, init_affine=affine.get_affine_matrix().detach(),
                                progress_bar=False, **loss)
    greedy.optimize()
    # get_warped_coordinates: the composed fixed -> moving map (affine and warp) as moving
    # coordinates normalised to [-1, 1] (grid_sample, align_corners=True) at every fixed voxel;
    # torch2phy turns normalised coordinates into physical ones (mm, LPS, from SimpleITK's
    # geometry). save_as_ants_transforms does the same sum but fails on 2D images (1.5.0).
    with torch.no_grad():
        coords = greedy.get_warped_coordinates(fixed, moving)[0].double()  # [*shape, D], x first
        d = coords.shape[-1]
        to_moving, to_fixed = moving.get_torch2phy()[0].double(), fixed.get_torch2phy()[0].double()
        identity = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, n, dtype=torch.float64, device=coords.device)
                                                for n in coords.shape[:-1]], indexing="ij")[::-1], dim=-1)
        physical = coords @ to_moving[:d, :d].T + to_moving[:d, d]  # moving points, mm
        displacement = physical - (identity @ to_fixed[:d, :d].T + to_fixed[:d, d])  # minus fixed points
    field = sitk.GetImageFromArray(displacement.float().cpu().numpy(), isVector=True)
    field.CopyInformation(fixed.images[0].itk_image)
    sitk.WriteImage(field, str(args.outdir / "displacement.nii.gz"), True)
    with torch.no_grad():
        moved = greedy.evaluate(fixed, moving)[0, 0].float().cpu().numpy()
    warped = sitk.GetImageFromArray(moved)
    warped.CopyInformation(fixed.images[0].itk_image)
    sitk.WriteImage(warped, str(args.outdir / "warped.nii.gz"), True)


if __name__ == "__main__":
    main()
