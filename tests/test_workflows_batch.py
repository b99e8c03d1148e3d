"""`airlab batch` end to end on small real 2D pairs: the MNI slice at 3 mm and copies of it
deformed by known, seeded deformations; locally, in device batches, and on a real Dask
LocalCluster (2 worker processes)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import airlab as al
from airlab.datasets import example_path
from airlab.synthetic import random_deformation

REGISTER_FILES = ["affine.txt", "displacement.nii.gz", "inverse_displacement.nii.gz", "metrics.json", "report.html",
                  "report.png", "warped.nii.gz"]


def labels_of(image):
    return al.Image((image.data > 60).to(torch.int16) + (image.data > 120).to(torch.int16), image.grid)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """fixed.nii.gz (+ labels), m0..m5 (+ labels) deformed copies, nan.mha (a broken moving image)."""
    root = tmp_path_factory.mktemp("pairs")
    full = al.read_image(example_path("mni152_t1_1mm_axial")).to(torch.float32)
    grid = full.grid.with_spacing(3.0)
    with torch.no_grad():
        fixed = al.resample(full, grid)
    al.write_image(fixed, root / "fixed.nii.gz")
    al.write_image(labels_of(fixed), root / "fixed_labels.nii.gz")
    for i in range(6):
        deformation = random_deformation(grid, i, max_displacement=5.0)
        with torch.no_grad():
            al.write_image(al.resample(fixed, grid, deformation), root / f"m{i}.nii.gz")
            al.write_image(al.resample(labels_of(fixed), grid, deformation), root / f"m{i}_labels.nii.gz")
    broken = fixed.data[0, 0].numpy().copy()
    broken[10:20, 10:20] = np.nan
    image = sitk.GetImageFromArray(broken)
    image.CopyInformation(fixed.to_sitk())
    sitk.WriteImage(image, str(root / "nan.mha"))  # NIfTI would not keep the NaNs
    (root / "corrupt.nii.gz").write_bytes(b"not an image")
    return root


def manifest(data, ids, name="manifest.csv", broken=()):
    rows = ["id,fixed,moving,fixed_labels,moving_labels"]
    rows += [f"p{i},fixed.nii.gz,m{i}.nii.gz,fixed_labels.nii.gz,m{i}_labels.nii.gz" for i in ids]
    rows += [f"{b},fixed.nii.gz,{'corrupt.nii.gz' if b == 'corrupt' else 'nan.mha'},," for b in broken]
    (data / name).write_text("\n".join(rows) + "\n")
    return data / name


def airlab(*args, env=None):
    done = subprocess.run([sys.executable, "-m", "airlab", "batch", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env)
    return done.returncode, done.stdout, done.stderr


def results(outroot):
    with open(outroot / "results.csv", newline="") as f:
        return {row["id"]: row for row in csv.DictReader(f)}


def dice_before(data, pair_id):
    from airlab.evaluate import dice

    fixed = al.read_image(data / "fixed_labels.nii.gz").data[0, 0].numpy()
    moving = al.read_image(data / f"m{pair_id[1:]}_labels.nii.gz").data[0, 0].numpy()
    return dice(moving, fixed)["mean"]


def stamps(outroot, ids):
    return {i: (outroot / i / "metrics.json").stat().st_mtime_ns for i in ids}


def test_a_broken_pair_fails_alone_and_a_rerun_registers_nothing_twice(data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")  # never touched
    code, stdout, err = airlab(manifest(data, [0, 1], broken=["bad", "corrupt"]), "-o", out, "--preset", "affine",
                               "--retries", "0")
    assert code == 1, err
    rows = results(out)
    assert [rows[i]["status"] for i in ("p0", "p1", "bad", "corrupt")] == ["done", "done", "failed", "failed"]
    assert "NaN" in rows["bad"]["error"] and "bad failed" in err and "\n" not in rows["bad"]["error"]
    assert "corrupt.nii.gz" in rows["corrupt"]["error"] and "Traceback" not in err
    assert "[1/4] p0 done in" in err and "[3/4] bad failed: " in err  # one line per pair in logs
    for i in ("p0", "p1"):
        assert sorted(p.name for p in (out / i).iterdir()) == REGISTER_FILES  # exactly register's files
        assert float(rows[i]["dice_mean"]) > dice_before(data, i) + 0.05 and float(rows[i]["hd95_mm_mean"]) >= 0
        assert rows[i]["device"] == "cpu" and float(rows[i]["final_objective"]) > 0 and rows[i]["resumed"] == "False"
        assert float(rows[i]["folding_percent"]) == 0 and float(rows[i]["sdlogj"]) >= 0
    assert not (out / "bad").exists()
    page = (out / "index.html").read_text(encoding="utf-8")
    assert 'href="p0/report.html"' in page and 'src="p1/report.png"' in page and "<script>" in page
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "notes.txt", "p0", "p1", "results.csv"]
    before = stamps(out, ["p0", "p1"])
    code, _, err = airlab(manifest(data, [0, 1, 2], broken=["bad", "corrupt"]), "-o", out, "--preset", "affine",
                          "--retries", "0")
    assert code == 1
    rows = results(out)
    assert stamps(out, ["p0", "p1"]) == before  # finished pairs were not registered again
    assert rows["p0"]["resumed"] == "True" and rows["p2"]["status"] == "done" and rows["p2"]["resumed"] == "False"
    assert (out / "notes.txt").read_text(encoding="utf-8") == "the user's"


def test_resume_after_the_run_is_killed(data, tmp_path):
    out = tmp_path / "out"
    ids = [0, 1, 2, 3, 4, 5]
    args = [sys.executable, "-m", "airlab", "batch", manifest(data, ids, "six.csv"), "-o", out, "--preset", "affine",
            "--no-report", "--quiet"]
    run = subprocess.Popen(list(map(str, args)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (out / "p0" / "metrics.json").exists():
            assert run.poll() is None and time.monotonic() < deadline, "the batch ended before its first pair"
            time.sleep(0.02)
    finally:
        run.kill()  # SIGKILL: no clean-up of any kind
        run.wait()
    finished = [f"p{i}" for i in ids if (out / f"p{i}" / "metrics.json").exists()]
    assert len(finished) < len(ids), "the run finished before it was killed: nothing to resume"
    before = stamps(out, finished)
    code, _, err = airlab(data / "six.csv", "-o", out, "--preset", "affine",
                          "--no-report", "--quiet")
    assert code == 0, err
    rows = results(out)
    assert all(rows[f"p{i}"]["status"] == "done" for i in ids)
    assert stamps(out, finished) == before
    assert {i for i, r in rows.items() if r["resumed"] == "True"} == set(finished)
    assert not list(out.glob(".airlab-*"))  # the killed run's staging folder was cleared
    for i in ids:
        assert (out / f"p{i}" / "displacement.nii.gz").exists()


def test_on_a_local_dask_cluster_a_broken_pair_fails_alone(data, tmp_path):
    out = tmp_path / "out"
    code, _, err = airlab(manifest(data, [0, 1, 2], "dask.csv", broken=["bad"]), "-o", out, "--preset", "affine",
                          "--cluster", "local:2", "--retries", "1", "--no-report")
    assert code == 1, err
    rows = results(out)
    assert [rows[f"p{i}"]["status"] for i in range(3)] == ["done"] * 3
    assert rows["bad"]["status"] == "failed" and "NaN" in rows["bad"]["error"]
    assert "Traceback" not in err  # the workers' logs stay quiet; the error is one line
    assert sorted(p.name for p in (out / "p1").iterdir()) == sorted(set(REGISTER_FILES) - {"report.html", "report.png"})


@pytest.fixture(scope="module")
def cluster():
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as local:
        with Client(local) as client:
            yield local, client


def test_a_worker_killed_during_a_pair_is_retried_elsewhere(data, tmp_path, cluster):
    local, client = cluster
    out = tmp_path / "out"
    ids = [0, 1, 2, 3]
    run = subprocess.Popen([sys.executable, "-m", "airlab", "batch", str(manifest(data, ids, "kill.csv")), "-o",
                            str(out), "--preset", "affine", "--no-report", "--quiet", "--retries", "0",
                            "--scheduler", local.scheduler_address], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and run.poll() is None and time.monotonic() < deadline:
        for worker, keys in client.processing().items():
            running = [k for k in keys if str(k).startswith("airlab-batch-")]
            if running:
                pid = client.run(os.getpid, workers=[worker])[worker]
                os.kill(pid, signal.SIGKILL)  # the worker process dies mid-pair, as if the node were lost
                killed = (worker, running[0])
                break
        time.sleep(0.01)
    _, err = run.communicate(timeout=600)
    assert killed is not None, "no pair was seen running on a worker"
    assert run.returncode == 0, err
    rows = results(out)
    assert all(rows[f"p{i}"]["status"] == "done" for i in ids)
    assert killed[0] not in client.scheduler_info()["workers"]  # that worker is gone; another finished its pair
    story = client.run_on_scheduler(lambda dask_scheduler: [t[2] for t in dask_scheduler.story(killed[1])])
    assert story.count("processing") >= 2  # the pair the dead worker held was given to a worker again
    for i in ids:
        assert json.loads((out / f"p{i}" / "metrics.json").read_text(encoding="utf-8"))["batch_id"] == f"p{i}"


def test_on_dask_the_parent_process_never_imports_torch(data, tmp_path, cluster):
    """The parent only validates the pipeline and sends it: importing the engine there was
    about 1.2 s of every Dask run's start-up (issue 14). The workers register the pairs."""
    local, _ = cluster
    out = tmp_path / "out"
    args = ["batch", str(manifest(data, [0, 1], "parent.csv")), "-o", str(out), "--preset", "diffeomorphic",
            "--metric", "lncc", "--quiet", "--scheduler", local.scheduler_address]
    code = ("import atexit, sys; atexit.register(lambda: print('torch imported:', 'torch' in sys.modules)); "
            f"sys.argv = ['airlab', *{args!r}]; from airlab.cli import run; run()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "torch imported: False" in done.stdout
    rows = results(out)
    assert [rows[i]["status"] for i in ("p0", "p1")] == ["done", "done"]
    assert (out / "p0" / "report.html").exists()


def test_python_api_with_a_client(data, tmp_path, cluster):
    from airlab import batch

    _, client = cluster
    summary = batch.run(manifest(data, [0, 1], "api.csv"), tmp_path / "out", preset="affine", report=False,
                        client=client)
    assert summary.done == 2 and not summary.failed
    assert summary.results.exists() and summary.index.exists()
    again = batch.run(data / "api.csv", tmp_path / "out", preset="affine", report=False, client=client)
    assert all(r["resumed"] for r in again.rows)


def test_device_batches_match_pairs_run_alone_and_a_bad_pair_drops_out_of_its_batch(data, tmp_path):
    from airlab import batch

    together = batch.run(manifest(data, [0, 1, 2], "batched.csv", broken=["bad"]), tmp_path / "together",
                         preset="affine", batch_size=2, retries=0)  # batches: [p0, p1], [p2, bad]
    alone = batch.run(manifest(data, [0, 1], "alone.csv"), tmp_path / "alone", preset="affine", report=False)
    rows = {r["id"]: r for r in together.rows}
    assert [rows[i]["status"] for i in ("p0", "p1", "p2", "bad")] == ["done", "done", "done", "failed"]
    assert [rows[i]["batch_size"] for i in ("p0", "p1", "p2")] == [2, 2, 1]  # p2 was retried on its own
    for i, row in zip(("p0", "p1"), alone.rows):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "together" / i / "displacement.nii.gz")))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "alone" / i / "displacement.nii.gz")))
        assert np.abs(a - b).max() < 1e-3 * np.abs(b).max()  # a batch behaves like separate runs
        assert float(rows[i]["final_objective"]) == pytest.approx(float(row["final_objective"]), rel=1e-3)
        assert sorted(p.name for p in (tmp_path / "together" / i).iterdir()) == REGISTER_FILES
        metrics = json.loads((tmp_path / "together" / i / "metrics.json").read_text(encoding="utf-8"))
        assert metrics["batch"]["size"] == 2 and metrics["moving"].endswith(f"m{i[1:]}.nii.gz")
        single = json.loads((tmp_path / "alone" / i / "metrics.json").read_text(encoding="utf-8"))
        assert metrics["inverse_consistency_mm"]["mean"] == pytest.approx(single["inverse_consistency_mm"]["mean"],
                                                                          rel=0.05, abs=1e-4)


