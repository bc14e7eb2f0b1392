r"""``method="auto"``: one fixed, documented rule that turns an NFE budget into a configuration.

``solvers.sample(model, x_T, "auto", steps=N)`` spends exactly ``N`` network evaluations (one
more with ``final_denoise=True``) and picks the method, its options and the grid from ``N`` alone,
by the table :data:`RULE`; ``sol.stats["auto"]`` records the choice.  Every grid is a function
of the log-SNRs of the end points only (:func:`auto_timesteps`), so a budget gives the same map
on every SDE family (the probability-flow ODE in log-SNR does not depend on the family).

===========  ======================================================  ==========================
budget       method                                                  grid
===========  ======================================================  ==========================
1 -- 7       ``ipndm`` order 3 (Zhang & Chen 2023), analytic first   quadratic in VP time
             step (Zhou et al. 2024): N evaluations buy N + 1 steps
8 -- 14      ``ipndm`` order 3                                       uniform in log-SNR
15 -- 19     ``unipc`` order 3, bh1, ``lower_order_final=True``      quadratic in VP time
20 and up    ``unipc`` order 3, bh1                                  uniform in log-SNR
===========  ======================================================  ==========================

(``lower_order_final=False`` elsewhere: the rule spells out every option.)

**How it was chosen** (``python -m validation.fewstep --half tuning``): on the *tuning* half of
:mod:`validation.heldout` only (mixtures in d = 2, 8, 64, a Gaussian in d = 16 and a score
network trained on the digits), 144 fixed candidates (dpmpp_2m, dpmpp_3m in both formulas,
unipc of orders 2 and 3 in both variants, ipndm of orders 3 and 4, deis of orders 2 and 3; four
grids; with and without the analytic first step and ``lower_order_final``) ran on the map of
the best peer configuration (diffusers and k-diffusion with their documented grids) and on the
plain map (VP from t = 1 to the data end, then a denoising step).  At each of NFE 5, 6, 8, 10,
15, 20, 50 the row is the candidate with the smallest geometric mean over the problems of its
error relative to the best peer (the larger of the two maps' ratios), among the candidates no
more than 2x the best peer on any tuning problem.  Figures on the held-out half: the validation
report and ``docs/few-steps.md``.

A calibrated grid is used only when the caller passes one (``calibration=`` a
:class:`solvers.CalibratedGrid` for the same model and a budget it fits in): its method and
grid replace the table's.
"""
from __future__ import annotations

from typing import Any

import torch

from scoresde._checks import check_int
from scoresde.sde import VPSDE

from .timesteps import make_grid

#: NFE budget (the smallest budget the row applies to) -> (method, options, grid, grid parameter,
#: analytic first step); grid "log_snr" | "karras" (parameter rho) | "vp_time" (parameter p)
RULE: list[tuple[int, str, dict, str, float, bool]] = [
    (1, "ipndm", {"order": 3, "lower_order_final": False}, "vp_time", 2.0, True),
    (8, "ipndm", {"order": 3, "lower_order_final": False}, "log_snr", 0.0, False),
    (15, "unipc", {"order": 3, "variant": "bh1", "lower_order_final": True}, "vp_time", 2.0, False),
    (20, "unipc", {"order": 3, "variant": "bh1", "lower_order_final": False}, "log_snr", 0.0, False),
]
#: the clock of the "vp_time" grids: score_sde's VP (beta 0.1..20), whatever the model's SDE
_VP_CLOCK = VPSDE()


def choose(budget: int) -> dict:
    """The configuration of :data:`RULE` for an NFE ``budget`` (an int >= 1)."""
    budget = check_int(budget, "steps", minimum=1)
    row = [r for r in RULE if r[0] <= budget][-1]
    _, method, options, grid, param, afs = row
    afs = afs and budget >= 2
    return dict(method=method, options=dict(options), grid=grid, grid_param=param, analytic_first_step=afs,
                steps=budget + 1 if afs else budget)


