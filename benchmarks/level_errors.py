"""Where a pipeline's synthetic error is made: the mean endpoint error after each level of one
stage, the later levels of that stage given 0 iterations (docs/architecture.md, "Cubic sampling
per level").

    python benchmarks/level_errors.py intersubject benchmarks/configs/levels/ps50.yaml [--stage 2]

Each argument is a preset name or a YAML pipeline. One thread; ``accuracy.py``'s 2 mm MNI case,
seed 1, as is and with grey and white matter swapped (``contrast``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy  # noqa: E402
from airlab.datasets import mni152  # noqa: E402
from airlab.pipelines import PipelineConfig, load_config  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipelines", nargs="+")
    parser.add_argument("--stage", type=int, default=2, help="index of the stage whose levels are cut (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    fixed, labels = mni152()
    print("| pipeline | levels run | synth mean EPE mm | contrast mean EPE mm |\n|---|---|---|---|")
    for name in args.pipelines:
        config = load_config(name) if name.endswith((".yaml", ".yml")) else PipelineConfig(preset=name).resolve()
        stage = config.stages[args.stage]
        its = stage.iterations if isinstance(stage.iterations, list) else None
        if its is None:
            raise SystemExit(f"{name}: stage {args.stage} has no per-level iterations list")
        for upto in range(1, len(its) + 1):
            cut = stage.model_copy(update={"iterations": its[:upto] + [0] * (len(its) - upto)})
            stages = list(config.stages)
            stages[args.stage] = cut
            pipeline = config.model_copy(update={"stages": stages})
            errors = [accuracy.measure(pipeline, fixed, labels, 1, contrast=c)["mean"] for c in (False, True)]
            print(f"| {name} | {upto} of {len(its)} | {errors[0]:.3f} | {errors[1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
