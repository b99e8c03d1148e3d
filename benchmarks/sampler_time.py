"""What sampling the moving image costs per step: a linear sample against a cubic B-spline sample
(``splines.sample_cubic``, forward and backward), on the points of a registration's finest 2 mm
level (every other voxel of a 99x117x95 grid, moved by a smooth displacement), one thread.

    python benchmarks/sampler_time.py [--repeats 20]

On the CPU the cubic sample is airlab.compiled's numba loop; the rows marked "grid_sample
fetches" force the path it replaced (the GPU's). Also times the eight value fetches of a cubic sample with ``grid_sample``'s reflection padding,
as ``splines.evaluate`` made them before it folded its points into the grid and fetched padded
knots with border padding (docs/architecture.md, "A smoother update for cubic sampling"): the
reason for that fold. And the lookup of a point's cell range (the clamp's bounds) with a gather
against ``grid_sample`` at the integer corner, as it was read before.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time

import torch

from airlab import compiled, splines
from airlab.grid import sample_index


def _reflection_values(coefficients: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    # the eight linear fetches of splines.evaluate with grid_sample's reflection padding
    floor = torch.floor(index)
    w = splines.cubic_weights(index - floor)
    g0, g1 = w[..., 0] + w[..., 1], w[..., 2] + w[..., 3]
    positions, weights = (floor - 1 + w[..., 1] / g0, floor + 1 + w[..., 3] / g1), (g0, g1)
    out = 0
    for combo in itertools.product((0, 1), repeat=index.shape[-1]):
        pos = torch.stack([positions[k][..., a] for a, k in enumerate(combo)], dim=-1)
        weight = math.prod(weights[k][..., a] for a, k in enumerate(combo))
        out = out + weight.unsqueeze(1) * sample_index(coefficients, pos, "mirror")
    return out


def _ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    shape = (95, 117, 99)
    image = torch.nn.functional.avg_pool3d(torch.randn(1, 1, *shape, generator=generator), 3, 1, 1)
    coefficients = splines.prefilter(image)
    gradient = splines.node_gradient(coefficients)
    bounds = splines.cell_range(image)
    axes = torch.meshgrid(*[torch.arange(0, n, 2.0) for n in shape], indexing="ij")
    index = torch.stack(axes[::-1], -1).reshape(1, -1, 3)
    index = index + 1.5 * torch.sin(index / 7.0)
    index = torch.minimum(index.clamp(min=0), torch.tensor(shape[::-1]) - 1.0).requires_grad_(True)

    def linear():
        sample_index(image, index, "border").sum().backward()

    def cubic():
        splines.sample_cubic(coefficients, gradient, index, bounds=bounds).sum().backward()

    def values():
        with torch.no_grad():
            splines.evaluate(coefficients, index)

    low, _ = bounds

    def corner_gather():
        with torch.no_grad():
            splines._at_corner((low,), index)

    def corner_grid_sample():
        with torch.no_grad():
            sample_index(low, torch.floor(index), "border")

    def fetch_path(fn):
        # the grid_sample path that airlab.compiled's loop replaces on the CPU (still the GPU's)
        def run():
            with compiled.disabled():
                fn()
        return run

    def values_reflection():
        with torch.no_grad():
            _reflection_values(coefficients, index)

    with torch.no_grad():
        gap = (splines.evaluate(coefficients, index) - _reflection_values(coefficients, index)).abs().max().item()
    print(f"{index.shape[1]} points on a {'x'.join(map(str, shape[::-1]))} image, one thread, median of "
          f"{args.repeats} (ms); the two value paths differ by at most {gap:.1e}\n")
    print("| what | ms |\n|---|---|")
    for label, fn in (("linear sample, forward and backward", linear),
                      ("cubic sample (clamped), forward and backward: the compiled loop", cubic),
                      ("cubic sample (clamped), forward and backward: grid_sample fetches", fetch_path(cubic)),
                      ("cubic values: the compiled loop", values),
                      ("cubic values: folded points, padded knots, border fetches", fetch_path(values)),
                      ("cubic values: reflection fetches (before)", values_reflection),
                      ("cell range lookup: gather", corner_gather),
                      ("cell range lookup: grid_sample at the corner (before)", corner_grid_sample)):
        print(f"| {label} | {_ms(fn, args.repeats):.1f} |")


if __name__ == "__main__":
    main()
