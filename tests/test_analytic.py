"""Exact Gaussian and Gaussian-mixture targets, the exact answers every
solver test compares against.

The references here are computed independently of scoresde.analytic: densities with
torch.distributions, posterior means with linalg.solve, scores by autograd.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from scoresde import DiscreteVPSDE, EDMSDE, Gaussian, GaussianMixture, VPSDE
from conftest import SDE_NAMES, interior_times, make_sde

F64 = torch.float64
D = 3


@dataclass
class Spec:
    """A target and its parameters as full float64 tensors (the independent reference)."""

    target: object
    weights: torch.Tensor   # [K]
    means: torch.Tensor     # [K, d]
    covs: torch.Tensor      # [K, d, d]


def _spd(g, k, d, jitter=0.2):
    A = torch.randn(k, d, d, generator=g, dtype=F64)
    return A @ A.transpose(-1, -2) / d + jitter * torch.eye(d, dtype=F64)


def _specs() -> dict[str, Spec]:
    g = torch.Generator().manual_seed(0)
    mean = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    eye = torch.eye(D, dtype=F64)
    full = _spd(g, 1, D)[0]
    diag = torch.tensor([0.3, 1.5, 0.8], dtype=F64)
    one = torch.ones(1, dtype=F64)
    mix_means = torch.tensor([[-2.0, 0.0, 1.0], [1.5, 1.0, -0.5], [0.0, -2.5, 0.5]], dtype=F64)
    mix_full = _spd(g, 3, D, jitter=0.1)
    mix_w = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    mix_diag = torch.tensor([[0.2, 0.9, 0.4], [1.1, 0.3, 0.6]], dtype=F64)
    mix_scalar = torch.tensor([0.25, 1.3], dtype=F64)
    w2 = torch.tensor([0.65, 0.35], dtype=F64)
    return {
        "gauss_full": Spec(Gaussian(mean, full), one, mean[None], full[None]),
        "gauss_diag": Spec(Gaussian(mean, diag), one, mean[None], torch.diag(diag)[None]),
        "gauss_scalar": Spec(Gaussian(mean, 0.7), one, mean[None], 0.7 * eye[None]),
        "mix_full": Spec(GaussianMixture(mix_w, mix_means, mix_full), mix_w, mix_means, mix_full),
        "mix_diag": Spec(GaussianMixture(w2, mix_means[:2], mix_diag), w2, mix_means[:2],
                         torch.diag_embed(mix_diag)),
        "mix_scalar": Spec(GaussianMixture(w2, mix_means[1:], mix_scalar), w2, mix_means[1:],
                           mix_scalar[:, None, None] * eye),
    }


SPECS = _specs()
GAUSS = [k for k in SPECS if k.startswith("gauss")]


def ref_log_prob(spec: Spec, x: torch.Tensor, a: float, s2: float) -> torch.Tensor:
    """log p_t(x) by torch.distributions: components N(a mu_k, a^2 C_k + s2 I)."""
    cov = a * a * spec.covs + s2 * torch.eye(spec.means.shape[1], dtype=F64)
    comp = torch.distributions.MultivariateNormal(a * spec.means, covariance_matrix=cov)
    lp = comp.log_prob(x[:, None, :]) + torch.log(spec.weights)
    return torch.logsumexp(lp, dim=1)


def ref_score(spec: Spec, x: torch.Tensor, a: float, s2: float) -> torch.Tensor:
    xx = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(ref_log_prob(spec, xx, a, s2).sum(), xx)
    return g


def _time(sde, u: float) -> float:
    """u in [0, 1] -> t in [t_end, T], log-uniform."""
    te, T = sde.default_t_end, sde.T
    return float(min(T, max(te, math.exp(math.log(te) + u * (math.log(T) - math.log(te))))))


def _a_s2(sde, t: float) -> tuple[float, float]:
    tt = torch.tensor(t, dtype=F64)
    return float(sde.alpha(tt)), float(sde.sigma(tt)) ** 2


def _points(spec: Spec, sde, t: float, z: torch.Tensor) -> torch.Tensor:
    """Points where p_t has its mass: a * (mixture mean) + (marginal scale) * z."""
    a, s2 = _a_s2(sde, t)
    m = (spec.weights[:, None] * spec.means).sum(0)
    scale = math.sqrt(a * a * float(torch.linalg.eigvalsh(spec.covs).max() + spec.means.abs().max() ** 2) + s2)
    return a * m + scale * z


def _max_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-300) -> float:
    """max |a - b| relative to max(max |b|, floor) (so a vanishing entry is not a relative
    blow-up)."""
    return float((a - b).abs().max() / max(float(b.abs().max()), floor))


def _score_unit(spec: Spec, sde, t: float) -> float:
    """The natural size of a score at time t: 1 / (smallest marginal standard deviation).
    Near a mixture's centre the score itself cancels to ~0; errors are measured on this scale."""
    a, s2 = _a_s2(sde, t)
    return 1.0 / math.sqrt(a * a * float(torch.linalg.eigvalsh(spec.covs).min()) + s2)


