"""The GPU check of issue 17, in one command: a few minutes on one H100/H200-class card.

    python benchmarks/gpu_check.py --out gpu_check.md      # on a machine with CUDA
    python benchmarks/gpu_check.py --cpu-smoke --out x.md  # CPU only, tiny sizes, seconds (CI)

What it runs, in order, each as a row of a markdown table (printed, and written to ``--out``):
1. the CUDA tests: ``pytest -q -k cuda tests/`` (tests/conftest.py adds ``"cuda"`` to the
   ``device`` parametrisations when CUDA is available; the rest carry ``cuda`` in their names);
2. CPU against CUDA on the 2 mm MNI152 case of benchmarks/accuracy.py (seed 1, default preset):
   the mean endpoint error against the known answer (mm, inside the brain) on each device, and
   their difference (goal: under 0.01 mm);
3. one 1 mm pair (nilearn's MNI152 2009a, deformed as in benchmarks/compare.py; the default
   preset: rigid, affine, then the deformable stage), registration time (goal: under 0.5 s) and
   peak GPU memory (``torch.cuda.max_memory_allocated``);
4. batches of 4 and 8 such pairs (seeds 1 to N) through the engine's batch dimension (one
   ``Registration(...)(fixed, moving)`` call, as benchmarks/tools/run_airlab_batch.py), time per
   pair (goal: under 0.1 s) and peak GPU memory.

Times are of the registration (images already on the device, reading and writing excluded),
between ``torch.cuda.synchronize()`` calls, after a warm-up run of the same shapes (2 iterations
per level) that is not counted; the median of ``--repeats`` runs. The header of the table names
the card, the driver's CUDA version, torch and airlab.

Without CUDA, or with ``--cpu-smoke``, the same code runs on the CPU at a tiny size (the 2 mm
template resampled to 8 mm, 2 iterations per level, no pytest run), so that CI exercises the
script (tests/test_gpu_check.py), in one thread; its numbers mean nothing and no goal is judged. The exit
status is 1 when a judged goal is missed or a check fails, 0 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import airlab as al  # noqa: E402
from airlab.datasets import mni152  # noqa: E402
from airlab.evaluate import endpoint_error  # noqa: E402
from airlab.pipelines import preset  # noqa: E402
from airlab.registration import Registration  # noqa: E402
from airlab.synthetic import random_deformation  # noqa: E402

from accuracy import case  # noqa: E402 - the 2 mm case's construction, shared with benchmarks/accuracy.py

PRESET = "diffeomorphic"  # the command line's default
GOALS = {"agreement_mm": 0.01, "single_s": 0.5, "batch_s_per_pair": 0.1}  # issue 17
SMOKE_SPACING = 8.0  # mm: the smoke run's images (25 x 30 x 24 voxels)


# ------------------------------------------------------------------------------------ device
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float | None:
    """Peak GPU memory allocated by tensors since the last :func:`reset_peak` (MB); None on a CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return (f"{p.name} ({p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, torch {torch.__version__}, "
                f"airlab {al.__version__}; TF32 for matmul {torch.backends.cuda.matmul.allow_tf32}, "
                f"for cuDNN convolutions {torch.backends.cudnn.allow_tf32}")
    return (f"CPU only ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
            f"torch {torch.__version__}, airlab {al.__version__}")


# ------------------------------------------------------------------------------------ registration
def stages(grid, smoke: bool, iterations: int | None = None):
    """The default preset's stages for ``grid``; ``iterations`` (or the smoke run) caps every level."""
    built = preset(PRESET, grid)
    cap = 2 if smoke and iterations is None else iterations
    if cap is not None:
        for stage in built:
            for level in stage.levels:
                level.iterations = min(level.iterations, cap)
    return built


def register(fixed, moving, device, smoke: bool, iterations: int | None = None):
    """One registration on ``device`` (images moved there first, outside the clock); returns the
    result, its time in seconds (between synchronisations) and the peak GPU memory (MB)."""
    fixed, moving = fixed.to(device), moving.to(device)
    registration = Registration(stages(fixed.grid, smoke, iterations), progress=False)
    reset_peak(device)
    synchronize(device)
    start = time.perf_counter()
    result = registration(fixed, moving, device=device)
    synchronize(device)
    return result, time.perf_counter() - start, peak_mb(device)


