"""The optimisers of optim.py: Adam equals torch's (and keeps torch._dynamo unimported), FieldAdam's
step size, and the Gaussian-smoothed gradients of fluid-like updates against scipy."""

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from airlab.optim import Adam, FieldAdam


def _one_step(make, start, grad, **options):
    p = nn.Parameter(start.clone())
    opt = make([p], lr=0.5, **options)
    p.grad = grad.clone()
    opt.step()
    return p.detach()


@pytest.mark.parametrize("make", [Adam, FieldAdam])
@pytest.mark.parametrize("d", [2, 3])
def test_gradient_sigma_smooths_field_gradients_like_scipy(make, d, rng):
    """With ``gradient_sigma`` the step is the plain step of the Gaussian-smoothed gradient, and
    that smoothing is scipy's (replicated borders, truncated at 3 sigma), axis by axis, per
    batch element and component."""
    shape = (2, d, *(11, 9, 7)[:d])
    start = torch.as_tensor(rng.normal(size=shape))
    grad = torch.as_tensor(rng.normal(size=shape))
    sigma = 1.5
    reference = np.empty(shape)
    for n in range(shape[0]):
        for c in range(d):
            reference[n, c] = ndimage.gaussian_filter(grad[n, c].numpy(), sigma, mode="nearest", truncate=3.0)
    smoothed = _one_step(make, start, grad, gradient_sigma=sigma)
    expected = _one_step(make, start, torch.as_tensor(reference))
    assert torch.allclose(smoothed, expected, atol=1e-10, rtol=0)
    assert not torch.allclose(smoothed, _one_step(make, start, grad), atol=1e-3)


def test_gradient_sigma_leaves_other_parameters_alone(rng):
    """Only field-shaped parameters [N, D, *shape] (D spatial axes) are smoothed: a batch of
    vectors or of affine matrices [N, D, D] is not."""
    for shape in ((2, 3), (2, 2, 2), (2, 3, 3)):
        start = torch.as_tensor(rng.normal(size=shape))
        grad = torch.as_tensor(rng.normal(size=shape))
        assert torch.equal(_one_step(FieldAdam, start, grad, gradient_sigma=2.0), _one_step(FieldAdam, start, grad))


def test_field_adam_largest_step_is_lr(rng):
    """FieldAdam's first step moves the entry with the largest gradient by exactly ``lr`` and
    the others in proportion, per batch element."""
    grad = torch.as_tensor(rng.normal(size=(2, 2, 8, 8)))
    grad[1] *= 100.0  # another pair, another scale: its step is still lr at its peak
    start = torch.zeros_like(grad)
    step = -_one_step(FieldAdam, start, grad)
    for n in range(2):
        peak = grad[n].abs().max()
        assert torch.allclose(step[n], 0.5 * grad[n] / peak, atol=1e-9)


def test_field_adam_quantile_sets_the_step_of_that_entry(rng):
    """With ``quantile`` q the first step moves the entry at the q-quantile of the squared
    gradient (numpy's "higher" rule) by exactly ``lr``, the smaller ones in proportion, and
    clips the larger ones (one hard edge) to ``lr``; per batch element."""
    grad = torch.as_tensor(rng.normal(size=(2, 2, 10, 10)))
    grad[0, 0, 3, 3] = 1e3  # an outlier that would set every step with q = 1
    grad[1] *= 100.0
    step = -_one_step(FieldAdam, torch.zeros_like(grad), grad, quantile=0.9)
    for n in range(2):
        scale = np.sqrt(np.quantile(grad[n].square().numpy(), 0.9, method="higher"))
        expected = np.clip(0.5 * grad[n].numpy() / scale, -0.5, 0.5)
        assert np.allclose(step[n].numpy(), expected, atol=1e-9, rtol=1e-7)
        above = grad[n].abs() > scale
        assert above.sum() == 19 and bool((step[n][above].abs() == 0.5).all())  # the top tenth, outlier too
    assert torch.equal(_one_step(FieldAdam, torch.zeros_like(grad), grad, quantile=1.0),
                       _one_step(FieldAdam, torch.zeros_like(grad), grad))
    with pytest.raises(ValueError, match="quantile"):
        FieldAdam([nn.Parameter(grad.clone())], quantile=0.0)


