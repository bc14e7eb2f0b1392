r"""Exponential integrators in log-SNR time: phi functions and the two family bases.

With :math:`\lambda = \log(\alpha/\sigma)` (half the log-SNR) the probability-flow ODE of
any LinearSDE has the exact variation-of-constants form (Lu et al. 2022, DPM-Solver++ eq. 8)

.. math:: x_t = \frac{\sigma_t}{\sigma_s}x_s + \sigma_t\int_{\lambda_s}^{\lambda_t} e^{\lambda}\,\hat x_0(\lambda)\,d\lambda
              = \frac{\sigma_t}{\sigma_s}x_s + \alpha_t\int_0^h e^{-(h-u)}\,\hat x_0(\lambda_s+u)\,du,

:math:`h = \lambda_t - \lambda_s`.  Solvers differ only in how they approximate
:math:`\hat x_0` on the step: by earlier evaluations (:class:`ExponentialMultistep`) or by
intermediate stages (:class:`ExponentialSinglestep`).  Integrals of the exponential weight
against monomials,

.. math:: J_m(h) = \int_0^h u^m e^{-(h-u)}\,du = m!\,h^{m+1}\varphi_{m+1}(-h),
          \qquad \varphi_k(z) = \sum_{j\ge0} \frac{z^j}{(j+k)!},

are evaluated in float64 (series for small h, closed forms otherwise) once per call.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from scoresde.sde import SDE, LinearSDE

from .base import CheckedModel, Solver, StepTable
from .timesteps import TimeGrid

__all__ = ["phi", "solve_small", "exp_moments", "History", "ExponentialMultistep", "ExponentialSinglestep",
           "lagrange_weights", "MIN_GAP_RATIO", "FEW_STEPS", "FEW_STEP_MAX_H", "SinglestepStage"]


def solve_small(A: list[list[float]], b: list[float]) -> list[float]:
    """Solve the small dense system ``A x = b`` (n <= ~6) in Python float64 by Gaussian
    elimination with partial pivoting: the per-step order conditions of the multistep methods,
    without a tensor round trip per step.  Raises ValueError for a singular system."""
    n = len(b)
    M = [list(map(float, row)) + [float(v)] for row, v in zip(A, b)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(M[r][c]))
        if M[p][c] == 0.0:
            raise ValueError("singular system in solve_small (repeated nodes?)")
        M[c], M[p] = M[p], M[c]
        piv = M[c][c]
        for r in range(c + 1, n):
            f = M[r][c] / piv
            if f:
                row_r, row_c = M[r], M[c]
                for j in range(c, n + 1):
                    row_r[j] -= f * row_c[j]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (M[r][n] - sum(M[r][j] * x[j] for j in range(r + 1, n))) / M[r][r]
    return x


def to_dtype_floats(values: list[float], like: Tensor) -> list[float]:
    """Python floats rounded to ``like``'s dtype (one conversion for a whole table)."""
    if not values:
        return []
    return torch.tensor(values, dtype=torch.float64).to(like.dtype).tolist()


def split_like(flat: list[float], nested: list[list]) -> list[list[float]]:
    """``flat`` cut into the lengths of ``nested``'s rows."""
    out, pos = [], 0
    for row in nested:
        out.append(flat[pos:pos + len(row)])
        pos += len(row)
    return out


@functools.lru_cache(maxsize=8192)
def phi(k: int, z: float) -> float:
    r""":math:`\varphi_k(z) = \sum_{j\ge 0} z^j/(j+k)!` in float64 (:math:`\varphi_1(z) = (e^z-1)/z`)."""
    if abs(z) < 0.5:
        term, total, j = 1.0 / math.factorial(k), 0.0, 0
        while True:
            total += term
            j += 1
            term *= z / (j + k)
            if abs(term) < 1e-18 * max(abs(total), 1e-300) or j > 60:
                return total + term
    # phi_k(z) = (phi_{k-1}(z) - 1/(k-1)!)/z with phi_0 = e^z
    val = math.exp(z)
    for m in range(1, k + 1):
        val = (val - 1.0 / math.factorial(m - 1)) / z
    return val


