"""Optimised time grids (solvers/ays.py): the step-doubling local error against solvers' own
DDIM steps and its order, the equidistribution update, the grid's contract and cost, and bad
input -- on analytic problems, in float64."""
from __future__ import annotations

import pytest
import torch

import scoresde
import solvers
from solvers.ays import _redistribute, local_errors, propagation_weights

F64 = torch.float64


def _mixture():
    return __import__("_shared").calibration_mixture()


@pytest.mark.parametrize("sde", [scoresde.VPSDE(), scoresde.EDMSDE()], ids=["vp", "edm"])
def test_local_errors_are_ddim_step_doubling(sde):
    """e_0 = RMS(one DDIM step - two DDIM half-steps through the log-SNR midpoint), with the
    SDE's own alpha and sigma; the later intervals start from the two-half-step state."""
    target = _mixture()
    model = target.as_model(sde, "eps")
    x = target.marginal(sde, sde.T).sample(16, torch.Generator().manual_seed(1))
    t = solvers.make_grid(sde, 3, "log_snr", t_end=10 * sde.default_t_end).t
    e = local_errors(model, x, t)
    lsnr = sde.log_snr_unchecked(t)
    mids = sde.t_of_log_snr_unchecked(0.5 * (lsnr[:-1] + lsnr[1:]))
    state = x
    for k in range(3):
        one = solvers.sample(model, state, "ddim", timesteps=torch.stack([t[k], t[k + 1]])).x
        two = solvers.sample(model, state, "ddim", timesteps=torch.stack([t[k], mids[k], t[k + 1]])).x
        assert float(e[k]) == pytest.approx(float((one - two).pow(2).mean().sqrt()), rel=1e-9)
        state = two


def test_local_error_is_second_order_in_the_step():
    """DDIM's local error is O(h^2): the step-doubling estimate over one interval of width h in
    lambda, on a Gaussian, has a fitted log-log slope of 2."""
    sde = scoresde.VPSDE()
    target = scoresde.Gaussian(torch.tensor([1.0, -0.5], dtype=F64), torch.tensor([[0.3, 0.1], [0.1, 0.2]], dtype=F64))
    model = target.as_model(sde, "eps")
    t0 = 0.5
    x = target.marginal(sde, t0).sample(32, torch.Generator().manual_seed(2))
    lam0 = 0.5 * float(sde.log_snr(torch.tensor(t0, dtype=F64)))
    hs = torch.tensor([0.2, 0.1, 0.05, 0.025], dtype=F64)
    errs = []
    for h in hs:
        t1 = sde.t_of_log_snr_unchecked(torch.tensor(2 * (lam0 + float(h)), dtype=F64))
        errs.append(float(local_errors(model, x, torch.stack([torch.tensor(t0, dtype=F64), t1]))[0]))
    slope = torch.linalg.lstsq(torch.stack([hs.log(), torch.ones(4, dtype=F64)], 1),
                               torch.tensor(errs, dtype=F64).log()[:, None]).solution[0, 0]
    assert float(slope) == pytest.approx(2.0, abs=0.1)


def test_redistribute_equidistributes():
    lam = torch.tensor([0.0, 1.0, 2.0, 4.0, 8.0], dtype=F64)
    h = lam[1:] - lam[:-1]
    # constant local error per interval (kappa h^3 equal): already equidistributed, kept
    kappa = 1.0 / h ** 3
    assert torch.allclose(_redistribute(lam, kappa, 2, 0.0, 0.0), lam, rtol=1e-12, atol=1e-12)
    # damping 1: the old grid
    assert torch.allclose(_redistribute(lam, torch.rand(4, dtype=F64), 2, 0.0, 1.0 - 1e-15), lam, atol=1e-9)
    # constant kappa: uniform nodes
    new = _redistribute(lam, torch.ones(4, dtype=F64), 2, 0.0, 0.0)
    assert torch.allclose(new, torch.linspace(0.0, 8.0, 5, dtype=F64), atol=1e-12)
    # density kappa^(1/3): equal mass between new nodes
    kappa = torch.tensor([8.0, 1.0, 27.0, 1.0], dtype=F64)
    new = _redistribute(lam, kappa, 2, 0.0, 0.0)
    rho = kappa ** (1 / 3)

    def mass(a, b):
        return sum(float(rho[j]) * max(0.0, min(b, float(lam[j + 1])) - max(a, float(lam[j]))) for j in range(4))
    masses = [mass(float(a), float(b)) for a, b in zip(new[:-1], new[1:])]
    assert max(masses) == pytest.approx(min(masses), rel=1e-12)