def test_device_batches_on_dask_workers_match_pairs_alone_and_a_bad_pair_drops_out(data, tmp_path, cluster):
    from airlab import batch

    _, client = cluster
    together = batch.run(manifest(data, [0, 1, 2], "dask-batched.csv", broken=["bad"]), tmp_path / "together",
                         preset="affine", report=False, batch_size=2, retries=0, client=client)
    alone = batch.run(manifest(data, [0], "dask-alone.csv"), tmp_path / "alone", preset="affine", report=False)
    rows = {r["id"]: r for r in together.rows}
    assert [rows[i]["status"] for i in ("p0", "p1", "p2", "bad")] == ["done", "done", "done", "failed"]
    assert "NaN" in rows["bad"]["error"]
    assert [rows[i]["batch_size"] for i in ("p0", "p1", "p2")] == [2, 2, 1]  # [p0, p1] and [p2, bad], p2 again alone
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "together" / "p0" / "displacement.nii.gz")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "alone" / "p0" / "displacement.nii.gz")))
    assert np.abs(a - b).max() < 1e-3 * np.abs(b).max()
    assert float(rows["p0"]["final_objective"]) == pytest.approx(float(alone.rows[0]["final_objective"]), rel=1e-3)
    assert sorted(p.name for p in (tmp_path / "together" / "p1").iterdir()) == sorted(
        set(REGISTER_FILES) - {"report.html", "report.png"})
    again = batch.run(data / "dask-batched.csv", tmp_path / "together", preset="affine", report=False, batch_size=2,
                      retries=0, client=client)
    assert [r["resumed"] for r in again.rows] == [True, True, True, False]  # only the bad pair ran again


