r"""SA-Solver: stochastic Adams predictor-corrector in data prediction (``sa_solver``).

Xue et al. 2023, "SA-Solver: Stochastic Adams Solver for Fast Sampling of Diffusion Models"
(NeurIPS), Algorithms 1-2 (data-prediction form).  With :math:`\lambda = \log(\alpha/\sigma)`,
:math:`h_i = \lambda_{i+1}-\lambda_i`, noise scale :math:`\tau` and :math:`c = 1+\tau^2`, the
variance-controlled reverse SDE is solved exactly in its linear part:

.. math:: x_{i+1} = e^{-\tau^2 h_i}\frac{\sigma_{i+1}}{\sigma_i}x_i
          + \alpha_{i+1}\,c\int_0^{h_i} e^{-c(h_i-u)}\,p(\lambda_i+u)\,du
          + \sigma_{i+1}\sqrt{1-e^{-2\tau^2 h_i}}\;z_i,

:math:`p` the Lagrange interpolant of the data predictions :math:`\hat x_0`:

- predictor (stochastic Adams--Bashforth, order ``predictor_order`` = number of nodes
  :math:`\lambda_i, \lambda_{i-1}, \dots`);
- corrector (stochastic Adams--Moulton, order ``corrector_order``): once
  :math:`\hat x_0^{(i+1)}` is evaluated at the predicted :math:`x_{i+1}`, the same step from
  :math:`x_i` is redone with nodes :math:`\lambda_{i+1}, \lambda_i, \dots` and **the same**
  :math:`z_i`; :math:`\hat x_0^{(i+1)}` is not re-evaluated at the corrected point (one NFE per
  step, ``nfe = steps``; the last step is not corrected).

As in the authors' code and diffusers' ``SASolverScheduler``: orders warm up (predictor
:math:`\min(p, i+1)`, corrector :math:`\min(c, i+2)`), ``lower_order_final`` lowers them near
the end (:math:`\min(p, N-i)`, :math:`\min(c, N-i+1)`), and order-2 steps add the few-step term
:math:`\alpha_{i+1}c\,[h^2/2 - (ch-1+e^{-ch})/c^2]/(\lambda_i-\lambda_{i-1})` (predictor) resp.
:math:`\alpha_{i+1}c\,[h/2 - (ch-1+e^{-ch})/(c^2h)]` (corrector) to the newest weight and
subtract it from the next (an :math:`O(h^3)` change).  ``tau = 0`` is the ODE
(UniPC-like predictor-corrector), ``tau = 1`` the reverse SDE.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from torch import Tensor

from scoresde.sde import SDE

from ._registry import register
from .base import CheckedModel, Solver, StepTable
from .exponential import _need_finite_lam, lagrange_weights
from .noise import NoiseSource
from .timesteps import TimeGrid

__all__ = ["SASolver", "SAStep", "sa_orders"]


class SAStep(NamedTuple):
    """Coefficients of one SA-Solver step :math:`t_i \\to t_{i+1}` (Python float64 scalars)."""

    x_scale: float                 # e^{-tau^2 h} sigma_{i+1} / sigma_i
    noise_std: float               # sigma_{i+1} sqrt(1 - e^{-2 tau^2 h})
    pred: tuple[float, ...]        # predictor weights on x0_i, x0_{i-1}, ...
    corr: tuple[float, ...]        # corrector weights on x0_{i+1}, x0_i, x0_{i-1}, ... (() = none)


def sa_orders(steps: int, predictor_order: int, corrector_order: int,
              lower_order_final: bool) -> tuple[list[int], list[int]]:
    """Predictor and corrector orders per step (warm-up, and the final lowering)."""
    pred, corr = [], []
    for i in range(steps):
        p, c = min(predictor_order, i + 1), min(corrector_order, i + 2)
        if lower_order_final:
            p, c = min(p, steps - i), min(c, steps - i + 1)
        pred.append(p)
        corr.append(c if i < steps - 1 else 0)   # the last step has nothing after it to correct
    return pred, corr


def _adams_weights(nodes: list[float], h: float, rate: float, alpha_next: float) -> list[float]:
    r""":math:`\alpha_{i+1} c\int_0^h e^{-c(h-u)}L_j(u)du` for the Lagrange basis through ``nodes``
    (offsets in :math:`\lambda` from :math:`\lambda_i`)."""
    return [alpha_next * rate * w for w in lagrange_weights(nodes, h, rate)]


@register("sa_solver")
@dataclass
class SASolver(Solver):
    r"""SA-Solver (Xue et al. 2023), data prediction; see :mod:`solvers.sa_solver`.

    Options: ``predictor_order`` (1-4, default 3), ``corrector_order`` (0-4, default 4; 0 = no
    corrector), ``tau`` (noise scale :math:`\tau \ge 0`, default 1; 0 = ODE), ``tau_interval``
    (``(t_lo, t_hi)``: ``tau`` on the steps that start at :math:`t_i \in [t_{lo}, t_{hi}]` and 0 on
    the others, as diffusers' ``tau_func``; default None: the whole interval),
    ``lower_order_final`` (default True, as the reference codes).  One NFE per step.
    Measured weak order on a Gaussian (exact moments, 16..128 log-SNR steps): 2.2 with
    tau = 1 (the default orders), 3.4 with tau = 0 (tests/test_stochastic_peers_b.py)."""

    order: ClassVar[int] = 3
    stochastic: ClassVar[bool] = True
    default_schedule: ClassVar[str] = "log_snr"    # uniform in t measured 10-1000x worse on VP
    predictor_order: int = 3
    corrector_order: int = 4
    tau: float = 1.0
    tau_interval: tuple[float, float] | None = None
    lower_order_final: bool = True

    def validate_options(self) -> None:
        for name, low in (("predictor_order", 1), ("corrector_order", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= 4:
                raise ValueError(f"{name} must be an int in [{low}, 4], got {v!r}")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) \
                or not (math.isfinite(self.tau) and self.tau >= 0.0):
            raise ValueError(f"tau must be a finite float >= 0, got {self.tau!r}")
        ti = self.tau_interval
        if ti is not None and not (isinstance(ti, (tuple, list)) and len(ti) == 2
                                   and all(isinstance(v, (int, float)) and math.isfinite(v) for v in ti)
                                   and ti[0] <= ti[1]):
            raise ValueError(f"tau_interval must be None or (t_lo, t_hi) with t_lo <= t_hi, got {ti!r}")
        if not isinstance(self.lower_order_final, bool):
            raise TypeError(f"lower_order_final must be a bool, got {self.lower_order_final!r}")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.order = self.predictor_order

    def prepare(self, sde: SDE, grid: TimeGrid, like: Tensor) -> StepTable:
        tab = super().prepare(sde, grid, like)
        _need_finite_lam(tab, self.name)
        lam, alpha, sigma = tab.lam64.tolist(), tab.alpha64.tolist(), tab.sigma64.tolist()
        tab.orders, tab.corr_orders = sa_orders(grid.steps, self.predictor_order, self.corrector_order,
                                                self.lower_order_final)
        steps = []
        for i in range(grid.steps):
            tau2 = self.tau_at(tab.t[i]) ** 2
            rate = 1.0 + tau2
            h, a1 = lam[i + 1] - lam[i], alpha[i + 1]
            e = math.expm1(-rate * h) + rate * h              # c h - 1 + e^{-c h}
            p, c = tab.orders[i], tab.corr_orders[i]
            pred = _adams_weights([lam[i - j] - lam[i] for j in range(p)], h, rate, a1)
            if p == 2:
                extra = a1 * rate * (0.5 * h * h - e / rate ** 2) / (lam[i] - lam[i - 1])
                pred[0], pred[1] = pred[0] + extra, pred[1] - extra
            corr: list[float] = []
            if c:
                corr = _adams_weights([h] + [lam[i - j] - lam[i] for j in range(c - 1)], h, rate, a1)
                if c == 2:
                    extra = a1 * rate * (0.5 * h - e / (rate ** 2 * h))
                    corr[0], corr[1] = corr[0] + extra, corr[1] - extra
            steps.append(SAStep(math.exp(-tau2 * h) * sigma[i + 1] / sigma[i],
                                sigma[i + 1] * math.sqrt(-math.expm1(-2.0 * tau2 * h)), tuple(pred), tuple(corr)))
        tab.stages = steps
        return tab

    def tau_at(self, t: float) -> float:
        """The noise scale of the step starting at ``t``."""
        ti = self.tau_interval
        return float(self.tau) if ti is None or ti[0] <= t <= ti[1] else 0.0

    def stats(self, table: StepTable) -> dict:
        return {"orders": list(table.orders), "corrector_orders": list(table.corr_orders)}

    def keep(self) -> int:
        return max(self.predictor_order, self.corrector_order - 1, 1)

    def init(self, x: Tensor) -> tuple:
        return ((), None, None)            # (x0 history newest last, x_i before the predictor, z_i)

    def step(self, model: CheckedModel, i: int, x: Tensor, state: tuple, tab: StepTable,
             noise: NoiseSource) -> tuple[Tensor, tuple]:
        hist, x_prev, z_prev = state
        x0 = model.evaluate(x, tab.t64[i]).x0
        if i > 0 and tab.stages[i - 1].corr:
            # corrector of step i-1: redo it from x_{i-1} with x0_i as the newest node, same noise
            st = tab.stages[i - 1]
            x = _combine(x_prev, st.x_scale, (x0, *reversed(hist)), st.corr, z_prev, st.noise_std)
        hist = (*hist, x0)[-self.keep():]
        st = tab.stages[i]
        z = noise(i, tab.t[i], tab.t[i + 1], x)
        x_next = _combine(x, st.x_scale, tuple(reversed(hist)), st.pred, z, st.noise_std)
        return x_next, (hist, x, z)


def _combine(x: Tensor, x_scale: float, x0s: tuple, weights: tuple, z: Tensor, noise_std: float) -> Tensor:
    """x_scale x + sum_j weights[j] x0s[j] + noise_std z (x0s newest first)."""
    out = x * x_scale
    for w, x0 in zip(weights, x0s):
        out.add_(x0, alpha=w)
    return out.add_(z, alpha=noise_std) if noise_std else out
