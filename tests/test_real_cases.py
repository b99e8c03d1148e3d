"""The pure helpers of benchmarks/real_cases.py: the rat-lung threshold rule, the slice picking,
the case names. No package data, no registration tool: synthetic images, seconds."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import real_cases  # noqa: E402


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _chest(shape=(96, 96)):
    """Air (dark) around a bright body holding two dark lungs, one with a bright vessel inside."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(float)
    image = np.full(shape, 4.0)
    body = (np.abs(yy - 48) < 44) & (np.abs(xx - 48) < 44)  # most of the field of view, as in a chest scan
    image[body] = 60.0
    lungs = [((yy - 40) / 18) ** 2 + ((xx - 30) / 10) ** 2 < 1, ((yy - 42) / 16) ** 2 + ((xx - 66) / 11) ** 2 < 1]
    lung = lungs[0] | lungs[1]
    image[lung] = 12.0
    vessel = ((yy - 40) ** 2 + (xx - 30) ** 2) < 4
    image[vessel] = 70.0
    image += np.random.default_rng(0).normal(0, 2, shape)
    out = sitk.GetImageFromArray(image.astype(np.float32))
    out.SetSpacing((0.8, 0.8))
    out.SetOrigin((3.0, -2.0))
    return out, lung, body


def test_lung_mask_finds_both_lungs_fills_vessels_and_leaves_the_air_outside():
    image, lung, body = _chest()
    lungs, found_body = real_cases.lung_mask(image)
    a, b = sitk.GetArrayFromImage(lungs).astype(bool), sitk.GetArrayFromImage(found_body).astype(bool)
    assert lungs.GetSpacing() == image.GetSpacing() and lungs.GetOrigin() == image.GetOrigin()
    assert _dice(a, lung) > 0.9
    assert a[40, 30]  # the vessel inside the left lung is filled
    assert not a[2, 2] and not b[2, 2]  # the air around the body is neither lung nor body
    assert _dice(b, body) > 0.95
    assert len(np.unique(sitk.GetArrayFromImage(sitk.ConnectedComponent(lungs)))) == 3  # background + 2 lungs


def test_lung_mask_is_one_rule_independent_of_the_intensity_scale():
    image, _, _ = _chest()
    a = sitk.GetArrayFromImage(real_cases.lung_mask(image)[0])
    b = sitk.GetArrayFromImage(real_cases.lung_mask(image * 3.0)[0])
    assert np.array_equal(a, b)


def _blob_slices(n=7, size=64):
    """2D slices of a 3D pattern whose shape changes from slice to slice."""
    yy, xx = np.mgrid[:size, :size].astype(float)
    out = []
    for k in range(n):
        a = np.exp(-(((yy - 32) / 14) ** 2 + ((xx - 32) / 20) ** 2))
        a += 0.8 * np.exp(-(((yy - 20 - 2 * k) / 5) ** 2 + ((xx - 22 - 2 * k) / 4) ** 2))  # a feature moving with k
        a += 0.6 * np.exp(-(((yy - 44) / 4) ** 2 + ((xx - 44 + 3 * k) / (3 + k)) ** 2))
        image = sitk.GetImageFromArray((100 * a).astype(np.float32))
        out.append(image)
    return out


def test_pick_slice_finds_the_slice_a_moved_copy_came_from():
    candidates = _blob_slices()
    moved = sitk.Resample(candidates[4], candidates[4], sitk.Euler2DTransform((32, 32), 0.05, (2.0, -1.5)),
                          sitk.sitkLinear, 0.0)
    moved.SetOrigin((40.0, -10.0))  # another scanner position
    best, scores = real_cases.pick_slice(candidates, moved)
    assert best == 4
    assert len(scores) == len(candidates) and max(scores) > 0.95


def test_case_names_accept_aliases_and_all():
    assert real_cases.case_names("colin-mni-2mm, ratlung-2d") == ["colin27-mni2", "ratlung-2d"]
    assert real_cases.case_names("all") == real_cases.REAL_CASES
    assert real_cases.case_names("") == []
    with pytest.raises(ValueError, match="unknown real case"):
        real_cases.case_names("nope")
