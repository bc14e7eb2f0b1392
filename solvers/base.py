r"""The solver contract, the one step loop, NFE accounting and the boundary checks.

A solver (docs/extending.md) is a small dataclass whose fields are its options.  It declares
``name``, ``order``, ``stochastic`` and ``requires_linear_sde`` and implements

- ``prepare(sde, grid, like) -> StepTable``: every schedule coefficient, computed once in
  float64 and cast to the state's dtype and device (plus Python control-flow facts such
  as the order used at each step);
- ``init(x) -> state``: the solver state (e.g. multistep :class:`History`), immutable;
- ``step(model, i, x, state, table, noise) -> (x, state)``: advance from ``table.t[i]`` to
  ``table.t[i+1]`` with tensor arithmetic only.

:func:`sample` validates everything at the boundary (before the first network
evaluation), builds the grid and the table, runs the loop and returns a
:class:`Solution`.  ``nfe`` is the difference of the model's own counter over the call.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from scoresde._checks import append_dims, check_batch_tensor, check_float, check_int
from scoresde.model import Denoised, ScoreModel
from scoresde.sde import SDE, LinearSDE

from . import _registry
from .first_step import analytic_denoised, check_analytic_first_step
from .noise import NoiseSource, make_noise
from .timesteps import TimeGrid, check_timesteps, make_grid, match_t_end

__all__ = [
    "Solver", "StepTable", "Solution", "StepInfo", "SolverError", "NonFiniteError", "sample",
    "CheckedModel",
]


class SolverError(RuntimeError):
    """A solve that could not finish (max steps, step-size underflow, ...); carries where it stopped."""

    def __init__(self, message: str, *, t_reached: float | None = None, nfe: int | None = None,
                 last_dt: float | None = None, status: Any = None, partial: "Solution | None" = None):
        super().__init__(message)
        self.t_reached, self.nfe, self.last_dt, self.status, self.partial = t_reached, nfe, last_dt, status, partial


class NonFiniteError(SolverError, FloatingPointError):
    """The network returned NaN/Inf; the message names the step, the time and the samples."""


@dataclass(init=False, eq=False)
class StepTable:
    r"""Precomputed per-step coefficients, built once per call by ``Solver.prepare`` and only
    indexed by ``step``.  Tensors are in the state's dtype and on its device unless the name
    ends in ``64`` (float64); names ending in ``_f`` are Python floats (fused in-place
    updates take them as scalars).  Index ``i`` of a per-interval field belongs to the step
    from ``t[i]`` to ``t[i+1]``.

    Set by the base :meth:`Solver.prepare` (the grid, and every coefficient of a LinearSDE):

    - ``steps``: number of intervals; ``t``: the grid as Python floats; ``t64``: the grid in
      float64 (the model's scalar-time path); ``dt = t[i+1] - t[i]`` (negative).
    - ``alpha, sigma``: :math:`x_t = \alpha_t x_0 + \sigma_t\epsilon` at every grid point;
      ``lam`` :math:`= \log(\alpha/\sigma)` (half the log-SNR); ``f, g2``: drift coefficient and
      squared diffusion; ``h = lam[i+1] - lam[i]``; ``alpha64, sigma64, lam64, h64``: the same in
      float64.  None for a non-linear SDE.

    The remaining fields are optional (None unless the method's ``prepare`` sets them); a
    method adds a field here, documented, rather than setting an undeclared attribute.
    The constructor stores only the fields it is given (the others read their class-level
    default None), so that building a table costs the same whatever the number of fields.
    """

    steps: int
    t: list[float]
    t64: Tensor
    dt: Tensor | None = None
    # -- LinearSDE schedule (base prepare)
    alpha: Tensor | None = None
    sigma: Tensor | None = None
    lam: Tensor | None = None
    f: Tensor | None = None
    g2: Tensor | None = None
    h: Tensor | None = None
    alpha64: Tensor | None = None
    sigma64: Tensor | None = None
    lam64: Tensor | None = None
    h64: Tensor | None = None
    # -- control flow: the order used at each step (multistep, singlestep, UniPC), and the
    #    steps where stability lowered it (multistep); None = ``order`` everywhere
    orders: list[int] | None = None
    order_lowered_at: list[int] | None = None
    # -- one-step linear updates x_{i+1} = x_coef x + eps_coef eps (+ x0_coef x0) (+ noise_std z)
    #    (euler, ddim, euler_maruyama, reverse_diffusion, ancestral, the SDE multistep methods)
    x_coef: Tensor | None = None
    eps_coef: Tensor | None = None
    x0_coef: Tensor | None = None
    noise_std: Tensor | None = None
    x_coef_f: list[float] | None = None
    eps_coef_f: list[float] | None = None
    noise_std_f: list[float] | None = None
    alpha_next_f: list[float] | None = None    # ddim: alpha_{i+1}
    # -- euler_maruyama on a general (non-linear) SDE: x += delta f(x) + g2_delta score + noise
    general: bool | None = None
    delta: Tensor | None = None
    g2_delta: Tensor | None = None
    # -- heun, edm_sde, restart (ode.heun_step): x~ = scale x + euler eps, x' = scale x + euler (eps + eps~) / 2
    scale_f: list[float] | None = None         # alpha_{i+1} / alpha_i
    euler_f: list[float] | None = None         # -sigma_{i+1} expm1(h_i)
    # -- exponential multistep: x_{i+1} = sigma_ratio x + sum_j coef[i][j] x0^{(i-j)}
    coef_f: list[list[float]] | None = None
    sigma_ratio_f: list[float] | None = None
    warm: Any = None                           # dpmpp_3m warmup="singlestep": a dpm.Warmup2S
    # -- UniPC corrector: weight of the new data prediction, and the corrector's order
    corr_f: list[float | None] | None = None
    corr_orders: list[int] | None = None
    # -- one record of precomputed coefficients per outer step, of the method's own type:
    #    singlestep DPM-Solver (exponential.SinglestepStage), edm_sde (churn.ChurnStep), the
    #    ancestral splits, sa_solver, er_sde and restart (see each method's prepare)
    stages: list[Any] | None = None
    # -- Langevin correctors (pc)
    corr_step_scale: Tensor | None = None
    corr_step: Tensor | None = None
    corr_noise: Tensor | None = None

    def __init__(self, steps: int, t: list[float], t64: Tensor, **optional: Any) -> None:
        self.steps, self.t, self.t64 = steps, t, t64
        for name, value in optional.items():
            if name not in _OPTIONAL_TABLE_FIELDS:
                raise TypeError(f"StepTable has no field {name!r}")
            setattr(self, name, value)


_OPTIONAL_TABLE_FIELDS = frozenset(f.name for f in dataclasses.fields(StepTable)) - {"steps", "t", "t64"}


@dataclass(frozen=True)
class StepInfo:
    """What a per-step ``callback`` receives: step index, the time reached and the state."""

    i: int
    t: float
    x: Tensor
    nfe: int


@dataclass(frozen=True)
class Solution:
    """Result of :func:`sample`.

    ``x``: the sample at ``t_end`` (the caller's dtype and device); ``nfe``: network calls
    made, counted at the model; ``timesteps``: the float64 grid used; ``trajectory``:
    ``[steps + 1, *x.shape]`` when asked for, else None; ``stats``: solver name, orders
    used, accepted/rejected steps (adaptive), status and warnings."""

    x: Tensor
    nfe: int
    timesteps: Tensor
    trajectory: Tensor | None = None
    stats: dict = field(default_factory=dict)


class CheckedModel:
    """The model as a solver sees it: one counted ``evaluate`` per call, with non-finite
    outputs caught where they happen (CPU: at once; CUDA: recorded on the device and
    checked after the loop, so the loop never synchronises) and a step/time note added
    to any exception the network raises.

    ``analytic_start``: the grid's start time (float64 scalar) when the first evaluation is
    to be answered by :func:`solvers.first_step.analytic_denoised` instead of the network
    (``sample(..., analytic_first_step=True)``); ``analytic_used`` says whether it was."""

    def __init__(self, model: ScoreModel, steps: int | None, check_finite: bool,
                 analytic_start: Tensor | None = None):
        # ``steps=None``: an adaptive solve, whose positions are counted in evaluations
        self.model, self.sde, self.steps, self.check_finite = model, model.sde, steps, check_finite
        self.step_index = 0
        self._deferred: list[tuple[int, Tensor, Tensor]] = []
        self._analytic_start = analytic_start
        self.analytic_used = False

    def where(self, step: int | None = None) -> str:
        step = self.step_index if step is None else step
        return f"evaluation {step + 1}" if self.steps is None else f"step {step + 1}/{self.steps}"

    def evaluate(self, x: Tensor, t64: Tensor) -> Denoised:
        if self._analytic_start is not None:
            return self._analytic(x, t64)
        try:
            d = self.model.evaluate(x, t64, validate=False)
        except Exception as err:  # re-raised unchanged, with where it happened
            if hasattr(err, "add_note"):
                err.add_note(f"scoresde: raised by the model at {self.where()}, "
                             f"t={float(t64.reshape(-1)[0]):.6g}")
            raise
        if self.check_finite:  # on the raw network output: one reduction pass on the CPU
            raw = d.raw
            if raw.device.type == "cpu":
                if raw.numel() and not math.isfinite(raw.sum().item()):
                    bad = ~torch.isfinite(raw)
                    if bool(bad.any()):  # (a finite sum overflow is not an error)
                        self._raise(bad, t64)
            else:
                bad = ~torch.isfinite(raw)
                self._deferred.append((self.step_index, t64, bad.reshape(bad.shape[0], -1).any(1)))
        return d

    def _analytic(self, x: Tensor, t64: Tensor) -> Denoised:
        """The first evaluation, answered without the network (at the grid's start only)."""
        start, self._analytic_start = self._analytic_start, None
        if t64.numel() != 1 or float(t64) != float(start):
            raise ValueError("analytic_first_step: the method's first evaluation is at "
                             f"t={float(t64.reshape(-1)[0]):.6g}, not at the grid's start {float(start):.6g}")
        self.analytic_used = True
        return analytic_denoised(self.sde, x, t64)

    def _raise(self, bad: Tensor, t64: Tensor, step: int | None = None) -> None:
        step = self.step_index if step is None else step
        per = bad.reshape(bad.shape[0], -1).any(1) if bad.ndim > 1 else bad
        idx = torch.nonzero(per).flatten().tolist()
        n = int(bad.sum())
        raise NonFiniteError(
            f"net returned {n} non-finite values at {self.where(step)}, "
            f"t={float(t64.reshape(-1)[0]):.6g}, samples {idx[:10]}{' ...' if len(idx) > 10 else ''}",
            t_reached=float(t64.reshape(-1)[0]), status="nonfinite",
        )

    def check_deferred(self) -> None:
        if not self._deferred:
            return
        flags = torch.stack([b.any() for _, _, b in self._deferred]).cpu()
        if bool(flags.any()):
            k = int(torch.nonzero(flags).flatten()[0])
            step, t64, bad = self._deferred[k]
            self._raise(bad.cpu(), t64.cpu(), step)

    # conveniences mirroring ScoreModel
    def x0(self, x: Tensor, t64: Tensor) -> Tensor:
        return self.evaluate(x, t64).x0

    def eps(self, x: Tensor, t64: Tensor) -> Tensor:
        return self.evaluate(x, t64).eps


class Solver:
    """Base of every fixed-step solver (a dataclass; its fields are the options).

    Class attributes: ``name`` (set by ``register``), ``order`` (theoretical global order),
    ``stochastic`` (draws noise), ``requires_linear_sde``, ``default_schedule``,
    ``nfe_per_step``.  ``order`` is a class constant except where it is an option (UniPC's
    ``order`` field) or follows from one (pc takes its predictor's); an instance value that
    depends on the options (DDIM's ``stochastic``, pc's flags) is set in ``__post_init__``.
    """

    name: ClassVar[str] = "solver"
    order: ClassVar[int] = 1
    stochastic: ClassVar[bool] = False
    requires_linear_sde: ClassVar[bool] = True
    default_schedule: ClassVar[str] = "uniform"
    nfe_per_step: ClassVar[int] = 1

    def __post_init__(self) -> None:
        """Validate the options; a subclass that derives values from them (normalised option
        values, instance flags) sets them here, after ``super().__post_init__()``."""
        self.validate_options()

    def validate_options(self) -> None:
        """Check option values (ranges, literals); raise ValueError/TypeError naming them.
        Only checks: it changes nothing (derived values belong in ``__post_init__``)."""

    # ------------------------------------------------------------- contract
    def grid_intervals(self, steps: int) -> int:
        """Number of grid intervals for a ``steps`` budget (singlestep methods group NFE)."""
        return steps

    def expected_nfe(self, steps: int) -> int:
        """Network evaluations for ``steps`` intervals (checked by the tests)."""
        return self.nfe_per_step * steps

    def prepare(self, sde: SDE, grid: TimeGrid, like: Tensor) -> StepTable:
        """Default table: the grid (``t64`` float64 on the device, ``t`` floats, ``dt``), and for a
        LinearSDE ``alpha, sigma, lam`` (= half log-SNR, :math:`\\log(\\alpha/\\sigma)`), ``f, g2``
        in the state dtype; ``h`` = :math:`\\lambda_{i+1}-\\lambda_i`."""
        t64 = grid.t
        tab = StepTable(steps=grid.steps, t=t64.tolist(), t64=t64)  # CPU float64: the model's scalar-time path
        cast = lambda v: v.to(dtype=like.dtype, device=like.device)  # noqa: E731
        tab.dt = cast(t64[1:] - t64[:-1])
        if isinstance(sde, LinearSDE):
            c = sde.coefficients(t64)
            lam = 0.5 * c["log_snr"]
            tab.alpha64, tab.sigma64, tab.lam64 = c["alpha"], c["sigma"], lam
            tab.alpha, tab.sigma, tab.lam = cast(c["alpha"]), cast(c["sigma"]), cast(lam)
            tab.f, tab.g2 = cast(c["f"]), cast(c["g2"])
            tab.h64 = lam[1:] - lam[:-1]
            tab.h = cast(tab.h64)
        return tab

    def init(self, x: Tensor) -> Any:
        return None

    def step(self, model: CheckedModel, i: int, x: Tensor, state: Any, table: StepTable,
             noise: NoiseSource) -> tuple[Tensor, Any]:
        raise NotImplementedError

    def stats(self, table: StepTable) -> dict:
        orders = table.orders if table.orders is not None else [self.order] * table.steps
        return {"orders": list(orders)}


# ------------------------------------------------------------------ boundary checks
def _check_model(model: Any) -> ScoreModel:
    if not isinstance(model, ScoreModel):
        raise TypeError(f"model must be a scoresde.ScoreModel, got {type(model).__name__}")
    return model


def _check_net_device(model: ScoreModel, x: Tensor) -> None:
    net = model.net
    if isinstance(net, torch.nn.Module):
        p = next(iter(net.parameters()), None)
        if p is not None and p.device != x.device:
            raise ValueError(f"net is on {p.device}, x_T on {x.device}; move one of them")


def build_grid(solver: Solver, sde: SDE, steps: Any, timesteps: Any, schedule: Any, t_end: Any,
               t_start: Any, rho: float) -> TimeGrid:
    """Resolve ``steps``/``timesteps``/``schedule``/``t_end`` into a checked :class:`TimeGrid`."""
    if timesteps is not None:
        if schedule is not None:
            raise ValueError("pass schedule or timesteps, not both")
        if t_start is not None:
            raise ValueError("pass t_start or timesteps, not both (timesteps[0] is the start time)")
        t = check_timesteps(timesteps, sde)
        n_int = t.numel() - 1
        if steps is not None:
            steps = check_int(steps, "steps", minimum=1)
            if solver.grid_intervals(steps) != n_int:
                raise ValueError(
                    f"pass steps or timesteps, not both (steps={steps} but timesteps has {n_int} intervals)"
                )
        if t_end is not None:  # compared at the precision the grid was given in
            t = match_t_end(t, t_end, timesteps, sde.T)
        if float(t[-1]) <= 0.0:
            raise ValueError("timesteps[-1] must be > 0 (the model is undefined at t = 0); "
                             "stop at a small t_end and use final_denoise=True")
        # a consistent ``steps`` is the NFE budget of a singlestep method (its order allocation)
        return TimeGrid(t, "custom", budget=steps)
    if steps is None and getattr(solver, "adaptive", False):
        steps = 1
    if steps is None:
        raise ValueError("pass steps (number of intervals) or timesteps")
    steps = check_int(steps, "steps", minimum=1)
    if schedule is None:
        schedule = solver.default_schedule
    if t_end is not None:
        t_end = check_float(t_end, "t_end")
        if not 0.0 < t_end <= sde.T:
            raise ValueError(
                f"t_end must be in (0, T]=(0, {sde.T:.6g}] for {type(sde).__name__}, got {t_end} "
                "(at t = 0 sigma = 0 and log-SNR is infinite; stop at a small t_end and use final_denoise=True)"
            )
    if t_start is not None:
        t_start = check_float(t_start, "t_start", low=0.0, high=sde.T)
    t0 = sde.T if t_start is None else t_start
    t1 = sde.default_t_end if t_end is None else t_end
    if t1 == t0:
        # a zero-length interval (e.g. t_end=T): nothing to integrate (x_T itself, nfe 0); the
        # schedule and options are still validated so that the same call with t_end < T works
        make_grid(sde, solver.grid_intervals(steps), schedule, 0.5 * t0, t0, rho)
        return TimeGrid(torch.tensor([t0], dtype=torch.float64), schedule, budget=steps)
    grid = make_grid(sde, solver.grid_intervals(steps), schedule, t_end, t_start, rho)
    return dataclasses.replace(grid, budget=steps)


def sample(model: ScoreModel, x_T: Tensor, method: Any = "dpmpp_2m", steps: int | None = None, *,
           t_end: float | None = None, schedule: str | None = None, timesteps: Any = None,
           t_start: float | None = None, rho: float = 7.0, generator: Any = None,
           return_trajectory: bool = False, callback: Callable[[StepInfo], None] | None = None,
           final_denoise: bool = False, nonfinite: str = "raise", analytic_first_step: bool = False,
           **method_options: Any) -> Solution:
    """Integrate the reverse process of ``model.sde`` from ``x_T`` at ``t_start`` (default T)
    to ``t_end`` (default ``sde.default_t_end``) with ``method``.

    **Arguments:**

    - ``model``: a :class:`scoresde.ScoreModel`.
    - ``x_T``: the starting state ``[B, ...]`` (float16/32/64; never modified).
    - ``method``: a registered name (:func:`available_methods`) with ``**method_options``, a
      solver instance, or ``"auto"``: a fixed documented rule picks the method, its options and
      the grid from ``steps``, which is then the NFE budget (:mod:`solvers.auto`; optional
      ``calibration=`` a :class:`CalibratedGrid`); ``stats["auto"]`` records the choice.
    - ``steps``: number of grid intervals (for singlestep DPM-Solver: the NFE budget), or
      ``timesteps``: an explicit strictly decreasing grid (list or 1-D tensor).
    - ``schedule``: ``"uniform" | "log_snr" | "quadratic" | "karras"`` (``rho``), default per method.
    - ``generator``: a ``torch.Generator``, a list of them (one per sample), a noise source
      (:mod:`solvers.noise`), or None.
    - ``final_denoise``: after the last step return the Tweedie estimate :math:`\\hat x_0` at
      ``t_end`` (one more NFE, counted).
    - ``nonfinite``: ``"raise"`` (:class:`NonFiniteError` naming step, t and samples) or
      ``"return"`` (stop and return the partial solution with ``stats["status"]``: on the CPU
      the state before the failing step; on CUDA the check is deferred to the end of the loop,
      which never synchronises, so the final state is returned and the message names the
      first failing step).
    - ``callback``: called after every step with a :class:`StepInfo`.
    - ``analytic_first_step``: answer the first network evaluation (at ``t_start``) with the
      exact prediction of :math:`N(0, I)` data, :math:`\\hat\\epsilon = \\sigma x/(\\sigma^2+\\alpha^2)`,
      without calling the network (Zhou et al. 2024, AFS; :mod:`solvers.first_step`): one NFE
      less, an error of order :math:`\\alpha(t_{start})` in that prediction, so meant for
      ``t_start = T``.  Fixed-step deterministic methods only (ValueError otherwise);
      ``stats["analytic_first_step"]`` says whether it was used.

    **Returns:** a :class:`Solution`.  Runs under ``torch.no_grad()``.

    **Raises:** ``ValueError``/``TypeError`` for bad input, before any network call;
    :class:`NonFiniteError`, :class:`SolverError`.
    """
    if isinstance(method, str) and method == "auto":
        from .auto import sample_auto
        calibration = method_options.pop("calibration", None)
        if analytic_first_step:
            raise ValueError("method='auto' decides analytic_first_step itself; leave it False")
        return sample_auto(sample, model, x_T, steps, schedule=schedule, timesteps=timesteps,
                           calibration=calibration, method_options=method_options, t_end=t_end,
                           t_start=t_start, generator=generator, return_trajectory=return_trajectory,
                           callback=callback, final_denoise=final_denoise, nonfinite=nonfinite)
    solver = _registry.get(method, **method_options)
    model = _check_model(model)
    x_T = check_batch_tensor(x_T, "x_T")
    if nonfinite not in ("raise", "return"):
        raise ValueError(f"nonfinite must be 'raise' or 'return', got {nonfinite!r}")
    sde = model.sde
    if solver.requires_linear_sde and not isinstance(sde, LinearSDE):
        raise TypeError(f"{solver.name} needs a LinearSDE; got {type(sde).__name__}")
    analytic_first_step = check_analytic_first_step(analytic_first_step, solver, sde)
    grid = build_grid(solver, sde, steps, timesteps, schedule, t_end, t_start, rho)
    # validated for every method (a wrong generator list is an error even where no noise is drawn)
    noise = make_noise(generator, x_T.shape[0], x_T.device)
    noise = noise if solver.stochastic else None
    _check_net_device(model, x_T)
    if hasattr(solver, "run"):
        return solver.run(model, x_T, grid, noise=noise, return_trajectory=return_trajectory,
                          callback=callback, final_denoise=final_denoise, nonfinite=nonfinite)
    return integrate(solver, model, x_T, grid, noise=noise, return_trajectory=return_trajectory,
                     callback=callback, final_denoise=final_denoise, nonfinite=nonfinite,
                     analytic_first_step=analytic_first_step)


def _trivial_solution(x_T: Tensor, grid: TimeGrid, return_trajectory: bool, stats: dict) -> Solution:
    """An empty batch or a zero-length interval: ``x_T`` itself (a copy), no network call.
    The trajectory keeps its documented shape ``[len(timesteps), *x_T.shape]``."""
    x_T = x_T.detach()
    traj = x_T.unsqueeze(0).expand(grid.t.numel(), *x_T.shape).clone() if return_trajectory else None
    return Solution(x_T.clone(), 0, grid.t, traj, stats)


def _state_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def integrate(solver: Solver, model: ScoreModel, x_T: Tensor, grid: TimeGrid, *, noise: NoiseSource | None,
              return_trajectory: bool = False, callback: Callable[[StepInfo], None] | None = None,
              final_denoise: bool = False, nonfinite: str = "raise",
              analytic_first_step: bool = False) -> Solution:
    """The one step loop shared by every fixed-step solver (inputs already validated).
    ``analytic_first_step``: the first evaluation (at ``grid.t[0]``) is answered analytically
    (:class:`CheckedModel`, ``analytic_start``)."""
    nfe0 = model.nfe
    stats: dict = {"solver": solver.name, "schedule": grid.schedule, "status": "success"}
    if analytic_first_step:
        stats["analytic_first_step"] = False
    if x_T.shape[0] == 0 or grid.t_start == grid.t_end:
        return _trivial_solution(x_T, grid, return_trajectory, {**stats, "orders": []})
    x = x_T.detach().to(_state_dtype(x_T), copy=True)      # never in a graph, never the caller's tensor
    ev = CheckedModel(model, grid.steps, check_finite=True,
                      analytic_start=grid.t[0] if analytic_first_step else None)
    traj = [x] if return_trajectory else None
    with torch.no_grad():
        table = solver.prepare(model.sde, grid, x)
        state = solver.init(x)
        try:
            for i in range(grid.steps):
                ev.step_index = i
                x, state = solver.step(ev, i, x, state, table, noise)
                if traj is not None:
                    traj.append(x)
                if callback is not None:
                    callback(StepInfo(i, table.t[i + 1], x, model.nfe - nfe0))
            if final_denoise:
                ev.step_index = grid.steps - 1
                x = ev.evaluate(x, table.t64[-1]).x0
            ev.check_deferred()
        except NonFiniteError as err:
            if nonfinite == "raise":
                raise
            stats.update(status="nonfinite", message=str(err), t_reached=err.t_reached)
    stats.update(solver.stats(table))
    if analytic_first_step:
        stats["analytic_first_step"] = ev.analytic_used
    out = x.to(x_T.dtype)
    trajectory = torch.stack(traj).to(x_T.dtype) if traj is not None else None
    return Solution(out, model.nfe - nfe0, grid.t, trajectory, stats)
