"""Properties of the forward processes, checked over random times and parameters.

Everything in float64 with tight tolerances unless a test is about float32.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import scoresde
from scoresde import (
    CosineVPSDE,
    DiscreteVPSDE,
    EDMSDE,
    LinearSDE,
    RectifiedFlowSDE,
    SubVPSDE,
    VESDE,
    VPSDE,
)
from conftest import SDE_NAMES, interior_times, make_sde

F64 = torch.float64


def _floats(lo, hi, **kw):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False, **kw)


def _autograd(fn, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn(t), d fn/dt) elementwise by autograd; a constant fn has derivative 0."""
    tt = t.detach().clone().requires_grad_(True)
    y = fn(tt)
    if not y.requires_grad:
        return y.detach(), torch.zeros_like(t)
    (d,) = torch.autograd.grad(y.sum(), tt)
    return y.detach(), d


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp(min=1e-300)).max())


# --------------------------------------------------------------------------- f, g^2
def test_f_and_g2_match_alpha_sigma_by_autograd(any_sde):
    """f = d log alpha/dt and g^2 = d sigma^2/dt - 2 f sigma^2, with the derivatives taken
    by autograd through the float64 hooks ``_log_alpha``/``_log_sigma`` (the public
    schedule detaches t), not through the closed forms of f and g^2."""
    sde = any_sde
    t = interior_times(sde, 400)
    log_alpha, dlog_alpha = _autograd(sde._log_alpha, t)
    sigma2, dsigma2 = _autograd(lambda s: torch.exp(2.0 * sde._log_sigma(s)), t)
    f, g2 = sde.f(t), sde.g2(t)
    assert f.dtype == F64 and g2.dtype == F64
    torch.testing.assert_close(f, dlog_alpha, rtol=1e-12, atol=1e-300)
    g2_ref = dsigma2 - 2.0 * dlog_alpha * sigma2
    torch.testing.assert_close(g2, g2_ref, rtol=1e-10, atol=0.0)
    assert bool((g2 > 0).all())
    torch.testing.assert_close(sde.diffusion(t), torch.sqrt(g2), rtol=1e-15, atol=0.0)


def test_f_and_g2_match_central_differences(any_sde):
    """The same identities against central finite differences (h = 1e-6 T, float64), so
    the check does not depend on autograd of the implementation."""
    sde = any_sde
    t = interior_times(sde, 200)
    h = 1e-6 * sde.T
    if isinstance(sde, DiscreteVPSDE):
        h = 1e-3 / sde.num_steps                 # stay inside the segment (t = (k + 0.37)/N)
    t = t[(t - h > 0) & (t + h < sde.T)]
    tp, tm = t + h, t - h
    dlog_alpha = (torch.log(sde.alpha(tp)) - torch.log(sde.alpha(tm))) / (2 * h)
    dsigma2 = (sde.sigma(tp) ** 2 - sde.sigma(tm) ** 2) / (2 * h)
    f, g2 = sde.f(t), sde.g2(t)
    torch.testing.assert_close(f, dlog_alpha, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g2, dsigma2 - 2.0 * f * sde.sigma(t) ** 2, rtol=1e-6, atol=0.0)