def test_cluster_and_batch_size_give_every_worker_a_batch(data, tmp_path):
    out = tmp_path / "out"
    code, _, err = airlab(manifest(data, [0, 1, 2, 3], "dask-split.csv"), "-o", out, "--preset", "affine",
                          "--cluster", "local:2", "--batch-size", "8", "--no-report", "--quiet")
    assert code == 0, err
    rows = results(out)
    assert [rows[f"p{i}"]["status"] for i in range(4)] == ["done"] * 4
    # one batch of 4 would leave the second worker idle: two batches of 2
    assert [int(rows[f"p{i}"]["batch_size"]) for i in range(4)] == [2, 2, 2, 2]
    metrics = [json.loads((out / f"p{i}" / "metrics.json").read_text(encoding="utf-8")) for i in range(4)]
    assert [m["batch"]["index"] for m in metrics] == [0, 1, 0, 1]


def test_the_workers_airlab_starts_keep_glibcs_adaptive_malloc(monkeypatch):
    """Dask's default MALLOC_TRIM_THRESHOLD_ made a 2 mm registration take 1.85x the CPU time;
    a value the user set themselves is still passed on."""
    from airlab.workflows.batch import open_client

    def threshold():
        return os.environ.get("MALLOC_TRIM_THRESHOLD_")

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    for mine in (None, "131072"):
        if mine is not None:
            monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", mine)
        client, to_close = open_client(cluster="local:1")
        try:
            assert list(client.run(threshold).values()) == [mine]
        finally:
            for thing in to_close:
                thing.close()


