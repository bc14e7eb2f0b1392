r"""Calibrated time grids: fit the ``steps`` of a fixed-step solver on a few calibration samples.

The sampling trajectories of one model are so alike that a grid fitted on a few dozen
calibration samples serves every later sample (Chen, Zhou, Wang, Shen & Lyu 2024, "On the
Trajectory Regularity of ODE-based Diffusion Sampling" (GITS), ICML).  The fit has two stages.

**1. GITS grid** (their Sec. 4).  A fine grid :math:`t^f_0 = t_{start} > \dots > t^f_M = t_{end}`
uniform in the log-SNR :math:`\log(\alpha^2/\sigma^2)`; a teacher trajectory :math:`X_m` at its
nodes (``teacher`` with ``teacher_refine`` sub-steps per fine interval) with data predictions
:math:`D_m = \hat x_0(X_m, t^f_m)`; the local error of one first-order (DDIM /
DPM-Solver++-1) step from node m to node n > m,

.. math:: c_{mn} = \mathrm{RMS}\Big(\frac{\sigma_n}{\sigma_m}X_m - \alpha_n(e^{-h}-1)D_m - X_n\Big),
          \qquad h = \lambda_n - \lambda_m,\quad \lambda = \log(\alpha/\sigma),

(no further network call); and, by dynamic programming, the path
:math:`0 = m_0 < \dots < m_K = M` of exactly K = ``steps`` jumps with the least
:math:`\sum_k c_{m_{k-1} m_k}`.

**2. Refinement for a method** (when ``method`` is given).  Summed local errors ignore how
errors propagate, and a higher-order method's local error is not the first-order one, so the
grid is then fitted to what matters: the method's *global* error on the calibration batch,
:math:`E(\lambda_1..\lambda_{K-1}) = \mathrm{RMS}(\text{method}(x_{cal}; \text{grid}) - X_M)`
(against :math:`\hat x_0(X_M)` with ``final_denoise``).  It starts from the best of the GITS grid
and the log-SNR, uniform-t, quadratic and Karras grids, and runs a pattern search: each
interior node in turn moves by a fraction (1/2, then 1/4, 1/8) of the gap to its nearer
neighbour, in log-SNR (equivalently in :math:`\lambda`), while that lowers E.  Costs ``steps`` NFE per trial on the
calibration batch (``max_trials`` at most).

The result is a grid of exactly ``steps`` intervals from ``t_start`` to ``t_end`` (end points
exact), for ``solvers.sample(..., timesteps=grid.timesteps)``.  What it buys is measured in
the validation suite (``docs/validation``: the d=64 mixture at 5-20 NFE) and in
``tests/test_calibrate.py`` on held-out samples; it is a fit, and a fit to one model and one
NFE: recalibrate when either changes.  Use a hundred or more calibration samples: where a few
trajectories carry most of the error (samples near the boundary between two modes), a fit to
a few dozen follows those and can lose to a standard grid on new samples (measured on
mixtures in 8-64 dimensions with 32 calibration samples; with 128 it won on every case we
ran: ``tests/test_calibrate.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from scoresde._checks import check_batch_tensor, check_int
from scoresde.model import ScoreModel
from scoresde.sde import LinearSDE

from .timesteps import make_grid

__all__ = ["CalibratedGrid", "calibrate_timesteps", "min_cost_path"]

#: the standard grids also tried as starting points of the refinement
START_SCHEDULES = ("log_snr", "uniform", "quadratic", "karras")


@dataclass(frozen=True)
class CalibratedGrid:
    """``timesteps``: the float64 CPU grid (``steps + 1`` points; pass it as ``timesteps=``).
    ``local_error`` / ``uniform_local_error``: the summed first-order local errors of the GITS
    path and of the log-SNR-uniform path through the fine grid.  With a ``method``:
    ``calibration_error`` (its global RMS error on the calibration batch on this grid),
    ``start`` (the grid the refinement started from) and ``start_error`` (its error there);
    else NaN / "gits".  ``nfe``: the network calls the calibration made."""

    timesteps: Tensor
    local_error: float
    uniform_local_error: float
    calibration_error: float
    start: str
    start_error: float
    nfe: int


def min_cost_path(cost: Tensor, steps: int) -> tuple[list[int], float]:
    """The path ``0 = m_0 < ... < m_steps = M`` of ``steps`` jumps through an upper-triangular
    ``[M+1, M+1]`` cost matrix (``cost[m, n]``: the cost of jumping from m to n > m) with the
    least total cost, by dynamic programming in O(steps M^2); returns (path, total)."""
    n_nodes = cost.shape[0]
    last = n_nodes - 1
    steps = check_int(steps, "steps", minimum=1)
    if steps > last:
        raise ValueError(f"steps must be <= the number of fine intervals {last}; got {steps}")
    inf = torch.tensor(float("inf"), dtype=cost.dtype)
    jump = torch.where(torch.ones_like(cost, dtype=torch.bool).triu(1), cost, inf)
    best = torch.full((n_nodes,), float("inf"), dtype=cost.dtype)
    best[0] = 0.0
    back = []
    for _ in range(steps):
        total = best[:, None] + jump          # [from, to]
        best, arg = total.min(0)
        back.append(arg)
    path = [last]
    for arg in reversed(back):
        path.append(int(arg[path[-1]]))
    return path[::-1], float(best[last])


def _step_costs(X: Tensor, D: Tensor, coef: dict[str, Tensor]) -> Tensor:
    """c[m, n] of the module docstring for every m < n (inf elsewhere), float64; ``coef`` is
    ``sde.coefficients`` at the fine nodes (the SDE's own alpha and sigma)."""
    n_nodes = X.shape[0]
    alpha, sigma, log_snr = coef["alpha"], coef["sigma"], coef["log_snr"]
    cost = torch.full((n_nodes, n_nodes), float("inf"), dtype=torch.float64)
    flat_x = X.reshape(n_nodes, -1)
    flat_d = D.reshape(n_nodes, -1)
    for m in range(n_nodes - 1):
        n = torch.arange(m + 1, n_nodes)
        h = 0.5 * (log_snr[n] - log_snr[m])
        a = (sigma[n] / sigma[m]).to(dtype=flat_x.dtype, device=flat_x.device)[:, None]
        b = (alpha[n] * torch.expm1(-h)).to(dtype=flat_x.dtype, device=flat_x.device)[:, None]
        err = a * flat_x[m] - b * flat_d[m] - flat_x[n]
        cost[m, m + 1:] = err.double().pow(2).mean(1).sqrt().cpu()
    return cost


def _rms(a: Tensor, b: Tensor) -> float:
    e = float((a.double() - b.double()).pow(2).mean().sqrt())
    return e if e == e else float("inf")


def calibrate_timesteps(model: ScoreModel, x_start: Tensor, steps: int, *, method: Any = None,
                        method_options: dict | None = None, t_start: float | None = None,
                        t_end: float | None = None, final_denoise: bool = False, fine_steps: int = 100,
                        teacher: Any = "dpmpp_3m", teacher_options: dict | None = None,
                        teacher_refine: int = 4, max_trials: int = 400) -> CalibratedGrid:
    """Fit a grid of ``steps`` intervals from ``t_start`` (default T) to ``t_end`` (default
    ``sde.default_t_end``) on the calibration states ``x_start`` (samples of the marginal at
    ``t_start``, a hundred or more, not the ones sampled later).

    - ``method`` / ``method_options``: the solver the grid is for (stage 2 of the module
      docstring); None stops at the GITS grid.  ``final_denoise``: the method will be run with
      it (``steps`` counts the grid intervals either way).
    - ``fine_steps``: candidate nodes of the GITS stage (uniform in log-SNR, >= ``steps``).
    - ``teacher`` / ``teacher_options``: the method computing the calibration trajectory
      (default DPM-Solver++(3M); a method whose trajectory holds its final states -- not
      UniPC, whose recorded states are the predictor's), on the fine grid refined
      ``teacher_refine`` times.
    - ``max_trials``: the refinement's budget of trial runs.
    """
    from ._registry import get
    from .base import _check_model, sample

    model = _check_model(model)
    sde = model.sde
    if not isinstance(sde, LinearSDE):
        raise TypeError(f"calibrate_timesteps needs a LinearSDE (alpha, sigma); got {type(sde).__name__}")
    x_start = check_batch_tensor(x_start, "x_start")
    if x_start.shape[0] == 0:
        raise ValueError("x_start must hold at least one calibration sample; got an empty batch")
    steps = check_int(steps, "steps", minimum=1)
    fine_steps = check_int(fine_steps, "fine_steps", minimum=1)
    teacher_refine = check_int(teacher_refine, "teacher_refine", minimum=1)
    max_trials = check_int(max_trials, "max_trials", minimum=0)
    if steps > fine_steps:
        raise ValueError(f"steps must be <= fine_steps; got steps={steps}, fine_steps={fine_steps}")
    if not isinstance(final_denoise, bool):
        raise TypeError(f"final_denoise must be a bool, got {final_denoise!r}")
    for name, opts in (("method_options", method_options), ("teacher_options", teacher_options)):
        if opts is not None and not isinstance(opts, dict):
            raise TypeError(f"{name} must be a dict of options, got {type(opts).__name__}")
    method_options = dict(method_options or {})
    if method is not None:
        get(method, **method_options)            # a bad name or option fails here, before any call
    fine = make_grid(sde, fine_steps, "log_snr", t_end, t_start)
    coef = sde.coefficients(fine.t)
    log_snr_fine = coef["log_snr"]
    nfe0 = model.nfe

    # ---- stage 1: teacher trajectory, first-order local errors, GITS path
    u = torch.arange(teacher_refine, dtype=torch.float64) / teacher_refine
    log_snr_ref = torch.cat([(log_snr_fine[:-1, None] + u * (log_snr_fine[1:, None] - log_snr_fine[:-1, None]))
                             .reshape(-1), log_snr_fine[-1:]])
    t_ref = sde.t_of_log_snr_unchecked(log_snr_ref)
    t_ref[::teacher_refine] = fine.t          # the fine nodes exactly
    X = sample(model, x_start, teacher, timesteps=t_ref, return_trajectory=True,
               **(teacher_options or {})).trajectory[::teacher_refine]
    with torch.no_grad():
        D = torch.stack([model.x0(X[m], float(fine.t[m])) for m in range(fine_steps)] + [X[-1]])
    cost = _step_costs(X, D, coef)
    path, total = min_cost_path(cost, steps)
    even = torch.linspace(0, fine_steps, steps + 1).round().long().tolist()
    uniform = sum(float(cost[a, b]) for a, b in zip(even[:-1], even[1:]))
    gits = fine.t[path].clone()
    if method is None:
        return CalibratedGrid(gits, total, uniform, float("nan"), "gits", float("nan"), model.nfe - nfe0)

    # ---- stage 2: the method's global error on the calibration batch, pattern search in log-SNR
    t_s, t_e = float(fine.t[0]), float(fine.t[-1])
    with torch.no_grad():
        target = model.x0(X[-1], t_e) if final_denoise else X[-1]

    half = x_start.shape[0] // 2

    def error(t: Tensor) -> tuple[float, float, float]:
        """(all, first half, second half) of the calibration batch: a move must lower the error
        of both halves (a guard against fitting the grid to a few hard trajectories)."""
        sol = sample(model, x_start, method, timesteps=t, final_denoise=final_denoise, nonfinite="return",
                     **method_options)
        if sol.stats.get("status") != "success":
            return (float("inf"),) * 3
        return _rms(sol.x, target), _rms(sol.x[:half], target[:half]), _rms(sol.x[half:], target[half:])

    def grid_of(log_snr: Tensor) -> Tensor:
        t = sde.t_of_log_snr_unchecked(log_snr)
        t[0], t[-1] = t_s, t_e            # exact end points despite round-off of the inverse
        return t

    def better(e: tuple, than: tuple) -> bool:
        return (e[1] < than[1] and e[2] < than[2]) if half else e[0] < than[0]

    starts = {"gits": gits}
    for sch in START_SCHEDULES:
        try:
            starts[sch] = make_grid(sde, steps, sch, t_e, t_s).t
        except ValueError:
            pass
    scored = {name: error(t) for name, t in starts.items()}
    start = min(scored, key=lambda k: scored[k][0])
    best_t, best = starts[start], scored[start]
    log_snr = sde.log_snr_unchecked(best_t).clone()
    trials = 0
    for frac in (0.5, 0.25, 0.125):
        improved = True
        while improved and trials < max_trials:
            improved = False
            for j in range(1, steps):
                gap = min(float(log_snr[j] - log_snr[j - 1]), float(log_snr[j + 1] - log_snr[j]))
                for sign in (-1.0, 1.0):
                    if trials >= max_trials:
                        break
                    trial = log_snr.clone()
                    trial[j] = log_snr[j] + sign * frac * gap
                    t = grid_of(trial)
                    if not bool((t[1:] < t[:-1]).all()):
                        continue
                    trials += 1
                    e = error(t)
                    if better(e, best):
                        best, best_t, log_snr, improved = e, t, trial, True
                        break
    return CalibratedGrid(best_t.clone(), total, uniform, best[0], start, scored[start][0], model.nfe - nfe0)
