"""Regularisers: exact values on analytic fields over oblique grids, gradients, batches."""

import numpy as np
import pytest
import torch

from airlab import Grid
from airlab.regularisers import (
    REGULARISERS,
    BendingEnergy,
    Diffusion,
    JacobianFolding,
    ParameterNorm,
    Sparsity,
    TotalVariation,
    TotalVariationL1,
    bending_energy,
    diffusion,
    folding_penalty,
    hessian,
    index_gradient,
    jacobian,
    jacobian_determinant,
    parameter_norm,
    sparsity,
    total_variation,
    total_variation_l1,
)
from airlab.filters import physical_gradient

from conftest import oblique_grid, smooth_field

FUNCTIONS = {
    "jacobian": jacobian,
    "hessian": hessian,
    "determinant": jacobian_determinant,
    "diffusion": diffusion,
    "bending": bending_energy,
    "tv": lambda u, g: total_variation(u, g, eps=0.1),
    "tv-l1": total_variation_l1,
    "sparsity": sparsity,
    "folding": lambda u, g: folding_penalty(u, g, threshold=1.0),
}


def _grid(d, rng, small=False):
    if small:
        return oblique_grid(d, rng, size=(4, 3, 3)[:d] if d == 3 else (5, 4))
    return oblique_grid(d, rng, size=(9, 8, 7)[:d] if d == 3 else (12, 10))


def _field_from(grid, fn):
    """Displacement ``[1, D, *shape]`` of ``fn(points [..., D]) -> [..., D]`` (mm)."""
    x = grid.points(dtype=torch.float64)
    return torch.movedim(fn(x - torch.as_tensor(grid.center())), -1, 1)


@pytest.mark.parametrize("shape", [(3,), (6, 3), (5, 4, 7)])
def test_index_gradient_is_torch_gradient_of_second_order(shape):
    x = torch.randn(2, 3, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for dim in range(2, x.dim()):
        for spacing in (1.0, 0.7):
            expected = torch.gradient(x, spacing=spacing, dim=dim, edge_order=2)[0]
            torch.testing.assert_close(index_gradient(x, dim, spacing), expected, rtol=0, atol=1e-12)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: index_gradient(v, x.dim() - 1, 0.7), (x,))


@pytest.mark.parametrize("edge_order", [1, 2])
@pytest.mark.parametrize("n", [2, 3, 4, 9])
def test_differences_and_their_written_adjoint_against_autograd_of_the_padded_form(edge_order, n):
    """index_gradient's backward is the difference operator's adjoint, written out: gradcheck,
    and the same numbers as autograd through the padded form it replaced, down to the shortest
    axes (where the end taps overlap)."""
    if n <= edge_order:
        with pytest.raises(ValueError, match="need"):
            index_gradient(torch.zeros(1, 1, n), 2, edge_order=edge_order)
        return
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(2, 3, n, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    g = torch.randn(2, 3, n, 5, dtype=torch.float64, generator=gen)

    def padded(v, dim=2, spacing=0.7):
        m = v.shape[dim]
        x0, x1, y0, y1 = v.narrow(dim, 0, 1), v.narrow(dim, 1, 1), v.narrow(dim, m - 1, 1), v.narrow(dim, m - 2, 1)
        if edge_order == 1:
            before, after = 2 * x0 - x1, 2 * y0 - y1
        else:
            before, after = 3 * (x0 - x1) + v.narrow(dim, 2, 1), 3 * (y0 - y1) + v.narrow(dim, m - 3, 1)
        p = torch.cat((before, v, after), dim)
        return (p.narrow(dim, 2, m) - p.narrow(dim, 0, m)) * (0.5 / spacing)

    ours = index_gradient(x, 2, 0.7, edge_order)
    assert torch.equal(ours, padded(x))
    (mine,) = torch.autograd.grad(ours, x, g)
    (theirs,) = torch.autograd.grad(padded(x), x, g)
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-14)
    assert torch.autograd.gradcheck(lambda v: index_gradient(v, 2, 0.7, edge_order), (x,))


