"""edm_sde, euler_ancestral, dpmpp_2s_ancestral and dpmpp_sde: equal to k-diffusion's own samplers
(on EDMSDE, and on any LinearSDE through x/alpha, sigma/alpha), weak order on the Gaussian without
Monte-Carlo noise, batch independence and bad input.  Float64 throughout.

The denoiser is exact (a two-component Gaussian mixture's E[x0 | x], nonlinear in x), so every
difference from k-diffusion is the two codes' round-off.
"""
from __future__ import annotations

import math

import pytest
import torch

import scoresde
import solvers
import solvers.ancestral_split  # noqa: F401  (registers euler_ancestral, dpmpp_2s_ancestral, dpmpp_sde)
import solvers.churn  # noqa: F401  (registers edm_sde)
from scoresde.integrations import kdiffusion as sd_kdiffusion
from _shared import counting_zero_model, two_mode_mixture
from test_sde_samplers import exact_moments, setup, slope, weak_error

F64 = torch.float64
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
B, D = 6, 2
REPRO_TOL = 1e-12


# ------------------------------------------------------------------ noise shared by both sides
class ListNoise:
    """The n-th call returns the n-th pre-drawn normal, whoever calls (k-diffusion's
    ``noise_sampler(sigma, sigma_next)`` or our ``noise(i, t0, t1, like)``)."""

    def __init__(self, steps, seed):
        self.z = torch.randn(steps, B, D, dtype=F64, generator=torch.Generator().manual_seed(seed))
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        return self.z[self.calls - 1]


class PointPath:
    """One Brownian path W(t) known at the given times; a query (t0, t1) at two of them (to 1e-9
    relative) returns (W(t1) - W(t0)) / sqrt|t1 - t0|.  ``to_t`` maps k-diffusion's sigma
    arguments to the path's clock (BrownianTreeNoiseSampler's ``transform``)."""

    def __init__(self, times, seed, to_t=lambda s: float(s)):
        self.t = torch.sort(torch.as_tensor(times, dtype=F64)).values
        dt = self.t.diff().reshape(-1, 1, 1)
        inc = torch.randn(len(dt), B, D, dtype=F64, generator=torch.Generator().manual_seed(seed)) * dt.sqrt()
        self.W = torch.cat([torch.zeros(1, B, D, dtype=F64), inc.cumsum(0)])
        self.to_t = to_t

    def _at(self, v):
        j = int(torch.argmin((self.t - v).abs()))
        assert abs(float(self.t[j]) - v) <= 1e-9 * abs(v), f"query at t={v!r} is off the path's points"
        return self.W[j]

    def __call__(self, *args):
        if len(args) == 4:                                  # ours: (i, t0, t1, like)
            t0, t1 = float(args[1]), float(args[2])
        else:                                               # k-diffusion: (sigma, sigma_next)
            t0, t1 = self.to_t(args[0]), self.to_t(args[1])
        return (self._at(t1) - self._at(t0)) / math.sqrt(abs(t1 - t0))


def stage_points(sde, t, r=0.5):
    """The grid and dpmpp_sde's stage times (lambda_i + r h)."""
    ls = sde.log_snr(t)
    return torch.cat([t, sde.t_of_log_snr(ls[:-1] + r * (ls[1:] - ls[:-1]))])


# --------------------------------------------------------------------------- problems
def edm_problem(steps=10):
    """The mixture under EDMSDE (t = sigma), a Karras grid, x_T at sigma_max, a counting denoiser."""
    target, sde = two_mode_mixture(), scoresde.EDMSDE(SIGMA_MIN, SIGMA_MAX)
    calls = []

    def denoiser(x, sigma):
        calls.append(sigma.clone())
        return target.x0(x, sigma, sde)

    t = solvers.make_grid(sde, steps, "karras").t
    x_T = SIGMA_MAX * torch.randn(B, D, dtype=F64, generator=torch.Generator().manual_seed(3))
    return sd_kdiffusion.from_denoiser(denoiser, SIGMA_MIN, SIGMA_MAX), denoiser, t, x_T, calls


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


