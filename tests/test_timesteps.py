"""Time grids: their properties, and the bad grids of docs/reliability.md.

``solvers.make_grid`` for every schedule under every built-in SDE, and the explicit
``timesteps=`` path of ``solvers.sample`` (validated before any network evaluation).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import scoresde
import solvers
from conftest import SDE_NAMES, make_sde

F64 = torch.float64


def _check_grid(grid, sde, steps, t_end, t_start=None):
    t = grid.t
    t_start = sde.T if t_start is None else t_start
    assert t.dtype == F64 and t.device.type == "cpu" and t.ndim == 1
    assert t.numel() == steps + 1 and grid.steps == steps
    assert bool(torch.isfinite(t).all())
    assert bool((t[1:] < t[:-1]).all()), "grid must be strictly decreasing"
    assert float(t[0]) == t_start and float(t[-1]) == t_end          # exact end points
    assert grid.t_start == t_start and grid.t_end == t_end


# ------------------------------------------------------------------ every schedule x SDE
@pytest.mark.parametrize("schedule", solvers.SCHEDULES)
@pytest.mark.parametrize("sde_name", SDE_NAMES)
@pytest.mark.parametrize("steps", [1, 2, 7, 50])
def test_grid_every_schedule_every_sde(schedule, sde_name, steps):
    sde = make_sde(sde_name)
    grid = solvers.make_grid(sde, steps, schedule)
    _check_grid(grid, sde, steps, sde.default_t_end)
    assert grid.schedule == schedule


@pytest.mark.parametrize("schedule", solvers.SCHEDULES)
@pytest.mark.parametrize("sde_name", SDE_NAMES)
@given(steps=st.integers(1, 300), frac=st.floats(0.0, 1.0))
def test_grid_property(schedule, sde_name, steps, frac):
    """steps+1 points, strictly decreasing, exactly T -> t_end, finite, for t_end anywhere
    between the SDE's default and T/2 (log-uniform)."""
    sde = make_sde(sde_name)
    lo, hi = sde.default_t_end, 0.5 * sde.T
    t_end = math.exp(math.log(lo) + frac * (math.log(hi) - math.log(lo)))
    grid = solvers.make_grid(sde, steps, schedule, t_end=t_end)
    _check_grid(grid, sde, steps, t_end)


@pytest.mark.parametrize("schedule", solvers.SCHEDULES)
def test_grid_t_start(schedule):
    sde = scoresde.VPSDE()
    grid = solvers.make_grid(sde, 9, schedule, t_end=0.01, t_start=0.6)
    _check_grid(grid, sde, 9, 0.01, t_start=0.6)


def test_schedules_are_what_they_say():
    sde = scoresde.VPSDE()
    n, te = 8, 1e-3
    t = solvers.make_grid(sde, n, "uniform", t_end=te).t
    assert torch.allclose(t[:-1] - t[1:], torch.full((n,), (1 - te) / n, dtype=F64), rtol=1e-12)
    lam = sde.log_snr(solvers.make_grid(sde, n, "log_snr", t_end=te).t)
    assert torch.allclose(lam[1:] - lam[:-1], (lam[-1] - lam[0]).expand(n) / n, rtol=1e-9)
    t = solvers.make_grid(sde, n, "quadratic", t_end=te).t
    u = torch.linspace(0, 1, n + 1, dtype=F64)
    assert torch.allclose(t, te + (1 - te) * (1 - u) ** 2, rtol=1e-12)
    t = solvers.make_grid(sde, n, "karras", t_end=te, rho=7.0).t
    s = (sde.sigma(t) / sde.alpha(t)) ** (1 / 7)
    assert torch.allclose(s[1:] - s[:-1], (s[-1] - s[0]).expand(n) / n, rtol=1e-9)


def test_grid_is_batch_independent_and_reproducible():
    sde = scoresde.VESDE()
    a = solvers.make_grid(sde, 13, "karras").t
    b = solvers.make_grid(sde, 13, "karras").t
    assert torch.equal(a, b)


