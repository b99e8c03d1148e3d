"""The README's promises: its set-up block matches CI, its code runs, the demo works."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_first_block_is_the_two_setup_commands():
    first = re.search(r"```(\w*)\n(.*?)```", README, flags=re.S).group(2).strip().splitlines()
    assert len(first) == 2
    assert "airlab demo" in first[0] and "pytest" in first[1]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert first[1] in ci.splitlines(), ".ci/run must run the README's test command verbatim"


def test_python_blocks_run(tmp_path, monkeypatch):
    """Every Python block of the README runs as written, on the shipped example data."""
    from airlab.datasets import example_path

    t1 = repr(str(example_path("mni152_t1_2mm")))
    axial = repr(str(example_path("mni152_t1_1mm_axial")))
    # the batch blocks run in test_batch_blocks_run; the SLURM recipe needs a SLURM cluster
    blocks = [b for b in _blocks("python") if "from airlab import batch" not in b]
    assert len(blocks) == 4
    code = "\n".join(blocks)
    code = code.replace('"t1.nii.gz"', t1).replace('"fixed.nii.gz"', axial).replace('"moving.nii.gz"', axial)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "rigid.txt").exists() and (tmp_path / "displacement.nii.gz").exists()
    assert namespace["result"].history


@pytest.mark.skipif(shutil.which("airlab") is None, reason="console script not installed")
def test_demo_command(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run(["airlab", "demo", "-o", str(out), "--quiet"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["sitk_vs_airlab_max_abs_difference"] < 1e-4 * metrics["intensity_range"]
    assert metrics["endpoint_error_mm"]["mean"] < 0.35 and metrics["folding_voxels"] == 0
    # a second run refuses to overwrite, exits 2 with one line, and leaves the files alone
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = subprocess.run(["airlab", "demo", "-o", str(out), "--quiet"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert not list(tmp_path.glob(".airlab-*"))


def test_help_lists_commands():
    done = subprocess.run([sys.executable, "-m", "airlab", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "demo" in done.stdout


def test_batch_blocks_run(tmp_path, monkeypatch):
    """The README's `airlab.batch` block runs as written on a manifest of two small real pairs."""
    import torch

    import airlab as al
    from airlab.datasets import example_path
    from airlab.synthetic import random_deformation

    blocks = [b for b in _blocks("python") if "from airlab import batch" in b]
    assert len(blocks) == 2 and "SLURMCluster" in blocks[1]
    full = al.read_image(example_path("mni152_t1_1mm_axial")).to(torch.float32)
    grid = full.grid.with_spacing(3.0)
    with torch.no_grad():
        fixed = al.resample(full, grid)
        for n in range(2):
            al.write_image(al.resample(fixed, grid, random_deformation(grid, n, max_displacement=4.0)),
                           tmp_path / f"m{n}.nii.gz")
    al.write_image(fixed, tmp_path / "f.nii.gz")
    (tmp_path / "pairs.csv").write_text("id,fixed,moving\na,f.nii.gz,m0.nii.gz\nb,f.nii.gz,m1.nii.gz\n")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["summary"].done == 2
    assert (tmp_path / "study" / "b" / "report.html").exists() and (tmp_path / "study" / "index.html").exists()
