r"""Optimised time grids from a cheap local-error objective, in the spirit of Align Your Steps.

Sabour, Fidler & Kreis 2024, "Align Your Steps: Optimizing Sampling Schedules in Diffusion
Models" (ICML), move the interior nodes of a grid to minimise a KL upper bound, refining the
grid iteratively.  Here the objective is a per-interval local truncation error estimate, far
cheaper than :func:`solvers.calibrate_timesteps` (no fine teacher trajectory, no global runs):

**Local error by step doubling.**  Along the current grid (nodes :math:`\lambda_0 < \dots <
\lambda_K` in :math:`\lambda = \log(\alpha/\sigma)`, end points fixed), from the state
:math:`X_k` at node k, one first-order (DDIM) step to node k+1 and two half-steps (through the
:math:`\lambda`-midpoint) differ by :math:`e_k \approx \tfrac12 |x''| h_k^2` (RMS over the
calibration samples); the two-half-step state continues the trajectory.  Two NFE per interval.
**Propagation weight.**  A local error made at node k+1 reaches the end scaled by the flow's
Jacobian; for data of per-coordinate scale :math:`s` (``data_std``, default 0.5 as EDM's
:math:`\sigma_{data}`) that is about
:math:`g_k = \sqrt{(\alpha_{end}^2 s^2 + \sigma_{end}^2)/(\alpha_{k+1}^2 s^2 + \sigma_{k+1}^2)}`
(exact for a Gaussian :math:`N(\mu, s^2 I)`): errors made at high noise are contracted.  So
:math:`\kappa_k = g_k e_k/h_k^2` estimates the weighted curvature on interval k.

**Update.**  A method of order p has local error :math:`\approx C\kappa h^{p+1}`.  The grid
*equidistributes* it (the rule of adaptive step-size control): :math:`\kappa_k h_k^{p+1}` equal
on every interval, i.e. the node density :math:`\rho(\lambda) \propto \kappa(\lambda)^{1/(p+1)}`.
The new nodes are the equal quantiles of :math:`\int\rho\,d\lambda` with :math:`\rho`
piecewise constant on the current intervals (floored at ``floor`` times its mean, and mixed
``damping`` : 1 - ``damping`` with the old grid's density for stability).  ``iterations``
rounds from the log-SNR-uniform grid; the grid with the least objective, the largest local
error estimate :math:`\max_k \kappa_k h_k^{p+1}`, is returned.  (Minimising the *sum* instead,
density :math:`\kappa^{1/p}`, crowded the nodes into mid-range noise and measured worse.)

Cost: ``2 * steps`` NFE per iteration (on the whole batch), counted at the model in ``nfe``.
It is a heuristic: the objective is a local error, not the global error of the method.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from scoresde._checks import check_int
from scoresde.model import ScoreModel
from scoresde.sde import LinearSDE

from .timesteps import make_grid

__all__ = ["OptimizedGrid", "optimize_timesteps", "local_errors", "propagation_weights"]


@dataclass(frozen=True)
class OptimizedGrid:
    """``timesteps``: the float64 CPU grid (``steps + 1`` points, end points exact);
    ``objective``: its estimate of max_k kappa_k h_k^(p+1); ``history``: the objective of every
    iteration's grid (the first: log-SNR-uniform); ``nfe``: the network calls made."""

    timesteps: Tensor
    objective: float
    history: tuple
    nfe: int


def _ddim(x: Tensor, d: Tensor, c: dict[str, Tensor], m: int, n: int) -> Tensor:
    """One DDIM (DPM-Solver++-1) step from node m to node n of the coefficients ``c``:
    x_n = (sigma_n/sigma_m) x_m + alpha_n (1 - e^{-h}) d, h = lambda_n - lambda_m."""
    h = 0.5 * (c["log_snr"][n] - c["log_snr"][m])
    a = float(c["sigma"][n] / c["sigma"][m])
    b = float(-c["alpha"][n] * torch.expm1(-h))
    return a * x + b * d


def propagation_weights(sde: LinearSDE, t: Tensor, data_std: float) -> Tensor:
    """g_k of the module docstring for every interval of ``t`` (the Gaussian flow's scaling of
    a perturbation from t_{k+1} to t_end)."""
    c = sde.coefficients(t)
    s2 = data_std ** 2
    end = c["alpha"][-1] ** 2 * s2 + c["sigma"][-1] ** 2
    return torch.sqrt(end / (c["alpha"][1:] ** 2 * s2 + c["sigma"][1:] ** 2))