def test_open_client_runs_in_process_uses_a_given_client_and_refuses_a_bad_cluster():
    from airlab.errors import ManifestError
    from airlab.workflows.batch import open_client

    assert open_client() == (None, [])  # one worker, no scheduler: the pairs run in this process
    mine = object()
    assert open_client(mine, workers=4) == (mine, [])  # the caller's client: theirs to close
    for bad in ("remote:2", "local:0", "local:x"):
        with pytest.raises(ManifestError, match="local:N"):
            open_client(cluster=bad)


def test_a_batch_that_runs_out_of_memory_is_split(data, tmp_path, monkeypatch):
    """Simulated: a device that holds two pairs at a time (a real one needs a GPU's worth of data)."""
    from airlab import batch
    from airlab.registration import Registration

    real = Registration.run

    def small_device(self, fixed, moving, **kwargs):
        if moving.data.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, fixed, moving, **kwargs)

    monkeypatch.setattr(Registration, "run", small_device)
    summary = batch.run(manifest(data, [0, 1, 2, 3], "oom.csv"), tmp_path / "out", preset="affine", report=False,
                        batch_size=4, retries=0)
    assert summary.done == 4 and [r["batch_size"] for r in summary.rows] == [2, 2, 2, 2]


def test_a_hundred_registrations_in_one_process_keep_peak_memory_flat(data, tmp_path):
    """What a long-lived worker does: pair after pair in one process. A leak (a cache keyed by
    image, outputs kept alive, a growing history) would raise the peak pair after pair: keeping
    each pair's outputs alive raised it by 28 MiB over these 90 pairs; without, 1.5 MiB."""
    import resource

    from airlab.pipelines import load_config
    from airlab.workflows.batch import Settings, run_pairs
    from airlab.workflows.manifest import Pair

    config = tmp_path / "quick.yaml"
    config.write_text("stages:\n"
                      "  - {name: rigid, transform: rigid, losses: [{name: ncc}], iterations: [20], lr: 0.5}\n")
    pairs = [Pair(f"r{n:03d}", data / "fixed.nii.gz", data / f"m{n % 6}.nii.gz", None, None,
                  data / "fixed_labels.nii.gz", data / f"m{n % 6}_labels.nii.gz") for n in range(100)]
    peaks = []

    class Peak:
        def start(self, total, finished):
            pass

        def pair_done(self, row):
            assert row["status"] == "done", row["error"]
            peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # MiB

    run_pairs(pairs, tmp_path / "out", Settings(load_config(config).resolve(), report=False), progress=Peak())
    assert len(peaks) == 100
    assert peaks[-1] - peaks[9] < 8.0, f"peak RSS grew from {peaks[9]:.1f} to {peaks[-1]:.1f} MiB"


