r"""k-diffusion's ancestral samplers for any LinearSDE: ``euler_ancestral``,
``dpmpp_2s_ancestral`` and ``dpmpp_sde``.

k-diffusion (Crowson, ``k_diffusion/sampling.py``) writes them for :math:`x = x_0 + \sigma\epsilon`.
Any LinearSDE is that process in the scaled variables :math:`\hat x = x/\alpha_t`,
:math:`\hat\sigma = \sigma_t/\alpha_t = e^{-\lambda}` (:math:`\lambda = \log(\alpha/\sigma)`, half the
log-SNR), so each step below is k-diffusion's step on :math:`(\hat x, \hat\sigma)`, multiplied
back by :math:`\alpha` and written with :math:`h = \lambda_{i+1}-\lambda_i > 0` (coefficients in
float64 from logs, once per call in ``prepare``).  On :class:`scoresde.EDMSDE` (:math:`\alpha = 1`,
:math:`t = \sigma`) they are k-diffusion's samplers on the same sigmas.

**The ancestral split** (k-diffusion's ``get_ancestral_step``): a step from :math:`\hat\sigma_a`
down to :math:`\hat\sigma_b` (:math:`h = \lambda_b - \lambda_a`) goes deterministically to
:math:`\hat\sigma_{down} = \hat\sigma_b\sqrt{1-u^2}` and adds fresh noise of std
:math:`\hat\sigma_{up} = u\,\hat\sigma_b`, where

.. math:: u = \min\big(1,\ \eta\sqrt{1 - e^{-2h}}\big),

so that :math:`\hat\sigma_{down}^2 + \hat\sigma_{up}^2 = \hat\sigma_b^2`: an exact ODE step followed by
the noise would reproduce the marginal at :math:`\hat\sigma_b` exactly.  ``eta = 0`` is the ODE
method, ``eta = 1`` the DDPM-like amount (:math:`\hat\sigma_{down} = \hat\sigma_b^2/\hat\sigma_a`);
``s_noise`` scales the added noise (1 = the amount the marginals need).

All randomness comes from the noise source (:mod:`solvers.noise`), so per-sample generators
make a sample's result independent of the rest of the batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from scoresde._checks import check_float
from scoresde.sde import SDE

from ._registry import register
from .base import CheckedModel, Solver, StepTable
from .exponential import _need_finite_lam
from .noise import NoiseSource
from .timesteps import TimeGrid

__all__ = ["EulerAncestral", "DPMSolverPP2SAncestral", "DPMSolverPPSDE", "ancestral_split", "stage_times"]


def ancestral_split(h: float, eta: float) -> tuple[float, float]:
    r"""``(down, up)`` = :math:`(\sqrt{1-u^2},\ u)`, :math:`u = \min(1, \eta\sqrt{1-e^{-2h}})`: the
    ancestral step's :math:`\hat\sigma_{down}/\hat\sigma_b` and :math:`\hat\sigma_{up}/\hat\sigma_b`
    for a step of :math:`h = \lambda_b - \lambda_a \ge 0` (k-diffusion's ``get_ancestral_step``)."""
    u = min(1.0, eta * math.sqrt(-math.expm1(-2.0 * h)))
    return math.sqrt((1.0 - u) * (1.0 + u)), u


def _one_minus_decay(h: float, down: float) -> float:
    r""":math:`1 - e^{-h}\,\text{down} = -\mathrm{expm1}(-h')`, :math:`h' = h - \log(\text{down})` the
    step in :math:`\lambda` to :math:`\hat\sigma_{down}` (1 where down = 0, i.e. :math:`h' = \infty`)."""
    return 1.0 if down == 0.0 else -math.expm1(-h + math.log(down))


def _check_eta(eta: Any, high: float | None) -> None:
    check_float(eta, "eta", low=0.0, high=high)


def _check_s_noise(s_noise: Any) -> None:
    check_float(s_noise, "s_noise", low=0.0, low_open=True)


def stage_times(sde: SDE, lam_target: Tensor, t_lo: Tensor, t_hi: Tensor) -> tuple[Tensor, dict]:
    r"""The times whose :math:`\lambda` is ``lam_target`` (float64, one per step), kept inside
    ``[t_lo, t_hi]`` (round-off of the inverse), and the schedule coefficients actually there
    (lists of floats)."""
    t = sde.t_of_log_snr_unchecked(2.0 * lam_target)
    t = torch.minimum(torch.maximum(t, t_lo), t_hi)
    return t, {k: v.tolist() for k, v in sde.coefficients(t).items()}


@dataclass
class _AncestralBase(Solver):
    """Shared options (``eta``, ``s_noise``), checks and derived flags."""

    stochastic: ClassVar[bool] = True             # the default eta = 1 draws noise
    default_schedule: ClassVar[str] = "karras"
    eta_max: ClassVar[float | None] = None        # the largest eta the method supports (None: any)
    eta: float = 1.0
    s_noise: float = 1.0

    def validate_options(self) -> None:
        _check_eta(self.eta, self.eta_max)
        _check_s_noise(self.s_noise)

    def __post_init__(self) -> None:
        """Validate, then ``eta``/``s_noise`` as floats; ``stochastic`` iff ``eta > 0``."""
        super().__post_init__()
        self.eta, self.s_noise = float(self.eta), float(self.s_noise)
        self.stochastic = self.eta > 0.0

    def prepare(self, sde: SDE, grid: TimeGrid, like: Tensor) -> StepTable:
        tab = super().prepare(sde, grid, like)
        _need_finite_lam(tab, self.name)
        return tab


@register("euler_ancestral")
@dataclass
class EulerAncestral(_AncestralBase):
    r"""k-diffusion's ``sample_euler_ancestral``: an Euler step of the probability-flow ODE
    :math:`d\hat x/d\hat\sigma = \hat\epsilon` to :math:`\hat\sigma_{down}`, then noise
    (module docstring).  With :math:`(\text{down}, u)` = :func:`ancestral_split`\ (h, eta):

    .. math:: x_{i+1} = \frac{\alpha_{i+1}}{\alpha_i}x_i
              + \sigma_{i+1}\big(\text{down} - e^{h}\big)\hat\epsilon(x_i, t_i)
              + s_{noise}\,u\,\sigma_{i+1} z_i.

    Since :math:`\hat x_i - \hat\sigma_i\hat\epsilon = \hat x_0`, this is
    :math:`\alpha_{i+1}\hat x_0 + \text{down}\,\sigma_{i+1}\hat\epsilon + s_{noise}u\sigma_{i+1}z`:
    ``ddim`` with the same eta for eta in [0, 1] (eta = 1: ``ancestral``).  Any ``eta >= 0`` (k-diffusion caps
    :math:`u` at 1: above that the step denoises fully and re-noises).  Weak order 1, 1 NFE
    per step."""

    order: ClassVar[int] = 1

    def prepare(self, sde: SDE, grid: TimeGrid, like: Tensor) -> StepTable:
        tab = super().prepare(sde, grid, like)
        log_alpha = torch.log(tab.alpha64)
        x_coef, eps_coef, noise_std = [], [], []
        for i, h in enumerate(tab.h64.tolist()):
            down, u = ancestral_split(h, self.eta)
            s_next = float(tab.sigma64[i + 1])
            x_coef.append(math.exp(float(log_alpha[i + 1] - log_alpha[i])))
            # down - e^h = -(u^2/(1 + down) + expm1(h)), without cancellation for small h
            eps_coef.append(-s_next * (u * u / (1.0 + down) + math.expm1(h)))
            noise_std.append(self.s_noise * u * s_next)
        tab.x_coef_f, tab.eps_coef_f, tab.noise_std_f = x_coef, eps_coef, noise_std
        return tab

    def step(self, model: CheckedModel, i: int, x: Tensor, state: Any, tab: StepTable,
             noise: NoiseSource) -> tuple[Tensor, Any]:
        eps = model.evaluate(x, tab.t64[i]).eps
        x_next = torch.add(x * tab.x_coef_f[i], eps, alpha=tab.eps_coef_f[i])
        if self.stochastic:
            x_next.add_(noise(i, tab.t[i], tab.t[i + 1], x), alpha=tab.noise_std_f[i])
        return x_next, state


class TwoStageStep(NamedTuple):
    """One step of a two-evaluation ancestral method (Python float64 scalars; the stage time
    as a float64 tensor, the model's time input)."""

    t_stage: Tensor     # s: the stage time, t_{i+1} <= s <= t_i
    u_x: float          # stage: u = u_x x_i + u_x0 x0_i (+ u_noise z_1)
    u_x0: float
    u_noise: float
    x_coef: float       # x_{i+1} = x_coef x_i + x0_coef x0_i + x0_stage_coef x0(u, s) + noise_std z
    x0_coef: float
    x0_stage_coef: float
    noise_std: float
    w_first: float      # dpmpp_sde: weight of the first sub-interval's normal in the step's normal
    w_second: float     # (sqrt of its share of t_i - t_{i+1})


@register("dpmpp_2s_ancestral")
@dataclass
class DPMSolverPP2SAncestral(_AncestralBase):
    r"""k-diffusion's ``sample_dpmpp_2s_ancestral``: one DPM-Solver++(2S) step (Lu et al. 2022b,
    Algorithm 1, :math:`r = 1/2`) to :math:`\hat\sigma_{down}`, then noise.  With
    :math:`(\text{down}, u)` = :func:`ancestral_split`\ (h, eta), the step to
    :math:`\hat\sigma_{down}` has :math:`h' = h - \log(\text{down})` and the stage
    :math:`s` sits at :math:`\lambda_s = \lambda_i + h'/2`:

    .. math:: u_s = \frac{\sigma_s}{\sigma_i}x_i + \alpha_s\big(1 - e^{-(\lambda_s-\lambda_i)}\big)\hat x_0(x_i, t_i),

    .. math:: x_{i+1} = \frac{\sigma_{i+1}\,\text{down}}{\sigma_i}x_i
              + \alpha_{i+1}\big(1 - e^{-h'}\big)\hat x_0(u_s, s) + s_{noise}\,u\,\sigma_{i+1}z_i.

    ``eta`` in [0, 1]: then :math:`h' \le 2h`, so the stage lies in :math:`[t_{i+1}, t_i]`
    (at :math:`t_{i+1}` for eta = 1) where the model is defined.  2 NFE per step; order 2 for
    eta = 0, and for eta > 0 a second-order step followed by the exact amount of fresh noise
    (measured weak order 1.7 on Gaussian data, 10..80 steps)."""

    order: ClassVar[int] = 2
    nfe_per_step: ClassVar[int] = 2
    eta_max: ClassVar[float | None] = 1.0

    def prepare(self, sde: SDE, grid: TimeGrid, like: Tensor) -> StepTable:
        tab = super().prepare(sde, grid, like)
        lam, a, s = tab.lam64.tolist(), tab.alpha64.tolist(), tab.sigma64.tolist()
        splits = [ancestral_split(h, self.eta) for h in tab.h64.tolist()]
        # the step to sigma_down, h' = h - log(down) (inf where down = 0)
        h_down = [h - math.log(d) if d > 0.0 else math.inf for h, (d, _) in zip(tab.h64.tolist(), splits)]
        t_s, c = stage_times(sde, tab.lam64[:-1] + 0.5 * torch.tensor(h_down, dtype=torch.float64),
                             grid.t[1:], grid.t[:-1])
        stages = []
        for i, ((down, u), hd) in enumerate(zip(splits, h_down)):
            h_s = 0.5 * c["log_snr"][i] - lam[i]
            stages.append(TwoStageStep(
                t_s[i], c["sigma"][i] / s[i], -c["alpha"][i] * math.expm1(-h_s), 0.0,
                s[i + 1] * down / s[i], 0.0, -a[i + 1] * math.expm1(-hd), self.s_noise * u * s[i + 1],
                1.0, 0.0))
        tab.stages = stages
        return tab

    def step(self, model: CheckedModel, i: int, x: Tensor, state: Any, tab: StepTable,
             noise: NoiseSource) -> tuple[Tensor, Any]:
        c = tab.stages[i]
        x0 = model.evaluate(x, tab.t64[i]).x0
        x0_s = model.evaluate(torch.add(x * c.u_x, x0, alpha=c.u_x0), c.t_stage).x0
        x_next = torch.add(x * c.x_coef, x0_s, alpha=c.x0_stage_coef)
        if self.stochastic:
            x_next.add_(noise(i, tab.t[i], tab.t[i + 1], x), alpha=c.noise_std)
        return x_next, state


@register("dpmpp_sde")
@dataclass
class DPMSolverPPSDE(_AncestralBase):
    r"""k-diffusion's ``sample_dpmpp_sde`` (stochastic DPM-Solver++, 2 stages).  The stage
    :math:`s` at :math:`\lambda_s = \lambda_i + r h`; :math:`(d_1, u_1)` =
    :func:`ancestral_split`\ :math:`(rh, \eta)`, :math:`(d, u)` = :func:`ancestral_split`\ (h, eta):

    .. math:: u_s = \frac{\sigma_s d_1}{\sigma_i}x_i + \alpha_s(1 - e^{-rh}d_1)\hat x_0^{(i)}
              + s_{noise}u_1\sigma_s\,z_1,

    .. math:: x_{i+1} = \frac{\sigma_{i+1} d}{\sigma_i}x_i + \alpha_{i+1}(1 - e^{-h}d)
              \Big[\big(1-\tfrac1{2r}\big)\hat x_0^{(i)} + \tfrac1{2r}\hat x_0(u_s, s)\Big]
              + s_{noise}\,u\,\sigma_{i+1}\,z,

    where :math:`z_1` is the Brownian increment over :math:`[s, t_i]` and :math:`z` the one over
    the whole step (both normalised), as k-diffusion's Brownian-tree noise gives them.  Here the
    noise source is asked for the two sub-intervals, ``noise(2i, t_i, s)`` and
    ``noise(2i+1, s, t_{i+1})``, and :math:`z = (\sqrt{\tau_1}z_1 + \sqrt{\tau_2}z_2)/\sqrt{\tau_1+\tau_2}`
    (:math:`\tau_1 = t_i - s`, :math:`\tau_2 = s - t_{i+1}`): with :class:`~solvers.noise.BrownianNoise`
    that is one Brownian path in t, with a generator two independent normals combined the same
    way.  (k-diffusion's tree runs in sigma; on EDMSDE t is sigma.)

    Options ``eta >= 0`` (as k-diffusion, :math:`u \le 1`), ``s_noise``, ``r`` in (0, 1)
    (default 1/2; the weight :math:`1/(2r)` uses the fraction of h actually reached by the
    inverse log-SNR).  2 NFE per step; order 2 for eta = 0 (measured weak order 1.9 on
    Gaussian data at eta = 1, 10..80 steps)."""

    order: ClassVar[int] = 2
    nfe_per_step: ClassVar[int] = 2
    r: float = 0.5

    def validate_options(self) -> None:
        super().validate_options()
        check_float(self.r, "r", low=0.0, high=1.0, low_open=True, high_open=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.r = float(self.r)

    def prepare(self, sde: SDE, grid: TimeGrid, like: Tensor) -> StepTable:
        tab = super().prepare(sde, grid, like)
        t, lam = tab.t, tab.lam64.tolist()
        a, s = tab.alpha64.tolist(), tab.sigma64.tolist()
        t_s, c = stage_times(sde, tab.lam64[:-1] + self.r * tab.h64, grid.t[1:], grid.t[:-1])
        stages = []
        for i, h in enumerate(tab.h64.tolist()):
            h_s = 0.5 * c["log_snr"][i] - lam[i]
            d1, u1 = ancestral_split(h_s, self.eta)
            d, u = ancestral_split(h, self.eta)
            fac = 0.5 * h / h_s                                  # 1/(2r), r as reached
            x0_w = a[i + 1] * _one_minus_decay(h, d)
            tau1, tau2 = t[i] - float(t_s[i]), float(t_s[i]) - t[i + 1]
            stages.append(TwoStageStep(
                t_s[i], c["sigma"][i] * d1 / s[i], c["alpha"][i] * _one_minus_decay(h_s, d1),
                self.s_noise * u1 * c["sigma"][i],
                s[i + 1] * d / s[i], x0_w * (1.0 - fac), x0_w * fac, self.s_noise * u * s[i + 1],
                math.sqrt(tau1 / (tau1 + tau2)), math.sqrt(tau2 / (tau1 + tau2))))
        tab.stages = stages
        return tab

    def step(self, model: CheckedModel, i: int, x: Tensor, state: Any, tab: StepTable,
             noise: NoiseSource) -> tuple[Tensor, Any]:
        c = tab.stages[i]
        x0 = model.evaluate(x, tab.t64[i]).x0
        u = torch.add(x * c.u_x, x0, alpha=c.u_x0)
        if self.stochastic:
            z = self._normals(noise, i, x, tab)
            u.add_(z[0], alpha=c.u_noise)
        x0_s = model.evaluate(u, c.t_stage).x0
        x_next = torch.add(x * c.x_coef, x0, alpha=c.x0_coef).add_(x0_s, alpha=c.x0_stage_coef)
        if self.stochastic:
            x_next.add_(z[0], alpha=c.noise_std * c.w_first).add_(z[1], alpha=c.noise_std * c.w_second)
        return x_next, state

    @staticmethod
    def _normals(noise: NoiseSource, i: int, x: Tensor, tab: StepTable) -> tuple[Tensor, Tensor]:
        """The two sub-intervals' normals (a zero-length one, where round-off puts the stage on
        an end of the step, is not drawn: its weight is 0)."""
        c, t0, t1 = tab.stages[i], tab.t[i], tab.t[i + 1]
        s = float(c.t_stage)
        z1 = noise(2 * i, t0, s, x) if c.w_first > 0.0 else torch.zeros_like(x)
        z2 = noise(2 * i + 1, s, t1, x) if c.w_second > 0.0 else torch.zeros_like(x)
        return z1, z2
