"""Knots of a piecewise schedule: ``DiscreteVPSDE.knots`` and the adaptive solvers stepping onto them.

A DDPM schedule of N steps has log-linear alpha^2 between the knots k/N, so the drift of the
probability-flow ODE jumps at every knot.  Without the knots an adaptive solver shrinks its step
at each jump and its error stalls far above the tolerance; with them (torchdiffeq's ``jump_t``)
each segment is smooth and one step per segment reaches the exact flow.  By default
(``time_variable="auto"``) the adaptive solvers integrate such a schedule in half-log-SNR time
instead, where the flow is smooth and no knot is needed: NFE within 2x of the continuous VP's.
"""
from __future__ import annotations

import pytest
import torch

import scoresde
import solvers
import solvers.likelihood as likelihood_module


def gaussian() -> scoresde.Gaussian:
    return scoresde.Gaussian(torch.tensor([0.5, -1.0], dtype=torch.float64),
                             torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=torch.float64))


def x_T(b: int = 2) -> torch.Tensor:
    return torch.randn(b, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def discrete(n: int) -> scoresde.DiscreteVPSDE:
    """DDPM's linear betas stretched to n steps (same beta_min/beta_max over the chain)."""
    return scoresde.DiscreteVPSDE(betas=torch.linspace(0.1 / n, 20.0 / n, n, dtype=torch.float64))


# ------------------------------------------------------------------ the knots
def test_discrete_knots_are_the_interior_steps():
    sde = scoresde.make_sde("discrete")
    knots = sde.knots
    assert knots.dtype == torch.float64 and knots.shape == (999,)
    assert torch.equal(knots, torch.arange(1, 1000, dtype=torch.float64) / 1000)
    knots[0] = 0.5      # a copy: the schedule is unchanged
    assert float(sde.knots[0]) == 1e-3


@pytest.mark.parametrize("name", ["vp", "subvp", "cosine", "ve", "edm"])
def test_continuous_sde_has_no_knots(name):
    knots = scoresde.make_sde(name).knots
    assert knots.dtype == torch.float64 and knots.numel() == 0


def test_discrete_segments_split_exactly_at_the_knots():
    """f at a knot is the segment above's, one ulp below it the segment below's (the side an
    integrator evaluates after stepping down onto a knot), for every knot."""
    sde = scoresde.make_sde("discrete")
    knots = sde.knots
    mid = torch.cat([knots[:1] / 2, (knots[1:] + knots[:-1]) / 2, (knots[-1:] + 1) / 2])
    f_mid = sde.f(mid)
    below = torch.nextafter(knots, torch.zeros_like(knots))
    assert torch.equal(sde.f(knots), f_mid[1:])
    assert torch.equal(sde.f(below), f_mid[:-1])
    assert bool((f_mid[1:] != f_mid[:-1]).all())     # the drift really jumps at each knot


# ------------------------------------------------------------------ pf_ode
def test_pf_ode_discrete_steps_onto_knots_and_matches_exact_flow():
    """DDPM's 1000-step schedule at rtol=atol=1e-8: one dopri5 step per segment (998 knots in
    (1/N, 1)), exact to rounding.  Without the knots the error stalls near 3e-4 with ~8e3 NFE."""
    sde, g, x = scoresde.make_sde("discrete"), gaussian(), x_T()
    sol = solvers.sample(g.as_model(sde, "eps"), x, "pf_ode", rtol=1e-8, atol=1e-8, time_variable="t")
    exact = g.flow(x, sde.T, sde.default_t_end, sde)
    assert float((sol.x - exact).abs().max()) < 1e-10
    assert sol.stats["knots"] == 998 and sol.stats["time_variable"] == "t"
    segments = sol.stats["knots"] + 1
    assert sol.stats["accepted_steps"] >= segments
    # dopri5: 6 evaluations per step + 1 re-evaluation past each knot
    assert sol.nfe <= 7 * segments + 60


def test_pf_ode_uses_only_knots_inside_the_interval():
    sde, g, x = discrete(100), gaussian(), x_T()
    sol = solvers.sample(g.as_model(sde, "eps"), x, "pf_ode", t_start=0.655, t_end=0.3, rtol=1e-8, atol=1e-8,
                         time_variable="t")
    assert sol.stats["knots"] == 35                      # 0.31, ..., 0.65
    assert float((sol.x - g.flow(x, 0.655, 0.3, sde)).abs().max()) < 1e-10


def test_pf_ode_knots_leave_fixed_grid_and_smooth_sde_alone():
    g, x = gaussian(), x_T()
    rk4 = solvers.sample(g.as_model(discrete(100), "eps"), x, "pf_ode", 10, ode_method="rk4")
    assert "knots" not in rk4.stats and rk4.nfe == 40
    vp = solvers.sample(g.as_model(scoresde.VPSDE(), "eps"), x, "pf_ode", rtol=1e-8, atol=1e-8)
    assert "knots" not in vp.stats


# ------------------------------------------------------------------ likelihood
def test_log_likelihood_discrete_steps_onto_knots(monkeypatch):
    """A 50-step schedule at rtol=atol=1e-6: with the knots the change in log-density is good to
    ~1e-9 in ~350 evaluations; without them the error stalls near 1e-3 after ~2000."""
    sde, g = discrete(50), gaussian()
    model = g.as_model(sde, "eps")
    x0 = g.sample(2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t_end = sde.default_t_end
    z = g.flow(x0, t_end, sde.T, sde)
    exact = g.marginal_log_prob(x0, t_end, sde) - g.marginal_log_prob(z, sde.T, sde)

    def run():
        return solvers.log_likelihood(model, x0, rtol=1e-6, atol=1e-6, t_end=t_end, time_variable="t")

    with_knots = run()
    monkeypatch.setattr(likelihood_module, "knots_inside", lambda *a: torch.empty(0))
    without = run()
    assert float((with_knots.delta_log_prob - exact).abs().max()) < 1e-8
    assert float((without.delta_log_prob - exact).abs().max()) > 1e-5
    assert 2 * with_knots.stats["evaluations"] < without.stats["evaluations"]


# ------------------------------------------------------------------ log-SNR time: the knots cost nothing
@pytest.mark.parametrize("t_end", [1e-3, 1e-5])
def test_pf_ode_discrete_in_log_snr_time_costs_within_2x_of_continuous_vp(t_end):
    """DDPM's 1000-step schedule at rtol = atol = 1e-8, by default in half-log-SNR time: within
    2x the NFE of the continuous VP (measured 222 vs 138 per sample at t_end = 1e-3), against
    ~7000 stepping onto every knot in t, and within the tolerance of the exact flow."""
    g, x = gaussian(), x_T(4)
    out = {}
    for name in ("discrete", "vp"):
        sde = scoresde.make_sde(name)
        sol = solvers.sample(g.as_model(sde, "eps"), x, "pf_ode", rtol=1e-8, atol=1e-8, t_end=t_end)
        exact = g.flow(x, sde.T, t_end, sde)
        assert float((sol.x - exact).abs().max()) < 1e-7, name
        out[name] = sol
    assert out["discrete"].stats["time_variable"] == "log_snr" and "knots" not in out["discrete"].stats
    assert out["vp"].stats["time_variable"] == "t"
    assert out["discrete"].nfe <= 2 * out["vp"].nfe


def test_log_likelihood_discrete_in_log_snr_time():
    """The augmented ODE in log-SNR time (d delta / d lambda = div(dx/d lambda)), 1000 knots,
    rtol = atol = 1e-8: the change in log-density to 1e-7 of the closed form, NFE within 2x the
    continuous VP's."""
    g = gaussian()
    x0 = g.sample(3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    evals = {}
    for name in ("discrete", "vp"):
        sde = scoresde.make_sde(name)
        t_end = sde.default_t_end
        exact = g.marginal_log_prob(x0, t_end, sde) - g.marginal_log_prob(g.flow(x0, t_end, sde.T, sde), sde.T, sde)
        res = solvers.log_likelihood(g.as_model(sde, "eps"), x0, rtol=1e-8, atol=1e-8)
        assert float((res.delta_log_prob - exact).abs().max()) < 1e-7, name
        evals[name] = res.stats["evaluations"]
    assert evals["discrete"] <= 2 * evals["vp"], evals