def timed(fixed, moving, device, smoke: bool, repeats: int):
    """A warm-up run of the same shapes (2 iterations per level, not counted), then the median
    time and the largest peak memory of ``repeats`` runs."""
    register(fixed, moving, device, smoke, iterations=2)
    seconds, peaks, result = [], [], None
    for _ in range(repeats):
        result = None  # the previous run's tensors are freed before the next peak is measured
        result, s, peak = register(fixed, moving, device, smoke)
        seconds.append(s)
        peaks += [peak] if peak is not None else []
    return result, statistics.median(seconds), max(peaks) if peaks else None


def displacement(result, grid) -> np.ndarray:
    with torch.no_grad():
        return result.transform.displacement(grid)[0].detach().cpu().double().numpy()


# ------------------------------------------------------------------------------------ data
def coarse(image: al.Image, spacing: float, interpolation: str) -> al.Image:
    """``image`` resampled onto a grid of the same extent, direction and origin at ``spacing`` mm."""
    grid = image.grid
    size = [int(np.floor((n - 1) * s / spacing)) + 1 for n, s in zip(grid.size, grid.spacing)]
    target = al.Grid(size, [spacing] * grid.ndim, grid.origin, grid.direction)
    with torch.no_grad():
        return al.resample(image, target, interpolation=interpolation)


def two_mm(smoke: bool):
    fixed, labels = mni152()
    fixed = fixed.to(torch.float32)
    if smoke:
        fixed, labels = coarse(fixed, SMOKE_SPACING, "linear"), coarse(labels, SMOKE_SPACING, "nearest")
    return fixed, labels


def one_mm(smoke: bool, device: torch.device) -> tuple[al.Image, str]:
    """The 1 mm fixed image on ``device`` and what it is: nilearn's template (the shipped 2 mm one
    resampled to 1 mm where nilearn is missing; to 8 mm in a smoke run)."""
    if smoke:
        return two_mm(True)[0], "8 mm (smoke)"
    from compare import nilearn_data, nilearn_1mm  # the 1 mm template as benchmarks/compare.py reads it

    if nilearn_data() is not None:
        return nilearn_1mm()[0].to(device), "1 mm"
    return coarse(two_mm(False)[0], 1.0, "bspline").to(device), "1 mm (2 mm template resampled: no nilearn)"


def deformed(fixed: al.Image, seeds, device: torch.device) -> al.Image:
    """``fixed`` warped by the benchmarks' known deformations of ``seeds``, stacked on the batch
    dimension (built on ``device``: B-spline resampling of a 1 mm volume is slow on a CPU)."""
    out = []
    with torch.no_grad():
        for seed in seeds:
            deformation = random_deformation(fixed.grid, seed).to(device)
            out.append(al.resample(fixed.to(device), fixed.grid, deformation, interpolation="bspline").data)
    return al.Image(torch.cat(out), fixed.grid)


# ------------------------------------------------------------------------------------ checks
def row(check, device, size, result, goal="", status=""):
    return {"check": check, "device": str(device), "size": size, "result": result, "goal": goal, "status": status}


def judge(value: float, goal: float, smoke: bool) -> str:
    return "smoke" if smoke else ("pass" if value < goal else "FAIL")


def cuda_tests(smoke: bool, timeout: int) -> dict:
    if smoke:
        return row("CUDA tests (pytest -q -k cuda tests/)", "cpu", "-", "not run (no CUDA)", "all pass", "smoke")
    start = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda",
                              str(ROOT / "tests")], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return row("CUDA tests (pytest -q -k cuda tests/)", "cuda", "-", f"timed out after {timeout} s", "all pass",
                   "FAIL")
    lines = [line for line in out.stdout.strip().splitlines() if line.strip()]
    summary = lines[-1] if lines else out.stderr.strip()[-200:]
    if out.returncode != 0:
        print(out.stdout[-4000:], out.stderr[-2000:], sep="\n", file=sys.stderr)
    ok = out.returncode == 0 and "passed" in summary
    return row("CUDA tests (pytest -q -k cuda tests/)", "cuda", "-",
               f"{summary} ({time.perf_counter() - start:.0f} s)", "all pass", "pass" if ok else "FAIL")


