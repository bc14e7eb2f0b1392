r"""``edm_sde``: EDM's stochastic sampler (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", Algorithm 2) for any LinearSDE.

EDM writes it for :math:`x = x_0 + \sigma\epsilon`; any LinearSDE is that process in
:math:`\hat x = x/\alpha_t`, :math:`\hat\sigma = \sigma_t/\alpha_t = e^{-\lambda}` (as ``heun``,
:class:`solvers.ode.Heun`).  Step i from :math:`\hat\sigma_i` to :math:`\hat\sigma_{i+1}`:

1. churn: :math:`\gamma_i = \min(S_{churn}/N,\ \sqrt2-1)` if
   :math:`S_{tmin} \le \hat\sigma_i \le S_{tmax}`, else 0 (N = ``steps``);
   :math:`\hat\sigma_{\hat\imath} = (1+\gamma_i)\hat\sigma_i` and
   :math:`\hat x_{\hat\imath} = \hat x_i + S_{noise}\sqrt{\hat\sigma_{\hat\imath}^2-\hat\sigma_i^2}\,z_i`
   (the noise that takes the marginal at :math:`\hat\sigma_i` exactly to the one at
   :math:`\hat\sigma_{\hat\imath}`);
2. a Heun step of the probability-flow ODE :math:`d\hat x/d\hat\sigma = \hat\epsilon` from
   :math:`\hat\sigma_{\hat\imath}` to :math:`\hat\sigma_{i+1}` (an Euler step on the last
   interval, as EDM).

:math:`\hat\sigma_{\hat\imath}` is a time :math:`\hat t_i \ge t_i` of the SDE
(``sde.t_of_log_snr_unchecked`` at :math:`\log\mathrm{SNR}_i - 2\log(1+\gamma_i)`), where the
model is evaluated.  **Beyond T** the model is not defined, so :math:`\gamma_i` is clamped to
:math:`\hat\sigma(T)/\hat\sigma_i - 1`: no churn at all on a step that starts at T (EDM's
settings keep :math:`S_{tmax}` below :math:`\sigma_{max}`, where this never binds;
k-diffusion's ``sample_heun`` with ``s_tmax=inf`` would evaluate its network above
:math:`\sigma_{max}`).  ``stats["churn"]`` lists the :math:`\gamma_i` used.

With :math:`h = \lambda_{i+1}-\lambda_{\hat\imath}` and :math:`\hat\epsilon` the model's noise
prediction, in the SDE's own variables:

.. math:: x_{\hat\imath} = \frac{\alpha_{\hat\imath}}{\alpha_i}x_i
          + S_{noise}\,\sigma_{\hat\imath}\sqrt{1 - e^{-2(\lambda_i-\lambda_{\hat\imath})}}\,z_i,\qquad
          \tilde x = \frac{\alpha_{i+1}}{\alpha_{\hat\imath}}x_{\hat\imath} + E\,\hat\epsilon(x_{\hat\imath}, \hat t_i),

.. math:: x_{i+1} = \frac{\alpha_{i+1}}{\alpha_{\hat\imath}}x_{\hat\imath}
          + \tfrac E2\big(\hat\epsilon(x_{\hat\imath}, \hat t_i) + \hat\epsilon(\tilde x, t_{i+1})\big),
          \qquad E = -\sigma_{i+1}\,\mathrm{expm1}(h).

The churn normal is ``noise(i, t_i, t_{i+1}, x)`` (one per churned step; with a Brownian
source the steps' intervals are disjoint, so the normals are independent).  With
``S_churn = 0`` this is ``heun``.  2 NFE per step except the last (nfe = 2 steps - 1;
``last_step_euler=False``: 2 steps).
"""
from __future__ import annotations

import math
import numbers
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
from .ode import Heun, heun_step
from .timesteps import TimeGrid

__all__ = ["EDMStochastic", "ChurnStep", "churn_gammas"]

GAMMA_MAX = math.sqrt(2.0) - 1.0   # EDM's cap: the churn at most doubles the noise variance


class ChurnStep(NamedTuple):
    """One step's coefficients (Python float64 scalars; the churned time as the model's
    float64 time input)."""

    gamma: float        # gamma_i actually used (after the clamp at T)
    t_hat: Tensor       # the time whose sigma/alpha is (1 + gamma_i) sigma_i/alpha_i
    churn_x: float     # x_hat = churn_x x_i + churn_std z_i  (alpha_hat / alpha_i)
    churn_std: float
    scale: float        # alpha_{i+1} / alpha_hat
    euler: float        # E = -sigma_{i+1} expm1(lambda_{i+1} - lambda_hat)


def churn_gammas(sigma_hat: list[float], steps: int, S_churn: float, S_tmin: float, S_tmax: float,
                 sigma_hat_T: float) -> list[float]:
    r""":math:`\gamma_i` of Algorithm 2 at the grid's :math:`\hat\sigma_i` (the start of each step),
    clamped so that :math:`(1+\gamma_i)\hat\sigma_i \le \hat\sigma(T)` = ``sigma_hat_T``."""
    g = min(S_churn / steps, GAMMA_MAX)
    return [max(0.0, min(g if S_tmin <= sh <= S_tmax else 0.0, sigma_hat_T / sh - 1.0)) for sh in sigma_hat]


