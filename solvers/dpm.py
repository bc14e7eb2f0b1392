r"""DPM-Solver (singlestep, noise prediction) and DPM-Solver++ (data prediction).

Notation: :math:`\lambda = \log(\alpha/\sigma)`, :math:`h_i = \lambda_{i+1}-\lambda_i`,
:math:`s = t_i`, :math:`t = t_{i+1}`.  Every method is written in :math:`\lambda` over any
LinearSDE (VP, sub-VP, VE, cosine, EDM, rectified flow, discrete VP); the reference codes
are VP-only.

References: Lu et al. 2022a, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model
Sampling in Around 10 Steps" (NeurIPS), Algorithms 1-2 and sec. 3.4; Lu et al. 2022b,
"DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
Algorithms 1-2 and Appendix (SDE variant).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from scoresde.sde import SDE

from ._registry import register
from .base import CheckedModel, StepTable
from .exponential import (ExponentialMultistep, ExponentialSinglestep, History, SinglestepStage,
                          exp_moments, lagrange_weights)
from .timesteps import TimeGrid

__all__ = [
    "DPMSolver1", "DPMSolver2", "DPMSolver3", "DPMSolverPP2S", "DPMSolverPP2M", "DPMSolverPP3M",
    "DPMSolverPP2MSDE", "DPMSolverPP3MSDE",
]


# ------------------------------------------------------- named step coefficients
# Python float64 scalars computed once per call in ``prepare``; s = t_i, t = t_{i+1}, s_j the
# intermediate stages (lambda_{s_j} = lambda_s + r_j h), expm1(z) = e^z - 1.
class DPM1Coefs(NamedTuple):
    """DPM-Solver-1 (= DDIM): ``x_t = x_scale x_s - eps_scale eps_s``."""

    x_scale: float      # alpha_t / alpha_s
    eps_scale: float    # sigma_t expm1(h)


class DPM2Coefs(NamedTuple):
    """DPM-Solver-2: ``u = u_x_scale x_s - u_eps_scale eps_s``,
    ``x_t = x_scale x_s - eps_scale eps_s - corr (eps(u, s_1) - eps_s)``."""

    x_scale: float      # alpha_t / alpha_s
    eps_scale: float    # sigma_t expm1(h)
    u_x_scale: float    # alpha_{s1} / alpha_s
    u_eps_scale: float  # sigma_{s1} expm1(r1 h)
    corr: float         # sigma_t / (2 r1) expm1(h)


class DPM3Coefs(NamedTuple):
    """DPM-Solver-3 (Lu et al. 2022a, Algorithm 2): ``u1 = u1_x_scale x_s - u1_eps_scale eps_s``,
    ``u2 = u2_x_scale x_s - u2_eps_scale eps_s - u2_corr (eps(u1, s_1) - eps_s)``,
    ``x_t = x_scale x_s - eps_scale eps_s - corr (eps(u2, s_2) - eps_s)``."""

    x_scale: float       # alpha_t / alpha_s
    eps_scale: float     # sigma_t expm1(h)
    u1_x_scale: float    # alpha_{s1} / alpha_s
    u1_eps_scale: float  # sigma_{s1} expm1(r1 h)
    u2_x_scale: float    # alpha_{s2} / alpha_s
    u2_eps_scale: float  # sigma_{s2} expm1(r2 h)
    u2_corr: float       # sigma_{s2} r2 / r1 (expm1(r2 h) / (r2 h) - 1)
    corr: float          # sigma_t / r2 (expm1(h) / h - 1)


class DPMPP1Coefs(NamedTuple):
    """DPM-Solver++(1): ``x_t = x_scale x_s - x0_scale x0(x_s, s)``."""

    x_scale: float      # sigma_t / sigma_s
    x0_scale: float     # alpha_t expm1(-h)


class DPMPP2SCoefs(NamedTuple):
    """DPM-Solver++(2S): ``u = u_x_scale x_s - u_x0_scale x0(x_s, s)``,
    ``x_t = x_scale x_s - x0_scale (w_s x0(x_s, s) + w_1 x0(u, s_1))``."""

    x_scale: float      # sigma_t / sigma_s
    x0_scale: float     # alpha_t expm1(-h)
    u_x_scale: float    # sigma_{s1} / sigma_s
    u_x0_scale: float   # alpha_{s1} expm1(-r h)
    w_s: float          # 1 - 1/(2r)
    w_1: float          # 1/(2r)


def _dpmpp_2s_coefs(s_s: float, a_t: float, s_t: float, h: float, r: float, a1: float,
                    s1: float) -> DPMPP2SCoefs:
    return DPMPP2SCoefs(s_t / s_s, a_t * math.expm1(-h), s1 / s_s, a1 * math.expm1(-r * h),
                        1.0 - 0.5 / r, 0.5 / r)


# ---------------------------------------------------------------- singlestep (eps)
@dataclass
class _DPMSolverEps(ExponentialSinglestep):
    r"""Singlestep DPM-Solver in noise prediction.  Order-k outer step from s to t:

    - k = 1 (= DDIM): :math:`x_t = \frac{\alpha_t}{\alpha_s}x_s - \sigma_t(e^h-1)\hat\epsilon_s`.
    - k = 2, :math:`r_1 = \tfrac12`: :math:`u = \frac{\alpha_{s_1}}{\alpha_s}x_s - \sigma_{s_1}(e^{r_1h}-1)\hat\epsilon_s`,
      :math:`x_t = \frac{\alpha_t}{\alpha_s}x_s - \sigma_t(e^h-1)\hat\epsilon_s - \frac{\sigma_t}{2r_1}(e^h-1)(\hat\epsilon(u,s_1)-\hat\epsilon_s)`.
    - k = 3, :math:`r_1 = \tfrac13, r_2 = \tfrac23`: DPM-Solver-3 (Algorithm 2 of Lu et al. 2022a).
    """

    def stage_coefficients(self, st: SinglestepStage, k: int) -> DPM1Coefs | DPM2Coefs | DPM3Coefs:
        a_s, a_t, s_t, h = st.a_s, st.a_t, st.s_t, st.h
        phi_h = math.expm1(h)
        if k == 1:
            return DPM1Coefs(a_t / a_s, s_t * phi_h)
        if k == 2:
            (r1,), (a1,), (s1,) = st.r, st.alpha, st.sigma
            return DPM2Coefs(a_t / a_s, s_t * phi_h, a1 / a_s, s1 * math.expm1(r1 * h),
                             s_t / (2.0 * r1) * phi_h)
        (r1, r2), (a1, a2), (s1, s2) = st.r, st.alpha, st.sigma
        phi_r2 = math.expm1(r2 * h)
        return DPM3Coefs(a_t / a_s, s_t * phi_h, a1 / a_s, s1 * math.expm1(r1 * h),
                         a2 / a_s, s2 * phi_r2, s2 * r2 / r1 * (phi_r2 / (r2 * h) - 1.0),
                         s_t / r2 * (phi_h / h - 1.0))

    def combine(self, model: CheckedModel, i: int, x: Tensor, tab: StepTable, k: int) -> Tensor:
        st = tab.stages[i]
        c = st.coefs
        eps_s = model.evaluate(x, tab.t64[i]).eps
        # fused: each line is one scaled copy plus in-place accumulations, the differences
        # eps_j - eps_s folded into the coefficients (float64 scalars from prepare)
        if k == 1:
            # x_t = x_scale x - eps_scale eps_s
            return torch.add(x * c.x_scale, eps_s, alpha=-c.eps_scale)
        if k == 2:
            # u = u_x_scale x - u_eps_scale eps_s
            eps_1 = model.evaluate(torch.add(x * c.u_x_scale, eps_s, alpha=-c.u_eps_scale), st.t64[0]).eps
            # x_t = x_scale x - eps_scale eps_s - corr (eps_1 - eps_s)
            return torch.add(x * c.x_scale, eps_s, alpha=c.corr - c.eps_scale).add_(eps_1, alpha=-c.corr)
        # u1 = u1_x_scale x - u1_eps_scale eps_s
        eps_1 = model.evaluate(torch.add(x * c.u1_x_scale, eps_s, alpha=-c.u1_eps_scale), st.t64[0]).eps
        # u2 = u2_x_scale x - u2_eps_scale eps_s - u2_corr (eps_1 - eps_s)
        u2 = torch.add(x * c.u2_x_scale, eps_s, alpha=c.u2_corr - c.u2_eps_scale).add_(eps_1, alpha=-c.u2_corr)
        eps_2 = model.evaluate(u2, st.t64[1]).eps
        # x_t = x_scale x - eps_scale eps_s - corr (eps_2 - eps_s)
        return torch.add(x * c.x_scale, eps_s, alpha=c.corr - c.eps_scale).add_(eps_2, alpha=-c.corr)


@register("dpm_solver_1")
@dataclass
class DPMSolver1(_DPMSolverEps):
    r"""DPM-Solver-1 (Lu et al. 2022a, eq. 3.7), identical to DDIM (eta = 0):
    :math:`x_t = \frac{\alpha_t}{\alpha_s}x_s - \sigma_t(e^h-1)\hat\epsilon_s`.  Order 1, 1 NFE per step."""

    order: ClassVar[int] = 1


@register("dpm_solver_2")
@dataclass
class DPMSolver2(_DPMSolverEps):
    r"""DPM-Solver-2 (Lu et al. 2022a, Algorithm 1, :math:`r_1 = 1/2`): singlestep, order 2,
    2 NFE per outer step; ``steps`` is the NFE budget (``allocation``).  No few-step rule: at
    3..10 NFE its error reaches 43x DDIM's (``benchmarks/few_steps_vs_ddim.py``)."""

    order: ClassVar[int] = 2