def exp_moments(h: float, n: int, rate: float = 1.0) -> list[float]:
    r""":math:`[J_0, \dots, J_{n-1}]`, :math:`J_m = \int_0^h u^m e^{-c(h-u)}du = c^{-(m+1)}J_m^{(1)}(ch)`
    for the decay rate :math:`c` = ``rate`` (1 for the ODE, 1 + eta for the SDE variants)."""
    ch = rate * h
    return [math.factorial(m) * h ** (m + 1) * phi(m + 1, -ch) for m in range(n)]


def lagrange_weights(nodes: list[float], h: float, rate: float = 1.0) -> list[float]:
    r"""Weights :math:`c_j = \int_0^h e^{-(h-u)} L_j(u)\,du` of the Lagrange basis through
    ``nodes`` (offsets :math:`u_j` in :math:`\lambda` from the current point), so that
    :math:`\int_0^h e^{-(h-u)}p(u)du = \sum_j c_j p(u_j)` for every polynomial of degree < len(nodes)."""
    return list(_lagrange_weights(tuple(map(float, nodes)), float(h), float(rate)))


@functools.lru_cache(maxsize=8192)
def _lagrange_weights(nodes: tuple, h: float, rate: float) -> tuple:
    """Memoised: repeated ``sample`` calls on one grid (a loop over batches) reuse the weights."""
    k = len(nodes)
    V = [[u ** m for u in nodes] for m in range(k)]  # V[m][j]
    return tuple(solve_small(V, exp_moments(h, k, rate)))


#: Default smallest ratio h_{i-j}/h_i of a history gap to the current step at which a
#: multistep method keeps its order (:meth:`StepRatioRule.stable_orders`).
MIN_GAP_RATIO = 1.0 / 3.0

#: Grids of fewer steps than this get the few-step rule (``lower_order_final=None``,
#: :meth:`StepRatioRule.grid_orders`); the original codes' bound (diffusers' DPM-Solver++)
FEW_STEPS = 15
#: Under the few-step rule, the largest step h in lambda at which a step keeps an order
#: above 2 (:meth:`StepRatioRule.step_size_cap`)
FEW_STEP_MAX_H = 0.5


@dataclass(frozen=True)
class History:
    """Immutable multistep history, returned by ``step`` rather than mutated: the last data
    predictions, newest last."""

    x0: tuple = ()

    def push(self, x0: Tensor, keep: int) -> "History":
        return History(x0=(*self.x0[-(keep - 1):], x0) if keep > 1 else (x0,))


def _need_finite_lam(tab: StepTable, name: str) -> None:
    lam = tab.lam64
    if not bool(torch.isfinite(lam).all()):
        raise ValueError(f"{name} needs a finite log-SNR on the whole grid (t_end > 0 and alpha(T) > 0)")