def _is_plus_inf(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value == math.inf


@register("edm_sde")
@dataclass
class EDMStochastic(Solver):
    r"""EDM's stochastic sampler (Karras et al. 2022, Algorithm 2; see the module docstring):
    churn :math:`\hat\sigma_i \to (1+\gamma_i)\hat\sigma_i` with fresh noise, then a Heun step.

    Options (EDM's names, in :math:`\hat\sigma = \sigma/\alpha` units): ``S_churn >= 0``
    (0: no noise, = ``heun``), ``S_tmin <= S_tmax`` (the churn window; ``S_tmax`` may be inf),
    ``S_noise > 0`` (scales the churn noise), ``last_step_euler``.  The defaults are EDM's
    ImageNet-64 settings (Karras et al. 2022, Table 5: 40, 0.05, 50, 1.003), tuned for data in
    [-1, 1]; EDM's and k-diffusion's function defaults (0, 0, inf, 1) are ``heun``.
    Order 2 with ``S_churn = 0``; with churn the step is exact noise injection followed by a
    second-order ODE step (measured weak order 2 on Gaussian data)."""

    order: ClassVar[int] = 2
    stochastic: ClassVar[bool] = True             # the default S_churn = 40 draws noise
    default_schedule: ClassVar[str] = "karras"
    S_churn: float = 40.0
    S_tmin: float = 0.05
    S_tmax: float = 50.0
    S_noise: float = 1.003
    last_step_euler: bool = True

    def validate_options(self) -> None:
        check_float(self.S_churn, "S_churn", low=0.0)
        tmin = check_float(self.S_tmin, "S_tmin", low=0.0)
        tmax = math.inf if _is_plus_inf(self.S_tmax) else check_float(self.S_tmax, "S_tmax", low=0.0)
        if tmin > tmax:
            raise ValueError(f"S_tmin must be <= S_tmax, got S_tmin={tmin}, S_tmax={tmax}")
        check_float(self.S_noise, "S_noise", low=0.0, low_open=True)
        if not isinstance(self.last_step_euler, bool):
            raise TypeError(f"last_step_euler must be a bool, got {self.last_step_euler!r}")

    def __post_init__(self) -> None:
        """Validate, then the options as floats; ``stochastic`` iff ``S_churn > 0``."""
        super().__post_init__()
        self.S_churn, self.S_tmin, self.S_tmax, self.S_noise = (
            float(self.S_churn), float(self.S_tmin), float(self.S_tmax), float(self.S_noise))
        self.stochastic = self.S_churn > 0.0

    def expected_nfe(self, steps: int) -> int:
        return Heun.expected_nfe(self, steps)              # Heun's steps: 2 per step, Euler last

    def stats(self, table: StepTable) -> dict:
        return {**Heun.stats(self, table), "churn": [c.gamma for c in table.stages]}

    def prepare(self, sde: SDE, grid: TimeGrid, like: Tensor) -> StepTable:
        tab = super().prepare(sde, grid, like)
        _need_finite_lam(tab, self.name)
        lam = tab.lam64.tolist()
        cT = sde.coefficients(torch.tensor([sde.T], dtype=torch.float64))
        lam_T = 0.5 * float(cT["log_snr"][0])
        gammas = churn_gammas([math.exp(-v) for v in lam[:-1]], grid.steps, self.S_churn, self.S_tmin,
                              self.S_tmax, math.exp(-lam_T))
        # the churned times: sigma/alpha raised by 1 + gamma (log-SNR lowered by 2 log(1 + gamma)),
        # kept in [t_i, T] against round-off; the coefficients actually there
        g = torch.tensor(gammas, dtype=torch.float64)
        t_inv = sde.t_of_log_snr_unchecked(tab.lam64[:-1] * 2.0 - 2.0 * torch.log1p(g))
        t_hat = torch.where(g > 0.0, torch.minimum(torch.maximum(t_inv, grid.t[:-1]), torch.full_like(g, sde.T)),
                            grid.t[:-1])
        c = sde.coefficients(t_hat)
        la_hat, s_hat, lam_hat = c["log_alpha"].tolist(), c["sigma"].tolist(), (0.5 * c["log_snr"]).tolist()
        log_alpha, sigma = torch.log(tab.alpha64).tolist(), tab.sigma64.tolist()
        steps = []
        for i, gi in enumerate(gammas):
            steps.append(ChurnStep(
                gi, t_hat[i], math.exp(la_hat[i] - log_alpha[i]),
                self.S_noise * s_hat[i] * math.sqrt(-math.expm1(-2.0 * max(0.0, lam[i] - lam_hat[i]))),
                math.exp(log_alpha[i + 1] - la_hat[i]), -sigma[i + 1] * math.expm1(lam[i + 1] - lam_hat[i])))
        tab.stages = steps
        return tab

    def step(self, model: CheckedModel, i: int, x: Tensor, state: Any, tab: StepTable,
             noise: NoiseSource) -> tuple[Tensor, Any]:
        c = tab.stages[i]
        if c.gamma > 0.0:
            x = torch.add(x * c.churn_x, noise(i, tab.t[i], tab.t[i + 1], x), alpha=c.churn_std)
        corrected = not (self.last_step_euler and i == tab.steps - 1)
        return heun_step(model, x, c.t_hat, tab.t64[i + 1], c.scale, c.euler, corrected), state