def test_make_grid_errors():
    sde = scoresde.VPSDE()
    with pytest.raises(ValueError, match="steps"):
        solvers.make_grid(sde, 0)
    with pytest.raises(TypeError, match="steps"):
        solvers.make_grid(sde, 3.0)
    with pytest.raises(ValueError, match="schedule"):
        solvers.make_grid(sde, 3, "cosine")
    with pytest.raises(ValueError, match="rho"):
        solvers.make_grid(sde, 3, "karras", rho=0.0)
    with pytest.raises(ValueError, match="t_end"):
        solvers.make_grid(sde, 3, t_end=2.0)
    with pytest.raises(ValueError, match="t_end"):
        solvers.make_grid(sde, 3, t_end=0.5, t_start=0.4)


# ------------------------------------------------------------------ explicit timesteps
class _Counting:
    """A counting zero-eps net (nothing here may reach it)."""

    def __init__(self):
        self.n = 0

    def __call__(self, x, t):
        self.n += 1
        return torch.zeros_like(x)


def _setup(sde=None):
    sde = sde or scoresde.VPSDE()
    net = _Counting()
    model = scoresde.ScoreModel(net, sde, "eps")
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    return model, net, x


def _rejects(exc, match, timesteps, sde=None, **kw):
    model, net, x = _setup(sde)
    x0 = x.clone()
    with pytest.raises(exc, match=match):
        solvers.sample(model, x, kw.pop("method", "ddim"), timesteps=timesteps, **kw)
    assert net.n == 0 and model.nfe == 0
    assert torch.equal(x, x0)


@pytest.mark.parametrize("ts", [
    [1.0, 0.5, 0.1],
    (1.0, 0.5, 0.1),
    torch.tensor([1.0, 0.5, 0.1], dtype=torch.float32),
    torch.tensor([1.0, 0.5, 0.1], dtype=torch.float16),
    torch.tensor([1.0, 0.5, 0.1], dtype=torch.bfloat16),
])
def test_explicit_timesteps_accepted(ts):
    model, net, x = _setup()
    sol = solvers.sample(model, x, "ddim", timesteps=ts)
    ref = torch.as_tensor(ts).to(F64) if isinstance(ts, torch.Tensor) else torch.tensor(ts, dtype=F64)
    assert sol.timesteps.dtype == F64 and torch.equal(sol.timesteps, ref)
    assert sol.nfe == 2 == net.n


def test_explicit_integer_timesteps():
    """Ints (a list or an integer tensor) are converted to float64 (EDM: time = sigma)."""
    model, net, x = _setup(scoresde.EDMSDE())
    for ts in ([80, 10, 1], torch.tensor([80, 10, 1])):
        sol = solvers.sample(model, x, "dpmpp_2m", timesteps=ts)
        assert torch.equal(sol.timesteps, torch.tensor([80.0, 10.0, 1.0], dtype=F64))


def test_explicit_timesteps_equal_generated_grid():
    """An explicit grid equal to a generated one gives bitwise the same sample."""
    sde = scoresde.VPSDE()
    target = scoresde.Gaussian(torch.tensor([0.3, -0.2], dtype=F64), torch.tensor([0.5, 0.1], dtype=F64))
    model = target.as_model(sde)
    x = sde.prior_sample((4, 2), generator=torch.Generator().manual_seed(1), dtype=F64)
    a = solvers.sample(model, x, "dpmpp_3m", 9, schedule="karras")
    b = solvers.sample(model, x, "dpmpp_3m", timesteps=a.timesteps)
    assert torch.equal(a.x, b.x) and a.nfe == b.nfe


def test_explicit_timesteps_with_consistent_steps_keep_the_nfe_budget():
    """For a singlestep method ``steps`` is the NFE budget; with a matching explicit grid the
    same allocation is used (nfe == steps), not full-order steps everywhere."""
    sde = scoresde.VPSDE()
    model, net, x = _setup(sde)
    a = solvers.sample(model, x, "dpm_solver_3", 10)
    b = solvers.sample(model, x, "dpm_solver_3", 10, timesteps=a.timesteps)
    assert a.nfe == b.nfe == 10 and b.stats["orders"] == a.stats["orders"]


def test_timesteps_non_monotone_names_index():
    _rejects(ValueError, r"strictly decreasing.*timesteps\[2\]=0.5 >= timesteps\[1\]=0.5", [1.0, 0.5, 0.5, 0.1])
    _rejects(ValueError, r"timesteps\[3\]", [1.0, 0.5, 0.2, 0.3, 0.1])