@register("dpm_solver_3")
@dataclass
class DPMSolver3(_DPMSolverEps):
    r"""DPM-Solver-3 (Lu et al. 2022a, Algorithm 2, :math:`r_1 = 1/3, r_2 = 2/3`): singlestep,
    order 3, 3 NFE per outer step; ``steps`` is the NFE budget, split by DPM-Solver-fast's
    allocation so that nfe == steps (``allocation="fixed"``: steps divisible by 3).  No few-step
    rule: at 3..10 NFE its error reaches 42x DDIM's (``benchmarks/few_steps_vs_ddim.py``)."""

    order: ClassVar[int] = 3


@register("dpmpp_2s")
@dataclass
class DPMSolverPP2S(ExponentialSinglestep):
    r"""DPM-Solver++(2S) (Lu et al. 2022b, Algorithm 1, :math:`r = 1/2`), data prediction:

    .. math:: u = \frac{\sigma_{s_1}}{\sigma_s}x_s - \alpha_{s_1}(e^{-rh}-1)\hat x_0(x_s, s),\quad
              x_t = \frac{\sigma_t}{\sigma_s}x_s - \alpha_t(e^{-h}-1)\Big[(1-\tfrac1{2r})\hat x_0(x_s,s) + \tfrac1{2r}\hat x_0(u, s_1)\Big].

    Order 2, 2 NFE per outer step; ``steps`` is the NFE budget (``allocation``).  No few-step
    rule: at 3..10 NFE its error reaches 2.4x DDIM's (``benchmarks/few_steps_vs_ddim.py``)."""

    order: ClassVar[int] = 2

    def stage_coefficients(self, st: SinglestepStage, k: int) -> DPMPP1Coefs | DPMPP2SCoefs:
        if k == 1:
            return DPMPP1Coefs(st.s_t / st.s_s, st.a_t * math.expm1(-st.h))
        (r,), (a1,), (s1,) = st.r, st.alpha, st.sigma
        return _dpmpp_2s_coefs(st.s_s, st.a_t, st.s_t, st.h, r, a1, s1)

    def combine(self, model: CheckedModel, i: int, x: Tensor, tab: StepTable, k: int) -> Tensor:
        st = tab.stages[i]
        c = st.coefs
        x0_s = model.evaluate(x, tab.t64[i]).x0
        if k == 1:
            # x_t = x_scale x - x0_scale x0_s
            return torch.add(x * c.x_scale, x0_s, alpha=-c.x0_scale)
        # u = u_x_scale x - u_x0_scale x0_s
        x0_1 = model.evaluate(torch.add(x * c.u_x_scale, x0_s, alpha=-c.u_x0_scale), st.t64[0]).x0
        # x_t = x_scale x - x0_scale (w_s x0_s + w_1 x0_1)
        return (torch.add(x * c.x_scale, x0_s, alpha=-c.x0_scale * c.w_s)
                .add_(x0_1, alpha=-c.x0_scale * c.w_1))