ANCESTRAL_KD = {  # our method -> k-diffusion's sampler
    "euler_ancestral": "sample_euler_ancestral",
    "dpmpp_2s_ancestral": "sample_dpmpp_2s_ancestral",
    "dpmpp_sde": "sample_dpmpp_sde",
}
ANCESTRAL_CASES = [("euler_ancestral", 1.0), ("euler_ancestral", 0.4), ("euler_ancestral", 1.7),
                   ("dpmpp_2s_ancestral", 1.0), ("dpmpp_2s_ancestral", 0.4),
                   ("dpmpp_sde", 1.0), ("dpmpp_sde", 0.4), ("dpmpp_sde", 1.7)]


def noise_pair(method, sde, t, seed, to_t=lambda s: float(s)):
    """The same noise for both sides: a Brownian path through the stage times for dpmpp_sde
    (k-diffusion's Brownian-tree increments), pre-drawn normals otherwise."""
    if method == "dpmpp_sde":
        path = PointPath(stage_points(sde, t), seed, to_t)
        return path, path
    return ListNoise(len(t), seed), ListNoise(len(t), seed)


# ------------------------------------------------------- 1. reproduction of k-diffusion
@pytest.mark.parametrize("end", ["zero", "sigma_min"])
@pytest.mark.parametrize("method,eta", ANCESTRAL_CASES)
def test_ancestral_equals_kdiffusion_on_edm(kd, method, eta, end):
    """Same sigmas, same noise, same denoiser: k-diffusion's result to round-off.  k-diffusion's
    last step to sigma = 0 returns the denoised value (no noise): our final_denoise."""
    model, denoiser, t, x_T, _ = edm_problem()
    ours_noise, kd_noise = noise_pair(method, model.sde, t, seed=5)
    sigmas = torch.cat([t, t.new_zeros(1)]) if end == "zero" else t
    theirs = getattr(kd, ANCESTRAL_KD[method])(denoiser, x_T.clone(), sigmas, disable=True, eta=eta,
                                               s_noise=0.8, noise_sampler=kd_noise)
    sol = solvers.sample(model, x_T, method, timesteps=t, eta=eta, s_noise=0.8, generator=ours_noise,
                         final_denoise=(end == "zero"))
    assert rel(sol.x, theirs) < REPRO_TOL
    assert sol.nfe == solvers.get(method).expected_nfe(10) + (end == "zero")


def kd_heun_with_churn(kd, denoiser, x_T, sigmas, seed, **churn):
    """k-diffusion's sample_heun (Algorithm 2, noise from torch's global generator) and the
    normals it drew, one per step."""
    torch.manual_seed(seed)
    theirs = kd.sample_heun(denoiser, x_T.clone(), sigmas, disable=True, **churn)
    torch.manual_seed(seed)
    return theirs, [torch.randn_like(x_T) for _ in range(len(sigmas) - 1)]


@pytest.mark.parametrize("end", ["zero", "sigma_min"])
def test_edm_sde_equals_kdiffusion_sample_heun(kd, end):
    """sample_heun with s_churn is EDM's Algorithm 2.  Its gamma is S_churn / (number of sigma
    intervals), one more than our steps when the sigmas end at 0, hence S_churn * 10/11 there."""
    model, denoiser, t, x_T, _ = edm_problem()
    sigmas = torch.cat([t, t.new_zeros(1)]) if end == "zero" else t
    n_kd = len(sigmas) - 1
    theirs, z = kd_heun_with_churn(kd, denoiser, x_T, sigmas, 11, s_churn=3.0, s_tmin=0.05, s_tmax=50.0,
                                   s_noise=1.007)
    sol = solvers.sample(model, x_T, "edm_sde", timesteps=t, S_churn=3.0 * 10 / n_kd, S_tmin=0.05, S_tmax=50.0,
                         S_noise=1.007, last_step_euler=False, final_denoise=(end == "zero"),
                         generator=lambda i, t0, t1, like: z[i])
    assert rel(sol.x, theirs) < REPRO_TOL
    gammas = sol.stats["churn"]
    assert gammas[0] == 0.0 and gammas[-1] == 0.0            # sigma 80 > S_tmax, 0.0073 < S_tmin
    assert all(abs(g - 3.0 / n_kd) < 1e-15 for g in gammas[1:-2]), gammas
    # the check has teeth: without the churn the result is far away
    plain = solvers.sample(model, x_T, "heun", timesteps=t, last_step_euler=False, final_denoise=(end == "zero"))
    assert rel(plain.x, theirs) > 1e-3


