"""``solvers.sample``: accounting, determinism, shapes and bad input (the
sampling rows of docs/reliability.md).

Methods are discovered from ``solvers.available_methods()``: every fixed-step method (one
whose ``expected_nfe`` is defined) is checked, stochastic ones with a seeded generator.
"""
from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import scoresde
import solvers
from solvers import _registry

F64 = torch.float64
D = 3


def _is_fixed_step(name: str) -> bool:
    if getattr(_registry._REGISTRY[name], "adaptive", False):
        return False
    try:
        solvers.get(name).expected_nfe(1)
    except NotImplementedError:
        return False
    return True


ALL = solvers.available_methods()
FIXED = [m for m in ALL if _is_fixed_step(m)]
ADAPTIVE = [m for m in ALL if m not in FIXED]
SINGLESTEP = [m for m in FIXED if hasattr(solvers.get(m), "allocation")]
TRAJ = FIXED + ["pf_ode"]       # methods of this layer that return trajectories (adaptive_sde does not)


def _stochastic(name: str, **options) -> bool:
    return bool(solvers.get(name, **options).stochastic)


class Counting:
    """Wraps a net and counts its calls (the ground truth for nfe)."""

    def __init__(self, inner):
        self.inner, self.n = inner, 0

    def __call__(self, x, t):
        self.n += 1
        return self.inner(x, t)


TARGET = scoresde.Gaussian(torch.tensor([0.5, -1.0, 0.3], dtype=F64), torch.tensor([0.5, 0.1, 0.02], dtype=F64))


def problem(sde=None, batch=5, seed=0):
    """(model, counting net, x_T) for the exact Gaussian model under ``sde`` (VP by default)."""
    sde = sde or scoresde.VPSDE()
    net = Counting(TARGET.as_model(sde).net)
    model = scoresde.ScoreModel(net, sde, "eps")
    x = TARGET.marginal(sde, sde.T).sample(batch, generator=torch.Generator().manual_seed(seed))
    return model, net, x


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_discovery_sees_the_methods_of_this_layer():
    for m in ("euler", "heun", "ddim", "dpm_solver_1", "dpm_solver_2", "dpm_solver_3", "dpmpp_2s",
              "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde"):
        assert m in FIXED
    assert "pf_ode" in ADAPTIVE


# ------------------------------------------------------------------ NFE accounting
@pytest.mark.parametrize("method", FIXED)
@pytest.mark.parametrize("steps", range(1, 7))
def test_nfe_equals_expected_equals_counted(method, steps):
    model, net, x = problem()
    sol = solvers.sample(model, x, method, steps, generator=gen())
    assert sol.nfe == solvers.get(method).expected_nfe(steps) == net.n == model.nfe
    assert torch.isfinite(sol.x).all()


@pytest.mark.parametrize("method,options", [("dpmpp_3m", {"warmup": "singlestep"}), ("dpmpp_3m", {"lower_order_final": True}),
                                            ("dpmpp_2m", {"lower_order_final": True}), ("heun", {"last_step_euler": False}),
                                            ("dpm_solver_3", {"allocation": "fixed"}), ("ddim", {"eta": 0.5}),
                                            ("dpmpp_2m_sde", {"solver_type": "heun"})])
@given(k=st.integers(1, 13))
def test_nfe_with_options(method, options, k):
    steps = 3 * k if options.get("allocation") == "fixed" else k
    model, net, x = problem(batch=2)
    sol = solvers.sample(model, x, method, steps, generator=gen(), **options)
    assert sol.nfe == solvers.get(method, **options).expected_nfe(steps) == net.n


@pytest.mark.parametrize("method", ["ddim", "dpmpp_2m", "heun", "dpm_solver_3"])
def test_final_denoise_is_one_counted_evaluation(method):
    model, net, x = problem()
    plain = solvers.sample(model, x, method, 6)
    n0 = net.n
    sol = solvers.sample(model, x, method, 6, final_denoise=True)
    assert sol.nfe == plain.nfe + 1 == net.n - n0
    # the denoised output is the exact posterior mean of x0 at t_end
    assert torch.allclose(sol.x, TARGET.x0(plain.x, sol.timesteps[-1].item(), model.sde), rtol=0, atol=1e-12)


