"""One adaptive driver (solvers.adaptive_driver) behind pf_ode, log_likelihood and adaptive_sde:
per-sample results equal solo solves, failures stay with the samples that failed, NFE counted at
the model, statuses read from the engine, trajectories land on their times."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import scoresde
import solvers
from solvers import adaptive_driver
from solvers.adaptive import solve_per_sample, solve_shared

F64 = torch.float64
TARGET = scoresde.Gaussian(torch.tensor([0.8, -0.4], dtype=F64),
                          torch.tensor([[0.05, 0.02], [0.02, 0.6]], dtype=F64))   # exact flow map
SDE = scoresde.VPSDE()
X_T = torch.randn(7, 2, dtype=F64, generator=torch.Generator().manual_seed(3))


class Counted:
    """The exact eps with a call counter (rows seen per call)."""

    def __init__(self, nan_rows=()):
        self.inner = TARGET.as_model(SDE, "eps").net
        self.calls, self.rows, self.nan_rows = 0, [], set(nan_rows)

    def __call__(self, x, t):
        self.calls += 1
        self.rows.append(x.shape[0])
        out = self.inner(x, t)
        if self.nan_rows:
            bad = torch.zeros(x.shape[0], dtype=torch.bool)
            for r in range(x.shape[0]):   # a row is "bad" by its content: the marked x_T's path
                bad[r] = bool(x[r, 0] > 50.0)
            out = torch.where(bad[:, None], torch.full_like(out, float("nan")), out)
        return out


def model_of(net):
    return scoresde.ScoreModel(net, SDE, "eps")


@settings(max_examples=5, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=7, unique=True))
def test_pf_ode_sample_equals_its_solo_solve(rows):
    model = model_of(Counted())
    batch = solvers.sample(model, X_T[rows], "pf_ode", rtol=1e-7, atol=1e-7).x
    for j, r in enumerate(rows[:2]):
        alone = solvers.sample(model, X_T[r:r + 1], "pf_ode", rtol=1e-7, atol=1e-7).x
        assert float((batch[j] - alone[0]).abs().max()) <= 1e-12


def test_pf_ode_per_sample_is_more_accurate_than_the_shared_step_at_equal_tolerance():
    model = model_of(Counted())
    exact = TARGET.flow(X_T, SDE.T, SDE.default_t_end, SDE)
    each = solvers.sample(model, X_T, "pf_ode", rtol=1e-5, atol=1e-5)
    shared = solvers.sample(model, X_T, "pf_ode", rtol=1e-5, atol=1e-5, per_sample=False)
    assert each.stats["per_sample"] and not shared.stats["per_sample"]
    e_each, e_shared = (float((s.x - exact).abs().max()) for s in (each, shared))
    assert e_each <= 2e-4 and e_shared <= 2e-3


def test_pf_ode_nfe_is_counted_at_the_model_and_matches_the_engine():
    net = Counted()
    sol = solvers.sample(model_of(net), X_T, "pf_ode")
    assert sol.nfe == net.calls == sol.stats["nfe_integrator"]
    # every sample: 2 (first stage + initial-step probe) + 6 per attempt, FSAL
    per_sample = [2 + 6 * (a + r) for a, r in zip(sol.stats["accepted"], sol.stats["rejected"])]
    assert sum(net.rows) == sum(per_sample)
    assert sol.stats["accepted_steps"] == max(sol.stats["accepted"])


def test_a_failing_sample_stops_alone_and_the_rest_equal_their_solo_solves():
    x = X_T.clone()
    x[2, 0] = 60.0                      # this sample's path stays above 50: its eps is NaN
    net = Counted(nan_rows=(2,))
    model = model_of(net)
    with pytest.raises(solvers.NonFiniteError, match=r"samples \[2\]"):
        solvers.sample(model, x, "pf_ode")
    sol = solvers.sample(model, x, "pf_ode", nonfinite="return")
    status = sol.stats["sample_status"]
    assert status[2] == "nonfinite" and status.count("success") == 6 and sol.stats["status"] == "nonfinite"
    ok = [i for i in range(7) if i != 2]
    alone = solvers.sample(model_of(Counted()), x[ok], "pf_ode").x
    assert float((sol.x[ok] - alone).abs().max()) <= 1e-12


def test_trajectory_lands_on_the_grid_times_per_sample():
    model = model_of(Counted())
    sol = solvers.sample(model, X_T, "pf_ode", 5, rtol=1e-8, atol=1e-8, return_trajectory=True)
    exact = torch.stack([TARGET.flow(X_T, SDE.T, t, SDE) for t in sol.timesteps.tolist()])
    assert torch.equal(sol.trajectory[0], X_T) and torch.equal(sol.trajectory[-1], sol.x)
    assert float((sol.trajectory - exact).abs().max()) <= 1e-5


@pytest.mark.parametrize("shared", [False, True])
def test_statuses_come_from_the_engine(shared):
    """max_steps and a step-size underflow, from either engine, as the same status names."""
    rhs = lambda t, y, idx: -50.0 * y  # noqa: E731
    y0 = torch.ones(3, 2, dtype=F64)
    run = (lambda **kw: solve_shared(rhs, y0, 0.0, 5.0, method="dopri5", **kw)) if shared else \
        (lambda **kw: solve_per_sample(rhs, y0, 0.0, 5.0, **kw))
    sol = run(rtol=1e-12, atol=1e-12, max_steps=3)
    assert sol.status_names == ("max_steps",) * 3
    found = adaptive_driver.failure(sol, what="test", max_steps=3, nfe=0)
    assert found[0] == "max_steps" and found[1] == [0, 1, 2] and "max_steps=3" in found[2]
    stats = {}
    adaptive_driver.record(stats, sol)
    assert stats["status"] == "max_steps" and stats["sample_status"] == ["max_steps"] * 3
    blow = lambda t, y, idx: y ** 2  # noqa: E731   y' = y^2 blows up at t = 1
    sol = (solve_shared(blow, y0, 0.0, 2.0, method="dopri5", rtol=1e-8, atol=1e-8) if shared else
           solve_per_sample(blow, y0, 0.0, 2.0, rtol=1e-8, atol=1e-8))
    assert set(sol.status_names) <= {"step_size_underflow", "nonfinite"} and not bool(sol.ok.any())
    assert float(sol.t.max()) < 1.0 + 1e-6


def test_adaptive_sde_statuses_are_the_engines():
    model = model_of(Counted())
    with pytest.warns(RuntimeWarning, match="max_steps=2"):
        sol = solvers.sample(model, X_T[:3], "adaptive_sde", max_steps=2, on_failure="return",
                             generator=torch.Generator().manual_seed(0))
    assert sol.stats["sample_status"] == ["max_steps"] * 3 and sol.stats["status"] == "max_steps"
    assert sol.stats["accepted"] and sol.stats["t_reached"]


def test_no_exception_text_is_parsed():
    """Failures are classified from the engines' status codes, never from an exception's message."""
    import inspect

    import solvers.likelihood as lik
    import solvers.ode as ode
    import solvers.sde_samplers as sdes
    for mod in (ode, lik, sdes, adaptive_driver):
        src = inspect.getsource(mod)
        for pattern in ("in msg", "in str(err)", "in str(e)", "underflow\" in", "AssertionError"):
            assert pattern not in src, (mod.__name__, pattern)


def test_likelihood_counts_each_samples_network_rows():
    """``stats["evaluations_per_sample"]``: the rows of network calls that held each sample, in
    the per-sample solve and in the shared one; they add up to what the network saw."""
    x0 = TARGET.sample(5, generator=torch.Generator().manual_seed(4), dtype=F64)
    for per_sample in (True, False):
        net = Counted()
        res = solvers.log_likelihood(model_of(net), x0, per_sample=per_sample)
        rows = res.stats["evaluations_per_sample"]
        assert sum(rows) == sum(net.rows) and res.nfe == net.calls
        if per_sample:
            assert rows == [2 + 6 * (a + r) for a, r in zip(res.stats["accepted"], res.stats["rejected"])]
        else:
            assert rows == [net.calls] * 5