def test_drift_is_f_times_x(any_sde):
    sde = any_sde
    t = interior_times(sde, 6)
    x = torch.randn(6, 2, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.testing.assert_close(sde.drift(x, t), sde.f(t)[:, None, None] * x, rtol=1e-15, atol=0.0)


# --------------------------------------------------------------------------- log-SNR
def test_log_snr_strictly_decreasing_and_monotone_schedules(any_sde):
    sde = any_sde
    t = torch.linspace(sde.default_t_end, sde.T, 5001, dtype=F64)
    lam = sde.log_snr(t)
    assert bool(torch.isfinite(lam).all())
    assert bool((lam[1:] < lam[:-1]).all())
    sig, alp = sde.sigma(t), sde.alpha(t)
    assert bool((sig[1:] > sig[:-1]).all())
    assert bool((alp[1:] <= alp[:-1]).all())
    torch.testing.assert_close(lam, torch.log(alp ** 2 / sig ** 2), rtol=1e-12, atol=1e-12)


def test_log_snr_round_trip_default_parameters(any_sde):
    sde = any_sde
    t = torch.cat([interior_times(sde, 300), torch.linspace(sde.default_t_end, sde.T, 301, dtype=F64)])
    back = sde.t_of_log_snr(sde.log_snr(t))
    assert back.dtype == F64
    torch.testing.assert_close(back, t, rtol=1e-10, atol=0.0)


@pytest.mark.parametrize("sde", [
    VPSDE(0.01, 30.0), VPSDE(1.0, 1.0), SubVPSDE(0.01, 30.0), SubVPSDE(1.0, 30.0),
    CosineVPSDE(s=0.0, T=0.999), CosineVPSDE(s=0.1, T=0.9), RectifiedFlowSDE(T=0.9999),
    EDMSDE(1e-3, 200.0), DiscreteVPSDE(betas=torch.linspace(1e-5, 0.05, 10, dtype=F64)),
    VESDE(1e-3, 1e3), VESDE(0.5, 2.0),
], ids=lambda s: type(s).__name__)
def test_round_trip_precision_at_the_extremes(sde):
    """The closed-form inverses are accurate to a few ulp (measured <= 2e-15) on a dense
    log grid from max(1e-4, t_end) to T.  VE is limited by its log-SNR itself, which
    holds t only to eps * |log sigma_min| / (t log(sigma_max/sigma_min)) (4e-13 at 1e-4)."""
    lo = max(1e-4, sde.default_t_end)
    t = torch.logspace(math.log10(lo), math.log10(sde.T), 20001, dtype=F64).clamp(lo, sde.T)
    back = sde.t_of_log_snr(sde.log_snr(t))
    torch.testing.assert_close(back, t, rtol=1e-12 if isinstance(sde, VESDE) else 1e-14, atol=0.0)


_ts = st.lists(_floats(0.0, 1.0), min_size=1, max_size=8)


def _times(fracs, lo, hi):
    """Map fractions in [0, 1] to [lo, hi], log-uniformly (so small t is well covered)."""
    u = torch.tensor(fracs, dtype=F64)
    return torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))).clamp(lo, hi)


@given(beta_min=_floats(0.01, 1.0), beta_max=_floats(1.0, 30.0), fracs=_ts, sub=st.booleans())
@example(beta_min=0.1, beta_max=20.0, fracs=[0.0, 1.0], sub=False)
@example(beta_min=1.0, beta_max=1.0, fracs=[0.0, 0.5, 1.0], sub=True)
def test_round_trip_vp_family(beta_min, beta_max, fracs, sub):
    sde = (SubVPSDE if sub else VPSDE)(beta_min=beta_min, beta_max=beta_max)
    t = _times(fracs, 1e-4, 1.0)
    torch.testing.assert_close(sde.t_of_log_snr(sde.log_snr(t)), t, rtol=1e-10, atol=0.0)


@given(sigma_min=_floats(1e-3, 1.0), sigma_max=_floats(2.0, 1e3), fracs=_ts)
@example(sigma_min=0.01, sigma_max=50.0, fracs=[0.0, 1.0])
def test_round_trip_ve(sigma_min, sigma_max, fracs):
    sde = VESDE(sigma_min=sigma_min, sigma_max=sigma_max)
    t = _times(fracs, sde.default_t_end, 1.0)
    torch.testing.assert_close(sde.t_of_log_snr(sde.log_snr(t)), t, rtol=1e-10, atol=0.0)


@given(sigma_min=_floats(1e-3, 0.1), sigma_max=_floats(1.0, 200.0), fracs=_ts)
@example(sigma_min=0.002, sigma_max=80.0, fracs=[0.0, 1.0])
def test_round_trip_edm(sigma_min, sigma_max, fracs):
    sde = EDMSDE(sigma_min=sigma_min, sigma_max=sigma_max)
    t = _times(fracs, sigma_min, sigma_max)
    torch.testing.assert_close(sde.t_of_log_snr(sde.log_snr(t)), t, rtol=1e-10, atol=0.0)