@dataclass
class StepRatioRule(Solver):
    r"""The multistep bases' shared order rules, decided from the grid once per call in
    ``prepare`` (:meth:`grid_orders`):

    - the step-ratio rule (option ``min_gap_ratio``, :meth:`stable_orders`);
      ``stats["order_lowered_at"]`` lists the steps it lowered;
    - the few-step rule (option ``lower_order_final``): ``None`` (default) applies it to grids
      of fewer than ``FEW_STEPS`` = 15 steps, ``True`` lowers the final orders on every grid
      (and nothing else: the reference codes' option), ``False`` never.  On a few-step grid the
      final steps' orders are lowered (step i uses at most steps - i, as DPM-Solver and UniPC
      do), and a step keeps an order above 2 only where its step is short,
      :math:`h_i \le` ``FEW_STEP_MAX_H`` = 0.5 (:meth:`step_size_cap`).

    Why: the higher-order corrections extrapolate :math:`\hat x_0` (resp. :math:`\hat\epsilon`)
    by a polynomial over the step; their weights grow with h (order 3: up to the Lagrange
    extrapolation weights [3, -3, 1] as h grows) while the curvature they correct for is not
    resolved at h ~ 1 in lambda (a mixture's posterior mean switches modes over O(1) in
    lambda).  Measured (``benchmarks/few_steps_vs_ddim.py``: 6 SDE families x 4 schedules x
    3..10 steps, Gaussian and 2-D mixture, checked on a held-out 8-D mixture): the rule brings
    every multistep method from up to 12x DDIM's error to within about 1.2x of it.  Log-SNR
    grids of 15+ steps are not changed."""

    #: smallest ratio h_{i-j}/h_i of a history gap to the step that keeps the order
    #: (:meth:`stable_orders`; 0 switches the rule off)
    min_gap_ratio: float = MIN_GAP_RATIO
    #: the few-step rule: None = on below FEW_STEPS steps, True = final orders lowered on
    #: every grid, False = off (the original codes' default for most methods)
    lower_order_final: bool | None = None

    def validate_options(self) -> None:
        r = self.min_gap_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)):
            raise TypeError(f"min_gap_ratio must be a real number in [0, 1], got {r!r}")
        if not 0.0 <= float(r) <= 1.0:
            raise ValueError(f"min_gap_ratio must be in [0, 1], got {r!r}")
        if self.lower_order_final is not None and not isinstance(self.lower_order_final, bool):
            raise TypeError(f"lower_order_final must be a bool or None, got {self.lower_order_final!r}")

    def few_step_rule(self, steps: int) -> bool:
        """Whether the few-step rule applies to a grid of ``steps`` steps."""
        return self.lower_order_final is None and steps < FEW_STEPS

    def final_lowered(self, steps: int) -> bool:
        """Whether the final steps' orders are lowered (k_i <= steps - i)."""
        return self.lower_order_final is True or self.few_step_rule(steps)

    def step_size_cap(self, k: int, h: float) -> int:
        """The order a step of length ``h`` in lambda may use under the few-step rule:
        orders above 2 need h <= FEW_STEP_MAX_H.  Methods refine it (UniPC bh1)."""
        return 2 if k > 2 and h > FEW_STEP_MAX_H else k

    def grid_orders(self, steps: int, h: list[float]) -> tuple[list[int], list[int]]:
        """The orders used at every step and the steps the step-ratio rule lowered:
        ``orders_for`` (warm-up, final lowering), :meth:`stable_orders`, then
        :meth:`step_size_cap` on a few-step grid."""
        orders, lowered = self.stable_orders(self.orders_for(steps), h)
        if self.few_step_rule(steps):
            orders = [min(k, self.step_size_cap(k, hi)) for k, hi in zip(orders, h)]
        return orders, lowered

    def stable_orders(self, orders: list[int], h: list[float]) -> tuple[list[int], list[int]]:
        r"""The orders to use and the steps where they were lowered, decided from the grid
        (the steps ``h`` in :math:`\lambda`) once per call.

        An order-k step interpolates :math:`\hat x_0` through the history nodes
        :math:`\lambda_i, \lambda_{i-1}, \dots, \lambda_{i-k+1}`, whose gaps are the earlier
        steps :math:`h_{i-1}, \dots, h_{i-k+1}`, and integrates the interpolant over
        :math:`[0, h_i]`.  With :math:`r_j = h_{i-j}/h_i` its weights (Lagrange, DPM-Solver++
        midpoint, UniPC predictor and corrector alike) contain divided differences over those
        gaps: order 2 has :math:`\pm 1/(2r_1)` (DPM-Solver++(2M)) resp. :math:`O(1/r_1)`, order 3
        up to :math:`O(1/(r_1 r_2))`.  On a smooth history the large weights cancel, but every
        part of :math:`\hat x_0` that does not vary smoothly over the short gap is amplified by
        them: UniPC's correction (the history holds :math:`\hat x_0` taken at the predictor, the
        state continues from the corrected value, so two nodes a gap :math:`h_{i-1}` apart
        differ by O(correction), amplified to O(correction / r)), the SDE variants' injected
        noise (:math:`\sigma\sqrt{2\eta h_{i-1}}` over the gap, amplified to
        :math:`O(\sqrt{h_i/r_1})`), round-off and model error.  Hence the rule: step i uses the
        largest order :math:`k' \le k_i` such that :math:`r_j \ge` ``min_gap_ratio`` for every
        gap :math:`1 \le j < k'` it spans, which bounds each weight by
        :math:`O(\text{min\_gap\_ratio}^{-(k'-1)})` times its first-order value.  A short
        *current* step after long ones (:math:`r_j > 1`) is harmless (weights
        :math:`1 + O(1/r_j)`) and keeps its order.  The default 1/3 was chosen by measurement
        (``benchmarks/gap_ratio_study.py``: 7 SDE families x 4 schedules x 3..50 steps, tuned
        on a Gaussian and a 2-D mixture, checked on a held-out 8-D mixture): it is the smallest
        bound with which ``dpmpp_2m``, ``unipc(order=2, variant="bh2")`` and ``dpmpp_2m_sde``
        stay within 2x DDIM (resp. the first-order SDE method) on every one of those grids, and
        it gives the best worst case for UniPC-3.  A log-SNR grid (ratio 1) never triggers it;
        the uneven ends of uniform-in-t grids and some coarse quadratic/Karras grids do, where
        it made 348 of 392 changed (grid, method) pairs more than 10% more accurate on the
        Gaussian (31 got worse).  ``min_gap_ratio=0`` reproduces the original codes, which have
        no such rule.  Orders beyond the history
        (DPM-Solver++(3M)'s singlestep warm-up at step 0) are kept.  (Step-ratio bounds for
        variable-step multistep methods: Hairer, Norsett & Wanner, *Solving ODEs I*, III.5.)"""
        out, lowered = [], []
        for i, k in enumerate(orders):
            k_new = k
            for j in range(1, min(k, i + 1)):
                if not h[i - j] >= self.min_gap_ratio * h[i]:
                    k_new = j
                    break
            out.append(k_new)
            if k_new < k:
                lowered.append(i)
        return out, lowered

    def stats(self, table: StepTable) -> dict:
        return {**super().stats(table), "order_lowered_at": list(table.order_lowered_at or [])}


