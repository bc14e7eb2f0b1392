"""Deterministic (ODE) solvers proven against exact answers: fitted
convergence orders, equivalences between implementations of the same method, interval
splitting.  Everything in float64.

Order.  On the exact Gaussian flow (d=4, mean != 0, covariance eigenvalues spread over two
decades) under VP and VE: run a doubling ladder of step counts, fit log(max error) against
log(steps) and require |fitted - theory| <= 0.3, with every error above the round-off floor
(1e-10) so that the fit sees the asymptotic range only.  Fit configurations:

- singlestep methods use ``allocation="fixed"`` (every outer step at full order);
- ``dpmpp_3m`` uses ``warmup="singlestep"`` (a single first-order starter caps a 3-step
  method at order 2: measured below as documented behaviour) and the ``karras`` grid.  On a
  grid uniform in log-SNR the Gaussian problem is *superconvergent* for 3M (fitted ~4 until
  errors ~1e-8): along the exact flow every eigen-coordinate of x0 is c w(lambda),
  w = (l_k + e^{-2 lambda})^{-1/2}, and the propagated leading error of the quadratic
  interpolant integrates w w''' d lambda, an exact derivative -- the h^3 term reduces to
  boundary values that are tiny.  A non-uniform grid (karras) breaks the cancellation and
  shows the true order 3 (also on the mixture, where there is no such structure).
- ``lower_order_final`` stays off (its default).

The fast tier runs a 3-point ladder per method on one SDE (alternating VP/VE); ``-m slow``
runs 4-point ladders on VP and VE, the Gaussian-mixture sweep against a tight ``pf_ode``
reference, and the warm-up study.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import scoresde
import solvers
from conftest import SDE_NAMES, make_sde
from solvers.noise import ZeroNoise
from _shared import two_mode_mixture

F64 = torch.float64
FLOOR = 1e-10       # round-off floor: every error of a fitted ladder must lie above it
TOL = 0.3           # |fitted order - theory|


# ------------------------------------------------------------------ problems
@functools.lru_cache(maxsize=None)
def gaussian_target() -> scoresde.Gaussian:
    """d=4, mean != 0, covariance eigenvalues 1e-2 .. 1 (two decades), random rotation."""
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=F64))
    cov = (q * torch.logspace(-2, 0, 4, dtype=F64)) @ q.T
    return scoresde.Gaussian(torch.tensor([0.5, -1.0, 0.3, 2.0], dtype=F64), cov)


SDES = {"vp": lambda: scoresde.VPSDE(beta_min=0.1, beta_max=20.0),
        "ve": lambda: scoresde.VESDE(sigma_min=0.01, sigma_max=50.0)}


@functools.lru_cache(maxsize=None)
def gaussian_problem(sde_name: str):
    """(sde, model, x_T, exact x(t_end)) for the Gaussian; x_T ~ p_T exactly."""
    sde, target = SDES[sde_name](), gaussian_target()
    x_T = target.marginal(sde, sde.T).sample(8, generator=torch.Generator().manual_seed(2))
    return sde, target.as_model(sde), x_T, target.flow(x_T, sde.T, sde.default_t_end, sde)


@functools.lru_cache(maxsize=None)
def mixture_problem(sde_name: str):
    """(sde, model, x_T, reference) for the mixture; the reference is pf_ode (dopri5) at
    rtol = atol = 1e-10 (agrees with dopri8 at 1e-12 to ~2e-10)."""
    sde, target = SDES[sde_name](), two_mode_mixture()
    model = target.as_model(sde)
    x_T = target.marginal(sde, sde.T).sample(8, generator=torch.Generator().manual_seed(2))
    ref = solvers.sample(model, x_T, "pf_ode", rtol=1e-10, atol=1e-10)
    assert ref.stats["status"] == "success"
    return sde, model, x_T, ref.x


def errors(problem, method, options, schedule, ladder):
    sde, model, x_T, exact = problem
    out = []
    for n in ladder:
        sol = solvers.sample(model, x_T, method, n, schedule=schedule, **options)
        out.append(float((sol.x - exact).abs().max()))
    return out


def fit_order(ladder, errs) -> float:
    return float(-np.polyfit(np.log(ladder), np.log(errs), 1)[0])


def assert_order(ladder, errs, theory, floor=FLOOR):
    assert min(errs) > floor, f"ladder reaches the round-off floor: {errs}"
    fitted = fit_order(ladder, errs)
    assert abs(fitted - theory) <= TOL, f"fitted order {fitted:.3f}, theory {theory}; errors {errs}"
    return fitted


# ------------------------------------------------------------------ methods
# name -> (options for the fit, theory, schedule, fast ladder, fast SDE, slow Gaussian ladder,
#          slow mixture ladder).  Singlestep ladders are NFE budgets (multiples of the order).
FIT = {
    "euler":              ({}, 1, "log_snr", (48, 96, 192), "vp", (64, 128, 256, 512), (96, 192, 384, 768)),
    "ddim":               ({}, 1, "log_snr", (48, 96, 192), "ve", (64, 128, 256, 512), (48, 96, 192, 384)),
    "dpm_solver_1":       ({}, 1, "log_snr", (48, 96, 192), "vp", (64, 128, 256, 512), (48, 96, 192, 384)),
    "heun":               ({}, 2, "log_snr", (24, 48, 96), "ve", (24, 48, 96, 192), (48, 96, 192, 384)),
    "dpm_solver_2":       ({"allocation": "fixed"}, 2, "log_snr", (24, 48, 96), "vp", (24, 48, 96, 192),
                           (48, 96, 192, 384)),
    "dpmpp_2s":           ({"allocation": "fixed"}, 2, "log_snr", (48, 96, 192), "ve", (48, 96, 192, 384),
                           (96, 192, 384, 768)),
    "dpmpp_2m":           ({}, 2, "log_snr", (24, 48, 96), "vp", (24, 48, 96, 192), (96, 192, 384, 768)),
    "dpmpp_2m[heun]":     ({"solver_type": "heun"}, 2, "log_snr", (24, 48, 96), "ve", (24, 48, 96, 192),
                           (96, 192, 384, 768)),
    "dpm_solver_3":       ({"allocation": "fixed"}, 3, "log_snr", (96, 192, 384), "vp", (96, 192, 384, 768),
                           (384, 768, 1536)),
    "dpmpp_3m":           ({"warmup": "singlestep"}, 3, "karras", (48, 96, 192), "ve", (48, 96, 192, 384),
                           (192, 384, 768, 1536)),
}
DETERMINISTIC = ["euler", "heun", "ddim", "dpm_solver_1", "dpm_solver_2", "dpm_solver_3", "dpmpp_2s",
                 "dpmpp_2m", "dpmpp_3m"]
EXPONENTIAL = ["ddim", "dpm_solver_1", "dpm_solver_2", "dpm_solver_3", "dpmpp_2s", "dpmpp_2m", "dpmpp_3m"]


def _method(key):
    return key.split("[")[0]


def test_fit_table_covers_every_deterministic_method():
    assert {_method(k) for k in FIT} == set(DETERMINISTIC)
    for key, (opts, theory, *_rest) in FIT.items():
        assert solvers.get(_method(key), **opts).order == theory


# ------------------------------------------------------------------ order on the Gaussian
@pytest.mark.parametrize("key", list(FIT))
def test_order_gaussian_fast(key):
    opts, theory, schedule, ladder, sde_name, _, _ = FIT[key]
    errs = errors(gaussian_problem(sde_name), _method(key), opts, schedule, ladder)
    assert_order(ladder, errs, theory)


@pytest.mark.slow
@pytest.mark.parametrize("sde_name", ["vp", "ve"])
@pytest.mark.parametrize("key", list(FIT))
def test_order_gaussian_full(key, sde_name):
    opts, theory, schedule, _, _, ladder, _ = FIT[key]
    errs = errors(gaussian_problem(sde_name), _method(key), opts, schedule, ladder)
    assert_order(ladder, errs, theory)


@pytest.mark.slow
@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_dpmpp_3m_superconvergent_on_uniform_log_snr_grid(sde_name):
    """Documented behaviour (module docstring): uniform log-SNR grid, Gaussian data, 3M
    fits ~4 before its tiny h^3 term shows; hence the karras grid for the order test."""
    ladder = (24, 48, 96)
    errs = errors(gaussian_problem(sde_name), "dpmpp_3m", {"warmup": "singlestep"}, "log_snr", ladder)
    assert fit_order(ladder, errs) > 3.6


@pytest.mark.slow
def test_dpmpp_3m_lower_order_warmup_caps_order_at_two():
    """Documented behaviour: with the default warm-up (one first-order step, local error
    O(h^2)) 3M converges at order 2 once that term dominates -- under VE from ~400 steps;
    the singlestep warm-up keeps order 3, so its advantage grows with the steps (measured
    5.7x, 15x, 30x at 384, 768, 1536 steps)."""
    ladder = (384, 768, 1536)
    prob = gaussian_problem("ve")
    low = errors(prob, "dpmpp_3m", {}, "log_snr", ladder)
    assert_order(ladder, low, 2)
    single = errors(prob, "dpmpp_3m", {"warmup": "singlestep"}, "log_snr", ladder)
    assert_order(ladder, single, 3)
    ratios = [e / s for s, e in zip(single, low)]
    assert ratios[0] > 3 and ratios[-1] > 20 and ratios == sorted(ratios)


# ------------------------------------------------------------------ order on the mixture
def test_mixture_reference_is_tight():
    """The pf_ode reference (rtol=atol=1e-10) against dopri8 at 1e-12."""
    sde, model, x_T, ref = mixture_problem("vp")
    tighter = solvers.sample(model, x_T, "pf_ode", ode_method="dopri8", rtol=1e-12, atol=1e-12).x
    assert float((tighter - ref).abs().max()) < 2e-9


@pytest.mark.parametrize("key", list(FIT))
def test_mixture_smoke_fast(key):
    """Every method converges on the mixture: at 96 and 192 steps (NFE budget for
    singlestep), the error is small and falls at about the method's order."""
    opts, theory, schedule, *_ = FIT[key]
    errs = errors(mixture_problem("vp"), _method(key), opts, schedule, (96, 192))
    assert errs[0] < {1: 5e-2, 2: 1e-2, 3: 1e-3}[theory]
    assert fit_order((96, 192), errs) > theory - 0.5