def auto_timesteps(sde, steps: int, grid: str, param: float, t_start: float | None = None,
                   t_end: float | None = None) -> torch.Tensor:
    r"""The grid of ``steps`` intervals, a function of the log-SNRs of its end points only.

    - ``"log_snr"``: uniform in log-SNR; ``"karras"``: :math:`\sigma/\alpha` spaced with
      :math:`\rho` = ``param`` (Karras et al. 2022);
    - ``"vp_time"``: power-``param`` spacing in the time of score_sde's VP SDE (beta 0.1..20),
      :math:`\tau_i = \tau_{end} + (\tau_{start}-\tau_{end})(1-i/N)^p` with
      :math:`\tau = \tau_{VP}(\lambda)`: on that VP it is the ``"uniform"`` (p = 1) and
      ``"quadratic"`` (p = 2) schedules; on any other SDE the same log-SNR nodes."""
    base = make_grid(sde, steps, "log_snr", t_end=t_end, t_start=t_start)
    if grid == "log_snr":
        return base.t
    if grid == "karras":
        return make_grid(sde, steps, "karras", t_end=t_end, t_start=t_start, rho=param).t
    if grid != "vp_time":
        raise ValueError(f"unknown auto grid {grid!r}")
    ends = sde.log_snr_unchecked(base.t[[0, -1]])
    tau0, tau1 = _VP_CLOCK.t_of_log_snr_unchecked(ends).tolist()
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    tau = tau1 + (tau0 - tau1) * (1.0 - u) ** param
    t = sde.t_of_log_snr_unchecked(_VP_CLOCK.log_snr_unchecked(tau))
    t[0], t[-1] = base.t[0], base.t[-1]
    return t


def sample_auto(sample, model: Any, x_T: Any, steps: Any, *, schedule: Any = None, timesteps: Any = None,
                calibration: Any = None, method_options: dict, **kwargs: Any):
    """``solvers.sample(..., method="auto")`` (``sample`` is :func:`solvers.sample`)."""
    if schedule is not None or timesteps is not None:
        raise ValueError("method='auto' chooses the grid itself: pass steps (the NFE budget), not "
                         f"{'schedule' if schedule is not None else 'timesteps'}")
    if method_options:
        raise TypeError(f"method='auto' takes no method options, got {sorted(method_options)}; "
                        "name a method to set its options")
    if kwargs.get("generator") is not None:
        raise ValueError("method='auto' is deterministic (an ODE method): generator must be None")
    if steps is None:
        raise ValueError("method='auto' needs steps (the NFE budget)")
    budget = check_int(steps, "steps", minimum=1)
    if calibration is not None:
        return _calibrated(sample, model, x_T, budget, calibration, kwargs)
    c = choose(budget)
    t_start, t_end = kwargs.pop("t_start"), kwargs.pop("t_end")
    ts = auto_timesteps(model.sde, c["steps"], c["grid"], c["grid_param"], t_start, t_end)
    sol = sample(model, x_T, c["method"], timesteps=ts, analytic_first_step=c["analytic_first_step"], **kwargs,
                 **c["options"])
    sol.stats["auto"] = dict(c, budget=budget)
    return sol


def _calibrated(sample, model, x_T, budget: int, calibration: Any, kwargs: dict):
    from .calibrate import CalibratedGrid
    if not isinstance(calibration, CalibratedGrid):
        raise TypeError(f"calibration must be a solvers.CalibratedGrid, got {type(calibration).__name__}")
    if calibration.nfe_per_sample > budget + (1 if kwargs.get("final_denoise") else 0):
        raise ValueError(f"calibration is a grid for {calibration.nfe_per_sample} NFE, more than steps={budget}")
    sol = sample(model, x_T, calibration.method, timesteps=calibration.timesteps, **kwargs,
                 **calibration.method_options)
    sol.stats["auto"] = dict(method=calibration.method, options=dict(calibration.method_options), grid="calibrated",
                             grid_param=0.0, analytic_first_step=False, steps=calibration.steps, budget=budget)
    return sol
