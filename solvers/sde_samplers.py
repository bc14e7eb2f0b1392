r"""Samplers of the reverse-time SDE: ``euler_maruyama``, ``reverse_diffusion``, ``ancestral``
and the adaptive ``adaptive_sde``.

The reverse of :math:`dx = f(x,t)\,dt + g(t)\,dW` (Anderson 1982; Song et al. 2021, eq. 6) is

.. math:: dx = \big[f(x,t) - g(t)^2\nabla\log p_t(x)\big]\,dt + g(t)\,d\bar W,

integrated from ``T`` down to ``t_end``.  For a LinearSDE, :math:`f(x,t) = f(t)x` and
:math:`\nabla\log p_t = -\hat\epsilon/\sigma_t`.  Notation on a grid :math:`t_0 > t_1 > \dots`:
:math:`\alpha_i, \sigma_i`, :math:`\lambda_i = \log(\alpha_i/\sigma_i)`,
:math:`h_i = \lambda_{i+1} - \lambda_i > 0`, :math:`\Delta_i = t_i - t_{i+1} > 0`.

Every sampler here draws **all** its randomness through the noise source it is given
(:mod:`solvers.noise`: one generator, one per sample, a Brownian path, or zero noise), as
``noise(i, t_i, t_{i+1}, x)``; the fixed-step ones compute every schedule coefficient once
per call in ``prepare`` (float64, then cast) and only index it in ``step``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from scoresde._checks import append_dims, check_float, check_int
from scoresde.model import ScoreModel
from scoresde.sde import SDE, LinearSDE

from ._registry import register
from . import adaptive, adaptive_driver
from .base import CheckedModel, NonFiniteError, Solution, Solver, StepInfo, StepTable, _state_dtype
from .noise import BrownianNoise, NoiseSource
from .ode import check_tolerances
from .timesteps import TimeGrid

__all__ = ["EulerMaruyama", "ReverseDiffusion", "Ancestral", "AdaptiveSDE"]


def _cast(v: Tensor, like: Tensor) -> Tensor:
    return v.to(dtype=like.dtype, device=like.device)


# --------------------------------------------------------------------------- fixed step
def _floats(tab: StepTable, *names: str) -> None:
    """Python-float copies ``<name>_f`` of per-step coefficients, for fused in-place updates."""
    for n in names:
        setattr(tab, n + "_f", getattr(tab, n).tolist())


def _axpbypcz(x: Tensor, a: float, y: Tensor, b: float, z: Tensor, c: float) -> Tensor:
    """a x + b y + c z in three passes over memory."""
    return torch.add(x * a, y, alpha=b).add_(z, alpha=c)


@register("euler_maruyama")
@dataclass
class EulerMaruyama(Solver):
    r"""Euler--Maruyama on the reverse-time SDE (Song et al. 2021, Appendix; score_sde's
    ``EulerMaruyamaPredictor``), stepping from :math:`t_i` down to :math:`t_{i+1}`:

    .. math:: x_{i+1} = x_i - \Delta_i\big[f(t_i)x_i - g(t_i)^2 s(x_i,t_i)\big] + g(t_i)\sqrt{\Delta_i}\,z_i,
              \qquad s = \nabla\log p_t = -\hat\epsilon/\sigma_t,

    :math:`z_i` from the noise source.  Weak order 1; strong order 1 for this additive
    noise (0.5 for general multiplicative noise).  1 NFE per step."""

    order: ClassVar[int] = 1
    stochastic: ClassVar[bool] = True
    requires_linear_sde: ClassVar[bool] = False

    def prepare(self, sde: SDE, grid: TimeGrid, like: Tensor) -> StepTable:
        tab = super().prepare(sde, grid, like)
        t64 = grid.t
        delta = t64[:-1] - t64[1:]                         # > 0
        if isinstance(sde, LinearSDE):
            c = sde.coefficients(t64[:-1])
            tab.general = False
            tab.x_coef = _cast(1.0 - delta * c["f"], like)
            tab.eps_coef = _cast(-delta * c["g2"] / c["sigma"], like)   # Delta g^2 s = -Delta g^2 eps / sigma
            tab.noise_std = _cast(torch.sqrt(c["g2"] * delta), like)
            _floats(tab, "x_coef", "eps_coef", "noise_std")
        else:                                              # a general SDE (score-only model)
            g2 = sde.diffusion(t64[:-1]) ** 2
            tab.general = True
            tab.delta = _cast(delta, like)
            tab.g2_delta = _cast(g2 * delta, like)
            tab.noise_std = _cast(torch.sqrt(g2 * delta), like)
        return tab

    def step(self, model: CheckedModel, i: int, x: Tensor, state: Any, tab: StepTable,
             noise: NoiseSource) -> tuple[Tensor, Any]:
        d = model.evaluate(x, tab.t64[i])
        z = noise(i, tab.t[i], tab.t[i + 1], x)
        if tab.general:
            tt = tab.t64[i].expand(x.shape[0]).to(device=x.device, dtype=x.dtype)
            x_next = x - tab.delta[i] * model.sde.drift(x, tt) + tab.g2_delta[i] * d.score
        else:
            # x - Delta (f x - g^2 s) = (1 - Delta f) x + Delta g^2 s,  s = -eps / sigma
            return _axpbypcz(x, tab.x_coef_f[i], d.eps, tab.eps_coef_f[i], z, tab.noise_std_f[i]), state
        return x_next + tab.noise_std[i] * z, state


@register("reverse_diffusion")
@dataclass
class ReverseDiffusion(Solver):
    r"""score_sde's ``ReverseDiffusionPredictor`` (Song et al. 2021, eq. 46) for any LinearSDE:
    the reverse SDE discretised with the *forward* discretisation of the same interval,
    :math:`x_{t_i} = r_i x_{t_{i+1}} + G_i\xi` with :math:`r_i = \alpha_i/\alpha_{i+1}` and
    :math:`G_i^2 = \sigma_i^2 - r_i^2\sigma_{i+1}^2 = \sigma_i^2(1 - e^{-2h_i})`:

    .. math:: x_{i+1} = x_i - (r_i - 1)x_i + G_i^2\,s(x_i, t_i) + G_i z_i
              = (2 - r_i)x_i - \frac{G_i^2}{\sigma_i}\hat\epsilon + G_i z_i.

    For VP this is score_sde's form with the discrete :math:`\beta_i = 1 - r_i^2 = G_i^2`
    (:math:`f_i = (\sqrt{1-\beta_i}-1)x`, :math:`G_i = \sqrt{\beta_i}`); for VE
    :math:`f_i = 0`, :math:`G_i^2 = \sigma_i^2 - \sigma_{i+1}^2`.  Weak order 1, 1 NFE per step."""

    order: ClassVar[int] = 1
    stochastic: ClassVar[bool] = True

    def prepare(self, sde: SDE, grid: TimeGrid, like: Tensor) -> StepTable:
        tab = super().prepare(sde, grid, like)
        r = tab.alpha64[:-1] / tab.alpha64[1:]
        G2 = tab.sigma64[:-1] ** 2 * (-torch.expm1(-2.0 * tab.h64))
        tab.x_coef = _cast(2.0 - r, like)
        tab.eps_coef = _cast(-G2 / tab.sigma64[:-1], like)
        tab.noise_std = _cast(torch.sqrt(G2), like)
        _floats(tab, "x_coef", "eps_coef", "noise_std")
        return tab

    def step(self, model: CheckedModel, i: int, x: Tensor, state: Any, tab: StepTable,
             noise: NoiseSource) -> tuple[Tensor, Any]:
        eps = model.evaluate(x, tab.t64[i]).eps
        z = noise(i, tab.t[i], tab.t[i + 1], x)
        return _axpbypcz(x, tab.x_coef_f[i], eps, tab.eps_coef_f[i], z, tab.noise_std_f[i]), state


@register("ancestral")
@dataclass
class Ancestral(Solver):
    r"""Ancestral sampling: draw :math:`x_{t_{i+1}}` from the exact Gaussian posterior
    :math:`q(x_{t_{i+1}} \mid x_{t_i}, x_0 = \hat x_0(x_{t_i}, t_i))` of the LinearSDE,

    .. math:: x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i}e^{-h_i}x_i + \alpha_{i+1}(1-e^{-2h_i})\,\hat x_0
              + \sigma_{i+1}\sqrt{1-e^{-2h_i}}\;z_i.

    For VP this is DDPM's ancestral step (Ho et al. 2020, eqs. 6-7, with the posterior
    variance :math:`\tilde\beta`; score_sde's VP ``AncestralSamplingPredictor`` uses the other
    DDPM choice :math:`\sigma^2 = \beta`); for VE it is score_sde's
    :math:`x_{i+1} = x_i + (\sigma_i^2-\sigma_{i+1}^2)s + \sqrt{\sigma_{i+1}^2(\sigma_i^2-\sigma_{i+1}^2)/\sigma_i^2}\,z`.
    It equals ``ddim`` with ``eta=1``, and is exact for point-mass data at any step count.
    Weak order 1, 1 NFE per step."""

    order: ClassVar[int] = 1
    stochastic: ClassVar[bool] = True

    def prepare(self, sde: SDE, grid: TimeGrid, like: Tensor) -> StepTable:
        tab = super().prepare(sde, grid, like)
        h = tab.h64
        one_m = -torch.expm1(-2.0 * h)                       # 1 - e^{-2h}
        tab.x_coef = _cast(tab.sigma64[1:] / tab.sigma64[:-1] * torch.exp(-h), like)
        tab.x0_coef = _cast(tab.alpha64[1:] * one_m, like)
        tab.noise_std = _cast(tab.sigma64[1:] * torch.sqrt(one_m), like)
        return tab

    def step(self, model: CheckedModel, i: int, x: Tensor, state: Any, tab: StepTable,
             noise: NoiseSource) -> tuple[Tensor, Any]:
        x0 = model.evaluate(x, tab.t64[i]).x0
        z = noise(i, tab.t[i], tab.t[i + 1], x)
        return tab.x_coef[i] * x + tab.x0_coef[i] * x0 + tab.noise_std[i] * z, state


# ----------------------------------------------------------------------------- adaptive
_RUN, _DONE, _DTMIN, _UNDER, _MAXS = range(5)      # the loop's per-sample codes
# the loop's codes as the adaptive engines' (solvers.adaptive.STATUS_NAMES; -1: aborted):
# a rejected step at dt_min is a step-size underflow
_ENGINE_CODE = torch.tensor([-1, adaptive.SUCCESS, adaptive.UNDERFLOW, adaptive.UNDERFLOW, adaptive.MAX_STEPS])


def _engine_solution(x: Tensor, t: Tensor, status: Tensor, n_acc: Tensor, n_rej: Tensor, h: Tensor,
                     calls: int) -> adaptive.PerSampleSolution:
    """``adaptive_sde``'s per-sample state as the engines' result, for :mod:`solvers.adaptive_driver`."""
    codes = _ENGINE_CODE.to(status.device)[status]
    return adaptive.PerSampleSolution(x, t, codes, n_acc, n_rej, 2 * (n_acc + n_rej), calls, None, h)


class _BrownianMemory:
    r"""Per-sample memory of Brownian increments already drawn but not yet used by an
    accepted step ("rejection sampling with memory", Rackauckas & Nie 2017, RSwM).

    For each sample it keeps a stack of consecutive future segments, nearest first:
    lengths ``L[k]`` (float64, 0 = empty) and increments ``P[k]``.  An attempted step of size
    h takes the increment over ``[0, h]``: whole segments, a Brownian-bridge split of the
    segment containing h, and fresh noise beyond the known ones.  A rejected attempt keeps
    everything it drew (the retry with a smaller h is a bridge sample inside it), an accepted
    one pops it: the noise is then one Brownian path, whatever the accept/reject decisions."""

    def __init__(self, like: Tensor, tol: float):
        B = like.shape[0]
        self.L = torch.zeros(0, B, dtype=torch.float64, device=like.device)
        self.P = torch.zeros((0, *like.shape), dtype=like.dtype, device=like.device)
        self.tol = tol

    def take(self, idx: Tensor, h: Tensor, xi1: Tensor, xi2: Tensor) -> Tensor:
        """The increment over the next ``h`` (float64 ``[b]``) for samples ``idx``; remembers how
        to update the stack in :meth:`commit`."""
        K, b = self.L.shape[0], idx.numel()
        L, P = self.L[:, idx], self.P[:, idx]
        nd = xi1.ndim
        if K == 0:
            tot = torch.zeros_like(h)
            f = torch.zeros(b, dtype=torch.long, device=h.device)
            n = f
            c_prev = tot
        else:
            C = torch.cumsum(L, 0)
            nonempty = L > 0
            n = nonempty.sum(0)
            tot = C[-1]
            full = (C <= h + self.tol) & nonempty
            f = full.sum(0)
            c_prev = torch.where(f > 0, C.gather(0, (f - 1).clamp(min=0)[None])[0], torch.zeros_like(h))
        exact = (f > 0) & ((h - c_prev).abs() <= self.tol)
        split = ~exact & (f < n)
        tail = ~exact & ~split
        ar = torch.arange(b, device=h.device)
        if K:
            fmask = append_dims((torch.arange(K, device=h.device)[:, None] < f[None]).to(P.dtype), P.ndim)
            p_full = (P * fmask).sum(0)
            fi = f.clamp(max=K - 1)
            Lf = torch.where(split, L[fi, ar], torch.ones_like(h))
            Pf = P[fi, ar]
        else:
            p_full = torch.zeros_like(xi1)
            Lf, Pf = torch.ones_like(h), torch.zeros_like(xi1)
        r = torch.where(split, (h - c_prev).clamp(min=0.0), torch.zeros_like(h))
        r = torch.minimum(r, Lf)
        w = append_dims((r / Lf).to(xi1.dtype), nd)
        sd = append_dims(torch.sqrt(r * (Lf - r) / Lf).to(xi1.dtype), nd)
        bridge = w * Pf + sd * xi1
        gap = torch.where(tail, (h - tot).clamp(min=0.0), torch.zeros_like(h))
        fresh = append_dims(torch.sqrt(gap).to(xi1.dtype), nd) * xi2
        sx, tx = append_dims(split, nd), append_dims(tail, nd)
        zero = torch.zeros_like(bridge)
        dW = p_full + torch.where(sx, bridge, zero) + torch.where(tx, fresh, zero)
        # extra slots: A = first part (split) or the fresh tail, B = the rest of the split segment
        A_L = torch.where(split, r, gap)
        A_P = torch.where(sx, bridge, fresh)
        B_L = torch.where(split, Lf - r, torch.zeros_like(h))
        B_P = torch.where(sx, Pf - bridge, torch.zeros_like(bridge))
        self._pending = (idx, L, P, f, split, tail, A_L, A_P, B_L, B_P)
        return dW

    def commit(self, ok: Tensor) -> None:
        idx, L, P, f, split, tail, A_L, A_P, B_L, B_P = self._pending
        K, b = L.shape[0], idx.numel()
        dev = L.device
        # source slots of the new stack: old levels 0..K-1, then A, B and an empty slot E
        L_ext = torch.cat([L, A_L[None], B_L[None], torch.zeros_like(A_L)[None]])
        P_ext = torch.cat([P, A_P[None], B_P[None], torch.zeros_like(A_P)[None]])
        k = torch.arange(K + 1, device=dev)[:, None].expand(K + 1, b)
        fk = f[None].expand_as(k)
        A, Bs, E = (torch.full_like(k, v) for v in (K, K + 1, K + 2))
        # rejected: keep everything, inserting the new boundary at h
        rej_split = torch.where(k < fk, k, torch.where(k == fk, A, torch.where(k == fk + 1, Bs, k - 1)))
        rej_tail = torch.where(k < fk, k, torch.where(k == fk, A, E))
        rej_exact = torch.where(k < K, k, E)
        # accepted: pop the segments used
        acc_split = torch.where(k == 0, Bs, torch.where(k + fk < K, k + fk, E))
        acc_tail = E
        acc_exact = torch.where(k + fk < K, k + fk, E)
        sp, tl, okk = split[None], tail[None], ok[None]
        rej = torch.where(sp, rej_split, torch.where(tl, rej_tail, rej_exact))
        acc = torch.where(sp, acc_split, torch.where(tl, acc_tail, acc_exact))
        sel = torch.where(okk, acc, rej).clamp(max=K + 2)
        ar = torch.arange(b, device=dev)[None].expand_as(sel)
        L_new, P_new = L_ext[sel, ar], P_ext[sel, ar]
        if self.L.shape[0] < K + 1:
            self.L = torch.cat([self.L, torch.zeros_like(self.L[:1]) if K else
                                torch.zeros(1, self.L.shape[1], dtype=self.L.dtype, device=dev)])
            self.P = torch.cat([self.P, torch.zeros((1, *self.P.shape[1:]), dtype=self.P.dtype, device=dev)])
        self.L[:, idx] = L_new
        self.P[:, idx] = P_new
        used = (self.L > 0).any(1)
        keep = int(used.nonzero().max()) + 1 if bool(used.any()) else 0
        self.L, self.P = self.L[:keep], self.P[:keep]


@register("adaptive_sde")
@dataclass
class AdaptiveSDE(Solver):
    r"""Adaptive reverse-SDE solver after Jolicoeur-Martineau et al. 2021, "Gotta Go Fast When
    Generating Data with Score-Based Models" (Algorithm 1): an embedded Euler--Maruyama /
    improved-Euler pair sharing the same Brownian increment :math:`\Delta W` (reverse drift
    :math:`b(x,t) = f(t)x - g(t)^2 s(x,t)`, step h down in t):

    .. math:: x' = x - h\,b(x,t) + g(t)\Delta W,\qquad
              \tilde x = x - h\,b(x', t-h) + g(t-h)\Delta W,\qquad x'' = \tfrac12(x' + \tilde x),

    error :math:`E = \big\|(x'-x'')/\delta\big\|_2/\sqrt n` with the mixed tolerance
    :math:`\delta = \max(\text{atol},\ \text{rtol}\max(|x'|, |x'_{prev}|))` (element-wise;
    :math:`x'_{prev}` the EM value of the last accepted step), accept iff :math:`E \le 1` and
    continue from :math:`x''` (extrapolation), and the controller
    :math:`h \leftarrow \min(h_{max},\ t - t_{end},\ \theta h E^{-r})`.

    **Per sample**: every sample has its own t, h, acceptance and counters (as in the
    authors' code), so with per-sample generators a sample's result does not depend on the
    rest of the batch.  Each loop iteration evaluates the network twice on the samples
    still running: nfe = 2 x iterations (counted, not predicted), + 1 with ``final_denoise``.
    The model is only evaluated inside ``[t_end, t_start]``.

    **Rejected steps** (``on_reject``): ``"redraw"`` (default, the paper's Algorithm 1) draws
    fresh noise for every attempt.  Acceptance then favours small noise draws, a bias that
    does not vanish with the tolerance when the error norm does not concentrate, i.e. in low
    dimension (measured relative variance errors 0.1-0.5 for d = 3..16 at any rtol; it fades
    as d grows, and the paper's images have d >= 3072).  ``"bridge"`` keeps the Brownian
    increment already drawn and retries on a Brownian-bridge sample inside it (rejection
    sampling with memory, Rackauckas & Nie 2017): the noise is then one Brownian path
    whatever the decisions, and the weak error falls with the tolerance in any dimension, at
    the cost of remembering the unused future increments (a few extra copies of the state)
    and of pathwise sensitivity to round-off (a Brownian path is only 1/2-Hölder in t, so a
    float32 run does not track its float64 twin sample by sample; both are valid samples).
    Draws per sample and iteration: 1 standard normal (``"redraw"``), 2 (``"bridge"``); a
    fixed ``BrownianNoise`` is refused.

    **Options:** ``rtol`` (default 0.01, the authors' code), ``atol`` (0.0078 ~ 1/128, for data
    in [-1, 1], the paper), ``h_init`` (default ``0.01 (t_start - t_end)``), ``h_max`` (default:
    the whole interval), ``safety`` :math:`\theta = 0.9`, ``exponent`` :math:`r = 0.9`,
    ``dt_min`` (default 1e-5: a rejected step of size ``dt_min`` fails the sample with status
    ``"step_size_underflow"``, never a silent accept; 0 disables it, and then a step below 10
    ulp of t is the same failure), ``max_steps`` (loop iterations, i.e. step attempts per
    sample; ``"max_steps"``), ``on_failure``: ``"raise"`` (:class:`SolverError` carrying
    ``t_reached``, ``nfe``, ``last_dt``, the per-sample ``status`` and the ``partial``
    solution) or ``"return"`` (failed samples stop where they are, with a warning and
    ``sol.stats["status"]`` naming the failure).

    Statuses, stats and errors are those of every adaptive solve (:mod:`solvers.adaptive_driver`).
    ``sol.stats``: ``status``, ``sample_status``, ``accepted`` and ``rejected`` (per-sample
    lists), ``iterations``, ``t_reached`` (per sample), ``rtol``, ``atol``.  Weak order 1."""

    order: ClassVar[int] = 1
    stochastic: ClassVar[bool] = True
    requires_linear_sde: ClassVar[bool] = False
    adaptive: ClassVar[bool] = True
    rtol: float = 0.01
    atol: float = 0.0078
    h_init: float | None = None
    h_max: float | None = None
    dt_min: float = 1e-5
    max_steps: int = 10_000
    safety: float = 0.9
    exponent: float = 0.9
    on_reject: str = "redraw"
    on_failure: str = "raise"

    def validate_options(self) -> None:
        check_float(self.rtol, "rtol", low=0.0)
        check_float(self.atol, "atol", low=0.0)
        if self.h_init is not None:
            check_float(self.h_init, "h_init", low=0.0, low_open=True)
        if self.h_max is not None:
            check_float(self.h_max, "h_max", low=0.0, low_open=True)
        check_float(self.dt_min, "dt_min", low=0.0)
        if self.h_max is not None and self.dt_min > self.h_max:
            raise ValueError(f"dt_min must be <= h_max, got dt_min={self.dt_min}, h_max={self.h_max}")
        if self.h_init is not None and self.h_max is not None and self.h_init > self.h_max:
            raise ValueError(f"h_init must be <= h_max, got h_init={self.h_init}, h_max={self.h_max}")
        if self.h_init is not None and self.h_init < self.dt_min:
            raise ValueError(f"h_init must be >= dt_min, got h_init={self.h_init}, dt_min={self.dt_min}")
        check_int(self.max_steps, "max_steps", minimum=1)
        check_float(self.safety, "safety", low=0.0, high=1.0, low_open=True)
        check_float(self.exponent, "exponent", low=0.0, low_open=True)
        if self.on_reject not in ("bridge", "redraw"):
            raise ValueError(f"on_reject must be 'bridge' or 'redraw', got {self.on_reject!r}")
        if self.on_failure not in ("raise", "return"):
            raise ValueError(f"on_failure must be 'raise' or 'return', got {self.on_failure!r}")

    def expected_nfe(self, steps: int) -> int:
        raise NotImplementedError("adaptive_sde is adaptive: its nfe is counted, not predicted")

    # ------------------------------------------------------------------ the loop
    def run(self, model: ScoreModel, x_T: Tensor, grid: TimeGrid, *, noise: NoiseSource | None = None,
            return_trajectory: bool = False, callback=None, final_denoise: bool = False,
            nonfinite: str = "raise") -> Solution:
        nfe0 = model.nfe
        x_T = x_T.detach()                 # the result never carries x_T's autograd history
        B = x_T.shape[0]
        stats: dict = {"solver": self.name, "status": "success"}
        if return_trajectory:
            raise ValueError("return_trajectory is not supported by adaptive_sde (per-sample step sizes); "
                             "use callback")
        if isinstance(noise, BrownianNoise):
            raise ValueError("adaptive_sde draws its noise per attempt (or per sample with a bridge on rejected "
                             "steps) and cannot follow a BrownianNoise: pass a torch.Generator (or a list of them)")
        if B == 0 or grid.t_start == grid.t_end:
            stats.update(sample_status=["success"] * B, accepted=[0] * B, rejected=[0] * B, iterations=0,
                         t_reached=[grid.t_end] * B)
            return Solution(x_T.clone(), 0, grid.t, None, stats)
        ev = CheckedModel(model, self.max_steps, check_finite=True)
        run = _SDERun(self, model, ev, x_T, grid, stats)

        def finish(message: str | None = None) -> Solution:
            stats["iterations"] = run.it
            adaptive_driver.record(stats, run.solution())
            if message is not None:
                stats["message"] = message
            return Solution(run.x.to(x_T.dtype), model.nfe - nfe0, grid.t, None, stats)

        with torch.no_grad():
            try:
                while run.active():
                    stop = run.attempt(noise)
                    if callback is not None:
                        callback(StepInfo(run.it - 1, float(run.t.max()), run.x, model.nfe - nfe0))
                    if stop:
                        break
                worst = int(run.status.max())
                if final_denoise and (worst < _DTMIN or self.on_failure == "return"):
                    run.x = ev.evaluate(run.x, run.t.clone()).x0   # t = t_end, or where a failed sample stopped
                ev.check_deferred()
            except NonFiniteError as err:
                if nonfinite == "raise":
                    raise
                sol = finish(str(err))
                sol.stats["status"] = "nonfinite"
                return sol
        found = adaptive_driver.failure(run.solution(), what="adaptive_sde", max_steps=self.max_steps,
                                        nfe=model.nfe - nfe0, detail=run.detail())
        if found is None:
            return finish()
        partial = finish(found[2])
        if self.on_failure == "raise":
            adaptive_driver.raise_failure(found[0], found[2], nfe=model.nfe - nfe0, partial=partial,
                                          sol=run.solution())
        warnings.warn(found[2], RuntimeWarning, stacklevel=3)
        return partial


class _SDERun:
    """The per-sample state of one ``adaptive_sde`` solve and its step attempt (the embedded
    Euler--Maruyama / improved-Euler pair and the controller of :class:`AdaptiveSDE`)."""

    def __init__(self, solver: AdaptiveSDE, model: ScoreModel, ev: CheckedModel, x_T: Tensor, grid: TimeGrid,
                 stats: dict):
        self.solver, self.sde, self.ev = solver, model.sde, ev
        dtype = self.dtype = _state_dtype(x_T)
        self.rtol, self.atol, notes = check_tolerances(solver.rtol, solver.atol, dtype)
        if notes:
            stats["warnings"] = notes
        stats.update(rtol=self.rtol, atol=self.atol)
        self.t_end = grid.t_end
        span = grid.t_start - grid.t_end
        self.h_max = span if solver.h_max is None else min(float(solver.h_max), span)
        h0 = min(0.01 * span if solver.h_init is None else float(solver.h_init), self.h_max)
        self.dt_min = float(solver.dt_min)
        self.snap = 1e-12 * span                              # remaining distance counted as arrived
        self.bridge = solver.on_reject == "bridge"
        B, dev = x_T.shape[0], x_T.device
        self.x = x_T.to(dtype, copy=True)
        self.x_prev = self.x.clone()
        self.t = torch.full((B,), grid.t_start, dtype=torch.float64, device=dev)
        self.h = torch.full((B,), h0, dtype=torch.float64, device=dev)
        self.status = torch.full((B,), _RUN, dtype=torch.long, device=dev)
        self.n_acc = torch.zeros(B, dtype=torch.long, device=dev)
        self.n_rej = torch.zeros(B, dtype=torch.long, device=dev)
        self.memory = _BrownianMemory(self.x, tol=1e-11 * span) if self.bridge else None
        self.it = 0

    def solution(self) -> adaptive.PerSampleSolution:
        return _engine_solution(self.x, self.t, self.status, self.n_acc, self.n_rej, self.h, 2 * self.it)

    def detail(self) -> str:
        return (f"t_end={self.t_end:.6g}, dt_min={self.dt_min:.3g}, rtol={self.rtol:g}, atol={self.atol:g}, "
                f"iterations={self.it}")

    def active(self) -> bool:
        """Whether a sample still runs; at ``max_steps`` iterations the running ones stop."""
        active = self.status == _RUN
        if not bool(active.any()):
            return False
        if self.it >= self.solver.max_steps:
            self.status[active] = _MAXS
            return False
        return True

    def _coef(self, t64: Tensor, like: Tensor) -> tuple[Tensor | None, Tensor]:
        sde = self.sde
        if isinstance(sde, LinearSDE):
            f, g2 = sde.f_unchecked(t64), sde.g2_unchecked(t64)
        else:                                                  # a general SDE (score-only model)
            f, g2 = None, sde.diffusion(t64) ** 2
        cast = lambda v: append_dims(v.to(dtype=like.dtype), like.ndim)  # noqa: E731
        return (cast(f) if f is not None else None), cast(g2)

    def _increment(self, x: Tensor, t64: Tensor, hx: Tensor, dW: Tensor) -> Tensor:
        """``-h b(x, t) + g(t) dW`` with the reverse drift ``b = f x - g^2 s``."""
        f, g2 = self._coef(t64, x)
        d = self.ev.evaluate(x, t64)
        drift = self.sde.drift(x, t64.to(x.dtype)) - g2 * d.score if f is None else f * x - g2 * d.score
        return -hx * drift + torch.sqrt(g2) * dW

    def attempt(self, noise: NoiseSource) -> bool:
        """One step attempt of every running sample; True when the loop must stop (a failure
        with ``on_failure="raise"``)."""
        s, it, t_end = self, self.it, self.t_end
        s.ev.step_index = it
        idx = torch.nonzero(s.status == _RUN).flatten()
        xa, ta, ha, pa = s.x[idx], s.t[idx], s.h[idx], s.x_prev[idx]
        tb = torch.where(ha >= ta - t_end, torch.full_like(ta, t_end), ta - ha)
        t_hi, t_lo = float(ta.max()), float(tb.min())
        # standard normals drawn for the whole batch, so that per-sample generators
        # advance in step whatever the rest of the batch does
        if s.bridge:
            xi1 = noise(2 * it, t_hi, t_lo, s.x)[idx]
            xi2 = noise(2 * it + 1, t_hi, t_lo, s.x)[idx]
            dW = s.memory.take(idx, ha, xi1, xi2)
        else:
            dW = torch.sqrt(append_dims(ha.to(s.dtype), s.x.ndim)) * noise(it, t_hi, t_lo, s.x)[idx]
        hx = append_dims(ha.to(s.dtype), s.x.ndim)
        k1 = s._increment(xa, ta, hx, dW)
        x_em = xa + k1
        k2 = s._increment(x_em, tb, hx, dW)
        x_ie = xa + 0.5 * (k1 + k2)
        ok, err64 = s._accept(x_em, x_ie, pa)
        if s.bridge:
            s.memory.commit(ok)
        okx = append_dims(ok, s.x.ndim)
        s.x[idx] = torch.where(okx, x_ie, xa)
        s.x_prev[idx] = torch.where(okx, x_em, pa)
        t_new = torch.where(ok, tb, ta)
        t_new = torch.where(t_new - t_end <= s.snap, torch.full_like(t_new, t_end), t_new)
        s.t[idx] = t_new
        s.n_acc[idx] += ok.long()
        s.n_rej[idx] += (~ok).long()
        st = s._control(idx, ok, err64, ha, t_new)
        s.status[idx] = st
        s.it += 1
        return s.solver.on_failure == "raise" and bool((st >= _DTMIN).any())

    def _accept(self, x_em: Tensor, x_ie: Tensor, x_prev: Tensor) -> tuple[Tensor, Tensor]:
        """The error norm E of the pair and the acceptance E <= 1 (float64 E)."""
        tiny = torch.finfo(self.dtype).tiny
        delta = torch.maximum(self.rtol * torch.maximum(x_em.abs(), x_prev.abs()),
                              torch.full_like(x_em, self.atol)).clamp_min(tiny)
        q = (x_ie - x_em) / delta
        red = tuple(range(1, q.ndim))
        n_el = max(1, q[0].numel())
        err = torch.sqrt((q * q).sum(dim=red) / n_el) if red else q.abs()
        err64 = err.to(torch.float64)
        return err64 <= 1.0, err64

    def _control(self, idx: Tensor, ok: Tensor, err64: Tensor, ha: Tensor, t_new: Tensor) -> Tensor:
        """The next step sizes and the attempted samples' status codes."""
        solver, t_end, dt_min = self.solver, self.t_end, self.dt_min
        h_ctrl = solver.safety * ha * err64.clamp_min(1e-10) ** (-solver.exponent)
        self.h[idx] = torch.minimum(torch.clamp(h_ctrl, min=dt_min, max=self.h_max), t_new - t_end)
        st = torch.where(t_new <= t_end, torch.full_like(idx, _DONE), torch.full_like(idx, _RUN))
        if dt_min > 0:
            failed = (~ok) & (ha <= dt_min * (1.0 + 1e-9))
            return torch.where(failed, torch.full_like(st, _DTMIN), st)
        eps64 = torch.finfo(torch.float64).eps
        under = (st == _RUN) & (h_ctrl < 10.0 * eps64 * t_new.abs())
        return torch.where(under, torch.full_like(st, _UNDER), st)