@pytest.mark.slow
@pytest.mark.parametrize("sde_name", ["vp", "ve"])
@pytest.mark.parametrize("key", list(FIT))
def test_order_mixture_full(key, sde_name):
    opts, theory, schedule, _, _, _, ladder = FIT[key]
    errs = errors(mixture_problem(sde_name), _method(key), opts, schedule, ladder)
    # the reference is good to ~2e-10: keep the ladder's errors 30x above it
    assert_order(ladder, errs, theory, floor=6e-9)


# ------------------------------------------------------------------ pf_ode
@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_pf_ode_tight_matches_exact_flow(sde_name):
    sde, model, x_T, exact = gaussian_problem(sde_name)
    sol = solvers.sample(model, x_T, "pf_ode", rtol=1e-10, atol=1e-10)
    assert float((sol.x - exact).abs().max()) < 1e-8
    assert sol.stats["status"] == "success" and sol.nfe == sol.stats["nfe_integrator"] > 0


def test_pf_ode_fixed_grid_rk4_order_four():
    """A fixed-grid torchdiffeq method steps on the solver's grid: rk4 converges at order 4."""
    prob = gaussian_problem("vp")
    ladder = (32, 64, 128)
    errs = errors(prob, "pf_ode", {"ode_method": "rk4"}, "log_snr", ladder)
    assert_order(ladder, errs, 4)
    sol = solvers.sample(prob[1], prob[2], "pf_ode", 32, schedule="log_snr", ode_method="rk4")
    assert sol.nfe == 4 * 32