_z = arrays(np.float64, (4, D), elements=st.floats(-3.0, 3.0, allow_nan=False, allow_subnormal=False))


# --------------------------------------------------------------------------- score, densities
@given(u=st.floats(0.0, 1.0), z=_z)
def test_score_is_grad_of_marginal_log_prob(any_sde, u, z):
    sde = any_sde
    t = _time(sde, u)
    a, s2 = _a_s2(sde, t)
    z = torch.from_numpy(z)
    for name, spec in SPECS.items():
        x = _points(spec, sde, t, z)
        score = spec.target.score(x, t, sde)
        marg = spec.target.marginal(sde, t)
        assert type(marg) is type(spec.target)
        xx = x.clone().requires_grad_(True)
        lp = marg.log_prob(xx)
        (g,) = torch.autograd.grad(lp.sum(), xx)
        unit = _score_unit(spec, sde, t)
        assert _max_err(score, g, unit) <= 1e-12, name
        # the marginal's log-density against torch.distributions, and the score against its gradient
        ref = ref_log_prob(spec, x, a, s2)
        torch.testing.assert_close(lp.detach(), ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max()))
        assert _max_err(score, ref_score(spec, x, a, s2), unit) <= 1e-12, name
        torch.testing.assert_close(spec.target.marginal_log_prob(x, t, sde), lp.detach(), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name", list(SPECS))
def test_per_sample_times(name):
    spec = SPECS[name]
    sde = VPSDE()
    t = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=F64)
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(5), dtype=F64)
    s = spec.target.score(x, t, sde)
    lp = spec.target.marginal_log_prob(x, t, sde)
    for i in range(4):
        torch.testing.assert_close(s[i:i + 1], spec.target.score(x[i:i + 1], float(t[i]), sde), rtol=1e-14, atol=0.0)
        torch.testing.assert_close(lp[i:i + 1], spec.target.marginal(sde, float(t[i])).log_prob(x[i:i + 1]),
                                   rtol=1e-14, atol=0.0)


@pytest.mark.parametrize("name", list(SPECS))
def test_log_prob_matches_torch_distributions(name):
    spec = SPECS[name]
    x = torch.randn(50, D, generator=torch.Generator().manual_seed(1), dtype=F64) * 2.0
    torch.testing.assert_close(spec.target.log_prob(x), ref_log_prob(spec, x, 1.0, 0.0), rtol=1e-12, atol=1e-12)


def test_marginal_parameters():
    spec = SPECS["gauss_full"]
    sde = VPSDE()
    a, s2 = _a_s2(sde, 0.3)
    m = spec.target.marginal(sde, 0.3)
    torch.testing.assert_close(m.mean, a * spec.means[0], rtol=1e-15, atol=0.0)
    torch.testing.assert_close(m.cov, a * a * spec.covs[0] + s2 * torch.eye(D, dtype=F64), rtol=1e-13, atol=1e-15)
    mix = SPECS["mix_full"].target
    mm = mix.marginal(sde, 0.3)
    torch.testing.assert_close(mm.weights, mix.weights, rtol=1e-15, atol=0.0)


# --------------------------------------------------------------------------- Tweedie: eps, x0
@pytest.mark.parametrize("sde_name", SDE_NAMES)
def test_eps_x0_tweedie(sde_name):
    sde = make_sde(sde_name)
    g = torch.Generator().manual_seed(2)
    for name, spec in SPECS.items():
        for t in interior_times(sde, 6).tolist():
            a, s2 = _a_s2(sde, t)
            s = math.sqrt(s2)
            x = _points(spec, sde, t, torch.randn(5, D, generator=g, dtype=F64))
            score = spec.target.score(x, t, sde)
            eps, x0 = spec.target.eps(x, t, sde), spec.target.x0(x, t, sde)
            torch.testing.assert_close(eps, -s * score, rtol=1e-14, atol=0.0)
            torch.testing.assert_close(a * x0 + s * eps, x, rtol=1e-10, atol=1e-10 * float(x.abs().max()))
            # independent posterior mean: sum_k r_k(x) [mu_k + a C_k (a^2 C_k + s2 I)^{-1} (x - a mu_k)]
            cov = a * a * spec.covs + s2 * torch.eye(D, dtype=F64)                     # [K, d, d]
            diff = x[:, None, :] - a * spec.means[None]                                 # [B, K, d]
            sol = torch.linalg.solve(cov[None].expand(x.shape[0], -1, -1, -1), diff[..., None])[..., 0]
            post = spec.means[None] + a * torch.einsum("kij,bkj->bki", spec.covs, sol)
            comp = torch.distributions.MultivariateNormal(a * spec.means, covariance_matrix=cov)
            r = torch.softmax(comp.log_prob(x[:, None, :]) + torch.log(spec.weights), dim=1)
            x0_ref = (r[..., None] * post).sum(1)
            assert _max_err(x0, x0_ref) <= 1e-8, (name, t)


