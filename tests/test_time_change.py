"""Integrating in half-log-SNR time lambda = log(alpha/sigma): ``solvers.time_change``.

The probability-flow ODE in lambda, dx/dlambda = (f dt/dlambda) x - sigma eps, has no jump at a
DiscreteVPSDE's knots when the model depends on t only through (alpha, sigma) (the exact Gaussian
model does), so an adaptive solve needs no knots: ~220 evaluations per sample instead of ~7000.
"""
from __future__ import annotations

import functools

import pytest
import torch

import scoresde
from solvers.adaptive import solve_per_sample
from solvers.time_change import LogSNRTime, default_time_variable

from _shared import OU

NAMES = ["vp", "subvp", "ve", "cosine", "edm", "rf", "discrete"]


class BisectedVP(scoresde.LinearSDE):
    """The linear VP schedule through the two required hooks only: the base class
    differentiates by autograd and inverts the log-SNR by bisection."""

    T = 1.0
    default_t_end = 1e-3

    def _log_alpha(self, t):
        return -0.25 * t * t * 19.9 - 0.05 * t

    def _log_sigma(self, t):
        return 0.5 * torch.log(-torch.expm1(2.0 * self._log_alpha(t)))


def sde_named(name):
    return BisectedVP() if name == "bisected" else scoresde.make_sde(name)


def gaussian() -> scoresde.Gaussian:
    return scoresde.Gaussian(torch.tensor([0.5, -1.0], dtype=torch.float64),
                             torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=torch.float64))