def test_template_and_glob_from_the_command_line(data, tmp_path):
    from click.testing import CliRunner

    from airlab import cli

    (tmp_path / "in").mkdir()
    for i in (0, 1):
        (tmp_path / "in" / f"s{i}.nii.gz").write_bytes((data / f"m{i}.nii.gz").read_bytes())
    done = CliRunner().invoke(cli.main, ["batch", "--fixed", str(data / "fixed.nii.gz"), "--moving",
                                         str(tmp_path / "in" / "*.nii.gz"), "-o", str(tmp_path / "out"),
                                         "--preset", "rigid", "--no-report"])
    assert done.exit_code == 0, done.output
    assert "2 of 2 pairs done, 0 failed" in done.output
    assert set(results(tmp_path / "out")) == {"s0", "s1"}


def test_batch_takes_every_register_option():
    from click.testing import CliRunner

    from airlab import cli

    # landmarks are per pair (files that would be manifest columns), not yet taken by batch
    per_pair = {"fixed_points", "moving_points", "landmark_weight"}
    register = {p.name for p in cli.register.params} - {"fixed", "moving", "outdir"} - per_pair
    batch = {p.name for p in cli.batch.params}
    assert register <= batch
    text = CliRunner().invoke(cli.main, ["batch", "--help"]).output
    for option in ("--batch-size", "--workers", "--retries", "--scheduler", "--cluster", "--fixed", "--moving"):
        assert option in text


def test_a_users_file_in_a_pair_folder_stops_that_pair_and_is_kept(data, tmp_path):
    from airlab import batch

    (tmp_path / "out" / "p0").mkdir(parents=True)
    (tmp_path / "out" / "p0" / "warped.nii.gz").write_bytes(b"mine")
    summary = batch.run(manifest(data, [0, 1], "kept.csv"), tmp_path / "out", preset="rigid", report=False)
    rows = {r["id"]: r for r in summary.rows}
    assert rows["p1"]["status"] == "done" and rows["p0"]["status"] == "failed"
    assert "warped.nii.gz" in rows["p0"]["error"] and "--overwrite" in rows["p0"]["error"]
    assert sorted(p.name for p in (tmp_path / "out" / "p0").iterdir()) == ["warped.nii.gz"]
    assert (tmp_path / "out" / "p0" / "warped.nii.gz").read_bytes() == b"mine"
    again = batch.run(data / "kept.csv", tmp_path / "out", preset="rigid", report=False, overwrite=True)
    assert again.done == 2 and (tmp_path / "out" / "p0" / "metrics.json").exists()


def test_workers_run_the_pairs_in_local_processes(data, tmp_path):
    from airlab import batch

    summary = batch.run(manifest(data, [0, 1], "workers.csv"), tmp_path / "out", preset="rigid", report=False,
                        workers=2)
    assert summary.done == 2 and not summary.failed