@dataclass
class ExponentialMultistep(StepRatioRule):
    r"""Base of the data-prediction multistep methods (DPM-Solver++ family, UniPC).

    Each step makes **one** network evaluation, pushes :math:`\hat x_0` onto the
    :class:`History` and applies

    .. math:: x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i}x_i + \alpha_{i+1}\sum_{j<k_i} c_{i,j}\,\hat x_0^{(i-j)},

    with weights from :meth:`weights` precomputed in ``prepare``.  The order used at step i is
    :math:`k_i = \min(\text{order}, i+1)` (warm-up), lowered on few-step grids (fewer than 15
    steps, or always with ``lower_order_final=True``; :class:`StepRatioRule`).  On any grid the order is further lowered where a history node
    sits too close to its neighbour (:meth:`stable_orders`, option ``min_gap_ratio``);
    ``stats["orders"]`` reports the orders used and ``stats["order_lowered_at"]`` the steps
    where that rule lowered one.
    Subclasses define ``order`` and ``weights``; UniPC adds a corrector through :meth:`correct`.
    """

    order: ClassVar[int] = 2
    default_schedule: ClassVar[str] = "log_snr"

    def orders_for(self, steps: int) -> list[int]:
        orders = [min(self.order, i + 1) for i in range(steps)]
        if self.final_lowered(steps):
            orders = [min(k, steps - i) for i, k in enumerate(orders)]
        return orders

    def weights(self, k: int, nodes: list[float], h: float) -> list[float]:
        """Weights of the last k data predictions (newest first) at offsets ``nodes``
        (exact integration of their Lagrange interpolant against the exponential weight)."""
        return lagrange_weights(nodes, h, self.rate())

    def rate(self) -> float:
        """Decay rate c of the exponential weight: 1 for the ODE; 1 + eta for SDE variants."""
        return 1.0

    def prepare(self, sde: SDE, grid: TimeGrid, like: Tensor) -> StepTable:
        tab = super().prepare(sde, grid, like)
        _need_finite_lam(tab, self.name)
        lam = tab.lam64.tolist()
        tab.orders, tab.order_lowered_at = self.grid_orders(grid.steps, tab.h64.tolist())
        c = self.rate()
        ratio = (tab.sigma64[1:] / tab.sigma64[:-1]) * torch.exp(-(c - 1.0) * tab.h64)
        alpha = tab.alpha64.tolist()
        weights = []
        for i, k in enumerate(tab.orders):
            h = lam[i + 1] - lam[i]
            nodes = [lam[i - j] - lam[i] for j in range(min(k, i + 1))]
            weights.append([w * alpha[i + 1] for w in self.weights(k, nodes, h)])
        # Python floats rounded once to the state dtype (the values a tensor update would use)
        tab.coef_f = split_like(to_dtype_floats([w for ws in weights for w in ws], like), weights)
        tab.sigma_ratio_f = to_dtype_floats(ratio.tolist(), like)
        return tab

    def init(self, x: Tensor) -> History:
        return History()

    def keep(self) -> int:
        return self.order

    def step(self, model: CheckedModel, i: int, x: Tensor, hist: History, tab: StepTable, noise) -> tuple:
        x0 = model.evaluate(x, tab.t64[i]).x0
        x, hist = self.correct(model, i, x, hist, x0, tab)
        hist = hist.push(x0, self.keep())
        return self.update(x, hist, tab, i, tab.orders[i]), hist

    def correct(self, model: CheckedModel, i: int, x: Tensor, hist: History, x0_new: Tensor,
                tab: StepTable) -> tuple[Tensor, History]:
        """Hook called after the step's evaluation at x_i (UniPC's corrector); no-op here."""
        return x, hist

    def update(self, x: Tensor, hist: History, tab: StepTable, i: int, k: int) -> Tensor:
        c = tab.coef_f[i]
        out = x * tab.sigma_ratio_f[i]
        for j in range(k):
            out.add_(hist.x0[-1 - j], alpha=c[j])
        return out


