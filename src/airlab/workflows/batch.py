"""Many pairs: ``airlab batch`` on one device or on a Dask cluster.

Every pair goes through the pairwise workflow (``register_files``, or ``register_batch`` and
``write_files`` for a device batch), so ``OUTROOT/ID/`` holds exactly what ``airlab register``
writes, staged: all of it or nothing. A pair folder holding metrics.json is finished (the
staging moves it last), so a rerun of the same command skips it and registers the rest. A pair
that fails is recorded with its one-line error and retried ``retries`` times; the others go on.

Where pairs run:
- locally, one after the other, or ``batch_size`` same-grid pairs at a time through the
  engine's batch dimension (a batch that runs out of memory is split in two and retried; a
  batch that fails otherwise is retried pair by pair, so one bad pair does not sink the rest);
- on Dask (``client``, ``scheduler`` address, ``cluster="local:N"``, or ``workers=K`` local
  processes): one task per pair, submitted with Dask's ``retries`` (a worker that dies takes
  its task with it; the scheduler gives it to another worker); with ``batch_size`` > 1, one task
  per device batch, which its worker runs as the local runner does (splitting, pair-by-pair
  retries), so a worker's reports and files are written while the others register.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AirlabError, ManifestError
from ..pipelines import PipelineConfig
from .manifest import Pair, check_pairs, glob_pairs, read_manifest
from .results import check_outroot, failed_row, measure, write_index, write_results

__all__ = ["Settings", "Summary", "run", "run_pairs", "open_client", "register_one", "register_group", "one_line"]


@dataclass(frozen=True)
class Settings:
    """What every pair runs with; it pickles, so Dask workers get it as it is."""

    pipeline: PipelineConfig
    preset: str | None = None
    metric: str | None = None
    seed: int | None = 0
    device: str = "auto"
    report: bool = True
    record: dict | None = None
    overwrite: bool = False  # replace airlab-named files in an unfinished pair's folder


@dataclass
class Summary:
    """The rows of results.csv, in manifest order, and where the files are."""

    rows: list[dict]
    outroot: Path
    results: Path = None
    index: Path = None
    failed: list[dict] = field(default_factory=list)

    @property
    def done(self) -> int:
        return sum(r["status"] == "done" for r in self.rows)


def one_line(exc: BaseException) -> str:
    """An error as one line for results.csv: airlab's own message, or the type and message."""
    torch = sys.modules.get("torch")  # an error of torch's was raised (or unpickled) with torch imported

    text = " ".join(str(exc).split())
    if isinstance(exc, MemoryError) or torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return f"out of memory ({text or type(exc).__name__})"
    if isinstance(exc, AirlabError):
        return text
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _finished(folder: Path) -> bool:
    return (folder / "metrics.json").is_file()


def register_one(pair: Pair, outroot, settings: Settings) -> dict:
    """Register one pair into ``OUTROOT/ID/`` and return its row; what a Dask task runs.

    A finished pair never gets here. Files named like airlab's outputs in the folder of an
    unfinished one (a run killed while it moved them into place, or the user's own) stop the
    pair unless ``settings.overwrite``; nothing else in the folder is ever touched."""
    from .pairwise import register_files  # the engine: in the worker, not in a Dask run's parent

    folder = Path(outroot) / pair.id
    record = {**(settings.record or {}), "batch_id": pair.id}
    try:
        register_files(pair.fixed, pair.moving, folder, settings.pipeline, fixed_mask=pair.fixed_mask,
                       moving_mask=pair.moving_mask, device=_device(settings.device), seed=settings.seed,
                       progress=False, report=settings.report, overwrite=settings.overwrite,
                       preset=settings.preset, metric=settings.metric, record=record)
    finally:
        _release_device()
    return measure(pair, folder)