def algorithm2(denoiser, x, sigmas, gammas, z, S_noise):
    """EDM's Algorithm 2 transcribed, with the gammas given (Heun steps; Euler into sigma = 0)."""
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        s_hat = s * (1.0 + gammas[i])
        x_hat = x + math.sqrt(s_hat ** 2 - s ** 2) * S_noise * z[i]
        d = (x_hat - denoiser(x_hat, torch.full((B,), s_hat, dtype=F64))) / s_hat
        x = x_hat + (s_next - s_hat) * d
        if s_next > 0:
            d2 = (x - denoiser(x, torch.full((B,), s_next, dtype=F64))) / s_next
            x = x_hat + (s_next - s_hat) * 0.5 * (d + d2)
    return x


WHOLE_RANGE = {"S_tmin": 0.0, "S_tmax": math.inf, "S_noise": 1.0}   # EDM's function defaults


def test_edm_sde_clamps_the_churn_at_T(kd):
    """With S_tmax = inf, EDM would raise sigma above sigma_max = T where the model is undefined:
    gamma is clamped to sigma(T)/sigma_i - 1 (0 on the first step), the model never sees a time
    above T, and the result is Algorithm 2 with those gammas."""
    model, denoiser, t, x_T, calls = edm_problem(steps=30)         # sigma_1 = 70.1 > 80/sqrt(2)
    z = list(torch.randn(30, B, D, dtype=F64, generator=torch.Generator().manual_seed(2)))
    sol = solvers.sample(model, x_T, "edm_sde", timesteps=t, S_churn=90.0, **WHOLE_RANGE,
                         generator=lambda i, a, b, like: z[i])
    g = sol.stats["churn"]
    expected = [min(math.sqrt(2) - 1, SIGMA_MAX / s - 1) for s in t[:-1].tolist()]
    assert expected[0] == 0.0 and 0 < expected[1] < math.sqrt(2) - 1       # the clamp binds on 2 steps
    assert g == pytest.approx(expected, rel=0, abs=1e-15)
    assert max(float(c.max()) for c in calls) <= SIGMA_MAX
    sol0 = solvers.sample(model, x_T, "edm_sde", timesteps=t, S_churn=90.0, **WHOLE_RANGE, last_step_euler=False,
                          generator=lambda i, a, b, like: z[i])
    assert rel(sol0.x, algorithm2(denoiser, x_T, t, g, z, 1.0)) < REPRO_TOL


# ---------------------------------------- 1b. any LinearSDE = k-diffusion on x/alpha, sigma/alpha
def vp_problem(steps=10):
    """The mixture under a VP SDE (x0 model), a Karras grid in sigma/alpha, x_T at T, and the same
    data as k-diffusion sees it: the denoiser in sigma_hat = sigma/alpha, applied to x/alpha."""
    target, sde = two_mode_mixture(), scoresde.VPSDE()
    model = target.as_model(sde, "x0")
    t = solvers.make_grid(sde, steps, "karras").t
    c = sde.coefficients(t)
    sig_hat, alpha = c["sigma"] / c["alpha"], c["alpha"]
    edm = scoresde.EDMSDE(0.5 * float(sig_hat[-1]), 2.0 * float(sig_hat[0]))
    x_T = torch.randn(B, D, dtype=F64, generator=torch.Generator().manual_seed(4))   # ~ the marginal at T
    return sde, model, t, sig_hat, alpha, (lambda x, s: target.x0(x, s, edm)), x_T


