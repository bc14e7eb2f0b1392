"""The per-sample Dormand-Prince engine (solvers.adaptive.solve_per_sample): order, batch
independence, per-sample failures, knots, evaluation counts."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from solvers.adaptive import STATUS_NAMES, solve_per_sample

F64 = torch.float64
N = 8
# per-sample parameters of y' = -a y + sin(w t) y^2 / (1 + y^2) (two components, coupled)
RATE = torch.linspace(0.5, 4.0, N, dtype=F64)
FREQ = torch.linspace(1.0, 9.0, N, dtype=F64)
Y0 = torch.stack([torch.linspace(0.5, 2.0, N, dtype=F64), torch.linspace(-1.0, 1.0, N, dtype=F64)], 1)


class Counting:
    """``rhs(t, y, idx)`` that counts its calls and the rows it was given."""

    def __init__(self, fn):
        self.fn, self.calls, self.rows, self.times = fn, 0, torch.zeros(N, dtype=torch.long), []

    def __call__(self, t, y, idx):
        self.calls += 1
        self.rows[idx] += 1
        self.times.append((t.clone(), idx.clone()))
        return self.fn(t, y, idx)


def nonlinear(t, y, idx):
    a, w = RATE[idx][:, None], FREQ[idx][:, None]
    y2 = y.flip(1)
    return -a * y + torch.sin(w * t[:, None]) * y2 ** 2 / (1 + y2 ** 2)


def solve(idx, fn=nonlinear, **kw):
    opts = dict(rtol=1e-7, atol=1e-9)
    opts.update(kw)
    return solve_per_sample(lambda t, y, j: fn(t, y, idx[j]), Y0[idx], 0.0, 2.0, **opts)


def test_global_error_is_fifth_order_in_the_step_count():
    # y' = cos(t) y, y(0) = 1: y(t) = exp(sin t); one sample per tolerance would mix controls,
    # so each tolerance is its own solve on a batch of three identical samples
    errs, steps = [], []
    for tol in (1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10):
        res = solve_per_sample(lambda t, y, i: torch.cos(t)[:, None] * y, torch.ones(3, 1, dtype=F64), 0.0, 6.0,
                               rtol=tol, atol=tol)
        assert res.status_names == ("success",) * 3
        errs.append(float((res.y[0, 0] - math.exp(math.sin(6.0))).abs()))
        steps.append(float(res.accepted[0]))
    x, y = torch.log(torch.tensor(steps)), torch.log(torch.tensor(errs))
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    assert -6.3 < slope < -4.5, (slope, errs, steps)   # measured -5.67


@settings(max_examples=6, deadline=None)
@given(st.lists(st.integers(0, N - 1), min_size=1, max_size=N, unique=True))
def test_each_sample_equals_its_solo_solve(members):
    idx = torch.tensor(members)
    batch = solve(idx)
    for j, i in enumerate(members):
        alone = solve(torch.tensor([i]))
        assert alone.status_names == ("success",)
        assert float((batch.y[j] - alone.y[0]).abs().max()) <= 1e-12
        assert int(batch.accepted[j]) == int(alone.accepted[0])
        assert int(batch.rejected[j]) == int(alone.rejected[0])


def test_a_nonfinite_sample_stops_alone():
    def poisoned(t, y, idx):
        out = nonlinear(t, y, idx)
        bad = (idx == 3)[:, None] & (t[:, None] > 0.7)
        return torch.where(bad, torch.full_like(out, float("nan")), out)

    every = torch.arange(N)
    res = solve(every, poisoned)
    assert res.status_names[3] == "nonfinite"
    assert 0.7 - 0.5 < float(res.t[3]) <= 0.7     # stopped where it failed, not at t1
    for i in (0, 2, 4, 7):
        assert res.status_names[i] == "success"
        assert float((res.y[i] - solve(torch.tensor([i])).y[0]).abs().max()) <= 1e-12


def test_max_steps_is_per_sample():
    # the fastest rate needs the most steps: a budget between the two ends fails it alone
    lo, hi = solve(torch.tensor([0])), solve(torch.tensor([N - 1]))
    budget = int(lo.accepted[0] + lo.rejected[0]) + 1
    assert int(hi.accepted[0] + hi.rejected[0]) > budget
    res = solve(torch.tensor([0, N - 1]), max_steps=budget)
    assert res.status_names == ("success", "max_steps")
    assert int(res.accepted[1] + res.rejected[1]) == budget
    assert float(res.t[1]) < 2.0
    assert torch.equal(res.y[0], lo.y[0])


def test_step_size_underflow_status():
    res = solve(torch.arange(2), dt_min=0.5)
    assert res.status_names == ("step_size_underflow",) * 2


def test_jump_t_steps_land_on_the_knots():
    # y' = 1 before t = 0.3, 5 after (per sample scaled): exact only if a step ends on 0.3
    knot = 0.3

    def piecewise(t, y, idx):
        return torch.where(t[:, None] < knot, 1.0, 5.0) * (1 + idx[:, None].to(F64)) + 0 * y

    rhs = Counting(piecewise)
    y0 = torch.zeros(N, 1, dtype=F64)
    scale = 1 + torch.arange(N, dtype=F64)[:, None]
    exact = scale * (knot + 5.0 * (2.0 - knot))
    res = solve_per_sample(rhs, y0, 0.0, 2.0, rtol=1e-8, atol=1e-8, jump_t=torch.tensor([-1.0, knot, 3.0], dtype=F64))
    assert res.status_names == ("success",) * N
    assert torch.equal(res.t, torch.full((N,), 2.0, dtype=F64))
    assert float((res.y - exact).abs().max()) <= 1e-12
    # every sample restarted just past the knot (a fresh first stage, not FSAL)
    after = math.nextafter(knot, math.inf)
    restarted = torch.zeros(N, dtype=torch.bool)
    for t, idx in rhs.times:
        restarted[idx[t == after]] = True
    assert bool(restarted.all())
    # without the knot the jump is crossed by shrinking steps: less exact, more work
    plain = solve_per_sample(piecewise, y0, 0.0, 2.0, rtol=1e-8, atol=1e-8)
    assert float((plain.y - exact).abs().max()) > 1e-10
    assert bool((plain.rejected > res.rejected).all())


def test_evaluation_counts_are_honest():
    rhs = Counting(nonlinear)
    every = torch.arange(N)
    res = solve_per_sample(lambda t, y, j: rhs(t, y, every[j]), Y0, 0.0, 2.0, rtol=1e-7, atol=1e-9)
    assert res.calls == rhs.calls
    assert torch.equal(res.evaluations, rhs.rows)
    # first stage + the starting-step evaluation, then 6 per attempt (FSAL)
    assert torch.equal(res.evaluations, 2 + 6 * (res.accepted + res.rejected))
    # finished samples are not evaluated: fewer rows than calls x batch
    assert int(rhs.rows.sum()) < rhs.calls * N


def test_backward_in_time_and_round_trip():
    f = lambda t, y, i: -RATE[i][:, None] * y  # noqa: E731
    fwd = solve_per_sample(f, Y0, 0.0, 1.0, rtol=1e-10, atol=1e-12)
    exact = Y0 * torch.exp(-RATE)[:, None]
    assert float((fwd.y - exact).abs().max()) < 1e-9
    back = solve_per_sample(f, fwd.y, 1.0, 0.0, rtol=1e-10, atol=1e-12)
    assert torch.equal(back.t, torch.zeros(N, dtype=F64))
    assert float((back.y - Y0).abs().max()) < 1e-8


def test_empty_batch_and_status_names():
    res = solve_per_sample(nonlinear, Y0[:0], 0.0, 1.0, rtol=1e-6, atol=1e-6)
    assert res.y.shape == (0, 2) and res.calls == 0 and res.status_names == ()
    assert STATUS_NAMES == ("success", "max_steps", "step_size_underflow", "nonfinite")


@pytest.mark.parametrize("kw, err, match", [
    (dict(y0=torch.ones(2, 1, dtype=torch.long)), TypeError, "y0"),
    (dict(t1=0.0), ValueError, "t0 and t1"),
    (dict(rtol=-1.0), ValueError, "rtol"),
    (dict(max_steps=0), ValueError, "max_steps"),
    (dict(dt_min=-1.0), ValueError, "dt_min"),
    (dict(jump_t=torch.tensor([0.5, 0.2])), ValueError, "jump_t"),
    (dict(jump_t=[0.5]), TypeError, "jump_t"),
    (dict(t0=float("nan")), TypeError, "t0"),
])
def test_bad_input(kw, err, match):
    args = dict(y0=Y0, t0=0.0, t1=1.0, rtol=1e-6, atol=1e-6)
    args.update(kw)
    with pytest.raises(err, match=match):
        solve_per_sample(nonlinear, args.pop("y0"), args.pop("t0"), args.pop("t1"), **args)


# ------------------------------------------------------------------ through log_likelihood
def _gaussian_model_and_poisoned():
    import scoresde

    target = scoresde.Gaussian(torch.tensor([0.5, -0.3], dtype=F64), torch.tensor([[0.6, 0.2], [0.2, 0.4]], dtype=F64))
    sde = scoresde.VPSDE()
    exact = target.as_model(sde, "eps")

    def net(x, t):        # NaN for the samples with x_0 > 2.5 (samples 0 and 3 below)
        out = exact.net(x, t)
        return torch.where(x[:, :1] > 2.5, torch.full_like(out, float("nan")), out)

    x = torch.tensor([[3.0, 0.0], [0.2, -0.1], [0.9, 0.4], [4.0, 1.0], [-0.5, -0.8]], dtype=F64)
    return target, exact, scoresde.ScoreModel(net, sde, "eps"), x


def test_log_likelihood_per_sample_isolates_failures_and_matches_solo_solves():
    from solvers import log_likelihood

    target, exact, poisoned, x = _gaussian_model_and_poisoned()
    res = log_likelihood(poisoned, x, per_sample=True, on_failure="record", rtol=1e-7, atol=1e-7)
    assert res.status == ("nonfinite", "success", "success", "nonfinite", "success")
    assert bool(torch.isnan(res.log_prob[[0, 3]]).all())
    assert res.nfe == res.stats["evaluations"] and res.stats["solves"] == 5
    for i in (1, 2, 4):
        alone = log_likelihood(exact, x[i:i + 1], per_sample=True, rtol=1e-7, atol=1e-7)
        assert abs(float(alone.log_prob[0] - res.log_prob[i])) <= 1e-12
    # the integral itself: against the closed form, the prior replaced by the exact p_T
    sde, t_end = exact.sde, res.stats["t_end"]
    ok = [1, 2, 4]
    integral = target.marginal(sde, sde.T).log_prob(res.z[ok]) + res.delta_log_prob[ok]
    assert float((integral - target.marginal(sde, t_end).log_prob(x[ok])).abs().max()) < 1e-5


def test_log_likelihood_per_sample_hutchinson_probes_stay_per_sample():
    from solvers import log_likelihood

    _, exact, _, x = _gaussian_model_and_poisoned()
    gens = lambda idx: [torch.Generator().manual_seed(50 + i) for i in idx]  # noqa: E731
    full = log_likelihood(exact, x, "hutchinson", probes=3, generator=gens(range(5)), per_sample=True)
    part = log_likelihood(exact, x[[4, 1]], "hutchinson", probes=3, generator=gens([4, 1]), per_sample=True)
    assert float((part.log_prob - full.log_prob[[4, 1]]).abs().max()) <= 1e-12
    assert float((part.trace_std_err - full.trace_std_err[[4, 1]]).abs().max()) <= 1e-12
    assert bool(torch.isfinite(full.trace_std_err).all())