# ------------------------------------------------------------------ equivalences of methods
def _scale(x):
    return 1.0 + float(x.abs().max())


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_first_order_methods_agree_on_any_grid(sde_name):
    """DDIM (eta=0) == DPM-Solver-1 on an irregular grid; and on one or two steps, where
    only first-order updates happen, also DPM-Solver++(2M) (steps=1, or steps=2 with
    lower_order_final), DPM-Solver-2/3 and ++(2S) with the fast allocation (steps=1 -> [1]),
    and 3M (steps=1) -- noise- and data-prediction forms of the same exponential step."""
    sde, model, x_T, _ = gaussian_problem(sde_name)
    g = torch.Generator().manual_seed(5)
    inner = (torch.rand(6, generator=g, dtype=F64) * 0.9 + 0.05).sort(descending=True).values
    ts = torch.cat([torch.tensor([sde.T], dtype=F64), inner, torch.tensor([sde.default_t_end], dtype=F64)])
    a = solvers.sample(model, x_T, "ddim", timesteps=ts).x
    b = solvers.sample(model, x_T, "dpm_solver_1", timesteps=ts).x
    tol = 1e-12 * _scale(x_T)
    assert float((a - b).abs().max()) < tol
    for grid in ([sde.T, 0.3], [sde.T, 0.4, 0.05], [0.7, 0.2]):
        ref = solvers.sample(model, x_T, "ddim", timesteps=grid).x
        cands = {"dpm_solver_1": {}, "dpmpp_2m": {"lower_order_final": True},
                 "dpmpp_3m": {"lower_order_final": True}}
        if len(grid) == 2:
            cands.update({"dpmpp_2m[plain]": {}, "dpmpp_3m[plain]": {}})
        for key, opts in cands.items():
            x = solvers.sample(model, x_T, _method(key), timesteps=grid, **opts).x
            assert float((x - ref).abs().max()) < tol, (key, grid)
        if len(grid) == 2:     # singlestep: one NFE of budget -> one first-order step
            for name in ("dpm_solver_2", "dpm_solver_3", "dpmpp_2s"):
                x = solvers.sample(model, x_T, name, 1, timesteps=grid).x
                assert float((x - ref).abs().max()) < tol, name


