"""One pyramid level's optimisation: the optimiser, its step-size schedule, per-pair convergence
and the events that observers (progress bars, logs, callbacks) receive.

The checks that need a value on the host (the objective is finite, the images overlap, which
pairs have converged) run every ``check_every`` iterations, so that a GPU is not stalled at every
step. The result does not depend on ``check_every``: each step's parameters are kept until the
check, and a pair found converged at an earlier step of the block is put back to where it was
then (tests/test_solver.py holds 1 and 7 to the same fields).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import RegistrationError
from .objective import Evaluation, Objective, check_overlap_of
from .optim import Adam, FieldAdam
from .pyramid import Level, LevelData, strided_views
from .transforms import Transform

__all__ = ["Convergence", "make_optimizer", "param_groups", "solve_level"]


def param_groups(transform: Transform, lr: float, radius: float) -> list[dict]:
    """Per-parameter steps in comparable physical units (see :class:`~airlab.registration.Stage`)."""
    angular = {"rotation", "linear", "log_scale"}
    groups = []
    for name, p in transform.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        groups.append({"params": [p], "lr": lr / radius if leaf in angular else lr, "name": name})
    return groups


def make_optimizer(spec, groups, gradient_sigma: float = 0.0, lr_quantile: float = 1.0):
    """``"adam"``, ``"field-adam"``, ``"lbfgs"`` or a factory ``(param_groups) -> Optimizer``."""
    if callable(spec):
        return spec(groups)
    if spec == "adam":
        return Adam(groups, gradient_sigma=gradient_sigma)
    if spec == "field-adam":
        return FieldAdam(groups, gradient_sigma=gradient_sigma, quantile=lr_quantile)
    if spec == "lbfgs":
        params = [p for g in groups for p in g["params"]]
        return torch.optim.LBFGS(params, lr=1.0, max_iter=1, history_size=20, line_search_fn="strong_wolfe")
    raise ValueError(f"unknown optimizer {spec!r}; choose 'adam', 'field-adam', 'lbfgs' or pass a factory")


def cosine_factor(iteration: int, iterations: int) -> float:
    """The step-size factor after ``iteration`` (0-based) of ``iterations``: from 1 down to 1/20.
    Written out rather than taken from torch.optim.lr_scheduler, which would import torch._dynamo
    (see optim.py), and so that any optimiser with param_groups can use it."""
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (iteration + 1) / iterations))


class Convergence:
    """Per-pair early stopping: a pair whose objective improved by less than ``tolerance``
    (relative) over ``lag`` iterations is done; the level ends when every pair is."""

    def __init__(self, tolerance: float, lag: int):
        self.tolerance, self.lag = tolerance, lag
        self.values: list[torch.Tensor] = []

    def update(self, per_pair: torch.Tensor) -> torch.Tensor | None:
        """Record this iteration's objectives ``[N]``; the pairs that are done, once known."""
        self.values.append(per_pair)
        if len(self.values) <= self.lag:
            return None
        old = self.values[-1 - self.lag]
        return old - per_pair <= self.tolerance * old.abs().clamp_min(1e-12)


@dataclass
class _Step:
    """What an iteration left for the next check (device tensors only)."""

    iteration: int
    loss: torch.Tensor
    evaluation: Evaluation
    params: list[torch.Tensor] | None  # the parameters after the step; None: they are the live ones


