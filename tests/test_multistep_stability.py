"""Multistep methods on grids with near-duplicate nodes (solvers/exponential.py,
``ExponentialMultistep.stable_orders``): the order is lowered where a history gap is short
against the step, the lowered steps are reported in ``stats``, and ordinary grids run
exactly as before.

Everything runs in float64 with an exact Gaussian model.  The ODE methods are measured
against the exact flow (``Gaussian.flow``); the SDE variants by their exact output mean and
covariance (the sampler is affine in ``(x_T, z_1, ...)`` for Gaussian data, see
``validation.metrics.exact_moments``), so no Monte-Carlo noise enters any comparison.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from hypothesis import given, strategies as st

import scoresde
import solvers
from solvers.dpm import _MultistepSDE
from solvers.exponential import MIN_GAP_RATIO, ExponentialMultistep
from solvers.timesteps import make_grid
from validation.metrics import exact_moments
from conftest import SDE_NAMES, make_sde

F64 = torch.float64


def _target() -> scoresde.Gaussian:
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=F64))
    cov = (Q * torch.tensor([0.05, 0.4, 1.5], dtype=F64)) @ Q.T
    return scoresde.Gaussian(torch.tensor([1.0, -0.5, 0.3], dtype=F64), cov)


TARGET = _target()

ODE_CONFIGS = [("dpmpp_2m", {}), ("dpmpp_2m", {"solver_type": "heun"}), ("dpmpp_3m", {}),
               ("dpmpp_3m", {"warmup": "singlestep"}), ("dpmpp_3m", {"lower_order_final": True})] + [
    ("unipc", dict(order=p, variant=v, use_corrector=c))
    for p in (1, 2, 3) for v in ("bh1", "bh2") for c in (True, False)] + [
    ("deis", {}), ("deis", {"order": 2}), ("ipndm", {}), ("ipndm", {"order": 2})]
SDE_METHODS = ("dpmpp_2m_sde", "dpmpp_3m_sde")


@dataclass
class SDEDPM1(_MultistepSDE):
    """First-order SDE-DPM-Solver++ (the k = 1 member of the SDE multistep family): the
    reference the SDE variants are compared with."""

    order: ClassVar[int] = 1


def ode_error(sde, t: list[float], method: str, **opts) -> tuple[float, dict]:
    """Max abs error against the exact flow from 4 exact samples at t[0]; and the stats.
    The multistep methods run without the few-step rule (``lower_order_final=False`` unless
    given): this module is about the step-ratio rule alone (tests/test_few_steps_vs_ddim.py
    covers the few-step rule)."""
    if method != "ddim":
        opts.setdefault("lower_order_final", False)
    x = TARGET.marginal(sde, t[0]).sample(4, generator=torch.Generator().manual_seed(1))
    exact = TARGET.flow(x, t[0], t[-1], sde)
    sol = solvers.sample(TARGET.as_model(sde), x, method, timesteps=t, **opts)
    return float((sol.x - exact).abs().max()), sol.stats


def sde_error(sde, t: list[float], method) -> float:
    """|mean - exact mean| + |cov - exact cov|_F of the output for x_T ~ exact marginal at t[0]."""
    p_start, p_end = TARGET.marginal(sde, t[0]), TARGET.marginal(sde, t[-1])
    if isinstance(method, str):  # without the few-step rule, as ode_error
        method = solvers.get(method, lower_order_final=False)
    mean, cov = exact_moments(TARGET.as_model(sde), method, None, p_start.mean, p_start.cov, timesteps=t)[:2]
    return float((mean - p_end.mean).norm() + (cov - p_end.cov).norm())


def with_near_duplicates(t: list[float], where: list[tuple[int, float, bool]]) -> list[float]:
    """``t`` with a node inserted next to node j at relative gap g of the interval
    (after t[j] if ``after`` else before t[j+1]), for each (j, g, after)."""
    out = list(t)
    for j, g, after in where:
        j = min(j, len(t) - 2)
        d = t[j] - t[j + 1]
        out.append(t[j] - g * d if after else t[j + 1] + g * d)
    return sorted(set(out), reverse=True)


def check_grid(sde, base: list[float], grid: list[float]) -> list[str]:
    """Every multistep method on ``grid`` (the base grid plus near-duplicate nodes).

    ODE methods: error <= 2 x max(DDIM's error on the grid, the method's own error on the
    base grid).  The second term is there because on coarse grids some configurations are
    less accurate than DDIM *without* any near-duplicate (e.g. UniP-2 bh1 without corrector
    on 12 log-SNR steps of sub-VP: 2.5x DDIM); the property is that a near-duplicate node
    never costs more than a factor 2 over the better of the two.

    SDE variants (eta = 1): the exact weak error (mean + covariance) against the
    first-order SDE-DPM-Solver++ on the same grid (same noise scaling, same family, so the
    injected noise is the same per step), again or the method's own weak error on the base
    grid.  Exact moments compare distributions without sampling noise, which is the fair
    measure for a weak-order method; a shared Brownian path would only compare single paths."""
    bad = []
    ref = max(ode_error(sde, grid, "ddim")[0], 1e-12)
    for method, opts in ODE_CONFIGS:
        err, _ = ode_error(sde, grid, method, **opts)
        if not err <= 2.0 * ref and not err <= 2.0 * (own := ode_error(sde, base, method, **opts)[0]):
            bad.append(f"{method}{opts}: {err:.3g} vs ddim {ref:.3g}, base {own:.3g}")
    ref = sde_error(sde, grid, SDEDPM1())
    for method in SDE_METHODS:
        err = sde_error(sde, grid, method)
        if not err <= 2.0 * ref and not err <= 2.0 * (own := sde_error(sde, base, method)):
            bad.append(f"{method}: {err:.3g} vs first order {ref:.3g}, base {own:.3g}")
    return bad


# ------------------------------------------------------------ the reported grids
GAP_GRID = [1.0, 0.5, 0.5 - 1e-6, 0.3, 1e-3]
GAP12_GRID = [1.0, 0.5, 0.5 - 1e-12, 0.3, 1e-3]
NO_GAP_GRID = [1.0, 0.5, 0.3, 1e-3]


@pytest.mark.parametrize("grid", [GAP_GRID, GAP12_GRID], ids=["gap1e-6", "gap1e-12"])
@pytest.mark.parametrize("method", ["unipc", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde", "deis", "ipndm"])
def test_near_duplicate_node_costs_little(method, grid):
    """VP, 4 coarse steps plus one 1e-6 / 1e-12 interval: the error stays within 2x the
    better of the first-order method on the grid and the same method without the extra node
    (it was 4e5 / 4e11 for UniPC, 3e2 / 3e5 for DPM-Solver++(2M) SDE)."""
    sde = make_sde("vp")
    if method.endswith("_sde"):
        err, own = sde_error(sde, grid, method), sde_error(sde, NO_GAP_GRID, method)
        ref = sde_error(sde, grid, SDEDPM1())
    else:
        err, own = ode_error(sde, grid, method)[0], ode_error(sde, NO_GAP_GRID, method)[0]
        ref = ode_error(sde, grid, "ddim")[0]
    assert math.isfinite(err) and err <= 2.0 * max(ref, own), (err, ref, own)


def test_realistic_grid_with_short_first_step():
    """[1, 0.999, 0.8, ..., 0.001] on VP: the short first step does not enter the extrapolation,
    the uneven last steps of the time-uniform tail run at lower order, and every method ends
    within 2x DDIM on the same grid (unipc gave 0.765 against DDIM's 0.203 without the rule)."""
    sde = make_sde("vp")
    grid = [1.0, 0.999] + torch.linspace(0.8, 0.001, 9, dtype=F64).tolist()
    ddim = ode_error(sde, grid, "ddim")[0]
    for method in ("unipc", "dpmpp_3m", "dpmpp_2m"):
        err, stats = ode_error(sde, grid, method)
        off = ode_error(sde, grid, method, min_gap_ratio=0.0)[0]
        assert err <= 2.0 * ddim and err <= off, (method, err, ddim, off)
        assert 1 in stats["order_lowered_at"] and stats["orders"][-1] == 1


# --------------------------------------------------------------------- every SDE family
@pytest.mark.parametrize("sde_name", SDE_NAMES)
def test_every_family_with_near_duplicates(sde_name):
    """12 log-SNR steps with near-duplicates at 1e-12, 1e-7 and 1e-3 of an interval."""
    sde = make_sde(sde_name)
    base = make_grid(sde, 12, "log_snr").t.tolist()
    grid = with_near_duplicates(base, [(0, 1e-12, True), (5, 1e-7, False), (9, 1e-3, True)])
    assert check_grid(sde, base, grid) == []


@st.composite
def grids(draw):
    """A jittered log-SNR grid of 8..12 steps (each step scaled by 0.5..1.5) and the same grid
    with 1..3 nodes inserted at relative gaps 1e-12..1e-2 of an interval."""
    sde_name = draw(st.sampled_from(SDE_NAMES))
    sde = make_sde(sde_name)
    n = draw(st.integers(8, 12))
    scale = draw(st.lists(st.floats(0.5, 1.5), min_size=n, max_size=n))
    lam_T, lam_0 = (0.5 * sde.log_snr(torch.tensor([sde.T, sde.default_t_end], dtype=F64))).tolist()
    cum = torch.cumsum(torch.tensor([0.0] + scale, dtype=F64), 0)
    lam = lam_T + (lam_0 - lam_T) * cum / cum[-1]
    base = sde.t_of_log_snr(2.0 * lam).tolist()
    base[0], base[-1] = sde.T, sde.default_t_end
    where = draw(st.lists(st.tuples(st.integers(0, n - 1), st.floats(-12.0, -2.0), st.booleans()),
                          min_size=1, max_size=3))
    grid = with_near_duplicates(base, [(j, 10.0 ** e, a) for j, e, a in where])
    return sde_name, base, grid


@given(grids())
def test_property_near_duplicates_never_blow_up(case):
    """Random strictly decreasing grids with near-duplicate nodes: every multistep method
    within 2x of its first-order reference (see :func:`check_grid`)."""
    sde_name, base, grid = case
    assert all(a > b for a, b in zip(grid, grid[1:]))
    assert check_grid(make_sde(sde_name), base, grid) == []


# -------------------------------------------------------------------------- stats, rule
def test_stats_report_the_lowered_steps():
    """One 1e-6 interval after the first step: step 2 (its history node 1e-6 away) runs at
    order 1, and so does step 3 (0.3 -> 1e-3: its last history gap is 0.21 of it in log-SNR,
    below 1/3); with the rule's bound lowered to 0.2 step 3 keeps order 2.  UniPC's corrector
    follows the same orders."""
    sde = make_sde("vp")
    for method in ("unipc", "dpmpp_3m", "dpmpp_3m_sde", "dpmpp_2m"):
        stats = ode_error(sde, GAP_GRID, method)[1]
        assert stats["orders"] == [1, 2, 1, 1] and stats["order_lowered_at"] == [2, 3], (method, stats)
        stats = ode_error(sde, GAP_GRID, method, min_gap_ratio=0.2)[1]
        lowered = [2] if method == "dpmpp_2m" else [2, 3]
        assert stats["orders"] == [1, 2, 1, 2] and stats["order_lowered_at"] == lowered, (method, stats)
    stats = ode_error(sde, GAP_GRID, "dpmpp_3m", warmup="singlestep")[1]
    assert stats["orders"] == [2, 2, 1, 1] and stats["order_lowered_at"] == [2, 3]


def test_rule_from_the_gap_ratio():
    """stable_orders keeps order k while every spanned gap h_{i-j} >= min_gap_ratio * h_i;
    a short current step is not lowered; a new subclass inherits the rule."""

    @dataclass
    class Adams4(ExponentialMultistep):
        order: ClassVar[int] = 4

    s = Adams4(lower_order_final=False)
    r = s.min_gap_ratio
    assert r == MIN_GAP_RATIO == solvers.get("dpmpp_3m_sde").min_gap_ratio
    h = [1.0, 1.0, 1.0, 1.0, 0.5 * r, 1.0, 1.0, 1.0]
    orders, lowered = s.stable_orders(s.orders_for(len(h)), h)
    assert orders == [1, 2, 3, 4, 4, 1, 2, 3] and lowered == [5, 6, 7]
    assert s.stable_orders([1, 2], [1.0, 1.0 / r])[0] == [1, 2]        # exactly at the bound: kept
    assert s.stable_orders([1, 2], [1.0, 1.01 / r])[0] == [1, 1]


@pytest.mark.parametrize("sde_name", SDE_NAMES)
def test_log_snr_grids_unchanged(sde_name):
    """A grid uniform in log-SNR (every step ratio 1) never triggers the rule, for 3..1000
    steps, and its samples are bitwise those of the rule switched off (min_gap_ratio = 0)."""
    sde = make_sde(sde_name)
    solver = solvers.get("unipc")
    for n in (3, 5, 6, 7, 8, 10, 15, 20, 50, 200, 1000):
        lam = 0.5 * sde.log_snr(make_grid(sde, n, "log_snr").t)
        assert solver.stable_orders(solver.orders_for(n), (lam[1:] - lam[:-1]).tolist())[1] == []
    x = TARGET.marginal(sde, sde.T).sample(4, generator=torch.Generator().manual_seed(2))
    model = TARGET.as_model(sde)
    for method in ("unipc", "dpmpp_3m", "dpmpp_2m_sde"):
        new, old = (solvers.sample(model, x, method, 5, schedule="log_snr", **opts, lower_order_final=False,
                                   generator=torch.Generator().manual_seed(0)) for opts in ({}, {"min_gap_ratio": 0.0}))
        assert new.stats["order_lowered_at"] == [] and torch.equal(new.x, old.x)


@pytest.mark.parametrize("sde_name", ["vp", "cosine", "rf", "discrete"])
def test_time_uniform_grids_stay_within_twice_ddim(sde_name):
    """Time-uniform grids of the VP-type families end with steps that are long in log-SNR
    against the ones before them: there the rule lowers the order, and the order-2 methods
    stay within 2x DDIM on the same grid (3..20 steps)."""
    sde = make_sde(sde_name)
    for n in (3, 5, 8, 10, 20):
        t = make_grid(sde, n, "uniform").t.tolist()
        ddim = ode_error(sde, t, "ddim")[0]
        for method, opts in (("dpmpp_2m", {}), ("unipc", {"order": 2, "variant": "bh2"})):
            err = ode_error(sde, t, method, **opts)[0]
            assert err <= 2.0 * ddim, (sde_name, n, method, err, ddim)


@pytest.mark.parametrize("value,exc", [(-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError),
                                       ("0.1", TypeError), (True, TypeError)])
def test_min_gap_ratio_is_checked(value, exc):
    with pytest.raises(exc, match="min_gap_ratio must"):
        solvers.get("unipc", min_gap_ratio=value)