def local_errors(model: ScoreModel, x_start: Tensor, t: Tensor) -> Tensor:
    """The step-doubling local error e_k (RMS over the batch) of every interval of the grid
    ``t`` (module docstring); 2 NFE per interval.  float64, ``[steps]``."""
    sde = model.sde
    log_snr = sde.log_snr_unchecked(t)
    mid = sde.t_of_log_snr_unchecked(0.5 * (log_snr[:-1] + log_snr[1:]))
    nodes = torch.stack([t[:-1], mid], 1).reshape(-1)
    nodes = torch.cat([nodes, t[-1:]])                  # t_0, m_0, t_1, m_1, ..., t_K
    c = sde.coefficients(nodes)
    x = x_start
    errs = []
    with torch.no_grad():
        for k in range(t.numel() - 1):
            i = 2 * k
            d = model.x0(x, float(nodes[i]))
            one = _ddim(x, d, c, i, i + 2)
            half = _ddim(x, d, c, i, i + 1)
            x = _ddim(half, model.x0(half, float(nodes[i + 1])), c, i + 1, i + 2)
            errs.append(float((one.double() - x.double()).pow(2).mean().sqrt()))
    return torch.tensor(errs, dtype=torch.float64)


def _redistribute(lam: Tensor, kappa: Tensor, order: int, floor: float, damping: float) -> Tensor:
    """New nodes: equal quantiles of the density rho ~ kappa^(1/(order+1)) (piecewise constant on
    the intervals of ``lam``), floored and mixed with the current grid's density 1/h."""
    h = lam[1:] - lam[:-1]
    rho = kappa.clamp_min(0.0) ** (1.0 / (order + 1))
    rho = torch.nan_to_num(rho, nan=0.0, posinf=0.0)
    mean = float((rho * h).sum() / h.sum())
    if not mean > 0.0:
        return lam.clone()
    rho = rho.clamp_min(floor * mean) / mean
    old = 1.0 / (h / h.mean())                          # the current grid's node density
    mass = (damping * old + (1.0 - damping) * rho) * h    # mass of every interval
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), mass.cumsum(0)])
    q = torch.linspace(0.0, float(cum[-1]), lam.numel(), dtype=torch.float64)[1:-1]
    j = torch.searchsorted(cum, q, right=True).clamp(1, lam.numel() - 1) - 1
    inner = lam[j] + (q - cum[j]) / mass[j] * h[j]
    return torch.cat([lam[:1], inner, lam[-1:]])


def optimize_timesteps(model: ScoreModel, x_start: Tensor, steps: int, *, order: int = 2,
                       t_start: float | None = None, t_end: float | None = None, iterations: int = 3,
                       floor: float = 0.05, damping: float = 0.3, data_std: float = 0.5) -> OptimizedGrid:
    """An Align-Your-Steps-style grid of ``steps`` intervals from ``t_start`` (default T) to
    ``t_end`` (default ``sde.default_t_end``) for a method of order ``order``, optimised on
    the calibration states ``x_start`` (samples at ``t_start``) in ``iterations`` rounds of
    the module docstring's update (``data_std``: the propagation weight's data scale; None
    weighs every interval alike).  Cost ``2 * steps * iterations`` NFE."""
    from .calibrate import check_calibration_input
    model, x_start = check_calibration_input(model, x_start, "optimize_timesteps")
    sde = model.sde
    steps = check_int(steps, "steps", minimum=1)
    order = check_int(order, "order", minimum=1)
    iterations = check_int(iterations, "iterations", minimum=1)
    for name, value in (("floor", floor), ("damping", damping)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be a number in [0, 1); got {value!r}")
    if data_std is not None and (isinstance(data_std, bool) or not isinstance(data_std, (int, float))
                                 or not data_std > 0.0):
        raise ValueError(f"data_std must be a positive number or None; got {data_std!r}")
    t = make_grid(sde, steps, "log_snr", t_end, t_start).t
    t_s, t_e = t[0].clone(), t[-1].clone()
    nfe0 = model.nfe
    best, best_obj, history = t, float("inf"), []
    for _ in range(iterations):
        lam = 0.5 * sde.log_snr_unchecked(t)
        h = lam[1:] - lam[:-1]
        kappa = local_errors(model, x_start, t) / h ** 2
        if data_std is not None:
            kappa = kappa * propagation_weights(sde, t, float(data_std))
        obj = float((kappa * h ** (order + 1)).max())
        history.append(obj)
        if obj < best_obj:
            best, best_obj = t, obj
        if steps == 1:
            break
        t = sde.t_of_log_snr_unchecked(2.0 * _redistribute(lam, kappa, order, float(floor), float(damping)))
        t[0], t[-1] = t_s, t_e
        if not bool((t[1:] < t[:-1]).all()):
            break
    return OptimizedGrid(best.clone(), best_obj, tuple(history), model.nfe - nfe0)