def test_nfe_is_counted_for_adaptive_pf_ode():
    model, net, x = problem()
    sol = solvers.sample(model, x, "pf_ode", rtol=1e-6, atol=1e-6)
    assert sol.nfe == net.n > 0 and sol.stats["nfe_integrator"] == sol.nfe


# ------------------------------------------------------------------ determinism
@pytest.mark.parametrize("method", FIXED + ["pf_ode"])
def test_same_seed_bitwise_same(method):
    model, _, x = problem()
    a = solvers.sample(model, x, method, 5, generator=gen(3))
    b = solvers.sample(model, x, method, 5, generator=gen(3))
    assert torch.equal(a.x, b.x)
    if _stochastic(method):
        c = solvers.sample(model, x, method, 5, generator=gen(4))
        assert not torch.equal(a.x, c.x)


@pytest.mark.parametrize("method", [m for m in FIXED if _stochastic(m)] + ["ddim"])
def test_per_sample_generators_batch_independent(method):
    """Sample i is bitwise the same alone, in its batch, or in another batch."""
    options = {"eta": 1.0} if method == "ddim" else {}
    model, _, x = problem(batch=6)
    full = solvers.sample(model, x, method, 5, generator=[gen(100 + j) for j in range(6)], **options).x
    perm = [4, 1, 5, 0, 3, 2]
    shuffled = solvers.sample(model, x[perm], method, 5, generator=[gen(100 + j) for j in perm], **options).x
    assert torch.equal(shuffled, full[perm])
    part = solvers.sample(model, x[2:4], method, 5, generator=[gen(102), gen(103)], **options).x
    assert torch.equal(part, full[2:4])


# ------------------------------------------------------------------ inputs are never modified
def _variants(x):
    """The same values as contiguous, non-contiguous (a transposed view), and expanded
    (stride 0) tensors."""
    nc = x.T.contiguous().T
    assert not nc.is_contiguous()
    ex = x[:1].expand(x.shape[0], -1)
    return {"contiguous": x, "non_contiguous": nc, "expanded": ex}


@pytest.mark.parametrize("method", FIXED + ["pf_ode"])
def test_caller_x_T_unchanged(method):
    model, _, x = problem()
    for kind, xv in _variants(x).items():
        before = xv.clone()
        strides = xv.stride()
        sol = solvers.sample(model, xv, method, 4, generator=gen(1), return_trajectory=True)
        assert torch.equal(xv, before) and xv.stride() == strides, kind
        # pf_ode lands on the trajectory's times, which changes its steps: compare like with like
        ref = solvers.sample(model, xv.contiguous(), method, 4, generator=gen(1), return_trajectory=True).x
        assert torch.equal(sol.x, ref), kind
        assert torch.equal(sol.trajectory[0], before), kind
        sol.trajectory[0].add_(1.0)         # the trajectory never aliases the caller's tensor
        assert torch.equal(xv, before), kind


# ------------------------------------------------------------------ trivial calls
@pytest.mark.parametrize("method", FIXED + ADAPTIVE)
def test_empty_batch_returns_at_once(method):
    model, net, x = problem()
    empty = x[:0]
    traj = method in TRAJ
    sol = solvers.sample(model, empty, method, 7, generator=[], return_trajectory=traj)
    assert sol.nfe == 0 and net.n == 0
    assert sol.x.shape == (0, D) and sol.x.dtype == F64
    if traj:
        assert sol.trajectory.shape == (sol.timesteps.numel(), 0, D)