@dataclass(eq=False)
class SinglestepStage:
    r"""One outer step of a singlestep method, from :math:`s = t_i` to :math:`t = t_{i+1}`,
    with its intermediate stages :math:`s_j` at :math:`\lambda_{s_j} = \lambda_s + r_j h`
    (all floats are float64 Python scalars).  Built once per call by
    :meth:`ExponentialSinglestep.prepare`."""

    h: float                    # lambda_t - lambda_s
    a_s: float                  # alpha_s
    s_s: float                  # sigma_s
    a_t: float                  # alpha_t
    s_t: float                  # sigma_t
    r: tuple[float, ...]        # r_j: the fractions of h actually reached (see prepare)
    t64: list[Tensor]           # s_j as float64 tensors on the state's device (model times)
    alpha: list[float]          # alpha_{s_j}
    sigma: list[float]          # sigma_{s_j}
    coefs: Any = None           # the method's named coefficients (``stage_coefficients``)


@dataclass
class ExponentialSinglestep(Solver):
    r"""Base of the singlestep methods (DPM-Solver-1/2/3, DPM-Solver++(2S)).

    ``steps`` is the NFE budget: it is split into outer steps of orders
    :math:`k \le` ``order`` by DPM-Solver's allocation (Lu et al. 2022, sec. 3.4,
    ``allocation="fast"``: e.g. order 3 and steps = 3K gives [3]*(K-1) + [2, 1]) so that
    nfe == steps exactly, or ``allocation="fixed"`` (steps must be a multiple of the order;
    [order] * (steps/order), the choice for order fits).  An order-k outer step of length
    h in :math:`\lambda` evaluates the model at fractions ``stage_fractions(k)`` of h
    (e.g. (1/3, 2/3) for order 3) and combines them in :meth:`combine`.
    """

    order: ClassVar[int] = 2
    default_schedule: ClassVar[str] = "log_snr"
    allocation: str = "fast"

    def validate_options(self) -> None:
        if self.allocation not in ("fast", "fixed"):
            raise ValueError(f"allocation must be 'fast' or 'fixed', got {self.allocation!r}")

    def stage_fractions(self, k: int) -> tuple[float, ...]:
        return {1: (), 2: (0.5,), 3: (1.0 / 3.0, 2.0 / 3.0)}[k]

    def orders_for(self, steps: int) -> list[int]:
        p = self.order
        if self.allocation == "fixed":
            if steps % p:
                raise ValueError(f"allocation='fixed' needs steps divisible by the order {p}, got steps={steps}")
            return [p] * (steps // p)
        if p == 1:
            return [1] * steps
        if p == 2:
            return [2] * (steps // 2) + ([1] if steps % 2 else [])
        n_outer = steps // 3 + 1
        if steps % 3 == 0:
            return [3] * (n_outer - 2) + [2, 1]
        return [3] * (n_outer - 1) + ([1] if steps % 3 == 1 else [2])

    def grid_intervals(self, steps: int) -> int:
        return len(self.orders_for(steps))

    def expected_nfe(self, steps: int) -> int:
        return sum(self.orders_for(steps))

    def prepare(self, sde: SDE, grid: TimeGrid, like: Tensor) -> StepTable:
        tab = super().prepare(sde, grid, like)
        _need_finite_lam(tab, self.name)
        if not isinstance(sde, LinearSDE):  # pragma: no cover - guarded by requires_linear_sde
            raise TypeError(f"{self.name} needs a LinearSDE")
        # ``grid.budget`` is the NFE budget the user passed as steps; an explicit grid of n
        # intervals (no budget) takes n full-order steps
        tab.orders = self.orders_for(grid.budget) if grid.budget is not None else [self.order] * grid.steps
        lam = tab.lam64.tolist()
        fracs = [self.stage_fractions(k) for k in tab.orders]
        # every stage time of every outer step in one inversion and one coefficient call
        lam_all = [lam[i] + r * (lam[i + 1] - lam[i]) for i, fr in enumerate(fracs) for r in fr]
        if lam_all:
            t_all = sde.t_of_log_snr_unchecked(2.0 * torch.tensor(lam_all, dtype=torch.float64))
            c_all = sde.coefficients(t_all)
            lam_reached = (0.5 * c_all["log_snr"]).tolist()
            a_all, s_all = c_all["alpha"].tolist(), c_all["sigma"].tolist()
            t_dev = t_all.to(like.device).unbind(0)
        alpha, sigma = tab.alpha64.tolist(), tab.sigma64.tolist()
        stages, pos = [], 0
        for i, (k, fr) in enumerate(zip(tab.orders, fracs)):
            h = lam[i + 1] - lam[i]
            sl = slice(pos, pos + len(fr))
            pos += len(fr)
            # the fractions actually reached: lambda(t_of_log_snr(lam)) may differ from lam by
            # round-off of the inverse (1e-12 for sub-VP); using the reached values keeps every
            # stage on the schedule it is evaluated at (the formulas hold for any r)
            stage = SinglestepStage(
                r=tuple((v - lam[i]) / h for v in lam_reached[sl]) if fr else (), h=h,
                a_s=alpha[i], s_s=sigma[i], a_t=alpha[i + 1], s_t=sigma[i + 1],
                t64=list(t_dev[sl]) if fr else [],
                alpha=a_all[sl] if fr else [], sigma=s_all[sl] if fr else [],
            )
            stage.coefs = self.stage_coefficients(stage, k)
            stages.append(stage)
        tab.stages = stages
        return tab

    def stage_coefficients(self, st: SinglestepStage, k: int) -> Any:
        """The scalar coefficients :meth:`combine` needs for an order-k outer step (a small
        NamedTuple per step kind), computed here once per call (float64) so that the loop
        only reads them."""
        return None

    def step(self, model: CheckedModel, i: int, x: Tensor, state: Any, tab: StepTable, noise) -> tuple:
        k = tab.orders[i]
        return self.combine(model, i, x, tab, k), state

    def combine(self, model: CheckedModel, i: int, x: Tensor, tab: StepTable, k: int) -> Tensor:
        raise NotImplementedError