def test_timesteps_increasing_explains_direction():
    _rejects(ValueError, r"strictly decreasing.*T down to t_end.*increasing", [0.1, 0.5, 1.0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_timesteps_non_finite(bad):
    _rejects(ValueError, r"timesteps must be finite; timesteps\[1\]", [1.0, bad, 0.1])


@pytest.mark.parametrize("ts", [[1.5, 0.5, 0.1], [1.0, 0.5, -0.1]])
def test_timesteps_outside_range_names_the_sde(ts):
    _rejects(ValueError, r"timesteps must lie in \[0, T\].*VPSDE", ts)


def test_timesteps_outside_range_ve():
    _rejects(ValueError, r"\[0, T\].*VESDE", [1.2, 0.5], sde=scoresde.VESDE())


def test_timesteps_ending_at_zero_mentions_final_denoise():
    _rejects(ValueError, r"timesteps\[-1\] must be > 0.*final_denoise", [1.0, 0.5, 0.0])


def test_timesteps_two_dimensional():
    _rejects(ValueError, r"timesteps must be 1-D", torch.tensor([[1.0, 0.5], [1.0, 0.5]]))
    _rejects(ValueError, r"timesteps must be 1-D", torch.tensor([[1.0], [0.5], [0.1]]))


def test_timesteps_too_short_or_wrong_type():
    _rejects(ValueError, r"timesteps must have at least 2 points", [1.0])
    _rejects(TypeError, r"timesteps", "1.0,0.5")
    _rejects(TypeError, r"timesteps must hold numbers", [1.0, "a"])


def test_timesteps_and_steps_disagree():
    _rejects(ValueError, r"steps or timesteps.*steps=5.*2 intervals", [1.0, 0.5, 0.1], steps=5)


def test_timesteps_and_schedule_or_t_start():
    _rejects(ValueError, r"schedule or timesteps", [1.0, 0.5, 0.1], schedule="uniform")
    _rejects(ValueError, r"t_start or timesteps", [1.0, 0.5, 0.1], t_start=1.0)
    _rejects(ValueError, r"t_end=0.2 disagrees with timesteps\[-1\]", [1.0, 0.5, 0.1], t_end=0.2)


def test_half_precision_duplicates_rejected():
    """Rounding to float16 may merge points: the duplicate is reported by index."""
    ts = torch.tensor([1.0, 0.50001, 0.5, 0.1], dtype=F64).to(torch.float16)
    _rejects(ValueError, r"timesteps\[2\]", ts)


@given(n=st.integers(2, 40), seed=st.integers(0, 2 ** 31 - 1))
@example(n=2, seed=0)
def test_any_valid_explicit_grid_is_used_as_given(n, seed):
    g = torch.Generator().manual_seed(seed)
    inner = torch.rand(n - 2, generator=g, dtype=F64) * 0.98 + 0.01
    ts = torch.cat([torch.tensor([1.0], dtype=F64), inner.sort(descending=True).values,
                    torch.tensor([1e-3], dtype=F64)])
    if bool((ts[1:] >= ts[:-1]).any()):
        return
    model, net, x = _setup()
    sol = solvers.sample(model, x, "euler", timesteps=ts.tolist())
    assert torch.equal(sol.timesteps, ts) and sol.nfe == n - 1 == net.n


@given(n=st.integers(3, 30), seed=st.integers(0, 2 ** 31 - 1), bad=st.integers(1, 1000))
def test_invalid_grid_property(n, seed, bad):
    """Validation as a property: a grid with a point moved out of order raises a ValueError
    naming timesteps and the first offending index; nothing reaches the net; x_T is untouched."""
    g = torch.Generator().manual_seed(seed)
    ts = torch.rand(n, generator=g, dtype=F64).sort(descending=True).values * 0.9 + 0.05
    j = 1 + bad % (n - 1)
    ts[j] = ts[j - 1] + 0.01 * (bad % 7)          # >= its predecessor: not strictly decreasing
    first = int(torch.nonzero(ts[1:] >= ts[:-1]).flatten()[0]) + 1
    if bool((ts[1:] >= ts[:-1]).all()):
        return                                    # (an increasing grid: another message)
    _rejects(ValueError, rf"timesteps\[{first}\]=.* >= timesteps\[{first - 1}\]", ts.tolist())
