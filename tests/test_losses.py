"""scoresde.losses: denoising score matching proven against the analytic minimum.

For Gaussian data N(mu, C) (eigenvalues l_k) and x_t = alpha x0 + sigma eps, the best
possible prediction of eps from x_t is E[eps | x_t], with residual covariance
I - sigma^2 (alpha^2 C + sigma^2 I)^-1, so the minimum squared eps error at time t is

    m_eps(t) = sum_k alpha^2 l_k / (alpha^2 l_k + sigma^2),

and in the other target spaces m_x0 = m_eps sigma^2/alpha^2, m_score = m_eps/sigma^2,
m_v = m_eps (alpha^2 + sigma^2)/alpha^2.  The minimum of each loss is the integral of
w(t) m(t) over [t_min, T], computed here by quadrature on a fine log-t grid with the
weights written out independently of the library.  The exact model of the Gaussian
(``Gaussian.as_model``, any prediction type) must reach it (Monte Carlo within 5 standard
errors); perturbed models must do worse (paired draws, a significant excess); the importance-sampled likelihood weighting must have the same
expectation as uniform sampling with a much smaller variance.
"""
from __future__ import annotations

import math

import pytest
import torch

import scoresde
from conftest import make_sde
from scoresde.losses import TIME_SAMPLINGS, WEIGHTINGS, DSMLoss, dsm_loss

F64 = torch.float64
PREDICTIONS = ("eps", "x0", "v", "score", "edm", "flow")
MEAN = torch.tensor([1.0, -0.5], dtype=F64)
COV = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=F64)


def target() -> scoresde.Gaussian:
    return scoresde.Gaussian(MEAN, COV)


def _phi_cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def analytic_minimum(weighting: str, sde, gamma=5.0, p_mean=-1.2, p_std=1.2, sigma_data=0.5,
                     n_grid=40001) -> float:
    """Integral over [t_min, T] of w(t) m_space(t), reduced as the loss reduces (module docstring)."""
    t_min, T = sde.default_t_end, sde.T
    u = torch.linspace(math.log(t_min), math.log(T), n_grid, dtype=F64)
    t = torch.exp(u)
    a, s = sde.alpha(t), sde.sigma(t)
    lam = torch.linalg.eigvalsh(COV)
    v = a[:, None] ** 2 * lam[None]
    m_eps = (v / (v + s[:, None] ** 2)).sum(1)
    d = 2
    L = T - t_min
    if weighting == "eps":
        w, m = 1.0 / L, m_eps
    elif weighting == "sigma2":
        w, m = s ** 2 / L, m_eps / s ** 2
    elif weighting == "likelihood":
        w, m = 0.5 * sde.g2(t), m_eps / s ** 2
    elif weighting == "snr":
        w, m = 1.0 / L, m_eps * s ** 2 / a ** 2
    elif weighting == "min_snr":
        w, m = torch.clamp(a ** 2 / s ** 2, max=gamma) / L, m_eps * s ** 2 / a ** 2
    elif weighting == "v":
        w, m = 1.0 / L, m_eps * (a ** 2 + s ** 2) / a ** 2
    else:  # edm: lambda(s_hat) times the truncated log-normal density of log s_hat, pushed to t
        sh = s / a
        ls = torch.log(sh)
        lo, hi = float(ls[0]), float(ls[-1])
        Z = _phi_cdf((hi - p_mean) / p_std) - _phi_cdf((lo - p_mean) / p_std)
        dens_ls = torch.exp(-0.5 * ((ls - p_mean) / p_std) ** 2) / (p_std * math.sqrt(2 * math.pi) * Z)
        dls_du = torch.gradient(ls, spacing=(u,))[0]
        lam_edm = (sh ** 2 + sigma_data ** 2) / (sh * sigma_data) ** 2
        integrand_u = lam_edm * dens_ls * dls_du * m_eps * s ** 2 / a ** 2
        return float(torch.trapezoid(integrand_u, u)) / d
    integrand_u = w * m * t                   # dt = t du
    total = float(torch.trapezoid(integrand_u, u))
    return total if weighting == "likelihood" else total / d


def mc(loss: DSMLoss, model, n: int, seed: int) -> torch.Tensor:
    x0 = target().sample(n, generator=torch.Generator().manual_seed(seed))
    return loss.per_sample(model, x0, torch.Generator().manual_seed(seed + 1)).detach()