def agreement(device: torch.device, smoke: bool) -> list[dict]:
    """The 2 mm case on the CPU and on ``device``: endpoint errors and their difference."""
    fixed, labels = two_mm(smoke)
    _, moving, truth = case(fixed, labels, 1)
    brain = (labels.data[0, 0] > 0).numpy()
    truth = truth.field[0].detach().double().numpy()
    size = "x".join(map(str, fixed.grid.size))
    what = "2 mm case at 8 mm (smoke)" if smoke else "2 mm case"
    rows, fields, errors = [], {}, {}
    for name in dict.fromkeys(["cpu", device.type]):
        result, seconds, peak = register(fixed, moving, torch.device(name), smoke)
        fields[name] = displacement(result, fixed.grid)
        errors[name] = endpoint_error(fields[name], truth, mask=brain)["mean"]
        rows.append(row(f"{what}: mean endpoint error", name, size,
                        f"{errors[name]:.4f} mm ({seconds:.2f} s{_mb(peak)})"))
    other = device.type
    apart = np.linalg.norm(fields["cpu"] - fields[other], axis=0)[brain]
    difference = abs(errors["cpu"] - errors[other])
    rows.append(row(f"{what}: CPU vs {other.upper()}", f"cpu, {other}", size,
                    f"EPE difference {difference:.4f} mm; fields apart {apart.mean():.4f} mm mean, "
                    f"{apart.max():.4f} mm max", f"< {GOALS['agreement_mm']} mm",
                    "smoke" if smoke else ("pass" if difference < GOALS["agreement_mm"] else "FAIL")))
    return rows


def speed(device: torch.device, smoke: bool, batches: list[int], repeats: int) -> list[dict]:
    fixed, label = one_mm(smoke, device)
    size = "x".join(map(str, fixed.grid.size))
    rows = []
    moving = deformed(fixed, [1], device)
    _, seconds, peak = timed(fixed, moving, device, smoke, repeats)
    rows.append(row(f"{label} pair, {PRESET} preset: time", device, size, f"{seconds:.3f} s{_mb(peak)}",
                    f"< {GOALS['single_s']} s", judge(seconds, GOALS["single_s"], smoke)))
    for n in batches:
        moving = deformed(fixed, range(1, n + 1), device)
        _, seconds, peak = timed(fixed, moving, device, smoke, repeats)
        per_pair = seconds / n
        rows.append(row(f"{label}, batch of {n}: time per pair", device, f"{n} x {size}",
                        f"{per_pair:.3f} s ({seconds:.2f} s in all{_mb(peak)})", f"< {GOALS['batch_s_per_pair']} s",
                        judge(per_pair, GOALS["batch_s_per_pair"], smoke)))
        del moving
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _mb(peak: float | None) -> str:
    return "" if peak is None else f", peak {peak:.0f} MB"


def table(rows: list[dict], header: str) -> str:
    columns = ["check", "device", "size", "result", "goal", "status"]
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--cpu-smoke", action="store_true", help="CPU only, tiny sizes (what CI runs)")
    parser.add_argument("--batches", default="4,8", help="batch sizes (comma-separated)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (the median is shown)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the CUDA tests")
    parser.add_argument("--test-timeout", type=int, default=600)
    parser.add_argument("--no-tf32", action="store_true",
                        help="turn TF32 off for matmul and cuDNN (torch's default allows it for convolutions; "
                        "try this if CPU and CUDA disagree)")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke or not torch.cuda.is_available()
    device = torch.device("cpu" if smoke else "cuda")
    repeats = 1 if smoke else args.repeats
    if args.no_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if smoke:
        torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and stall on a busy CI machine)
    batches = [int(b) for b in args.batches.split(",") if b]
    started = time.perf_counter()
    header = (f"airlab GPU check, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: "
              f"{describe(device)}" + ("; CPU SMOKE RUN (tiny sizes, 2 iterations per level): the numbers mean "
                                       "nothing" if smoke else ""))
    rows = []
    if not args.skip_tests:
        rows.append(cuda_tests(smoke, args.test_timeout))
    for part in (lambda: agreement(device, smoke), lambda: speed(device, smoke, batches, repeats)):
        try:
            rows += part()
        except Exception as exc:  # noqa: BLE001 - one failed part is a row; the others still run
            if smoke:
                raise
            rows.append(row("error", device, "-", f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}", "",
                            "FAIL"))
    text = table(rows, header) + f"\nTotal {time.perf_counter() - started:.0f} s.\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