def x_T(b: int = 4) -> torch.Tensor:
    return torch.randn(b, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def pf_drift(model):
    """dx/dt = f x + g^2/(2 sigma) eps at per-sample float64 times t [B]."""
    sde = model.sde

    def drift(t64, x, idx=None):
        eps = model.eps(x, t64)
        f = sde.f_unchecked(t64)[:, None]
        c = (0.5 * sde.g2_unchecked(t64) / torch.exp(sde.log_sigma_unchecked(t64)))[:, None]
        return f * x + c * eps
    return drift


def solve_pf(sde, variable: str, tol: float, t_end: float):
    """PF ODE from T to t_end on the exact Gaussian model; (solution, exact flow)."""
    g, x = gaussian(), x_T()
    drift = pf_drift(g.as_model(sde, "eps"))
    if variable == "t":
        knots = sde.knots[(sde.knots > t_end) & (sde.knots < sde.T)]
        sol = solve_per_sample(drift, x, sde.T, t_end, rtol=tol, atol=tol, max_steps=100_000,
                               jump_t=knots if knots.numel() else None)
    else:
        change = LogSNRTime(sde, sde.T, t_end)
        sol = solve_per_sample(change.wrap(drift), x, change.s0, change.s1, rtol=tol, atol=tol,
                               max_steps=100_000)
    assert sol.status_names == ("success",) * x.shape[0]
    return sol, g.flow(x, sde.T, t_end, sde)


@functools.lru_cache(maxsize=None)
def solved(name: str, variable: str, tol: float):
    sde = scoresde.make_sde(name)
    return solve_pf(sde, variable, tol, sde.default_t_end)


# ------------------------------------------------------------------ the inverse
@pytest.mark.parametrize("name", NAMES + ["bisected"])
def test_log_snr_inverse_round_trips(name):
    """log_snr = 2 lambda, and t_of_log_snr inverts it to ~1e-15 near t_end and near T.

    VE is the exception in t near 0: sigma(0) = sigma_min > 0, so lambda(t) ~ 4.6 - 8.5 t and a
    rounding of lambda is an absolute error of ~1e-16 in t (3e-12 relative at t = 1e-5); the
    schedule at the recovered t is still exact to rounding (checked through the log-SNR)."""
    sde = sde_named(name)
    T = sde.T
    low = torch.linspace(0.002, 0.01, 40) if name == "edm" else T * torch.logspace(-5, -2, 40)
    t = torch.cat([low, T * (1 - torch.logspace(-6, -1, 40)), torch.tensor([T])]).to(torch.float64)
    ls = sde.log_snr_unchecked(t)
    lam = sde.log_alpha_unchecked(t) - sde.log_sigma_unchecked(t)
    assert torch.allclose(ls, 2.0 * lam, rtol=1e-15, atol=1e-15)
    back = sde.t_of_log_snr_unchecked(ls)
    rel = (back - t).abs() / t
    assert float(rel[40:].max()) < 1e-15
    if name == "ve":
        assert float((back - t).abs().max()) < 2e-16
        assert float(rel[:40].max()) > 1e-13          # the conditioning, not the inverse
    else:
        assert float(rel[:40].max()) < 5e-15
    # and the other way, up to the conditioning: a rounding of t moves the log-SNR by t |d log_snr/dt|
    slope = sde.g2_unchecked(t) / torch.exp(2.0 * sde.log_sigma_unchecked(t))
    again = sde.log_snr_unchecked(back)
    scale = ls.abs() + t * slope
    assert float(((again - ls).abs() / scale).max()) < 4e-16


def test_t_of_is_exact_at_the_ends_and_clamped():
    sde = scoresde.make_sde("discrete")
    change = LogSNRTime(sde, 1.0, 1e-3)
    assert change.s1 > change.s0                       # lambda increases towards the data
    s = torch.tensor([change.s0, change.s1, change.s0 - 1.0, change.s1 + 1.0,
                      0.5 * (change.s0 + change.s1)], dtype=torch.float64)
    t = change.t_of(s)
    assert t.dtype == torch.float64
    assert t[:4].tolist() == [1.0, 1e-3, 1.0, 1e-3]
    lam_mid = sde.log_alpha_unchecked(t[4:]) - sde.log_sigma_unchecked(t[4:])
    assert float((lam_mid - s[4:]).abs()) < 1e-14
    assert change.t_of(torch.tensor(change.s1, dtype=torch.float32)).item() == pytest.approx(1e-3, rel=1e-6)
    # interior end points: the inverse alone misses about half of them by an ulp or two
    ends = torch.rand(40, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).tolist()
    for t_from, t_to in ends:
        inner = LogSNRTime(sde, t_from, t_to)
        assert inner.t_of(torch.tensor([inner.s0, inner.s1], dtype=torch.float64)).tolist() == [t_from, t_to]
    # one ulp inside the ends (where a step onto the end evaluates): the inverse alone leaves the
    # interval by rounding for 2 of these 400 values, the clamp keeps them in
    pairs = torch.rand(200, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for t_from, t_to in pairs.tolist():
        inner = LogSNRTime(sde, t_from, t_to)
        ends = torch.tensor([inner.s0, inner.s1], dtype=torch.float64)
        t = inner.t_of(torch.nextafter(ends, ends.flip(0)))
        assert bool(((t >= inner.t_lo) & (t <= inner.t_hi)).all())


def test_rate_is_dt_dlambda():
    """rate = -2 sigma^2/g^2 against a central difference of lambda(t), and = sigma^2/f for VP."""
    for sde in (scoresde.VPSDE(), scoresde.SubVPSDE(), scoresde.EDMSDE(), scoresde.RectifiedFlowSDE()):
        change = LogSNRTime(sde, sde.T, sde.default_t_end)
        t = torch.tensor([0.01, 0.3, 0.7], dtype=torch.float64) * sde.T
        h = 1e-6 * sde.T
        dlam = 0.5 * (sde.log_snr_unchecked(t + h) - sde.log_snr_unchecked(t - h)) / (2 * h)
        assert torch.allclose(change.rate(t), 1.0 / dlam, rtol=1e-7)
    vp = scoresde.VPSDE()
    t = torch.tensor([0.01, 0.5], dtype=torch.float64)
    sigma2 = torch.exp(2 * vp.log_sigma_unchecked(t))
    assert torch.allclose(LogSNRTime(vp, 1.0, 1e-3).rate(t), sigma2 / vp.f_unchecked(t), rtol=1e-14)


def test_wrap_scales_tensors_and_tuples():
    sde = scoresde.VPSDE()
    change = LogSNRTime(sde, 1.0, 1e-3)
    s = torch.tensor([0.0, 2.0], dtype=torch.float64)
    y = torch.ones(2, 3, dtype=torch.float32)

    def rhs(t, y, *extra):
        return (y * 2.0, t.to(y.dtype)) if extra else y * 2.0

    rate = change.rate(change.t_of(s))
    assert torch.allclose(change.wrap(rhs)(s, y), 2.0 * rate.float()[:, None])
    dx, dt = change.wrap(rhs)(s, y, "tuple")
    assert dx.dtype == torch.float32 and torch.allclose(dt, (change.t_of(s) * rate).float())
    scalar = change.wrap(rhs)(torch.tensor(1.0, dtype=torch.float64), y)   # odeint's scalar time
    assert scalar.shape == y.shape


def test_bad_arguments():
    vp = scoresde.VPSDE()
    with pytest.raises(TypeError, match="LinearSDE"):
        LogSNRTime(OU(), 1.0, 1e-3)
    with pytest.raises(ValueError, match="differ"):
        LogSNRTime(vp, 0.5, 0.5)
    with pytest.raises(ValueError, match="outside"):
        LogSNRTime(vp, 1.5, 1e-3)
    with pytest.raises(ValueError, match="finite"):
        LogSNRTime(vp, 1.0, 0.0)                        # sigma(0) = 0
    with pytest.raises(TypeError, match="t_to"):
        LogSNRTime(vp, 1.0, "small")
    with pytest.raises(TypeError, match="SDE"):
        default_time_variable("vp")


def test_default_time_variable():
    assert default_time_variable(scoresde.make_sde("discrete")) == "log_snr"
    for name in ("vp", "subvp", "ve", "cosine", "edm", "rf"):
        assert default_time_variable(scoresde.make_sde(name)) == "t"
    assert default_time_variable(OU()) == "t"
    assert default_time_variable(scoresde.DiscreteVPSDE(betas=[0.5])) == "t"   # N = 1: no knots
    assert default_time_variable(scoresde.DiscreteVPSDE(betas=[0.1, 0.5])) == "log_snr"   # one knot


# ------------------------------------------------------------------ the PF ODE in lambda
@pytest.mark.parametrize("name", ["vp", "discrete"])
def test_pf_ode_in_lambda_matches_t(name):
    lam, exact = solved(name, "lam", 1e-8)
    t, _ = solved(name, "t", 1e-8)
    assert float((lam.y - t.y).abs().max()) < 1e-7
    assert float((lam.y - exact).abs().max()) < 1e-7


def test_discrete_in_lambda_needs_no_knots():
    """DDPM's 1000 steps at rtol=atol=1e-8: in lambda within 2x of the continuous VP's t-solve
    (about 1.6x measured), 30x fewer evaluations than stepping onto the 998 knots in t."""
    disc_lam, exact = solved("discrete", "lam", 1e-8)
    vp_t, _ = solved("vp", "t", 1e-8)
    disc_t, _ = solved("discrete", "t", 1e-8)
    nfe = {k: float(v.evaluations.double().mean()) for k, v in
           (("disc_lam", disc_lam), ("vp_t", vp_t), ("disc_t", disc_t))}
    assert nfe["disc_lam"] <= 2.0 * nfe["vp_t"], nfe
    assert float((disc_lam.y - exact).abs().max()) <= 1e-6
    assert nfe["disc_t"] >= 7 * 998 and 20 * nfe["disc_lam"] < nfe["disc_t"], nfe


def test_pf_ode_in_lambda_converges_with_the_tolerance():
    sde = scoresde.make_sde("discrete")
    errs = []
    for tol in (1e-4, 1e-6, 1e-8):
        sol, exact = solve_pf(sde, "lam", tol, sde.default_t_end)
        errs.append(float((sol.y - exact).abs().max()))
    assert errs[0] > 10 * errs[1] > 100 * errs[2], errs
    assert errs[2] < 1e-7


# ------------------------------------------------------------------ the likelihood in lambda
@pytest.mark.parametrize("name", ["vp", "discrete"])
def test_likelihood_divergence_in_lambda(name):
    """[x, delta] with d delta/d lambda = div(dx/dt) dt/d lambda from t_end to T gives
    log p_t_end(x) - log p_T(z) of the closed form to 1e-7."""
    sde, g = scoresde.make_sde(name), gaussian()
    drift = pf_drift(g.as_model(sde, "eps"))
    t_end = sde.default_t_end
    x0 = g.sample(3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def rhs(t64, state, idx=None):
        with torch.enable_grad():
            x = state[:, :2].detach().requires_grad_(True)
            v = drift(t64, x)
            div = sum(torch.autograd.grad(v[:, i].sum(), x, retain_graph=i == 0)[0][:, i] for i in range(2))
        return torch.cat([v.detach(), div.detach()[:, None]], dim=1)

    change = LogSNRTime(sde, t_end, sde.T)
    state0 = torch.cat([x0, torch.zeros(3, 1, dtype=torch.float64)], dim=1)
    sol = solve_per_sample(change.wrap(rhs), state0, change.s0, change.s1, rtol=1e-10, atol=1e-10)
    assert sol.status_names == ("success",) * 3
    z, delta = sol.y[:, :2], sol.y[:, 2]
    assert float((z - g.flow(x0, t_end, sde.T, sde)).abs().max()) < 1e-8
    exact = g.marginal_log_prob(x0, t_end, sde) - g.marginal_log_prob(z, sde.T, sde)
    assert float((delta - exact).abs().max()) < 1e-7
    assert float(sol.evaluations.double().mean()) < 1000       # no knots: 998 of them would cost ~7000


def test_likelihood_in_lambda_with_odeint_tuple_state():
    """torchdiffeq's form (scalar time, tuple state [x, delta]), as log_likelihood integrates it."""
    from torchdiffeq import odeint

    sde, g = scoresde.make_sde("discrete"), gaussian()
    model = g.as_model(sde, "eps")
    t_end = sde.default_t_end
    x0 = g.sample(2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cov = g.cov

    def rhs(t64, state):
        x, _ = state
        t = t64.expand(x.shape[0])
        drift = pf_drift(model)(t, x)
        # exact divergence of the Gaussian's flow: f d + g^2/2 tr((a^2 C + s^2 I)^-1)
        a2 = torch.exp(2 * sde.log_alpha_unchecked(t64))
        s2 = torch.exp(2 * sde.log_sigma_unchecked(t64))
        div = sde.f_unchecked(t64) * 2 + 0.5 * sde.g2_unchecked(t64) * torch.trace(
            torch.linalg.inv(a2 * cov + s2 * torch.eye(2, dtype=torch.float64)))
        return drift, div.expand(x.shape[0])

    change = LogSNRTime(sde, t_end, sde.T)
    span = torch.tensor([change.s0, change.s1], dtype=torch.float64)
    xs, ds = odeint(change.wrap(rhs), (x0, torch.zeros(2, dtype=torch.float64)), span, rtol=1e-10, atol=1e-10)
    z, delta = xs[-1], ds[-1]
    exact = g.marginal_log_prob(x0, t_end, sde) - g.marginal_log_prob(z, sde.T, sde)
    assert float((z - g.flow(x0, t_end, sde.T, sde)).abs().max()) < 1e-8
    assert float((delta - exact).abs().max()) < 1e-7