# ----------------------------------------------------------------- multistep (x0)
def midpoint_2m_weights(nodes: list[float], h: float, rate: float = 1.0) -> list[float]:
    r"""DPM-Solver++(2M) "midpoint" weights (Lu et al. 2022b, Algorithm 2) on
    :math:`(\hat x_0^{(i)}, \hat x_0^{(i-1)})`, ``nodes = [0, -h_{i-1}]``:
    :math:`\varphi(1 + \tfrac1{2r}), -\varphi\tfrac1{2r}`, :math:`r = h_{i-1}/h_i`,
    :math:`\varphi = \int_0^h e^{-c(h-u)}du = (1-e^{-ch})/c` (c = ``rate``)."""
    phi1 = -math.expm1(-rate * h) / rate
    inv2r = 0.5 * h / (-nodes[1])
    return [phi1 * (1.0 + inv2r), -phi1 * inv2r]


def paper_3m_weights(nodes: list[float], h: float, rate: float = 1.0) -> list[float]:
    r"""DPM-Solver++(3M) as in the DPM-Solver codes and diffusers
    (``multistep_dpm_solver_third_order_update``, ``dpmsolver++``), as weights on
    :math:`(m_0, m_1, m_2) = (\hat x_0^{(i)}, \hat x_0^{(i-1)}, \hat x_0^{(i-2)})`,
    ``nodes = [0, -h_0, -h_0-h_1]``.  With :math:`r_0 = h_0/h`, :math:`r_1 = h_1/h`,
    :math:`D_{1,0} = (m_0-m_1)/r_0`, :math:`D_{1,1} = (m_1-m_2)/r_1`,
    :math:`D_1 = D_{1,0} + \frac{r_0}{r_0+r_1}(D_{1,0}-D_{1,1})`,
    :math:`D_2 = \frac{D_{1,0}-D_{1,1}}{r_0+r_1}`:

    .. math:: x_t = \frac{\sigma_t}{\sigma_s}x_s - \alpha_t(e^{-h}-1)m_0
              + \alpha_t\Big(\frac{e^{-h}-1}{h}+1\Big)D_1
              - \alpha_t\Big(\frac{e^{-h}-1+h}{h^2}-\frac12\Big)D_2.

    In moments :math:`J_m = \int_0^h u^m e^{-c(h-u)}du` (:func:`exp_moments`, c = ``rate``;
    c = 1 is the formula above) the coefficients of :math:`m_0, D_1, D_2` are
    :math:`J_0, J_1/h, J_2/(2h^2)`.  :math:`D_1/h` and :math:`D_2/h^2` are the first and the
    leading coefficient of the quadratic through the three nodes, whose exact integral
    (``formula="adams"``) has :math:`J_2/h^2` on :math:`D_2`: the paper's form has half of it."""
    r0 = -nodes[1] / h
    r1 = (nodes[1] - nodes[2]) / h
    j0, j1, j2 = exp_moments(h, 3, rate)
    a_d1, a_d2 = j1 / h, 0.5 * j2 / (h * h)
    # D1 = (1 + q) D1_0 - q D1_1, D2 = (D1_0 - D1_1)/(r0 + r1), q = r0/(r0 + r1)
    q = r0 / (r0 + r1)
    w_d10 = a_d1 * (1.0 + q) + a_d2 / (r0 + r1)
    w_d11 = -a_d1 * q - a_d2 / (r0 + r1)
    # D1_0 = (m0 - m1)/r0, D1_1 = (m1 - m2)/r1
    return [j0 + w_d10 / r0, -w_d10 / r0 + w_d11 / r1, -w_d11 / r1]