@pytest.mark.parametrize("rotate", [False, True])
def test_physical_gradient_stacks_the_axes_with_their_gradients(rotate, rng):
    grid = _grid(3, rng)
    u = torch.randn(1, 3, *grid.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3),
                    requires_grad=True)
    got = physical_gradient(u, grid, rotate)
    spacing = grid.spacing if not rotate else (1.0, 1.0, 1.0)
    by_axis = torch.stack([index_gradient(u, 4 - a, float(spacing[a])) for a in range(3)], dim=2)
    if rotate:
        m_inv = torch.as_tensor(grid.physical_to_index_matrix()[:3, :3], dtype=u.dtype)
        by_axis = torch.einsum("nca...,aj->ncj...", by_axis, m_inv)
    assert torch.equal(got, by_axis)
    assert torch.autograd.gradcheck(lambda v: physical_gradient(v, grid, rotate)[..., 1:3, :2, :], (u,))


@pytest.mark.parametrize("d", [2, 3])
def test_affine_field_is_differentiated_exactly(d, rng):
    grid = _grid(d, rng)
    a = torch.as_tensor(rng.normal(size=(d, d)) * 0.2)
    b = torch.as_tensor(rng.normal(size=d))
    u = _field_from(grid, lambda x: x @ a.T + b)

    jac = jacobian(u, grid)
    assert jac.shape == (1, d, d, *grid.shape)
    expected = a.reshape(1, d, d, *([1] * d)).expand_as(jac)
    torch.testing.assert_close(jac, expected, rtol=0, atol=1e-10)  # borders included
    torch.testing.assert_close(bending_energy(u, grid), torch.zeros(1, dtype=u.dtype), rtol=0, atol=1e-18)
    frobenius = (a**2).sum()
    torch.testing.assert_close(diffusion(u, grid), frobenius.reshape(1))
    torch.testing.assert_close(total_variation(u, grid, eps=0.5), torch.sqrt(frobenius + 0.25).reshape(1))
    det = jacobian_determinant(u, grid)
    assert det.shape == (1, *grid.shape)
    torch.testing.assert_close(det, torch.linalg.det(torch.eye(d, dtype=a.dtype) + a).expand_as(det))


@pytest.mark.parametrize("d", [2, 3])
def test_quadratic_field_has_exact_bending_energy(d, rng):
    # second-order differences (one-sided at the borders) are exact for quadratics everywhere
    grid = _grid(d, rng)
    q = rng.normal(size=(d, d, d)) * 0.01
    q = torch.as_tensor(q + q.transpose(0, 2, 1))  # u_i = x^T Q_i x / 2, Hessian of u_i is Q_i
    u = _field_from(grid, lambda x: 0.5 * torch.einsum("...j,ijk,...k->...i", x, q, x))

    h = hessian(u, grid)
    torch.testing.assert_close(h, q.reshape(1, d, d, d, *([1] * d)).expand_as(h), rtol=0, atol=1e-9)
    torch.testing.assert_close(bending_energy(u, grid), (q**2).sum().reshape(1), rtol=1e-7, atol=0)


@pytest.mark.parametrize("d", [2, 3])
def test_folding_penalty(d, rng):
    grid = _grid(d, rng)
    smooth = smooth_field(grid, rng, batch=2, magnitude=0.5)
    assert (jacobian_determinant(smooth, grid) > 0).all()
    assert (folding_penalty(smooth, grid) == 0).all()
    assert (folding_penalty(smooth, grid, threshold=2.0) > 0).all()

    # u_x = -2 x flips the x axis: det(I + J) = -1 everywhere, penalty (0 - (-1))^2 = 1
    flip = torch.zeros(d, d, dtype=torch.float64)
    flip[0, 0] = -2.0
    u = _field_from(grid, lambda x: x @ flip.T)
    torch.testing.assert_close(folding_penalty(u, grid), torch.ones(1, dtype=u.dtype))

    # a narrow, strong bump folds locally
    sigma = 2.0 * max(grid.spacing)
    gauss = lambda x: torch.exp(-(x**2).sum(-1, keepdim=True) / (2 * sigma**2))  # noqa: E731
    bump = _field_from(grid, lambda x: 3 * sigma * gauss(x) * torch.ones(d))
    det = jacobian_determinant(bump, grid)
    assert (det <= 0).any() and (det > 0).any()
    assert folding_penalty(bump, grid).item() > 0


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_batch_equals_singles(name, d, rng):
    grid = _grid(d, rng)
    u = smooth_field(grid, rng, batch=3, magnitude=4.0, sigma=1.5)
    f = FUNCTIONS[name]
    torch.testing.assert_close(f(u, grid), torch.cat([f(u[i : i + 1], grid) for i in range(3)]))


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_gradcheck(name, d, rng):
    grid = _grid(d, rng, small=True)
    u = torch.as_tensor(rng.normal(size=(2, d, *grid.shape)) * 0.5).requires_grad_(True)
    # fast mode checks random projections: the full Jacobian of the Hessian is slow to build
    f = lambda v: FUNCTIONS[name](v, grid)  # noqa: E731
    assert torch.autograd.gradcheck(f, (u,), eps=1e-6, atol=1e-6, fast_mode=True)


