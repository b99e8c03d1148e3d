"""airlab.compiled's loops on the CPU against the grid_sample path they replace.

    python benchmarks/compiled_loops.py            # prints a markdown table
    python benchmarks/compiled_loops.py --repeats 50

Cubic sampling: what a registration's cubic stage asks for at every iteration (airlab.splines.sample_cubic):
the moving image's spline at displaced points, clamped to each point's cell, and the slope
that its gradient uses; forward and backward. Cases: the shipped 2 mm template sampled at every
second voxel (a finest level with strides 2) and, for the size of the 1 mm brain, at eight
times the points. (2D has no compiled loop: PyTorch's 2D sampler is vectorised.) Points are the
voxel positions moved by a smooth random displacement of a few voxels. Times are the median
of ``--repeats`` calls, wall clock, at 1 and at 2 threads; the kernel's first (compiling or
cache-loading) call is reported apart.

With ``--pair FIXED MOVING --preset P`` (a preset name or a YAML pipeline), the whole
registration of that pair in this process, with the loops and without (the grid_sample and
scatter_add paths forced), alternating, ``--rounds`` times each after one warm-up run: wall and
process time, at PyTorch's default threads, and the iterations of every level (the same both
ways, or the comparison says so).

Like the ``airlab`` command, the script sets ``GOMP_SPINCOUNT=10000`` (unless set) before torch
loads.

Squaring: one step of scaling and squaring (airlab.transforms.velocity.exponential), on the
grids where a dense velocity lives at the finest level of a 2 mm and of a 1 mm brain (twice the
level's spacing: 4 and 2 mm), a smooth random field of a few voxels.

Mutual information: one forward and backward of ``losses.mutual_information`` (64 bins, a mask)
between the 2 mm template and a copy with another contrast, at every second voxel (as a
finest level with strides 2): the compiled Parzen histogram against ``scatter_add``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

# as the airlab command sets it, before torch loads (docs/architecture.md, "Threads"): PyTorch's
# idle OpenMP workers would otherwise spin on the cores the loops' threads need
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import torch  # noqa: E402

from airlab import compiled
from airlab.datasets import example_path
from airlab.image import read_image
from airlab.grid import Grid, grid_sample
from airlab.splines import cell_range, node_gradient, prefilter, sample_cubic


def points(shape: tuple[int, ...], stride: float, seed: int = 0) -> torch.Tensor:
    axes = [torch.arange(0, n - 1e-9, stride) for n in shape]
    mesh = torch.meshgrid(*axes, indexing="ij")
    index = torch.stack(mesh[::-1], dim=-1).reshape(1, -1, len(shape))
    g = torch.Generator().manual_seed(seed)
    phase = torch.rand(len(shape), generator=g) * 6.28
    return index + 2.0 * torch.sin(index.roll(1, -1) / 9.0 + phase)


def step(spline, bounds, index) -> None:
    index = index.detach().requires_grad_(True)
    out = sample_cubic(*spline, index, bounds=bounds)
    out.sum().backward()


def smooth_field(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A displacement of a few voxels in grid_sample's normalised units, ``[1, D, *shape]``."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(1, len(shape), *shape, generator=g)
    pool = torch.nn.functional.avg_pool3d if len(shape) == 3 else torch.nn.functional.avg_pool2d
    for _ in range(3):
        u = pool(u, 5, 1, 2, count_include_pad=False)
    scale = torch.tensor([4.0 / (n - 1) for n in shape[::-1]]).view(1, -1, *([1] * len(shape)))
    return u / u.abs().amax() * scale


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def registration_rows(fixed_path: Path, moving_path: Path, preset: str, rounds: int) -> list[str]:
    """Wall and process seconds of one registration with the loops and without, alternating."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from probe import pipeline

    from airlab.registration import Registration

    fixed, moving = (read_image(p).to(torch.float32) for p in (fixed_path, moving_path))
    def run(loops: bool):
        with contextlib.nullcontext() if loops else compiled.disabled():
            wall, cpu = time.perf_counter(), time.process_time()
            result = Registration(pipeline(preset).build(fixed.grid), progress=False)(fixed, moving)
            return time.perf_counter() - wall, time.process_time() - cpu, [h["iterations"] for h in result.history]

    run(True)  # numba's cache and the first allocations
    times = {True: [], False: []}
    for _ in range(rounds):
        for loops in (True, False):
            times[loops].append(run(loops))
    same = all(t[2] == times[True][0][2] for t in times[True] + times[False])
    lines = ["", f"`--pair {fixed_path} {moving_path} --preset {preset}`, {torch.get_num_threads()} threads, "
                 f"{rounds} rounds; iterations per level {times[True][0][2]}"
                 f"{'' if same else ' (NOT the same in every run)'}:", "",
             "| path | wall s (each run) | process s (each run) |", "|---|---|---|"]
    for loops, name in ((False, "PyTorch (grid_sample, scatter_add)"), (True, "compiled loops")):
        lines.append(f"| {name} | {' / '.join(f'{t[0]:.2f}' for t in times[loops])} | "
                     f"{' / '.join(f'{t[1]:.2f}' for t in times[loops])} |")
    ratio = statistics.median(t[0] for t in times[True]) / statistics.median(t[0] for t in times[False])
    lines.append(f"\nMedian wall time with the loops: {ratio:.2f} of the fetches'.")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--pair", nargs=2, type=Path, metavar=("FIXED", "MOVING"))
    parser.add_argument("--preset", default="diffeomorphic", help="with --pair: a preset name or a YAML pipeline")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    if args.pair is not None:
        print("\n".join(registration_rows(*args.pair, args.preset, args.rounds)))
        return 0
    brain = read_image(example_path("mni152_t1_2mm")).data.to(torch.float32)
    cases = [("2 mm, every 2nd voxel", brain, 2.0), ("2 mm spline, 8x the voxels", brain, 0.5)]
    lines = [f"`python benchmarks/compiled_loops.py --repeats {args.repeats}`, torch {torch.__version__}: "
             "one forward and backward of `sample_cubic` (values clamped to the cell, slope), median ms.", "",
             "| case | points | threads | grid_sample fetches | kernel | speed-up |", "|---|---|---|---|---|---|"]
    saved = torch.get_num_threads()
    first = None
    try:
        for name, data, stride in cases:
            coefficients = prefilter(data)
            spline, bounds = (coefficients, node_gradient(coefficients)), cell_range(data)
            index = points(tuple(data.shape[2:]), stride)
            if first is None:
                t = time.perf_counter()
                step(spline, bounds, index[:, :10])
                first = time.perf_counter() - t
            for threads in (1, 2):
                torch.set_num_threads(threads)
                kernel = median_ms(lambda: step(spline, bounds, index), args.repeats)
                with compiled.disabled():
                    fetches = median_ms(lambda: step(spline, bounds, index), args.repeats)
                lines.append(f"| {name} | {index.shape[1]} | {threads} | {fetches:.1f} | {kernel:.1f} | "
                             f"{fetches / kernel:.1f}x |")
    finally:
        torch.set_num_threads(saved)
    lines += ["", "| squaring, field grid | voxels | threads | grid_sample | loop | speed-up |", "|---|---|---|---|---|---|"]
    try:
        for name, shape in (("4 mm (2 mm brain)", (46, 55, 46)), ("2 mm (1 mm brain)", (91, 109, 91))):
            u = smooth_field(shape)
            identity = Grid(shape[::-1]).index_to_normalized(Grid(shape[::-1]).indices())
            compiled.square(u)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                fetch = median_ms(lambda: u + grid_sample(u, identity + torch.movedim(u, 1, -1), "border"), args.repeats)
                loop = median_ms(lambda: compiled.square(u), args.repeats)
                lines.append(f"| {name} | {u[0, 0].numel()} | {threads} | {fetch:.1f} | {loop:.1f} | {fetch / loop:.1f}x |")
    finally:
        torch.set_num_threads(saved)
    lines += ["", "| mutual information, forward and backward | voxels | threads | scatter_add | loop | speed-up |",
              "|---|---|---|---|---|---|"]
    from airlab.losses import mutual_information

    fixed = brain[..., ::2, ::2, ::2].contiguous()
    moving = (fixed.amax() - fixed) ** 1.5  # another contrast of the same anatomy
    mask = (fixed > 0.1 * fixed.amax()).to(fixed.dtype)

    def mi():
        m = moving.detach().requires_grad_(True)
        mutual_information(fixed, m, mask, bins=64).sum().backward()

    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            loop = median_ms(mi, args.repeats)
            with compiled.disabled():
                scatter = median_ms(mi, args.repeats)
            lines.append(f"| 2 mm template, every 2nd voxel | {fixed.numel()} | {threads} | {scatter:.1f} | {loop:.1f} | "
                         f"{scatter / loop:.1f}x |")
    finally:
        torch.set_num_threads(saved)
    lines += ["", f"The kernel's first call in this process (numba compiling it, or loading its disk cache): "
                  f"{first:.2f} s."]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
