"""Batch manifests: every problem is found before any pair starts, as one line naming the row."""

import subprocess
import sys

import pytest

from airlab.errors import ManifestError
from airlab.workflows.manifest import glob_pairs, read_manifest


@pytest.fixture
def files(tmp_path):
    for name in ("f.nii.gz", "a.nii.gz", "b.nii.gz", "fl.nii.gz", "al.nii.gz"):
        (tmp_path / name).write_bytes(b"")  # only existence is checked here
    return tmp_path


def write(folder, text):
    path = folder / "m.csv"
    path.write_text(text)
    return path


def test_reads_rows_with_optional_columns_relative_to_the_manifest(files, tmp_path):
    path = write(files, "id,fixed,moving,fixed_labels,moving_labels\n"
                        "s1,f.nii.gz,a.nii.gz,fl.nii.gz,al.nii.gz\n\n s2 ,f.nii.gz,b.nii.gz,,\n")
    pairs = read_manifest(path, moving_mask=files / "a.nii.gz")
    assert [p.id for p in pairs] == ["s1", "s2"]
    assert pairs[0].fixed == files / "f.nii.gz" and pairs[0].labelled and not pairs[1].labelled
    assert pairs[1].moving_mask == files / "a.nii.gz" and pairs[1].fixed_mask is None


@pytest.mark.parametrize("text, message", [
    ("id,fixed\ns1,f.nii.gz\n", "row 1: missing column(s) moving"),
    ("id,fixed,moving,extra\ns1,f.nii.gz,a.nii.gz,x\n", "row 1: unknown column(s) extra"),
    ("id,fixed,moving\ns1,f.nii.gz,a.nii.gz\ns1,f.nii.gz,b.nii.gz\n", "row 3: duplicate id 's1'"),
    ("id,fixed,moving\ns1,f.nii.gz,a.nii.gz\ns2,f.nii.gz,missing.nii.gz\n",
     "row 3: moving missing.nii.gz does not exist"),
    ("id,fixed,moving\n,f.nii.gz,a.nii.gz\n", "row 2: the id is empty"),
    ("id,fixed,moving\n../up,f.nii.gz,a.nii.gz\n", "row 2: id '../up' is not a plain folder name"),
    ("id,fixed,moving\nresults.csv,f.nii.gz,a.nii.gz\n", "row 2: id 'results.csv' is not a plain folder name"),
    ("id,fixed,moving\ns1,,a.nii.gz\n", "row 2: no fixed image"),
    ("id,fixed,moving,fixed_labels\ns1,f.nii.gz,a.nii.gz,fl.nii.gz\n", "row 2: fixed_labels and moving_labels go"),
    ("id,fixed,moving\n", "no pairs"),
])
def test_bad_manifests_name_the_row(files, text, message):
    with pytest.raises(ManifestError) as info:
        read_manifest(write(files, text))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_glob_ids_are_file_names_and_the_template_is_left_out(files):
    pairs = glob_pairs(files / "f.nii.gz", str(files / "*.nii.gz"))
    assert [p.id for p in pairs] == ["a", "al", "b", "fl"]
    with pytest.raises(ManifestError, match="matches no file"):
        glob_pairs(files / "f.nii.gz", str(files / "*.mha"))
    (files / "a.nii").write_bytes(b"")
    with pytest.raises(ManifestError, match="duplicate id 'a'"):
        glob_pairs(files / "f.nii.gz", str(files / "a.*"))


def test_the_command_refuses_a_bad_manifest_with_exit_2_and_creates_nothing(files):
    path = write(files, "id,fixed,moving\ns1,f.nii.gz,a.nii.gz\ns1,f.nii.gz,b.nii.gz\n")
    out = files / "out"
    done = subprocess.run([sys.executable, "-m", "airlab", "batch", str(path), "-o", str(out)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "row 3: duplicate id 's1'" in done.stderr
    assert not out.exists()


def test_the_python_api_checks_its_pairs_before_creating_anything(files):
    from airlab import batch

    pairs = [batch.Pair("s1", files / "f.nii.gz", files / "a.nii.gz"),
             batch.Pair("s1", files / "f.nii.gz", files / "b.nii.gz")]
    with pytest.raises(ManifestError, match=r"pair 2 \('s1'\): duplicate id"):
        batch.run(pairs, files / "out")
    with pytest.raises(ManifestError, match="moving .*nope.nii.gz does not exist"):
        batch.run([batch.Pair("s1", files / "f.nii.gz", files / "nope.nii.gz")], files / "out")
    with pytest.raises(ManifestError, match="--batch-size and --workers >= 1"):
        batch.run([batch.Pair("s1", files / "f.nii.gz", files / "a.nii.gz")], files / "out", batch_size=0, workers=2)
    assert not (files / "out").exists()


def test_an_outroot_with_a_results_table_airlab_did_not_write_is_refused(files):
    from airlab import batch
    from airlab.errors import OutputExistsError

    (files / "out").mkdir()
    (files / "out" / "results.csv").write_text("subject,score\n")
    with pytest.raises(OutputExistsError, match="was not written by airlab batch"):
        batch.run([batch.Pair("s1", files / "f.nii.gz", files / "a.nii.gz")], files / "out")
    assert sorted(p.name for p in (files / "out").iterdir()) == ["results.csv"]
    assert (files / "out" / "results.csv").read_text(encoding="utf-8") == "subject,score\n"