def _release_device() -> None:
    """Give the GPU's cached memory back between pairs and batches: a long-lived worker would
    otherwise hold the largest pair's worth, and other processes share the device."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _register_group(pairs: list[Pair], outroot: Path, settings: Settings) -> list[dict]:
    """Register same-grid pairs in one engine run and write each pair's folder."""
    from .pairwise import register_batch, write_files

    start = time.perf_counter()
    device = _device(settings.device)
    try:
        outputs = register_batch([p.fixed for p in pairs], [p.moving for p in pairs], settings.pipeline,
                                 fixed_masks=[p.fixed_mask for p in pairs], moving_masks=[p.moving_mask for p in pairs],
                                 device=device, seed=settings.seed, preset=settings.preset, metric=settings.metric)
        for pair, out in zip(pairs, outputs):
            out.metrics.update({**(settings.record or {}), "batch_id": pair.id, "fixed": str(pair.fixed),
                                "moving": str(pair.moving), "fixed_mask": _str(pair.fixed_mask),
                                "moving_mask": _str(pair.moving_mask)})
            write_files(out, outroot / pair.id, report=settings.report, overwrite=settings.overwrite,
                        started=start)
        del outputs
    finally:
        _release_device()
    return [measure(p, outroot / p.id) for p in pairs]


def _str(path):
    return None if path is None else str(path)


def _grid_key(path: Path | None):
    """The grid of an image from its header alone (no voxels read), to group pairs."""
    if path is None:
        return None
    import SimpleITK as sitk

    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
    except RuntimeError:
        return ("unreadable", str(path))  # alone in its group: the registration reports why
    rounded = lambda v: tuple(round(x, 5) for x in v)  # noqa: E731
    return (reader.GetSize(), rounded(reader.GetSpacing()), rounded(reader.GetOrigin()),
            rounded(reader.GetDirection()), reader.GetNumberOfComponents())


