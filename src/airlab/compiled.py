"""Compiled CPU loops (numba) for the hot spots of a dense 3D registration: cubic B-spline
sampling, the squarings of scaling and squaring, and mutual information's Parzen histogram.

:func:`airlab.splines.evaluate` builds a cubic sample from eight linear fetches of
``grid_sample``. That is the right shape for a GPU, but on the CPU PyTorch's 3D sampler is a
scalar loop, and a registration's finest level spent a third of its time in those fetches and
in the tensor operations around them (weights, positions, mirror padding, products). Here each
point reads its 64 knots directly, folds them at the boundary as ITK does, and in the same
pass clamps the value to its cell's range and interpolates the slope that
:func:`airlab.splines.sample_cubic` differentiates with: measured by
``benchmarks/compiled_loops.py``. The numbers are :func:`airlab.splines.evaluate`'s (the sum is
accumulated in double precision), checked against it in ``tests/test_compiled.py``.

A squaring, ``u(x) + u(x + u(x))`` with ``u`` extended by its border values, is one
``grid_sample`` of the field at every voxel plus an addition: the same 3D scalar loop, here with
the positions, the fetch and the sum in one pass (:func:`square`).

Mutual information's joint histogram (:class:`airlab.losses._JointHistogram`) scatters 16
products a voxel and gathers them back for the gradient; :func:`parzen_joint` adds them in a
loop into one histogram per thread, and :func:`parzen_joint_grad` reads them back, on levels of
at least ``_HISTOGRAM_VOXELS`` voxels.

The kernels release the GIL, and the points are split over ``torch.get_num_threads()`` threads,
so a caller that limits PyTorch's threads (a batch worker) limits these too. Compiled on first
use and cached on disk (numba's ``cache=True``). Importing numba and loading that cache take
about 0.6 s of CPU: :func:`warm_up`, which the engine calls as a 3D registration starts, does it
in a background thread while the first stages run. Both hold the GIL, so this overlaps little
with those stages' Python (docs/architecture.md, "Threads").

Only 3D: PyTorch's 2D sampler is vectorised, and a 2D registration, a second or two in all,
gains less from the loops than numba's start-up costs it (docs/architecture.md, "Compiled
loops on the CPU").
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

_loops = None  # airlab.compiled_loops once imported; False where it cannot be (no numba, say)
_enabled = True  # see disabled()

__all__ = ["can_sample_cubic", "can_square", "can_histogram", "sample_cubic", "square", "parzen_joint",
           "parzen_joint_grad", "warm_up", "disabled"]

# Below this many points per thread a second thread costs more than it saves.
_POINTS_PER_THREAD = 8192
# Below this many voxels a histogram is a coarse level's, cheap either way: not worth loading
# numba for (a 2D registration's levels stay below it)
_HISTOGRAM_VOXELS = 1 << 16
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()
_warmed = False


def _after_fork() -> None:
    """A forked child has none of its parent's threads: a pool inherited from the parent would
    take work and never run it."""
    global _pool, _pool_size, _pool_lock
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _compiled_loops():
    """The loops' module, imported on first use; None where numba cannot load it (no numba, or
    no writable place for its cache), and then every caller takes the grid_sample path."""
    global _loops
    if _loops is None:
        try:
            from . import compiled_loops

            _loops = compiled_loops
        except Exception:  # noqa: BLE001 - any failure to load means: use PyTorch
            _loops = False
    return _loops or None


def _plain(*tensors: torch.Tensor) -> bool:
    """CPU tensors of one floating dtype through which no gradient is wanted (callers that
    differentiate take the ``grid_sample`` path), and the loops load."""
    return (
        _enabled
        and all(t.device.type == "cpu" and t.dtype == tensors[0].dtype for t in tensors)
        and tensors[0].dtype in (torch.float32, torch.float64)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and _compiled_loops() is not None
    )


def can_sample_cubic(coefficients: torch.Tensor, index: torch.Tensor) -> bool:
    """Can :func:`sample_cubic` take these (3D, see :func:`_plain`)?"""
    return coefficients.dim() == 5 and index.shape[-1] == 3 and _plain(coefficients, index)


def can_square(u: torch.Tensor) -> bool:
    """Can :func:`square` take this field ``[N, 3, *S]`` (3D, see :func:`_plain`)?"""
    return u.dim() == 5 and u.shape[1] == 3 and _plain(u)


def can_histogram(wf: torch.Tensor, tm: torch.Tensor) -> bool:
    """Can :func:`parzen_joint` take these (``wf [4, V]``, ``tm [V]``; a level of at least
    ``_HISTOGRAM_VOXELS`` voxels, see :func:`_plain`)?"""
    return wf.dim() == 2 and wf.shape[0] == 4 and tm.shape[0] >= _HISTOGRAM_VOXELS and _plain(wf, tm)


def _threads(points: int) -> int:
    return max(1, min(torch.get_num_threads(), points // _POINTS_PER_THREAD))


def _parts(extent: int, points: int) -> int:
    return max(1, min(_threads(points), extent))


def _run(kernel, args, extent: int, points: int, own: list[tuple] | None = None) -> None:
    """``kernel(*args, start, stop)`` over ``0..extent`` (points or planes), split over threads
    by the number of ``points`` it touches. ``own``: one tuple of arguments per part (outputs of
    its own), put before ``start``; its length is the number of parts."""
    global _pool, _pool_size
    parts = len(own) if own is not None else _parts(extent, points)
    own = own if own is not None else [()] * parts
    if parts == 1:
        kernel(*args, *own[0], 0, extent)
        return
    with _pool_lock:
        if _pool_size < parts:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=parts, thread_name_prefix="airlab-loops")
            _pool_size = parts
        pool = _pool
    edges = np.linspace(0, extent, parts + 1).astype(int)
    jobs = [pool.submit(kernel, *args, *own[k], int(lo), int(hi)) for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:]))]
    for job in jobs:
        job.result()


def _array(tensor: torch.Tensor) -> np.ndarray:
    """An image tensor as an array the loops read; a batch expanded from one image stays one."""
    if tensor.shape[0] > 1 and tensor.stride(0) == 0:
        tensor = tensor[:1]
    return tensor.detach().contiguous().numpy()


def sample_cubic(coefficients: torch.Tensor, index: torch.Tensor, boundary: str = "mirror",
                 bounds: tuple[torch.Tensor, torch.Tensor] | None = None, gradient: torch.Tensor | None = None):
    """The cubic B-spline with ``coefficients [N or 1, C, Z, Y, X]`` at continuous ``index [N, P, 3]``:
    ``(values [N, C, P], kept, slope)``.

    ``boundary``: ``"mirror"`` or ``"border"``, as :func:`airlab.splines.evaluate`. With
    ``bounds`` (:func:`airlab.splines.cell_range`), each value is clamped to its cell's range and
    ``kept [N, C, P]`` says where it was inside (else None). With ``gradient``
    (:func:`airlab.splines.node_gradient`), ``slope [N, C, 3, P]`` is it interpolated linearly at
    the points, the edge value repeated beyond the grid (else None).
    """
    if boundary not in ("mirror", "border"):
        raise ValueError(f"unknown boundary {boundary!r}")
    n, points, d = index.shape
    c = coefficients.shape[1]
    dtype = coefficients.dtype
    out = torch.empty(n, c, points, dtype=dtype)
    # an input the caller did not ask for is an empty array of the same kind (one compiled loop)
    none = torch.empty(0, *([1] * (d + 1)), dtype=dtype)
    kept = torch.empty(n, c, points, dtype=torch.bool) if bounds is not None else torch.empty(0, 1, 1, dtype=torch.bool)
    slope = torch.empty(n, c, d, points, dtype=dtype) if gradient is not None else torch.empty(0, 1, 1, 1, dtype=dtype)
    low, high = bounds if bounds is not None else (none, none)
    # components first: the loop reads each component as a stream, and the engine's indices are
    # made that way (a [D, D] matrix times [D, P] points), so their transposed view costs no copy
    components = index.detach().transpose(1, 2).contiguous()
    args = (_array(coefficients), components.numpy(), boundary == "mirror", _array(low),
            _array(high), _array(gradient if gradient is not None else none), out.numpy(), kept.numpy(),
            slope.numpy())
    _run(_compiled_loops().cubic3, args, points, points)
    return out, (kept if bounds is not None else None), (slope if gradient is not None else None)


def square(u: torch.Tensor) -> torch.Tensor:
    """``u(x) + u(x + u(x))`` at every voxel of ``u [N, 3, Z, Y, X]``, held in grid_sample's
    normalised units (``align_corners=True``), ``u`` extended by its border values: what
    ``u + grid_sample(u, identity + u, "border")`` gives, as :func:`airlab.transforms.velocity.exponential`
    squares."""
    source = u.detach().contiguous()
    out = torch.empty_like(source)
    _run(_compiled_loops().square3, (source.numpy(), out.numpy()), u.shape[2], source[0, 0].numel())
    return out


def parzen_joint(wf: torch.Tensor, tm: torch.Tensor, first: torch.Tensor, histograms: int, bins: int) -> torch.Tensor:
    """The float64 joint histograms ``[histograms, bins, bins]`` of
    :class:`airlab.losses._JointHistogram` (the same arguments): each thread fills histograms of
    its own, summed at the end."""
    n = tm.shape[0]
    own = [torch.zeros(histograms, bins, bins, dtype=torch.float64) for _ in range(_parts(n, n))]
    args = (wf.detach().contiguous().numpy(), tm.detach().contiguous().numpy(), first.contiguous().numpy(), bins - 3)
    _run(_compiled_loops().parzen_joint, args, n, n, [(h.numpy(),) for h in own])
    return own[0] if len(own) == 1 else torch.stack(own).sum(0)


def parzen_joint_grad(wf: torch.Tensor, tm: torch.Tensor, first: torch.Tensor, bins: int, grad: torch.Tensor,
                      want_wf: bool, want_tm: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The adjoint of :func:`parzen_joint` for ``grad [H, bins, bins]``: ``(grad_wf, grad_tm)``,
    None where not wanted."""
    n = tm.shape[0]
    grad_wf = torch.empty_like(wf) if want_wf else wf.new_empty(4, 0)
    grad_tm = torch.empty_like(tm) if want_tm else tm.new_empty(0)
    args = (wf.detach().contiguous().numpy(), tm.detach().contiguous().numpy(), first.contiguous().numpy(), bins - 3,
            grad.detach().to(torch.float64).contiguous().numpy(), grad_wf.numpy(), grad_tm.numpy())
    _run(_compiled_loops().parzen_joint_grad, args, n, n)
    return (grad_wf if want_wf else None), (grad_tm if want_tm else None)


