r"""DPM-Solver-v3: multistep predictor + pseudo-corrector with empirical model statistics.

Zheng, Lu, Bao & Zhu 2023, "DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical Model
Statistics" (NeurIPS), Sec. 3.3-3.4, Algorithm 1.  With the statistics :math:`l, s, b`
(:mod:`solvers.ems`), :math:`L = \int l\,d\lambda`, :math:`S = \int s\,d\lambda` and
:math:`f = (\sigma\hat\epsilon - l x)/\alpha`, the probability-flow ODE is solved exactly by

.. math:: x_t = \frac{\alpha_t}{\alpha_s}e^{-(L_t-L_s)}x_s
          - \alpha_t e^{-(L_t-L_s)}\int_{\lambda_s}^{\lambda_t} e^{(L_\lambda-L_s)+(S_\lambda-S_s)}
            \big(g_\lambda + \beta_\lambda\big)\,d\lambda,

:math:`g_\lambda = e^{-(S_\lambda-S_s)}f_\lambda - \beta_\lambda`,
:math:`\beta_\lambda = \int_{\lambda_s}^{\lambda}e^{-(S_r-S_s)}b_r\,dr`.  The statistics are
chosen so that :math:`g` varies slowly; a step approximates :math:`g` by the polynomial through
its values at earlier nodes (predictor, order k: :math:`\lambda_i, \dots, \lambda_{i-k+1}`) or
also at the new node :math:`\lambda_{i+1}` (pseudo-corrector, order k + 1, using the next
step's evaluation, which is taken at the predictor's state and kept: :math:`N = \sigma\hat\epsilon
- l x` fixed, as in the paper).  ``pseudo_predictor``/``pseudo_corrector`` replace the interpolant's Taylor derivatives by
divided differences (the paper's pseudo-order).  With :math:`l = 1, s = b = 0` the predictor is
the exponential Adams-Bashforth method in data prediction (DPM-Solver++(1), DPM-Solver++(2M)
with ``solver_type="heun"``, DPM-Solver++(3M)); with :math:`l = 0, s = -1` it interpolates
:math:`\hat\epsilon` (noise prediction; order 1 is DDIM).

:math:`l, s, b` are read between the statistics' grid points as natural cubic splines (C^2, so
that g keeps the smoothness the method's order needs; with piecewise-linear statistics the
kinks of :math:`l` in :math:`f` cap the global order at 2), :math:`L, S` are their exact
integrals; the remaining integrals are evaluated by
Gauss-Legendre quadrature on every statistics interval (float64, once per call), so any
solver grid inside the statistics' log-SNR range works (the reference code rounds the solver
grid to the statistics grid and uses the trapezoidal rule).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import Tensor

from scoresde.sde import SDE

from ._registry import register
from .base import CheckedModel, StepTable
from .ems import EMS, ems_statistics
from .exponential import StepRatioRule, _need_finite_lam
from .timesteps import TimeGrid

__all__ = ["DPMSolverV3", "EMS", "ems_statistics", "StepCoefs"]

F64 = torch.float64
GAUSS_NODES = 12


class _Spline:
    """Natural cubic spline through (lam, y) [N+1, D], its value and its integral from lam[0]
    (both exact, float64).  C^2, so that g inherits no kinks from the statistics."""

    def __init__(self, lam: Tensor, y: Tensor):
        self.lam, self.y = lam, y
        h = lam[1:] - lam[:-1]
        n = lam.numel()
        A = torch.eye(n, dtype=F64)
        rhs = torch.zeros_like(y)
        for i in range(1, n - 1):
            A[i, i - 1], A[i, i], A[i, i + 1] = h[i - 1], 2.0 * (h[i - 1] + h[i]), h[i]
            rhs[i] = 6.0 * ((y[i + 1] - y[i]) / h[i] - (y[i] - y[i - 1]) / h[i - 1])
        self.M = torch.linalg.solve(A, rhs)
        full = 0.5 * h[:, None] * (y[1:] + y[:-1]) - h[:, None] ** 3 * (self.M[1:] + self.M[:-1]) / 24.0
        self.cum = torch.cat([y[:1] * 0, torch.cumsum(full, 0)])

    def locate(self, q: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        k = (torch.searchsorted(self.lam, q, right=True) - 1).clamp(0, self.lam.numel() - 2)
        h = (self.lam[k + 1] - self.lam[k])[:, None]
        return k, (q - self.lam[k])[:, None], (self.lam[k + 1] - q)[:, None], h

    def __call__(self, q: Tensor) -> Tensor:
        k, u, a, h = self.locate(q)
        M0, M1, y0, y1 = self.M[k], self.M[k + 1], self.y[k], self.y[k + 1]
        return (M0 * a ** 3 + M1 * u ** 3) / (6.0 * h) + (y0 / h - M0 * h / 6.0) * a + (y1 / h - M1 * h / 6.0) * u

    def integral(self, q: Tensor) -> Tensor:
        k, u, a, h = self.locate(q)
        M0, M1, y0, y1 = self.M[k], self.M[k + 1], self.y[k], self.y[k + 1]
        return (self.cum[k] + (M0 * (h ** 4 - a ** 4) + M1 * u ** 4) / (24.0 * h)
                + (y0 / h - M0 * h / 6.0) * (h * h - a * a) / 2.0 + (y1 / h - M1 * h / 6.0) * u * u / 2.0)


class _Profile:
    """l, s, b [N+1, D] on the grid ``lam`` as natural cubic splines, and their integrals."""

    def __init__(self, ems: EMS):
        self.lam = ems.lam
        flat = lambda v: v.reshape(v.shape[0], -1).to(F64)  # noqa: E731
        self.l, self.s, self.b = (_Spline(self.lam, flat(v)) for v in (ems.l, ems.s, ems.b))
        x, w = np.polynomial.legendre.leggauss(GAUSS_NODES)
        self.gx, self.gw = torch.tensor(x, dtype=F64), torch.tensor(w, dtype=F64)
        piece = self._inner(self.lam[:-1], self.lam[1:])
        self.B0 = torch.cat([piece[:1] * 0, torch.cumsum(piece, 0)])

    def L(self, q: Tensor) -> Tensor:
        return self.l.integral(q)

    def S(self, q: Tensor) -> Tensor:
        return self.s.integral(q)

    def _inner(self, a: Tensor, c: Tensor) -> Tensor:
        """:math:`\\int_a^c e^{-S}b` with a, c in one grid interval (Gauss-Legendre), [Q, D]."""
        half = 0.5 * (c - a)
        r = (a[:, None] + half[:, None] * (1.0 + self.gx[None])).reshape(-1)       # [Q * G]
        val = torch.exp(-self.S(r)) * self.b(r)
        return (val.reshape(a.numel(), self.gx.numel(), -1) * self.gw[None, :, None]).sum(1) * half[:, None]

    def B(self, q: Tensor) -> Tensor:
        """:math:`B(q) = \\int_{\\lambda_0}^q e^{-S}b` (exact on the grid, Gauss-Legendre within an interval)."""
        k = self.l.locate(q)[0]
        return self.B0[k] + self._inner(self.lam[k], q)

    def quadrature(self, a: float, c: float) -> tuple[Tensor, Tensor]:
        """Nodes and weights of composite Gauss-Legendre on [a, c], broken at the grid points."""
        inner = self.lam[(self.lam > a) & (self.lam < c)]
        edges = torch.cat([torch.tensor([a], dtype=F64), inner, torch.tensor([c], dtype=F64)])
        half = 0.5 * (edges[1:] - edges[:-1])
        nodes = edges[:-1, None] + half[:, None] * (1.0 + self.gx[None])
        return nodes.reshape(-1), (half[:, None] * self.gw[None]).reshape(-1)


def _basis(nodes: list[float], q: Tensor, pseudo: bool) -> Tensor:
    """[Q, n] values at q of the polynomials p_j with p(q) = sum_j p_j(q) g_j: the Lagrange basis
    through ``nodes`` (nodes[0] the expansion point), or with ``pseudo`` the Taylor polynomial
    at nodes[0] whose m-th derivative is m! times the divided difference g[nodes_0..nodes_m]."""
    n = len(nodes)
    out = torch.zeros(q.numel(), n, dtype=F64)
    for j in range(n):
        if not pseudo:
            pj = torch.ones_like(q)
            for m in range(n):
                if m != j:
                    pj = pj * (q - nodes[m]) / (nodes[j] - nodes[m])
            out[:, j] = pj
            continue
        for order in range(j, n):
            denom = math.prod(nodes[j] - nodes[m] for m in range(order + 1) if m != j)
            out[:, j] += (q - nodes[0]) ** order / denom
    return out


class StepCoefs(NamedTuple):
    """One update ``x_t = x_scale * x_s + sum_j f_scale[j] * f_j + shift`` ([*shape] tensors)."""

    x_scale: Tensor
    f_scale: tuple
    shift: Tensor


def step_coefficients(prof: _Profile, lam_s: float, lam_t: float, alpha_s: float, alpha_t: float,
                      nodes: list[float], pseudo: bool) -> tuple[Tensor, list[Tensor], Tensor]:
    """Float64 [D] coefficients of one step from lam_s to lam_t interpolating g at ``nodes``
    (nodes[0] = lam_s); see the module docstring."""
    at = lambda v: torch.tensor([v], dtype=F64)  # noqa: E731
    Ls, Ss, Bs = prof.L(at(lam_s))[0], prof.S(at(lam_s))[0], prof.B(at(lam_s))[0]
    decay = torch.exp(-(prof.L(at(lam_t))[0] - Ls))
    q, w = prof.quadrature(lam_s, lam_t)
    kern = w[:, None] * torch.exp(prof.L(q) - Ls + prof.S(q) - Ss)                   # [Q, D]
    weights = _basis(nodes, q, pseudo).T @ kern                                      # [n, D]
    mu = torch.tensor(nodes, dtype=F64)
    S_mu, B_mu = prof.S(mu), prof.B(mu)
    eSs = torch.exp(Ss)
    beta_int = (kern * (eSs * (prof.B(q) - Bs))).sum(0)
    g_shift = (weights * eSs * (B_mu - Bs)).sum(0)
    f_scale = [-alpha_t * decay * weights[j] * torch.exp(-(S_mu[j] - Ss)) for j in range(len(nodes))]
    return alpha_t / alpha_s * decay, f_scale, -alpha_t * decay * (beta_int - g_shift)


@dataclass(init=False, eq=False)
class V3Table(StepTable):
    """:class:`StepTable` plus the DPM-Solver-v3 coefficients (built in ``prepare``):
    ``f_x`` [steps] with :math:`f_i = f_x[i]\\,x - \\hat x_0`, :math:`f_x = (1-l)/\\alpha`;
    ``predict[i]`` the :class:`StepCoefs` of step i (history f newest first);
    ``correct[i]`` those of the corrector of the state at t_i (from x_{i-1}; f at the nodes
    lambda_{i-1}, lambda_i, lambda_{i-2}, ...) or None (i = 0, or no corrector)."""

    f_x: list | None = None
    predict: list | None = None
    correct: list | None = None


@dataclass(frozen=True)
class _State:
    x_prev: Any = None   # the (corrected) state at t_{i-1}
    f: tuple = ()        # f values, newest last


@register("dpm_solver_v3")
@dataclass
class DPMSolverV3(StepRatioRule):
    r"""DPM-Solver-v3 (module docstring), one NFE per step (nfe == steps).

    **Options:** ``ems``: the statistics (:class:`solvers.ems.EMS`, from
    :func:`solvers.ems_statistics` or :meth:`EMS.load`); None = :math:`l = 1, s = b = 0`
    (DPM-Solver++ in data prediction); their log-SNR range must cover the sampling grid and
    their shape must be a sample's shape or ().  ``order`` 1-3 (the predictor; warm-up
    1, 2, ...), ``use_corrector`` (default True: the pseudo-corrector of order k + 1, not after
    the last step), ``pseudo_predictor``, ``pseudo_corrector`` (divided differences instead of
    interpolation: the paper's pseudo-order, reference options ``p_pseudo``, ``c_pseudo``), ``min_gap_ratio``
    (:meth:`StepRatioRule.stable_orders`).  The option is ``ems`` rather than ``stats``:
    ``Solver.stats`` is the method reporting a solve's statistics.

    **Order** (:attr:`expected_order`): k without the corrector, k + 1 with it (measured on the
    exact Gaussian with estimated statistics: 1, 2, 3 resp. 2, 3, 4 for k = 1, 2, 3).  As for
    UniPC, ``order`` is an option (the predictor's order), not a class constant."""

    order: int = 2
    ems: EMS | None = None
    use_corrector: bool = True
    pseudo_predictor: bool = False
    pseudo_corrector: bool = False
    default_schedule: ClassVar[str] = "log_snr"

    def validate_options(self) -> None:
        super().validate_options()
        if isinstance(self.order, bool) or not isinstance(self.order, int) or self.order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3 for dpm_solver_v3, got {self.order!r}")
        if self.ems is not None and not isinstance(self.ems, EMS):
            raise TypeError(f"ems must be a solvers.ems.EMS or None, got {type(self.ems).__name__}")
        for name in ("use_corrector", "pseudo_predictor", "pseudo_corrector"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def expected_order(self) -> int:
        return self.order + 1 if self.use_corrector else self.order

    def _profile(self, lam: list[float], like: Tensor) -> _Profile:
        lo, hi = min(lam), max(lam)
        ems = self.ems if self.ems is not None else EMS.constant(lo, hi, 1.0)
        if ems.shape not in ((), tuple(like.shape[1:])):
            raise ValueError(f"ems has shape {list(ems.shape)}, the samples {list(like.shape[1:])}; "
                             "ems must be computed for this data shape (or have shape [])")
        e_lo, e_hi = float(ems.lam[0]), float(ems.lam[-1])
        tol = 1e-9 * (1.0 + max(abs(e_lo), abs(e_hi)))
        if lo < e_lo - tol or hi > e_hi + tol:
            raise ValueError(f"ems covers log-SNR/2 in [{e_lo:.6g}, {e_hi:.6g}], the grid needs "
                             f"[{lo:.6g}, {hi:.6g}]; compute ems over the sampling range")
        return _Profile(ems)

    def prepare(self, sde: SDE, grid: TimeGrid, like: Tensor) -> V3Table:
        base = super().prepare(sde, grid, like)
        _need_finite_lam(base, self.name)
        tab = V3Table(base.steps, base.t, base.t64)
        tab.__dict__.update(base.__dict__)
        lam, alpha = tab.lam64.tolist(), tab.alpha64.tolist()
        prof = self._profile(lam, like)
        tab.orders, tab.order_lowered_at = self.stable_orders(
            [min(self.order, i + 1) for i in range(grid.steps)], tab.h64.tolist())
        shape = like.shape[1:]
        cast = lambda v: (v.reshape(shape) if v.numel() > 1 else v.reshape(())).to(like)  # noqa: E731
        cast_all = lambda c: StepCoefs(cast(c[0]), tuple(map(cast, c[1])), cast(c[2]))  # noqa: E731
        l_grid = prof.l(tab.lam64)
        tab.f_x = [cast((1.0 - l_grid[i]) / alpha[i]) for i in range(grid.steps)]
        tab.predict, tab.correct = [], [None] * grid.steps
        for i, k in enumerate(tab.orders):
            nodes = [lam[i - j] for j in range(k)]
            tab.predict.append(cast_all(step_coefficients(prof, lam[i], lam[i + 1], alpha[i], alpha[i + 1],
                                                          nodes, self.pseudo_predictor)))
            if self.use_corrector and i + 1 < grid.steps:
                nodes = [lam[i], lam[i + 1]] + [lam[i - j] for j in range(1, k)]
                tab.correct[i + 1] = cast_all(step_coefficients(prof, lam[i], lam[i + 1], alpha[i],
                                                                alpha[i + 1], nodes, self.pseudo_corrector))
        return tab

    def init(self, x: Tensor) -> _State:
        return _State()

    @staticmethod
    def _apply(c: StepCoefs, x: Tensor, fs: list[Tensor]) -> Tensor:
        out = c.x_scale * x + c.shift
        for scale, f in zip(c.f_scale, fs):
            out = out + scale * f
        return out

    def step(self, model: CheckedModel, i: int, x: Tensor, st: _State, tab: V3Table, noise) -> tuple:
        f_new = tab.f_x[i] * x - model.evaluate(x, tab.t64[i]).x0
        corr = tab.correct[i]
        if corr is not None:   # nodes lambda_{i-1}, lambda_i, lambda_{i-2}, ...; f_i kept (taken at the predictor)
            old = list(reversed(st.f))
            x = self._apply(corr, st.x_prev, [old[0], f_new, *old[1:]])
        hist = (*st.f, f_new)[-self.order:]
        x_next = self._apply(tab.predict[i], x, list(reversed(hist)))
        return x_next, _State(x, hist)