@given(s=_floats(0.0, 0.1), T=_floats(0.9, 0.999), fracs=_ts)
@example(s=0.008, T=0.9946, fracs=[0.0, 1.0])
@example(s=0.0, T=0.999, fracs=[0.0, 0.3, 1.0])
def test_round_trip_cosine(s, T, fracs):
    sde = CosineVPSDE(s=s, T=T)
    t = _times(fracs, 1e-4, T)
    torch.testing.assert_close(sde.t_of_log_snr(sde.log_snr(t)), t, rtol=1e-10, atol=0.0)


@given(T=_floats(0.9, 0.9999), fracs=_ts)
@example(T=0.999, fracs=[0.0, 1.0])
def test_round_trip_rectified_flow(T, fracs):
    sde = RectifiedFlowSDE(T=T)
    t = _times(fracs, 1e-4, T)
    torch.testing.assert_close(sde.t_of_log_snr(sde.log_snr(t)), t, rtol=1e-10, atol=0.0)


@given(b0=_floats(1e-5, 1e-3), b1=_floats(5e-3, 5e-2), n=st.integers(10, 2000), fracs=_ts)
@example(b0=1e-4, b1=0.02, n=1000, fracs=[0.0, 1.0])
def test_round_trip_discrete(b0, b1, n, fracs):
    sde = DiscreteVPSDE(betas=torch.linspace(b0, b1, n, dtype=F64))
    t = _times(fracs, 1.0 / n, 1.0)
    knots = torch.arange(1, n + 1, dtype=F64) / n
    t = torch.cat([t, knots[:: max(1, n // 7)]])          # knots themselves too
    torch.testing.assert_close(sde.t_of_log_snr(sde.log_snr(t)), t, rtol=1e-10, atol=0.0)


def test_round_trip_float32_vp():
    """float32 in, float32 out, within a few ulp (<= 2.4e-7 with expm1)."""
    sde = VPSDE()
    t = torch.cat([torch.logspace(-4, -1, 200), torch.linspace(0.1, 1.0, 200)]).to(torch.float32)
    lam = sde.log_snr(t)
    assert lam.dtype == torch.float32
    back = sde.t_of_log_snr(lam)
    assert back.dtype == torch.float32
    torch.testing.assert_close(back, t, rtol=4 * torch.finfo(torch.float32).eps, atol=0.0)


# --------------------------------------------------------------------------- identities
def test_identities_of_each_schedule(any_sde):
    sde = any_sde
    t = interior_times(sde, 300)
    a, s = sde.alpha(t), sde.sigma(t)
    if isinstance(sde, SubVPSDE):                      # before VPSDE: it is a subclass
        torch.testing.assert_close(s, -torch.expm1(2.0 * sde.log_alpha(t)), rtol=1e-14, atol=0.0)
        torch.testing.assert_close(s, 1.0 - a ** 2, rtol=1e-11, atol=0.0)   # naive form: cancellation
        vp = VPSDE(beta_min=sde.beta_min, beta_max=sde.beta_max)
        torch.testing.assert_close(a, vp.alpha(t), rtol=1e-15, atol=0.0)
        beta = sde.beta_min + t * (sde.beta_max - sde.beta_min)
        torch.testing.assert_close(sde.g2(t), beta * (1.0 - a ** 4), rtol=1e-12, atol=0.0)
    elif isinstance(sde, (VPSDE, CosineVPSDE, DiscreteVPSDE)):
        torch.testing.assert_close(a ** 2 + s ** 2, torch.ones_like(t), rtol=0.0, atol=4e-16)
        torch.testing.assert_close(sde.g2(t), -2.0 * sde.f(t), rtol=1e-15, atol=0.0)
        if isinstance(sde, VPSDE):
            beta = sde.beta_min + t * (sde.beta_max - sde.beta_min)
            torch.testing.assert_close(sde.g2(t), beta, rtol=1e-15, atol=0.0)
            log_a = -0.25 * t ** 2 * (sde.beta_max - sde.beta_min) - 0.5 * t * sde.beta_min
            torch.testing.assert_close(a, torch.exp(log_a), rtol=1e-15, atol=0.0)
        if isinstance(sde, CosineVPSDE):
            f = lambda u: torch.cos((u + sde.s) / (1 + sde.s) * math.pi / 2) ** 2  # noqa: E731
            torch.testing.assert_close(a ** 2, f(t) / f(torch.zeros_like(t)), rtol=1e-12, atol=1e-15)
    elif isinstance(sde, VESDE):
        torch.testing.assert_close(a, torch.ones_like(t), rtol=0.0, atol=0.0)
        torch.testing.assert_close(s, sde.sigma_min * (sde.sigma_max / sde.sigma_min) ** t, rtol=1e-13, atol=0.0)
        torch.testing.assert_close(sde.sigma(torch.tensor(1.0, dtype=F64)), torch.tensor(sde.sigma_max, dtype=F64),
                                   rtol=1e-14, atol=0.0)
    elif isinstance(sde, EDMSDE):
        torch.testing.assert_close(a, torch.ones_like(t), rtol=0.0, atol=0.0)
        torch.testing.assert_close(s, t, rtol=1e-15, atol=0.0)
        assert sde.T == sde.sigma_max and sde.default_t_end == sde.sigma_min
    elif isinstance(sde, RectifiedFlowSDE):
        torch.testing.assert_close(a, 1.0 - t, rtol=1e-15, atol=0.0)
        torch.testing.assert_close(s, t, rtol=1e-15, atol=0.0)
        torch.testing.assert_close(sde.g2(t), 2 * t / (1 - t), rtol=1e-14, atol=0.0)
    else:  # pragma: no cover
        raise AssertionError(type(sde))


def test_sigma_float32_small_t_vp():
    """sigma(t) for float32 t in [1e-7, 1e-3] is within 1e-6 relative of float64 at the same
    t (the naive sqrt(1 - exp(2 log alpha)) is 100% off at 1e-7)."""
    for sde in (VPSDE(), CosineVPSDE(), SubVPSDE()):
        t32 = torch.logspace(-7, -3, 400, dtype=torch.float32)
        s32 = sde.sigma(t32)
        assert s32.dtype == torch.float32
        s64 = sde.sigma(t32.to(F64))
        assert bool((s32 > 0).all())
        assert _rel_err(s32.to(F64), s64) <= 1e-6
    # and the float64 value against an independent series: sigma^2 = 1 - alpha^2 ~ beta_min t
    sde = VPSDE()
    t = torch.logspace(-7, -5, 50, dtype=F64)
    c = 0.25 * t ** 2 * (sde.beta_max - sde.beta_min) + 0.5 * t * sde.beta_min  # -log alpha
    s_ref = torch.sqrt(2 * c - 2 * c ** 2 + (4.0 / 3.0) * c ** 3)              # 1 - e^{-2c}, 3 terms
    assert _rel_err(sde.sigma(t), s_ref) <= 1e-12


# --------------------------------------------------------------------------- prior
def test_prior_log_prob_is_the_density_of_prior_sample(any_sde):
    sde = any_sde
    g = torch.Generator().manual_seed(1)
    z = sde.prior_sample((20000, 3), generator=g, dtype=F64)
    assert z.shape == (20000, 3) and z.dtype == F64
    std = sde.prior_std
    assert std == (sde.sigma_max if isinstance(sde, (VESDE, EDMSDE)) else 1.0)
    ref = torch.distributions.Normal(torch.zeros((), dtype=F64), torch.tensor(std, dtype=F64))
    torch.testing.assert_close(sde.prior_log_prob(z), ref.log_prob(z).sum(1), rtol=1e-13, atol=0.0)
    # the sample's law: mean 0 (5 standard errors), variance std^2 (5 standard errors)
    n = z.shape[0]
    assert bool((z.mean(0).abs() <= 5 * std / math.sqrt(n)).all())
    assert bool(((z.var(0) - std ** 2).abs() <= 5 * std ** 2 * math.sqrt(2.0 / (n - 1))).all())
    # image-shaped input: a log-density per sample
    zi = sde.prior_sample((4, 2, 3, 3), generator=g, dtype=F64)
    torch.testing.assert_close(sde.prior_log_prob(zi), ref.log_prob(zi).flatten(1).sum(1), rtol=1e-13, atol=0.0)


def test_prior_sample_reproducible_dtype_device():
    sde = VESDE()
    a = sde.prior_sample((5, 2), generator=torch.Generator().manual_seed(3), dtype=F64)
    b = sde.prior_sample((5, 2), generator=torch.Generator().manual_seed(3), dtype=F64)
    c = sde.prior_sample((5, 2), generator=torch.Generator().manual_seed(4), dtype=F64)
    assert torch.equal(a, b) and not torch.equal(a, c)
    z32 = sde.prior_sample((5, 2), dtype=torch.float32)
    assert z32.dtype == torch.float32 and z32.device.type == "cpu"
    assert sde.prior_sample((5, 2)).dtype == torch.get_default_dtype()
    assert sde.prior_log_prob(z32).dtype == torch.float32


# --------------------------------------------------------------------------- dtype / device
@pytest.mark.parametrize("name", SDE_NAMES)
def test_dtype_preserved(name):
    sde = make_sde(name)
    tm = 0.5 * (sde.default_t_end + sde.T)
    for dtype in (torch.float32, F64):
        t = torch.full((3,), tm, dtype=dtype)
        for fn in (sde.alpha, sde.sigma, sde.log_alpha, sde.log_sigma, sde.log_snr, sde.f, sde.g2,
                   sde.diffusion):
            out = fn(t)
            assert out.dtype == dtype and out.shape == (3,) and out.device == t.device
        lam = sde.log_snr(t)
        assert sde.t_of_log_snr(lam).dtype == dtype
        x = torch.ones(3, 2, dtype=dtype)
        assert sde.drift(x, t).dtype == dtype
        mean, std = sde.marginal(x, tm)
        assert mean.dtype == dtype and std.dtype == dtype and std.shape == (3, 1)
    # Python float (and 0-d) time -> default dtype, 0-d
    out = sde.sigma(tm)
    assert out.dtype == torch.get_default_dtype() and out.ndim == 0
    assert sde.sigma(torch.tensor(tm, dtype=F64)).ndim == 0
    # float32 results agree with float64 ones to float32 precision
    t32 = torch.linspace(sde.default_t_end, sde.T, 50, dtype=torch.float32)
    t32 = t32[t32.to(F64) <= sde.T]          # float32(T) may round above T (accepted in float32 only)
    t64 = t32.to(F64)
    for fn in (sde.alpha, sde.sigma, sde.log_snr, sde.g2):
        torch.testing.assert_close(fn(t32).to(F64), fn(t64), rtol=2 * torch.finfo(torch.float32).eps, atol=0.0)


def test_marginal_values(any_sde):
    sde = any_sde
    t = interior_times(sde, 5)
    x0 = torch.randn(5, 3, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    mean, std = sde.marginal(x0, t)
    torch.testing.assert_close(mean, sde.alpha(t)[:, None, None] * x0, rtol=0.0, atol=0.0)
    torch.testing.assert_close(std, sde.sigma(t)[:, None, None], rtol=0.0, atol=0.0)


# --------------------------------------------------------------------------- DiscreteVPSDE
def test_discrete_from_continuous_vp_reproduces_it_at_the_grid():
    vp = VPSDE(beta_min=0.1, beta_max=20.0)
    N = 1000
    tn = torch.arange(1, N + 1, dtype=F64) / N
    ac = vp.alpha(tn) ** 2
    disc = DiscreteVPSDE(alphas_cumprod=ac)
    assert disc.num_steps == N and disc.T == 1.0 and disc.default_t_end == 1.0 / N
    torch.testing.assert_close(disc.alpha(tn), vp.alpha(tn), rtol=1e-14, atol=0.0)
    torch.testing.assert_close(disc.sigma(tn), vp.sigma(tn), rtol=1e-12, atol=0.0)
    torch.testing.assert_close(disc.log_snr(tn), vp.log_snr(tn), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(disc.t_of_log_snr(vp.log_snr(tn)), tn, rtol=1e-10, atol=0.0)
    torch.testing.assert_close(vp.t_of_log_snr(disc.log_snr(tn)), tn, rtol=1e-10, atol=0.0)
    # the same schedule given as betas
    betas = torch.cat([1.0 - ac[:1], 1.0 - ac[1:] / ac[:-1]])
    disc_b = DiscreteVPSDE(betas=betas)
    torch.testing.assert_close(disc_b.alpha(tn), disc.alpha(tn), rtol=1e-12, atol=0.0)
    torch.testing.assert_close(disc_b.alphas_cumprod, ac, rtol=1e-12, atol=0.0)
    # between the knots: linear interpolation of log alpha, so the error is at most
    # max|d^2 log alpha/dt^2| h^2 / 8 = (beta_max - beta_min)/2 * h^2 / 8
    tm = (torch.arange(0, N, dtype=F64) + 0.5) / N
    tm = tm[tm > 1.0 / N]
    err = (torch.log(disc.alpha(tm)) - torch.log(vp.alpha(tm))).abs().max()
    assert float(err) <= (19.9 / 2) / N ** 2 / 8 * (1 + 1e-6)
    la_mid = 0.5 * (torch.log(vp.alpha(tm - 0.5 / N)) + torch.log(vp.alpha(tm + 0.5 / N)))
    torch.testing.assert_close(torch.log(disc.alpha(tm)), la_mid, rtol=1e-12, atol=1e-15)


def test_discrete_first_segment_and_time_input_convention():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
    disc = DiscreteVPSDE(betas=betas)
    ac = torch.cumprod(1.0 - betas, 0)
    torch.testing.assert_close(disc.alphas_cumprod, ac, rtol=1e-13, atol=0.0)
    # log alpha(0) = 0, linear on [0, 1/N] up to log alpha(1/N) = log(ac_0)/2
    torch.testing.assert_close(disc.alpha(torch.tensor([0.0, 0.5e-3, 1e-3], dtype=F64)),
                               torch.exp(torch.tensor([0.0, 0.25, 0.5], dtype=F64) * torch.log(ac[0])),
                               rtol=1e-15, atol=0.0)
    n = torch.tensor([0, 1, 499, 999])
    torch.testing.assert_close(disc.alpha((n + 1).to(F64) / 1000), torch.sqrt(ac[n]), rtol=1e-14, atol=0.0)


# --------------------------------------------------------------------------- user subclasses
class _UserVP(LinearSDE):
    """Only log alpha and log sigma: everything else from the LinearSDE defaults."""

    def __init__(self, beta_min=0.1, beta_max=20.0):
        self.b0, self.b1 = beta_min, beta_max

    def _log_alpha(self, t):
        return -0.25 * t * t * (self.b1 - self.b0) - 0.5 * t * self.b0

    def _log_sigma(self, t):
        return 0.5 * torch.log(-torch.expm1(2.0 * self._log_alpha(t)))


class _UserVE(LinearSDE):
    T = 1.0
    default_t_end = 1e-5

    def _log_alpha(self, t):
        return torch.zeros_like(t)

    def _log_sigma(self, t):
        return math.log(0.01) + t * math.log(50.0 / 0.01)


class _UserRF(LinearSDE):
    T = 0.999

    def _log_alpha(self, t):
        return torch.log1p(-t)

    def _log_sigma(self, t):
        return torch.log(t)


@pytest.mark.parametrize("user, ref", [(_UserVP(), VPSDE()), (_UserVE(), VESDE()), (_UserRF(), RectifiedFlowSDE())],
                         ids=["vp", "ve", "rf"])
def test_user_linear_sde_defaults(user, ref):
    t = interior_times(ref, 200)
    torch.testing.assert_close(user.alpha(t), ref.alpha(t), rtol=1e-14, atol=0.0)
    torch.testing.assert_close(user.sigma(t), ref.sigma(t), rtol=1e-13, atol=0.0)
    torch.testing.assert_close(user.f(t), ref.f(t), rtol=1e-13, atol=1e-300)        # autograd default
    torch.testing.assert_close(user.g2(t), ref.g2(t), rtol=1e-12, atol=0.0)         # autograd default
    torch.testing.assert_close(user.log_snr(t), ref.log_snr(t), rtol=1e-12, atol=1e-12)
    back = user.t_of_log_snr(ref.log_snr(t))                                          # bisection default
    torch.testing.assert_close(back, t, rtol=1e-10, atol=0.0)
    x = torch.randn(t.shape[0], 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.testing.assert_close(user.drift(x, t), ref.drift(x, t), rtol=1e-13, atol=1e-300)
    torch.testing.assert_close(user.diffusion(t), ref.diffusion(t), rtol=1e-12, atol=0.0)
    # float32 through the defaults keeps the dtype
    assert user.g2(t.float()).dtype == torch.float32
    assert user.t_of_log_snr(ref.log_snr(t.float())).dtype == torch.float32


# --------------------------------------------------------------------------- forward simulation
@pytest.mark.slow
@pytest.mark.parametrize("name", ["vp", "ve", "subvp", "cosine"])
def test_forward_euler_maruyama_matches_marginal(name):
    """Simulate dx = f x dt + g dW from x(0) ~ N(alpha(0) x0, sigma(0)^2) with small steps
    (float64, 20000 paths) and compare mean and variance with marginal() at several t,
    within 5 Monte-Carlo standard errors plus the O(h) weak error of Euler-Maruyama."""
    sde = make_sde(name)
    g = torch.Generator().manual_seed(123)
    n, steps = 20000, 4000
    T = min(sde.T, 0.99)
    x0 = torch.full((n, 1), 10.0, dtype=F64)   # large enough that a 3% drift error is seen
    mean0, std0 = sde.marginal(x0, 0.0)
    x = mean0 + std0 * torch.randn(n, 1, generator=g, dtype=F64)
    ts = torch.linspace(0.0, T, steps + 1, dtype=F64)
    checks = {steps // 10, steps // 4, steps // 2, steps}
    for i in range(steps):
        t0, h = ts[i], ts[i + 1] - ts[i]
        tb = t0.expand(n)
        x = x + sde.drift(x, tb) * h + sde.diffusion(tb)[:, None] * torch.sqrt(h) * torch.randn(
            n, 1, generator=g, dtype=F64)
        if i + 1 in checks:
            t1 = ts[i + 1]
            m_ref, s_ref = sde.marginal(x0[:1], t1)
            m, v = x.mean(), x.var()
            var_ref = float(s_ref) ** 2
            se_m = math.sqrt(var_ref / n)
            se_v = var_ref * math.sqrt(2.0 / (n - 1))
            bias = 20.0 * float(h)                      # O(h) weak error, relative (|f|, |dlog g^2/dt| <= 20)
            assert abs(float(m) - float(m_ref)) <= 5 * se_m + bias * abs(float(m_ref)), (t1, float(m), float(m_ref))
            assert abs(float(v) - var_ref) <= 5 * se_v + bias * var_ref, (t1, float(v), var_ref)


# --------------------------------------------------------------------------- PF / reverse drift
def test_pf_and_reverse_drift(any_sde):
    """pf_drift = f x - g^2/2 score, reverse_drift = f x - g^2 score; a float64 time does
    not promote a float32 state."""
    sde = any_sde
    t = interior_times(sde, 5)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(5, 2, 3, generator=g, dtype=F64)
    score = torch.randn(5, 2, 3, generator=g, dtype=F64)
    f, g2 = sde.f(t)[:, None, None], sde.g2(t)[:, None, None]
    for got, ref in ((sde.pf_drift(x, t, score), f * x - 0.5 * g2 * score),
                     (sde.reverse_drift(x, t, score), f * x - g2 * score)):
        torch.testing.assert_close(got, ref, rtol=1e-14, atol=1e-15 * float(ref.abs().max()))
    x32, s32 = x.float(), score.float()
    for fn in (sde.pf_drift, sde.reverse_drift):
        out = fn(x32, t, s32)                                   # t stays float64
        assert out.dtype == torch.float32
        ref = fn(x, t, score)
        assert float((out.to(F64) - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
        assert fn(x32, 0.5 * sde.T, s32).dtype == torch.float32


class _UserOU(scoresde.SDE):
    """A general (non-linear-in-the-API) SDE: only drift and diffusion."""

    T = 2.0
    prior_std = 1.0

    def drift(self, x, t):
        return -0.5 * x

    def diffusion(self, t):
        return torch.ones_like(torch.as_tensor(t, dtype=torch.float64))


def test_user_general_sde():
    sde = _UserOU()
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    t = torch.full((4,), 0.3, dtype=F64)
    out = sde.pf_drift(x, t, -x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.zeros_like(x), rtol=0.0, atol=1e-7)   # stationary N(0, 1)
    torch.testing.assert_close(sde.reverse_drift(x, t, -x), 0.5 * x, rtol=1e-6, atol=0.0)
    ref = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(1)
    torch.testing.assert_close(sde.prior_log_prob(x), ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"t=2\.5 is outside \[0, T\]=\[0, 2\] of _UserOU"):
        sde.check_time(2.5)
    with pytest.raises(NotImplementedError, match="drift"):
        scoresde.SDE().drift(x, t)


def test_discrete_repr_is_short_and_config_complete():
    disc = make_sde("discrete")
    assert len(repr(disc)) < 100 and "num_steps=1000" in repr(disc)
    cfg = disc.config()
    assert cfg["class"] == "DiscreteVPSDE" and len(cfg["alphas_cumprod"]) == 1000
    again = DiscreteVPSDE(alphas_cumprod=cfg["alphas_cumprod"])
    t = interior_times(disc, 20)
    torch.testing.assert_close(again.alpha(t), disc.alpha(t), rtol=1e-15, atol=0.0)
    for name in SDE_NAMES:
        sde = make_sde(name)
        assert sde.config()["class"] == type(sde).__name__


def test_public_schedule_is_differentiable_in_t(any_sde):
    """A time that requires grad gives differentiable alpha and sigma (d log alpha/dt = f)."""
    sde = any_sde
    t = interior_times(sde, 50).requires_grad_(True)
    la = torch.log(sde.alpha(t))
    if la.requires_grad:
        (d,) = torch.autograd.grad(la.sum(), t)
        torch.testing.assert_close(d, sde.f(t.detach()), rtol=1e-12, atol=1e-300)
    else:
        assert bool((sde.f(t.detach()) == 0).all())
    (ds,) = torch.autograd.grad(sde.sigma(t).sum(), t)
    assert bool((ds > 0).all())


def test_log_alpha_of_log_snr_is_consistent(any_sde):
    """Where an SDE has the helper log alpha(lambda) (the VP family and sub-VP), it inverts
    log_snr exactly: sub-VP must not inherit VP's alpha^2 = sigmoid(lambda)."""
    sde = any_sde
    if not hasattr(sde, "_log_alpha_of_log_snr"):
        pytest.skip("no log alpha(lambda) helper")
    t = interior_times(sde, 200)
    torch.testing.assert_close(sde._log_alpha_of_log_snr(sde.log_snr(t)), sde.log_alpha(t),
                               rtol=1e-12, atol=1e-15)
