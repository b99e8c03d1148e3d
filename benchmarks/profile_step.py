"""Where the time of one registration goes, level by level (issue 17's evidence for a missed ratio).

    python benchmarks/profile_step.py                    # the 2 mm MNI152 case, default preset
    python benchmarks/profile_step.py --preset bspline --top 10 --out profile.md
    python benchmarks/profile_step.py --preset benchmarks/configs/levels/c_g15.yaml   # a YAML pipeline
    python benchmarks/profile_step.py --fixed F --moving M   # any pair, e.g. compare.py's OUT/work/2d/*.nii.gz

The case is benchmarks/accuracy.py's (the shipped 2 mm template and a copy deformed by the
seeded known deformation, seed 1). Everything runs in one thread, and times are process times
(``time.process_time``), so that a busy machine changes them little. Two runs:
1. plain: the process time of every level (set-up before the first level, the levels, and what
   follows the last one), from the engine's ``level_start``/``level_end`` events;
2. under ``torch.profiler`` (CPU), one profile per level: the number of tensor operations per
   iteration and the operations with the largest self time (the profiler's own overhead
   inflates small operations, so its shares are for ranking; the plain run's times are the ones
   to quote).
Prints markdown (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from airlab.datasets import mni152  # noqa: E402
from airlab.image import read_image  # noqa: E402
from airlab.progress import Observer  # noqa: E402
from airlab.registration import Registration  # noqa: E402

from accuracy import case  # noqa: E402
from probe import pipeline  # noqa: E402


class LevelClock(Observer):
    """Observer: process time and iterations of every level, and the time between them."""

    def __init__(self):
        self.levels: list[dict] = []
        self.mark = time.process_time()

    def level_start(self, info: dict) -> None:
        now = time.process_time()
        self.levels.append({"name": info["label"], "before_s": now - self.mark})
        self.mark = now

    def level_end(self, info: dict) -> None:
        now = time.process_time()
        self.levels[-1].update(seconds=now - self.mark, iterations=info["iterations"])
        self.mark = now


class LevelProfiler(Observer):
    """Observer: a ``torch.profiler`` profile of each level's operations."""

    def __init__(self):
        self.profiles: list[dict] = []
        self.current = None

    def level_start(self, info: dict) -> None:
        self.current = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self.current.start()

    def level_end(self, info: dict) -> None:
        self.current.stop()
        ops = Counter()
        self_us = Counter()
        for event in self.current.key_averages():
            if event.key.startswith("aten::") or event.key.startswith("airlab"):
                ops[event.key] += event.count
                self_us[event.key] += event.self_cpu_time_total
        self.profiles.append({"iterations": max(info["iterations"], 1), "ops": ops, "self_us": self_us})
        self.current = None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="diffeomorphic", help="a preset name or a YAML pipeline (--config schema)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--top", type=int, default=6, help="operations listed per level")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--fixed", type=Path, help="a pair of image files instead of the 2 mm case")
    parser.add_argument("--moving", type=Path)
    args = parser.parse_args(argv)
    if (args.fixed is None) != (args.moving is None):
        parser.error("--fixed and --moving go together")
    torch.set_num_threads(1)
    if args.fixed is None:
        fixed, labels = mni152()
        fixed = fixed.to(torch.float32)
        _, moving, _ = case(fixed, labels, args.seed)
        what = f"the 2 mm MNI152 case (seed {args.seed})"
    else:
        fixed, moving = (read_image(p).to(torch.float32) for p in (args.fixed, args.moving))
        what = f"{args.fixed.name} <- {args.moving.name} ({'x'.join(map(str, fixed.grid.shape))} voxels)"

    def stages():
        return pipeline(args.preset).build(fixed.grid)

    clock = LevelClock()
    start = time.process_time()
    clock.mark = start
    Registration(stages(), progress=False, callbacks=[clock])(fixed, moving)
    total = time.process_time() - start
    after = total - sum(lv["before_s"] + lv["seconds"] for lv in clock.levels)

    profiler = LevelProfiler()
    Registration(stages(), progress=False, callbacks=[profiler])(fixed, moving)

    lines = [f"`python benchmarks/profile_step.py --preset {args.preset}`: {what}, "
             f"1 thread, torch {torch.__version__}; process time {total:.2f} s for the registration "
             f"(set-up before the first level {clock.levels[0]['before_s']:.2f} s, after the last {after:.2f} s).", "",
             "| stage, level | iterations | s | ms per iteration | aten calls per iteration (nested included) | "
             "largest self time (profiler share of the level, calls per iteration) |",
             "|---|---|---|---|---|---|"]
    for lv, prof in zip(clock.levels, profiler.profiles):
        n = prof["iterations"]
        spent = sum(prof["self_us"].values()) or 1
        top = ", ".join(f"{k.replace('aten::', '')} {100 * v / spent:.0f}% ({prof['ops'][k] / n:.0f})"
                        for k, v in prof["self_us"].most_common(args.top))
        lines.append(f"| {lv['name']} | {lv['iterations']} | {lv['seconds']:.2f} | "
                     f"{1000 * lv['seconds'] / max(lv['iterations'], 1):.1f} | "
                     f"{sum(prof['ops'].values()) / n:.0f} | {top} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