@pytest.mark.parametrize("sde", [scoresde.VPSDE(), scoresde.CosineVPSDE()], ids=["vp", "cosine"])
def test_optimized_grid_contract_and_cost(sde):
    target = _mixture()
    model = target.as_model(sde, "eps")
    x = target.marginal(sde, sde.T).sample(32, torch.Generator().manual_seed(3))
    t_end = 10 * sde.default_t_end
    opt = solvers.optimize_timesteps(model, x, 7, t_end=t_end, iterations=3)
    t = opt.timesteps
    assert t.dtype == F64 and t.device.type == "cpu" and t.numel() == 8
    assert float(t[0]) == sde.T and float(t[-1]) == t_end and bool((t[1:] < t[:-1]).all())
    assert opt.nfe == model.nfe == 2 * 7 * 3
    assert len(opt.history) == 3 and opt.objective == min(opt.history)
    assert opt.objective < opt.history[0]        # better than log-SNR-uniform by its own measure
    # the objective is the grid's own largest weighted local error estimate, g e / h^2 * h^3
    lam = 0.5 * sde.log_snr_unchecked(t)
    h = lam[1:] - lam[:-1]
    k = local_errors(model, x, t) * propagation_weights(sde, t, 0.5) / h ** 2
    assert float((k * h ** 3).max()) == pytest.approx(opt.objective, rel=1e-9)


def test_propagation_weights_are_the_gaussian_flow_jacobian():
    """For data N(mu, s^2 I) the exact flow from t_{k+1} to t_end scales a perturbation by g_k."""
    sde = scoresde.VPSDE()
    s = 0.3
    target = scoresde.Gaussian(torch.tensor([1.0, -2.0], dtype=F64), s ** 2 * torch.eye(2, dtype=F64))
    t = solvers.make_grid(sde, 4, "log_snr", 1e-2).t
    g = propagation_weights(sde, t, s)
    assert float(g[-1]) == pytest.approx(1.0, rel=1e-12)
    x = torch.tensor([[0.3, 0.7]], dtype=F64)
    for k in range(4):
        a = target.flow(x, float(t[k + 1]), float(t[-1]), sde)
        b = target.flow(x + 1e-3, float(t[k + 1]), float(t[-1]), sde)
        assert float((b - a)[0, 0] / 1e-3) == pytest.approx(float(g[k]), rel=1e-8)


def test_optimized_grid_beats_log_snr_for_a_second_order_method():
    """On the validation suite's 2-D mixture (VP, to sigma/alpha = 1e-2), DPM-Solver++(2M) on
    the optimised grid (fitted on 128 samples, 36 / 60 NFE) beats the log-SNR grid on 64 other
    samples at 6 and 10 steps (measured: 0.128 vs 0.189, 0.038 vs 0.081)."""
    from validation import problems as P
    prob = P.make_problems()["mixture2d"]
    sde = scoresde.VPSDE()
    model = prob.target.as_model(sde, "eps")
    te = P.end_time(sde)
    x_cal = P.start_samples(prob, sde, n=128, seed=1234)
    x = P.start_samples(prob, sde, n=64, seed=1)
    ref = P.reference_map(prob, model, x, sde.T, [te], tol=1e-10)[te]
    for steps in (6, 10):
        opt = solvers.optimize_timesteps(model, x_cal, steps, t_end=te)
        e_opt = P.rms(solvers.sample(model, x, "dpmpp_2m", timesteps=opt.timesteps).x, ref)
        e_std = P.rms(solvers.sample(model, x, "dpmpp_2m", steps, schedule="log_snr", t_end=te).x, ref)
        assert e_opt < 0.9 * e_std, (steps, e_opt, e_std)


def test_optimize_timesteps_bad_input_before_any_call():
    model, calls = __import__("_shared").counting_zero_model()
    x = torch.randn(4, 3, dtype=F64)
    with pytest.raises(ValueError, match="steps"):
        solvers.optimize_timesteps(model, x, 0)
    with pytest.raises(TypeError, match="steps"):
        solvers.optimize_timesteps(model, x, 2.5)
    with pytest.raises(ValueError, match="order"):
        solvers.optimize_timesteps(model, x, 4, order=0)
    with pytest.raises(ValueError, match="iterations"):
        solvers.optimize_timesteps(model, x, 4, iterations=0)
    with pytest.raises(ValueError, match="data_std"):
        solvers.optimize_timesteps(model, x, 4, data_std=0.0)
    for name in ("floor", "damping"):
        with pytest.raises(ValueError, match=name):
            solvers.optimize_timesteps(model, x, 4, **{name: 1.0})
        with pytest.raises(ValueError, match=name):
            solvers.optimize_timesteps(model, x, 4, **{name: "a"})
    with pytest.raises(ValueError, match="x_start"):
        solvers.optimize_timesteps(model, x[:0], 4)
    with pytest.raises(TypeError, match="model"):
        solvers.optimize_timesteps(model.net, x, 4)
    with pytest.raises(ValueError, match="t_end"):
        solvers.optimize_timesteps(model, x, 4, t_end=2.0)
    general = scoresde.ScoreModel(lambda x, t: -x, __import__("_shared").OU(), "score")
    with pytest.raises(TypeError, match="LinearSDE"):
        solvers.optimize_timesteps(general, x, 4)
    assert not calls
