"""workflows/staging.py: outputs appear whole, only on success, metrics.json last, and nothing of
the user's is overwritten or removed."""

import shutil

import pytest

from airlab.errors import OutputExistsError
from airlab.workflows.staging import staged_output

NAMES = ["warped.nii.gz", "metrics.json", "transform.tfm"]


def _write_all(stage, names=NAMES):
    for name in names:
        (stage / name).write_text(name, encoding="utf-8")


def _leftovers(folder):
    return sorted(p.name for p in folder.glob(".airlab-*"))


def test_on_success_the_files_appear_and_metrics_json_moves_last(tmp_path, monkeypatch):
    moved = []
    real_move = shutil.move
    monkeypatch.setattr(shutil, "move", lambda src, dst: moved.append(dst) or real_move(src, dst))
    out = tmp_path / "out"
    with staged_output(out, NAMES, overwrite=False) as stage:
        assert stage.parent == tmp_path and not out.exists()  # written beside the output, not into it
        _write_all(stage)
    assert sorted(p.name for p in out.iterdir()) == sorted(NAMES)
    assert (out / "transform.tfm").read_text(encoding="utf-8") == "transform.tfm"
    assert moved[-1].endswith("metrics.json")  # a folder holding metrics.json is complete
    assert _leftovers(tmp_path) == []


def test_an_output_whose_parents_do_not_exist_yet_is_created(tmp_path):
    out = tmp_path / "new" / "out"
    with staged_output(out, NAMES, overwrite=False) as stage:
        _write_all(stage)
    assert sorted(p.name for p in out.iterdir()) == sorted(NAMES)
    assert not stage.exists()  # staged in the system's temporary folder, removed afterwards


def test_a_failure_leaves_no_output_and_no_staging_folder(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="half way"):
        with staged_output(out, NAMES, overwrite=False) as stage:
            _write_all(stage, NAMES[:1])
            raise RuntimeError("half way")
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_existing_outputs_are_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("mine", encoding="utf-8")
    with pytest.raises(OutputExistsError, match="already holds metrics.json; pass --overwrite"):
        with staged_output(out, NAMES, overwrite=False):
            pytest.fail("the body must not run")
    assert (out / "metrics.json").read_text(encoding="utf-8") == "mine"
    assert _leftovers(tmp_path) == []


def test_overwrite_replaces_only_the_named_outputs(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("old", encoding="utf-8")
    (out / "notes.txt").write_text("the user's", encoding="utf-8")
    with staged_output(out, NAMES, overwrite=True) as stage:
        _write_all(stage, ["metrics.json"])  # an output this run does not write is left as it was
    assert (out / "metrics.json").read_text(encoding="utf-8") == "metrics.json"
    assert (out / "notes.txt").read_text(encoding="utf-8") == "the user's"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "notes.txt"]


def test_a_file_where_the_folder_should_be_is_refused(tmp_path):
    out = tmp_path / "out"
    out.write_text("a file", encoding="utf-8")
    with pytest.raises(OutputExistsError, match="is not a folder"):
        with staged_output(out, NAMES, overwrite=True):
            pytest.fail("the body must not run")
    assert out.read_text(encoding="utf-8") == "a file"