# --------------------------------------------------------------------------- sampling
def _check_moments(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, k: float = 5.0) -> None:
    """Sample mean and covariance within k standard errors (SE from the sample itself)."""
    n = x.shape[0]
    se_mean = torch.sqrt(torch.diagonal(cov) / n)
    assert bool(((x.mean(0) - mean).abs() <= k * se_mean).all()), (x.mean(0), mean)
    c = x - mean
    prod = c[:, :, None] * c[:, None, :]                        # [n, d, d], E = cov
    se_cov = prod.std(0) / math.sqrt(n)
    assert bool(((prod.mean(0) - cov).abs() <= k * se_cov).all()), (prod.mean(0), cov)


@pytest.mark.parametrize("name", list(SPECS))
def test_sample_moments_and_reproducibility(name):
    spec = SPECS[name]
    x = spec.target.sample(40000, generator=torch.Generator().manual_seed(10))
    assert x.shape == (40000, D) and x.dtype == F64
    w = spec.weights
    mean = (w[:, None] * spec.means).sum(0)
    second = (w[:, None, None] * (spec.covs + spec.means[:, :, None] * spec.means[:, None, :])).sum(0)
    _check_moments(x, mean, second - mean[:, None] * mean[None, :])
    a = spec.target.sample(7, generator=torch.Generator().manual_seed(3))
    b = spec.target.sample(7, generator=torch.Generator().manual_seed(3))
    c = spec.target.sample(7, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert spec.target.sample(0).shape == (0, D)
    assert spec.target.sample(3, dtype=torch.float32).dtype == torch.float32


def test_mixture_component_frequencies():
    """Well separated components: the fraction of samples near each mean is its weight."""
    means = torch.tensor([[-10.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=F64)
    w = torch.tensor([0.1, 0.3, 0.6], dtype=F64)
    mix = GaussianMixture(w, means, torch.tensor([0.5, 0.5, 0.5], dtype=F64))
    n = 30000
    x = mix.sample(n, generator=torch.Generator().manual_seed(0))
    k = torch.cdist(x, means).argmin(1)
    freq = torch.bincount(k, minlength=3).to(F64) / n
    assert bool(((freq - w).abs() <= 5 * torch.sqrt(w * (1 - w) / n)).all()), freq


def test_default_dtype_follows_mean():
    g32 = Gaussian(torch.zeros(2, dtype=torch.float32), 1.0)
    assert g32.sample(3).dtype == torch.float32 and g32.mean.dtype == torch.float32
    assert Gaussian(torch.zeros(2, dtype=F64), 1.0).sample(3).dtype == F64


# --------------------------------------------------------------------------- flow
def _flow_times(sde):
    te, T = sde.default_t_end, sde.T
    return [(T, te), (te, T), (0.9 * T, 0.05 * T), (0.2 * T, 0.6 * T)]


def _dflow_dt(tgt, x, s, t, sde):
    """(flow(x, s, t), d flow/d t_to) by autograd through per-sample times t [B]."""
    tt = t.clone().requires_grad_(True)
    y = tgt.flow(x, s, tt, sde)
    cols = [torch.autograd.grad(y[:, j].sum(), tt, retain_graph=True)[0] for j in range(y.shape[1])]
    return y.detach(), torch.stack(cols, dim=1)


@pytest.mark.parametrize("sde_name", SDE_NAMES)
@pytest.mark.parametrize("name", GAUSS)
def test_flow_satisfies_pf_ode(name, sde_name):
    """d/dt flow(x, s, t) = f(t) y - g(t)^2/2 * score_t(y) at y = flow(x, s, t): the time
    derivative by autograd, the PF drift from sde.pf_drift with the exact score."""
    spec, sde = SPECS[name], make_sde(sde_name)
    tgt = spec.target
    g = torch.Generator().manual_seed(7)
    t = interior_times(sde, 8)
    for s, _ in _flow_times(sde):
        x = _points(spec, sde, s, torch.randn(8, D, generator=g, dtype=F64))
        y, dy = _dflow_dt(tgt, x, s, t, sde)
        drift = sde.pf_drift(y, t, tgt.score(y, t, sde))
        for i in range(8):     # row by row: the scale of the drift varies a lot with t
            assert _max_err(dy[i], drift[i]) <= 1e-11, (name, sde_name, s, float(t[i]))


@pytest.mark.parametrize("sde_name", SDE_NAMES)
def test_flow_derivative_central_differences(sde_name):
    """The same PF-ODE identity without autograd: Richardson-extrapolated central
    differences in t_to at times where they are well conditioned (t >= 0.05 T)."""
    spec, sde = SPECS["gauss_full"], make_sde(sde_name)
    tgt = spec.target
    x = _points(spec, sde, sde.T, torch.randn(4, D, generator=torch.Generator().manual_seed(8), dtype=F64))
    for t in (0.05 * sde.T, 0.3 * sde.T, 0.9 * sde.T):
        h = 1e-3 * t
        if isinstance(sde, DiscreteVPSDE):          # stay inside one linear segment
            N = sde.num_steps
            t, h = (math.floor(t * N) + 0.5) / N, 0.2 / N
        d1 = (tgt.flow(x, sde.T, t + h, sde) - tgt.flow(x, sde.T, t - h, sde)) / (2 * h)
        d2 = (tgt.flow(x, sde.T, t + h / 2, sde) - tgt.flow(x, sde.T, t - h / 2, sde)) / h
        dy = (4 * d2 - d1) / 3
        y = tgt.flow(x, sde.T, t, sde)
        drift = sde.pf_drift(y, torch.full((4,), t, dtype=F64), tgt.score(y, t, sde))
        assert _max_err(dy, drift) <= 1e-7, (sde_name, t)


@pytest.mark.parametrize("sde_name", SDE_NAMES)
@pytest.mark.parametrize("name", GAUSS)
def test_flow_pushes_marginal_forward_and_inverts(name, sde_name):
    """The flow is affine, y = A x + b; it maps N(a_s mu, Sigma_s) exactly onto
    N(a_t mu, Sigma_t), and flow(flow(x, s, t), t, s) = x."""
    spec, sde = SPECS[name], make_sde(sde_name)
    tgt = spec.target
    eye = torch.eye(D, dtype=F64)
    for s, t in _flow_times(sde):
        b = tgt.flow(torch.zeros(1, D, dtype=F64), s, t, sde)[0]
        A = (tgt.flow(eye, s, t, sde) - b).T                       # columns: images of e_i
        a_s, s2_s = _a_s2(sde, s)
        a_t, s2_t = _a_s2(sde, t)
        mu, C = spec.means[0], spec.covs[0]
        torch.testing.assert_close(A @ (a_s * mu) + b, a_t * mu, rtol=1e-11, atol=1e-11 * (1 + abs(a_t)))
        cov_s = a_s ** 2 * C + s2_s * eye
        cov_t = a_t ** 2 * C + s2_t * eye
        torch.testing.assert_close(A @ cov_s @ A.T, cov_t, rtol=1e-10, atol=1e-12 * float(cov_t.abs().max()))
        x = _points(spec, sde, s, torch.randn(5, D, generator=torch.Generator().manual_seed(1), dtype=F64))
        back = tgt.flow(tgt.flow(x, s, t, sde), t, s, sde)
        torch.testing.assert_close(back, x, rtol=1e-12, atol=1e-12 * float(x.abs().max()))
        torch.testing.assert_close(tgt.flow(x, s, s, sde), x, rtol=0.0, atol=1e-14 * float(x.abs().max()))
    # per-sample times equal the row-by-row map
    ts = torch.linspace(sde.default_t_end, sde.T, 5, dtype=F64)
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(2), dtype=F64)
    y = tgt.flow(x, ts, ts.flip(0), sde)
    for i in range(5):
        torch.testing.assert_close(y[i:i + 1], tgt.flow(x[i:i + 1], float(ts[i]), float(ts.flip(0)[i]), sde),
                                   rtol=1e-14, atol=0.0)


def test_flow_moments_of_flowed_samples():
    """Monte-Carlo version of the push-forward: samples of p_T flowed to t_end have the
    moments of p_{t_end} (5 standard errors)."""
    spec = SPECS["gauss_full"]
    sde = VPSDE()
    a, s2 = _a_s2(sde, 1.0)
    n = 40000
    x0 = spec.target.sample(n, generator=torch.Generator().manual_seed(0))
    xT = a * x0 + math.sqrt(s2) * torch.randn(n, D, generator=torch.Generator().manual_seed(1), dtype=F64)
    y = spec.target.flow(xT, 1.0, 1e-3, sde)
    a1, s21 = _a_s2(sde, 1e-3)
    _check_moments(y, a1 * spec.means[0], a1 ** 2 * spec.covs[0] + s21 * torch.eye(D, dtype=F64))


@pytest.mark.parametrize("sde_name", SDE_NAMES)
def test_flow_of_point_mass_keeps_eps(sde_name):
    """Data = delta(mu): x_s = a_s mu + sigma_s z flows to a_t mu + sigma_t z (z is constant),
    and for an isotropic Gaussian (x_t - a_t mu)/std_t is constant along the flow."""
    sde = make_sde(sde_name)
    mu = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    z = torch.randn(4, D, generator=torch.Generator().manual_seed(3), dtype=F64)
    for c in (0.0, 0.7):
        tgt = Gaussian(mu, c)
        for s, t in _flow_times(sde):
            a_s, s2_s = _a_s2(sde, s)
            a_t, s2_t = _a_s2(sde, t)
            std_s, std_t = math.sqrt(a_s ** 2 * c + s2_s), math.sqrt(a_t ** 2 * c + s2_t)
            y = tgt.flow(a_s * mu + std_s * z, s, t, sde)
            ref = a_t * mu + std_t * z
            torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max()))


