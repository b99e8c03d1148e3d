"""elastix (itk-elastix) with its default affine + B-spline parameter maps, files to files.

    python run_elastix.py FIXED MOVING OUTDIR [--metric mi]

Writes OUTDIR/displacement.nii.gz (transformix's deformation field: fixed grid, mm, LPS,
fixed point -> moving point, the ITK convention airlab uses) and OUTDIR/warped.nii.gz.
Both default maps already use AdvancedMattesMutualInformation, so --metric is accepted for a
uniform interface and changes nothing.
"""

import argparse
import shutil
import tempfile
from pathlib import Path

import itk


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("fixed")
    parser.add_argument("moving")
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--metric", default=None, help="ignored: the defaults use Mattes mutual information")
    parser.add_argument("--device", default="cpu", help="ignored: elastix runs on the CPU")
    args = parser.parse_args()
    args.outdir.mkdir(parents=True, exist_ok=True)
    fixed = itk.imread(args.fixed, itk.F)
    moving = itk.imread(args.moving, itk.F)
    maps = itk.ParameterObject.New()
    maps.AddParameterMap(maps.GetDefaultParameterMap("affine"))
    maps.AddParameterMap(maps.GetDefaultParameterMap("bspline"))
    warped, found = itk.elastix_registration_method(fixed, moving, parameter_object=maps, log_to_console=False)
    # transformix evaluates the whole chain (affine then B-spline) on the fixed grid it reads
    # from the parameter maps, so the field is already on FIXED's grid
    # transformix also writes deformationField.nii into its output directory (default: the
    # working directory): give it a scratch folder
    scratch = tempfile.mkdtemp(prefix="transformix-", dir=args.outdir)
    try:
        field = itk.transformix_deformation_field(moving, found, output_directory=scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    itk.imwrite(field, str(args.outdir / "displacement.nii.gz"), compression=True)
    itk.imwrite(warped, str(args.outdir / "warped.nii.gz"), compression=True)


if __name__ == "__main__":
    main()