@pytest.mark.parametrize("method,eta", ANCESTRAL_CASES)
def test_ancestral_on_vp_is_kdiffusion_on_scaled_variables(kd, method, eta):
    """On VP the step is k-diffusion's on (x/alpha, sigma/alpha): x_end = alpha_end * k-diffusion's
    result from x_T/alpha_T on the grid's sigma/alpha.  dpmpp_sde's Brownian clock is the SDE's
    t: k-diffusion's noise sampler maps sigma/alpha to t (its ``transform``)."""
    sde, model, t, sig_hat, alpha, denoiser, x_T = vp_problem()
    to_t = lambda s: float(sde.t_of_log_snr(-2.0 * torch.log(torch.as_tensor(s, dtype=F64))))  # noqa: E731
    ours_noise, kd_noise = noise_pair(method, sde, t, seed=6, to_t=to_t)
    theirs = getattr(kd, ANCESTRAL_KD[method])(denoiser, x_T / alpha[0], sig_hat, disable=True, eta=eta,
                                               s_noise=0.8, noise_sampler=kd_noise)
    sol = solvers.sample(model, x_T, method, timesteps=t, eta=eta, s_noise=0.8, generator=ours_noise)
    assert rel(sol.x, alpha[-1] * theirs) < REPRO_TOL


def test_edm_sde_on_vp_is_kdiffusion_on_scaled_variables(kd):
    sde, model, t, sig_hat, alpha, denoiser, x_T = vp_problem()
    window = dict(s_tmin=0.05, s_tmax=0.5 * float(sig_hat[0]), s_noise=1.007)
    theirs, z = kd_heun_with_churn(kd, denoiser, x_T / alpha[0], sig_hat, 12, s_churn=3.0, **window)
    sol = solvers.sample(model, x_T, "edm_sde", timesteps=t, S_churn=3.0, S_tmin=0.05, S_tmax=window["s_tmax"],
                         S_noise=1.007, last_step_euler=False, generator=lambda i, a, b, like: z[i])
    assert sum(g > 0 for g in sol.stats["churn"]) >= 5
    assert rel(sol.x, alpha[-1] * theirs) < REPRO_TOL


# ------------------------------------------------------------------------ cross-checks
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_euler_ancestral_is_ddim_with_eta(eta):
    """An Euler step in sigma/alpha to sigma_down is DDIM's step: euler_ancestral(eta) = ddim(eta)."""
    sde, model, t, *_ , x_T = vp_problem()
    a = solvers.sample(model, x_T, "euler_ancestral", timesteps=t, eta=eta, generator=torch.Generator().manual_seed(1))
    b = solvers.sample(model, x_T, "ddim", timesteps=t, eta=eta, generator=torch.Generator().manual_seed(1))
    assert rel(a.x, b.x) < 1e-13


def test_edm_sde_without_churn_is_heun():
    sde, model, t, *_ , x_T = vp_problem()
    a = solvers.sample(model, x_T, "edm_sde", timesteps=t, S_churn=0.0)
    b = solvers.sample(model, x_T, "heun", timesteps=t)
    assert rel(a.x, b.x) < 1e-14 and a.nfe == b.nfe == 19


# ------------------------------------------------------ 2. weak order, exact moments
WEAK = [  # method, options, lower bound on the fitted order (measured on VP/VE: see the docstring)
    ("euler_ancestral", {}, 0.7),
    ("euler_ancestral", {"eta": 0.5}, 0.7),
    ("dpmpp_2s_ancestral", {}, 1.5),
    ("dpmpp_sde", {}, 1.7),
    ("edm_sde", {"S_churn": 4.0, "S_tmin": 0.0, "S_tmax": math.inf, "S_noise": 1.0}, 1.9),
]


@pytest.mark.parametrize("name", ["vp", "ve"])
@pytest.mark.parametrize("method,opts,bound", WEAK, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(WEAK)])
def test_weak_order(method, opts, bound, name):
    """Exact output mean and covariance (the samplers are affine in x_T and the noise on Gaussian
    data), from the exact marginal at T, against the exact marginal at t_end; Karras grids of
    10..80 steps.  Fitted orders measured (VP, VE): euler_ancestral 0.74, 0.78 (0.83, 0.85 at
    eta = 0.5; pre-asymptotic, the local slope rises to 0.86 at 40..80), dpmpp_2s_ancestral
    1.67, 1.74, dpmpp_sde 1.88, 1.87, edm_sde (S_churn = 4) 2.15, 2.11.  The mean is exact to
    round-off for all (the exact eps vanishes at the mean)."""
    sde, model, pT, ex = setup(name)
    ns = [10, 20, 40, 80]
    errs = [sum(weak_error(*exact_moments(model, method, n, pT.mean, pT.cov, **opts), ex)) for n in ns]
    p = -slope(ns, errs)
    assert p >= bound, (errs, p)
    assert all(b < a for a, b in zip(errs, errs[1:])), errs


