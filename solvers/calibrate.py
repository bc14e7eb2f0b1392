r"""Calibrated time grids: fit the ``steps`` of a fixed-step solver on a few calibration samples.

The sampling trajectories of one model are so alike that a grid fitted on a few dozen
calibration samples serves every later sample (Chen, Zhou, Wang, Shen & Lyu 2024, "On the
Trajectory Regularity of ODE-based Diffusion Sampling" (GITS), ICML).

**0. Split.**  The calibration batch is split deterministically into a *fit* part and a
*held-out* part: sample i is held out when :math:`\lfloor (i+1) f\rfloor > \lfloor i f\rfloor`
(``held_out`` = f, default 1/2: the odd-numbered samples), so the held-out samples are spread
evenly over the batch.  Stages 1 and 2 see only the fit part; stage 3 only the held-out part.

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

**2. Refinement for a method** (when ``method`` is given).  The grid is fitted to the method's
*global* error on the fit part, :math:`E = \mathrm{RMS}(\text{method}(x_{fit}; \text{grid}) - X_M)`
(against :math:`\hat x_0(X_M)` with ``final_denoise``): from the best of the GITS grid and the
standard grids, a pattern search moves each interior node in turn by a fraction (1/2, then
1/4, 1/8) of the gap to its nearer neighbour in log-SNR, while that lowers E on both halves of
the fit part (a guard against following a few hard trajectories).  ``steps`` NFE per trial,
``max_trials`` trials at most.

**3. Selection on the held-out part.**  The fitted grid (the GITS grid when ``method`` is None,
judged with DDIM) and every standard grid of :data:`solvers.SCHEDULES` (Karras with
:math:`\rho = 7`) for the same method, steps and end points are run on the held-out part; the
one with the least held-out error is returned.  So the result is never worse *on the held-out
part* than any standard grid; on new samples it is a fit like any other, and the held-out
part makes a fit that does not generalise lose to the standard grid instead of being returned.
It cannot guard against hard trajectories that the batch lacks: on the d=64 diagonal mixture
(DPM-Solver++(2M), 10 steps, 128 calibration samples) the fitted grid won on the held-out part
(RMS 0.009 against 0.040 for log-SNR) and on 63 of 64 new samples, but one new sample that the
grid sent to another mode (error 0.88) made its RMS over the 64 worse than log-SNR's (0.11 vs 0.046).

:func:`calibrate_many` calibrates several step counts with one teacher trajectory and makes
the held-out error non-increasing in the step budget (see there).

The result is a grid from ``t_start`` to ``t_end`` (end points exact), for
``solvers.sample(..., timesteps=grid.timesteps)``.  It is a fit to one model and one NFE:
recalibrate when either changes.  Use a hundred or more calibration samples.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from scoresde._checks import check_batch_tensor, check_int
from scoresde.model import ScoreModel
from scoresde.sde import LinearSDE

from .timesteps import make_grid

__all__ = ["CalibratedGrid", "calibrate_timesteps", "calibrate_many", "min_cost_path", "held_out_mask"]

#: the standard grids tried as starting points of the refinement and judged in stage 3
START_SCHEDULES = ("log_snr", "uniform", "quadratic", "karras")
#: the default held-out fraction of the calibration batch
HELD_OUT = 0.5


@dataclass(frozen=True)
class CalibratedGrid:
    """``timesteps``: the float64 CPU grid (pass it as ``timesteps=``).
    ``source``: which candidate won on the held-out part ("fitted", a schedule name, or, from
    :func:`calibrate_many`, "refined" / "reused").  ``held_out_errors``: the held-out RMS error
    of every candidate judged; ``held_out_error``: the winner's.  ``local_error`` /
    ``uniform_local_error``: the summed first-order local errors of the GITS path and of the
    log-SNR-uniform path through the fine grid.  ``calibration_error``: the fitted grid's error
    on the fit part (with a ``method``; else NaN), ``start`` / ``start_error``: the grid the
    refinement started from and its error there.  ``nfe``: every network call the calibration
    made, counted at the model (for :func:`calibrate_many`: the shared teacher counted once,
    in the first result, and each result's own calls).  ``method`` / ``method_options`` /
    ``final_denoise``: how the grid is meant to be run ("ddim" when calibrated without a
    method); ``nfe_per_sample``: what one such run costs."""

    timesteps: Tensor
    local_error: float
    uniform_local_error: float
    calibration_error: float
    start: str
    start_error: float
    nfe: int
    source: str = "fitted"
    held_out_error: float = float("nan")
    held_out_errors: dict = field(default_factory=dict)
    method: Any = None
    method_options: dict = field(default_factory=dict)
    final_denoise: bool = False

    @property
    def steps(self) -> int:
        return self.timesteps.numel() - 1

    @property
    def nfe_per_sample(self) -> int:
        return self.steps + int(self.final_denoise)


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


def held_out_mask(n: int, fraction: float = HELD_OUT) -> Tensor:
    """Boolean mask of the held-out samples of a batch of ``n``: sample i is held out when
    ``floor((i+1) f) > floor(i f)`` (f = ``fraction``; 1/2 holds out the odd-numbered ones)."""
    i = torch.arange(n, dtype=torch.float64)
    return torch.floor((i + 1) * fraction) > torch.floor(i * fraction)


# ---------------------------------------------------------------- shared state of one calibration
@dataclass
class _Calibration:
    """What every step count of one calibration shares: the model, the split, the fine grid, the
    teacher's end states (the targets) and the GITS cost matrix (fit part)."""
    model: ScoreModel
    x_fit: Tensor
    x_held: Tensor
    target_fit: Tensor
    target_held: Tensor
    fine_t: Tensor
    cost: Tensor
    method: Any
    method_options: dict
    final_denoise: bool
    t_end: float | None
    t_start: float | None

    @property
    def sde(self) -> LinearSDE:
        return self.model.sde

    def run(self, t: Tensor, x: Tensor, target: Tensor) -> Tensor:
        """The method on grid ``t`` from ``x``: per-sample squared errors against ``target``
        (inf where the run fails)."""
        from .base import sample
        sol = sample(self.model, x, self.method, timesteps=t, final_denoise=self.final_denoise,
                     nonfinite="return", **self.method_options)
        if sol.stats.get("status") != "success":
            return torch.full((x.shape[0],), float("inf"), dtype=torch.float64)
        err = (sol.x.double() - target.double()).reshape(x.shape[0], -1).pow(2).mean(1).cpu()
        return torch.nan_to_num(err, nan=float("inf"))

    def fit_error(self, t: Tensor) -> tuple[float, float, float]:
        """RMS error on (all, first half, second half) of the fit part."""
        se = self.run(t, self.x_fit, self.target_fit)
        half = se.shape[0] // 2
        return tuple(float(p.mean().sqrt()) if p.numel() else float("inf")
                     for p in (se, se[:half], se[half:]))

    def held_error(self, t: Tensor) -> float:
        return float(self.run(t, self.x_held, self.target_held).mean().sqrt())

    def standard_grids(self, steps: int) -> dict[str, Tensor]:
        t_s, t_e = float(self.fine_t[0]), float(self.fine_t[-1])
        grids = {}
        for sch in START_SCHEDULES:
            try:
                grids[sch] = make_grid(self.sde, steps, sch, t_e, t_s).t
            except ValueError:
                pass
        return grids

    def grid_of(self, log_snr: Tensor) -> Tensor:
        t = self.sde.t_of_log_snr_unchecked(log_snr)
        t[0], t[-1] = self.fine_t[0], self.fine_t[-1]   # exact end points despite round-off
        return t


def _check_options(method, method_options, teacher_options, final_denoise) -> dict:
    from ._registry import get
    if not isinstance(final_denoise, bool):
        raise TypeError(f"final_denoise must be a bool, got {final_denoise!r}")
    for name, opts in (("method_options", method_options), ("teacher_options", teacher_options)):
        if opts is not None and not isinstance(opts, dict):
            raise TypeError(f"{name} must be a dict of options, got {type(opts).__name__}")
    method_options = dict(method_options or {})
    if method is not None:
        get(method, **method_options)            # a bad name or option fails here, before any call
    return method_options


def _check_held_out(held_out: Any, n: int) -> Tensor:
    if isinstance(held_out, bool) or not isinstance(held_out, (int, float)) or not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out must be a fraction in (0, 1); got {held_out!r}")
    mask = held_out_mask(n, float(held_out))
    if not 0 < int(mask.sum()) < n:
        raise ValueError(f"x_start must hold enough calibration samples for a fit part and a held-out "
                         f"part (held_out={held_out}); got {n}")
    return mask


def check_calibration_input(model: Any, x_start: Any, who: str) -> tuple[ScoreModel, Tensor]:
    """The model (on a LinearSDE) and a non-empty batch of calibration states, checked."""
    from .base import _check_model
    model = _check_model(model)
    if not isinstance(model.sde, LinearSDE):
        raise TypeError(f"{who} needs a LinearSDE (alpha, sigma); got {type(model.sde).__name__}")
    x_start = check_batch_tensor(x_start, "x_start")
    if x_start.shape[0] == 0:
        raise ValueError("x_start must hold at least one calibration sample; got an empty batch")
    return model, x_start


def _prepare(model, x_start, *, method, method_options, t_start, t_end, final_denoise, fine_steps,
             teacher, teacher_options, teacher_refine, held_out) -> _Calibration:
    """Check the arguments (before any network call), split the batch, run the teacher and
    build the GITS cost matrix on the fit part (stage 0 and the shared part of stage 1)."""
    from .base import sample
    model, x_start = check_calibration_input(model, x_start, "calibrate_timesteps")
    sde = model.sde
    fine_steps = check_int(fine_steps, "fine_steps", minimum=1)
    teacher_refine = check_int(teacher_refine, "teacher_refine", minimum=1)
    method_options = _check_options(method, method_options, teacher_options, final_denoise)
    held = _check_held_out(held_out, x_start.shape[0]).to(x_start.device)
    fine = make_grid(sde, fine_steps, "log_snr", t_end, t_start)
    coef = sde.coefficients(fine.t)
    log_snr = coef["log_snr"]
    u = torch.arange(teacher_refine, dtype=torch.float64) / teacher_refine
    log_snr_ref = torch.cat([(log_snr[:-1, None] + u * (log_snr[1:, None] - log_snr[:-1, None])).reshape(-1),
                             log_snr[-1:]])
    t_ref = sde.t_of_log_snr_unchecked(log_snr_ref)
    t_ref[::teacher_refine] = fine.t          # the fine nodes exactly
    X = sample(model, x_start, teacher, timesteps=t_ref, return_trajectory=True,
               **(teacher_options or {})).trajectory[::teacher_refine]
    fit = ~held
    with torch.no_grad():
        D = torch.stack([model.x0(X[m][fit], float(fine.t[m])) for m in range(fine_steps)] + [X[-1][fit]])
        end = model.x0(X[-1], float(fine.t[-1])) if final_denoise else X[-1]
    return _Calibration(model, x_start[fit], x_start[held], end[fit], end[held], fine.t,
                        _step_costs(X[:, fit], D, coef), method or "ddim", method_options if method else {},
                        final_denoise, t_end, t_start)


# ---------------------------------------------------------------- stages 1-3 for one step count
def _gits(cal: _Calibration, steps: int) -> tuple[Tensor, float, float]:
    """Stage 1: the GITS grid, its summed local error and that of the log-SNR-uniform path."""
    fine_steps = cal.fine_t.numel() - 1
    if steps > fine_steps:
        raise ValueError(f"steps must be <= fine_steps; got steps={steps}, fine_steps={fine_steps}")
    path, total = min_cost_path(cal.cost, steps)
    even = torch.linspace(0, fine_steps, steps + 1).round().long().tolist()
    uniform = sum(float(cal.cost[a, b]) for a, b in zip(even[:-1], even[1:]))
    return cal.fine_t[path].clone(), total, uniform


def _pattern_search(cal: _Calibration, t: Tensor, err: tuple, max_trials: int) -> tuple[Tensor, tuple]:
    """Stage 2 from grid ``t`` (fit-part errors ``err``): move one interior node at a time by
    1/2, 1/4, 1/8 of the gap to its nearer neighbour in log-SNR while both halves improve."""
    log_snr = cal.sde.log_snr_unchecked(t).clone()
    steps, trials = t.numel() - 1, 0
    two_halves = cal.x_fit.shape[0] >= 2
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
                    trial_t = cal.grid_of(trial)
                    if not bool((trial_t[1:] < trial_t[:-1]).all()):
                        continue
                    trials += 1
                    e = cal.fit_error(trial_t)
                    if (e[1] < err[1] and e[2] < err[2]) if two_halves else e[0] < err[0]:
                        err, t, log_snr, improved = e, trial_t, trial, True
                        break
    return t, err


def _select(cal: _Calibration, candidates: dict[str, Tensor]) -> tuple[str, dict[str, float]]:
    """Stage 3: the held-out error of every candidate and the name of the least (first on ties)."""
    errors = {name: cal.held_error(t) for name, t in candidates.items()}
    return min(errors, key=errors.__getitem__), errors


def _calibrate_one(cal: _Calibration, steps: int, refine: bool, max_trials: int) -> CalibratedGrid:
    """Stages 1-3 for one step count; ``nfe`` is the calls made here."""
    nfe0 = cal.model.nfe
    gits, total, uniform = _gits(cal, steps)
    standard = cal.standard_grids(steps)
    fitted, start, fit_err, start_err = gits, "gits", float("nan"), float("nan")
    if refine:
        starts = {"gits": gits, **standard}
        scored = {name: cal.fit_error(t) for name, t in starts.items()}
        start = min(scored, key=lambda k: scored[k][0])
        fitted, err = _pattern_search(cal, starts[start], scored[start], max_trials)
        fit_err, start_err = err[0], scored[start][0]
    source, errors = _select(cal, {"fitted": fitted, **standard})
    chosen = fitted if source == "fitted" else standard[source]
    return CalibratedGrid(chosen.clone(), total, uniform, fit_err, start, start_err, cal.model.nfe - nfe0,
                          source, errors[source], errors, cal.method, dict(cal.method_options), cal.final_denoise)


def calibrate_timesteps(model: ScoreModel, x_start: Tensor, steps: int, *, method: Any = None,
                        method_options: dict | None = None, t_start: float | None = None,
                        t_end: float | None = None, final_denoise: bool = False, fine_steps: int = 100,
                        teacher: Any = "dpmpp_3m", teacher_options: dict | None = None,
                        teacher_refine: int = 4, max_trials: int = 400,
                        held_out: float = HELD_OUT) -> CalibratedGrid:
    """Fit a grid of ``steps`` intervals from ``t_start`` (default T) to ``t_end`` (default
    ``sde.default_t_end``) on the calibration states ``x_start`` (samples of the marginal at
    ``t_start``, a hundred or more, not the ones sampled later), and return the best of it and
    the standard grids on the held-out part (module docstring).

    - ``method`` / ``method_options``: the solver the grid is for (stage 2); None stops at the
      GITS grid and judges with DDIM.  ``final_denoise``: the method will be run with it.
    - ``fine_steps``: candidate nodes of the GITS stage (uniform in log-SNR, >= ``steps``).
    - ``teacher`` / ``teacher_options``: the method computing the calibration trajectory
      (default DPM-Solver++(3M); a method whose trajectory holds its final states -- not
      UniPC), on the fine grid refined ``teacher_refine`` times.
    - ``max_trials``: the refinement's budget of trial runs; ``held_out``: the held-out fraction.
    """
    steps = check_int(steps, "steps", minimum=1)
    max_trials = check_int(max_trials, "max_trials", minimum=0)
    if isinstance(fine_steps, int) and not isinstance(fine_steps, bool) and steps > fine_steps:
        raise ValueError(f"steps must be <= fine_steps; got steps={steps}, fine_steps={fine_steps}")
    nfe0 = getattr(model, "nfe", 0)
    cal = _prepare(model, x_start, method=method, method_options=method_options, t_start=t_start, t_end=t_end,
                   final_denoise=final_denoise, fine_steps=fine_steps, teacher=teacher,
                   teacher_options=teacher_options, teacher_refine=teacher_refine, held_out=held_out)
    result = _calibrate_one(cal, steps, method is not None, max_trials)
    return replace(result, nfe=cal.model.nfe - nfe0)


# ---------------------------------------------------------------- several budgets, monotone
def _insert_nodes(cal: _Calibration, t: Tensor, steps: int, in_log_snr: bool) -> Tensor:
    """Grid ``t`` with nodes added until it has ``steps`` intervals: each new node bisects the
    currently widest interval (in log-SNR, or in t)."""
    log_snr = cal.sde.log_snr_unchecked(t)
    nodes = (log_snr if in_log_snr else -t).tolist()
    while len(nodes) - 1 < steps:
        gaps = [b - a for a, b in zip(nodes[:-1], nodes[1:])]
        j = max(range(len(gaps)), key=gaps.__getitem__)
        nodes.insert(j + 1, 0.5 * (nodes[j] + nodes[j + 1]))
    nodes = torch.tensor(nodes, dtype=torch.float64)
    if in_log_snr:
        return cal.grid_of(nodes)
    out = -nodes
    out[0], out[-1] = t[0], t[-1]
    return out


def _make_monotone(cal: _Calibration, prev: CalibratedGrid, cur: CalibratedGrid, steps: int,
                   refine: bool, max_trials: int) -> CalibratedGrid:
    """When ``cur`` (``steps`` intervals) is worse on the held-out part than ``prev`` (fewer):
    try ``prev``'s grid with nodes inserted (bisecting the widest log-SNR or t intervals;
    with a ``method`` then pattern-searched on the fit part); keep the best on the held-out
    part; if still worse than ``prev``, return ``prev``'s grid itself ("reused")."""
    nfe0 = cal.model.nfe
    tries = {f"refined_{kind}": _insert_nodes(cal, prev.timesteps, steps, kind == "log_snr")
             for kind in ("log_snr", "t")}
    if refine:
        scored = {name: cal.fit_error(t) for name, t in tries.items()}
        best = min(scored, key=lambda k: scored[k][0])
        tries["refined_search"], _ = _pattern_search(cal, tries[best], scored[best], max_trials)
    name, errors = _select(cal, tries)
    errors = {**cur.held_out_errors, **errors}
    nfe = cur.nfe + cal.model.nfe - nfe0
    if errors[name] < cur.held_out_error:
        cur = replace(cur, timesteps=tries[name].clone(), source="refined", held_out_error=errors[name])
    cur = replace(cur, held_out_errors=errors, nfe=nfe)
    if cur.held_out_error > prev.held_out_error:
        cur = replace(cur, timesteps=prev.timesteps.clone(), source="reused", held_out_error=prev.held_out_error)
    return cur


def calibrate_many(model: ScoreModel, x_start: Tensor, steps_list: Any, *, method: Any = None,
                   method_options: dict | None = None, t_start: float | None = None, t_end: float | None = None,
                   final_denoise: bool = False, fine_steps: int = 100, teacher: Any = "dpmpp_3m",
                   teacher_options: dict | None = None, teacher_refine: int = 4, max_trials: int = 400,
                   held_out: float = HELD_OUT) -> dict[int, CalibratedGrid]:
    """:func:`calibrate_timesteps` for every step count of ``steps_list`` (arguments as there),
    sharing one teacher trajectory; returns ``{steps: CalibratedGrid}`` in increasing steps.

    **Monotone rule.**  Going up the sorted step counts, when a budget's winner is worse on the
    held-out part than the previous budget's result, the previous grid refined by inserting
    nodes is tried (:func:`_make_monotone`) and the best kept; if that is still worse, the
    previous budget's grid is returned for this budget too (``source == "reused"``: a grid of
    fewer intervals than the budget).  Guarantee: ``held_out_error`` is non-increasing in
    steps -- on the held-out part, the only samples it is measured on.  Each result's ``nfe``
    counts its own calls; the teacher's are counted in the smallest budget's.
    """
    if isinstance(steps_list, (str, bytes)) or not hasattr(steps_list, "__iter__"):
        raise TypeError(f"steps_list must be a sequence of step counts, got {type(steps_list).__name__}")
    counts = sorted({check_int(s, "steps_list entries", minimum=1) for s in steps_list})
    if not counts:
        raise ValueError("steps_list must hold at least one step count; got an empty sequence")
    max_trials = check_int(max_trials, "max_trials", minimum=0)
    if isinstance(fine_steps, int) and not isinstance(fine_steps, bool) and counts[-1] > fine_steps:
        raise ValueError(f"steps_list entries must be <= fine_steps; got {counts[-1]}, fine_steps={fine_steps}")
    nfe0 = getattr(model, "nfe", 0)
    cal = _prepare(model, x_start, method=method, method_options=method_options, t_start=t_start, t_end=t_end,
                   final_denoise=final_denoise, fine_steps=fine_steps, teacher=teacher,
                   teacher_options=teacher_options, teacher_refine=teacher_refine, held_out=held_out)
    teacher_nfe = cal.model.nfe - nfe0
    out: dict[int, CalibratedGrid] = {}
    prev = None
    for steps in counts:
        cur = _calibrate_one(cal, steps, method is not None, max_trials)
        if prev is not None and cur.held_out_error > prev.held_out_error:
            cur = _make_monotone(cal, prev, cur, steps, method is not None, max_trials)
        out[steps] = prev = cur
    first = counts[0]
    out[first] = replace(out[first], nfe=out[first].nfe + teacher_nfe)
    return out
