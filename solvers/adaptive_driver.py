"""One adaptive driver for ``pf_ode``, :func:`~solvers.log_likelihood`/:func:`~solvers.encode`
and ``adaptive_sde``: the engine choice, the per-sample status, the stats and the failure report.

Every adaptive solve in the package returns a :class:`~solvers.adaptive.PerSampleSolution`:
:func:`~solvers.adaptive.solve_per_sample` (every sample its own dopri5 step control, one
batched right-hand side per stage), :func:`~solvers.adaptive.solve_shared` (torchdiffeq, one
step for the batch) or ``adaptive_sde``'s own embedded Euler--Maruyama pair.  From it this
module builds the same ``stats`` keys and the same errors everywhere: a per-sample status read
from the engine (``success``, ``max_steps``, ``step_size_underflow``, ``nonfinite``, or
``aborted`` for a sample stopped because another failed), never parsed from an exception's
text, and on failure a :class:`~solvers.base.SolverError` (``NonFiniteError`` for a non-finite
model output) naming the samples, where they stopped and the partial result.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import Tensor

from scoresde._checks import sample_list

from .adaptive import STATUS_NAMES, PerSampleSolution, solve_per_sample, solve_shared
from .base import NonFiniteError, SolverError
from .time_change import TIME_VARIABLES, LogSNRTime, default_time_variable

__all__ = ["integrate", "record", "failure", "raise_failure", "time_change", "PER_SAMPLE_METHODS"]

#: torchdiffeq-named methods the per-sample engine implements.
PER_SAMPLE_METHODS = ("dopri5",)

_WHY = {
    "max_steps": "max_steps={max_steps} step attempts reached",
    "step_size_underflow": "step size underflow (the step no longer moves t, or is below dt_min)",
    "nonfinite": "the model's output, the drift or the state became non-finite",
}


def time_change(sde, t0: float, t1: float, time_variable: str) -> LogSNRTime | None:
    """The integration variable of an adaptive solve from ``t0`` to ``t1``: None for ``t``, a
    :class:`~solvers.time_change.LogSNRTime` for ``"log_snr"``; ``"auto"`` picks
    :func:`~solvers.time_change.default_time_variable` (log-SNR for a LinearSDE with knots)."""
    if time_variable not in TIME_VARIABLES + ("auto",):
        raise ValueError(f"time_variable must be one of {TIME_VARIABLES + ('auto',)}, got {time_variable!r}")
    if time_variable == "auto":
        time_variable = default_time_variable(sde)
    return LogSNRTime(sde, t0, t1) if time_variable == "log_snr" else None


def integrate(rhs: Callable[[Tensor, Tensor, Tensor], Tensor], y0: Tensor, t0: float, t1: float, *,
              per_sample: bool, method: str, rtol: float, atol: float, max_steps: int,
              norm_each: Callable[[Tensor], Tensor] | None = None,
              norm_batch: Callable[[Tensor], Tensor] | None = None,
              jump_t: Tensor | None = None, grid: Tensor | None = None, t_eval: Tensor | None = None,
              on_step: Callable[[int, float, Tensor], None] | None = None,
              change: LogSNRTime | None = None) -> PerSampleSolution:
    """Integrate ``dy/dt = rhs(t, y, idx)`` from ``t0`` to ``t1`` with the per-sample engine
    (``per_sample=True``; ``method`` in :data:`PER_SAMPLE_METHODS`; ``t`` is ``[B']``) or
    torchdiffeq's shared step (``t`` is 0-d; ``grid`` for fixed-step methods).  ``on_step(i, t,
    y)``: after every round of attempts (per-sample: ``t`` the least advanced running sample's
    time) or every accepted step (shared).  ``change``: integrate in half-log-SNR time instead
    (:mod:`solvers.time_change`; no knots needed, ``jump_t`` ignored); the result's ``t`` is
    converted back to ``t``, its ``dt`` stays in log-SNR units."""
    if change is not None:
        rhs, jump_t, to_t = change.wrap(rhs), None, change.t_of
        if t_eval is not None:
            s = 0.5 * change.sde.log_snr_unchecked(t_eval.detach().to(torch.float64))
            s[t_eval == t0], s[t_eval == t1] = change.s0, change.s1
            t_eval = s
        t0, t1 = change.s0, change.s1
    else:
        to_t = None
    if on_step is not None:
        report = on_step
        on_step = report if to_t is None else (lambda i, s, y: report(i, float(to_t(torch.tensor(s))), y))
    if per_sample:
        if method not in PER_SAMPLE_METHODS:
            raise ValueError(f"per-sample step control supports method in {PER_SAMPLE_METHODS}, got {method!r}")
        direction = 1.0 if t1 > t0 else -1.0
        shout = on_step

        def each(i: int, t: Tensor, y: Tensor) -> None:
            shout(i, float(t.min() if direction > 0 else t.max()), y)

        sol = solve_per_sample(rhs, y0, t0, t1, rtol=rtol, atol=atol, norm=norm_each, max_steps=max_steps,
                               jump_t=jump_t, t_eval=t_eval, on_step=None if on_step is None else each)
    else:
        sol = solve_shared(rhs, y0, t0, t1, method=method, rtol=rtol, atol=atol, norm=norm_batch,
                           max_steps=max_steps, jump_t=jump_t, grid=grid, t_eval=t_eval, on_accept=on_step)
    return sol if to_t is None else dataclasses.replace(sol, t=to_t(sol.t).to(sol.t.dtype))


def record(stats: dict, sol: PerSampleSolution) -> None:
    """The shared stats keys: ``status`` (the batch's: ``success`` or its most severe failure),
    ``sample_status``, ``accepted``, ``rejected``, ``t_reached`` (per-sample lists),
    ``accepted_steps``/``rejected_steps`` (the most of any sample) and ``nfe_integrator``
    (batched right-hand-side calls)."""
    names = sol.status_names
    stats.update(status=worst(names), sample_status=list(names), accepted=sol.accepted.tolist(),
                 rejected=sol.rejected.tolist(), t_reached=sol.t.tolist(), nfe_integrator=sol.calls,
                 accepted_steps=int(sol.accepted.max()) if sol.accepted.numel() else 0,
                 rejected_steps=int(sol.rejected.max()) if sol.rejected.numel() else 0)


def worst(names) -> str:
    """The batch's status: the most severe of ``names`` (nonfinite, then underflow, then
    max_steps, then aborted), ``success`` if all succeeded."""
    for kind in STATUS_NAMES[:0:-1] + ("aborted",):
        if kind in names:
            return kind
    return "success"


def failure(sol: PerSampleSolution, *, what: str, max_steps: int, nfe: int,
            detail: str = "") -> tuple[str, list[int], str] | None:
    """``(kind, samples, message)`` for the most severe failure of ``sol``, or None.  The
    message names the solver (``what``), the samples, the times they reached and the NFE."""
    names = sol.status_names
    kind = worst(names)
    if kind == "success":
        return None
    if kind == "aborted":
        kind = next(n for n in names if n != "success")
    idx = [i for i, n in enumerate(names) if n == kind]
    where = ", ".join(f"{float(sol.t[i]):.6g}" for i in idx[:5]) + (", ..." if len(idx) > 5 else "")
    steps = ", ".join(str(int(sol.accepted[i])) for i in idx[:5]) + (", ..." if len(idx) > 5 else "")
    msg = (f"{what} failed for {sample_list(idx)}: {_WHY[kind].format(max_steps=max_steps)}, at t={where} "
           f"after {steps} accepted steps; nfe={nfe}" + (f"; {detail}" if detail else ""))
    return kind, idx, msg


def raise_failure(kind: str, msg: str, *, sol: PerSampleSolution, nfe: int, partial=None,
                  status=None, cause: Exception | None = None) -> None:
    """Raise the error for a failure found by :func:`failure` (:class:`NonFiniteError` for
    ``nonfinite``, else :class:`SolverError`) with ``t_reached``/``last_dt`` of the first failed
    sample, ``nfe``, ``status`` (per sample) and ``partial``."""
    names = sol.status_names
    bad = [i for i, n in enumerate(names) if n == kind]
    times = sol.t[bad] if bad else sol.t
    cls = NonFiniteError if kind == "nonfinite" else SolverError
    last_dt = float(sol.dt[bad[0]]) if sol.dt is not None and bad else None
    raise cls(msg, t_reached=float(times[0]) if times.numel() else None, nfe=nfe, last_dt=last_dt,
              status=list(names) if status is None else status, partial=partial) from cause
