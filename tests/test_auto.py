"""method="auto": a fixed, deterministic rule; exactly the budget's NFE; it records its choice and
equals the configuration it names; bad input is refused before any network call."""
import math

import pytest
import torch

import scoresde
import solvers
from solvers import auto
from validation.problems import end_time, mixture2d_problem

F64 = torch.float64


@pytest.fixture(scope="module")
def vp_case():
    sde = scoresde.VPSDE()
    target = mixture2d_problem()
    model = target.as_model(sde, "eps")
    x_T = target.marginal(sde, sde.T).sample(32, torch.Generator().manual_seed(0))
    return sde, target, model, x_T


def test_rule_table_is_ordered_and_covers_every_budget():
    starts = [row[0] for row in auto.RULE]
    assert starts[0] == 1 and starts == sorted(starts) and len(set(starts)) == len(starts)
    for budget in range(1, 120):
        c = auto.choose(budget)
        assert c["method"] in solvers.available_methods()
        solvers.get(c["method"], **c["options"])          # valid options
        assert c["steps"] == budget + (1 if c["analytic_first_step"] else 0)
        assert auto.choose(budget) == c                   # deterministic


@pytest.mark.parametrize("budget", [1, 2, 3, 5, 6, 8, 10, 15, 20, 50])
@pytest.mark.parametrize("final_denoise", [False, True])
def test_spends_exactly_the_budget_and_equals_the_named_configuration(vp_case, budget, final_denoise):
    sde, _, model, x_T = vp_case
    t_end = end_time(sde)
    sol = solvers.sample(model, x_T, "auto", budget, t_end=t_end, final_denoise=final_denoise)
    assert sol.nfe == budget + (1 if final_denoise else 0)
    c = sol.stats["auto"]
    assert c["budget"] == budget and c == dict(auto.choose(budget), budget=budget)
    ts = auto.auto_timesteps(sde, c["steps"], c["grid"], c["grid_param"], t_end=t_end)
    same = solvers.sample(model, x_T, c["method"], timesteps=ts, final_denoise=final_denoise,
                          analytic_first_step=c["analytic_first_step"], **c["options"])
    assert torch.equal(sol.x, same.x)
    again = solvers.sample(model, x_T, "auto", budget, t_end=t_end, final_denoise=final_denoise)
    assert torch.equal(sol.x, again.x)


def test_accuracy_improves_with_the_budget(vp_case):
    """Against the exact map (tight reference): 50 NFE at least 10x better than 5 NFE, and no
    budget from 5 to 50 worse than 2.5x the previous one.  (The rule is chosen per budget, not
    made monotone: on this mixture 8 NFE, a log-SNR grid, is 2.1x worse than 6 NFE, a
    quadratic grid with the analytic first step; docs/few-steps.md.)"""
    sde, target, model, x_T = vp_case
    t_end = end_time(sde)
    ref = solvers.sample(model, x_T, "pf_ode", t_end=t_end, rtol=1e-10, atol=1e-10, ode_method="dopri8").x
    errs = []
    for budget in (5, 6, 8, 10, 15, 20, 50):
        x = solvers.sample(model, x_T, "auto", budget, t_end=t_end).x
        errs.append(float((x - ref).pow(2).mean().sqrt()))
    assert all(math.isfinite(e) for e in errs)
    assert errs[-1] < 0.1 * errs[0], errs
    assert all(b <= 2.5 * a for a, b in zip(errs, errs[1:])), errs


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve", "cosine", "edm", "rf"])
def test_every_sde_family_finite_and_better_than_ddim_at_equal_nfe(sde_name):
    sde = scoresde.make_sde(sde_name)
    target = mixture2d_problem()
    model = target.as_model(sde, "eps")
    x_T = target.marginal(sde, sde.T).sample(32, torch.Generator().manual_seed(1))
    t_end = end_time(sde)
    ref = solvers.sample(model, x_T, "pf_ode", t_end=t_end, rtol=1e-10, atol=1e-10, ode_method="dopri8").x
    for budget in (5, 10, 20):
        x = solvers.sample(model, x_T, "auto", budget, t_end=t_end).x
        d = solvers.sample(model, x_T, "ddim", budget, t_end=t_end, schedule="log_snr").x
        e_auto = float((x - ref).pow(2).mean().sqrt())
        e_ddim = float((d - ref).pow(2).mean().sqrt())
        assert math.isfinite(e_auto) and e_auto <= e_ddim, (sde_name, budget, e_auto, e_ddim)