def _groups(pairs: list[Pair], size: int, parts: int = 1) -> list[list[Pair]]:
    """Pairs whose fixed images share a grid, whose moving images share a grid and which have
    the same masks or none, in chunks of ``size`` (manifest order within a group), or smaller
    chunks where that gives each of ``parts`` workers one (8 pairs, size 8, 2 workers: 4 + 4)."""
    if size <= 1:
        return [[p] for p in pairs]
    keyed: dict = {}
    for p in pairs:
        key = (_grid_key(p.fixed), _grid_key(p.moving), _grid_key(p.fixed_mask), _grid_key(p.moving_mask))
        keyed.setdefault(key, []).append(p)
    chunks = []
    for group in keyed.values():
        step = max(1, min(size, -(-len(group) // parts)))
        chunks += [group[i:i + step] for i in range(0, len(group), step)]
    return chunks


class _Tally:
    """Collects rows, rewrites results.csv and index.html, and tells the progress observer."""

    def __init__(self, pairs, outroot, rows, progress):
        self.pairs, self.outroot, self.rows, self.progress = pairs, outroot, rows, progress

    def add(self, row: dict) -> None:
        row.setdefault("resumed", False)
        self.rows[row["id"]] = row
        ordered = [self.rows[p.id] for p in self.pairs if p.id in self.rows]
        write_results(self.outroot, ordered)
        write_index(self.outroot, ordered)
        if self.progress is not None:
            self.progress.pair_done(row)


def _attempts(pair: Pair, outroot: Path, settings: Settings, retries: int) -> dict:
    error = ""
    for _ in range(retries + 1):
        try:
            return register_one(pair, outroot, settings)
        except Exception as exc:  # noqa: BLE001 - recorded, and the other pairs go on
            error = one_line(exc)
    return failed_row(pair, error)


def _run_local(todo, outroot, settings, retries, batch_size, tally) -> None:
    import torch

    queue = _groups(todo, batch_size)
    while queue:
        group = queue.pop(0)
        if len(group) == 1:
            tally.add(_attempts(group[0], outroot, settings, retries))
            continue
        try:
            rows = _register_group(group, outroot, settings)
        except (MemoryError, torch.OutOfMemoryError):
            half = len(group) // 2  # a batch too large for the device: smaller ones
            queue[:0] = [group[:half], group[half:]]
            continue
        except Exception:  # noqa: BLE001 - one bad pair must not sink its batch: retry them one by one
            queue[:0] = [[p] for p in group if not _finished(outroot / p.id)]
            for p in group:
                if _finished(outroot / p.id):
                    tally.add(measure(p, outroot / p.id))
            continue
        for row in rows:
            tally.add(row)


def open_client(client=None, scheduler=None, cluster=None, workers=1):
    """The Dask client a run uses, and the things to close when it ends.

    ``client``: a ``dask.distributed.Client`` the caller holds (used as it is, nothing to close);
    ``scheduler``: a scheduler's address to connect to; ``cluster``: ``"local:N"``, N worker
    processes started here; ``workers``: more than 1 also starts a local cluster of that many.
    Returns ``(client, to_close)``: ``client`` is ``None`` when the pairs run in this process;
    call ``close()`` on each item of ``to_close`` (in order) when done. Raises ``ManifestError``
    when Dask is needed but not installed, or for a ``cluster`` that is not ``local:N``.
    """
    if client is not None:
        return client, []
    if scheduler is None and cluster is None and workers <= 1:
        return None, []
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise ManifestError("running on Dask needs dask.distributed: pip install 'airlab[dask]'") from None
    if scheduler is not None:
        client = Client(scheduler)
        return client, [client]
    if cluster is not None:
        kind, _, count = str(cluster).partition(":")
        if kind != "local" or not count.isdigit() or int(count) < 1:
            raise ManifestError(f"--cluster {cluster}: expected local:N (N worker processes)")
        workers = int(count)
    # one task per worker process at a time; torch inside each uses its share of the cores
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    # Dask's nanny gives workers MALLOC_TRIM_THRESHOLD_=65536 (to return memory to the system);
    # setting it at all turns off glibc's adaptive mmap threshold, so every tensor over 128 KiB is
    # mapped and unmapped at each operation: a 2 mm registration took 1.85x the CPU time (system
    # time 0.5 -> 5.0 s, 13x the page faults). A value the user set themselves still applies.
    import dask

    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        # silence_logs: a failed pair is one line in results.csv, not a worker's traceback on stderr
        local = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                             silence_logs=logging.CRITICAL,
                             env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
    client = Client(local)
    return client, [client, local]


def register_group(pairs: list[Pair], outroot, settings: Settings, retries: int = 0) -> list[dict]:
    """Register same-grid ``pairs`` as one device batch (as the local runner does: a batch out of
    memory is split, a failing one retried pair by pair) and return their rows; a Dask task."""
    outroot = Path(outroot)
    # a group given again after its worker died may hold pairs that worker finished
    rows = [measure(p, outroot / p.id) for p in pairs if _finished(outroot / p.id)]
    todo = [p for p in pairs if not _finished(outroot / p.id)]
    _run_local(todo, outroot, settings, retries, len(pairs), _Rows(rows))
    return rows


class _Rows:
    """The tally of a worker's group: the rows go back to the client, which writes the tables."""

    def __init__(self, rows: list):
        self.add = rows.append


def _run_dask(client, todo, outroot, settings, retries, batch_size, tally) -> None:
    from dask.distributed import as_completed

    futures = {}
    if batch_size > 1:
        workers = max(1, len(client.scheduler_info().get("workers", {})))
        for group in _groups(todo, batch_size, workers):
            # retries inside the task (pair by pair), not Dask's, which would rerun the whole batch
            future = client.submit(register_group, group, str(outroot), settings, retries, pure=False,
                                   key=f"airlab-batch-{group[0].id}+{len(group) - 1}-{os.getpid()}-{time.time_ns()}")
            futures[future] = group
    else:
        for pair in todo:
            # pure=False: a rerun must run again, not fetch an earlier result by key
            future = client.submit(register_one, pair, str(outroot), settings, retries=retries, pure=False,
                                   key=f"airlab-batch-{pair.id}-{os.getpid()}-{time.time_ns()}")
            futures[future] = [pair]
    for future in as_completed(futures):
        pairs = futures[future]
        try:
            rows = future.result()
            rows = rows if isinstance(rows, list) else [rows]
        except Exception as exc:  # noqa: BLE001 - recorded, and the other pairs go on
            rows = [failed_row(pair, one_line(exc)) for pair in pairs]
        for row in rows:
            tally.add(row)
        future.release()


def run_pairs(pairs: list[Pair], outroot, settings: Settings, *, retries: int = 0, batch_size: int = 1,
              workers: int = 1, client=None, scheduler: str | None = None, cluster: str | None = None,
              progress=None) -> Summary:
    """Register ``pairs`` into ``outroot`` (see the module's docstring); finished pairs are
    skipped. ``progress``: an object with ``start(total, finished)`` and ``pair_done(row)``."""
    outroot = Path(outroot)
    check_pairs(pairs)
    if retries < 0 or batch_size < 1 or workers < 1:
        raise ManifestError("--retries must be >= 0, --batch-size and --workers >= 1")
    if outroot.exists() and not outroot.is_dir():
        raise ManifestError(f"output {outroot} exists and is not a folder")
    check_outroot(outroot)
    outroot.mkdir(parents=True, exist_ok=True)
    for stale in outroot.glob(".airlab-*"):  # staging left by an interrupted run: never a finished pair
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    rows: dict[str, dict] = {}
    finished = [p for p in pairs if _finished(outroot / p.id)]
    todo = [p for p in pairs if not _finished(outroot / p.id)]
    tally = _Tally(pairs, outroot, rows, None)
    if progress is not None:
        progress.start(len(pairs), len(finished))
    for pair in finished:  # the rows of pairs finished earlier are measured again from their files
        try:
            tally.add({**measure(pair, outroot / pair.id), "resumed": True})
        except Exception as exc:  # noqa: BLE001
            tally.add(failed_row(pair, f"finished earlier, but its outputs cannot be read: {one_line(exc)}"))
    tally.progress = progress
    dask_client, to_close = open_client(client, scheduler, cluster, workers)
    try:
        if dask_client is None:
            _run_local(todo, outroot, settings, retries, batch_size, tally)
        else:
            _run_dask(dask_client, todo, outroot, settings, retries, batch_size, tally)
    finally:
        for thing in to_close:
            thing.close()
        if progress is not None and hasattr(progress, "close"):
            progress.close()
    ordered = [rows[p.id] for p in pairs]
    return Summary(ordered, outroot, write_results(outroot, ordered), write_index(outroot, ordered),
                   [r for r in ordered if r["status"] != "done"])


def run(manifest, outroot, *, fixed=None, preset: str | None = "diffeomorphic", metric: str | None = None, config=None,
        fixed_mask=None, moving_mask=None, device: str = "auto", seed: int | None = 0, report: bool = True,
        overwrite: bool = False, retries: int = 0, batch_size: int = 1, workers: int = 1, client=None,
        scheduler: str | None = None, cluster: str | None = None, progress=None) -> Summary:
    """Register every pair of ``manifest`` into ``outroot``; the Python face of ``airlab batch``.

    ``manifest``: a CSV path (``id,fixed,moving[,fixed_mask,moving_mask,fixed_labels,moving_labels]``),
    a list of :class:`~airlab.workflows.manifest.Pair`, or, with ``fixed=``, a glob of moving
    images. ``preset``, ``metric``, ``config``, masks, ``device``, ``seed`` are those of
    :func:`airlab.register`; ``client`` is a ``dask.distributed.Client`` (or ``scheduler``, an
    address, or ``cluster="local:N"``). Returns a :class:`Summary`; failed pairs are in
    ``summary.failed`` (nothing is raised for them)."""
    from ..pipelines import load_config

    if fixed is not None:
        pairs = glob_pairs(fixed, str(manifest), fixed_mask=fixed_mask, moving_mask=moving_mask)
    elif isinstance(manifest, (str, os.PathLike)):
        pairs = read_manifest(manifest, fixed_mask=fixed_mask, moving_mask=moving_mask)
    else:
        pairs = list(manifest)
    if config is None:
        pipeline = PipelineConfig(preset=preset).resolve(metric=metric)
    else:
        pipeline = (config if isinstance(config, PipelineConfig) else load_config(config)).resolve(metric=metric)
        preset = None
    settings = Settings(pipeline, preset, metric, seed, device, report, overwrite=overwrite)
    return run_pairs(pairs, outroot, settings, retries=retries, batch_size=batch_size, workers=workers, client=client,
                     scheduler=scheduler, cluster=cluster, progress=progress)
