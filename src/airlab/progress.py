"""Observers of the engine's events: the engine prints nothing itself.

An observer is an :class:`Observer`, which overrides some of ``level_start(info)``,
``iteration(info)`` and ``level_end(info)``; a plain callable given as one of the ``callbacks`` of
:class:`~airlab.registration.Registration` is called with every iteration's dict.
"""

from __future__ import annotations

import sys

__all__ = ["Observer", "Callback", "as_observer", "ProgressBar", "LogLines", "default_progress", "BatchBar", "BatchLines", "batch_progress"]


class Observer:
    """Receives the engine's events; each method does nothing unless overridden. ``info`` holds
    the stage (index and ``stage_name``), the ``level`` and its ``label``; ``level_start`` adds
    ``max_iterations``, ``iteration`` the ``iteration``, ``objective``, ``terms`` and
    ``transform``, ``level_end`` the ``iterations`` run, the last ``objective`` and ``time_s``."""

    def level_start(self, info: dict) -> None:
        pass

    def iteration(self, info: dict) -> None:
        pass

    def level_end(self, info: dict) -> None:
        pass


class Callback(Observer):
    """A plain callable, called with every iteration's dict."""

    def __init__(self, function):
        self.function = function

    def iteration(self, info: dict) -> None:
        self.function(info)


def as_observer(value) -> Observer:
    """An :class:`Observer` as it is, a callable as a :class:`Callback`."""
    if isinstance(value, Observer):
        return value
    if callable(value):
        return Callback(value)
    raise TypeError(f"a callback must be an airlab.progress.Observer or a callable, not {type(value).__name__}")


class ProgressBar(Observer):
    """A tqdm bar per level on a terminal."""

    def __init__(self):
        self._bar = None

    def level_start(self, info: dict) -> None:
        from tqdm.auto import tqdm

        if info["max_iterations"] > 0:
            self._bar = tqdm(total=info["max_iterations"], desc=info["label"], leave=False, dynamic_ncols=True,
                             mininterval=0.5)

    def iteration(self, info: dict) -> None:
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(objective=f"{info['objective']:.5g}", refresh=False)

    def level_end(self, info: dict) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class LogLines(Observer):
    """One line per level on stderr, for logs (a redrawn bar would fill them)."""

    def level_end(self, info: dict) -> None:
        if info["iterations"]:
            print(f"{info['label']}: {info['iterations']} iterations, objective {info['objective']:.5g}, "
                  f"{info['time_s']:.1f} s", file=sys.stderr, flush=True)


def default_progress():
    """A bar on a terminal, a line per level otherwise."""
    return ProgressBar() if sys.stderr.isatty() else LogLines()


class BatchBar:
    """Pairs of a batch on a terminal: one bar with pairs done and failed, and the ETA."""

    def start(self, total: int, finished: int) -> None:
        from tqdm.auto import tqdm

        self._failed = 0
        self._bar = tqdm(total=total, initial=finished, desc="pairs", unit="pair", dynamic_ncols=True)
        self._bar.set_postfix(failed=0, refresh=False)

    def pair_done(self, row: dict) -> None:
        self._failed += row["status"] != "done"
        self._bar.set_postfix(failed=self._failed, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


class BatchLines:
    """Pairs of a batch in logs: one line per pair."""

    def start(self, total: int, finished: int) -> None:
        self._total, self._count = total, finished
        if finished:
            print(f"airlab batch: {finished} of {total} pairs finished earlier; skipped", file=sys.stderr, flush=True)

    def pair_done(self, row: dict) -> None:
        self._count += 1
        what = f"failed: {row['error']}" if row["status"] != "done" else f"done in {row.get('wall_time_s') or '?'} s"
        print(f"airlab batch: [{self._count}/{self._total}] {row['id']} {what}", file=sys.stderr, flush=True)


def batch_progress():
    """A bar on a terminal, a line per pair otherwise."""
    return BatchBar() if sys.stderr.isatty() else BatchLines()