@register("dpmpp_2m")
@dataclass
class DPMSolverPP2M(ExponentialMultistep):
    r"""DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2), data prediction, one NFE per step:

    .. math:: x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i}x_i - \alpha_{i+1}(e^{-h_i}-1)
              \Big[\big(1+\tfrac1{2r_i}\big)\hat x_0^{(i)} - \tfrac1{2r_i}\hat x_0^{(i-1)}\Big],
              \quad r_i = h_{i-1}/h_i,

    (``solver_type="midpoint"``, the paper's form) or, with ``solver_type="heun"``, the exact
    integral of the linear interpolant (coefficient :math:`\varphi_2`).  The first step is
    DPM-Solver++(1) (local error :math:`O(h^2)`, harmless for order 2).  Order 2."""

    order: ClassVar[int] = 2
    solver_type: str = "midpoint"

    def validate_options(self) -> None:
        super().validate_options()
        if self.solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {self.solver_type!r}")

    def weights(self, k: int, nodes: list[float], h: float) -> list[float]:
        if k == 1 or self.solver_type == "heun":
            return lagrange_weights(nodes, h, self.rate())
        return midpoint_2m_weights(nodes, h, self.rate())


class Warmup2S(NamedTuple):
    """The DPM-Solver++(2S) first step of ``dpmpp_3m`` with ``warmup="singlestep"``."""

    t64: Tensor             # the stage time s_1 (lambda midpoint of the first step), float64
    coefs: DPMPP2SCoefs