def test_lower_order_final_changes_only_the_last_steps():
    """True lowers only the final orders, False keeps the reference codes' orders, and the
    default (None) applies the few-step rule below FEW_STEPS steps: final orders lowered and
    order 3 only where the step is at most FEW_STEP_MAX_H in lambda."""
    from solvers.exponential import FEW_STEP_MAX_H, FEW_STEPS
    sde, model, x_T, _ = gaussian_problem("vp")
    sol = solvers.sample(model, x_T, "dpmpp_3m", 6, lower_order_final=True)
    assert sol.stats["orders"] == [1, 2, 3, 3, 2, 1]
    assert solvers.sample(model, x_T, "dpmpp_3m", 6, lower_order_final=False).stats["orders"] == [1, 2, 3, 3, 3, 3]
    assert solvers.sample(model, x_T, "dpmpp_3m", 6, warmup="singlestep",
                          lower_order_final=False).stats["orders"] == [2, 2, 3, 3, 3, 3]
    lam = 0.5 * sde.log_snr(solvers.make_grid(sde, 6, "log_snr").t)
    h = (lam[1:] - lam[:-1]).tolist()
    expected = [2 if k == 3 and hi > FEW_STEP_MAX_H else k for k, hi in zip([1, 2, 3, 3, 2, 1], h)]
    assert max(h) > FEW_STEP_MAX_H  # the cap matters on this grid
    assert solvers.sample(model, x_T, "dpmpp_3m", 6).stats["orders"] == expected
    # FEW_STEPS steps and more: the default is the reference codes' orders
    assert solvers.sample(model, x_T, "dpmpp_3m", FEW_STEPS).stats["orders"] == [1, 2] + [3] * (FEW_STEPS - 2)


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
@pytest.mark.parametrize("method,options", [("dpmpp_2m_sde", {}), ("dpmpp_2m_sde", {"solver_type": "heun"}),
                                            ("dpmpp_3m_sde", {})])
