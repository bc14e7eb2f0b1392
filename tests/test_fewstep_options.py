"""Few-step options: DPM-Solver++(3M) with the paper's update (``formula="paper"``) and the
analytic first step (``analytic_first_step=True`` of ``solvers.sample``).

- ``formula="paper"`` reproduces diffusers' ``DPMSolverMultistepScheduler(solver_order=3)``
  (float32 sigma table there: agreement ~1e-7 relative), its weights equal the exact
  quadratic-interpolant weights with half the second-difference term, and its fitted order on
  the exact Gaussian flow is 2 (a local error h^3/12 x0'' is left by the halved term), while
  ``formula="adams"`` fits 3.
- the analytic first step replaces the first network evaluation at t_start = T by the exact
  prediction of N(0, I) data; the first eps is then off by O(alpha_T) (bound derived below).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import scoresde
import solvers
from solvers.dpm import midpoint_2m_weights, paper_3m_weights
from solvers.exponential import exp_moments, lagrange_weights

F64 = torch.float64


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _fit_order(ladder, errs) -> float:
    return float(-np.polyfit(np.log(ladder), np.log(errs), 1)[0])


def _gaussian_target() -> scoresde.Gaussian:
    """d=4, mean != 0, covariance eigenvalues 1e-2 .. 1, random rotation."""
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=F64))
    cov = (q * torch.logspace(-2, 0, 4, dtype=F64)) @ q.T
    return scoresde.Gaussian(torch.tensor([0.5, -1.0, 0.3, 2.0], dtype=F64), cov)


def _gaussian_problem(sde):
    target = _gaussian_target()
    x_T = target.marginal(sde, sde.T).sample(8, generator=torch.Generator().manual_seed(2))
    return target, target.as_model(sde), x_T


# ============================================================ 1. dpmpp_3m(formula="paper")
def test_paper_weights_are_the_diffusers_formula():
    """The weights on (m0, m1, m2) applied to random vectors give the diffusers expression
    term by term (float64, rate 1), on uneven steps."""
    h, h0, h1 = 0.7, 0.45, 1.1
    m0, m1, m2 = torch.randn(3, 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    r0, r1 = h0 / h, h1 / h
    d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    e = math.exp(-h)
    expected = -(e - 1.0) * m0 + ((e - 1.0) / h + 1.0) * d1 - ((e - 1.0 + h) / h ** 2 - 0.5) * d2
    w = paper_3m_weights([0.0, -h0, -h0 - h1], h)
    torch.testing.assert_close(w[0] * m0 + w[1] * m1 + w[2] * m2, expected, rtol=1e-13, atol=1e-14)
    # 2M midpoint warm-up: -(e^-h - 1)(m0 + (m0 - m1)/(2 r0))
    w2 = midpoint_2m_weights([0.0, -h0], h)
    torch.testing.assert_close(w2[0] * m0 + w2[1] * m1, -(e - 1.0) * (m0 + 0.5 * (m0 - m1) / r0),
                               rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("rate", [1.0, 2.0])
def test_paper_weights_halve_the_second_difference(rate):
    """paper = adams - J2/2 * (second divided difference weights): the relation the
    docstring states, for the ODE rate and an SDE-like rate."""
    h, nodes = 0.6, [0.0, -0.5, -1.3]
    adams = lagrange_weights(nodes, h, rate)
    j2 = exp_moments(h, 3, rate)[2]
    dd = [1.0 / math.prod(u - v for v in nodes if v != u) for u in nodes]
    expected = [a - 0.5 * j2 * d for a, d in zip(adams, dd)]
    assert paper_3m_weights(nodes, h, rate) == pytest.approx(expected, rel=1e-12, abs=1e-14)
    # both are exact for linear x0 (sum of weights J0, first moment J1): the same up to order 2
    j0, j1 = exp_moments(h, 2, rate)
    w = paper_3m_weights(nodes, h, rate)
    assert sum(w) == pytest.approx(j0, rel=1e-12)
    assert sum(wi * u for wi, u in zip(w, nodes)) == pytest.approx(j1, rel=1e-12)


def test_paper_weights_at_a_rate_are_the_kdiffusion_3m_sde_form():
    """With decay rate c the weights times c are k-diffusion's ``sample_dpmpp_3m_sde`` update
    (h_eta = c h): (1 - e^{-h_eta}) m0 + phi_2 D1 - phi_3 D2, phi_2 = expm1(-h_eta)/h_eta + 1,
    phi_3 = phi_2/h_eta - 1/2 (r0, r1 from the unscaled steps)."""
    h, h0, h1, c = 0.8, 0.6, 0.35, 1.7
    m0, m1, m2 = torch.randn(3, 5, dtype=F64, generator=torch.Generator().manual_seed(4))
    r0, r1 = h0 / h, h1 / h
    d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
    d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    h_eta = c * h
    phi_2 = math.expm1(-h_eta) / h_eta + 1.0
    phi_3 = phi_2 / h_eta - 0.5
    expected = -math.expm1(-h_eta) * m0 + phi_2 * d1 - phi_3 * d2
    w = [c * wi for wi in paper_3m_weights([0.0, -h0, -h0 - h1], h, c)]
    torch.testing.assert_close(w[0] * m0 + w[1] * m1 + w[2] * m2, expected, rtol=1e-13, atol=1e-14)


def test_formula_option_is_checked_and_changes_only_order_3_steps():
    with pytest.raises(ValueError, match="formula"):
        solvers.get("dpmpp_3m", formula="Paper")
    sde = scoresde.VPSDE()
    _, model, x_T = _gaussian_problem(sde)
    # the reference codes' orders (no few-step rule, which would lower these short grids)
    ref = dict(lower_order_final=False)
    a = solvers.sample(model, x_T, "dpmpp_3m", 2, formula="adams", **ref)
    p = solvers.sample(model, x_T, "dpmpp_3m", 2, formula="paper", **ref)
    m = solvers.sample(model, x_T, "dpmpp_2m", 2, **ref)
    # orders [1, 2]: paper = 2M midpoint, adams = exact linear interpolant (differs)
    torch.testing.assert_close(p.x, m.x, rtol=1e-14, atol=1e-14)
    assert _rel(a.x, p.x) > 1e-6
    a6 = solvers.sample(model, x_T, "dpmpp_3m", 6, formula="paper", **ref)
    assert a6.stats["orders"] == [1, 2, 3, 3, 3, 3] and a6.nfe == 6


def test_paper_formula_fits_order_two_adams_three():
    """On the exact Gaussian flow (VP, karras grid: no log-SNR superconvergence) the paper's
    update converges at order 2 -- the halved second-difference term leaves a local error
    h^3 x0''/12 -- and the exact-interpolant update at order 3."""
    sde = scoresde.VPSDE(beta_min=0.1, beta_max=20.0)
    target, model, x_T = _gaussian_problem(sde)
    exact = target.flow(x_T, sde.T, sde.default_t_end, sde)
    ladder = (48, 96, 192)
    fits = {}
    for formula in ("adams", "paper"):
        errs = [float((solvers.sample(model, x_T, "dpmpp_3m", n, schedule="karras", formula=formula,
                                      warmup="singlestep").x - exact).abs().max()) for n in ladder]
        assert min(errs) > 1e-10
        fits[formula] = _fit_order(ladder, errs)
    assert abs(fits["adams"] - 3.0) < 0.3, fits
    assert abs(fits["paper"] - 2.0) < 0.3, fits


# ============================================================ 2. the analytic first step
AFS_METHODS = [("dpmpp_2m", {}), ("unipc", {}), ("unipc", {"order": 3}), ("ipndm", {}), ("deis", {}),
               ("ddim", {}), ("heun", {}), ("dpmpp_3m", {"warmup": "singlestep"}), ("dpm_solver_3", {})]


@pytest.mark.parametrize("method, options", AFS_METHODS)
def test_analytic_first_step_saves_exactly_one_evaluation(method, options):
    sde = scoresde.VPSDE()
    _, model, x_T = _gaussian_problem(sde)
    plain = solvers.sample(model, x_T, method, 6, **options)
    afs = solvers.sample(model, x_T, method, 6, analytic_first_step=True, **options)
    assert afs.nfe == plain.nfe - 1
    assert afs.stats["analytic_first_step"] is True and "analytic_first_step" not in plain.stats
    assert afs.stats["orders"] == plain.stats["orders"]
    again = solvers.sample(model, x_T, method, 6, analytic_first_step=True, **options)
    assert torch.equal(again.x, afs.x)                              # deterministic
    assert 0.0 < float((afs.x - plain.x).abs().max()) < 0.5         # changed, but not wildly


def test_analytic_prediction_is_exact_for_standard_normal_data():
    """For N(0, I) data the analytic answer is the model's own, at any time: eps and x0."""
    from solvers.first_step import analytic_denoised
    sde = scoresde.VPSDE()
    model = scoresde.Gaussian(torch.zeros(3, dtype=F64), torch.eye(3, dtype=F64)).as_model(sde)
    x = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    for t in (1.0, 0.5, 0.01):
        t64 = torch.tensor(t, dtype=F64)
        d, ref = analytic_denoised(sde, x, t64), model.evaluate(x, t64)
        torch.testing.assert_close(d.eps, ref.eps, rtol=1e-12, atol=1e-14)
        # (the model's x0 = (x - sigma eps)/alpha loses digits where alpha is small)
        torch.testing.assert_close(d.x0, ref.x0, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(d.score, ref.score, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("t_start", [1.0, 0.9, 0.8])
def test_first_prediction_error_is_order_alpha(t_start):
    r"""Data N(mu, Sigma), eigenvalues l_k of Sigma, VP (alpha^2 + sigma^2 = 1): per sample

    eps* - eps_A = sigma [(a^2 Sigma + s^2)^{-1} - 1] x - a s (a^2 Sigma + s^2)^{-1} mu,

    the bracket's eigenvalues a^2 (1 - l_k)/(s^2 + a^2 l_k); so
    |eps* - eps_A| <= s (a^2 max|1 - l| |x| + a |mu|)/(s^2 + a^2 min l)  (upper, O(a)),
    and at x = 0 it is >= a s |mu|/(s^2 + a^2 max l)                    (lower: not o(a)).
    Checked through the sampler: one DDIM step moves by -sigma_1 expm1(h) eps, so the two
    samples differ by exactly that factor times eps* - eps_A."""
    sde = scoresde.VPSDE()
    target, model, _ = _gaussian_problem(sde)
    mu, lam = target.mean, torch.linalg.eigvalsh(target.cov)
    c = sde.coefficients(torch.tensor([t_start, 0.5], dtype=F64))
    a, s = float(c["alpha"][0]), float(c["sigma"][0])
    x = target.marginal(sde, t_start).sample(64, generator=torch.Generator().manual_seed(3))
    x = torch.cat([x, torch.zeros(1, 4, dtype=F64)])
    kw = dict(t_start=t_start, t_end=0.5)
    plain = solvers.sample(model, x, "ddim", 1, **kw)
    afs = solvers.sample(model, x, "ddim", 1, analytic_first_step=True, **kw)
    assert afs.nfe == 0
    lam_log = 0.5 * c["log_snr"]
    factor = -float(c["sigma"][1]) * math.expm1(float(lam_log[1] - lam_log[0]))
    err = ((plain.x - afs.x) / factor).norm(dim=1)
    upper = s * (a * a * float((1 - lam).abs().max()) * x.norm(dim=1) + a * float(mu.norm())) / (
        s * s + a * a * float(lam.min()))
    assert bool((err <= upper * (1 + 1e-9)).all())
    lower = a * s * float(mu.norm()) / (s * s + a * a * float(lam.max()))
    assert float(err[-1]) >= lower * (1 - 1e-9)
    assert lower > 0.5 * a * float(mu.norm())       # the error is of the size of alpha, not smaller


def test_sample_difference_shrinks_with_alpha_T():
    """The final sample with and without the analytic step differ less the smaller alpha(T)
    (VP with growing beta_max), for a first-order and a multistep method."""
    target = _gaussian_target()
    for method in ("ddim", "dpmpp_2m", "unipc"):
        diffs = []
        for beta_max in (10.0, 20.0, 30.0):                  # alpha_T 8e-2, 7e-3, 5e-4
            sde = scoresde.VPSDE(beta_min=0.1, beta_max=beta_max)
            model = target.as_model(sde)
            x_T = target.marginal(sde, sde.T).sample(8, generator=torch.Generator().manual_seed(2))
            a = solvers.sample(model, x_T, method, 8).x
            b = solvers.sample(model, x_T, method, 8, analytic_first_step=True).x
            diffs.append(float((a - b).abs().max()))
        assert diffs[0] > diffs[1] > diffs[2], (method, diffs)
        assert diffs[2] < 0.1 * diffs[0] and diffs[1] < 0.02, (method, diffs)


def test_analytic_first_step_bad_input():
    sde = scoresde.VPSDE()
    _, model, x_T = _gaussian_problem(sde)
    n0 = model.nfe
    with pytest.raises(TypeError, match="analytic_first_step"):
        solvers.sample(model, x_T, "dpmpp_2m", 4, analytic_first_step="yes")
    for method, opts in [("pf_ode", {}), ("adaptive_sde", {}), ("euler_maruyama", {}), ("ddim", {"eta": 1.0}),
                         ("dpmpp_2m_sde", {})]:
        with pytest.raises(ValueError, match="analytic_first_step"):
            solvers.sample(model, x_T, method, 4, analytic_first_step=True, **opts)
    assert model.nfe == n0                                       # refused before any network call


def test_first_evaluation_elsewhere_than_the_start_is_refused():
    from solvers.base import CheckedModel
    sde = scoresde.VPSDE()
    _, model, x_T = _gaussian_problem(sde)
    ev = CheckedModel(model, 1, True, analytic_start=torch.tensor(1.0, dtype=F64))
    with pytest.raises(ValueError, match="analytic_first_step"):
        ev.evaluate(x_T, torch.tensor(0.5, dtype=F64))


def test_trivial_call_reports_no_analytic_step():
    sde = scoresde.VPSDE()
    _, model, x_T = _gaussian_problem(sde)
    sol = solvers.sample(model, x_T, "dpmpp_2m", 3, t_end=sde.T, analytic_first_step=True)
    assert sol.nfe == 0 and sol.stats["analytic_first_step"] is False


# ------------------------------------------------------------ reproduction of diffusers
diffusers = pytest.importorskip("diffusers")
from diffusers import DPMSolverMultistepScheduler  # noqa: E402

from scoresde.integrations import diffusers as sd_diffusers  # noqa: E402


class GaussianEpsNet(torch.nn.Module):
    """The exact eps of per-coordinate N(mean, var) data under a discrete VP schedule, called
    like a diffusers UNet: ``net(x, timestep).sample`` (timestep k: alpha^2 = alphas_cumprod[k])."""

    def __init__(self, alphas_cumprod, mean=0.7, var=0.3):
        super().__init__()
        self.register_buffer("acp", alphas_cumprod.to(F64))
        self.mean, self.var = mean, var

    def forward(self, x, timestep):
        k = torch.as_tensor(timestep).round().long().reshape(-1)
        a2 = self.acp[k].reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        a, s = a2.sqrt(), (1.0 - a2).sqrt()
        return type("Out", (), {"sample": s * (x - a * self.mean) / (a2 * self.var + s * s)})()


def _diffusers_loop(net, scheduler, x_T):
    x = x_T.clone()
    with torch.no_grad():
        for k in scheduler.timesteps:
            x = scheduler.step(net(x, k).sample, k, x).prev_sample
    return x


DPM3_CASES = {   # name -> (scheduler options, steps, our lower_order_final)
    "sigma_min-lower": (dict(final_sigmas_type="sigma_min"), 8, True),
    "sigma_min-no-lower": (dict(final_sigmas_type="sigma_min", lower_order_final=False), 8, False),
    "sigma_min-20": (dict(final_sigmas_type="sigma_min"), 20, False),
    "zero-20": (dict(), 20, False),
    "zero-no-lower": (dict(lower_order_final=False), 8, False),
}


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize("name", sorted(DPM3_CASES))
def test_paper_formula_reproduces_diffusers_third_order(name):
    opts, steps, lower = DPM3_CASES[name]
    sch = DPMSolverMultistepScheduler(solver_order=3, **opts)
    sch.set_timesteps(steps)
    net = GaussianEpsNet(sch.alphas_cumprod)
    x_T = torch.randn(4, 2, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    theirs = _diffusers_loop(net, sch, x_T)
    model = sd_diffusers.from_diffusers(net, sch)
    times = sd_diffusers.timesteps_from(sch)
    final_denoise = "final_sigmas_type" not in opts
    kw = dict(timesteps=times, final_denoise=final_denoise, lower_order_final=lower, min_gap_ratio=0.0)
    ours = solvers.sample(model, x_T, "dpmpp_3m", formula="paper", **kw)
    assert _rel(ours.x, theirs) < 1e-6, _rel(ours.x, theirs)
    # teeth: the exact-interpolant weights differ from diffusers by far more than the tolerance
    adams = solvers.sample(model, x_T, "dpmpp_3m", formula="adams", **kw)
    assert _rel(adams.x, theirs) > 1e-5, _rel(adams.x, theirs)
