r"""Probability-flow ODE samplers: ``euler``, ``heun``, ``ddim`` and the adaptive ``pf_ode``.

The probability-flow ODE of an SDE (Song et al. 2021, eq. 13) is

.. math:: \frac{dx}{dt} = f(x,t) - \tfrac12 g(t)^2\nabla\log p_t(x)
          = f(t)\,x + \frac{g(t)^2}{2\sigma_t}\hat\epsilon(x,t) \quad\text{(LinearSDE)}.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
from torch import Tensor

from scoresde._checks import append_dims, check_float
from scoresde.model import ScoreModel
from scoresde.sde import SDE, LinearSDE

from ._registry import register
from .base import (CheckedModel, NonFiniteError, Solution, Solver, SolverError, StepInfo, StepTable,
                   _state_dtype, _trivial_solution)
from .timesteps import TimeGrid

__all__ = ["Euler", "Heun", "DDIM", "PFODE", "check_tolerances"]


@register("euler")
@dataclass
class Euler(Solver):
    r"""Explicit Euler on the probability-flow ODE in t (score_sde's ODE baseline):

    .. math:: x_{i+1} = x_i + (t_{i+1}-t_i)\Big[f(t_i)x_i + \frac{g(t_i)^2}{2\sigma_{t_i}}\hat\epsilon(x_i,t_i)\Big].

    Order 1, 1 NFE per step."""

    order: ClassVar[int] = 1

    def prepare(self, sde: SDE, grid: TimeGrid, like: Tensor) -> StepTable:
        tab = super().prepare(sde, grid, like)
        # x + dt (f x + c eps) = (1 + dt f) x + (dt c) eps, as Python floats for a fused update
        dt = grid.t[1:] - grid.t[:-1]
        c = sde.coefficients(grid.t[:-1])
        tab.x_coef_f = (1.0 + dt * c["f"]).tolist()
        tab.eps_coef_f = (dt * 0.5 * c["g2"] / c["sigma"]).tolist()
        return tab

    def step(self, model: CheckedModel, i: int, x: Tensor, state: Any, tab: StepTable, noise) -> tuple:
        eps = model.evaluate(x, tab.t64[i]).eps
        return torch.add(x * tab.x_coef_f[i], eps, alpha=tab.eps_coef_f[i]), state


@register("heun")
@dataclass
class Heun(Solver):
    r"""EDM's second-order Heun method (Karras et al. 2022, Algorithm 1, no churn) on the
    scaled ODE :math:`d\hat x/d\hat\sigma = (\hat x - \hat x_0)/\hat\sigma`,
    :math:`\hat x = x/\alpha_t`, :math:`\hat\sigma = \sigma_t/\alpha_t` (exact for any LinearSDE):

    .. math:: d_i = \frac{\hat x_i - \hat x_0(x_i,t_i)}{\hat\sigma_i},\ \
              \tilde x = \hat x_i + (\hat\sigma_{i+1}-\hat\sigma_i)d_i,\ \
              \hat x_{i+1} = \hat x_i + (\hat\sigma_{i+1}-\hat\sigma_i)\tfrac12\big(d_i + d(\tilde x, t_{i+1})\big),

    with a plain Euler last step (as EDM).  Order 2, 2 NFE per step except the last:
    nfe = 2 steps - 1."""

    order: ClassVar[int] = 2
    default_schedule: ClassVar[str] = "karras"
    last_step_euler: bool = True

    def validate_options(self) -> None:
        if not isinstance(self.last_step_euler, bool):
            raise TypeError(f"last_step_euler must be a bool, got {self.last_step_euler!r}")

    def expected_nfe(self, steps: int) -> int:
        return 2 * steps - (1 if self.last_step_euler else 0)

    def stats(self, table: StepTable) -> dict:
        orders = [2] * table.steps
        if self.last_step_euler and orders:
            orders[-1] = 1
        return {"orders": orders}

    def prepare(self, sde: SDE, grid: TimeGrid, like: Tensor) -> StepTable:
        r"""Since :math:`d = (\hat x - \hat x_0)/\hat\sigma = \hat\epsilon`, with
        :math:`\Delta = \hat\sigma_{i+1}-\hat\sigma_i` and :math:`a = \alpha_{i+1}/\alpha_i` the step is
        :math:`\tilde x = a x_i + \alpha_{i+1}\Delta\,\hat\epsilon_i` and
        :math:`x_{i+1} = a x_i + \tfrac12\alpha_{i+1}\Delta(\hat\epsilon_i + \hat\epsilon(\tilde x))`:
        three Python-float coefficients per step, fused updates.  They are computed in float64
        from logs, :math:`a = e^{\log\alpha_{i+1}-\log\alpha_i}` and
        :math:`\alpha_{i+1}\Delta = -\sigma_{i+1}\,\mathrm{expm1}(h_i)` (:math:`h_i` the step in
        :math:`\log(\alpha/\sigma)`), so neither :math:`\hat\sigma` (up to 1e150) nor the
        difference of two close :math:`\hat\sigma` is ever formed; :func:`_check_heun_steps` then
        rejects a grid whose steps the state's dtype cannot carry."""
        tab = super().prepare(sde, grid, like)
        log_alpha = torch.log(tab.alpha64)
        scale = torch.exp(log_alpha[1:] - log_alpha[:-1])
        euler = -tab.sigma64[1:] * torch.expm1(tab.h64)
        _check_heun_steps(scale, grid, like.dtype, self.last_step_euler)
        tab.scale_f = scale.tolist()
        tab.euler_f = euler.tolist()
        tab.half_f = (0.5 * euler).tolist()
        return tab

    def step(self, model: CheckedModel, i: int, x: Tensor, state: Any, tab: StepTable, noise) -> tuple:
        # scale = alpha_{i+1}/alpha_i, euler = alpha_{i+1} Delta = -sigma_{i+1} expm1(h_i), half = euler/2
        eps = model.evaluate(x, tab.t64[i]).eps
        ax = x * tab.scale_f[i]
        x_next = torch.add(ax, eps, alpha=tab.euler_f[i])                # x~ = scale x + euler eps_i
        if not (self.last_step_euler and i == tab.steps - 1):
            eps2 = model.evaluate(x_next, tab.t64[i + 1]).eps
            # x_{i+1} = scale x + half (eps_i + eps(x~)), accumulated into the scaled copy
            x_next = ax.add_(eps, alpha=tab.half_f[i]).add_(eps2, alpha=tab.half_f[i])
        return x_next, state


def _step_amplification(scale: Tensor, dtype: torch.dtype, last_step_euler: bool) -> Tensor:
    r"""How much a Heun step magnifies the rounding of the state, relative to the state's size.

    The step forms :math:`a x_i + \alpha_{i+1}\Delta\hat\epsilon` with both terms of size
    :math:`a = \alpha_{i+1}/\alpha_i` times the result, so the state's rounding (eps of its
    dtype) comes out multiplied by ``a``; the corrector evaluates the network at the predictor's
    state and multiplies that error by ``a`` again: ``a eps`` for an Euler step, ``a^2 eps``
    for a corrected one."""
    eps = torch.finfo(dtype).eps
    amp = scale * scale * eps
    if last_step_euler and amp.numel():
        amp[-1] = scale[-1] * eps
    return amp


def _check_heun_steps(scale: Tensor, grid: TimeGrid, dtype: torch.dtype, last_step_euler: bool) -> None:
    """ValueError, before any network call, if a step of the grid would return rounding noise in
    ``dtype`` (its rounding amplified to the size of the state or beyond, or a coefficient that
    overflows the dtype).  This happens where alpha changes by many orders of magnitude within a
    step: a large T of a VP process (alpha(T) ~ 1e-54 at VPSDE(T=5)) on the default Karras grid,
    whose last step jumps from alpha ~ 1e-47 to ~1."""
    amp = _step_amplification(scale, dtype, last_step_euler)
    bad = torch.nonzero(~(amp < 1.0) | ~(scale <= torch.finfo(dtype).max)).flatten()
    if not bad.numel():
        return
    i = int(bad[0])
    t = grid.t.tolist()
    ok64 = bool((_step_amplification(scale, torch.float64, last_step_euler) < 1.0).all())
    raise ValueError(
        f"heun cannot take the step from t={t[i]:.6g} to t={t[i + 1]:.6g} in {dtype}: it scales the state "
        f"by alpha(t_next)/alpha(t) = {float(scale[i]):.3g}, which magnifies its rounding (eps "
        f"{torch.finfo(dtype).eps:.2g}) to {float(amp[i]):.3g} times its size, so the sample would be noise; "
        + ("pass x_T in float64, or " if ok64 and dtype != torch.float64 else "")
        + "use more steps or schedule='log_snr', or a smaller T / t_start (where alpha is not tiny)"
    )


@register("ddim")
@dataclass
class DDIM(Solver):
    r"""DDIM (Song, Meng & Ermon 2021, eq. 12) for any LinearSDE:

    .. math:: x_{i+1} = \alpha_{i+1}\hat x_0 + \sqrt{\sigma_{i+1}^2 - c_i^2}\;\hat\epsilon + c_i z,\qquad
              c_i = \eta\,\sigma_{i+1}\sqrt{1 - e^{-2h_i}},

    :math:`h_i = \lambda_{i+1}-\lambda_i` (:math:`\lambda = \log\alpha/\sigma`).  ``eta = 0`` is
    the deterministic exponential-integrator step (= DPM-Solver-1 = DPM-Solver++(1)),
    ``eta = 1`` the ancestral (DDPM-like) step.  Order 1 (deterministic), 1 NFE per step."""

    order: ClassVar[int] = 1
    default_schedule: ClassVar[str] = "uniform"
    eta: float = 0.0

    def validate_options(self) -> None:
        eta = check_float(self.eta, "eta")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")

    def __post_init__(self) -> None:
        """Validate the options, then derive from them: ``eta`` as a float and the instance
        flag ``stochastic`` (noise is drawn only when eta > 0; the class default is False)."""
        super().__post_init__()
        self.eta = check_float(self.eta, "eta")
        self.stochastic = self.eta > 0

    def prepare(self, sde: SDE, grid: TimeGrid, like: Tensor) -> StepTable:
        tab = super().prepare(sde, grid, like)
        c = self.eta * tab.sigma64[1:] * torch.sqrt(-torch.expm1(-2.0 * tab.h64))
        cast = lambda v: v.to(dtype=like.dtype, device=like.device)  # noqa: E731
        tab.noise_std = cast(c)
        tab.eps_coef = cast(torch.sqrt((tab.sigma64[1:] ** 2 - c ** 2).clamp(min=0.0)))
        tab.alpha_next_f, tab.eps_coef_f, tab.noise_std_f = tab.alpha64[1:].tolist(), tab.eps_coef.tolist(), \
            tab.noise_std.tolist()
        return tab

    def step(self, model: CheckedModel, i: int, x: Tensor, state: Any, tab: StepTable, noise) -> tuple:
        d = model.evaluate(x, tab.t64[i])
        x_next = torch.add(d.x0 * tab.alpha_next_f[i], d.eps, alpha=tab.eps_coef_f[i])
        if self.eta > 0:
            x_next.add_(noise(i, tab.t[i], tab.t[i + 1], x), alpha=tab.noise_std_f[i])
        return x_next, state


def check_tolerances(rtol: Any, atol: Any, dtype: torch.dtype) -> tuple[float, float, list[str]]:
    """Validate rtol/atol: negative -> ValueError, a tensor requiring
    grad -> ValueError, below 100 eps of the state dtype -> warning and clamp."""
    notes = []
    vals = []
    for name, v in (("rtol", rtol), ("atol", atol)):
        if isinstance(v, Tensor) and v.requires_grad:
            raise ValueError(f"{name} must not be a tensor that requires grad")
        vals.append(check_float(v, name, low=0.0))
    floor = 100.0 * torch.finfo(dtype).eps
    r, a = vals
    if r < floor:
        msg = f"rtol={r:g} is below 100*eps({dtype})={floor:.3g}; clamped to {floor:.3g}"
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        notes.append(msg)
        r = floor
    return r, a, notes


@register("pf_ode")
@dataclass
class PFODE(Solver):
    r"""The probability-flow ODE integrated by torchdiffeq's ``odeint`` from ``t_start`` to
    ``t_end``: any of its methods via ``ode_method`` (adaptive ``dopri5`` by default, with
    ``rtol``/``atol``; fixed-grid methods such as ``rk4`` step on the time grid).  The model is
    never evaluated outside ``[t_end, t_start]`` (``step_t`` at the end point and a clamp).
    ``max_steps`` bounds adaptive steps (a :class:`SolverError` with where it stopped).
    The adaptive Runge--Kutta methods step onto the SDE's ``knots`` inside the interval
    (torchdiffeq's ``jump_t``; their number in ``stats["knots"]``), so a piecewise schedule such
    as :class:`~scoresde.DiscreteVPSDE` is integrated segment by segment (at least one step, 7 NFE
    with dopri5, per segment) instead of shrinking the step at every jump in the drift.
    ``rtol`` below 100 eps of the state dtype is clamped with a warning (reported in
    ``stats``); the default (``None``) is 1e-5, silently raised to 1.19e-5 for float32.
    NFE: as many as the integrator makes, counted at the model."""

    order: ClassVar[int] = 5
    requires_linear_sde: ClassVar[bool] = False
    adaptive: ClassVar[bool] = True
    ode_method: str = "dopri5"
    rtol: float | None = None     # None: 1e-5, raised silently to 100 eps of a float32 state
    atol: float = 1e-5
    max_steps: int = 10_000

    _FIXED = ("euler", "midpoint", "rk4", "explicit_adams", "implicit_adams", "heun3", "fixed_adams", "heun2")
    _ADAPTIVE_RK = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")

    def validate_options(self) -> None:
        methods = self._FIXED + self._ADAPTIVE_RK
        if self.ode_method not in methods:
            raise ValueError(f"ode_method must be one of {sorted(methods)}; got {self.ode_method!r}")
        if self.rtol is not None:
            check_float(self.rtol, "rtol", low=0.0)
        check_float(self.atol, "atol", low=0.0)
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(f"max_steps must be an int >= 1, got {self.max_steps!r}")

    def expected_nfe(self, steps: int) -> int:
        raise NotImplementedError("pf_ode is adaptive: its nfe is counted, not predicted")

    def run(self, model: ScoreModel, x_T: Tensor, grid: TimeGrid, *, noise=None, return_trajectory=False,
            callback=None, final_denoise=False, nonfinite="raise") -> Solution:
        """Integrate with ``odeint``.  ``callback`` receives a :class:`StepInfo` after every
        accepted step (the integrator's own steps; fixed-grid methods: every grid step).
        ``max_steps`` bounds the step attempts (accepted + rejected) over the whole solve; reaching
        it raises :class:`SolverError` with ``t_reached`` (last accepted time), ``nfe`` and
        ``last_dt``.  ``nonfinite="return"`` returns the state at the last accepted step."""
        from torchdiffeq import odeint

        nfe0 = model.nfe
        stats: dict = {"solver": self.name, "ode_method": self.ode_method, "status": "success"}
        if x_T.shape[0] == 0 or grid.t_start == grid.t_end:
            return _trivial_solution(x_T, grid, return_trajectory, stats)
        dtype = _state_dtype(x_T)
        # the default never warns: 1e-5 is below 100 eps(float32) = 1.19e-5 by a hair
        rtol_in = self.rtol if self.rtol is not None else max(1e-5, 100.0 * torch.finfo(dtype).eps)
        rtol, atol, notes = check_tolerances(rtol_in, self.atol, dtype)
        if notes:
            stats["warnings"] = notes
        stats.update(rtol=rtol, atol=atol)
        x = x_T.detach().to(dtype, copy=True)
        ev = CheckedModel(model, None, check_finite=True)
        drift = pf_ode_drift(model, ev, x)
        t_lo, t_hi = min(grid.t_start, grid.t_end), max(grid.t_start, grid.t_end)
        calls = [0]
        fixed = self.ode_method in self._FIXED
        # progress of the integrator: accepted step starts (t, y), attempts, last step size
        track = SimpleNamespace(t=grid.t_start, y=x, accepted=0, attempts=0, dt=None)

        def func(t: Tensor, y: Tensor) -> Tensor:
            calls[0] += 1
            ev.step_index = calls[0] - 1
            t64 = t.detach().to(torch.float64).clamp(t_lo, t_hi)
            return drift(y, t64)

        def on_attempt(t0: Tensor, y0: Tensor, dt: Tensor) -> None:
            track.attempts += 1
            if not fixed and track.attempts > self.max_steps:
                raise _MaxSteps()
            if fixed:
                on_accept(t0, y0, dt)

        def on_accept(t0: Tensor, y0: Tensor, dt: Tensor) -> None:
            # called at the *start* of an accepted step: the previous step ended at (t0, y0)
            t0f = float(t0)
            if track.accepted and callback is not None:
                callback(StepInfo(track.accepted - 1, t0f, y0, model.nfe - nfe0))
            track.t, track.y, track.dt = t0f, y0, abs(float(dt))
            track.accepted += 1

        if fixed or self.ode_method in self._ADAPTIVE_RK:   # torchdiffeq's step callbacks
            func.callback_step = on_attempt
            if not fixed:
                func.callback_accept_step = on_accept

        t_eval = grid.t.to(dtype=dtype, device=x.device) if return_trajectory else \
            torch.tensor([grid.t_start, grid.t_end], dtype=dtype, device=x.device)
        options: dict = {}
        if fixed:
            grid_t = grid.t.to(dtype=dtype, device=x.device)
            options["grid_constructor"] = lambda f, y0, t: grid_t
        elif self.ode_method in self._ADAPTIVE_RK:
            options["step_t"] = torch.tensor([grid.t_end], dtype=dtype)
            options["max_num_steps"] = self.max_steps
            jumps = knots_inside(model.sde, t_lo, t_hi, dtype)
            if jumps.numel():
                options["jump_t"] = jumps
                stats["knots"] = jumps.numel()
        traj = None
        with torch.no_grad():
            try:
                ys = odeint(func, x, t_eval, method=self.ode_method, rtol=rtol, atol=atol, options=options)
                x_out = ys[-1]
                if callback is not None and track.accepted:
                    callback(StepInfo(track.accepted - 1, grid.t_end, x_out, model.nfe - nfe0))
                if final_denoise:
                    x_out = ev.evaluate(x_out, torch.tensor(grid.t_end, dtype=torch.float64, device=x.device)).x0
                ev.check_deferred()
                traj = ys.to(x_T.dtype) if return_trajectory else None
            except (AssertionError, _MaxSteps) as err:
                msg = str(err)
                why = "max_steps reached" if isinstance(err, _MaxSteps) or "max_num_steps" in msg else \
                    "step size underflow" if "underflow" in msg else msg
                raise SolverError(
                    f"pf_ode failed: {why} (max_steps={self.max_steps}) at t={track.t:.6g} after "
                    f"{track.accepted} accepted steps, nfe={model.nfe - nfe0}, last dt={track.dt}, "
                    f"rtol={rtol:g}, atol={atol:g}",
                    t_reached=track.t, nfe=model.nfe - nfe0, last_dt=track.dt, status=why,
                ) from err
            except NonFiniteError as err:
                if nonfinite == "raise":
                    raise
                x_out = track.y
                stats.update(status="nonfinite", message=str(err), t_reached=track.t)
        stats["nfe_integrator"] = calls[0]
        stats["accepted_steps"] = track.accepted
        if not fixed:
            stats["rejected_steps"] = track.attempts - track.accepted
        return Solution(x_out.to(x_T.dtype), model.nfe - nfe0, grid.t, traj, stats)


class _MaxSteps(Exception):
    def __str__(self) -> str:
        return "max_steps reached"


def knots_inside(sde: SDE, t_lo: float, t_hi: float, dtype: torch.dtype) -> Tensor:
    """The SDE's knots strictly inside ``(t_lo, t_hi)``, in ``dtype`` (the integrator's time
    dtype), for torchdiffeq's ``jump_t``: the adaptive solver then ends a step on each knot and
    re-evaluates the drift just past it, instead of shrinking its steps to cross the jump.
    The interval's end points are never included (they are ``step_t``/``t`` already)."""
    knots = getattr(sde, "knots", None)
    if knots is None:
        return torch.empty(0, dtype=dtype)
    knots = torch.as_tensor(knots, dtype=torch.float64).detach().cpu().to(dtype)
    # compared in dtype, so a knot that rounds onto an end point is dropped (jump_t and step_t
    # must not share a value)
    lo, hi = (torch.tensor(v, dtype=torch.float64).to(dtype) for v in (t_lo, t_hi))
    return knots[(knots > lo) & (knots < hi)]


def pf_ode_drift(model: ScoreModel, ev: CheckedModel, like: Tensor):
    """The probability-flow drift ``(x, t64) -> dx/dt`` for ``model.sde`` (LinearSDE: from
    eps with float64 schedule values; general SDE: ``sde.pf_drift``)."""
    sde = model.sde
    if isinstance(sde, LinearSDE):
        def drift(x: Tensor, t64: Tensor) -> Tensor:
            eps = ev.evaluate(x, t64).eps
            f = sde.f_unchecked(t64).to(x.dtype)
            c = (0.5 * sde.g2_unchecked(t64) / torch.exp(sde.log_sigma_unchecked(t64))).to(x.dtype)
            return f * x + c * eps
    else:  # pragma: no cover - exercised once ScoreModel accepts general SDEs
        def drift(x: Tensor, t64: Tensor) -> Tensor:
            d = ev.evaluate(x, t64)
            tt = t64.expand(x.shape[0]).to(x.dtype)
            return sde.pf_drift(x, tt, d.score)
    return drift