def test_sde_variants_with_eta_zero_are_the_ode_methods(method, options, sde_name):
    sde, model, x_T, _ = gaussian_problem(sde_name)
    ode = method.replace("_sde", "")
    a = solvers.sample(model, x_T, method, 9, eta=0.0, generator=torch.Generator().manual_seed(0), **options).x
    b = solvers.sample(model, x_T, ode, 9, **options).x
    assert float((a - b).abs().max()) < 1e-12 * _scale(x_T)


@pytest.mark.parametrize("prediction", ["x0", "v", "score", "edm", "flow"])
@pytest.mark.parametrize("sde_name", ["vp", "ve"])
@pytest.mark.parametrize("method,options", [("dpmpp_2m", {}), ("heun", {}), ("dpm_solver_3", {}),
                                            ("euler", {}), ("dpmpp_3m", {"warmup": "singlestep"})])
def test_parameterisations_give_the_same_samples(prediction, sde_name, method, options):
    sde, model, x_T, _ = gaussian_problem(sde_name)
    ref = solvers.sample(model, x_T, method, 12, **options).x
    other = gaussian_target().as_model(sde, prediction)
    x = solvers.sample(other, x_T, method, 12, **options).x
    assert float((x - ref).abs().max()) < 1e-12 * _scale(ref)


# ------------------------------------------------------------------ exactness for point masses
_POINT = scoresde.Gaussian(torch.tensor([0.7, -1.3], dtype=F64), 0.0)
_EXACT_METHODS = [("heun", {}), ("ddim", {}), ("dpm_solver_1", {}), ("dpm_solver_2", {}), ("dpm_solver_3", {}),
                  ("dpmpp_2s", {}), ("dpmpp_2m", {}), ("dpmpp_2m", {"solver_type": "heun"}),
                  ("dpmpp_3m", {}), ("dpmpp_3m", {"warmup": "singlestep"}),
                  ("dpmpp_3m", {"lower_order_final": True})]


def _point_mass_exact(sde, x_T, t_end):
    t1, t0 = torch.tensor(t_end, dtype=F64), torch.tensor(sde.T, dtype=F64)
    mu = _POINT.mean
    return sde.alpha(t1) * mu + sde.sigma(t1) / sde.sigma(t0) * (x_T - sde.alpha(t0) * mu)


@pytest.mark.parametrize("method,options", _EXACT_METHODS,
                         ids=[f"{m}{'-' + '-'.join(map(str, o.values())) if o else ''}" for m, o in _EXACT_METHODS])
@given(steps=st.integers(1, 30), schedule=st.sampled_from(solvers.SCHEDULES), sde_name=st.sampled_from(SDE_NAMES))
def test_exponential_integrators_exact_for_point_mass(method, options, steps, schedule, sde_name):
    """Data = delta(mu): x0 (and eps along the flow) is constant, so DDIM / DPM-Solver /
    DPM-Solver++ reproduce the exact flow alpha(t_end) mu + sigma(t_end)/sigma(T) (x_T - alpha(T) mu)
    for ANY steps, schedule and LinearSDE.  So does EDM's Heun: in the scaled
    variables x/alpha, sigma/alpha that flow is a straight line, which Euler/Heun steps follow."""
    sde = make_sde(sde_name)
    model = _POINT.as_model(sde)
    x_T = sde.prior_sample((3, 2), generator=torch.Generator().manual_seed(steps), dtype=F64)
    sol = solvers.sample(model, x_T, method, steps, schedule=schedule, **options)
    exact = _point_mass_exact(sde, x_T, sol.timesteps[-1].item())
    # round-off only.  The noise-prediction stages of DPM-Solver-2/3 are ill-conditioned for a
    # single huge step (T -> t_end in one go: the stage's eps difference is scaled by
    # sigma_t e^h / sigma_s1 and alpha_t / alpha_s, about 1/alpha_T^2 = 1e6 for rectified flow):
    # measured worst 1.6e-10 there, <= 8e-13 for every other method
    tol = 1e-9 if method in ("dpm_solver_2", "dpm_solver_3") else 1e-11
    assert float((sol.x - exact).abs().max()) < tol * _scale(x_T)