def _assert_close_to_minimum(vals: torch.Tensor, expected: float, label: str) -> None:
    se = float(vals.std() / math.sqrt(vals.numel()))
    z = (float(vals.mean()) - expected) / se
    assert abs(z) < 5.0, f"{label}: MC mean {float(vals.mean()):.6g} vs analytic {expected:.6g} ({z:+.2f} SE)"


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_exact_model_attains_analytic_minimum_vp(weighting, prediction):
    sde = make_sde("vp")
    model = target().as_model(sde, prediction)
    vals = mc(DSMLoss(weighting=weighting), model, 3000, seed=10)
    _assert_close_to_minimum(vals, analytic_minimum(weighting, sde), f"{weighting}/{prediction}")


@pytest.mark.parametrize("sde_name", ["ve", "edm", "rf", "cosine"])
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_exact_model_attains_analytic_minimum_other_sdes(sde_name, weighting):
    sde = make_sde(sde_name)
    model = target().as_model(sde, "eps")
    vals = mc(DSMLoss(weighting=weighting), model, 3000, seed=20)
    _assert_close_to_minimum(vals, analytic_minimum(weighting, sde), f"{sde_name}/{weighting}")


def _perturbed(model: scoresde.ScoreModel, scale: float, shift: float) -> scoresde.ScoreModel:
    base = model.net

    def net(x, t):
        return base(x, t) * scale + shift

    return scoresde.ScoreModel(net, model.sde, model.prediction, sigma_data=model.sigma_data,
                               time_input=model.time_input)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_perturbed_models_do_worse(weighting, prediction):
    """Paired draws (same x0, t, eps): the excess loss of a perturbed model (its raw output
    shifted, or scaled, in its own prediction space) is positive and significant (> 3 standard
    errors of the paired difference).  Its expectation is the weighted squared perturbation:
    the cross term has mean zero because the exact model is the conditional mean of the
    target in every target space."""
    sde = make_sde("vp")
    exact = target().as_model(sde, prediction)
    loss = DSMLoss(weighting=weighting)
    x0 = target().sample(2000, generator=torch.Generator().manual_seed(3))
    for scale, shift in ((1.0, 1.0), (1.3, 0.0)):
        pert = _perturbed(exact, scale, shift)
        a = loss.per_sample(exact, x0, torch.Generator().manual_seed(4)).detach()
        b = loss.per_sample(pert, x0, torch.Generator().manual_seed(4)).detach()
        diff = b - a
        se = float(diff.std() / math.sqrt(diff.numel()))
        assert float(diff.mean()) > 3 * se, f"{weighting}/{prediction} ({scale}, {shift}): no significant excess"


def test_importance_sampling_same_expectation_lower_variance():
    """Song et al. 2021: t with density proportional to g^2/sigma^2 (uniform log-SNR) for the
    likelihood weighting -- the same objective, a constant weight, a far smaller variance."""
    sde = make_sde("vp")
    model = target().as_model(sde, "eps")
    expected = analytic_minimum("likelihood", sde)
    plain = mc(DSMLoss(weighting="likelihood", time_sampling="uniform"), model, 20000, seed=30)
    importance = mc(DSMLoss(weighting="likelihood"), model, 20000, seed=30)
    assert DSMLoss(weighting="likelihood").sampling == "log_snr"
    _assert_close_to_minimum(plain, expected, "likelihood/uniform")
    _assert_close_to_minimum(importance, expected, "likelihood/importance")
    assert float(importance.var()) < 0.2 * float(plain.var()), (float(importance.var()), float(plain.var()))
    # and the importance weight itself is the constant (lambda(t_min) - lambda(T)) / 2
    loss = DSMLoss(weighting="likelihood")
    t = loss.sample_time(sde, 100, torch.Generator().manual_seed(0))
    ratio = loss.weight(sde, t) / loss.density(sde, t) / sde.sigma(t) ** 2
    lam = sde.log_snr(torch.tensor([sde.default_t_end, sde.T], dtype=F64))
    torch.testing.assert_close(ratio, torch.full_like(ratio, 0.5 * float(lam[0] - lam[1])), rtol=1e-10, atol=0)


@pytest.mark.parametrize("sampling", TIME_SAMPLINGS)
@pytest.mark.parametrize("sde_name", ["vp", "ve", "edm"])
def test_time_sampler_density(sampling, sde_name):
    """q(t) integrates to 1 on [t_min, T] and the sampler's empirical CDF follows it."""
    sde = make_sde(sde_name)
    loss = DSMLoss(time_sampling=sampling)
    u = torch.linspace(math.log(sde.default_t_end), math.log(sde.T), 40001, dtype=F64)
    t = torch.exp(u)
    q = loss.density(sde, t)
    assert abs(float(torch.trapezoid(q * t, u)) - 1.0) < 1e-5
    draws = loss.sample_time(sde, 20000, torch.Generator().manual_seed(5))
    assert float(draws.min()) >= sde.default_t_end and float(draws.max()) <= sde.T
    cdf = torch.cumulative_trapezoid(q * t, u)
    for qq in (0.1, 0.5, 0.9):
        k = int(torch.searchsorted(cdf, torch.tensor(qq, dtype=F64)))
        emp = float((draws <= t[k + 1]).double().mean())
        assert abs(emp - qq) < 0.015, (sampling, qq, emp)


