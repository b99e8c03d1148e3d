"""Image-adaptive diffusion of a displacement on the voxel graph (AirLab's
GraphDiffusionRegulariser): ``u <- exp(-t L) u`` per component, with ``L`` the weighted graph
Laplacian of the grid's face neighbours.

Edge weights ``exp(-scale |I_a - I_b|)`` follow an image: the displacement diffuses freely
inside a structure and hardly across its boundary, so organs can slide along each other (lung
against chest wall) where a Gaussian would blur their motions together. With all weights 1,
``exp(-t L)`` is the heat kernel: a Gaussian of variance ``2t`` mm² (up to discretisation), so
``t = sigma_mm**2 / 2`` compares with Gaussian smoothing of ``sigma_mm``.

``exp(-t L) u`` is computed matrix-free by the Lanczos method (``L`` is symmetric): ``m``
products with ``L`` build a Krylov basis ``V`` and a tridiagonal ``T``, and
``exp(-t L) u ~ |u| V exp(-t T) e_1``, which converges fast once ``m`` exceeds ``t |L|``.
"""

from __future__ import annotations

import torch

from .errors import InputError
from .spatial import Grid

__all__ = ["edge_weights", "laplacian", "graph_diffusion", "displacement_edge_weights", "combine_edge_weights"]


def _axis(d: int, a: int) -> int:
    return -1 - a  # ITK axis a is tensor axis -1 - a


def edge_weights(image: torch.Tensor, grid: Grid, scale: float = 10.0) -> list[torch.Tensor]:
    """Per ITK axis ``a``, the weights ``exp(-scale |I(i+1) - I(i)|)`` of the edges between
    neighbours along it, ``[N, *shape]`` one shorter along that axis; channels are averaged.
    ``scale`` is per unit of intensity (airlab's engine normalises images to about 0..1)."""
    if image.dim() != grid.ndim + 2:
        raise InputError(f"image of shape {tuple(image.shape)} is not [N, C, *{grid.shape}]")
    if scale < 0:
        raise InputError(f"the edge scale must be >= 0, got {scale}")
    data = image.mean(1)
    return [torch.exp(-scale * data.diff(dim=_axis(grid.ndim, a)).abs()) for a in range(grid.ndim)]


def laplacian(field: torch.Tensor, weights: list[torch.Tensor], grid: Grid) -> torch.Tensor:
    """``L u`` for ``field [N, C, *shape]``: ``sum_a sum_neighbours w (u_i - u_j) / h_a^2``
    (mm^-2; positive semi-definite; no flux across the grid's border)."""
    out = torch.zeros_like(field)
    for a, w in enumerate(weights):
        axis = _axis(grid.ndim, a)
        flux = w.unsqueeze(1) * field.diff(dim=axis) / grid.spacing[a] ** 2  # w (u_{i+1} - u_i)
        n = field.shape[axis]
        out.narrow(axis, 0, n - 1).sub_(flux)
        out.narrow(axis, 1, n - 1).add_(flux)
    return out


def graph_diffusion(field: torch.Tensor, weights: list[torch.Tensor], grid: Grid, time: float,
                    krylov: int = 30) -> torch.Tensor:
    """``exp(-time L) field`` for ``field [N, C, *shape]`` (each batch element and channel
    separately; ``weights`` from :func:`edge_weights`, batch 1 or N). ``time`` in mm²."""
    if time < 0:
        raise InputError(f"the diffusion time must be >= 0, got {time}")
    if time == 0:
        return field
    shape = field.shape
    norm = field.flatten(2).norm(dim=-1)  # [N, C]
    safe = norm.clamp_min(torch.finfo(field.dtype).tiny)
    v = field / safe.view(*norm.shape, *[1] * grid.ndim)
    basis, alphas, betas = [v], [], []
    previous, beta = torch.zeros_like(v), None
    for j in range(krylov):
        w = laplacian(v, weights, grid)
        alpha = (w * v).flatten(2).sum(-1)
        w = w - alpha.view(*alpha.shape, *[1] * grid.ndim) * v
        if beta is not None:
            w = w - beta.view(*beta.shape, *[1] * grid.ndim) * previous
        alphas.append(alpha)
        beta = w.flatten(2).norm(dim=-1)
        if j == krylov - 1 or float(beta.max()) < 1e-7 * float(alpha.abs().max().clamp_min(1e-30)):
            break  # the Krylov space is invariant (or big enough): T is exact on it
        betas.append(beta)
        previous, v = v, w / beta.clamp_min(torch.finfo(field.dtype).tiny).view(*beta.shape, *[1] * grid.ndim)
        basis.append(v)
    m = len(alphas)
    t = torch.diag_embed(torch.stack(alphas, -1))
    if m > 1:
        off = torch.stack(betas[: m - 1], -1)
        t = t + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    coeff = torch.linalg.matrix_exp(-time * t.double())[..., :, 0].to(field.dtype)  # [N, C, m]
    out = sum(coeff[..., k].view(*norm.shape, *[1] * grid.ndim) * basis[k] for k in range(m))
    return (out * norm.view(*norm.shape, *[1] * grid.ndim)).reshape(shape)


def displacement_edge_weights(displacement: torch.Tensor, grid: Grid, scale: float = 1.0) -> list[torch.Tensor]:
    """Per ITK axis ``a``, ``exp(-|u(i+1) - u(i)|^2 / scale^2)`` of the edges along it (``u`` and
    ``scale`` in mm), ``[N, *shape]`` one shorter along that axis (AirLab's
    ``EdgeUpdaterDisplacementIntensities``): where neighbours already move apart (a sliding
    interface the force has found), the edge weakens and diffusion stops blurring the two motions.
    """
    if displacement.dim() != grid.ndim + 2 or displacement.shape[1] != grid.ndim \
            or tuple(displacement.shape[2:]) != grid.shape:
        raise InputError(f"displacement of shape {tuple(displacement.shape)} is not [N, {grid.ndim}, *{grid.shape}]")
    if not scale > 0:
        raise InputError(f"the displacement edge scale must be > 0 mm, got {scale}")
    return [torch.exp(-displacement.diff(dim=_axis(grid.ndim, a)).square().sum(1) / scale**2)
            for a in range(grid.ndim)]


def combine_edge_weights(*weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """The product, axis by axis, of edge weights from :func:`edge_weights` and
    :func:`displacement_edge_weights`: an edge is open only where every criterion leaves it open."""
    out = list(weights[0])
    for more in weights[1:]:
        out = [w * v for w, v in zip(out, more)]
    return out