# --------------------------------------------------------------- 3. batch independence
METHODS = [("euler_ancestral", {}), ("dpmpp_2s_ancestral", {"eta": 0.7}), ("dpmpp_sde", {}),
           ("edm_sde", {"S_churn": 5.0})]


@pytest.mark.parametrize("method,opts", METHODS)
def test_batch_independence_with_per_sample_generators(method, opts):
    """Sample j's result alone (its own generator) equals its row in a batch."""
    sde, model, pT, _ = setup("vp")
    x = pT.sample(4, generator=torch.Generator().manual_seed(0))
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batch = solvers.sample(model, x, method, 12, generator=gens([10, 11, 12, 13]), **opts).x
    alone = solvers.sample(model, x[2:3], method, 12, generator=gens([12]), **opts).x
    torch.testing.assert_close(alone[0], batch[2], rtol=0, atol=1e-12)
    other = solvers.sample(model, x, method, 12, generator=gens([10, 11, 99, 13]), **opts).x
    assert float((other[2] - batch[2]).abs().max()) > 1e-3          # the noise matters
    torch.testing.assert_close(other[[0, 1, 3]], batch[[0, 1, 3]], rtol=0, atol=1e-12)


# ------------------------------------------------------------------------ 4. bad input
BAD = [
    ("edm_sde", {"S_churn": -1.0}, ValueError, r"S_churn must be >= 0"),
    ("edm_sde", {"S_churn": float("nan")}, ValueError, r"S_churn must be finite"),
    ("edm_sde", {"S_tmin": 2.0, "S_tmax": 1.0}, ValueError, r"S_tmin must be <= S_tmax, got S_tmin=2.0, S_tmax=1.0"),
    ("edm_sde", {"S_tmin": float("inf")}, ValueError, r"S_tmin must be finite"),
    ("edm_sde", {"S_tmax": -1.0}, ValueError, r"S_tmax must be >= 0"),
    ("edm_sde", {"S_noise": 0.0}, ValueError, r"S_noise must be > 0"),
    ("edm_sde", {"S_noise": "1"}, TypeError, r"S_noise must be a real number"),
    ("edm_sde", {"last_step_euler": 1}, TypeError, r"last_step_euler must be a bool"),
    ("euler_ancestral", {"eta": -0.1}, ValueError, r"eta must be >= 0"),
    ("euler_ancestral", {"s_noise": 0.0}, ValueError, r"s_noise must be > 0"),
    ("dpmpp_2s_ancestral", {"eta": 1.5}, ValueError, r"eta must be <= 1"),
    ("dpmpp_2s_ancestral", {"s_noise": -1.0}, ValueError, r"s_noise must be > 0"),
    ("dpmpp_sde", {"eta": float("inf")}, ValueError, r"eta must be finite"),
    ("dpmpp_sde", {"s_noise": 0.0}, ValueError, r"s_noise must be > 0"),
    ("dpmpp_sde", {"r": 1.0}, ValueError, r"r must be < 1"),
    ("dpmpp_sde", {"r": 0.0}, ValueError, r"r must be > 0"),
]


@pytest.mark.parametrize("method,opts,exc,match", BAD)
def test_bad_options_are_refused_before_any_network_call(method, opts, exc, match):
    model, calls = counting_zero_model()
    with pytest.raises(exc, match=match):
        solvers.sample(model, torch.zeros(2, 3), method, 5, **opts)
    assert calls == []


def test_edm_sde_defaults_and_an_infinite_window():
    """EDM's ImageNet-64 settings by default (stochastic); S_tmax may be inf."""
    s = solvers.get("edm_sde")
    assert (s.S_churn, s.S_tmin, s.S_tmax, s.S_noise, s.stochastic) == (40.0, 0.05, 50.0, 1.003, True)
    assert solvers.get("edm_sde", S_tmax=float("inf"), S_tmin=1.0).S_tmax == math.inf
    assert solvers.get("edm_sde", S_churn=0).stochastic is False