@register("dpmpp_3m")
@dataclass
class DPMSolverPP3M(ExponentialMultistep):
    r"""DPM-Solver++(3M), data prediction, one NFE per step: the exponential
    Adams--Bashforth update of order 3 in :math:`\lambda`,

    .. math:: x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i}x_i + \alpha_{i+1}\sum_{j=0}^{2} c_{ij}\hat x_0^{(i-j)},
              \quad c_{ij} = \int_0^{h_i} e^{-(h_i-u)}L_j(u)\,du,

    :math:`L_j` the quadratic Lagrange basis through :math:`\lambda_i,\lambda_{i-1},\lambda_{i-2}`
    (exact for any step sizes).  Warm-up: orders 1, 2, 3, ...; ``warmup="singlestep"`` replaces
    the first step by DPM-Solver++(2S) (one extra NFE) so that the global order is 3 (a single
    first-order starter step caps it at 2).  Order 3.

    ``formula="paper"``: the update of the DPM-Solver codes (Lu et al. 2022b; diffusers'
    ``DPMSolverMultistepScheduler(solver_order=3)``), see :func:`paper_3m_weights`; its
    second-order warm-up step is DPM-Solver++(2M) midpoint (:class:`DPMSolverPP2M`).  It
    weights the second divided difference by half the exact integral, which leaves a local
    error :math:`\alpha_t\tfrac{h^3}{12}\,d^2\hat x_0/d\lambda^2`: measured global order 2,
    not 3 (``order`` stays 3, the history length; ``stats["orders"]`` reports 3 for those
    steps)."""

    order: ClassVar[int] = 3
    warmup: str = "lower_order"
    formula: str = "adams"

    def validate_options(self) -> None:
        super().validate_options()
        if self.warmup not in ("lower_order", "singlestep"):
            raise ValueError(f"warmup must be 'lower_order' or 'singlestep', got {self.warmup!r}")
        if self.formula not in ("adams", "paper"):
            raise ValueError(f"formula must be 'adams' or 'paper', got {self.formula!r}")

    def weights(self, k: int, nodes: list[float], h: float) -> list[float]:
        # by the nodes present (the singlestep warm-up's step 0 has order 2 but one node)
        if self.formula == "adams" or len(nodes) == 1:
            return lagrange_weights(nodes, h, self.rate())
        if len(nodes) == 2:
            return midpoint_2m_weights(nodes, h, self.rate())
        return paper_3m_weights(nodes, h, self.rate())

    def expected_nfe(self, steps: int) -> int:
        return steps + (1 if self.warmup == "singlestep" else 0)

    def orders_for(self, steps: int) -> list[int]:
        orders = super().orders_for(steps)
        if self.warmup == "singlestep":
            # step 0 is always DPM-Solver++(2S) (two evaluations, order 2), also where the
            # final orders are lowered (lower_order_final=True, or the default few-step rule)
            # and steps = 1 would make it order 1: the stats report what ran
            orders = [2] + orders[1:]
        return orders

    def prepare(self, sde: SDE, grid: TimeGrid, like: Tensor) -> StepTable:
        tab = super().prepare(sde, grid, like)
        if self.warmup == "singlestep":
            lam0, lam1 = float(tab.lam64[0]), float(tab.lam64[1])
            t_mid = sde.t_of_log_snr_unchecked(torch.tensor(lam0 + lam1, dtype=torch.float64))  # lambda midpoint
            c = sde.coefficients(t_mid.reshape(1))
            # the fraction actually reached (round-off of the inverse), as in ExponentialSinglestep
            h = lam1 - lam0
            r = (0.5 * float(c["log_snr"][0]) - lam0) / h
            s_s, a_t, s_t = float(tab.sigma64[0]), float(tab.alpha64[1]), float(tab.sigma64[1])
            # DPM-Solver++(2S) coefficients (as DPMSolverPP2S.stage_coefficients), once per call
            tab.warm = Warmup2S(t_mid.to(like.device), _dpmpp_2s_coefs(
                s_s, a_t, s_t, h, r, float(c["alpha"][0]), float(c["sigma"][0])))
        return tab

    def step(self, model: CheckedModel, i: int, x: Tensor, hist: History, tab: StepTable, noise) -> tuple:
        if i == 0 and self.warmup == "singlestep":
            c = tab.warm.coefs
            x0_s = model.evaluate(x, tab.t64[0]).x0
            u = c.u_x_scale * x - c.u_x0_scale * x0_s
            x0_1 = model.evaluate(u, tab.warm.t64).x0
            x_next = c.x_scale * x - c.x0_scale * (c.w_s * x0_s + c.w_1 * x0_1)
            return x_next, hist.push(x0_s, self.keep())
        return super().step(model, i, x, hist, tab, noise)


