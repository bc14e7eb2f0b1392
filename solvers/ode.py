r"""Probability-flow ODE samplers: ``euler``, ``heun``, ``ddim`` and the adaptive ``pf_ode``.

The probability-flow ODE of an SDE (Song et al. 2021, eq. 13) is

.. math:: \frac{dx}{dt} = f(x,t) - \tfrac12 g(t)^2\nabla\log p_t(x)
          = f(t)\,x + \frac{g(t)^2}{2\sigma_t}\hat\epsilon(x,t) \quad\text{(LinearSDE)}.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from scoresde._checks import check_float
from scoresde.model import ScoreModel
from scoresde.sde import SDE, LinearSDE

from ._registry import register
from .base import CheckedModel, Solution, Solver, StepInfo, StepTable, _state_dtype, _trivial_solution
from . import adaptive_driver
from .adaptive_driver import PER_SAMPLE_METHODS
from .time_change import TIME_VARIABLES
from .timesteps import TimeGrid

__all__ = ["Euler", "Heun", "DDIM", "PFODE", "check_tolerances", "heun_coefficients", "heun_step"]


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
        two Python-float coefficients per step (:func:`heun_coefficients`), fused updates
        (:func:`heun_step`).  They are computed in float64 from logs, :math:`a = e^{\log\alpha_{i+1}-\log\alpha_i}` and
        :math:`\alpha_{i+1}\Delta = -\sigma_{i+1}\,\mathrm{expm1}(h_i)` (:math:`h_i` the step in
        :math:`\log(\alpha/\sigma)`), so neither :math:`\hat\sigma` (up to 1e150) nor the
        difference of two close :math:`\hat\sigma` is ever formed; :func:`_check_heun_steps` then
        rejects a grid whose steps the state's dtype cannot carry."""
        tab = super().prepare(sde, grid, like)
        scale, euler = heun_coefficients(tab.alpha64, tab.sigma64, tab.lam64)
        _check_heun_steps(scale, grid, like.dtype, self.last_step_euler)
        tab.scale_f = scale.tolist()
        tab.euler_f = euler.tolist()
        return tab

    def step(self, model: CheckedModel, i: int, x: Tensor, state: Any, tab: StepTable, noise) -> tuple:
        corrected = not (self.last_step_euler and i == tab.steps - 1)
        return heun_step(model, x, tab.t64[i], tab.t64[i + 1], tab.scale_f[i], tab.euler_f[i], corrected), state


def heun_coefficients(alpha64: Tensor, sigma64: Tensor, lam64: Tensor) -> tuple[Tensor, Tensor]:
    r"""EDM Heun's per-step coefficients on a grid (float64): ``scale`` :math:`=\alpha_{j+1}/\alpha_j`
    :math:`= e^{\log\alpha_{j+1}-\log\alpha_j}` and ``euler`` :math:`=\alpha_{j+1}(\hat\sigma_{j+1}-
    \hat\sigma_j) = -\sigma_{j+1}\,\mathrm{expm1}(\lambda_{j+1}-\lambda_j)` (see :meth:`Heun.prepare`)."""
    log_alpha = torch.log(alpha64)
    return torch.exp(log_alpha[1:] - log_alpha[:-1]), -sigma64[1:] * torch.expm1(lam64[1:] - lam64[:-1])


