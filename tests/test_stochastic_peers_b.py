"""Stochastic samplers sa_solver, er_sde and restart, in float64 against exact answers.

- sa_solver reproduces diffusers' ``SASolverScheduler`` on the scheduler's own sigma grid with
  the same injected noise (measured: relative difference <= 3e-15);
- er_sde and restart against transcriptions of the authors' algorithms written here (er_sde:
  the reference ``vp_*_order_taylor`` loops with the integrals by ``scipy.integrate.quad``;
  restart: Algorithm 1 in EDM's variables x/alpha, sigma/alpha);
- exact reductions: er_sde order 1 with phi(s) = s is DDIM, with phi(s) = s^2 ancestral;
  sa_solver with predictor order 1, no corrector and tau = 1 is ancestral; restart with K = 0
  is Heun;
- weak order from the exact output moments of these affine samplers on a Gaussian
  (``exact_moments``: no Monte-Carlo noise), log-SNR grids of 16..128 steps.  Fitted slopes
  of (mean error + covariance error) against steps (VP / VE):

  ==============================================  ============  ============
  sa_solver (p=3, c=4, tau=1)                       -2.20         -2.27
  sa_solver tau=0 (ODE predictor-corrector)         -3.48         -3.42
  er_sde order 1                                    -0.93         -0.94
  er_sde order 2                                    -2.06         -2.06
  er_sde order 3 (reference D1: backward diff.)     -2.21         -2.20
  restart (K=1, restart_steps = steps/2)            -2.07         -2.07
  ==============================================  ============  ============

  sa_solver with tau = 1 and er_sde-3 are weak order 2 here (er_sde-3's first divided
  difference is the backward difference, O(h) accurate, which caps the step at local order 3).
- batch independence with per-sample generators; NFE accounting; bad input.
"""
from __future__ import annotations

import math

import pytest
import torch

import scoresde
import solvers
import solvers.er_sde  # noqa: F401  (registers er_sde)
import solvers.restart  # noqa: F401  (registers restart)
import solvers.sa_solver  # noqa: F401  (registers sa_solver)
from solvers.noise import ZeroNoise
from test_sde_samplers import TARGET, exact_moments, setup, slope, weak_error

F64 = torch.float64
NS = [16, 32, 64, 128]


class FixedNoise:
    """Noise source returning pre-drawn normals in call order (the same stream for two codes)."""

    def __init__(self, z: torch.Tensor):
        self.z, self.calls = z, 0

    def __call__(self, i, t0, t1, like):
        out = self.z[self.calls]
        self.calls += 1
        return out.clone()