@pytest.mark.parametrize("method", FIXED + ADAPTIVE)
def test_zero_length_interval_returns_x_T(method):
    """t_end == t_start: x_T itself (a copy), nfe 0, success.  An explicit
    ``timesteps=[t, t]`` is not the way to say it (not strictly decreasing)."""
    model, net, x = problem()
    traj = method in TRAJ
    for kw in ({"t_end": model.sde.T}, {"t_start": 0.4, "t_end": 0.4}):
        sol = solvers.sample(model, x, method, 5, generator=gen(), return_trajectory=traj, **kw)
        assert sol.nfe == 0 and net.n == 0
        assert torch.equal(sol.x, x) and sol.x is not x
        assert sol.stats["status"] == "success"
        if traj:
            assert sol.trajectory.shape == (1, *x.shape) and torch.equal(sol.trajectory[0], x)
    with pytest.raises(ValueError, match="strictly decreasing"):
        solvers.sample(model, x, method, timesteps=[0.5, 0.5])


# ------------------------------------------------------------------ trajectory and callback
@pytest.mark.parametrize("method", FIXED)
def test_trajectory_and_callback(method):
    model, _, x = problem()
    seen = []
    sol = solvers.sample(model, x, method, 6, generator=gen(2), return_trajectory=True, callback=seen.append)
    n = sol.timesteps.numel() - 1                 # grid intervals (outer steps of singlestep methods)
    if method not in SINGLESTEP:
        assert n == 6
    assert sol.trajectory.shape == (n + 1, *x.shape) and sol.trajectory.dtype == x.dtype
    assert torch.equal(sol.trajectory[0], x) and torch.equal(sol.trajectory[-1], sol.x)
    assert [s.i for s in seen] == list(range(n))
    assert [s.t for s in seen] == sol.timesteps[1:].tolist()
    for s, xt in zip(seen, sol.trajectory[1:]):
        assert torch.equal(s.x, xt)
    assert [s.nfe for s in seen] == sorted(s.nfe for s in seen) and seen[-1].nfe == sol.nfe
    plain = solvers.sample(model, x, method, 6, generator=gen(2))
    assert plain.trajectory is None and torch.equal(plain.x, sol.x)


def test_pf_ode_trajectory_and_callback():
    model, _, x = problem()
    seen = []
    sol = solvers.sample(model, x, "pf_ode", 4, return_trajectory=True, callback=seen.append)
    assert sol.trajectory.shape == (5, *x.shape)
    assert torch.equal(sol.trajectory[0], x) and torch.equal(sol.trajectory[-1], sol.x)
    # per-sample steps: one call per round of attempts (at least the most accepted steps), then t_end
    assert len(seen) >= sol.stats["accepted_steps"] > 0
    assert seen[-1].t == sol.timesteps[-1].item() and torch.equal(seen[-1].x, sol.x)
    shared = []
    one = solvers.sample(model, x, "pf_ode", 4, per_sample=False, callback=shared.append)
    assert len(shared) == one.stats["accepted_steps"] > 0 and shared[-1].t == sol.timesteps[-1].item()
    ts = [s.t for s in seen]
    assert ts == sorted(ts, reverse=True)
    # the trajectory's grid points lie on the exact flow (within the tolerance)
    exact = torch.stack([TARGET.flow(x, model.sde.T, t, model.sde) for t in sol.timesteps.tolist()])
    assert float((sol.trajectory - exact).abs().max()) < 1e-3


