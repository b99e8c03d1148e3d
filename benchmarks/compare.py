"""airlab's presets against elastix, ANTs and FireANTs on the same cases, in one run.

    python benchmarks/compare.py                      # every case, every installed tool, 3 repeats
    python benchmarks/compare.py --quick              # smoke run: 2D and 2 mm, one repeat
    python benchmarks/compare.py --cases 2d,mni2 --tools airlab-diffeomorphic,ants --repeats 1
    python benchmarks/compare.py --remeasure RUN1 RUN2 --out NEW   # accuracy of earlier runs' fields again
    python benchmarks/compare.py --real-cases coronal-2d,ratlung-2d --tools identity,airlab-diffeomorphic,ants
    python benchmarks/compare.py --cases none --real-cases all      # only the real pairs of different subjects

Every tool runs as a whole process from files to written outputs (python start, imports,
reading, registering, writing are all on the clock): airlab through ``airlab register``, the
others through the small runners in benchmarks/tools/, each of which writes the found transform
as an ITK displacement field on the fixed grid (mm, LPS, fixed point -> moving point). The cases
are built once per run in OUT/work/ from the data shipped with airlab (and nilearn's 1 mm
template), with known deformations, so the error of every tool is measured against the truth.
Writes OUT/results.md, OUT/results.json and OUT/time_vs_error.png. See docs/benchmarks.md.

``--real-cases`` adds pairs of different subjects (benchmarks/real_cases.py: Colin27 <-> MNI152,
a 2D coronal pair, the rat lung), built from packages and cached in ``--real-cache``. They have
no known transform: each tool is scored by the tissue (lung) labels its field carries, HD95,
SDlogJ and folding, in a second table of results.md (``real_rows`` in results.json). The tools
``identity`` (the headers alone) and ``ants-syncc`` (ANTs' slow inter-subject recipe) are meant
for them; ``identity`` is skipped on the synthetic cases, whose table gives the error before
registration.

``--remeasure`` runs no tool: it rebuilds the cases, checks that each earlier run's fixed and
moving images are still the ones built now (a row whose inputs changed is reported as such, to
be run again), and measures the fields those runs wrote against today's truth, masks and labels.
Times and memory are those of the earlier runs; the table names the run of each row.
"""

import argparse
import datetime
import importlib.metadata as md
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import airlab as al
from airlab.datasets import example_path, mni152
from airlab.evaluate import dice, endpoint_error, jacobian_stats
from airlab.synthetic import ground_truth, invert_grey_white, random_deformation
from airlab.transforms import DisplacementField, read_displacement_field

HERE = Path(__file__).resolve().parent
CASES = ["2d", "mni2", "mni1", "contrast", "oblique", "batch8"]
QUICK_CASES = ["2d", "mni2"]
AIRLAB = ["airlab-bspline", "airlab-diffeomorphic"]  # the default airlab tools
AIRLAB_PRESETS = AIRLAB + ["airlab-intersubject", "airlab-smooth"]  # every airlab tool --tools accepts
OTHERS = {"elastix": "itk-elastix", "ants": "antspyx", "fireants": "fireants"}  # tool -> pip package
EXTRA = {"ants-syncc": "antspyx", "identity": None}  # tools only on request (identity: real cases only)
DESCRIPTIONS = {
    "2d": "MNI152 axial slice, 1 mm, 2D",
    "mni2": "MNI152, 2 mm, 3D",
    "mni1": "MNI152, 1 mm, 3D (nilearn's template)",
    "contrast": "MNI152 2 mm, grey/white contrast inverted in moving (MI metrics)",
    "oblique": "MNI152 2 mm resampled onto two different oblique, anisotropic grids",
    "batch8": "8 pairs (seeds 1-8) of the 2 mm case; airlab batched in one process, the others one by one",
}


@dataclass
class Pair:
    fixed: Path
    moving: Path
    grid: al.Grid
    truth: np.ndarray  # [D, *shape] mm, the exact inverse of the known deformation
    brain: np.ndarray  # where errors count
    fixed_labels: al.Image | None = None  # 1 grey, 2 white matter on the fixed grid
    moving_labels: al.Image | None = None  # the same labels carried by the known deformation


@dataclass
class Case:
    name: str
    pairs: list
    metric: str | None = None
    ceiling: dict = field(default_factory=dict)  # Dice when the exact inverse carries the labels back