def test_equivalent_weightings_agree():
    """sigma^2-weighted score matching is the eps-MSE; SNR weighting is the x0-MSE;
    the v-loss is the eps-MSE weighted by 1 + 1/SNR (same draws, float64)."""
    sde = make_sde("vp")
    model = _perturbed(target().as_model(sde, "eps"), 1.1, 0.05)
    x0 = target().sample(500, generator=torch.Generator().manual_seed(6))
    t = DSMLoss().sample_time(sde, 500, torch.Generator().manual_seed(7))
    eps = torch.randn(500, 2, generator=torch.Generator().manual_seed(8), dtype=F64)
    per = {w: DSMLoss(weighting=w, time_sampling="uniform").per_sample(model, x0, t=t, noise=eps).detach()
           for w in WEIGHTINGS}
    torch.testing.assert_close(per["sigma2"], per["eps"], rtol=1e-9, atol=1e-12)
    snr = sde.alpha(t) ** 2 / sde.sigma(t) ** 2
    torch.testing.assert_close(per["snr"], per["eps"] / snr, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(per["v"], per["eps"] * (1 + 1 / snr), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(per["min_snr"], per["eps"] * torch.clamp(snr, max=5.0) / snr, rtol=1e-8, atol=1e-12)


def test_loss_trains_a_network():
    """Gradients reach the parameters and a few Adam steps lower the loss (float32 MLP)."""
    torch.manual_seed(0)
    sde = make_sde("vp")
    net = scoresde.MLPScoreNet(2, hidden=32, depth=1)
    model = scoresde.ScoreModel(net, sde, "eps")
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    x_fixed = target().sample(1024, generator=torch.Generator().manual_seed(1)).float()
    loss_fn = DSMLoss(weighting="eps")
    before = float(loss_fn(model, x_fixed, torch.Generator().manual_seed(2)).detach())
    for _ in range(150):
        loss = loss_fn(model, target().sample(256, generator=g).float(), g)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in net.parameters())
        opt.step()
    after = float(loss_fn(model, x_fixed, torch.Generator().manual_seed(2)).detach())
    assert after < 0.8 * before


def test_dsm_loss_function_and_determinism():
    sde = make_sde("vp")
    model = target().as_model(sde, "v")
    x0 = target().sample(64, generator=torch.Generator().manual_seed(0))
    a = dsm_loss(model, x0, "min_snr", generator=torch.Generator().manual_seed(1), gamma=2.0)
    b = DSMLoss(weighting="min_snr", gamma=2.0)(model, x0, torch.Generator().manual_seed(1))
    assert a.ndim == 0 and torch.equal(a, b)


def test_bad_input():
    sde = make_sde("vp")
    model = target().as_model(sde, "eps")
    x0 = target().sample(4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="weighting"):
        DSMLoss(weighting="elbo")
    with pytest.raises(ValueError, match="time_sampling"):
        DSMLoss(time_sampling="beta")
    with pytest.raises(ValueError, match="gamma"):
        DSMLoss(weighting="min_snr", gamma=-1.0)
    with pytest.raises(ValueError, match="dim_reduction"):
        DSMLoss(dim_reduction="max")
    with pytest.raises(ValueError, match="t_min"):
        DSMLoss(t_min=2.0).per_sample(model, x0)
    with pytest.raises(ValueError, match="t must lie"):
        DSMLoss().per_sample(model, x0, t=torch.full((4,), 1e-6, dtype=F64))
    with pytest.raises(ValueError, match="noise"):
        DSMLoss().per_sample(model, x0, noise=torch.zeros(3, 2, dtype=F64))
    with pytest.raises(TypeError, match="floating"):
        DSMLoss().per_sample(model, x0.long())
    with pytest.raises(TypeError, match="ScoreModel"):
        DSMLoss().per_sample(lambda x, t: x, x0)

    class Plain(scoresde.SDE):
        def drift(self, x, t):
            return -x

        def diffusion(self, t):
            return torch.ones_like(t)

    general = scoresde.ScoreModel(lambda x, t: -x, Plain(), "score")
    with pytest.raises(TypeError, match="LinearSDE"):
        DSMLoss().per_sample(general, x0)
