"""The pyramid: levels sized from the image, and each (shrink, sigma) prepared once per registration."""

import airlab as al
from airlab.pipelines import preset, pyramid

from conftest import quick


def test_stages_share_pyramid_levels(pair, monkeypatch):
    """rigid, affine and the deformable stage start on the same coarse levels: each (shrink,
    sigma) is smoothed and downsampled once per registration, not once per stage."""
    from airlab import pyramid as pyramids

    fixed, moving, _ = pair
    calls = []
    original = pyramids.prepare_level
    monkeypatch.setattr(pyramids, "prepare_level", lambda level, *a: calls.append(level) or original(level, *a))
    stages = preset("bspline", fixed.grid)
    for stage in stages:
        for level in stage.levels:
            level.iterations = 2
    result = quick(stages)(fixed, moving)
    levels = {(lv.shrink, lv.sigma) for stage in stages for lv in stage.levels}
    assert len(result.history) == sum(len(stage.levels) for stage in stages) > len(levels) == len(calls)


def test_pyramid_is_sized_from_the_image():
    small = pyramid(al.Grid((40, 40)), 50)
    large = pyramid(al.Grid((400, 300, 200)), [100, 50, 20])
    assert [lv.shrink for lv in small] == [1]
    assert [lv.shrink for lv in large] == [16, 8, 4, 2, 1]  # coarsest: 25 voxels along x
    assert [lv.iterations for lv in large] == [100, 100, 100, 50, 20]
    assert [lv.sigma for lv in large] == [8.0, 4.0, 2.0, 1.0, 0.0]