# ----------------------------------------------------------------------------------- cases
def nilearn_data() -> Path | None:
    """nilearn ships the MNI152 2009a template (T1, grey and white matter maps, 1 mm) in its wheel."""
    try:
        import nilearn
    except ImportError:
        return None
    return Path(nilearn.__file__).parent / "datasets" / "data"


def nilearn_1mm():
    data = nilearn_data()
    if data is None:
        raise RuntimeError("needs nilearn (pip install nilearn): the 1 mm template comes from its wheel")
    read = lambda kind: al.read_image(data / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz")  # noqa: E731
    t1, gm, wm = read("t1"), read("gm"), read("wm")
    labels = torch.zeros(gm.data.shape, dtype=torch.uint8)  # same rule as scripts/make_example_data.py:
    labels[gm.data > 0.5 * 255] = 1  # the maps hold probability x 255
    labels[wm.data > 0.5 * 255] = 2
    return t1.to(torch.float32), al.Image(labels, t1.grid)


def axial_slice():
    """The shipped 1 mm axial slice; its tissue labels come from the same slice of nilearn's maps
    (scripts/make_example_data.py cut it there), when nilearn is installed."""
    image = al.read_image(example_path("mni152_t1_1mm_axial")).to(torch.float32)
    if nilearn_data() is None:
        return image, None
    _, labels3d = nilearn_1mm()
    k = labels3d.grid.size[2] // 2 + 10  # ITK's z index; tensor axis 2 of [N, C, z, y, x]
    labels = al.Image(labels3d.data[:, :, k].contiguous(), image.grid)
    return image, labels


def regrid(image, spacing, degrees, rng):
    """A grid over the same extent, rotated by ``degrees`` about a random axis, with ``spacing``
    (as tests/test_registration.py builds its oblique case)."""
    from scipy.spatial.transform import Rotation

    axis = rng.normal(size=3)
    rotation = Rotation.from_rotvec(axis / np.linalg.norm(axis) * np.deg2rad(degrees)).as_matrix()
    direction = image.grid.direction_matrix @ rotation
    spacing = np.asarray(spacing, dtype=float)
    size = np.floor(image.grid.extent() / spacing).astype(int) + 1
    origin = image.grid.center() - direction @ (spacing * (size - 1) / 2)
    return al.Grid(size, spacing, origin, direction.ravel())


def make_pair(folder, tag, image, labels, seed, *, fixed_grid=None, moving_grid=None, contrast=False,
              write_fixed=True):
    """Fixed: ``image`` (on ``fixed_grid``); moving: ``image`` warped by a seeded known
    deformation (on ``moving_grid``); truth: the deformation's exact inverse on the fixed grid.
    The same construction as benchmarks/accuracy.py, on any pair of grids: all three are
    functions of physical points, so the grids only say where they are sampled."""
    fixed_grid, moving_grid = fixed_grid or image.grid, moving_grid or image.grid
    deformation = random_deformation(image.grid, seed)
    with torch.no_grad():
        fixed = image if fixed_grid is image.grid else al.resample(image, fixed_grid, interpolation="bspline")
        moving = al.resample(image, moving_grid, deformation, interpolation="bspline")
        if contrast:
            f, lab = image.data[0, 0], labels.data[0, 0]
            moving = al.Image(invert_grey_white(moving.data, float(f[lab == 1].median()),
                                                float(f[lab == 2].median())), moving.grid)
        truth = ground_truth(deformation, fixed_grid)[0].field[0].numpy()
        fixed_labels = moving_labels = None
        if labels is not None:
            fixed_labels = al.resample(labels, fixed_grid, interpolation="nearest")
            moving_labels = al.resample(labels, moving_grid, deformation, interpolation="label")
    brain = (fixed_labels.data[0, 0] > 0).numpy() if labels is not None else (fixed.data[0, 0] > 20).numpy()
    paths = folder / "fixed.nii.gz", folder / f"moving{tag}.nii.gz"
    if write_fixed:
        al.write_image(fixed, paths[0])
    al.write_image(moving, paths[1])
    return Pair(paths[0], paths[1], fixed_grid, truth, brain, fixed_labels, moving_labels)


def build_case(name: str, work: Path) -> Case:
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    if name == "2d":
        return Case(name, [make_pair(folder, "", *axial_slice(), seed=1)])
    if name == "mni1":
        return Case(name, [make_pair(folder, "", *nilearn_1mm(), seed=1)])
    image, labels = mni152()
    image = image.to(torch.float32)  # float files for every tool (the shipped file is uint8)
    if name == "mni2":
        return Case(name, [make_pair(folder, "", image, labels, seed=1)])
    if name == "contrast":  # seed 2 as in tests/test_registration.py
        return Case(name, [make_pair(folder, "", image, labels, seed=2, contrast=True)], metric="mi")
    if name == "oblique":
        rng = np.random.default_rng(11)
        fixed_grid = regrid(image, [1.8, 2.2, 2.6], 20, rng)
        moving_grid = regrid(image, [2.4, 1.9, 2.1], 25, rng)
        return Case(name, [make_pair(folder, "", image, labels, seed=1, fixed_grid=fixed_grid,
                                     moving_grid=moving_grid)])
    if name == "batch8":
        return Case(name, [make_pair(folder, str(s), image, labels, seed=s, write_fixed=s == 1) for s in range(1, 9)])
    raise ValueError(f"unknown case {name!r}; choose from {', '.join(CASES)}")


# ----------------------------------------------------------------------------- measuring
def measure(pair: Pair, displacement: Path) -> dict:
    """Errors of a tool's displacement field (resampled to the fixed grid if it is elsewhere)."""
    found = read_displacement_field(displacement, dtype=torch.float64)
    with torch.no_grad():
        est = found.displacement(pair.grid)[0].numpy()  # the field itself when on the fixed grid
    err = endpoint_error(est, pair.truth, mask=pair.brain)
    row = {"epe_mean": err["mean"], "epe_p95": err["p95"],
           "folding_pct": 100.0 * jacobian_stats(est, pair.grid)["folding_fraction"],
           "gm_dice": math.nan, "wm_dice": math.nan}
    if pair.fixed_labels is not None:
        row.update(label_dice(pair, found))
    return row


def label_dice(pair: Pair, transform) -> dict:
    # "label" interpolation both ways, as benchmarks/accuracy.py: boundaries move smoothly
    with torch.no_grad():
        back = al.resample(pair.moving_labels, pair.grid, transform.to(torch.float32), interpolation="label")
    d = dice(back.data[0, 0], pair.fixed_labels.data[0, 0], labels=[1, 2])
    return {"gm_dice": d[1], "wm_dice": d[2]}


# A child's ru_maxrss starts from its parent's resident size at fork (Linux carries the high-water
# mark across fork and exec), so this process, which holds the cases, would set a floor under every
# tool's peak. A small launcher forks the tool from a small process and reports its rusage and time.
_LAUNCHER = """
import os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{time.perf_counter() - start} {usage.ru_maxrss} {usage.ru_utime + usage.ru_stime}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_process(cmd: list, log: Path, timeout: float):
    """Wall time (s) and peak resident memory (MB) of one child process, or its error line."""
    measured = log.with_suffix(".rusage")
    with open(log, "w") as out:
        # cwd: the log's folder, so that files a tool drops in its working directory stay there
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(measured), *map(str, cmd)], stdout=out,
                                stderr=subprocess.STDOUT, cwd=log.parent, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            return None, None, f"timed out after {timeout:.0f} s"
    if proc.returncode != 0:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        return None, None, (lines[-1] if lines else f"exit code {proc.returncode}")[:300]
    seconds, kib = measured.read_text().split()[:2]  # the third: CPU seconds (user + system), cpu_seconds()
    return float(seconds), int(kib) / 1024.0, None


def cpu_seconds(log: Path):
    """The CPU time (user + system, all threads) of the process :func:`run_process` logged in ``log``."""
    fields = log.with_suffix(".rusage").read_text().split()
    return float(fields[2]) if len(fields) > 2 else None


def commands(tool: str, case: Case, out: Path, device: str) -> list:
    """The processes one repeat runs: one per pair, or one for a whole batch (airlab)."""
    metric = ["--metric", case.metric] if case.metric else []
    if tool in AIRLAB_PRESETS:
        preset = tool.split("-", 1)[1]
        if len(case.pairs) > 1:
            return [[sys.executable, str(HERE / "tools" / "run_airlab_batch.py"), str(case.pairs[0].fixed), str(out),
                     *[str(p.moving) for p in case.pairs], "--preset", preset, "--device", device, *metric]]
        exe = Path(sys.executable).with_name("airlab")
        airlab = [str(exe)] if exe.exists() else [sys.executable, "-m", "airlab"]
        return [airlab + ["register", str(case.pairs[0].fixed), str(case.pairs[0].moving), "-o", str(out / "pair0"),
                          "--preset", preset, "--quiet", "--no-report", "--device", device, *metric]]
    syncc = tool == "ants-syncc"
    runner = str(HERE / "tools" / ("run_ants.py" if syncc else f"run_{tool}.py"))
    return [[sys.executable, runner, str(p.fixed), str(p.moving), str(out / f"pair{i}"), "--device", device, *metric,
             *(["--transform", "SyNCC"] if syncc else [])] for i, p in enumerate(case.pairs)]


def bench(tool: str, case: Case, args, work: Path) -> dict:
    row = {"case": case.name, "tool": tool}
    if (missing := not_installed(tool)):
        return row | {"error": missing}
    times, memory = [], []
    for rep in range(args.repeats):
        if rep and times[0] > args.repeat_under:  # a long run's noise is small against its time
            break
        out = work / case.name / tool / f"rep{rep}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        total, peak = 0.0, 0.0
        for i, cmd in enumerate(commands(tool, case, out, args.device)):
            seconds, mb, error = run_process(cmd, out / f"log{i}.txt", args.timeout)
            if error:
                return row | {"error": error, "command": shlex.join(cmd)}
            total, peak = total + seconds, max(peak, mb)
        times.append(total / len(case.pairs))
        memory.append(peak)
        if rep:  # accuracy is measured on the first repeat; later ones only time
            shutil.rmtree(out, ignore_errors=True)
    first = work / case.name / tool / "rep0"
    measures = [measure(p, first / f"pair{i}" / "displacement.nii.gz") for i, p in enumerate(case.pairs)]
    row |= {k: float(np.mean([m[k] for m in measures])) for k in measures[0]}  # mean over pairs
    return row | {"seconds": statistics.median(times), "peak_mb": max(memory), "repeats": times}


def not_installed(tool: str) -> str | None:
    package = None if tool in AIRLAB_PRESETS else {**OTHERS, **EXTRA}[tool]
    return f"not installed (pip install {package})" if package and version(package) is None else None


def bench_real(tool: str, case, args, work: Path) -> dict:
    """One tool on one real case (real_cases.py): the process run as for the synthetic cases
    (repeats, --repeat-under), scored by the labels its field carries."""
    import real_cases

    if (missing := not_installed(tool)):
        return {"case": case.name, "tool": tool, "error": missing}
    folder = work / "real" / case.name / tool
    cmd = real_cases.tool_command(tool, case, folder, args.device)
    return real_cases.run_tool(tool, cmd, case, folder, args.timeout, repeats=args.repeats,
                               repeat_under=args.repeat_under)


def describe(case: Case) -> dict:
    """What the table says about a case: its grid, the error before registration (zero
    displacement against the truth, for scale) and the best Dice a perfect registration reaches."""
    pair = case.pairs[0]
    if pair.fixed_labels is not None:
        case.ceiling = label_dice(pair, DisplacementField(pair.grid, displacement=torch.as_tensor(pair.truth)[None]))
    before = [endpoint_error(np.zeros_like(p.truth), p.truth, mask=p.brain)["mean"] for p in case.pairs]
    size, spacing = "x".join(map(str, pair.grid.size)), "/".join(f"{s:g}" for s in pair.grid.spacing)
    return {"name": case.name, "description": DESCRIPTIONS[case.name], "pairs": len(case.pairs),
            "grid": f"{size} at {spacing} mm", "epe_before": float(np.mean(before)), "metric": case.metric,
            "ceiling": case.ceiling}


# ------------------------------------------------------------------------------- reporting
def same_image(a: Path, b: Path) -> bool:
    x, y = al.read_image(a), al.read_image(b)
    return x.grid == y.grid and x.data.shape == y.data.shape and bool(torch.allclose(
        x.data.double(), y.data.double(), atol=1e-4))


def remeasure(runs: list, cases: list, tools: list, work: Path) -> tuple[list, list]:
    """Accuracy rows for the fields earlier runs (OUT folders) left in their work/, against
    cases built now; time and memory stay the runs' own."""
    loaded = [(folder, json.loads((folder / "results.json").read_text())) for folder in runs]
    case_info, rows = [], []
    for name in cases:
        old = [(folder, r) for folder, run in loaded for r in run["rows"]
               if r["case"] == name and r["tool"] in tools and "error" not in r]
        if not old:
            continue
        print(f"[{name}] building the data", flush=True)
        case = build_case(name, work)
        case_info.append(describe(case))
        for folder, r in old:
            then = folder / "work" / name
            row = {k: v for k, v in r.items() if k not in ("epe_mean", "epe_p95", "gm_dice", "wm_dice", "folding_pct")}
            row["run"] = folder.name
            if not all(same_image(then / p.moving.name, p.moving) and same_image(then / p.fixed.name, p.fixed)
                       for p in case.pairs):
                rows.append(row | {"error": f"inputs changed since run {folder.name}: run it again"})
            else:
                measures = [measure(p, then / r["tool"] / "rep0" / f"pair{i}" / "displacement.nii.gz")
                            for i, p in enumerate(case.pairs)]
                rows.append(row | {k: float(np.mean([m[k] for m in measures])) for k in measures[0]})
            print(f"[{name}] {r['tool']} (run {folder.name}): " + rows[-1].get("error", f"EPE {rows[-1].get('epe_mean', 0):.3f} mm"),
                  flush=True)
        del case
    return case_info, rows


def version(package: str):
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return None


def machine() -> dict:
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "cpu": platform.processor() or "unknown", "cores": os.cpu_count(), "ram_gb": None,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads()}
    try:
        cpu = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")]
        info["cpu"] = cpu[0].split(":", 1)[1].strip() if cpu else info["cpu"]
        mem = [ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")]
        info["ram_gb"] = round(int(mem[0].split()[1]) / 2**20, 1) if mem else None
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:  # an editable install runs the working tree: say which one, and whether it was modified
        info["airlab_git"] = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(al.__file__).parent,
                                            capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["airlab_git"] = None
    info["versions"] = {"airlab": al.__version__, "torch": torch.__version__, "SimpleITK": version("SimpleITK"),
                        **{pkg: version(pkg) for pkg in OTHERS.values()}}
    return info


def fmt(value, digits):
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown(header: dict, cases: list, rows: list, real_cases: list = (), real_rows: list = ()) -> str:
    v = header["versions"]
    lines = [
        "# airlab vs elastix, ANTs and FireANTs", "",
        f"- date: {header['date']}",
        f"- machine: {header['cpu']}, {header['cores']} cores, {header['ram_gb']} GB RAM"
        + (f", GPU {header['gpu']}" if "gpu" in header else "") + f"; device {header['device']}",
        f"- versions: python {header['python']}, " + ", ".join(f"{k} {val}" for k, val in v.items() if val)
        + (f" (airlab source: git {header['airlab_git']})" if header.get("airlab_git") else ""),
        f"- repeats: {header['repeats']} (time: median of the repeats, whole process; memory: peak RSS of the process)"
        + (f"; a tool whose first run took over {header['repeat_under']:g} s per pair ran once"
           if header.get("repeat_under") is not None else ""),
        f"- command: `{header['command']}`", "",
    ]
    runs = header.get("remeasured", {})
    if runs:
        lines[-1:-1] = ["- accuracy re-measured from the fields of earlier runs; time and memory are theirs:"] + [
            f"  - run `{tag}`: `{h['command']}`, airlab source git {h.get('airlab_git')}, {h['date']}"
            for tag, h in runs.items()]
    extra = " run |" if runs else ""
    lines += ["| case | tool | time s | peak MB | mean EPE mm | p95 EPE mm | GM Dice | WM Dice | folding % |" + extra,
              "|---|---|---|---|---|---|---|---|---|" + ("---|" if runs else "")]
    for r in rows:
        if "error" in r:
            said = r["error"] if r["error"].startswith(("not installed", "case not built")) else f"failed: {r['error']}"
            lines.append(f"| {r['case']} | {r['tool']} | {said.replace('|', '/')} | | | | | | |"
                         + (f" {r.get('run', '')} |" if runs else ""))
            continue
        n = len(r.get("repeats") or [])
        lines.append(f"| {r['case']} | {r['tool']} | {fmt(r['seconds'], 1)}{f' ({n})' if n > 1 else ''} | {fmt(r['peak_mb'], 0)} | "
                     f"{fmt(r['epe_mean'], 3)} | {fmt(r['epe_p95'], 3)} | {fmt(r['gm_dice'], 3)} | "
                     f"{fmt(r['wm_dice'], 3)} | {fmt(r['folding_pct'], 4)} |" + (f" {r.get('run', '')} |" if runs else ""))
    lines += ["", "Cases:"]
    for c in cases:
        ceiling = (f" Dice ceiling (exact inverse carrying the labels back): GM {fmt(c['ceiling']['gm_dice'], 3)},"
                   f" WM {fmt(c['ceiling']['wm_dice'], 3)}." if c["ceiling"] else "")
        metric = f" Metric: {c['metric']}." if c["metric"] else ""
        lines.append(f"- `{c['name']}`: {c['description']}; {c['pairs']} pair(s), fixed grid {c['grid']}; mean EPE "
                     f"before registration {c['epe_before']:.2f} mm.{metric}{ceiling}")
    lines += ["", "EPE: endpoint error against the known transform inside the brain (tissue labels > 0; for 2D without "
              "labels, intensity > 20). Dice: the moving labels warped back onto the fixed grid by the tool's field. "
              "Folding: % of fixed voxels with a non-positive Jacobian determinant. Batch rows: time per pair, "
              "accuracy averaged over the 8 pairs. \"(3)\": the median of 3 runs; other times are one run.", ""]
    if real_rows:
        import real_cases as rc

        lines += ["## Real cases (pairs of different subjects; no known transform)", "", rc.markdown(list(real_rows)), "",
                  "Cases:"] + [f"- `{c['name']}`: {c['description']}" for c in real_cases] + [""]
    return "\n".join(lines)


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ok = [r for r in rows if "error" not in r]
    tools = sorted({r["tool"] for r in ok})
    cases = [c for c in CASES if any(r["case"] == c for r in ok)]
    markers = dict(zip(tools, "osD^vP*X"))
    colours = {c: plt.get_cmap("tab10")(i) for i, c in enumerate(cases)}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in ok:
        ax.scatter(r["seconds"], r["epe_mean"], marker=markers[r["tool"]], color=colours[r["case"]], s=60)
    ax.set_xscale("log")
    ax.set_xlabel("wall time per pair, whole process (s, log scale)")
    ax.set_ylabel("mean endpoint error in the brain (mm)")
    ax.grid(True, which="both", alpha=0.3)
    handles = [Line2D([], [], marker=markers[t], color="k", linestyle="", label=t) for t in tools]
    handles += [Patch(color=colours[c], label=c) for c in cases]  # colour: case; marker: tool
    ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma list from {','.join(CASES)}; none for no "
                        "synthetic case")
    parser.add_argument("--real-cases", default="", metavar="NAMES",
                        help="comma list of real_cases.py's cases (colin27-mni2, colin-mni-2mm-rev, colin-mni-1mm, "
                        "coronal-2d, ratlung-2d) or all; default none")
    parser.add_argument("--real-cache", type=Path, default=None,
                        help="the real cases' data cache (default $AIRLAB_REAL_CACHE or ~/.cache/airlab/real)")
    parser.add_argument("--tools", default=None, help=f"comma list from {','.join(AIRLAB_PRESETS + list(OTHERS) + list(EXTRA))} "
                        "(default: airlab's bspline and diffeomorphic presets and every installed tool of "
                        f"{', '.join(OTHERS)})")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case and tool; time is their median")
    parser.add_argument("--repeat-under", type=float, default=60.0, metavar="SECONDS",
                        help="only a tool whose first run of a case took less than this (per pair) is repeated")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="for airlab and FireANTs")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--timeout", type=float, default=14400.0, help="seconds one tool process may take")
    parser.add_argument("--quick", action="store_true", help="smoke run: cases 2d,mni2 and one repeat")
    parser.add_argument("--remeasure", type=Path, nargs="+", metavar="RUN", default=None,
                        help="run no tool: measure again the fields that earlier runs (their --out folders) wrote")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
        if args.cases == ",".join(CASES):
            args.cases = ",".join(QUICK_CASES)
    cases = [c.strip() for c in args.cases.split(",") if c.strip() and c.strip() != "none"]
    tools = ([t.strip() for t in args.tools.split(",") if t.strip()] if args.tools
             else AIRLAB + [t for t, pkg in OTHERS.items() if version(pkg)])
    for name, known in ((cases, CASES), (tools, AIRLAB_PRESETS + list(OTHERS) + list(EXTRA))):
        if bad := [x for x in name if x not in known]:
            parser.error(f"unknown {', '.join(bad)}; choose from {', '.join(known)}")
    import real_cases

    try:
        real_names = real_cases.case_names(args.real_cases)
    except ValueError as exc:
        parser.error(f"--real-cases: {exc}")
    if args.remeasure and real_names:
        parser.error("--remeasure measures the synthetic cases only; run the real cases without it")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    args.out = args.out.resolve()  # the tools run in their own folders
    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    header = machine() | {"device": args.device, "repeats": args.repeats, "repeat_under": args.repeat_under,
                          "command": shlex.join(["python", os.path.relpath(__file__)] + sys.argv[1:])}
    case_info, rows, real_info, real_rows = [], [], [], []
    if args.remeasure:
        runs = [p.resolve() for p in args.remeasure]
        if missing := [str(p) for p in runs if not (p / "results.json").is_file()]:
            parser.error(f"--remeasure: no results.json in {', '.join(missing)}")
        if len({p.name for p in runs}) < len(runs):
            parser.error("--remeasure: the runs' folders need different names (the table names rows by them)")
        header["repeats"], header["repeat_under"] = "those of each run", None
        header["remeasured"] = {p.name: json.loads((p / "results.json").read_text())["header"] for p in runs}
        case_info, rows = remeasure(runs, cases, tools if args.tools else AIRLAB + list(OTHERS), work)
        cases = []
    synthetic_tools = [t for t in tools if t != "identity"]
    for name in cases:
        print(f"[{name}] building the data", flush=True)
        try:
            case = build_case(name, work)
        except Exception as exc:  # noqa: BLE001 - a case that cannot be built is reported, not fatal
            rows += [{"case": name, "tool": t, "error": f"case not built: {exc}"} for t in synthetic_tools]
            continue
        case_info.append(describe(case))
        for tool in synthetic_tools:
            print(f"[{name}] {tool} ...", end=" ", flush=True)
            try:
                row = bench(tool, case, args, work)
            except Exception as exc:  # noqa: BLE001 - e.g. an output that cannot be read
                row = {"case": name, "tool": tool, "error": " ".join(str(exc).split())[:300]}
            rows.append(row)
            print(row["error"] if "error" in row else f"{row['seconds']:.1f} s, {row['peak_mb']:.0f} MB, "
                  f"EPE {row['epe_mean']:.3f} mm", flush=True)
        del case
    for name in real_names:
        print(f"[{name}] building the real case (cached after the first time)", flush=True)
        try:
            case = real_cases.build_real_case(name, args.real_cache, log=lambda m: print(m, flush=True))
        except Exception as exc:  # noqa: BLE001 - e.g. no apt-get here: reported, not fatal
            real_rows += [{"case": name, "tool": t, "error": f"case not built: {' '.join(str(exc).split())[:300]}"}
                          for t in tools]
            continue
        real_info.append({"name": case.name, "description": case.description, "headline": case.headline_name})
        for tool in tools:
            print(f"[{name}] {tool} ...", end=" ", flush=True)
            try:
                row = bench_real(tool, case, args, work)
            except Exception as exc:  # noqa: BLE001 - e.g. an output that cannot be read
                row = {"case": name, "tool": tool, "error": " ".join(str(exc).split())[:300]}
            real_rows.append(row)
            print(row["error"] if "error" in row else f"{row['seconds']:.1f} s, mean {row['headline']} Dice "
                  f"{row['dice_mean']:.3f}, folding {row['folding']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(markdown(header, case_info, rows, real_info, real_rows), encoding="utf-8")
    clean = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows]  # no NaN
    output = {"header": header, "cases": case_info, "rows": clean}
    if real_names:
        output |= {"real_cases": real_info, "real_rows": [
            {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()} for r in real_rows]}
    (args.out / "results.json").write_text(json.dumps(output, indent=2), encoding="utf-8")
    written = ["results.md", "results.json"]
    if any("error" not in r for r in rows):  # the synthetic cases' plot (real rows have no endpoint error)
        plot(rows, args.out / "time_vs_error.png")
        written.append("time_vs_error.png")
    print(f"results in {args.out}/ ({', '.join(written)})")


if __name__ == "__main__":
    main()