def test_modules_registry_dtype():
    grid = Grid((6, 5, 4), spacing=(1.0, 1.5, 2.0))
    u = torch.randn(2, 3, *grid.shape, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    assert set(REGULARISERS) == {"diffusion", "bending", "tv", "tv-l1", "sparsity", "folding", "coefficients-l1",
                                 "coefficients-l2", "coefficients-diffusion", "coefficients-tv", "coefficients-tv-l1"}
    assert REGULARISERS["diffusion"] is Diffusion and REGULARISERS["bending"] is BendingEnergy
    expected = {
        "diffusion": diffusion(u, grid),
        "bending": bending_energy(u, grid),
        "tv": total_variation(u, grid, eps=0.3),
        "folding": folding_penalty(u, grid, threshold=0.2),
        "tv-l1": total_variation_l1(u, grid),
        "sparsity": sparsity(u, grid),
    }
    modules = {
        "diffusion": Diffusion(),
        "bending": BendingEnergy(),
        "tv": TotalVariation(eps=0.3),
        "folding": JacobianFolding(threshold=0.2),
        "tv-l1": TotalVariationL1(),
        "sparsity": Sparsity(),
    }
    for name, module in modules.items():
        assert isinstance(module, REGULARISERS[name])
        out = module(u, grid)
        assert out.shape == (2,) and out.dtype == torch.float32
        torch.testing.assert_close(out, expected[name])
    assert "eps=0.3" in repr(modules["tv"]) and "threshold=0.2" in repr(modules["folding"])


def test_errors():
    grid = Grid((6, 5))
    with pytest.raises(ValueError, match="does not fit the grid"):
        diffusion(torch.zeros(1, 2, 6, 5), grid)
    with pytest.raises(ValueError, match="does not fit the grid"):
        diffusion(torch.zeros(1, 3, 5, 6), grid)
    with pytest.raises(ValueError, match="floating point"):
        diffusion(torch.zeros(1, 2, 5, 6, dtype=torch.long), grid)
    with pytest.raises(ValueError, match="3 voxels along every axis"):
        diffusion(torch.zeros(1, 2, 2, 6), Grid((6, 2)))
    with pytest.raises(ValueError, match="eps must be positive"):
        TotalVariation(eps=0)
    with pytest.raises(ValueError, match="does not fit the grid"):
        sparsity(torch.zeros(1, 2, 5, 5), grid)
    with pytest.raises(ValueError, match="3 voxels along every axis"):
        total_variation_l1(torch.zeros(1, 2, 2, 6), Grid((6, 2)))
    sparsity(torch.zeros(1, 2, 2, 6), Grid((6, 2)))  # no derivatives, so no minimum size
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        parameter_norm(torch.zeros(2, 3), order=3)
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        ParameterNorm(order=0)
    with pytest.raises(ValueError, match=r"batch axis first, got shape \(3,\)"):
        parameter_norm(torch.zeros(3))
    with pytest.raises(ValueError, match="floating-point"):
        parameter_norm(torch.zeros(2, 3, dtype=torch.long))


# --------------------------------------------------------------------------- TV-L1, sparsity, parameters
ANISOTROPIC = {
    2: Grid((7, 5), spacing=(0.6, 2.5), origin=(3.0, -4.0)),
    3: Grid((6, 5, 4), spacing=(0.6, 2.5, 1.3), origin=(3.0, -4.0, 1.0)),
}


@pytest.mark.parametrize("d", [2, 3])
def test_tv_l1_of_a_linear_field(d, rng):
    a = torch.as_tensor(rng.normal(size=(d, d)) * 0.3)
    b = torch.as_tensor(rng.normal(size=d))
    expected = a.abs().sum().reshape(1)
    permuted = np.eye(d)[::-1] * np.r_[-1.0, np.ones(d - 1)]  # axis-aligned, flipped and swapped
    tiny = Grid((3,) * d, spacing=ANISOTROPIC[d].spacing)  # every voxel but one is on the border
    flipped = Grid(ANISOTROPIC[d].size, ANISOTROPIC[d].spacing, direction=permuted.ravel())
    grids = [ANISOTROPIC[d], _grid(d, rng), tiny, flipped]
    for grid in grids:
        u = _field_from(grid, lambda x: x @ a.T + b)
        # second-order one-sided differences at the border are exact for linear fields, so every
        # voxel, border included, has density sum |A_ij|
        torch.testing.assert_close(total_variation_l1(u, grid), expected, rtol=1e-12, atol=0)
        torch.testing.assert_close(total_variation_l1(u, grid), jacobian(u, grid).abs().sum((1, 2)).flatten(1).mean(1))
    # the sum of |.| depends on the axes: the rotated field x -> R A R^T x has another value
    r = torch.as_tensor(np.linalg.qr(rng.normal(size=(d, d)))[0])
    u = _field_from(ANISOTROPIC[d], lambda x: x @ (r @ a @ r.T).T)
    assert abs(total_variation_l1(u, ANISOTROPIC[d]).item() - expected.item()) > 1e-3


@pytest.mark.parametrize("d", [2, 3])
def test_tv_l1_and_sparsity_in_physical_units(d, rng):
    grid = ANISOTROPIC[d]
    # the same index field u_i = B[i, a] * index_a (mm) on two spacings: du_i/dx_a = B[i, a] / s_a
    bmat = torch.as_tensor(rng.normal(size=(d, d)))
    index = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in grid.shape], indexing="ij"))
    index = index.flip(0)  # tensor axis order -> ITK index order
    u = torch.einsum("ia,a...->i...", bmat, index)[None]
    for spacing in (grid.spacing, tuple(2.0 * s for s in grid.spacing), (1.0,) * d):
        g = Grid(grid.size, spacing, grid.origin)
        expected = (bmat.abs() / torch.as_tensor(spacing, dtype=torch.float64)).sum().reshape(1)
        torch.testing.assert_close(total_variation_l1(u, g), expected, rtol=1e-12, atol=0)
        torch.testing.assert_close(sparsity(u, g), u.abs().sum(1).mean().reshape(1))  # mm: spacing-free
    # a constant field: sum |b_i| mm at every voxel
    b = torch.as_tensor(rng.normal(size=d))
    const = b.reshape(1, d, *([1] * d)).expand(2, d, *grid.shape)
    torch.testing.assert_close(sparsity(const, grid), b.abs().sum().expand(2), rtol=1e-14, atol=0)
    torch.testing.assert_close(total_variation_l1(const, grid), torch.zeros(2, dtype=b.dtype), rtol=0, atol=1e-14)


