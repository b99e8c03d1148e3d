"""benchmarks/gpu_check.py runs (issue 17): its CPU-only parts at a tiny size, as CI can.

The CUDA paths themselves need a GPU; this keeps the script from rotting between GPU runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_cpu_smoke_writes_its_table(tmp_path):
    out = tmp_path / "gpu_check.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out)], capture_output=True,
                         text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    text = out.read_text(encoding="utf-8")
    assert text in run.stdout  # the file holds what was printed
    assert "CPU SMOKE RUN" in text
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines[0] == "| check | device | size | result | goal | status |"
    rows = lines[1:]
    checks = [r.split(" | ")[0][2:] for r in rows]
    assert checks[0].startswith("CUDA tests")
    assert any("CPU vs CPU" in c for c in checks)
    assert any("pair, diffeomorphic preset: time" in c for c in checks)
    assert any("batch of 4" in c for c in checks) and any("batch of 8" in c for c in checks)
    for r in rows:  # no goal is judged on a smoke run
        cells = [c.strip() for c in r.strip().strip("|").split("|")]
        assert len(cells) == 6 and (not cells[4] or cells[5] == "smoke"), r
    assert "FAIL" not in text and "error" not in checks
    # the CPU-against-itself agreement is exact: the engine is deterministic on one device
    agreement = next(r for r in rows if "CPU vs CPU" in r)
    assert "EPE difference 0.0000 mm" in agreement
