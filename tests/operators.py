"""The shared checks for operators (losses, regularisers, anything ``op(*tensors) -> [N]`` with the
batch first): smoke, a batch of N equals N single calls, float32 agrees with float64, gradcheck.

Each helper takes the operator as a callable of the tensors alone (bind other arguments with a
lambda) and the inputs as float64 tensors whose first dimension is the batch; ``shared`` names the
positions of inputs that are not split for the single calls (a weight of batch 1, say).
"""

from __future__ import annotations

import torch


def check_smoke(op, inputs) -> torch.Tensor:
    """One finite value per batch element, in the inputs' dtype; returns the values."""
    value = op(*inputs)
    n = inputs[0].shape[0]
    assert value.shape == (n,), f"expected one value per batch element [{n}], got {tuple(value.shape)}"
    assert value.dtype == inputs[0].dtype
    assert torch.isfinite(value).all(), value
    return value


def check_batch_equals_singles(op, inputs, shared=(), atol=1e-12):
    """``op`` on the batch equals ``op`` on each element alone, concatenated."""
    batch = op(*inputs)
    n = inputs[0].shape[0]
    singles = [op(*(x if k in shared or x is None else x[i : i + 1] for k, x in enumerate(inputs))) for i in range(n)]
    torch.testing.assert_close(batch, torch.cat(singles), rtol=0, atol=atol)


def check_float32_matches_float64(op, inputs, rtol=1e-4, atol=1e-5):
    """float32 in, float32 out, and the value of the float64 computation to float32 accuracy."""
    value64 = op(*inputs)
    value32 = op(*(None if x is None else x.float() for x in inputs))
    assert value32.dtype == torch.float32
    torch.testing.assert_close(value32.double(), value64, rtol=rtol, atol=atol)


def check_gradcheck(op, inputs, wrt=(0,), fast_mode=False):
    """Analytic gradients with respect to the inputs at positions ``wrt`` equal finite differences
    (float64 inputs)."""
    leaves = [inputs[k].detach().clone().requires_grad_(True) for k in wrt]

    def f(*values):
        args = list(inputs)
        for k, v in zip(wrt, values):
            args[k] = v
        return op(*args)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6, fast_mode=fast_mode)
