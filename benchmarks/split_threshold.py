"""Where splitting one image's points over threads pays (``airlab.grid.cpu_split``): the time of
``grid_sample`` forward and backward (the gradient to the points, as a registration takes it) in
one part and in one part per thread, for 2D and 3D point counts around the thresholds
(8192 points a thread in 2D, 1024 in 3D).

    python benchmarks/split_threshold.py [--threads 2] [--repeats 7]

Prints a markdown table: microseconds per call (the least of ``--repeats`` timings of a loop).
"""

from __future__ import annotations

import argparse
import timeit

import torch

from airlab.grid import cpu_split, grid_sample


def timed(image: torch.Tensor, points: torch.Tensor, parts: int, repeats: int) -> tuple[float, float]:
    number = max(5, int(2e5 // points.shape[-2]))
    points = points.clone().requires_grad_(True)

    def forward():
        with torch.no_grad():
            grid_sample(image, points, "border", parts=parts)

    def both():
        grid_sample(image, points, "border", parts=parts).sum().backward()

    return tuple(min(timeit.repeat(f, number=number, repeat=repeats)) / number * 1e6 for f in (forward, both))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads; microseconds per call\n")
    print("| image | points | split by default | forward, 1 part | forward, split | fwd+bwd, 1 part | fwd+bwd, split |")
    print("|---|---|---|---|---|---|---|")
    for d, shape, counts in ((2, (1, 1, 200, 200), (2400, 4800, 16384, 24576, 37000, 150000)),
                             (3, (1, 1, 64, 64, 64), (1200, 2048, 4800, 37000))):
        image = torch.randn(*shape, generator=generator)
        for n in counts:
            points = torch.rand(1, *([1] * (d - 1)), n, d, generator=generator) * 2 - 1
            one = timed(image, points, 1, args.repeats)
            split = timed(image, points, args.threads, args.repeats)
            chosen = cpu_split(image, points, args.threads)
            print(f"| {d}D | {n} | {'yes' if chosen > 1 else 'no'} | {one[0]:.0f} | {split[0]:.0f} | {one[1]:.0f} | {split[1]:.0f} |")


if __name__ == "__main__":
    main()
