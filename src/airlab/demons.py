"""Diffeomorphic demons (Vercauteren et al., NeuroImage 2009), Gaussian-regularised.

Each iteration computes the demons force (the symmetric, ESM variant), smooths it (fluid-like
regularisation), composes the current transform with the exponential of the update (so the
result stays diffeomorphic) and smooths the displacement (diffusion-like regularisation).
It is an optimiser of its own, not a gradient method, so it lives beside the engine and
returns the same :class:`~airlab.registration.Result`.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from .filters import gaussian_smooth, spatial_gradient
from .image import Image
from .errors import InputError, RegistrationError
from .graph import combine_edge_weights, displacement_edge_weights, edge_weights, graph_diffusion
from .inputs import check_contrast, check_image, check_pair_geometry, normalise as normalise_intensities
from .pyramid import Level, prepare_level
from .registration import Result
from .spatial import Grid, sample
from .transforms import Composite, DisplacementField, Transform
from .transforms.dense import compose_displacements
from .transforms.velocity import exponential

__all__ = ["demons"]


def _upsample(field: torch.Tensor, old: Grid, new: Grid) -> torch.Tensor:
    return sample(field, old, new.points(field.dtype, field.device), "linear", outside=None)


def demons(
    fixed: Image,
    moving: Image,
    *,
    levels: Sequence[Level] = (Level(4, 4.0, 60), Level(2, 2.0, 40), Level(1, 0.0, 30)),
    sigma_fluid: float = 1.0,
    sigma_diffusion: float = 1.5,
    max_step: float = 0.5,
    initial: Transform | None = None,
    normalise: bool = True,
    tolerance: float = 1e-4,
    regulariser: str = "gaussian",
    edge_scale: float = 10.0,
    edges: str = "image",
    displacement_edge_scale: float = 1.0,
) -> Result:
    """Register ``moving`` to ``fixed`` with diffeomorphic demons.

    Args:
        levels: pyramid (``shrink``, ``sigma`` mm, ``iterations``), coarse to fine.
        sigma_fluid, sigma_diffusion: Gaussian widths (voxels of the level) applied to each update
            and to the accumulated displacement.
        max_step: largest update per iteration, in voxels of the level.
        initial: a transform applied after the demons field (typically an affine from a previous
            registration), kept fixed.
        tolerance: stop a level when the mean squared difference improves by less than this
            (relative) over 10 iterations.
        regulariser: how the displacement is smoothed after each update: ``"gaussian"``
            (``sigma_diffusion``), or ``"graph"``: diffusion on the voxel graph for the same time
            (:mod:`airlab.graph`), whose edges weigh ``exp(-edge_scale |fixed_a - fixed_b|)``
            (normalised intensities), so motion does not diffuse across the fixed image's edges
            (sliding organs).
        edges: for ``regulariser="graph"``, what weakens an edge: ``"image"`` (the fixed image's
            intensity step), ``"displacement"`` (the step of the current displacement, weight
            ``exp(-|u_a - u_b|^2 / displacement_edge_scale^2)``, mm; recomputed every iteration)
            or ``"both"`` (the product).

    Returns a :class:`Result` whose transform is ``Composite(field, initial)`` (or the field).
    """
    start = time.perf_counter()
    if regulariser not in ("gaussian", "graph"):
        raise InputError(f"unknown demons regulariser {regulariser!r}; choose 'gaussian' or 'graph'")
    if edges not in ("image", "displacement", "both"):
        raise InputError(f"unknown demons edges {edges!r}; choose 'image', 'displacement' or 'both'")
    if edges != "image" and regulariser != "graph":
        raise InputError(f"edges={edges!r} needs regulariser='graph' (a Gaussian has no edges)")
    if not displacement_edge_scale > 0:
        raise InputError(f"displacement_edge_scale must be > 0 mm, got {displacement_edge_scale}")
    if fixed.ndim != moving.ndim:
        raise RegistrationError(f"cannot register a {moving.ndim}D moving image to a {fixed.ndim}D fixed image")
    check_pair_geometry(fixed.grid, moving.grid)
    check_image(fixed, "fixed")
    check_image(moving, "moving")
    dtype = torch.float32
    f = fixed.data.to(dtype)
    m = moving.data.to(dtype)
    check_contrast(f, None, "fixed")
    check_contrast(m, None, "moving")
    if normalise:
        f, m = normalise_intensities(f, None), normalise_intensities(m, None)
    batch = max(f.shape[0], m.shape[0])
    if initial is not None:
        initial = initial.to(dtype)
    field, grid = None, None
    history = []
    for li, level in enumerate(levels):
        data = prepare_level(level, f, fixed.grid, None, m, moving.grid, None)
        g = data.grid
        if field is None:
            field = torch.zeros(batch, g.ndim, *g.shape, dtype=dtype, device=f.device)
        else:
            field = _upsample(field, grid, g)
        grid = g
        points = g.points(dtype, f.device)
        voxel = min(g.spacing)
        grad_f = spatial_gradient(data.fixed, g)  # [N, C*D, ...] -> we use single-channel mean
        if regulariser == "graph":
            image_edges = edge_weights(data.fixed, g, edge_scale) if edges != "displacement" else None
            diffusion_time = (sigma_diffusion * voxel) ** 2 / 2  # the heat kernel of that Gaussian
        values = []
        level_start = time.perf_counter()
        for it in range(level.iterations):
            with torch.no_grad():
                y = points + torch.movedim(field, 1, -1)
                if initial is not None:
                    y = initial(y)
                warped = sample(data.moving, data.moving_grid, y, "linear", outside=None)
                diff = (data.fixed - warped).mean(1, keepdim=True)  # channels averaged
                mse = float(diff.square().mean())
                values.append(mse)
                if len(values) > 10 and values[-11] - mse <= tolerance * values[-11]:
                    break
                j = 0.5 * (grad_f + spatial_gradient(warped, g))
                j = j.view(j.shape[0], -1, g.ndim, *g.shape).mean(1)  # [N, D, ...]
                # demons force bounded by max_step: |u| <= sigma_x / 2 with sigma_x = 2 max_step
                sx2 = (2 * max_step * voxel) ** 2
                denom = j.square().sum(1, keepdim=True) + diff.square() / sx2
                update = torch.where(denom > 1e-12, diff * j / denom.clamp_min(1e-12), torch.zeros_like(j))
                update = gaussian_smooth(update, sigma_fluid) if sigma_fluid > 0 else update
                step = exponential(update, g, steps=4)
                field = compose_displacements(step, field, g)
                if sigma_diffusion > 0 and regulariser == "graph":
                    # displacement edges follow the field the update has just changed
                    weights = image_edges if edges == "image" else displacement_edge_weights(
                        field, g, displacement_edge_scale)
                    if edges == "both":
                        weights = combine_edge_weights(image_edges, weights)
                    field = graph_diffusion(field, weights, g, diffusion_time)
                elif sigma_diffusion > 0:
                    field = gaussian_smooth(field, sigma_diffusion)
        history.append({"stage": "demons", "level": li, "shrink": level.shrink, "sigma_mm": level.sigma,
                        "grid_size": list(g.size), "iterations": len(values), "objective": values,
                        "time_s": round(time.perf_counter() - level_start, 3)})
    result_field = DisplacementField(grid, batch, field)
    transform: Transform = result_field if initial is None else Composite(result_field, initial)
    if not grid.same_as(fixed.grid):  # the finest level was coarser than the image
        full = _upsample(field, grid, fixed.grid)
        result_field = DisplacementField(fixed.grid, batch, full)
        transform = result_field if initial is None else Composite(result_field, initial)
    for p in transform.parameters():
        p.requires_grad_(False)
    return Result(transform, [result_field], history, time.perf_counter() - start, fixed.grid)