# ------------------------------------------------------------------ rank and dtype
class Flatten:
    """Exact net for a flattened Gaussian of dimension prod(shape[1:]) applied to any rank."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, x, t):
        return self.inner(x.reshape(x.shape[0], -1), t).reshape(x.shape)


@pytest.mark.parametrize("shape", [(6,), (4, 2, 3, 2), (3, 2, 2, 3, 2)])
@pytest.mark.parametrize("method", FIXED)
def test_any_rank(shape, method):
    """Rank-1 (scalar data), rank-4 (images) and rank-5 (video) states give the same numbers
    as the flattened problem."""
    sde = scoresde.VPSDE()
    d = math.prod(shape[1:])
    tgt = scoresde.Gaussian(torch.linspace(-1, 1, d, dtype=F64), torch.linspace(0.05, 0.5, d, dtype=F64))
    flat_model = tgt.as_model(sde)
    model = scoresde.ScoreModel(Flatten(flat_model.net), sde, "eps")
    xf = tgt.marginal(sde, sde.T).sample(shape[0], generator=gen(5))
    x = xf.reshape(shape)
    sol = solvers.sample(model, x, method, 4, generator=gen(6), return_trajectory=True)
    ref = solvers.sample(flat_model, xf, method, 4, generator=gen(6))
    assert sol.x.shape == shape and sol.trajectory.shape[1:] == shape
    assert torch.allclose(sol.x.reshape(shape[0], -1), ref.x, rtol=0, atol=1e-13)


@pytest.mark.parametrize("method", FIXED + ADAPTIVE)
def test_float32_in_float32_out_close_to_float64(method):
    """Same seed, float32 vs float64: the output keeps the input dtype and
    tracks the float64 result to a few hundred eps(float32) (noise is drawn in float32 for every
    dtype, so stochastic methods are comparable too; adaptive ones differ by their tolerance)."""
    for sde in (scoresde.VPSDE(), scoresde.VESDE()):
        model, _, x = problem(sde, batch=8)
        a = solvers.sample(model, x, method, 12, generator=gen(1))
        with warnings.catch_warnings():
            warnings.simplefilter("error")          # no warning from the defaults in float32
            b = solvers.sample(model, x.float(), method, 12, generator=gen(1))
        assert b.x.dtype == torch.float32 and b.nfe > 0
        tol = (300 if method in FIXED else 3000) * torch.finfo(torch.float32).eps
        assert float((b.x.double() - a.x).abs().max()) < tol * (1 + float(a.x.abs().max()))


def test_float16_state_keeps_dtype():
    model, _, x = problem()
    sol = solvers.sample(model, x.half(), "dpmpp_2m", 8)
    assert sol.x.dtype == torch.float16 and torch.isfinite(sol.x).all()


def test_net_output_dtype_is_cast():
    """A net returning another dtype is cast to the state dtype."""
    sde = scoresde.VPSDE()
    inner = TARGET.as_model(sde).net
    model = scoresde.ScoreModel(lambda x, t: inner(x, t).float(), sde, "eps")
    _, _, x = problem()
    sol = solvers.sample(model, x, "dpmpp_2m", 8)
    ref = solvers.sample(TARGET.as_model(sde), x, "dpmpp_2m", 8)
    assert sol.x.dtype == F64 and torch.allclose(sol.x, ref.x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ALL)
def test_x_T_requiring_grad(method):
    """Every method returns a detached result (no autograd history from
    x_T, on the full path and on the trivial ones) and leaves x_T as it was."""
    model, _, x = problem()
    xg = x.clone().requires_grad_(True)
    traj = method in TRAJ
    calls = [(xg, {}), (xg, {"t_start": 0.4, "t_end": 0.4}), (xg[:0], {})]
    for xin, kw in calls:
        g = gen(3) if xin.shape[0] else []
        sol = solvers.sample(model, xin, method, 5, generator=g, return_trajectory=traj, **kw)
        assert not sol.x.requires_grad and sol.x.grad_fn is None, kw
        if traj:
            assert not sol.trajectory.requires_grad, kw
        assert torch.equal(xg.detach(), x) and xg.requires_grad and xg.grad is None
    assert torch.equal(sol.x, solvers.sample(model, x[:0], method, 5, generator=[]).x)
    full = solvers.sample(model, xg, method, 5, generator=gen(3)).x
    assert torch.equal(full, solvers.sample(model, x, method, 5, generator=gen(3)).x)


def test_method_as_instance_or_class():
    model, _, x = problem()
    a = solvers.sample(model, x, "dpmpp_3m", 6, warmup="singlestep").x
    b = solvers.sample(model, x, solvers.get("dpmpp_3m", warmup="singlestep"), 6).x
    c = solvers.sample(model, x, _registry._REGISTRY["dpmpp_3m"], 6, warmup="singlestep").x
    assert torch.equal(a, b) and torch.equal(a, c)


def test_solver_instance_is_reusable():
    """Solvers are stateless: one instance, two calls, identical results."""
    model, _, x = problem()
    s = solvers.get("dpmpp_3m")
    assert torch.equal(solvers.sample(model, x, s, 7).x, solvers.sample(model, x, s, 7).x)


# ------------------------------------------------------------------ bad input
def _rejects(exc, match, *args, x=None, model_net=None, **kw):
    """The call raises ``exc`` matching ``match``, before any network evaluation, and leaves
    x_T untouched."""
    model, net, x0 = model_net or problem()
    x = x0 if x is None else x
    before = x.clone() if isinstance(x, torch.Tensor) else x
    with pytest.raises(exc, match=match) as info:
        solvers.sample(model, x, *args, **kw)
    assert net.n == 0 and model.nfe == 0, "a rejected call reached the network"
    if isinstance(x, torch.Tensor):
        assert torch.equal(x, before) or (torch.isnan(x).any() and torch.equal(x.isnan(), before.isnan()))
    return info.value


@pytest.mark.parametrize("steps,exc,match", [
    (0, ValueError, r"steps must be >= 1, got 0"),
    (-3, ValueError, r"steps must be >= 1, got -3"),
    (True, TypeError, r"steps must be an int, got True"),
    (10.0, TypeError, r"steps must be an int, got 10.0"),
    ("10", TypeError, r"steps must be an int, got '10'"),
    (None, ValueError, r"pass steps"),
])
@pytest.mark.parametrize("method", ["dpmpp_2m", "dpm_solver_3", "heun"])
def test_bad_steps(steps, exc, match, method):
    _rejects(exc, match, method, steps)


def test_unknown_method_suggests_close_match():
    err = _rejects(ValueError, r"unknown method 'DPMPP_2M'; did you mean 'dpmpp_2m'", "DPMPP_2M", 5)
    assert "Valid methods" in str(err) and "dpmpp_3m" in str(err)
    _rejects(ValueError, r"unknown method 'heun2'; did you mean 'heun'", "heun2", 5)
    _rejects(ValueError, r"unknown method 'dpm_solver_4'; did you mean 'dpm_solver_[123]'", "dpm_solver_4", 5)
    err = _rejects(ValueError, r"unknown method 'zzz'\. Valid methods", "zzz", 5)
    for m in solvers.available_methods():
        assert m in str(err)
    _rejects(TypeError, r"method must be a method name or a Solver", 3, 5)


@pytest.mark.parametrize("method,option", [("pc" if "pc" in ALL else "dpmpp_2m", "snr0"), ("euler", "rtol"),
                                           ("dpmpp_2m", "order"), ("ddim", "etaa")])
def test_unknown_option_is_a_type_error_naming_it(method, option):
    err = _rejects(TypeError, rf"unexpected option '{option}' for method '{method}'", method, 5, **{option: 1})
    for valid in _registry.option_names(_registry._REGISTRY[method]):
        assert valid in str(err)


def test_options_with_an_instance():
    _rejects(TypeError, r"options \['eta'\] given with a solver instance", solvers.get("ddim"), 5, eta=0.5)


@pytest.mark.parametrize("method,options,exc,match", [
    ("ddim", {"eta": 2}, ValueError, r"eta must be in \[0, 1\], got 2"),
    ("ddim", {"eta": -0.1}, ValueError, r"eta must be in \[0, 1\]"),
    ("ddim", {"eta": "a"}, TypeError, r"eta must be a real number"),
    ("dpmpp_2m", {"solver_type": "rk"}, ValueError, r"solver_type must be 'midpoint' or 'heun', got 'rk'"),
    ("dpmpp_2m", {"lower_order_final": "yes"}, TypeError, r"lower_order_final must be a bool"),
    ("dpmpp_3m", {"warmup": "none"}, ValueError, r"warmup must be 'lower_order' or 'singlestep'"),
    ("dpm_solver_2", {"allocation": "slow"}, ValueError, r"allocation must be 'fast' or 'fixed', got 'slow'"),
    ("dpmpp_2m_sde", {"eta": -1.0}, ValueError, r"eta must be a finite float >= 0"),
    ("dpmpp_3m_sde", {"eta": float("nan")}, ValueError, r"eta must be a finite float >= 0"),
    ("heun", {"last_step_euler": 1}, TypeError, r"last_step_euler must be a bool"),
    ("pf_ode", {"rtol": -1e-5}, ValueError, r"rtol must be >= 0"),
    ("pf_ode", {"atol": -1.0}, ValueError, r"atol must be >= 0"),
    ("pf_ode", {"ode_method": "rk45"}, ValueError, r"ode_method must be one of"),
    ("pf_ode", {"max_steps": 0}, ValueError, r"max_steps must be an int >= 1"),
])
def test_bad_option_values(method, options, exc, match):
    _rejects(exc, match, method, 5, **options)


def test_order_too_high_for_the_steps():
    """Row 14/16: a fixed allocation that cannot fit is a ValueError naming both; the
    multistep methods warm up instead (nfe == steps)."""
    _rejects(ValueError, r"allocation='fixed' needs steps divisible by the order 3, got steps=4",
             "dpm_solver_3", 4, allocation="fixed")
    model, net, x = problem()
    sol = solvers.sample(model, x, "dpmpp_3m", 2)
    # the few-step rule (default): step i uses at most steps - i
    assert sol.nfe == 2 == net.n and sol.stats["orders"] == [1, 1]
    assert solvers.sample(model, x, "dpmpp_3m", 2, lower_order_final=False).stats["orders"] == [1, 2]


def test_bad_x_T():
    _rejects(TypeError, r"x_T must be floating point, got torch.int64", "dpmpp_2m", 5, x=torch.ones(4, D, dtype=torch.long))
    _rejects(TypeError, r"x_T must be floating point, got torch.uint8", "dpmpp_2m", 5, x=torch.ones(4, D, dtype=torch.uint8))
    _rejects(TypeError, r"x_T must be a torch.Tensor", "dpmpp_2m", 5, x=[[0.0] * D])
    _rejects(ValueError, r"x_T must have a batch dimension", "dpmpp_2m", 5, x=torch.tensor(1.0, dtype=F64))
    bad = torch.zeros(6, D, dtype=F64)
    bad[1, 0] = float("nan")
    bad[4, 2] = float("inf")
    bad[4, 1] = float("nan")
    _rejects(ValueError, r"x_T has 3 non-finite values \(samples \[1, 4\]\)", "dpmpp_2m", 5, x=bad)


@pytest.mark.parametrize("t_end,match", [
    (-0.1, r"t_end must be in \(0, T\]=\(0, 1\] for VPSDE, got -0.1"),
    (1.5, r"t_end must be in \(0, T\]=\(0, 1\] for VPSDE, got 1.5"),
    (0.0, r"t_end must be in \(0, T\].*got 0.0.*final_denoise=True"),
    (float("nan"), r"t_end must be finite"),
])
def test_bad_t_end(t_end, match):
    _rejects(ValueError, match, "dpmpp_2m", 5, t_end=t_end)


def test_bad_t_end_names_the_sde():
    model_net = problem(scoresde.VESDE())
    _rejects(ValueError, r"t_end must be in \(0, T\].*VESDE", "dpmpp_2m", 5, t_end=2.0, model_net=model_net)


def test_other_bad_arguments():
    _rejects(ValueError, r"t_start must be <= 1", "dpmpp_2m", 5, t_start=1.5)
    _rejects(ValueError, r"t_end must be < t_start", "dpmpp_2m", 5, t_start=0.2, t_end=0.3)
    _rejects(ValueError, r"schedule must be one of", "dpmpp_2m", 5, schedule="linear")
    _rejects(ValueError, r"rho must be > 0", "dpmpp_2m", 5, schedule="karras", rho=-1.0)
    _rejects(ValueError, r"nonfinite must be 'raise' or 'return'", "dpmpp_2m", 5, nonfinite="ignore")
    model, net, x = problem()
    with pytest.raises(TypeError, match=r"model must be a scoresde.ScoreModel, got function"):
        solvers.sample(lambda x, t: x, x, "dpmpp_2m", 5)


@pytest.mark.parametrize("method", ["ddim", "dpmpp_2m_sde", "dpmpp_2m"])
def test_wrong_generator_list(method):
    """Row 51, for stochastic and deterministic methods alike (validated, never ignored)."""
    gens = [gen(j) for j in range(3)]
    opts = {"eta": 1.0} if method == "ddim" else {}
    _rejects(ValueError, r"generator: got 3 generators for batch 5", method, 5, generator=gens, **opts)
    _rejects(TypeError, r"generator\[1\] must be a torch.Generator", method, 5, generator=[gen(0), 1, 2, 3, 4], **opts)
    _rejects(TypeError, r"generator must be a torch.Generator, a list of them", method, 5, generator="seed", **opts)


# ------------------------------------------------------------------ the model misbehaves
class Faulty:
    """Exact net that misbehaves on its ``k``-th call (1-based)."""

    def __init__(self, inner, k, mode, samples=(1, 3)):
        self.inner, self.k, self.mode, self.samples, self.n = inner, k, mode, list(samples), 0

    def __call__(self, x, t):
        self.n += 1
        out = self.inner(x, t)
        if self.n == self.k:
            if self.mode == "nan":
                out = out.clone()
                out[self.samples, 0] = float("nan")
                out[self.samples[-1], -1] = float("inf")
            elif self.mode == "raise":
                raise KeyError("boom from the net")
        return out


def _faulty(k, mode):
    sde = scoresde.VPSDE()
    net = Faulty(TARGET.as_model(sde).net, k, mode)
    _, _, x = problem()
    return scoresde.ScoreModel(net, sde, "eps"), net, x


def test_net_wrong_shape():
    sde = scoresde.VPSDE()
    model = scoresde.ScoreModel(lambda x, t: torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype), sde, "eps")
    _, _, x = problem()
    before = x.clone()
    with pytest.raises(ValueError, match=r"net output shape \(5, 6\) != x shape \(5, 3\)") as info:
        solvers.sample(model, x, "dpmpp_2m", 5)
    assert model.nfe == 1 and torch.equal(x, before)          # at the first call
    assert any("step 1/5" in n for n in getattr(info.value, "__notes__", []))


@pytest.mark.parametrize("method", ["ddim", "dpmpp_2m", "euler", "dpmpp_3m"])
@pytest.mark.parametrize("k", [1, 4])
def test_net_nan_at_step_k(method, k):
    """NonFiniteError naming the step k/N, the time and the samples, raised where it happens;
    ``nonfinite="return"`` gives the partial solution (the state before step k)."""
    model, net, x = _faulty(k, "nan")
    before = x.clone()
    n_steps = 6
    grid = solvers.make_grid(model.sde, n_steps, solvers.get(method).default_schedule).t
    t_k = float(grid[k - 1])
    with pytest.raises(solvers.NonFiniteError) as info:
        solvers.sample(model, x, method, n_steps)
    msg = str(info.value)
    assert re.search(rf"net returned 3 non-finite values at step {k}/{n_steps}, t={t_k:.6g}, samples \[1, 3\]", msg), msg
    assert info.value.t_reached == pytest.approx(t_k) and isinstance(info.value, FloatingPointError)
    assert net.n == k and torch.equal(x, before)
    # partial result
    net.n = 0
    # the partial solution is the shorter solve when the orders do not depend on the grid's
    # length: the multistep methods without the few-step rule
    opts = {"lower_order_final": False} if method.startswith("dpmpp") else {}
    sol = solvers.sample(model, x, method, n_steps, nonfinite="return", **opts)
    assert sol.stats["status"] == "nonfinite" and "step" in sol.stats["message"]
    assert sol.nfe == k
    if k > 1:
        ref = solvers.sample(TARGET.as_model(model.sde), x, method, timesteps=grid[:k], **opts)
        assert torch.equal(sol.x, ref.x)
    else:
        assert torch.equal(sol.x, x)


def test_net_nan_in_pf_ode_names_the_evaluation():
    model, net, x = _faulty(3, "nan")
    with pytest.raises(solvers.NonFiniteError, match=r"at evaluation 3, t=[0-9.e-]+, samples \[1, 3\]"):
        solvers.sample(model, x, "pf_ode")
    net.n = 0
    sol = solvers.sample(model, x, "pf_ode", nonfinite="return")
    assert sol.stats["status"] == "nonfinite" and torch.isfinite(sol.x).all()


@pytest.mark.parametrize("method", ["dpmpp_2m", "heun", "pf_ode"])
def test_net_raising_is_reraised_with_a_note(method):
    model, net, x = _faulty(3, "raise")
    with pytest.raises(KeyError, match="boom from the net") as info:
        solvers.sample(model, x, method, 6)
    assert type(info.value) is KeyError
    notes = getattr(info.value, "__notes__", [])
    want = "evaluation 3" if method == "pf_ode" else ("step 2/6" if method == "heun" else "step 3/6")
    assert any(want in n and "t=" in n for n in notes), notes


# ------------------------------------------------------------------ pf_ode tolerances and limits
def test_pf_ode_rtol_below_floor_warns_and_clamps():
    model, _, x = problem()
    with pytest.warns(RuntimeWarning, match=r"rtol=1e-20 is below 100\*eps\(torch.float64\)"):
        sol = solvers.sample(model, x, "pf_ode", rtol=1e-20, atol=1e-8)
    floor = 100 * torch.finfo(F64).eps
    assert sol.stats["rtol"] == floor and "clamped" in sol.stats["warnings"][0]
    with pytest.warns(RuntimeWarning, match=r"100\*eps\(torch.float32\)=1.19e-05"):
        sol = solvers.sample(model, x.float(), "pf_ode", rtol=0.0)
    assert sol.stats["rtol"] == pytest.approx(100 * torch.finfo(torch.float32).eps)


def test_pf_ode_max_steps_reached():
    model, _, x = problem()
    for per_sample in (True, False):
        with pytest.raises(solvers.SolverError, match=r"max_steps=4 step attempts reached, at t=") as info:
            solvers.sample(model, x, "pf_ode", rtol=1e-10, atol=1e-10, max_steps=4, per_sample=per_sample)
        err = info.value
        assert 0 < err.t_reached <= model.sde.T and err.nfe > 0 and err.last_dt > 0
        assert err.status == ["max_steps"] * x.shape[0] and err.partial.stats["status"] == "max_steps"
    # the limit counts the whole solve, not each output interval
    with pytest.raises(solvers.SolverError):
        solvers.sample(model, x, "pf_ode", 50, rtol=1e-10, atol=1e-10, max_steps=20, return_trajectory=True)


class _OU(scoresde.SDE):
    """A user's own SDE (not a LinearSDE): dx = -2x dt + 2 dW."""

    def drift(self, x, t):
        return -2.0 * x

    def diffusion(self, t):
        return torch.full_like(torch.as_tensor(t, dtype=F64), 2.0)


LINEAR_ONLY = [m for m in FIXED if _registry._REGISTRY[m].requires_linear_sde]


@pytest.mark.parametrize("method", LINEAR_ONLY)
def test_linear_sde_required(method):
    """Row 20: a method that needs a LinearSDE refuses another SDE with a TypeError naming
    both, before any evaluation."""
    net = Counting(lambda x, t: -x)
    model = scoresde.ScoreModel(net, _OU(), prediction="score")
    x = torch.zeros(4, D, dtype=F64)
    _rejects(TypeError, rf"{method} needs a LinearSDE; got _OU", method, 5, model_net=(model, net, x))


def test_log_snr_schedule_needs_linear_sde():
    net = Counting(lambda x, t: -x)
    model = scoresde.ScoreModel(net, _OU(), prediction="score")
    x = torch.zeros(4, D, dtype=F64)
    _rejects(TypeError, r"schedule='karras' needs a LinearSDE; got _OU", "pf_ode", 5, schedule="karras",
             model_net=(model, net, x))
