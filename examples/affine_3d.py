"""AirLab's affine_registration_3d: recover a known affine of the shipped 2 mm MNI152 volume.

    python examples/affine_3d.py [--fast]     # --fast: a 4 mm copy, a few iterations
"""

import time

from _common import arguments, known_affine, moved, quick, report, volume_3d

from airlab.pipelines import preset_pipeline
from airlab.workflows import register_pair


def main():
    args = arguments(__doc__)
    fixed = volume_3d(args.fast)
    moving, truth = moved(fixed, known_affine(fixed.grid))
    pipeline = preset_pipeline("affine")
    start = time.perf_counter()
    out = register_pair(fixed, moving, quick(pipeline) if args.fast else pipeline)
    report("affine 3D", fixed, out.displacement.field[0], truth, time.perf_counter() - start)


if __name__ == "__main__":
    main()
