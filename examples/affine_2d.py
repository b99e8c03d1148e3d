"""AirLab's affine_registration_2d: recover a known affine of the shipped MNI152 slice.

    python examples/affine_2d.py [--fast]
"""

import time

from _common import arguments, known_affine, moved, quick, report, slice_2d

from airlab.pipelines import preset_pipeline
from airlab.workflows import register_pair


def main():
    args = arguments(__doc__)
    fixed = slice_2d()
    moving, truth = moved(fixed, known_affine(fixed.grid))
    pipeline = preset_pipeline("affine")  # rigid (NCC), then affine (NCC), on a pyramid
    start = time.perf_counter()
    out = register_pair(fixed, moving, quick(pipeline) if args.fast else pipeline)
    report("affine 2D", fixed, out.displacement.field[0], truth, time.perf_counter() - start)


if __name__ == "__main__":
    main()
