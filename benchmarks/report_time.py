"""The QC report's cost: process CPU seconds of ``report.write_report`` on the 2 mm MNI152 case.

    python benchmarks/report_time.py [--repeats 5]

A 3D report (the shipped 2 mm template against a copy deformed by seed 1, the known deformation as
the displacement) and a 2D one (the shipped 1 mm axial slice), each written ``--repeats`` times
into a temporary folder after one warm-up; prints the least and the median process time, one
thread. Issue 14 found the report to be 47% of a batched 3D pair's CPU time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import airlab as al
from airlab import report
from airlab.datasets import example_path, mni152
from airlab.synthetic import random_deformation

HISTORY = [{"stage": "affine", "level": k, "shrink": 2.0 ** (2 - k), "objective": [1.0 - 0.01 * i for i in range(60)]}
           for k in range(3)]


def case(fixed):
    deformation = random_deformation(fixed.grid, 1)
    with torch.no_grad():
        return al.resample(fixed, fixed.grid, deformation), deformation


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| case | least CPU s | median CPU s | report.png KB |")
    print("|---|---|---|---|")
    for name, fixed in (("3d (2 mm MNI152)", mni152()[0].to(torch.float32)),
                        ("2d (1 mm axial slice)", al.read_image(example_path("mni152_t1_1mm_axial")).to(torch.float32))):
        moving, deformation = case(fixed)
        times = []
        with tempfile.TemporaryDirectory() as folder:
            for k in range(args.repeats + 1):
                start = time.process_time()
                png, _ = report.write_report(folder, fixed, moving, moving, deformation, HISTORY, {"preset": "bench"})
                if k:
                    times.append(time.process_time() - start)
            size = png.stat().st_size / 1024
        print(f"| {name} | {min(times):.2f} | {statistics.median(times):.2f} | {size:.0f} |", flush=True)


if __name__ == "__main__":
    main()