def solve_level(objective: Objective, t: Transform, previous: Transform | None, data: LevelData, *, stage,
                level: Level, radius: float, emit: Callable[[str, dict], None], info: dict,
                check_every: int = 1) -> dict:
    """Minimise ``objective`` over ``t``'s parameters on one level; the history entry of the level
    (iterations, the objective at each, the final terms, the time).

    ``info`` (stage index and name, level index, label) goes into every event;
    ``emit(event, dict)`` delivers ``level_start``, ``iteration`` and ``level_end``. With
    ``check_every > 1`` the iteration events of a block arrive together at its check, and their
    ``transform`` is the transform as it is then.
    """
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    views = strided_views(data, level.stride)
    points = [v.grid.points(dtype=data.fixed.dtype, device=data.fixed.device) for v in views]
    # a strided objective varies with the sublattice: compare values of the same one
    monitor = Convergence(stage.tolerance, -(-stage.patience // len(views)) * len(views))
    optimizer = make_optimizer(stage.optimizer, param_groups(t, stage.lr, radius), stage.gradient_sigma,
                               stage.lr_quantile)
    decay = stage.decay and level.iterations > 1 and not isinstance(optimizer, torch.optim.LBFGS)
    base = [g["lr"] for g in optimizer.param_groups]
    emit("level_start", {**info, "max_iterations": level.iterations})
    start = time.perf_counter()
    # Early stopping is per pair: a converged pair keeps its parameters while the others go on,
    # so a batch ends where its pairs would have ended alone (not for LBFGS, whose line search
    # couples the pairs).
    params = [p for p in t.parameters() if p.requires_grad]
    separable = (t.batch_size > 1 and not isinstance(optimizer, torch.optim.LBFGS)
                 and all(p.shape[0] == t.batch_size for p in params))
    frozen: dict[int, list[torch.Tensor]] = {}
    values: list[float] = []
    terms: dict = {}
    pending: list[_Step] = []

    def check() -> bool:
        """Go through the steps since the last check in order; True when the level is over."""
        nonlocal terms
        for step in pending:
            check_overlap_of(step.evaluation.overlap)
            value = float(step.loss)
            if not math.isfinite(value):
                raise RegistrationError(f"the objective became {value} in {stage.name}, level {info['level'] + 1}")
            values.append(value)
            terms = step.evaluation.terms
            emit("iteration", {**info, "iteration": step.iteration, "objective": value,
                               "terms": {k: v.tolist() for k, v in terms.items()}, "transform": t})
            after = params if step.params is None else step.params
            converged = monitor.update(step.evaluation.total.double().cpu().expand(t.batch_size))
            if converged is None:
                continue
            converged[list(frozen)] = True
            if bool(converged.all()):
                with torch.no_grad():
                    for p, v in zip(params, after):
                        if v is not p:
                            p.copy_(v)
                return True
            if separable:
                for n in converged.nonzero().flatten().tolist():
                    frozen.setdefault(n, [v.detach()[n].clone() for v in after])
        if frozen:
            restore()
        return False

    def restore() -> None:
        with torch.no_grad():
            for n, saved in frozen.items():
                for p, v in zip(params, saved):
                    p[n] = v

    try:
        for it in range(level.iterations):
            evaluated = {}

            def closure():
                for p in params:
                    p.grad = None
                k = it % len(views)
                with t.cached():
                    # the first iteration checks at once: a level that starts without overlap
                    # fails before any loss sees an empty mask
                    e = objective(t, previous, views[k], points[k], check_overlap=it == 0)
                loss = e.total.sum()  # summing keeps every batch element's gradient its own
                # kept until the check, detached: the graph (and what autograd functions keep on
                # their context) must not live into the next iteration
                evaluated["e"] = dataclasses.replace(e, total=e.total.detach())
                if loss.requires_grad:  # else every term is a constant here (an inactive folding penalty alone)
                    loss.backward()
                return loss

            try:
                loss = optimizer.step(closure)
            except Exception:
                check()  # an unchecked step may hold the cause (a nan, no overlap): report it first
                raise
            if frozen:
                restore()
            if decay:
                factor = cosine_factor(it, level.iterations)
                for g, b in zip(optimizer.param_groups, base):
                    g["lr"] = b * factor
            snapshot = None if check_every == 1 else [p.detach().clone() for p in params]
            pending.append(_Step(it, loss.detach(), evaluated["e"], snapshot))
            if len(pending) >= check_every or it == level.iterations - 1:
                over = check()
                pending.clear()
                if over:
                    break
    finally:
        elapsed = time.perf_counter() - start
        emit("level_end", {**info, "iterations": len(values), "objective": values[-1] if values else None,
                           "time_s": elapsed})
    return {"iterations": len(values), "objective": values,
            "final_terms": {k: v.tolist() for k, v in terms.items()}, "time_s": round(elapsed, 3)}
