"""What gzip compression of the written NIfTI outputs costs: write time and size per level.

    python benchmarks/nifti_compression.py OUTDIR [OUTDIR ...]    # folders of `airlab register`
    python benchmarks/nifti_compression.py --mni1                 # a 1 mm case built here

Each file (warped.nii.gz, displacement.nii.gz, inverse_displacement.nii.gz) is read and written
again with SimpleITK at every level (0 = uncompressed .nii, -1 = SimpleITK's default), in one
thread; the time is the process time of the write (the least of ``--repeats``), the size that of
the file. airlab writes with ``airlab.image.COMPRESSION_LEVEL``. ``--mni1`` writes, as stand-ins
of a 1 mm run's outputs, nilearn's 1 mm template deformed by the benchmarks' known deformation
(seed 1) and that deformation's displacement field (float32, like airlab's).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

LEVELS = [0, 1, 2, 3, 4, 6, 9, -1]


def mni1_stand_ins(folder: Path) -> list[Path]:
    import torch

    import airlab as al
    from airlab.synthetic import random_deformation
    from airlab.transforms import write_displacement_field

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from compare import nilearn_1mm  # the 1 mm template of benchmarks/compare.py

    t1, _ = nilearn_1mm()
    deformation = random_deformation(t1.grid, 1)
    with torch.no_grad():
        moving = al.resample(t1, t1.grid, deformation, interpolation="bspline")
    al.write_image(moving, folder / "warped.nii.gz")
    write_displacement_field(deformation, t1.grid, folder / "displacement.nii.gz")
    return [folder / "warped.nii.gz", folder / "displacement.nii.gz"]


def measure(path: Path, repeats: int) -> list[tuple]:
    image = sitk.ReadImage(str(path))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for level in LEVELS:
            out = Path(tmp) / ("x.nii" if level == 0 else "x.nii.gz")
            best = float("inf")
            for _ in range(repeats):
                start = time.process_time()
                sitk.WriteImage(image, str(out), level != 0, level if level != 0 else -1)
                best = min(best, time.process_time() - start)
            rows.append((level, best, out.stat().st_size))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path)
    parser.add_argument("--mni1", action="store_true", help="also the 1 mm stand-ins, built in a temporary folder")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    files = [f / n for f in args.folders for n in ("warped.nii.gz", "displacement.nii.gz",
                                                    "inverse_displacement.nii.gz") if (f / n).exists()]
    with tempfile.TemporaryDirectory() as tmp:
        if args.mni1:
            files += mni1_stand_ins(Path(tmp))
        print("| file | voxels x components | level | write s (process) | MB |")
        print("|---|---|---|---|---|")
        for path in files:
            image = sitk.ReadImage(str(path))
            shape = "x".join(map(str, image.GetSize())) + f" x {image.GetNumberOfComponentsPerPixel()}"
            tag = f"{path.parent.name}/{path.name}" if not args.mni1 or path.parent != Path(tmp) else f"1 mm/{path.name}"
            for level, seconds, size in measure(path, args.repeats):
                shown = "none (.nii)" if level == 0 else ("default" if level == -1 else str(level))
                print(f"| {tag} | {shape} | {shown} | {seconds:.3f} | {size / 1e6:.2f} |", flush=True)


if __name__ == "__main__":
    main()