def test_kth_smallest_is_torch_kthvalue(rng):
    """FieldAdam's quantile on the CPU (numpy's introselect) picks torch.kthvalue's entry: ties,
    NaN (last in both) and both dtypes included."""
    from airlab.optim import _kth_smallest

    for dtype in (torch.float32, torch.float64):
        values = torch.as_tensor(rng.normal(size=(3, 1001)), dtype=dtype).round(decimals=1)  # many ties
        values[1, 7] = float("nan")
        for rank in (1, 2, 500, 951, 1000, 1001):
            torch.testing.assert_close(_kth_smallest(values, rank), torch.kthvalue(values, rank, dim=1).values,
                                       rtol=0, atol=0, equal_nan=True)
        assert torch.isnan(_kth_smallest(values, 1001)[1])


def test_a_long_row_is_bracketed_from_a_sample_and_picks_the_same_entry(rng):
    """Rows long enough to be bracketed from a strided sample first: the same entry as
    torch.kthvalue, with ties, NaN, ranks at the ends, and a row whose sample misleads the
    bracket (every sampled entry 0, the rest 1), where the whole row is partitioned instead."""
    from airlab.optim import _BRACKET_MIN, _SAMPLE_STRIDE, _kth_smallest

    m = _BRACKET_MIN + 1001
    for dtype in (torch.float32, torch.float64):
        values = torch.as_tensor(rng.normal(size=(2, m)), dtype=dtype).round(decimals=2)  # ties
        values[1, :40] = float("nan")
        for rank in (1, 2, m // 2, int(0.95 * m), m - 40, m - 39, m):
            torch.testing.assert_close(_kth_smallest(values, rank), torch.kthvalue(values, rank, dim=1).values,
                                       rtol=0, atol=0, equal_nan=True)
    misleading = torch.ones(1, m)
    misleading[0, ::_SAMPLE_STRIDE] = 0.0
    for rank in (1, m // _SAMPLE_STRIDE, m // _SAMPLE_STRIDE + 2, int(0.95 * m)):
        assert _kth_smallest(misleading, rank) == torch.kthvalue(misleading, rank, dim=1).values


def test_adam_is_torch_adam(rng):
    """airlab.optim.Adam (which spares a command-line run torch._dynamo's import) takes the
    same steps as torch.optim.Adam, with param groups, a changed lr and a closure."""
    from airlab.optim import Adam

    target = torch.as_tensor(rng.normal(size=(3, 4)))
    start = [torch.as_tensor(rng.normal(size=(3, 4))), torch.as_tensor(rng.normal(size=5))]
    runs = []
    for make in (Adam, torch.optim.Adam):
        a, b = (nn.Parameter(s.clone()) for s in start)
        opt = make([{"params": [a], "lr": 0.05}, {"params": [b]}], lr=0.01)
        for k in range(30):
            def closure():
                opt.zero_grad()
                loss = (a - target).pow(2).sum() + b.pow(4).sum()
                loss.backward()
                return loss
            opt.step(closure)
            opt.param_groups[0]["lr"] = 0.05 * (1 - k / 40)
        runs.append((a.detach(), b.detach()))
    for ours, theirs in zip(*runs):
        assert torch.allclose(ours, theirs, atol=1e-12, rtol=0)
    assert not torch.allclose(runs[0][0], start[0])


def test_presets_do_not_import_dynamo():
    """torch.optim.Optimizer imports torch._dynamo (about 3 s) on first use; the presets' own
    optimisers and learning-rate decay keep a command-line run free of it."""
    import subprocess
    import sys

    code = (
        "import sys, torch, airlab as al\n"
        "from airlab.pipelines import preset\n"
        "from airlab.registration import Registration\n"
        "from airlab.datasets import example_path\n"
        "f = al.read_image(example_path('mni152_t1_1mm_axial')).to(torch.float32)\n"
        "for name in ('affine', 'diffeomorphic'):\n"
        "    stages = preset(name, f.grid)\n"
        "    for s in stages:\n"
        "        for lv in s.levels: lv.iterations = 2\n"
        "    Registration(stages, progress=False)(f, f)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
