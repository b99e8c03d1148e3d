"""Every example runs (``--fast``: a few iterations per level) and improves on doing nothing."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ERROR = re.compile(r"mean endpoint error ([\d.]+) mm \(before ([\d.]+) mm\)")


def run(name, *args):
    done = subprocess.run([sys.executable, str(EXAMPLES / name), "--fast", *args], capture_output=True, text=True,
                          timeout=600, cwd=EXAMPLES.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("name,args", [("affine_2d.py", ()), ("affine_3d.py", ()), ("bspline_2d.py", ()),
                                       ("diffeomorphic_2d.py", ()), ("demons_2d.py", ()), ("kernel_2d.py", ()),
                                       ("kernel_2d.py", ("--diffeomorphic",)), ("kernel_3d.py", ()),
                                       ("kernel_3d.py", ("--diffeomorphic",))])
def test_example_recovers_the_known_transform(name, args):
    out = run(name, *args)
    after, before = map(float, ERROR.search(out).groups())
    assert after < 0.7 * before, out
    if name == "diffeomorphic_2d.py":
        assert "folded pixels: 0;" in out
    if name == "kernel_3d.py":
        # the kernel stage itself ran (two levels of at most 8 iterations with --fast) and moved its knots
        kind = "KernelVelocityField" if args else "WendlandTransform"
        ran = re.search(rf"last stage: {kind}, (\d+) iterations, largest coefficient ([\d.]+) mm", out)
        assert ran and 0 < int(ran.group(1)) <= 2 * 8 and float(ran.group(2)) > 0.1, out


def test_landmarks_example():
    out = run("landmarks_2d.py")
    tre = [float(v) for v in re.findall(r"TRE ([\d.]+) mm at the landmarks", out)]
    assert len(tre) == 3 and tre[2] < tre[0], out  # strong landmarks pull their points closer


def test_every_example_is_tested():
    tested = {"affine_2d.py", "affine_3d.py", "bspline_2d.py", "diffeomorphic_2d.py", "demons_2d.py",
              "kernel_2d.py", "kernel_3d.py", "landmarks_2d.py"}
    # custom_loss.py has no --fast (it runs the whole bspline preset); test_registration plugs a loss in
    assert {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")} == tested | {"custom_loss.py"}
