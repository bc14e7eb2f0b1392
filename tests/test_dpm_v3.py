"""DPM-Solver-v3: reduction to DPM-Solver++ / DDIM with constant statistics, fitted orders on
the exact Gaussian flow with statistics estimated from exact data samples, the statistics
themselves (closed form for a Gaussian), save/load and bad input."""
import numpy as np
import pytest
import torch

import scoresde
import solvers
from solvers.ems import EMS
from validation import problems as P

F64 = torch.float64
SDE = scoresde.make_sde("vp")
T_END = P.end_time(SDE)
TARGET = P.gaussian_problem()
MODEL = TARGET.as_model(SDE)


def start(n=8, seed=1):
    x_T = TARGET.marginal(SDE, 1.0).sample(n, torch.Generator().manual_seed(seed))
    return x_T, TARGET.flow(x_T, 1.0, T_END, SDE)


@pytest.fixture(scope="module")
def ems():
    x0 = TARGET.sample(128, torch.Generator().manual_seed(5))
    return solvers.ems_statistics(MODEL, x0, grid_steps=16, t_start=1.0, t_end=T_END,
                                  generator=torch.Generator().manual_seed(6))


@pytest.mark.parametrize("schedule", ["log_snr", "uniform"])
@pytest.mark.parametrize("order,method,options", [
    (1, "ddim", {}), (2, "dpmpp_2m", {"solver_type": "heun", "min_gap_ratio": 0.0, "lower_order_final": False}),
    (3, "dpmpp_3m", {"min_gap_ratio": 0.0, "lower_order_final": False})])
def test_l_one_without_corrector_is_dpm_solver_pp(order, method, options, schedule):
    """l = 1, s = b = 0 (also the default ems=None): the exponential Adams-Bashforth method in
    data prediction, i.e. DPM-Solver++(1) = DDIM, DPM-Solver++(2M) with the exact linear
    interpolant, DPM-Solver++(3M), on any grid (their reference-code orders,
    ``lower_order_final=False``: dpm_solver_v3 has no few-step rule)."""
    x_T, _ = start()
    lam = 0.5 * SDE.coefficients(torch.tensor([1.0, T_END], dtype=F64))["log_snr"]
    ref = solvers.sample(MODEL, x_T, method, 7, t_end=T_END, schedule=schedule, **options).x
    for ems in (None, EMS.constant(float(lam[0]), float(lam[1]), 1.0, shape=(4,))):
        out = solvers.sample(MODEL, x_T, "dpm_solver_v3", 7, t_end=T_END, schedule=schedule, order=order,
                             ems=ems, use_corrector=False, min_gap_ratio=0.0)
        assert out.nfe == 7
        torch.testing.assert_close(out.x, ref, rtol=1e-12, atol=1e-12)


def test_l_zero_order_one_is_ddim():
    """l = 0, s = -1: noise prediction; the first-order step is DPM-Solver-1 = DDIM."""
    x_T, _ = start()
    lam = 0.5 * SDE.coefficients(torch.tensor([1.0, T_END], dtype=F64))["log_snr"]
    ems = EMS.constant(float(lam[0]), float(lam[1]), l=0.0, s=-1.0)
    out = solvers.sample(MODEL, x_T, "dpm_solver_v3", 6, t_end=T_END, order=1, ems=ems, use_corrector=False).x
    ref = solvers.sample(MODEL, x_T, "ddim", 6, t_end=T_END, schedule="log_snr").x
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # and l = 0 differs from l = 1 at order 2 (the test can fail)
    a = solvers.sample(MODEL, x_T, "dpm_solver_v3", 6, t_end=T_END, order=2, ems=ems, use_corrector=False).x
    b = solvers.sample(MODEL, x_T, "dpm_solver_v3", 6, t_end=T_END, order=2, use_corrector=False).x
    assert (a - b).abs().max() > 1e-4