def test_euler_in_t_is_not_exact_for_point_mass():
    """Sanity check of the property above: it is not trivially true (Euler in t is not an
    exponential integrator)."""
    sde = scoresde.VPSDE()
    x_T = sde.prior_sample((3, 2), generator=torch.Generator().manual_seed(0), dtype=F64)
    sol = solvers.sample(_POINT.as_model(sde), x_T, "euler", 5)
    assert float((sol.x - _point_mass_exact(sde, x_T, sde.default_t_end)).abs().max()) > 1e-4


@pytest.mark.parametrize("sde_name", ["vp", "ve", "edm", "cosine"])
@pytest.mark.parametrize("method,options", [("dpmpp_2m_sde", {"eta": 1.0}), ("dpmpp_2m_sde", {"eta": 0.4}),
                                            ("dpmpp_2m_sde", {"eta": 1.0, "solver_type": "heun"}),
                                            ("dpmpp_3m_sde", {"eta": 1.0}), ("ddim", {"eta": 1.0})])
def test_sde_variants_mean_path_exact_for_point_mass(method, options, sde_name):
    """With zero noise the SDE variants follow the conditional mean exactly for point-mass
    data: x(t) = alpha_t mu + (sigma_t/sigma_T) e^{-eta (lambda_t - lambda_T)} (x_T - alpha_T mu)
    (lambda = log(alpha/sigma)); this pins the data-prediction weight c (1 - e^{-c h}), c = 1 + eta."""
    sde = make_sde(sde_name)
    x_T = sde.prior_sample((3, 2), generator=torch.Generator().manual_seed(1), dtype=F64)
    sol = solvers.sample(_POINT.as_model(sde), x_T, method, 11, generator=ZeroNoise(), **options)
    eta = options["eta"]
    t1, t0 = torch.tensor(sde.default_t_end, dtype=F64), torch.tensor(sde.T, dtype=F64)
    if method == "ddim":      # DDIM's eta scales the noise std, c_i = eta sigma_{i+1} sqrt(1 - e^{-2h_i})
        tab = solvers.get("ddim", eta=eta).prepare(sde, solvers.make_grid(sde, 11, "uniform"), x_T)
        r = torch.prod(tab.eps_coef / tab.sigma[:-1])
        exact = sde.alpha(t1) * _POINT.mean + r * (x_T - sde.alpha(t0) * _POINT.mean)
    else:
        h = 0.5 * (sde.log_snr(t1) - sde.log_snr(t0))
        exact = sde.alpha(t1) * _POINT.mean + sde.sigma(t1) / sde.sigma(t0) * torch.exp(-eta * h) * (
            x_T - sde.alpha(t0) * _POINT.mean)
    assert float((sol.x - exact).abs().max()) < 1e-11 * _scale(x_T)


# ------------------------------------------------------------------ affine structure
@pytest.mark.parametrize("sde_name", ["vp", "ve"])
@pytest.mark.parametrize("method,options", [(m, {}) for m in DETERMINISTIC] + [
    ("dpmpp_2m", {"solver_type": "heun"}), ("dpmpp_3m", {"warmup": "singlestep"}),
    ("dpm_solver_3", {"allocation": "fixed"}), ("pf_ode", {"ode_method": "rk4"})])
def test_map_is_affine_on_gaussian(method, options, sde_name):
    """Phi(l a + (1-l) b) == l Phi(a) + (1-l) Phi(b): no hidden nonlinearity (clipping,
    thresholding, data-dependent control) and no history leaking between samples or calls."""
    sde, model, x_T, _ = gaussian_problem(sde_name)
    a, b = x_T[:3], x_T[3:6]
    lam = torch.tensor([0.3, -0.7, 1.9], dtype=F64)[:, None]
    batch = torch.cat([a, b, lam * a + (1 - lam) * b])
    for _ in range(2):      # twice: a reused solver/model carries nothing over
        phi = solvers.sample(model, batch, method, 9, **options).x
        pa, pb, pc = phi[:3], phi[3:6], phi[6:]
        assert float((pc - (lam * pa + (1 - lam) * pb)).abs().max()) < 1e-10 * _scale(phi)


