"""progress.py: observers receive the engine's events in order (a plain callable as a Callback),
and the progress shown in logs is one line per level or per pair."""

import pytest

from airlab.losses import MSE
from airlab.progress import BatchLines, Callback, LogLines, Observer, ProgressBar, as_observer
from airlab.registration import Level, Registration, Stage
from airlab.transforms import Affine


class Events(Observer):
    def __init__(self):
        self.seen = []

    def level_start(self, info):
        self.seen.append(("start", info["level"]))

    def iteration(self, info):
        self.seen.append(("iteration", info["iteration"]))

    def level_end(self, info):
        self.seen.append(("end", info["iterations"]))


def test_every_iteration_event_arrives_in_order(pair):
    fixed, moving, _ = pair
    stages = [Stage(lambda g, n: Affine(2, n), losses=[(1.0, MSE())], levels=[Level(4, 2, 11), Level(2, 1, 5)],
                    tolerance=0.0)]
    events = Events()
    Registration(stages, progress=False, callbacks=[events], check_every=4).run(fixed, moving)
    expected = [("start", 0), *[("iteration", i) for i in range(11)], ("end", 11),
                ("start", 1), *[("iteration", i) for i in range(5)], ("end", 5)]
    assert events.seen == expected


def test_a_callback_must_be_an_observer_or_callable():
    with pytest.raises(TypeError, match="Observer or a callable"):
        Registration([Stage(lambda g, n: Affine(2, n), losses=[(1.0, MSE())])], callbacks=[42])


def test_a_plain_callable_is_wrapped_as_a_callback_of_iterations_only():
    seen = []
    observer = as_observer(seen.append)
    assert isinstance(observer, Callback)
    observer.level_start({"level": 0})
    observer.iteration({"iteration": 3})
    observer.level_end({"iterations": 4})
    assert seen == [{"iteration": 3}]
    events = Events()
    assert as_observer(events) is events


def test_a_callback_sees_each_iteration_with_the_transform(pair):
    fixed, moving, _ = pair
    seen = []
    stages = [Stage(lambda g, n: Affine(2, n), losses=[(1.0, MSE())], levels=[Level(2, 1, 6)], tolerance=0.0)]
    result = Registration(stages, progress=False, callbacks=[seen.append]).run(fixed, moving)
    assert [s["iteration"] for s in seen] == list(range(6))
    assert {"stage", "level", "label", "objective", "terms", "transform"} <= set(seen[0])
    assert seen[-1]["objective"] < seen[0]["objective"]  # MSE falls on the 2D pair
    assert result.history[0]["iterations"] == 6


def test_log_lines_are_one_per_level_that_ran(capsys):
    lines = LogLines()
    lines.level_start({"max_iterations": 5, "label": "affine, level 1/2"})
    lines.iteration({"iteration": 0, "objective": 1.0})
    lines.level_end({"label": "affine, level 1/2", "iterations": 5, "objective": 0.123456789, "time_s": 2.04})
    lines.level_end({"label": "affine, level 2/2", "iterations": 0, "objective": 0.1, "time_s": 0.0})
    assert capsys.readouterr().err == "affine, level 1/2: 5 iterations, objective 0.12346, 2.0 s\n"


def test_the_bar_is_closed_at_the_end_of_each_level(capsys):
    bar = ProgressBar()
    bar.level_start({"max_iterations": 0, "label": "none"})
    assert bar._bar is None  # a level with no iterations shows no bar
    bar.level_start({"max_iterations": 3, "label": "level 1"})
    for i in range(3):
        bar.iteration({"iteration": i, "objective": 1.0 / (i + 1)})
    assert bar._bar.n == 3
    bar.level_end({"iterations": 3})
    assert bar._bar is None


def test_batch_lines_count_pairs_and_say_which_failed(capsys):
    lines = BatchLines()
    lines.start(3, 1)
    lines.pair_done({"id": "b", "status": "done", "wall_time_s": 1.5})
    lines.pair_done({"id": "c", "status": "failed", "error": "moving.nii.gz: no such file"})
    assert capsys.readouterr().err.splitlines() == [
        "airlab batch: 1 of 3 pairs finished earlier; skipped",
        "airlab batch: [2/3] b done in 1.5 s",
        "airlab batch: [3/3] c failed: moving.nii.gz: no such file",
    ]
