r"""UniPC: the unified predictor-corrector multistep method, in data prediction.

Zhao, Bai, Rao, Zhou & Lu 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast
Sampling of Diffusion Models" (NeurIPS), Sec. 3 (UniP-p, UniC-p in the ``B(h)`` form).
Written in :math:`\lambda = \log(\alpha/\sigma)` over any LinearSDE (the reference code is
VP-only); all coefficients are solved once per call in float64 in :meth:`UniPC.prepare`.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from scoresde.sde import SDE

from ._registry import register
from .base import CheckedModel, StepTable
from .exponential import (FEW_STEP_MAX_H, ExponentialMultistep, History, phi, solve_small, split_like,
                          to_dtype_floats)
from .timesteps import TimeGrid

__all__ = ["UniPC", "unipc_rhos"]

ORDERS = (1, 2, 3)
VARIANTS = ("bh1", "bh2")


def unipc_rhos(rks: list[float], h: float, variant: str, corrector: bool) -> tuple[float, list[float]]:
    r"""``(B(h), rho)`` of one step of length ``h`` in :math:`\lambda` whose earlier data
    predictions sit at the relative offsets ``rks`` = :math:`r_m = (\lambda_{i-m}-\lambda_i)/h`,
    m = 1..k-1 (k = the step's order): the predictor's :math:`\rho^p` (k-1 values) or, with
    ``corrector``, the corrector's :math:`\rho^c` (k values).

    With :math:`\hbar = -h` (data prediction) the order conditions read
    :math:`\sum_m \rho_m r_m^{j-1} = b_j = j!\,\hbar\,\varphi_{j+1}(\hbar)/B(h)`, j = 1..k, over the
    nodes :math:`(r_1, \dots, r_{k-1}, 1)`; :math:`B(h) = \hbar` (bh1) or :math:`e^{\hbar}-1` (bh2).
    The predictor solves the leading :math:`(k-1)\times(k-1)` system, the corrector the full
    :math:`k\times k` one, with one small Gaussian elimination in float64
    (:func:`solvers.exponential.solve_small`).  As in the paper's reference code, the 1x1
    systems (predictor of order 2, corrector of order 1) take
    :math:`\rho = 1/2`, the limit :math:`h\to 0` of their solution; it is only there that
    bh1 and bh2 differ (in a solved system :math:`B(h)` cancels from :math:`B(h)\rho`).
    """
    B, rho = _unipc_rhos(tuple(map(float, rks)), float(h), variant, bool(corrector))
    return B, list(rho)


@functools.lru_cache(maxsize=8192)
def _unipc_rhos(rks: tuple, h: float, variant: str, corrector: bool) -> tuple[float, tuple]:
    """Memoised body of :func:`unipc_rhos` (repeated calls on one grid reuse it)."""
    hh = -h
    B = hh if variant == "bh1" else math.expm1(hh)
    n = len(rks) + (1 if corrector else 0)           # size of the system
    if n == 0:
        return B, ()
    if n == 1:
        return B, (0.5,)
    nodes = [*rks, 1.0][:n]
    R = [[r ** j for r in nodes] for j in range(n)]                       # R[j][m] = r_m^j
    b = [math.factorial(j) * hh * phi(j + 1, hh) / B for j in range(1, n + 1)]
    return B, tuple(solve_small(R, b))


@register("unipc")
@dataclass
class UniPC(ExponentialMultistep):
    r"""UniPC (Zhao et al. 2023, Sec. 3, ``B(h)`` variants): the UniP-p predictor with
    the UniC corrector, in data prediction, one NFE per step.

    Step i goes from :math:`t_i` to :math:`t_{i+1}`, :math:`h = \lambda_{i+1}-\lambda_i`,
    :math:`\hbar = -h`, with order :math:`k = k_i` and
    :math:`D_m = (\hat x_0^{(i-m)} - \hat x_0^{(i)})/r_m`,
    :math:`r_m = (\lambda_{i-m}-\lambda_i)/h` (m = 1..k-1).  The predictor (UniP-k) is

    .. math:: \tilde x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i}x_i - \alpha_{i+1}(e^{\hbar}-1)\hat x_0^{(i)}
              - \alpha_{i+1}B(h)\sum_{m=1}^{k-1}\rho^p_m D_m .

    The next step's single evaluation :math:`\hat x_0^{(i+1)} = \hat x_0(\tilde x_{i+1}, t_{i+1})`
    then drives the corrector (UniC-k), :math:`D_k = \hat x_0^{(i+1)} - \hat x_0^{(i)}`:

    .. math:: x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i}x_i - \alpha_{i+1}(e^{\hbar}-1)\hat x_0^{(i)}
              - \alpha_{i+1}B(h)\Big(\sum_{m=1}^{k-1}\rho^c_m D_m + \rho^c_k D_k\Big),

    applied as the difference :math:`x_{i+1} - \tilde x_{i+1}` (a fixed combination of
    data predictions), and :math:`\hat x_0^{(i+1)}` (taken at :math:`\tilde x_{i+1}`, as in the
    paper) enters the history.  :math:`\rho^p, \rho^c` solve the order conditions of
    :func:`unipc_rhos`; :math:`B(h) = \hbar` (``variant="bh1"``) or :math:`e^{\hbar}-1` (``"bh2"``).
    The last step is not corrected (no evaluation follows it), so **nfe == steps**.  The
    states handed to ``callback`` and recorded in ``trajectory`` are the predictor's
    :math:`\tilde x_{i+1}` (the correction is applied at the next step, after its evaluation).

    **Options:** ``order`` p in {1, 2, 3} (the predictor's order; warm-up uses orders
    1, 2, ... as history accumulates), ``variant`` "bh1" | "bh2", ``use_corrector``
    (default True), ``lower_order_final`` (default None: the few-step rule of
    :class:`~solvers.exponential.StepRatioRule` below 15 steps, which also keeps the bh1
    order-2 predictor only where h <= 0.5, see :meth:`step_size_cap`; True reproduces the
    reference code's final steps of decreasing order on every grid, which lowers the global
    order to at most 2; False never lowers them),
    ``min_gap_ratio`` (default 1/3, see below).

    **Order:** UniP-p alone has local error :math:`O(h^{p+1})`, UniPC-p :math:`O(h^{p+2})`
    (Zhao et al. 2023, Sec. 3: UniC raises the order by one).  The global order
    (:attr:`expected_order`) is capped by the first step (order 1, corrected: local
    :math:`O(h^3)`) and the uncorrected last step: with the corrector 2, 3, 3 for p = 1, 2, 3;
    without it 1, 2, 2.  When sampling from T the first step's error is scaled by the
    derivatives of :math:`\hat x_0` near T, :math:`O(e^{\lambda_T})` (alpha_T/sigma_T), so over
    the step counts float64 resolves UniPC-3 shows the order 4 of its corrected steps
    (measured 3.9-4.0 on the Gaussian problem); started where alpha and sigma are both O(1),
    it shows 3.  NFE per step: 1 (nfe == steps).

    **Uneven grids:** where a history gap is short against the step (ratio below
    ``min_gap_ratio``, :meth:`ExponentialMultistep.stable_orders`) the step's order is lowered,
    and its corrector, which uses the same history nodes, follows (``stats["order_lowered_at"]``).
    """

    #: an option here, unlike the other methods' class constant: UniPC-p is one method
    #: family whose predictor order p (1, 2 or 3) the caller picks, as in the reference code
    order: int = 3
    variant: str = "bh1"
    use_corrector: bool = True

    def validate_options(self) -> None:
        super().validate_options()
        allowed = ", ".join(map(str, ORDERS))
        if isinstance(self.order, bool) or not isinstance(self.order, int):
            raise TypeError(f"order must be an int, one of {allowed}; got {self.order!r}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {allowed} for unipc; got {self.order!r}")
        if not isinstance(self.variant, str) or self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(map(repr, VARIANTS))}; got {self.variant!r}")
        if not isinstance(self.use_corrector, bool):
            raise TypeError(f"use_corrector must be a bool, got {self.use_corrector!r}")

    @property
    def expected_order(self) -> int:
        """The global order this configuration attains on a smooth problem (see the class
        docstring): min(p + 1, 3) with the corrector, min(p, 2) without, at most 2 with
        ``lower_order_final`` (its last step is first order)."""
        p = self.order
        q = min(p + 1, 3) if self.use_corrector else min(p, 2)
        return min(q, 2) if self.lower_order_final else q

    def step_size_cap(self, k: int, h: float) -> int:
        r"""The few-step cap of the base, and for ``bh1`` also order 2 only where
        :math:`h \le` ``FEW_STEP_MAX_H``: its order-2 predictor takes :math:`\rho = 1/2` with
        :math:`B(h) = -h`, i.e. a second-order term :math:`h/2` where the exact one is
        :math:`h\varphi_2(-h)` (0.37 h at h = 1): it over-extrapolates by 1/(2 phi_2(-h)),
        1.2x at h = 0.5, 1.36x at h = 1 (bh2 under-extrapolates).  The bh1 order-1 corrector
        (the same 1x1 system, :math:`\rho^c = 1/2`) is left out after such steps too."""
        k = super().step_size_cap(k, h)
        return 1 if self.variant == "bh1" and k == 2 and h > FEW_STEP_MAX_H else k

    # ------------------------------------------------------------- coefficients
    def weights(self, k: int, nodes: list[float], h: float) -> list[float]:
        """UniP-k weights of :math:`\\hat x_0^{(i)}, \\hat x_0^{(i-1)}, \\dots` (newest first);
        ``prepare`` of the base scales them by :math:`\\alpha_{i+1}`."""
        rks = [u / h for u in nodes[1:k]]
        B, rho_p = unipc_rhos(rks, h, self.variant, corrector=False)
        w = [-math.expm1(-h)] + [0.0] * (k - 1)
        for m, (rho, r) in enumerate(zip(rho_p, rks), start=1):
            w[m] -= B * rho / r
            w[0] += B * rho / r
        return w

    def corrector_weights(self, k: int, nodes: list[float], h: float) -> list[float]:
        """UniC-k correction :math:`(x_{i+1}-\\tilde x_{i+1})/\\alpha_{i+1}` as weights of
        :math:`\\hat x_0^{(i+1)}, \\hat x_0^{(i)}, \\hat x_0^{(i-1)}, \\dots` (newest first)."""
        rks = [u / h for u in nodes[1:k]]
        _, rho_p = unipc_rhos(rks, h, self.variant, corrector=False)
        B, rho_c = unipc_rhos(rks, h, self.variant, corrector=True)
        w = [-B * rho_c[-1], B * rho_c[-1]] + [0.0] * (k - 1)
        for m, r in enumerate(rks, start=1):
            d = B * (rho_c[m - 1] - rho_p[m - 1]) / r
            w[m + 1] -= d
            w[1] += d
        return w

    def prepare(self, sde: SDE, grid: TimeGrid, like: Tensor) -> StepTable:
        tab = super().prepare(sde, grid, like)
        lam = tab.lam64.tolist()
        # corr[i] corrects the state reached at t_i by step i-1 (order orders[i-1]); none at
        # i = 0 (nothing to correct) and none after the last step (no evaluation follows it)
        corr: list[list[float] | None] = [None] * grid.steps
        if self.use_corrector:
            alpha = tab.alpha64.tolist()
            for i in range(1, grid.steps):
                k, s = tab.orders[i - 1], i - 1
                if k == 1 and self.variant == "bh1" and self.few_step_rule(grid.steps) \
                        and lam[i] - lam[s] > FEW_STEP_MAX_H:
                    continue      # UniC-1 bh1 (rho = 1/2) over-corrects on long steps: see step_size_cap
                nodes = [lam[s - m] - lam[s] for m in range(k)]
                corr[i] = [w * alpha[i] for w in self.corrector_weights(k, nodes, lam[i] - lam[s])]
        rows = [c for c in corr if c is not None]
        flat = iter(split_like(to_dtype_floats([w for c in rows for w in c], like), rows))
        tab.corr_f = [None if c is None else next(flat) for c in corr]   # Python floats: fused updates
        tab.corr_orders = [0 if c is None else len(c) - 1 for c in corr]
        return tab

    # --------------------------------------------------------------------- step
    def correct(self, model: CheckedModel, i: int, x: Tensor, hist: History, x0_new: Tensor,
                tab: StepTable) -> tuple[Tensor, History]:
        """UniC: add the precomputed combination of the new and the earlier data predictions."""
        k = tab.corr_orders[i]
        if k == 0:
            return x, hist
        c = tab.corr_f[i]                       # Python floats: fused in-place accumulation
        out = torch.add(x, x0_new, alpha=c[0])
        for j in range(k):
            out.add_(hist.x0[-1 - j], alpha=c[j + 1])
        return out, hist
