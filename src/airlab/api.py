"""``airlab.register``: two images in, a :class:`~airlab.registration.Result` out."""

from __future__ import annotations

__all__ = ["register"]


def register(fixed, moving, preset: str = "diffeomorphic", *, metric: str | None = None, config=None,
             fixed_mask=None, moving_mask=None, device="cpu", seed: int | None = 0, progress: bool = False,
             fixed_points=None, moving_points=None, landmark_weight: float | None = None):
    """Register ``moving`` to ``fixed`` and return the :class:`~airlab.registration.Result`.

    ``fixed``, ``moving`` and the masks may be paths, airlab Images, SimpleITK images or nibabel
    images. ``preset`` and ``metric`` are those of ``airlab register``; ``config`` (a YAML path or
    a :class:`~airlab.pipelines.PipelineConfig`) replaces the preset. ``result.transform`` maps
    fixed to moving physical points; ``result.warp(moving)`` gives the moving image on the fixed
    grid as an Image (``.to_sitk()``, ``.to_nibabel()`` convert it back), and
    ``result.outputs`` holds the warped image, the displacement field and the metrics that
    ``airlab register`` would write. ``fixed_points``/``moving_points`` (landmark files of any
    format :mod:`airlab.landmarks` reads, or ``[P, D]`` arrays in mm, paired by row) pull
    corresponding points together with ``landmark_weight`` (per mm^2; default
    :data:`~airlab.landmarks.LANDMARK_WEIGHT`, 0 only measures them) and put their TRE into
    ``result.outputs.metrics``.
    """
    from .landmarks import LANDMARK_WEIGHT
    from .pipelines import PipelineConfig, load_config
    from .workflows import register_pair

    if config is None:
        pipeline = PipelineConfig(preset=preset).resolve(metric=metric)
    else:
        pipeline = config if isinstance(config, PipelineConfig) else load_config(config)
        pipeline = pipeline.resolve(metric=metric)
    out = register_pair(fixed, moving, pipeline, fixed_mask=fixed_mask, moving_mask=moving_mask, device=device,
                        seed=seed, progress=progress, preset=preset if config is None else None, metric=metric,
                        fixed_points=fixed_points, moving_points=moving_points,
                        landmark_weight=LANDMARK_WEIGHT if landmark_weight is None else landmark_weight)
    out.result.outputs = out
    return out.result