# ------------------------------------------------------------------ DPM-Solver-fast allocation
@pytest.mark.parametrize("method", ["dpm_solver_2", "dpm_solver_3", "dpmpp_2s"])
@pytest.mark.parametrize("steps", range(1, 13))
def test_fast_allocation_nfe_equals_steps(method, steps):
    sde, model, x_T, _ = gaussian_problem("vp")
    nfe0 = model.nfe
    sol = solvers.sample(model, x_T, method, steps)
    orders = sol.stats["orders"]
    assert sol.nfe == steps == model.nfe - nfe0 == solvers.get(method).expected_nfe(steps)
    assert sum(orders) == steps and len(orders) == sol.timesteps.numel() - 1
    p = solvers.get(method).order
    assert max(orders) <= p and all(k >= 1 for k in orders)
    # as many full-order steps as the budget allows (DPM-Solver sec. 3.4)
    assert len(orders) == -(-steps // p) + (1 if p == 3 and steps % 3 == 0 and steps > 0 else 0)


def test_fixed_allocation():
    sde, model, x_T, _ = gaussian_problem("vp")
    sol = solvers.sample(model, x_T, "dpm_solver_3", 9, allocation="fixed")
    assert sol.stats["orders"] == [3, 3, 3] and sol.nfe == 9
    with pytest.raises(ValueError, match=r"allocation='fixed' needs steps divisible by the order 3, got steps=4"):
        solvers.sample(model, x_T, "dpm_solver_3", 4, allocation="fixed")


# ------------------------------------------------------------------ interval splitting
@pytest.mark.parametrize("method,options", [("euler", {}), ("ddim", {}), ("dpm_solver_1", {}),
                                            ("heun", {"last_step_euler": False}), ("dpm_solver_2", {}),
                                            ("dpm_solver_3", {}), ("dpmpp_2s", {})])
def test_one_step_methods_split_exactly(method, options):
    """One-step methods: solving on timesteps[:k+1] then on timesteps[k:] is the same solve
    (bitwise).  (Singlestep methods on an explicit grid take full-order steps everywhere.)"""
    sde, model, x_T, _ = gaussian_problem("vp")
    ts = solvers.make_grid(sde, 8, "log_snr").t
    whole = solvers.sample(model, x_T, method, timesteps=ts, **options).x
    for k in (1, 3, 7):
        mid = solvers.sample(model, x_T, method, timesteps=ts[:k + 1], **options).x
        split = solvers.sample(model, mid, method, timesteps=ts[k:], **options).x
        assert torch.equal(split, whole), k


def test_multistep_split_restarts_the_history():
    """Multistep methods carry no state between calls (the history is a value ``step``
    returns): a second call starts its history afresh (first-order step), so a split solve
    differs from the whole one at the method's error level -- the documented behaviour."""
    sde, model, x_T, exact = gaussian_problem("vp")
    ts = solvers.make_grid(sde, 16, "log_snr").t
    whole = solvers.sample(model, x_T, "dpmpp_2m", timesteps=ts)
    mid = solvers.sample(model, x_T, "dpmpp_2m", timesteps=ts[:9])
    split = solvers.sample(model, mid.x, "dpmpp_2m", timesteps=ts[8:])
    assert split.stats["orders"][0] == 1 and whole.stats["orders"][8] == 2
    diff = float((split.x - whole.x).abs().max())
    assert 0 < diff < 10 * float((whole.x - exact).abs().max())


def test_no_private_imports_of_other_packages():
    """The library reads other packages through their public API only (a private module such as
    ``torchdiffeq._impl`` can change in any release)."""
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    pat = re.compile(r"^\s*(?:from|import)\s+(?!solvers|scoresde|validation)[A-Za-z][\w.]*\._\w", re.M)
    bad = [f"{p.relative_to(root)}: {m.group(0).strip()}" for d in ("solvers", "scoresde", "validation")
           for p in (root / d).rglob("*.py") for m in pat.finditer(p.read_text())]
    assert bad == []