@pytest.mark.parametrize("power, schedule", [(1.0, "uniform"), (2.0, "quadratic")])
def test_vp_time_grid_is_the_vp_schedule_on_vp_and_the_same_log_snrs_elsewhere(power, schedule):
    vp = scoresde.VPSDE()
    t = auto.auto_timesteps(vp, 7, "vp_time", power, t_end=end_time(vp))
    ref = solvers.make_grid(vp, 7, schedule, t_end=end_time(vp)).t
    torch.testing.assert_close(t, ref, rtol=1e-12, atol=1e-13)
    for name in ("subvp", "cosine", "edm", "rf"):
        sde = scoresde.make_sde(name)
        t_s = auto.auto_timesteps(sde, 7, "vp_time", power, t_end=end_time(sde))
        lam = sde.log_snr(t_s)
        # the VP grid over the same log-SNR interval has the same nodes
        vp_ends = vp.t_of_log_snr_unchecked(lam[[0, -1]])
        big_vp = scoresde.VPSDE(T=max(1.0, float(vp_ends[0]) * 1.01))
        t_vp = auto.auto_timesteps(big_vp, 7, "vp_time", power, t_start=float(vp_ends[0]), t_end=float(vp_ends[1]))
        torch.testing.assert_close(lam, big_vp.log_snr(t_vp), rtol=1e-9, atol=1e-9)


class _Counting:
    def __init__(self, target, sde):
        self.calls, self.target, self.sde = 0, target, sde

    def __call__(self, x, t):
        self.calls += 1
        return self.target.eps(x, t, self.sde)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(schedule="log_snr"), ValueError, "schedule"),
    (dict(timesteps=[1.0, 0.5, 0.01]), ValueError, "timesteps"),
    (dict(order=2), TypeError, "method options"),
    (dict(generator=torch.Generator()), ValueError, "generator"),
    (dict(analytic_first_step=True), ValueError, "analytic_first_step"),
    (dict(calibration="grid.pt"), TypeError, "calibration"),
    (dict(steps=0), ValueError, "steps"),
    (dict(steps=None), ValueError, "steps"),
    (dict(steps=2.5), TypeError, "steps"),
])
def test_bad_input_is_named_before_any_network_call(kwargs, err, match):
    sde = scoresde.VPSDE()
    target = mixture2d_problem()
    net = _Counting(target, sde)
    model = scoresde.ScoreModel(net, sde, "eps")
    kwargs = {"steps": 5, **kwargs}
    with pytest.raises(err, match=match):
        solvers.sample(model, torch.zeros(4, 2, dtype=F64), "auto", **kwargs)
    assert net.calls == 0


def test_a_calibrated_grid_replaces_the_table_only_when_passed(vp_case):
    sde, target, model, x_T = vp_case
    x_cal = target.marginal(sde, sde.T).sample(32, torch.Generator().manual_seed(5))
    cal = solvers.calibrate_timesteps(model, x_cal, 6, method="dpmpp_2m", t_end=end_time(sde), max_trials=20)
    sol = solvers.sample(model, x_T, "auto", 6, t_end=end_time(sde), calibration=cal)
    same = solvers.sample(model, x_T, cal.method, timesteps=cal.timesteps, **cal.method_options)
    assert torch.equal(sol.x, same.x) and sol.nfe == 6
    assert sol.stats["auto"]["grid"] == "calibrated"
    with pytest.raises(ValueError, match="calibration"):
        solvers.sample(model, x_T, "auto", 5, t_end=end_time(sde), calibration=cal)