def warm_up() -> None:
    """Import numba and load (the first time: compile) the float32 loops in a background thread,
    once per process. A loop called before it is ready waits for it (numba's compiler lock);
    nothing else changes."""
    global _warmed
    with _pool_lock:
        if _warmed:
            return
        _warmed = True
    threading.Thread(target=_warm, daemon=True, name="airlab-warm-up").start()


def _warm() -> None:
    try:
        image = torch.zeros(1, 1, 4, 4, 4)
        square(torch.zeros(1, 3, 4, 4, 4))
        sample_cubic(image, torch.zeros(1, 2, 3), bounds=(image, image), gradient=torch.zeros(1, 3, 4, 4, 4))
        wf, tm, first = torch.zeros(4, 2), torch.zeros(2), torch.zeros(2, dtype=torch.long)
        parzen_joint_grad(wf, tm, first, 8, parzen_joint(wf, tm, first, 1, 8), True, True)
    except Exception:  # noqa: BLE001 - the same call in the registration raises it where it matters
        pass


@contextlib.contextmanager
def disabled():
    """Within this block every caller takes the PyTorch path, as on a GPU: for comparisons
    (``benchmarks/compiled_loops.py``, ``benchmarks/sampler_time.py``). Process-wide, so not
    for use while other threads register."""
    global _enabled
    saved, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = saved
