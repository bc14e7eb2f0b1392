r"""Noise-prediction linear multistep methods in the scaled state: the base and DEIS-tAB.

For any LinearSDE write :math:`y = x/\alpha` and :math:`s = \sigma/\alpha = e^{-\lambda}`; the
probability-flow ODE becomes :math:`dy/ds = \hat\epsilon(x, t)` (Zhang & Chen 2023, "Fast
Sampling of Diffusion Models with Exponential Integrator", ICLR, eq. 11 in their notation), i.e.

.. math:: x_{t_{i+1}} = \frac{\alpha_{i+1}}{\alpha_i}x_{t_i}
          + \alpha_{i+1}\int_{t_i}^{t_{i+1}} \frac{ds}{d\tau}\,\hat\epsilon(\tau)\,d\tau .

A multistep method replaces :math:`\hat\epsilon` by a combination of its last evaluations:
:math:`x_{i+1} = \frac{\alpha_{i+1}}{\alpha_i}x_i + \sum_j c_{ij}\hat\epsilon^{(i-j)}`, the
weights :math:`c_{ij}` computed once per call (:class:`EpsMultistep`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from scoresde.sde import SDE

from ._registry import register
from .base import CheckedModel, StepTable
from .exponential import StepRatioRule, _need_finite_lam, split_like, to_dtype_floats
from .timesteps import TimeGrid

__all__ = ["EpsMultistep", "DEIS"]

#: Gauss-Legendre nodes per step for the DEIS weights (the integrand is smooth in lambda)
QUAD_NODES = 16


@dataclass
class EpsMultistep(StepRatioRule):
    r"""Base of the noise-prediction multistep methods in the scaled state :math:`x/\alpha`:

    .. math:: x_{i+1} = \frac{\alpha_{i+1}}{\alpha_i}x_i + \sum_{j<k_i} c_{ij}\,\hat\epsilon^{(i-j)},

    one network evaluation per step; :math:`k_i = \min(\text{order}, i+1)` (lower-order
    warm-up), lowered further where a history gap is short against the step (the multistep
    methods' shared rule, :meth:`StepRatioRule.stable_orders`, on the steps in log-SNR:
    ``min_gap_ratio=0`` gives the original methods, which have none), and on grids of fewer
    than 15 steps by the few-step rule (final steps lowered, orders above 2 only where
    h <= 0.5 in lambda; ``lower_order_final=False`` switches it off, :class:`StepRatioRule`).  Subclasses set
    ``max_order`` and implement :meth:`weights`, which returns every :math:`c_{ij}` (float64)
    once per call."""

    max_order: ClassVar[int] = 3
    default_schedule: ClassVar[str] = "log_snr"
    order: int = 3

    def validate_options(self) -> None:
        super().validate_options()
        k = self.order
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"order must be an int in 1..{self.max_order}, got {k!r}")
        if not 1 <= k <= self.max_order:
            raise ValueError(f"order must be in 1..{self.max_order} for {self.name}, got {k!r}")

    def orders_for(self, steps: int) -> list[int]:
        orders = [min(self.order, i + 1) for i in range(steps)]
        if self.final_lowered(steps):
            orders = [min(k, steps - i) for i, k in enumerate(orders)]
        return orders

    def weights(self, sde: SDE, tab: StepTable) -> list[list[float]]:
        raise NotImplementedError

    def prepare(self, sde: SDE, grid: TimeGrid, like: Tensor) -> StepTable:
        tab = super().prepare(sde, grid, like)
        _need_finite_lam(tab, self.name)
        tab.orders, tab.order_lowered_at = self.grid_orders(grid.steps, tab.h64.tolist())
        w = self.weights(sde, tab)
        tab.coef_f = split_like(to_dtype_floats([c for row in w for c in row], like), w)
        tab.x_coef_f = to_dtype_floats((tab.alpha64[1:] / tab.alpha64[:-1]).tolist(), like)
        return tab

    def init(self, x: Tensor) -> tuple:
        return ()

    def step(self, model: CheckedModel, i: int, x: Tensor, hist: tuple, tab: StepTable, noise) -> tuple:
        eps = model.evaluate(x, tab.t64[i]).eps
        hist = (*hist[-(self.order - 1):], eps) if self.order > 1 else (eps,)   # newest last
        c = tab.coef_f[i]
        out = x * tab.x_coef_f[i]
        for j in range(tab.orders[i]):
            out.add_(hist[-1 - j], alpha=c[j])
        return out, hist


@register("deis")
@dataclass
class DEIS(EpsMultistep):
    r"""DEIS-tAB (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential
    Integrator", Sec. 4, the time-Adams--Bashforth variant): the exponential Adams--Bashforth
    method in noise prediction, extrapolating :math:`\hat\epsilon` by a polynomial **in the
    SDE's time t** through the last k evaluations,

    .. math:: x_{i+1} = \frac{\alpha_{i+1}}{\alpha_i}x_i + \sum_{j<k}c_{ij}\hat\epsilon^{(i-j)},\qquad
              c_{ij} = \alpha_{i+1}\int_{t_i}^{t_{i+1}}\frac{d(\sigma/\alpha)}{d\tau}\prod_{m\ne j}
              \frac{\tau - t_{i-m}}{t_{i-j}-t_{i-m}}\,d\tau,

    the weight :math:`d(\sigma/\alpha)/d\tau` integrated exactly against the Lagrange basis
    (for VP this is the paper's :math:`\tfrac12\Psi(t_{i+1},\tau)\sigma_\tau^{-1}\beta_\tau`
    form).  The weights are computed once per call in ``prepare`` by a 16-point Gauss--Legendre
    rule in :math:`\lambda` (:math:`\int -e^{-\lambda}L_j(t(\lambda))\,d\lambda`, smooth also
    where :math:`d(\sigma/\alpha)/dt` is singular at t -> 0), float64.  This is not diffusers'
    ``DEISMultistepScheduler``, which is the log-rho AB variant (extrapolation in
    :math:`\log\rho`); with ``order=1`` both are DDIM.

    **Options:** ``order`` k in 1..3 (default 3; warm-up orders 1, 2, ...).  **Order:** k
    (local :math:`O(h^{k+1})`); the first-order warm-up step taken at T costs little because
    :math:`\hat\epsilon` varies slowly there.  **NFE per step:** 1 (nfe == steps).
    """

    max_order: ClassVar[int] = 3
    order: int = 3

    def weights(self, sde: SDE, tab: StepTable) -> list[list[float]]:
        xi, wq = np.polynomial.legendre.leggauss(QUAD_NODES)
        lam, t, alpha = tab.lam64.tolist(), tab.t, tab.alpha64.tolist()
        # every quadrature node of every step, inverted to t in one call
        lam_q = [0.5 * (lam[i] + lam[i + 1]) + 0.5 * (lam[i + 1] - lam[i]) * x
                 for i in range(tab.steps) for x in xi]
        t_q = sde.t_of_log_snr_unchecked(2.0 * torch.tensor(lam_q, dtype=torch.float64)).tolist()
        out = []
        for i, k in enumerate(tab.orders):
            half = 0.5 * (lam[i + 1] - lam[i])
            nodes = [t[i - j] for j in range(k)]
            row = [0.0] * k
            for q in range(QUAD_NODES):
                lq, tq = lam_q[i * QUAD_NODES + q], t_q[i * QUAD_NODES + q]
                wgt = -half * wq[q] * math.exp(-lq)              # ds = -e^{-lambda} d lambda
                for j in range(k):
                    basis = 1.0
                    for m in range(k):
                        if m != j:
                            basis *= (tq - nodes[m]) / (nodes[j] - nodes[m])
                    row[j] += wgt * basis
            out.append([alpha[i + 1] * c for c in row])
        return out