def heun_step(model: CheckedModel, x: Tensor, t0: Tensor, t1: Tensor, scale: float, euler: float,
              corrected: bool = True) -> Tensor:
    r"""One EDM Heun step from ``t0`` to ``t1``: :math:`\tilde x = \text{scale}\,x + \text{euler}\,\hat\epsilon(x)`,
    then (``corrected``) :math:`\text{scale}\,x + \tfrac12\text{euler}(\hat\epsilon(x) + \hat\epsilon(\tilde x))`,
    accumulated into the scaled copy; 1 or 2 NFE.  Shared by ``heun``, ``edm_sde`` and ``restart``."""
    eps = model.evaluate(x, t0).eps
    ax = x * scale
    x_next = torch.add(ax, eps, alpha=euler)
    if not corrected:
        return x_next
    eps2 = model.evaluate(x_next, t1).eps
    return ax.add_(eps, alpha=0.5 * euler).add_(eps2, alpha=0.5 * euler)


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
    r"""The probability-flow ODE integrated adaptively from ``t_start`` to ``t_end``.

    ``ode_method="dopri5"`` (default) runs the package's per-sample Dormand--Prince 5(4)
    (:func:`solvers.adaptive.solve_per_sample`): every sample has its own step size, error
    estimate and acceptance, all samples advance in one network call per stage, so a sample's
    result does not depend on the rest of the batch (``per_sample=False``: torchdiffeq's dopri5,
    one step size for the batch).  Any other torchdiffeq method runs through torchdiffeq with
    one step for the batch: adaptive ones (``dopri8``, ``bosh3``, ...) with ``rtol``/``atol``,
    fixed-grid ones (``rk4``, ...) on the time grid.  The model is never evaluated outside
    ``[t_end, t_start]``.  ``time_variable``: adaptive solves integrate in ``t`` (``"t"``) or
    in half-log-SNR time (``"log_snr"``, :mod:`solvers.time_change`); ``"auto"`` (default)
    takes log-SNR time for a schedule with knots such as :class:`~scoresde.DiscreteVPSDE`, whose
    coefficients jump at every knot in ``t`` while the flow is smooth in log-SNR (measured at
    rtol = atol = 1e-8, N = 1000, exact Gaussian: 222 NFE per sample against 6994 stepping onto
    every knot in ``t`` and 138 for the continuous VP), and ``t`` otherwise.  A network that
    reads ``t`` itself sees a kink at each knot in log-SNR time: below about 1e-6 the
    tolerance is then not met there (1.4e-7 at 1e-8, N = 1000), and ``time_variable="t"``
    steps onto the knots (``stats["knots"]``) instead.  ``max_steps`` bounds the
    step attempts (per sample); a sample that hits it, whose step underflows or whose drift
    turns non-finite stops with that status (:mod:`solvers.adaptive_driver`).  ``rtol`` below
    100 eps of the state dtype is clamped with a warning (reported in ``stats``); the default
    (``None``) is 1e-5, silently raised to 1.19e-5 for float32.  NFE: network calls, counted
    at the model (per-sample: each call on the samples still running)."""

    order: ClassVar[int] = 5
    requires_linear_sde: ClassVar[bool] = False
    adaptive: ClassVar[bool] = True
    ode_method: str = "dopri5"
    rtol: float | None = None     # None: 1e-5, raised silently to 100 eps of a float32 state
    atol: float = 1e-5
    max_steps: int = 10_000
    per_sample: bool | None = None  # None: True for dopri5
    time_variable: str = "auto"

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
        if self.per_sample is not None and not isinstance(self.per_sample, bool):
            raise TypeError(f"per_sample must be a bool or None, got {self.per_sample!r}")
        if self.time_variable not in TIME_VARIABLES + ("auto",):
            raise ValueError(f"time_variable must be one of {TIME_VARIABLES + ('auto',)}, got {self.time_variable!r}")
        if self.per_sample and self.ode_method not in PER_SAMPLE_METHODS:
            raise ValueError(f"per_sample=True needs ode_method in {PER_SAMPLE_METHODS}, got {self.ode_method!r}")

    def expected_nfe(self, steps: int) -> int:
        raise NotImplementedError("pf_ode is adaptive: its nfe is counted, not predicted")

    def run(self, model: ScoreModel, x_T: Tensor, grid: TimeGrid, *, noise=None, return_trajectory=False,
            callback=None, final_denoise=False, nonfinite="raise") -> Solution:
        """Integrate.  ``callback`` receives a :class:`StepInfo` after every accepted step
        (per-sample: every round of attempts, ``t`` the least advanced sample's; fixed-grid
        methods: every grid step), and once at ``t_end``.  A failed sample (``max_steps``,
        ``step_size_underflow``) raises :class:`SolverError` with ``t_reached``, ``nfe``,
        ``last_dt``, the per-sample ``status`` and the ``partial`` solution; a non-finite drift
        raises :class:`NonFiniteError` unless ``nonfinite="return"``, which returns the states
        where the samples stopped (``stats["status"] == "nonfinite"``)."""
        nfe0 = model.nfe
        fixed = self.ode_method in self._FIXED
        per_sample = (self.ode_method in PER_SAMPLE_METHODS) if self.per_sample is None else self.per_sample
        stats: dict = {"solver": self.name, "ode_method": self.ode_method, "status": "success",
                       "per_sample": per_sample and not fixed}
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
        # nonfinite="raise": the model's first non-finite output raises at once, naming the
        # evaluation, its time and the samples; "return": the engine stops those samples alone
        ev = CheckedModel(model, None, check_finite=nonfinite == "raise")
        ev.step_index = -1                         # counts right-hand-side evaluations
        drift = pf_ode_drift(model, ev, x)
        t_lo, t_hi = min(grid.t_start, grid.t_end), max(grid.t_start, grid.t_end)

        def rhs(t: Tensor, y: Tensor, idx: Tensor) -> Tensor:
            ev.step_index += 1
            return drift(y, t.detach().to(torch.float64).clamp(t_lo, t_hi))

        def on_step(i: int, t: float, y: Tensor) -> None:
            callback(StepInfo(i, t, y, model.nfe - nfe0))

        change = None if fixed else adaptive_driver.time_change(model.sde, grid.t_start, grid.t_end,
                                                                 self.time_variable)
        stats["time_variable"] = "t" if change is None else "log_snr"
        jumps = None if fixed or change is not None else knots_inside(model.sde, t_lo, t_hi, torch.float64)
        if jumps is not None and jumps.numel():
            stats["knots"] = jumps.numel()
        with torch.no_grad():
            sol = adaptive_driver.integrate(
                rhs, x, grid.t_start, grid.t_end, per_sample=stats["per_sample"], method=self.ode_method,
                rtol=rtol, atol=atol, max_steps=self.max_steps, jump_t=jumps,
                grid=grid.t if fixed else None, t_eval=grid.t if return_trajectory else None,
                on_step=None if callback is None else on_step, change=change)
        adaptive_driver.record(stats, sol)
        x_out = sol.y
        found = adaptive_driver.failure(sol, what="pf_ode", max_steps=self.max_steps, nfe=model.nfe - nfe0,
                                        detail=f"rtol={rtol:g}, atol={atol:g}")
        traj = sol.ys.to(x_T.dtype) if return_trajectory else None
        if found is not None:
            kind, _, msg = found
            stats["message"] = msg
            partial = Solution(x_out.to(x_T.dtype), model.nfe - nfe0, grid.t, traj, stats)
            if kind != "nonfinite" or nonfinite == "raise":
                adaptive_driver.raise_failure(kind, msg, sol=sol, nfe=model.nfe - nfe0, partial=partial)
            return partial
        if callback is not None:
            callback(StepInfo(stats["accepted_steps"], grid.t_end, x_out, model.nfe - nfe0))
        if final_denoise:
            with torch.no_grad():
                x_out = ev.evaluate(x_out, torch.tensor(grid.t_end, dtype=torch.float64, device=x.device)).x0
        return Solution(x_out.to(x_T.dtype), model.nfe - nfe0, grid.t, traj, stats)


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
    """The probability-flow drift ``(x, t64) -> dx/dt`` for ``model.sde``, at one time (0-d
    ``t64``) or one time per sample (``[B]``): LinearSDE from eps with float64 schedule values
    broadcast over each sample's entries; a general SDE through ``sde.pf_drift``."""
    sde = model.sde
    if isinstance(sde, LinearSDE):
        def drift(x: Tensor, t64: Tensor) -> Tensor:
            eps = ev.evaluate(x, t64).eps
            col = (-1,) + (1,) * (x.ndim - 1)
            f = sde.f_unchecked(t64).to(x.dtype).reshape(col)
            c = (0.5 * sde.g2_unchecked(t64) / torch.exp(sde.log_sigma_unchecked(t64))).to(x.dtype).reshape(col)
            return f * x + c * eps
    else:  # pragma: no cover - exercised once ScoreModel accepts general SDEs
        def drift(x: Tensor, t64: Tensor) -> Tensor:
            d = ev.evaluate(x, t64)
            tt = t64.expand(x.shape[0]).to(x.dtype)
            return sde.pf_drift(x, tt, d.score)
    return drift
