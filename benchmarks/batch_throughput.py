"""Pairs per hour for many pairs (issue 14): a shell loop over ``airlab register`` against
``airlab batch`` locally and on a Dask LocalCluster.

    python benchmarks/batch_throughput.py [--cases 2d 3d] [--methods loop batch cluster ...]
                                          [--pairs-2d 32] [--pairs-3d 8] [--preset diffeomorphic]

Cases: 32 2D pairs (the shipped 1 mm MNI152 axial slice and copies of it deformed by known,
seeded deformations from ``airlab.synthetic``) and 8 3D pairs (the shipped 2 mm MNI152 template,
likewise), written to a temporary folder. Every method runs the same preset with reports, as a
user would, each as its own command (process start-up included); wall-clock times.

Methods: ``loop`` (one ``airlab register`` process per pair), ``batch`` (``airlab batch``, one
process, pairs one after the other), ``batch8`` (``airlab batch --batch-size 8``: same-grid pairs
through the engine's batch dimension), ``cluster`` (``airlab batch --cluster local:2``), ``cluster4``
(``--cluster local:2 --batch-size 4``: each of the two workers registers batches of up to 4 pairs).
CPU: user + system seconds of the command and every process it started.
"""

from __future__ import annotations

import argparse
import csv
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import airlab as al
from airlab.datasets import example_path
from airlab.synthetic import random_deformation

METHODS = {
    "loop": None,
    "batch": [],
    "batch8": ["--batch-size", "8"],
    "cluster": ["--cluster", "local:2"],
    "cluster4": ["--cluster", "local:2", "--batch-size", "4"],
}


def make_pairs(folder: Path, image: str, count: int) -> Path:
    """fixed.nii.gz, moving_NN.nii.gz (seed NN) and manifest.csv in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    fixed = al.read_image(example_path(image)).to(torch.float32)
    al.write_image(fixed, folder / "fixed.nii.gz")
    rows = ["id,fixed,moving"]
    for n in range(count):
        with torch.no_grad():
            moving = al.resample(fixed, fixed.grid, random_deformation(fixed.grid, 100 + n))
        al.write_image(moving, folder / f"moving_{n:02d}.nii.gz")
        rows.append(f"pair{n:02d},fixed.nii.gz,moving_{n:02d}.nii.gz")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv"


def airlab(*args) -> int:
    return subprocess.run([sys.executable, "-m", "airlab", *map(str, args)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True).returncode


def children_cpu() -> float:
    """User + system CPU seconds of every finished child process (Dask workers included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_method(method: str, manifest: Path, out: Path, preset: str) -> tuple[float, int]:
    """Wall time and the number of failed pairs."""
    start = time.perf_counter()
    if method == "loop":
        with open(manifest, newline="") as f:
            rows = list(csv.DictReader(f))
        failed = 0
        for row in rows:
            failed += airlab("register", manifest.parent / row["fixed"], manifest.parent / row["moving"], "-o",
                             out / row["id"], "--preset", preset, "--quiet") != 0
        return time.perf_counter() - start, failed
    airlab("batch", manifest, "-o", out, "--preset", preset, "--quiet", *METHODS[method])
    wall = time.perf_counter() - start
    with open(out / "results.csv", newline="") as f:
        failed = sum(r["status"] != "done" for r in csv.DictReader(f))
    return wall, failed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=["2d", "3d"], default=["2d", "3d"])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=["loop", "batch", "cluster"])
    parser.add_argument("--pairs-2d", type=int, default=32)
    parser.add_argument("--pairs-3d", type=int, default=8)
    parser.add_argument("--preset", default="diffeomorphic")
    args = parser.parse_args()
    cases = {"2d": ("mni152_t1_1mm_axial", args.pairs_2d), "3d": ("mni152_t1_2mm", args.pairs_3d)}
    root = Path(tempfile.mkdtemp(prefix="airlab-batch-bench-"))
    print("| case | method | pairs | wall (s) | pairs per hour | vs loop | CPU (s) | CPU vs loop | failed |")
    print("|---|---|---|---|---|---|---|---|---|")
    try:
        for case in args.cases:
            image, count = cases[case]
            manifest = make_pairs(root / case, image, count)
            base = base_cpu = None
            for method in args.methods:
                cpu = children_cpu()
                wall, failed = run_method(method, manifest, root / f"{case}-{method}", args.preset)
                cpu = children_cpu() - cpu
                rate = count / wall * 3600
                base, base_cpu = (rate, cpu) if method == "loop" else (base, base_cpu)
                ratio = f"{rate / base:.2f}x" if base else "-"
                cpu_ratio = f"{base_cpu / cpu:.2f}x" if base_cpu else "-"
                print(f"| {case} ({image}) | {method} | {count} | {wall:.1f} | {rate:.0f} | {ratio} | {cpu:.1f} | "
                      f"{cpu_ratio} | {failed} |", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