# --------------------------------------------------------------------------- scale and dtype
def test_high_dimensional_diagonal_mixture():
    """d = 3072 (CIFAR size), K = 4 diagonal components, B = 64: the score is finite and
    matches an independent per-dimension reference (cost O(B K d))."""
    g = torch.Generator().manual_seed(0)
    K, d, B = 4, 3072, 64
    means = torch.randn(K, d, generator=g, dtype=F64) * 0.5
    var = 0.05 + torch.rand(K, d, generator=g, dtype=F64)
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    mix = GaussianMixture(w, means, var)
    sde = VPSDE()
    t = 0.2
    a, s2 = _a_s2(sde, t)
    x = mix.marginal(sde, t).sample(B, generator=g)
    score = mix.score(x, t, sde)
    assert score.shape == (B, d) and bool(torch.isfinite(score).all())
    xx = x.clone().requires_grad_(True)
    comp = torch.distributions.Normal(a * means, torch.sqrt(a * a * var + s2)).log_prob(xx[:, None, :]).sum(-1)
    lp = torch.logsumexp(comp + torch.log(w), dim=1)
    (ref,) = torch.autograd.grad(lp.sum(), xx)
    assert _max_err(score, ref) <= 1e-10
    torch.testing.assert_close(mix.marginal_log_prob(x, t, sde), lp.detach(), rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("sde_name", SDE_NAMES)
def test_float32_inputs(sde_name):
    sde = make_sde(sde_name)
    eps32 = torch.finfo(torch.float32).eps
    for name, spec in SPECS.items():
        t = 0.3 * sde.T
        x = _points(spec, sde, t, torch.randn(8, D, generator=torch.Generator().manual_seed(4), dtype=F64))
        x32 = x.to(torch.float32)
        x64 = x32.to(F64)                       # the same point, so only output rounding differs
        for fn in (spec.target.score, spec.target.eps, spec.target.x0, spec.target.marginal_log_prob):
            out32 = fn(x32, t, sde)
            assert out32.dtype == torch.float32, (name, fn.__name__)
            out64 = fn(x64, t, sde)
            assert _max_err(out32.to(F64), out64) <= 4 * eps32, (name, fn.__name__)
        # a float32 time tensor gives the same (its value is exactly representable here)
        t32 = torch.full((8,), 0.25 * sde.T, dtype=torch.float32)
        torch.testing.assert_close(spec.target.score(x32, t32, sde).to(F64),
                                   spec.target.score(x64, t32.to(F64), sde), rtol=4 * eps32, atol=0.0)
        if name in GAUSS:
            y32 = spec.target.flow(x32, t, 0.1 * t, sde)
            assert y32.dtype == torch.float32
            assert _max_err(y32.to(F64), spec.target.flow(x64, t, 0.1 * t, sde)) <= 4 * eps32


def test_edm_sde_large_sigma():
    """EDM at sigma = 80: the mixture marginal is nearly N(0, 80^2 I); the score stays exact."""
    sde = EDMSDE()
    spec = SPECS["mix_full"]
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(0), dtype=F64) * 80
    a, s2 = _a_s2(sde, 80.0)
    assert _max_err(spec.target.score(x, 80.0, sde), ref_score(spec, x, a, s2)) <= 1e-10
