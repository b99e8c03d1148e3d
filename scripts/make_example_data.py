"""Rebuild the example data shipped in ``src/airlab/data`` from the nilearn wheel.

    pip install nilearn && python scripts/make_example_data.py

The MNI ICBM152 2009a template (T1, grey- and white-matter probability maps) is resampled to
2 mm with anti-aliasing; tissue labels are 1 = grey matter, 2 = white matter (probability > 0.5).
nilearn stores the probability maps as 0-255 integers; like nilearn's own ``load_mni152_gm_template``
we rescale them to 0-1 before thresholding.
A 1 mm axial slice of the T1 serves 2D examples and tests.
"""

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from nilearn.datasets import load_mni152_template  # noqa: F401  (proves the wheel is there)
import nilearn

DATA = Path(nilearn.__file__).parent / "datasets" / "data"
OUT = Path(__file__).resolve().parents[1] / "src" / "airlab" / "data"
SPACING = 2.0


def to_2mm(image: sitk.Image, interpolator=sitk.sitkLinear) -> sitk.Image:
    image = sitk.Cast(image, sitk.sitkFloat32)
    smoothed = sitk.SmoothingRecursiveGaussian(image, SPACING / 2.0)
    size = [int(np.floor((n - 1) * s / SPACING)) + 1 for n, s in zip(image.GetSize(), image.GetSpacing())]
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing([SPACING] * 3)
    ref.SetDirection(image.GetDirection())
    ref.SetOrigin(image.GetOrigin())
    return sitk.Resample(smoothed, ref, sitk.Transform(), interpolator, 0.0)


def probability(image: sitk.Image) -> np.ndarray:
    """nilearn's maps hold probability x 255; nilearn's loaders divide by the maximum (255)."""
    return sitk.GetArrayFromImage(image) / 255.0


def main():
    t1 = to_2mm(sitk.ReadImage(str(DATA / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")))
    gm = to_2mm(sitk.ReadImage(str(DATA / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")))
    wm = to_2mm(sitk.ReadImage(str(DATA / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")))
    t1_arr = np.clip(np.rint(sitk.GetArrayFromImage(t1)), 0, 255).astype(np.uint8)
    gm_arr, wm_arr = probability(gm), probability(wm)
    labels = np.zeros(t1_arr.shape, np.uint8)
    labels[gm_arr > 0.5] = 1
    labels[wm_arr > 0.5] = 2
    OUT.mkdir(parents=True, exist_ok=True)
    for name, arr in (("mni152_t1_2mm.nii.gz", t1_arr), ("mni152_tissue_2mm.nii.gz", labels)):
        image = sitk.GetImageFromArray(arr)
        image.CopyInformation(t1)
        sitk.WriteImage(image, str(OUT / name), True)
        print(OUT / name, image.GetSize(), (OUT / name).stat().st_size, "bytes")
    # a 1 mm axial slice through the middle of the brain, as a 2D image with its 2D geometry
    full = sitk.ReadImage(str(DATA / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"))
    k = full.GetSize()[2] // 2 + 10
    axial = full[:, :, k]
    sitk.WriteImage(axial, str(OUT / "mni152_t1_1mm_axial.nii.gz"), True)
    print(OUT / "mni152_t1_1mm_axial.nii.gz", axial.GetSize(), axial.GetOrigin(), axial.GetDirection())


if __name__ == "__main__":
    main()
