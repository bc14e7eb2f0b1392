"""Edge inputs at the library's boundary: SDE parameters whose schedule float64 cannot hold,
states that hold no values, Heun steps a dtype cannot carry, and low-precision time grids.

Each bad input is a ValueError naming the argument and the valid range, raised before any
network call; each valid neighbour of a bad input still works.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

import scoresde
import solvers
from scoresde import CosineVPSDE, DiscreteVPSDE, EDMSDE, RectifiedFlowSDE, SubVPSDE, VESDE, VPSDE
from scoresde.checkpoint import sde_from_config

F64 = torch.float64
TARGET = scoresde.Gaussian(torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([0.5, 0.1], dtype=F64))


def _x(sde, n=8, dtype=F64, seed=0):
    return sde.prior_sample((n, 2), dtype=dtype, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------- SDE constructor arguments
@pytest.mark.parametrize("make, pattern", [
    # alpha(T) = exp(-5e18) is 0 in float64: the samplers divided by it (ZeroDivisionError)
    (lambda: VPSDE(T=1e9),
     r"alpha underflows\); T must be in \[.*, 8\.3\d*\] for beta_min=0\.1, beta_max=20"),
    (lambda: VPSDE(T=100.0), r"T must be in \[.*, 8\.3\d*\]"),
    (lambda: SubVPSDE(T=1e9), r"SubVPSDE.*T must be in"),
    (lambda: VPSDE(beta_max=1e300), r"beta_max=1e\+300.*T must be in"),
    (lambda: VPSDE(beta_min=1e-300, beta_max=1e-300), r"sigma underflows.*beta_min=1e-300"),
    (lambda: VESDE(sigma_min=1e-5, sigma_max=1e200), r"sigma_min and sigma_max must be in \[1e-150, 1e150\]"),
    (lambda: VESDE(sigma_min=1e-300, sigma_max=1.0), r"sigma_min and sigma_max must be in"),
    (lambda: EDMSDE(sigma_min=1e-300, sigma_max=1e300), r"sigma_min and sigma_max must be in"),
    (lambda: EDMSDE(sigma_min=1e-320, sigma_max=1.0), r"sigma underflows.*sigma_min and sigma_max"),
    (lambda: CosineVPSDE(T=1e-4), r"T=0\.0001 is below the default t_end=0\.001.*T must be in \[0\.001, 1\)"),
    (lambda: RectifiedFlowSDE(T=1e-300), r"T must be in \[0\.001, 1\)"),
    (lambda: DiscreteVPSDE(betas=[1.0 - 1e-16] * 1000), r"alphas_cumprod\[-1\] .* must be >= 1e-300"),
    (lambda: DiscreteVPSDE(betas=[1e-310] * 10), r"sigma underflows.*betas\[0\]"),
], ids=["vp_T_1e9", "vp_T_100", "subvp_T_1e9", "vp_beta_max_huge", "vp_betas_tiny", "ve_sigma_max_huge",
        "ve_sigma_min_tiny", "edm_absurd", "edm_sigma_min_subnormal", "cosine_T_below_t_end",
        "rf_T_below_t_end", "discrete_alpha_underflow", "discrete_betas_subnormal"])
def test_sde_rejects_a_schedule_float64_cannot_hold(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


def test_checkpoint_config_with_absurd_T_fails_when_loaded():
    """A config written with T=1e9 used to load and then divide by alpha(T) = 0 in the sampler."""
    with pytest.raises(ValueError, match=r"\bT must be in"):
        sde_from_config({"class": "VPSDE", "beta_min": 0.1, "beta_max": 20.0, "T": 1e9})


@pytest.mark.parametrize("sde_cls", [VPSDE, SubVPSDE])
def test_vp_valid_T_range_in_the_message_is_the_boundary(sde_cls):
    """The T range the message states is where construction switches from failing to working,
    and a VP process just inside it samples to a finite, correct-mean answer in float64."""
    with pytest.raises(ValueError) as info:
        sde_cls(T=1e3)
    lo, hi = map(float, re.search(r"T must be in \[([^,]+), ([^\]]+)\]", str(info.value)).groups())
    with pytest.raises(ValueError):
        sde_cls(T=hi * 1.001)
    with pytest.raises(ValueError):
        sde_cls(T=lo * 0.999)
    sde = sde_cls(T=hi * 0.999)
    T = torch.tensor(sde.T, dtype=F64)
    assert float(sde.alpha(T)) > 0.0 and math.isfinite(float(sde.log_snr(T)))
    out = solvers.sample(TARGET.as_model(sde), _x(sde, 128), "dpm_solver_1", steps=60, schedule="log_snr").x
    torch.testing.assert_close(out.mean(0), TARGET.mean, atol=0.15, rtol=0.0)


def test_sde_valid_neighbours_still_construct():
    """Inputs just inside the valid ranges construct, and their schedules are finite at both ends."""
    for sde in (VPSDE(T=8.0), SubVPSDE(T=8.0), VPSDE(beta_min=1e-3, beta_max=1e-3),
                VESDE(sigma_min=1e-100, sigma_max=1e100), EDMSDE(sigma_min=1e-100, sigma_max=1e100),
                CosineVPSDE(T=1e-3),                   # T equal to the default t_end
                RectifiedFlowSDE(T=1.0 - 1e-16),
                DiscreteVPSDE(betas=[0.5]),            # N = 1: default t_end = T
                DiscreteVPSDE(betas=[0.999] * 100)):   # alphas_cumprod[-1] = 1e-300
        ends = torch.tensor([sde.default_t_end, sde.T], dtype=F64)
        assert 0.0 < sde.default_t_end <= sde.T
        assert bool(torch.isfinite(sde.log_snr(ends)).all()), sde


# ------------------------------------------------------------- a state that holds no values
def _meta():
    return torch.empty(4, 2, dtype=F64, device="meta")


@pytest.mark.parametrize("method", ["euler", "dpmpp_2m", "pf_ode"])
def test_sample_rejects_x_T_on_meta(method):
    model = TARGET.as_model(VPSDE())
    with pytest.raises(ValueError, match=r"x_T is on the meta device"):
        solvers.sample(model, _meta(), method, steps=3)
    assert model.nfe == 0


def test_log_likelihood_rejects_x_on_meta():
    model = TARGET.as_model(VPSDE())
    with pytest.raises(ValueError, match=r"\bx is on the meta device"):
        solvers.log_likelihood(model, _meta())
    assert model.nfe == 0


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(timesteps=torch.linspace(1.0, 1e-3, 5, device="meta")), r"timesteps is on the meta device"),
    (dict(steps=3, t_end=torch.tensor(1e-3, device="meta")), r"t_end is on the meta device"),
], ids=["timesteps", "t_end"])
def test_sample_rejects_times_on_meta(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        solvers.sample(TARGET.as_model(VPSDE()), _x(VPSDE()), "euler", **kwargs)


def test_sample_rejects_a_sparse_x_T():
    with pytest.raises(ValueError, match=r"x_T must be a dense \(strided\) tensor, got layout torch\.sparse"):
        solvers.sample(TARGET.as_model(VPSDE()), torch.randn(4, 2, dtype=F64).to_sparse(), "euler", steps=3)


# ------------------------------------------------------------- Heun steps the dtype cannot carry
@pytest.mark.parametrize("T, dtype", [(5.0, torch.float32), (3.0, torch.float32), (4.0, F64)])
def test_heun_rejects_steps_that_return_rounding_noise(T, dtype):
    """VPSDE(T=5) in float32 overflowed inside the step (RuntimeError); T=3 in float32 and T=4 in
    float64 returned samples of size 1e3-1e10 for a target of size 1.  The default Karras grid's
    last step multiplies alpha by 1e12-1e47; now a ValueError before any network call."""
    sde = VPSDE(T=T)
    model = TARGET.as_model(sde)
    pattern = rf"heun cannot take the step from t=.* in {dtype}: .*alpha\(t_next\)/alpha\(t\)"
    with pytest.raises(ValueError, match=pattern):
        solvers.sample(model, _x(sde, dtype=dtype), "heun", steps=10)
    assert model.nfe == 0


def test_heun_large_T_message_suggests_float64_only_when_it_helps():
    sde = VPSDE(T=3.0)
    with pytest.raises(ValueError, match=r"pass x_T in float64"):
        solvers.sample(TARGET.as_model(sde), _x(sde, dtype=torch.float32), "heun", steps=10)
    sde = VPSDE(T=5.0)
    with pytest.raises(ValueError) as info:
        solvers.sample(TARGET.as_model(sde), _x(sde, dtype=torch.float32), "heun", steps=10)
    assert "float64" not in str(info.value).split(";")[-1]


def test_heun_float32_matches_float64_where_the_steps_are_representable():
    """The neighbouring valid problem: T=2 on a log-SNR grid, same x_T in both dtypes."""
    sde = VPSDE(T=2.0)
    model = TARGET.as_model(sde)
    x = _x(sde, 64)
    out64 = solvers.sample(model, x, "heun", steps=20, schedule="log_snr").x
    out32 = solvers.sample(model, x.float(), "heun", steps=20, schedule="log_snr").x
    torch.testing.assert_close(out32.double(), out64, atol=1e-4, rtol=1e-4)


def test_heun_coefficients_from_logs_equal_the_sigma_hat_form():
    """alpha_{i+1}(s_{i+1} - s_i) = -sigma_{i+1} expm1(h_i), s = sigma/alpha, h in log(alpha/sigma)."""
    sde = VPSDE()
    grid = solvers.timesteps.make_grid(sde, 12, "karras")
    tab = solvers.get("heun").prepare(sde, grid, torch.zeros(1, dtype=F64))
    c = sde.coefficients(grid.t)
    s_hat = c["sigma"] / c["alpha"]
    ref_euler = c["alpha"][1:] * (s_hat[1:] - s_hat[:-1])
    ref_scale = c["alpha"][1:] / c["alpha"][:-1]
    torch.testing.assert_close(torch.tensor(tab.euler_f, dtype=F64), ref_euler, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(torch.tensor(tab.scale_f, dtype=F64), ref_scale, rtol=1e-12, atol=0.0)
    # the one formula that heun, edm_sde and restart share (heun_step halves euler exactly)
    scale, euler = solvers.ode.heun_coefficients(tab.alpha64, tab.sigma64, tab.lam64)
    assert scale.tolist() == tab.scale_f and euler.tolist() == tab.euler_f


# ------------------------------------------------------------- low-precision time grids
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_timesteps_whose_last_entry_is_t_end(dtype):
    """float32(1e-3) = 1.00000005e-3 differs from t_end=1e-3 by rounding only: accepted, and the
    grid ends exactly at t_end (the same call as with the float64 grid ending there)."""
    sde = VPSDE()
    model = TARGET.as_model(sde)
    ts = torch.linspace(1.0, 1e-3, 11, dtype=dtype)
    sol = solvers.sample(model, _x(sde), "euler", timesteps=ts, t_end=1e-3)
    assert float(sol.timesteps[-1]) == 1e-3
    ref_grid = ts.to(F64)
    ref_grid[-1] = 1e-3
    ref = solvers.sample(model, _x(sde), "euler", timesteps=ref_grid)
    torch.testing.assert_close(sol.x, ref.x, rtol=0.0, atol=0.0)
    torch.testing.assert_close(sol.timesteps, ref.timesteps, rtol=0.0, atol=0.0)


def test_low_precision_timesteps_still_reject_a_different_t_end():
    with pytest.raises(ValueError, match=r"t_end=0\.002 disagrees with timesteps\[-1\]"):
        solvers.sample(TARGET.as_model(VPSDE()), _x(VPSDE()), "euler",
                       timesteps=torch.linspace(1.0, 1e-3, 11, dtype=torch.float32), t_end=2e-3)
    with pytest.raises(ValueError, match=r"disagrees"):   # 1e-3 + 1e-9: more than float64 rounding
        solvers.sample(TARGET.as_model(VPSDE()), _x(VPSDE()), "euler",
                       timesteps=torch.linspace(1.0, 1e-3, 11, dtype=F64), t_end=1e-3 + 1e-9)


def test_float32_timesteps_starting_at_T_are_inside_0_T():
    """float32(0.999) = 0.99900001 is above RectifiedFlowSDE's T = 0.999 by rounding only."""
    sde = RectifiedFlowSDE()
    ts = torch.linspace(sde.T, 1e-3, 6, dtype=torch.float32)
    assert float(ts[0]) > sde.T
    sol = solvers.sample(TARGET.as_model(sde), _x(sde), "euler", timesteps=ts)
    assert float(sol.timesteps[0]) == sde.T
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, T\]"):
        solvers.sample(TARGET.as_model(sde), _x(sde), "euler", timesteps=torch.tensor([0.9991, 0.5, 1e-3]))