def test_statistics_of_a_gaussian(ems):
    """For N(m, C), eps = sigma (alpha^2 C + sigma^2 I)^{-1}(x - alpha m), so
    grad_x(sigma eps) = sigma^2 (alpha^2 C + sigma^2 I)^{-1} and l is its diagonal, exactly (the
    Jacobian does not depend on x, so the sample average has no sampling error)."""
    c = SDE.coefficients(SDE.t_of_log_snr(2.0 * ems.lam))
    cov = TARGET.cov
    want = torch.stack([torch.diagonal(s * s * torch.linalg.inv(a * a * cov + s * s * torch.eye(4, dtype=F64)))
                        for a, s in zip(c["alpha"], c["sigma"])])
    torch.testing.assert_close(ems.l, want, rtol=1e-6, atol=1e-9)
    assert ems.nfe == 17 * 5 and ems.n_samples == 128        # (d + 1) calls per grid point
    assert torch.isfinite(ems.s).all() and ems.s.abs().max() > 0.5 and ems.b.abs().max() > 0.1


@pytest.mark.parametrize("order,use_corrector,expected", [(1, True, 2), (2, True, 3), (2, False, 2)])
def test_fitted_order_with_estimated_statistics(ems, order, use_corrector, expected):
    """Any statistics keep the ODE's solution exact (they only change what is interpolated), so
    the fitted order is the method's: predictor k, predictor + corrector k + 1."""
    x_T, exact = start()
    ladder = (32, 64, 128)
    errs = []
    for n in ladder:
        sol = solvers.sample(MODEL, x_T, "dpm_solver_v3", n, t_end=T_END, order=order, ems=ems,
                             use_corrector=use_corrector)
        assert sol.nfe == n
        errs.append(float((sol.x - exact).abs().max()))
    assert min(errs) > 1e-11
    fitted = float(-np.polyfit(np.log(ladder), np.log(errs), 1)[0])
    assert abs(fitted - expected) < 0.3, f"fitted order {fitted:.2f}, errors {errs}"


def test_statistics_help_at_few_steps(ems):
    """The point of the method: with the Gaussian's own statistics 8 steps beat l = 1."""
    x_T, exact = start(32)
    err = lambda e: float((solvers.sample(MODEL, x_T, "dpm_solver_v3", 8, t_end=T_END, ems=e).x  # noqa: E731
                           - exact).pow(2).mean().sqrt())
    assert err(ems) < 0.2 * err(None)


def test_save_load_round_trip(ems, tmp_path):
    path = tmp_path / "ems.pt"
    ems.save(path)
    back = EMS.load(path)
    for name in ("lam", "l", "s", "b"):
        assert torch.equal(getattr(back, name), getattr(ems, name))
    assert (back.nfe, back.n_samples) == (ems.nfe, ems.n_samples)


def test_bad_input(ems):
    x_T, _ = start()
    with pytest.raises(ValueError, match="ems has shape"):      # statistics of another dimension
        solvers.sample(MODEL, x_T[:, :2].contiguous(), "dpm_solver_v3", 5, t_end=T_END, ems=ems)
    with pytest.raises(ValueError, match="ems covers"):         # another log-SNR range
        solvers.sample(MODEL, x_T, "dpm_solver_v3", 5, t_end=1e-4, ems=ems)
    with pytest.raises(TypeError, match="ems must be"):
        solvers.sample(MODEL, x_T, "dpm_solver_v3", 5, ems={"l": 1})
    with pytest.raises(ValueError, match="order"):
        solvers.get("dpm_solver_v3", order=4)
    with pytest.raises(ValueError, match="stats.l"):
        EMS(ems.lam, ems.l[:-1], ems.s, ems.b)
    with pytest.raises(ValueError, match="strictly increasing"):
        EMS(ems.lam.flip(0), ems.l, ems.s, ems.b)
    with pytest.raises(ValueError, match="x0"):
        solvers.ems_statistics(MODEL, torch.zeros(1, 4, dtype=F64))