def _draws(n: int, batch: int, d: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, batch, d, dtype=F64, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------ sa_solver vs diffusers
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("steps,p,c,tau,lof", [(10, 3, 4, 1.0, True), (10, 2, 2, 1.0, True), (7, 1, 1, 0.7, True),
                                               (12, 4, 4, 0.0, True), (10, 3, 4, 1.0, False), (5, 2, 3, 0.5, True),
                                               (15, 3, 4, "window", True)])
def test_sa_solver_reproduces_diffusers(monkeypatch, steps, p, c, tau, lof):
    """tau="window": diffusers' default tau_func (1 on the timesteps 200..800, else 0) against
    ``tau_interval`` spanning the same grid points."""
    diffusers = pytest.importorskip("diffusers")
    import diffusers.schedulers.scheduling_sasolver as sas

    tau_func = None if tau == "window" else (lambda t: tau)
    sch = diffusers.SASolverScheduler(predictor_order=p, corrector_order=c, tau_func=tau_func,
                                      lower_order_final=lof)
    sch.set_timesteps(steps)
    sch.sigmas = sch.sigmas.to(F64)           # its own grid, carried in float64 from here on
    sde = scoresde.VPSDE(beta_min=0.1, beta_max=20.5)   # log-SNR range covers the scheduler's
    model = TARGET.as_model(sde, "eps")
    t = sde.t_of_log_snr(-2.0 * torch.log(sch.sigmas))
    options = {"tau": tau}
    if tau == "window":
        inside = [float(t[k]) for k, ts in enumerate(sch.timesteps.tolist()) if 200 <= ts <= 800]
        options = {"tau": 1.0, "tau_interval": (min(inside), max(inside))}
        assert 0 < len(inside) < steps
    x_T = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    z = _draws(steps, 4)
    stream = iter(z)
    monkeypatch.setattr(sas, "randn_tensor", lambda *a, **k: next(stream).clone())
    x = x_T.clone()
    for k, timestep in enumerate(sch.timesteps):
        x = sch.step(model.eps(x, t[k]), timestep, x).prev_sample
    ours = solvers.sample(model, x_T, "sa_solver", timesteps=t, generator=FixedNoise(z), predictor_order=p,
                          corrector_order=c, lower_order_final=lof, **options)
    assert ours.nfe == steps
    err = float((ours.x - x).norm() / x.norm())
    print("sa_solver vs diffusers", steps, p, c, tau, lof, err)
    assert err < 1e-12


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_sa_solver_first_order_is_ancestral(name):
    sde, model, pT, _ = setup(name)
    x = pT.sample(4, generator=torch.Generator().manual_seed(0))
    z = _draws(9, 4)
    a = solvers.sample(model, x, "sa_solver", 9, generator=FixedNoise(z), predictor_order=1, corrector_order=0,
                       schedule="uniform").x
    b = solvers.sample(model, x, "ancestral", 9, generator=FixedNoise(z), schedule="uniform").x
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------ er_sde vs the reference loop
def _phi(kind: str):
    return {"default": lambda s: s * (math.exp(s ** 0.3) + 10.0), "ode": lambda s: s, "sde": lambda s: s * s}[kind]


def er_sde_reference(model, sde, t, x, z, order, kind):
    """The authors' vp_{1,2,3}_order_taylor loop (VE is alpha = 1), integrals by quad, their
    round-off clip of the noise variance made relative."""
    from scipy.integrate import quad

    fn = _phi(kind)
    c = sde.coefficients(t)
    alphas, sigmas = c["alpha"].tolist(), c["sigma"].tolist()
    lam = [s / a for s, a in zip(sigmas, alphas)]
    old_x0 = old_d = None
    for i in range(len(t) - 1):
        x0 = model.x0(x, t[i])
        r_fn, r_a = fn(lam[i + 1]) / fn(lam[i]), alphas[i + 1] / alphas[i]
        var = lam[i + 1] ** 2 - lam[i] ** 2 * r_fn ** 2
        var = 0.0 if abs(var) < 1e-12 * lam[i + 1] ** 2 else var      # the authors' numerical_clip, relative
        noise = z[i] * math.sqrt(var) * alphas[i + 1]
        x_new = r_a * r_fn * x + alphas[i + 1] * (1 - r_fn) * x0
        if old_x0 is not None and order > 1:
            s_int = quad(lambda s: 1.0 / fn(s), lam[i + 1], lam[i], epsabs=0, epsrel=1e-13, limit=200)[0]
            d_x0 = (x0 - old_x0) / (lam[i] - lam[i - 1])
            x_new = x_new + alphas[i + 1] * (lam[i + 1] - lam[i] + s_int * fn(lam[i + 1])) * d_x0
            if old_d is not None and order > 2:
                s_d = quad(lambda s: (s - lam[i]) / fn(s), lam[i + 1], lam[i], epsabs=0, epsrel=1e-13, limit=200)[0]
                dd_x0 = 2 * (d_x0 - old_d) / (lam[i] - lam[i - 2])
                x_new = x_new + alphas[i + 1] * ((lam[i + 1] - lam[i]) ** 2 / 2 + s_d * fn(lam[i + 1])) * dd_x0
            old_d = d_x0
        x, old_x0 = x_new + noise, x0
    return x


@pytest.mark.parametrize("name", ["vp", "ve"])
@pytest.mark.parametrize("order,kind", [(1, "default"), (2, "default"), (3, "default"), (3, "sde"), (2, "ode")])
def test_er_sde_matches_reference_loop(name, order, kind):
    sde, model, pT, _ = setup(name)
    x = pT.sample(4, generator=torch.Generator().manual_seed(0))
    t = solvers.make_grid(sde, 12, "log_snr").t
    z = _draws(12, 4)
    ref = er_sde_reference(model, sde, t, x, z, order, kind)
    sol = solvers.sample(model, x, "er_sde", timesteps=t, generator=FixedNoise(z), order=order, noise_scale=kind)
    assert sol.nfe == 12
    assert float((sol.x - ref).norm() / ref.norm()) < 1e-12


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_er_sde_first_order_reductions(name):
    """phi(s) = s: DDIM; phi(s) = s^2: ancestral sampling (same noise)."""
    sde, model, pT, _ = setup(name)
    x = pT.sample(4, generator=torch.Generator().manual_seed(0))
    z = _draws(9, 4)
    a = solvers.sample(model, x, "er_sde", 9, generator=FixedNoise(z), order=1, noise_scale="ode",
                       schedule="uniform").x
    torch.testing.assert_close(a, solvers.sample(model, x, "ddim", 9).x, rtol=1e-12, atol=1e-12)
    b = solvers.sample(model, x, "er_sde", 9, generator=FixedNoise(z), order=1, noise_scale="sde",
                       schedule="uniform").x
    torch.testing.assert_close(b, solvers.sample(model, x, "ancestral", 9, generator=FixedNoise(z),
                                                 schedule="uniform").x, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------ restart vs Algorithm 1
def restart_reference(model, sde, t, x, z, t_min, t_max, K, n_restart):
    """Restart sampling (Xu et al. 2023, Algorithm 1) in EDM's variables: xh = x/alpha,
    sh = sigma/alpha, Heun on dxh/dsh = eps; restarts after the grid point nearest t_min."""
    def sh(tt):
        c = sde.coefficients(torch.as_tensor(tt, dtype=F64).reshape(1))
        return float(c["sigma"][0] / c["alpha"][0]), float(c["alpha"][0])

    def heun(xh, ta, tb):
        (sa, aa), (sb, ab) = sh(ta), sh(tb)
        d = model.eps(aa * xh, ta)
        xe = xh + (sb - sa) * d
        return xh + (sb - sa) * 0.5 * (d + model.eps(ab * xe, tb))

    lam = 0.5 * sde.log_snr(t)
    m = 1 + int(torch.argmin((lam[1:] - 0.5 * sde.log_snr(torch.tensor(t_min, dtype=F64))).abs()))
    s_lo, s_hi = sh(t[m])[0], sh(t_max)[0]
    rho = 7.0
    u = torch.linspace(0, 1, n_restart + 1, dtype=F64)
    s_r = (s_hi ** (1 / rho) + u * (s_lo ** (1 / rho) - s_hi ** (1 / rho))) ** rho
    t_r = sde.t_of_log_snr(-2.0 * torch.log(s_r))
    t_r[0], t_r[-1] = t_max, t[m]
    xh, k = x / sh(t[0])[1], 0
    for i in range(len(t) - 1):
        xh = heun(xh, t[i], t[i + 1])
        if i + 1 == m:
            for _ in range(K):
                xh = xh + math.sqrt(s_hi ** 2 - s_lo ** 2) * z[k]
                k += 1
                for j in range(n_restart):
                    xh = heun(xh, t_r[j], t_r[j + 1])
    return xh * sh(t[-1])[1]


@pytest.mark.parametrize("name", ["vp", "ve"])
@pytest.mark.parametrize("K,n_restart", [(1, 3), (3, 2)])
def test_restart_matches_algorithm(name, K, n_restart):
    sde, model, pT, _ = setup(name)
    x = pT.sample(4, generator=torch.Generator().manual_seed(0))
    t = solvers.make_grid(sde, 10, "karras").t
    t_min, t_max = float(t[6]) * 1.01, float(t[3])
    z = _draws(K, 4)
    ref = restart_reference(model, sde, t, x, z, t_min, t_max, K, n_restart)
    sol = solvers.sample(model, x, "restart", timesteps=t, generator=FixedNoise(z), restart_t_min=t_min,
                         restart_t_max=t_max, restart_K=K, restart_steps=n_restart)
    assert sol.nfe == 2 * 10 + 2 * K * n_restart == solvers.get("restart", restart_K=K,
                                                                  restart_steps=n_restart).expected_nfe(10)
    assert sol.stats["restart"]["index"] == 6
    assert float((sol.x - ref).norm() / ref.norm()) < 1e-12


def test_restart_without_restarts_is_heun():
    sde, model, pT, _ = setup("vp")
    x = pT.sample(3, generator=torch.Generator().manual_seed(0))
    a = solvers.sample(model, x, "restart", 8, restart_K=0, generator=torch.Generator().manual_seed(0))
    b = solvers.sample(model, x, "heun", 8, last_step_euler=False)
    assert a.nfe == b.nfe == 16
    torch.testing.assert_close(a.x, b.x, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("kw,steps", [({}, 10), ({"restart_K": 2, "restart_steps": 5}, 12),
                                      ({"restart_sigma_min": 0.05, "restart_sigma_max": 0.5, "restart_K": 3}, 20)])
def test_restart_nfe_is_predicted(kw, steps):
    sde, model, pT, _ = setup("ve")
    sol = solvers.sample(model, pT.sample(2, generator=torch.Generator().manual_seed(0)), "restart", steps,
                         generator=torch.Generator().manual_seed(1), **kw)
    assert sol.nfe == solvers.get("restart", **kw).expected_nfe(steps)


# ------------------------------------------------------------ weak order (exact moments)
def _weak_errors(name: str, method: str, options) -> list[float]:
    sde, model, pT, ex = setup(name)
    errs = []
    for n in NS:
        kw = options(n) if callable(options) else options
        me, ce = weak_error(*exact_moments(model, method, n, pT.mean, pT.cov, schedule="log_snr", **kw), ex)
        errs.append(me + ce)
    return errs


def _restart_options(n: int) -> dict:
    return {"restart_sigma_min": 0.1, "restart_sigma_max": 1.0, "restart_K": 1, "restart_steps": n // 2}


WEAK_CASES = {   # method, options, bounds on the fitted slope over NS, bound on the error at 128 steps
    "sa_solver": ("sa_solver", {}, (-2.6, -1.8), 2e-3),
    "sa_solver_ode": ("sa_solver", {"tau": 0.0}, (-3.9, -3.0), 1e-5),
    "er_sde_1": ("er_sde", {"order": 1}, (-1.2, -0.8), 0.1),
    "er_sde_2": ("er_sde", {"order": 2}, (-2.4, -1.8), 3e-3),
    "er_sde_3": ("er_sde", {"order": 3}, (-2.5, -1.9), 3e-3),
    "restart": ("restart", _restart_options, (-2.5, -1.8), 3e-3),
}


@pytest.mark.parametrize("name", ["vp", "ve"])
@pytest.mark.parametrize("case", sorted(WEAK_CASES))
def test_weak_order(name, case):
    method, options, (lo, hi), final = WEAK_CASES[case]
    errs = _weak_errors(name, method, options)
    p = slope(NS, errs)
    print(name, case, ["%.3g" % e for e in errs], "slope %.2f" % p)
    assert lo < p < hi, (errs, p)
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < final, errs


# ------------------------------------------------------------ batch independence
@pytest.mark.parametrize("method,kw", [("sa_solver", {}), ("er_sde", {}), ("restart", {"restart_K": 2})])
def test_per_sample_generators_make_samples_independent_of_the_batch(method, kw):
    sde, model, pT, _ = setup("vp")
    x = pT.sample(3, generator=torch.Generator().manual_seed(0))
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    full = solvers.sample(model, x, method, 10, generator=gens([5, 6, 7]), **kw).x
    one = solvers.sample(model, x[1:2], method, 10, generator=gens([6]), **kw).x
    torch.testing.assert_close(one[0], full[1], rtol=1e-12, atol=1e-12)
    other = solvers.sample(model, x[1:2], method, 10, generator=gens([9]), **kw).x
    assert float((other - one).abs().max()) > 1e-6          # the noise does matter


def test_zero_noise_is_deterministic():
    sde, model, pT, _ = setup("ve")
    for method in ("sa_solver", "er_sde", "restart"):
        a = solvers.sample(model, pT.mean[None], method, 8, generator=ZeroNoise()).x
        b = solvers.sample(model, pT.mean[None], method, 8, generator=ZeroNoise()).x
        assert torch.equal(a, b)


# ------------------------------------------------------------ bad input
class NeverCalled:
    def __call__(self, x, t):
        raise AssertionError("the network was called")


BAD = [
    ("sa_solver", {"tau": -0.1}, "tau"), ("sa_solver", {"tau": float("nan")}, "tau"),
    ("sa_solver", {"predictor_order": 0}, "predictor_order"), ("sa_solver", {"predictor_order": 5}, "predictor_order"),
    ("sa_solver", {"corrector_order": 5}, "corrector_order"), ("sa_solver", {"corrector_order": -1}, "corrector_order"),
    ("sa_solver", {"tau_interval": (0.5, 0.2)}, "tau_interval"), ("sa_solver", {"tau_interval": 0.5}, "tau_interval"),
    ("er_sde", {"order": 4}, "order"), ("er_sde", {"order": 0}, "order"),
    ("er_sde", {"noise_scale": "x"}, "noise_scale"),
    ("restart", {"restart_K": -1}, "restart_K"), ("restart", {"restart_steps": 0}, "restart_steps"),
    ("restart", {"restart_t_min": 0.5, "restart_t_max": 0.2}, "restart_t_min"),
    ("restart", {"restart_t_min": 0.3, "restart_t_max": 0.3}, "restart_t_min"),
    ("restart", {"restart_t_min": 0.3}, "restart_t_max"),
    ("restart", {"restart_sigma_min": 2.0, "restart_sigma_max": 1.0}, "restart_sigma_min"),
    ("restart", {"restart_t_min": 0.1, "restart_t_max": 0.3, "restart_sigma_min": 0.1, "restart_sigma_max": 1.0},
     "not both"),
]


@pytest.mark.parametrize("method,kw,match", BAD)
def test_bad_options_raise_before_any_network_call(method, kw, match):
    model = scoresde.ScoreModel(NeverCalled(), scoresde.VPSDE(), "eps")
    with pytest.raises(ValueError, match=match):
        solvers.sample(model, torch.zeros(2, 3, dtype=F64), method, 5, generator=torch.Generator().manual_seed(0), **kw)


@pytest.mark.parametrize("kw,match", [({"restart_t_min": 0.1, "restart_t_max": 0.7}, "outside"),
                                      ({"restart_sigma_min": 1e-6, "restart_sigma_max": 1.0}, "restart_sigma"),
                                      ({"restart_t_min": 0.30, "restart_t_max": 0.31}, "snaps")])
def test_restart_interval_outside_the_grid_raises_before_any_network_call(kw, match):
    model = scoresde.ScoreModel(NeverCalled(), scoresde.VPSDE(), "eps")
    with pytest.raises(ValueError, match=match):
        solvers.sample(model, torch.zeros(2, 3, dtype=F64), "restart", 5, t_start=0.5,
                       generator=torch.Generator().manual_seed(0), **kw)


def test_restart_refuses_a_brownian_path_before_any_network_call():
    from solvers.noise import BrownianNoise

    model = scoresde.ScoreModel(NeverCalled(), scoresde.VPSDE(), "eps")
    noise = BrownianNoise((2, 3), 1e-3, 1.0)
    with pytest.raises(ValueError, match="BrownianNoise"):
        solvers.sample(model, torch.zeros(2, 3, dtype=F64), "restart", 5, generator=noise)
