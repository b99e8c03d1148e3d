"""Start-up cost (issue 17): ``import airlab`` and the command line import only what a command
needs. Each check runs a fresh interpreter and looks at ``sys.modules``, so it fails as soon as
someone re-adds an eager import of a heavy package."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import airlab

# what a plain `import airlab` (and `airlab --help`) must not load: the public names are imported
# on first use (PEP 562)
HEAVY = ["torch", "SimpleITK", "numpy", "scipy", "matplotlib", "pydantic", "yaml", "dask", "distributed", "tqdm",
         "nibabel", "click"]
# loaded by nothing but the commands (or functions) that use them
ON_DEMAND = ["scipy", "matplotlib", "pydantic", "yaml", "dask", "distributed", "nibabel", "numba"]


def _loaded(code: str, packages: list[str]) -> list[str]:
    """The top-level ``packages`` that are in ``sys.modules`` after running ``code`` in a fresh
    interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return sorted(set(json.loads(out.stdout.strip().splitlines()[-1])) & set(packages))


def test_import_airlab_loads_nothing_heavy():
    assert _loaded("import airlab", HEAVY) == []


def test_command_line_without_a_command_loads_no_engine():
    """`airlab --help` and parsing the arguments of every command: click (and numpy, for the
    landmark weight's default) only."""
    code = ("import sys\nfrom click.testing import CliRunner\nfrom airlab.cli import main\n"
            "assert CliRunner().invoke(main, ['--help']).exit_code == 0\n")
    assert _loaded(code, HEAVY) == ["click", "numpy"]


def test_public_api_loads_the_engine_but_not_the_extras():
    """Images, transforms and ``airlab.register`` need torch and SimpleITK; pydantic and YAML come
    with the pipelines (``register`` runs them), scipy and matplotlib with the report only."""
    code = ("import airlab as al\nal.Image, al.Grid, al.read_image, al.transforms.Affine, al.register\n"
            "from airlab import report\n")  # the report draws with matplotlib when it runs, not before
    assert _loaded(code, ON_DEMAND) == []


def test_every_public_name_is_importable():
    for name in airlab.__all__:
        assert getattr(airlab, name) is not None, name
        assert name in dir(airlab)
    namespace = {}
    exec("from airlab import *", namespace)
    assert set(airlab.__all__) <= set(namespace)
    from airlab import Grid, Image, register, transforms  # noqa: F401 - the README's imports
    from airlab.pipelines import METRICS, PRESETS, PipelineConfig, preset  # noqa: F401
    from airlab.workflows import register_files, staged_output  # noqa: F401

    assert airlab.evaluate.dice is not None  # a submodule, imported on first use
    with pytest.raises(AttributeError):
        airlab.no_such_name  # noqa: B018
    with pytest.raises(ImportError):
        from airlab import no_such_name  # noqa: F401


def test_register_without_report_loads_no_plotting(tmp_path):
    """`airlab register --no-report` (what benchmarks/compare.py times) never imports
    matplotlib or scipy; the pipeline (pydantic, YAML) it needs."""
    code = f"""
import torch, airlab as al
from click.testing import CliRunner
from airlab.cli import main
g = al.Grid((20, 24), (1.0, 1.0))  # ITK order: x, y
y, x = torch.meshgrid(torch.arange(24.), torch.arange(20.), indexing="ij")
blob = lambda c: torch.exp(-((y - c) ** 2 + (x - 10) ** 2) / 20)[None, None]
al.write_image(al.Image(blob(11), g), r"{tmp_path}/f.nii.gz")
al.write_image(al.Image(blob(12), g), r"{tmp_path}/m.nii.gz")
r = CliRunner().invoke(main, ["register", r"{tmp_path}/f.nii.gz", r"{tmp_path}/m.nii.gz", "-o", r"{tmp_path}/out",
                              "--preset", "rigid", "--quiet", "--no-report", "--device", "cpu"])
assert r.exit_code == 0, r.output
"""
    assert _loaded(code, ON_DEMAND) == ["pydantic", "yaml"]
    assert (tmp_path / "out" / "warped.nii.gz").exists()


@pytest.mark.parametrize("ndim", [2, 3])
def test_a_deformable_registration_loads_the_compiled_loops_in_3d(ndim):
    """A dense velocity squares with airlab.compiled's loops on the CPU in 3D, so numba is
    loaded; in 2D never (PyTorch's 2D sampler is vectorised), nor for a rigid one (above)."""
    code = f"""
import torch, airlab as al
from airlab.registration import Registration, Stage
from airlab.losses import MSE
from airlab.transforms import DenseVelocityField
shape = (12, 14, 10)[:{ndim}]
g = al.Grid(shape[::-1])
mesh = torch.meshgrid(*[torch.arange(float(n)) for n in shape], indexing="ij")
blob = lambda c: al.Image(torch.exp(-sum((m - c) ** 2 for m in mesh) / 10)[None, None], g)
stage = Stage(lambda grid, n: DenseVelocityField(grid, n, exact_gradient=False), [(1.0, MSE())], optimizer="field-adam")
Registration([stage], progress=False)(blob(5.0), blob(5.5))
"""
    assert ("numba" in _loaded(code, ON_DEMAND)) == (ndim == 3)
