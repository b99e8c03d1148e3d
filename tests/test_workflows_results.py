"""A finished pair's row: what metrics.json holds and what the files give agree."""

from __future__ import annotations

import json

import torch

import airlab as al
from airlab.evaluate import jacobian_stats
from airlab.pipelines import PipelineConfig
from airlab.transforms import read_displacement_field
from airlab.workflows.manifest import Pair
from airlab.workflows.pairwise import register_files
from airlab.workflows.results import measure


def test_the_row_takes_the_jacobian_from_metrics_as_the_field_gives_it(pair, tmp_path):
    fixed, moving, _ = pair
    al.write_image(fixed, tmp_path / "fixed.nii.gz")
    al.write_image(moving, tmp_path / "moving.nii.gz")
    folder = tmp_path / "out" / "p"
    register_files(tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz", folder,
                   PipelineConfig(preset="diffeomorphic"), report=False)
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    field = read_displacement_field(folder / "displacement.nii.gz", dtype=torch.float64)
    assert metrics["jacobian"] == jacobian_stats(field.field.detach()[0].numpy(), field.grid)
    p = Pair("p", tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz")
    row = measure(p, folder)
    del metrics["jacobian"]  # a folder written before metrics.json held it
    (folder / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    older = measure(p, folder)
    assert row == older and float(row["sdlogj"]) > 0