def test_parameter_norm():
    p = torch.tensor([[[1.0, -2.0], [3.0, 0.0]], [[0.5, 0.5], [-0.5, -0.5]]], dtype=torch.float64)
    torch.testing.assert_close(parameter_norm(p), torch.tensor([1.5, 0.5], dtype=p.dtype))
    torch.testing.assert_close(parameter_norm(p, order=2), torch.tensor([3.5, 0.25], dtype=p.dtype))
    assert torch.equal(ParameterNorm(order=2)(p), parameter_norm(p, 2)) and "order=2" in repr(ParameterNorm(2))
    assert "parameter" not in " ".join(REGULARISERS) and ParameterNorm not in REGULARISERS.values()
    q = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    for order in (1, 2):
        assert torch.autograd.gradcheck(lambda v: parameter_norm(v, order), (q,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("sheared", [False, True])
def test_norm_shortcut_matches_physical_derivatives(sheared):
    """Diffusion and bending skip the rotation to physical axes on orthonormal grids; they must
    equal the Frobenius norms of the physical Jacobian and Hessian all the same."""
    rng = np.random.default_rng(5)
    grid = oblique_grid(3, rng, size=(9, 8, 7))
    if sheared:
        m = grid.direction_matrix.copy()
        m[:, 0] += 0.3 * m[:, 1]
        grid = Grid(grid.size, grid.spacing, grid.origin, m.ravel())
    u = torch.as_tensor(rng.normal(size=(2, 3, *grid.shape)))
    torch.testing.assert_close(diffusion(u, grid), jacobian(u, grid).pow(2).sum((1, 2)).flatten(1).mean(1))
    torch.testing.assert_close(bending_energy(u, grid), hessian(u, grid).pow(2).sum((1, 2, 3)).flatten(1).mean(1))


@pytest.mark.parametrize("slices", [17, 34, 40])
def test_determinant_in_slabs_equals_the_whole_field(slices, rng):
    """Without autograd a 3D field is taken in slabs of 16 slices: the same numbers, borders included."""
    grid = Grid([9, 7, slices], [1.0, 1.5, 2.0], [3.0, -2.0, 1.0], [0, 1, 0, -1, 0, 0, 0, 0, 1])
    u = torch.as_tensor(rng.normal(size=(2, 3, slices, 7, 9)) * 0.3).requires_grad_(True)
    whole = jacobian_determinant(u, grid)  # the gradient path: one piece
    with torch.no_grad():
        slabs = jacobian_determinant(u, grid)
    assert torch.equal(whole.detach(), slabs)


def test_determinant_in_another_dtype_equals_converting_first(rng):
    grid = Grid([9, 7, 40], [1.0, 1.5, 2.0])
    u = torch.as_tensor(rng.normal(size=(1, 3, 40, 7, 9)) * 0.3, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(jacobian_determinant(u, grid, torch.float64), jacobian_determinant(u.double(), grid))


def test_shared_derivatives_differentiate_a_field_once(rng, monkeypatch):
    """Inside shared_derivatives() diffusion and the folding penalty of one field share its
    derivatives (the engine's regulariser terms): the same values and gradients, one
    physical_gradient call instead of two; outside the block nothing is kept."""
    import airlab.regularisers as regularisers

    grid = oblique_grid(3, rng, size=(9, 8, 7))
    u0 = torch.as_tensor(rng.normal(size=(2, 3, *grid.shape)) * 0.4)

    def terms(u):
        return diffusion(u, grid) + 3.0 * folding_penalty(u, grid, threshold=0.8)

    u = u0.clone().requires_grad_(True)
    alone = terms(u)
    (alone_grad,) = torch.autograd.grad(alone.sum(), u)
    calls = []
    original = regularisers.physical_gradient
    monkeypatch.setattr(regularisers, "physical_gradient", lambda *a, **k: calls.append(1) or original(*a, **k))
    with regularisers.shared_derivatives():
        shared = terms(u)
        assert len(calls) == 1
        assert diffusion(u.detach().clone(), grid).shape == (2,) and len(calls) == 2  # another field
    (shared_grad,) = torch.autograd.grad(shared.sum(), u)
    torch.testing.assert_close(shared, alone, rtol=0, atol=0)
    torch.testing.assert_close(shared_grad, alone_grad, rtol=1e-12, atol=1e-12)
    terms(u)
    assert len(calls) == 4 and regularisers._shared.get() is None


@pytest.mark.parametrize("d", [2, 3])
def test_an_inactive_folding_penalty_is_a_constant_zero(d, rng):
    # nothing below the threshold: the penalty is zeros outside the graph, and a sum with it has
    # the other terms' gradient exactly; one voxel below it and the penalty is differentiated again
    grid = _grid(d, rng)
    smooth = smooth_field(grid, rng, batch=2, magnitude=0.5).requires_grad_(True)
    penalty = folding_penalty(smooth, grid, threshold=0.1)
    assert not penalty.requires_grad and torch.equal(penalty, torch.zeros(2, dtype=smooth.dtype))
    (diffusion(smooth, grid) + penalty).sum().backward()
    alone = smooth.detach().clone().requires_grad_(True)
    diffusion(alone, grid).sum().backward()
    assert torch.equal(smooth.grad, alone.grad)
    lowest = float(jacobian_determinant(smooth.detach(), grid).min())
    active = folding_penalty(smooth, grid, threshold=lowest + 1e-6)
    assert active.requires_grad and float(active.detach().sum()) > 0
