"""``airlab.register``: two images in, a :class:`~airlab.registration.Result` out."""

from __future__ import annotations

__all__ = ["register"]


def register(fixed, moving, preset: str = "diffeomorphic", *, metric: str | None = None, config=None,
             fixed_mask=None, moving_mask=None, device="cpu", seed: int | None = 0, progress: bool = False):
    """Register ``moving`` to ``fixed`` and return the :class:`~airlab.registration.Result`.

    ``fixed``, ``moving`` and the masks may be paths, airlab Images, SimpleITK images or nibabel
    images. ``preset`` and ``metric`` are those of ``airlab register``; ``config`` (a YAML path or
    a :class:`~airlab.pipelines.PipelineConfig`) replaces the preset. ``result.transform`` maps
    fixed to moving physical points; ``result.warp(moving)`` gives the moving image on the fixed
    grid as an Image (``.to_sitk()``, ``.to_nibabel()`` convert it back), and
    ``result.outputs`` holds the warped image, the displacement field and the metrics that
    ``airlab register`` would write.
    """
    from .pipelines import PipelineConfig, load_config
    from .workflows import register_pair

    if config is None:
        pipeline = PipelineConfig(preset=preset).resolve(metric=metric)
    else:
        pipeline = config if isinstance(config, PipelineConfig) else load_config(config)
        pipeline = pipeline.resolve(metric=metric)
    out = register_pair(fixed, moving, pipeline, fixed_mask=fixed_mask, moving_mask=moving_mask, device=device,
                        seed=seed, progress=progress, preset=preset if config is None else None, metric=metric)
    out.result.outputs = out
    return out.result