# ----------------------------------------------------------------- SDE variants
@dataclass
class _MultistepSDE(ExponentialMultistep):
    r"""Shared SDE form (DPM-Solver++ SDE, Lu et al. 2022b eq. (14); k-diffusion's
    ``sample_dpmpp_2m_sde``): with :math:`c = 1+\eta`,

    .. math:: x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i}e^{-\eta h}x_i + \alpha_{i+1}\sum_j c_{ij}\hat x_0^{(i-j)}
              + \sigma_{i+1}\sqrt{1-e^{-2\eta h}}\;z_i,

    the weights integrating the interpolant against :math:`e^{-c(h-u)}`.  ``eta = 1`` is the
    reverse SDE, ``eta = 0`` the ODE method.  The injected noise makes the history rough on
    the scale :math:`\sqrt{h}`, so a short history gap would amplify it: the orders follow
    :meth:`ExponentialMultistep.stable_orders` as for the ODE methods."""

    stochastic: ClassVar[bool] = True
    eta: float = 1.0

    def validate_options(self) -> None:
        super().validate_options()
        if not (isinstance(self.eta, (int, float)) and 0.0 <= float(self.eta) and math.isfinite(self.eta)):
            raise ValueError(f"eta must be a finite float >= 0, got {self.eta!r}")

    def rate(self) -> float:
        return 1.0 + float(self.eta)

    def weights(self, k: int, nodes: list[float], h: float) -> list[float]:
        # the data-prediction integral of the SDE form carries the factor c = 1 + eta:
        # c * int_0^h e^{-c(h-u)} p(u) du (constant x0 gives alpha_t (1 - e^{-c h}), k-diffusion's form)
        return [self.rate() * w for w in super().weights(k, nodes, h)]

    def prepare(self, sde: SDE, grid: TimeGrid, like: Tensor) -> StepTable:
        tab = super().prepare(sde, grid, like)
        std = tab.sigma64[1:] * torch.sqrt(-torch.expm1(-2.0 * float(self.eta) * tab.h64))
        tab.noise_std = std.to(dtype=like.dtype, device=like.device)
        return tab

    def step(self, model: CheckedModel, i: int, x: Tensor, hist: History, tab: StepTable, noise) -> tuple:
        x_next, hist = super().step(model, i, x, hist, tab, noise)
        if self.eta > 0:
            x_next = x_next + tab.noise_std[i] * noise(i, tab.t[i], tab.t[i + 1], x)
        return x_next, hist


@register("dpmpp_2m_sde")
@dataclass
class DPMSolverPP2MSDE(_MultistepSDE, DPMSolverPP2M):
    r"""DPM-Solver++(2M) SDE: the 2M update for the reverse SDE (see :class:`_MultistepSDE`),
    ``solver_type`` midpoint/heun as for ``dpmpp_2m``.  One NFE per step.  The marginal is
    exact in the limit of small steps; weak order 1 for general data."""

    order: ClassVar[int] = 2


@register("dpmpp_3m_sde")
@dataclass
class DPMSolverPP3MSDE(_MultistepSDE):
    r"""DPM-Solver++(3M) SDE: the third-order exponential Adams interpolant against the SDE
    weight :math:`e^{-(1+\eta)(h-u)}`.  One NFE per step."""

    order: ClassVar[int] = 3
