"""solvers.log_likelihood, encode and bits_per_dim proven against exact answers, and
the bad likelihood inputs of docs/reliability.md.  Float64 unless stated.

Two references, and why.  The likelihood integrates the PF ODE from t_end to T and closes
with the SDE's prior pi instead of the true terminal marginal p_T, so what it computes is the
*model's* density

    log pi(Phi(x)) + log|det dPhi/dx|,   Phi = the exact flow from t_end to T,

which for Gaussian data is known in closed form (Phi is affine; its log-determinant is
sum_k log(s_k(T)/s_k(t_end)), s_k(t)^2 = alpha_t^2 lambda_k + sigma_t^2 over the covariance
eigenvalues lambda_k).  That is tested to 1e-6 nats.  It differs from log p_{t_end}(x) by the
prior mismatch log pi(z) - log p_T(z): measured for the default VP (alpha(1) = 6.6e-3) on the
d=2 and d=16 Gaussians below up to 2.8e-2 and 4.8e-2 nats -- so "equals log p_{t_end}(x) to
1e-5" cannot hold under the default VP with a nonzero mean.  It is tested (a) under the
default VP after taking out the mismatch analytically at the computed latent (1e-6), and (b)
raw, to 1e-5, under a VP with beta_max=100 (alpha(1) = 1.4e-11, mismatch < 1e-9; measured
error 7.7e-8).  The same two checks apply to the Gaussian mixture (bound: 1e-4 nats per
dimension on average).
"""
from __future__ import annotations

import functools
import gc
import math
import warnings
import weakref

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import scoresde
import solvers
from conftest import make_sde
from solvers import LikelihoodResult, NonFiniteError, SolverError, bits_per_dim, encode, log_likelihood
from _shared import OU, two_mode_mixture

F64 = torch.float64


# ------------------------------------------------------------------ problems
@functools.lru_cache(maxsize=None)
def gaussian(d: int) -> scoresde.Gaussian:
    """Full covariance (random rotation, eigenvalues 0.05 .. 1.5), nonzero mean."""
    g = torch.Generator().manual_seed(10 + d)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    cov = (q * torch.linspace(0.05, 1.5, d, dtype=F64)) @ q.T
    return scoresde.Gaussian(torch.randn(d, generator=g, dtype=F64), cov)


def data(target, n: int, seed: int = 1) -> torch.Tensor:
    return target.sample(n, torch.Generator().manual_seed(seed))


def exact_model_log_prob(target: scoresde.Gaussian, sde, x: torch.Tensor, t_end: float) -> torch.Tensor:
    """log pi(Phi(x)) + log|det dPhi/dx| with Phi = target.flow(., t_end, T): the affine flow's
    log-determinant from the eigenvalue ratios."""
    z = target.flow(x, t_end, sde.T, sde)
    lam = torch.linalg.eigvalsh(target.cov.to(F64))
    te, T = torch.tensor(t_end, dtype=F64), torch.tensor(sde.T, dtype=F64)
    s2 = lambda t: sde.alpha(t) ** 2 * lam + sde.sigma(t) ** 2  # noqa: E731
    logdet = 0.5 * torch.log(s2(T) / s2(te)).sum()
    return sde.prior_log_prob(z) + logdet


def prior_mismatch(target, sde, z: torch.Tensor) -> torch.Tensor:
    """log pi(z) - log p_T(z) at the latent."""
    return sde.prior_log_prob(z) - target.marginal(sde, sde.T).log_prob(z)


class MLP(nn.Module):
    def __init__(self, d: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d + 1, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, d))

    def forward(self, x, t):
        return 0.3 * self.net(torch.cat([x, t[:, None]], dim=1))


def mlp_model(d: int = 3, dtype=F64) -> scoresde.ScoreModel:
    torch.manual_seed(0)
    return scoresde.ScoreModel(MLP(d).to(dtype).eval(), scoresde.VPSDE(), "eps")


# ------------------------------------------------------------------ exactness: Gaussian
@pytest.mark.parametrize("d", [2, 16])
def test_gaussian_equals_exact_model_density(d):
    target, sde = gaussian(d), scoresde.VPSDE()
    x = data(target, 32)
    res = log_likelihood(target.as_model(sde), x, rtol=1e-8, atol=1e-8)
    te = sde.default_t_end
    ref = exact_model_log_prob(target, sde, x, te)
    assert isinstance(res, LikelihoodResult)
    assert res.status == ("success",) * 32
    # measured: 8.7e-8 (d=2) and 9.1e-8 (d=16)
    torch.testing.assert_close(res.log_prob, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(res.z, target.flow(x, te, sde.T, sde), rtol=0, atol=1e-6)
    torch.testing.assert_close(res.log_prob, res.prior_log_prob + res.delta_log_prob, rtol=0, atol=1e-12)
    # the true log p_{t_end}(x), once the prior mismatch at the latent is taken out
    marg = target.marginal(sde, te).log_prob(x)
    torch.testing.assert_close(res.log_prob - prior_mismatch(target, sde, res.z), marg, rtol=0, atol=1e-6)
    # ... and the mismatch itself is what makes the raw comparison fail under the default VP
    assert float((res.log_prob - marg).abs().max()) > 1e-3


def test_log_det_reference_matches_jacobian():
    """The eigen-ratio log-determinant used above equals log|det| of the autograd Jacobian."""
    target, sde = gaussian(2), scoresde.VPSDE()
    x = data(target, 1)
    te = sde.default_t_end
    jac = torch.autograd.functional.jacobian(lambda u: target.flow(u[None], te, sde.T, sde)[0], x[0])
    ref = sde.prior_log_prob(target.flow(x, te, sde.T, sde)) + torch.linalg.slogdet(jac)[1]
    torch.testing.assert_close(exact_model_log_prob(target, sde, x, te), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("d", [2, 16])
def test_gaussian_vp_equals_marginal_when_prior_is_exact(d):
    """Under a VP whose alpha(T) is negligible (beta_max=100: alpha(1) = 1.4e-11) the prior is
    the terminal marginal and log_prob is log p_{t_end}(x) itself: to 1e-5 (issue bound)."""
    target, sde = gaussian(d), scoresde.VPSDE(beta_min=0.1, beta_max=100.0)
    x = data(target, 32)
    res = log_likelihood(target.as_model(sde), x, rtol=1e-8, atol=1e-8)
    marg = target.marginal(sde, sde.default_t_end).log_prob(x)
    assert float(prior_mismatch(target, sde, res.z).abs().max()) < 1e-9
    torch.testing.assert_close(res.log_prob, marg, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ exactness: mixture
def test_mixture_within_1e4_nats_per_dim():
    target = two_mode_mixture()
    x = data(target, 128)
    d = 2
    # default VP: the prior mismatch (measured 6.9e-4 nats/dim on average) is taken out at the latent
    sde = scoresde.VPSDE()
    res = log_likelihood(target.as_model(sde), x, rtol=1e-6, atol=1e-6)
    marg = target.marginal(sde, sde.default_t_end).log_prob(x)
    corrected = res.log_prob - prior_mismatch(target, sde, res.z)
    assert float((corrected - marg).abs().mean()) / d <= 1e-4            # measured 1.3e-6
    # VP with a negligible alpha(T): the raw log_prob, no correction
    sde = scoresde.VPSDE(beta_min=0.1, beta_max=100.0)
    res = log_likelihood(target.as_model(sde), x, rtol=1e-6, atol=1e-6)
    marg = target.marginal(sde, sde.default_t_end).log_prob(x)
    assert float((res.log_prob - marg).abs().mean()) / d <= 1e-4       # measured 1.9e-6


# ------------------------------------------------------------------ every SDE and prediction
@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "cosine", "edm", "rf"])
def test_every_sde_exact_model_density(name):
    sde, target = make_sde(name), gaussian(2)
    x = data(target, 16)
    res = log_likelihood(target.as_model(sde), x, rtol=1e-8, atol=1e-8)
    ref = exact_model_log_prob(target, sde, x, sde.default_t_end)
    torch.testing.assert_close(res.log_prob, ref, rtol=0, atol=1e-6)   # measured <= 1.8e-7 (VE, EDM)
    assert res.stats["t_end"] == sde.default_t_end and res.stats["T"] == sde.T


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "score", "edm", "flow"])
def test_every_prediction_type(prediction):
    sde, target = scoresde.VPSDE(), gaussian(2)
    x = data(target, 16)
    res = log_likelihood(target.as_model(sde, prediction), x, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(res.log_prob, exact_model_log_prob(target, sde, x, sde.default_t_end),
                               rtol=0, atol=1e-6)


def test_general_sde_through_its_pf_drift():
    b = 4.0
    twin, target = scoresde.VPSDE(beta_min=b, beta_max=b), gaussian(2)
    # a differentiable exact score network (target.score itself detaches x)
    net = target.as_model(twin, "score").net
    model = scoresde.ScoreModel(net, OU(b), prediction="score")
    x = data(target, 16)
    res = log_likelihood(model, x, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(res.log_prob, exact_model_log_prob(target, twin, x, OU.default_t_end),
                               rtol=0, atol=1e-6)
    hut = log_likelihood(model, x, "hutchinson", probes=2, generator=torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(hut.log_prob).all())


# ------------------------------------------------------------------ Hutchinson
@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_mean_within_4_standard_errors(noise):
    target, sde = gaussian(4), scoresde.VPSDE()
    model = target.as_model(sde)
    x = data(target, 8)
    exact = log_likelihood(model, x, rtol=1e-8, atol=1e-8)
    res = log_likelihood(model, x, "hutchinson", probes=256, noise=noise,
                         generator=torch.Generator().manual_seed(5), rtol=1e-8, atol=1e-8)
    assert res.trace_std_err.shape == (8,)
    assert bool((res.trace_std_err > 0).all())
    zscore = (res.delta_log_prob - exact.delta_log_prob) / res.trace_std_err
    assert float(zscore.abs().max()) < 4.0
    # an average, not a sum: 256 probes give a value of the size of the trace, not 256 times it
    assert float((res.delta_log_prob - exact.delta_log_prob).abs().max()) < 0.5


def test_rademacher_exact_on_diagonal_jacobian_for_any_probe_count():
    """Diagonal covariance => the drift's Jacobian is diagonal at every t => eps^T J eps = tr J
    exactly for every Rademacher probe, whatever their number (the estimate is averaged)."""
    target = scoresde.Gaussian(torch.tensor([0.5, -1.0, 2.0], dtype=F64), torch.tensor([0.3, 1.2, 0.05], dtype=F64))
    model = target.as_model(scoresde.VPSDE())
    x = data(target, 6)
    exact = log_likelihood(model, x, rtol=1e-9, atol=1e-9)
    for k in (1, 3, 8):
        res = log_likelihood(model, x, "hutchinson", probes=k, generator=torch.Generator().manual_seed(k),
                             rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(res.delta_log_prob, exact.delta_log_prob, rtol=0, atol=1e-8)
        if k > 1:
            assert float(res.trace_std_err.max()) < 1e-8


def test_hutchinson_reproducible_and_seeded():
    model, x = mlp_model(), torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    run = lambda seed, **kw: log_likelihood(model, x, "hutchinson", probes=3,  # noqa: E731
                                            generator=torch.Generator().manual_seed(seed), **kw)
    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a.log_prob, b.log_prob) and torch.equal(a.trace_std_err, b.trace_std_err)
    assert not torch.equal(a.log_prob, c.log_prob)
    assert a.nfe == b.nfe > 0
    g = run(7, noise="gaussian")
    assert not torch.equal(a.log_prob, g.log_prob)


def test_trace_std_err_conventions():
    model, x = mlp_model(), torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert log_likelihood(model, x).trace_std_err is None
    one = log_likelihood(model, x, "hutchinson", generator=torch.Generator().manual_seed(0))
    assert bool(torch.isnan(one.trace_std_err).all())       # cannot be estimated from one probe
    many = log_likelihood(model, x, "hutchinson", probes=16, generator=torch.Generator().manual_seed(0))
    assert bool((many.trace_std_err > 0).all()) and bool(torch.isfinite(many.trace_std_err).all())


def test_per_sample_generators_make_probes_batch_independent():
    model = mlp_model()
    x = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    gens = lambda idx: [torch.Generator().manual_seed(100 + i) for i in idx]  # noqa: E731
    full = log_likelihood(model, x, "hutchinson", probes=2, generator=gens(range(5)), per_sample=True)
    perm = [3, 0, 4]
    part = log_likelihood(model, x[perm], "hutchinson", probes=2, generator=gens(perm), per_sample=True)
    # one batched network call per stage: equal to the batch's rounding (measured 3.6e-15 nats)
    assert float((part.log_prob - full.log_prob[perm]).abs().max()) <= 1e-12
    with pytest.raises(ValueError, match="generator"):
        log_likelihood(model, x, "hutchinson", generator=gens(range(4)))


# ------------------------------------------------------------------ batches, modes, NFE
def test_per_sample_is_batch_independent_and_shared_step_within_tolerance():
    model = mlp_model()
    x = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    per = log_likelihood(model, x, per_sample=True)
    alone = log_likelihood(model, x[2:3], per_sample=True)
    assert float((alone.log_prob - per.log_prob[2:3]).abs().max()) <= 1e-12
    assert per.stats["solves"] == 6
    default = log_likelihood(model, x)                 # dopri5: per-sample step control by default
    assert torch.equal(default.log_prob, per.log_prob) and default.stats["per_sample"] is True
    shared = log_likelihood(model, x, per_sample=False)
    assert shared.stats["solves"] == 1
    torch.testing.assert_close(shared.log_prob, per.log_prob, rtol=1e-4, atol=1e-4)   # measured 2.4e-7


def test_products_jvp_equals_vjp_and_nfe_accounting():
    model = mlp_model(d=5)
    x = torch.randn(4, 5, dtype=F64, generator=torch.Generator().manual_seed(2))
    n0 = model.nfe
    vjp = log_likelihood(model, x, rtol=1e-4, atol=1e-4)
    assert vjp.nfe == model.nfe - n0 == vjp.stats["evaluations"]     # one net call per evaluation
    assert vjp.stats["products_count"] == 5 * vjp.stats["evaluations"]
    # forward mode on a fixed grid (torch.func's per-call overhead is large on tiny problems)
    grid = dict(method="rk4", steps=3)
    ref = log_likelihood(model, x, **grid)
    jvp = log_likelihood(model, x, products="jvp", chunk_size=2, **grid)
    torch.testing.assert_close(jvp.log_prob, ref.log_prob, rtol=0, atol=1e-10)
    assert ref.nfe == ref.stats["evaluations"] == 12
    # one (vmapped) net call per chunk, and one reverse-mode call on one sample checking the graph
    assert jvp.nfe == 3 * jvp.stats["evaluations"] + 1 == 37
    hv, hj = (log_likelihood(model, x, "hutchinson", probes=3, products=p, generator=torch.Generator().manual_seed(4),
                             **grid) for p in ("vjp", "jvp"))
    torch.testing.assert_close(hj.log_prob, hv.log_prob, rtol=0, atol=1e-10)
    assert hv.nfe == hj.nfe - 1 == 12                                  # all probes in one pass


def test_chunked_exact_trace_matches_unchunked():
    target, sde = gaussian(16), scoresde.VPSDE()
    model, x = target.as_model(sde), data(gaussian(16), 4)
    a = log_likelihood(model, x, rtol=1e-6, atol=1e-6)
    b = log_likelihood(model, x, rtol=1e-6, atol=1e-6, chunk_size=3)
    assert a.stats["chunk_size"] == 16 and b.stats["chunk_size"] == 3
    torch.testing.assert_close(a.log_prob, b.log_prob, rtol=0, atol=1e-10)


def test_exact_trace_cost_warning():
    d = 300
    model = scoresde.ScoreModel(lambda x, t: 0.1 * x, scoresde.VPSDE(), "eps")
    x = torch.randn(2, d, dtype=F64, generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match=r"d=300 dimensions computes 300 vector-Jacobian products per evaluation"):
        res = log_likelihood(model, x, method="euler", steps=1)
    assert res.stats["warnings"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log_likelihood(model, x, method="euler", steps=1, allow_expensive=True)
        log_likelihood(model, x, "hutchinson", method="euler", steps=1)


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_rank_agnostic(trace):
    """[B, C, H, W] data give the same numbers as the flattened [B, C*H*W] data."""
    g = torch.Generator().manual_seed(0)
    w = 0.2 * torch.randn(12, 12, generator=g, dtype=F64)
    net = lambda x, t: torch.tanh(x.reshape(x.shape[0], -1) @ w).reshape(x.shape)  # noqa: E731
    model = scoresde.ScoreModel(net, scoresde.VPSDE(), "eps")
    x = torch.randn(3, 3, 2, 2, generator=g, dtype=F64)
    kw = dict(generator=torch.Generator().manual_seed(1), probes=2) if trace == "hutchinson" else {}
    r4 = log_likelihood(model, x, trace, **kw)
    kw = dict(generator=torch.Generator().manual_seed(1), probes=2) if trace == "hutchinson" else {}
    r2 = log_likelihood(model, x.reshape(3, 12), trace, **kw)
    assert r4.z.shape == x.shape
    torch.testing.assert_close(r4.log_prob, r2.log_prob, rtol=0, atol=1e-12)


def test_fixed_step_method():
    target, sde = gaussian(2), scoresde.VPSDE()
    x = data(target, 8)
    res = log_likelihood(target.as_model(sde), x, method="rk4", steps=200)
    ref = exact_model_log_prob(target, sde, x, sde.default_t_end)
    torch.testing.assert_close(res.log_prob, ref, rtol=0, atol=1e-5)
    assert res.nfe == 4 * 200


def test_float32_keeps_dtype_and_agrees_with_float64():
    target, sde = gaussian(2), scoresde.VPSDE()
    x = data(target, 8)
    r64 = log_likelihood(target.as_model(sde), x)
    r32 = log_likelihood(target.as_model(sde), x.float())
    assert r32.log_prob.dtype == r32.z.dtype == torch.float32
    assert r32.stats["rtol"] == pytest.approx(100 * torch.finfo(torch.float32).eps)   # silently raised
    torch.testing.assert_close(r32.log_prob.double(), r64.log_prob, rtol=0, atol=2e-3)


def test_input_requires_grad_and_not_modified():
    model = mlp_model()
    x = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    x0 = x.detach().clone()
    res = log_likelihood(model, x)
    assert torch.equal(x.detach(), x0) and x.grad is None


# ------------------------------------------------------------------ memory and graphs
class _SavedTensorCounter:
    """Counts tensors saved for backward that are alive (freed once their graph is freed)."""

    class _Box:
        __slots__ = ("t", "__weakref__")

        def __init__(self, t):
            self.t = t

    def __init__(self):
        self.live = self.peak = self.total = 0

    def _dec(self):
        self.live -= 1

    def pack(self, t):
        box = self._Box(t)
        self.live += 1
        self.total += 1
        self.peak = max(self.peak, self.live)
        weakref.finalize(box, self._dec)
        return box

    @staticmethod
    def unpack(box):
        return box.t

    def run(self, fn):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            out = fn()
        gc.collect()
        return out


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_no_graph_is_kept_and_peak_does_not_grow_with_steps(trace):
    model = mlp_model()
    x = torch.randn(8, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    kw = dict(generator=torch.Generator().manual_seed(0), probes=2) if trace == "hutchinson" else {}
    loose, tight = _SavedTensorCounter(), _SavedTensorCounter()
    r1 = loose.run(lambda: log_likelihood(model, x, trace, rtol=1e-3, atol=1e-3, **kw))
    kw = dict(generator=torch.Generator().manual_seed(0), probes=2) if trace == "hutchinson" else {}
    r2 = tight.run(lambda: log_likelihood(model, x, trace, rtol=1e-9, atol=1e-9, **kw))
    assert r2.stats["evaluations"] >= 3 * r1.stats["evaluations"]
    assert tight.total >= 3 * loose.total > 0            # many more graphs were built ...
    assert tight.peak == loose.peak                       # ... but never more than one alive at a time
    assert tight.live == loose.live == 0                  # and none survives the call
    for res in (r1, r2):
        for v in (res.log_prob, res.prior_log_prob, res.delta_log_prob, res.z):
            assert not v.requires_grad and v.grad_fn is None
    assert all(p.grad is None for p in model.net.parameters())


def test_repeated_calls_do_not_grow_memory():
    model = mlp_model()
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(0))

    def live_tensors():
        gc.collect()
        with warnings.catch_warnings():          # isinstance on deprecated lazy torch objects warns
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    log_likelihood(model, x)
    before = live_tensors()
    for _ in range(3):
        res = log_likelihood(model, x, "hutchinson", probes=2, generator=torch.Generator().manual_seed(0))
    del res
    assert live_tensors() <= before


# ------------------------------------------------------------------ failures
def test_max_steps_failure_raises_with_per_sample_status():
    target, sde = gaussian(2), scoresde.VPSDE()
    model, x = target.as_model(sde), data(target, 4)
    with pytest.raises(SolverError, match=r"max_steps") as info:
        log_likelihood(model, x, max_steps=2)
    assert info.value.status == ("max_steps",) * 4
    assert isinstance(info.value.partial, LikelihoodResult)
    for per_sample, solves in ((True, 4), (False, 7)):   # shared step: 4 -> 2 + 2 -> 1 + 1 + 1 + 1
        res = log_likelihood(model, x, max_steps=2, on_failure="record", per_sample=per_sample)
        assert res.status == ("max_steps",) * 4
        assert not bool(res.ok.any())
        assert bool(torch.isnan(res.log_prob).all())      # never a truncated integral
        assert res.stats["solves"] == solves
    assert res.nfe == res.stats["evaluations"] > 0       # the failed solves' calls are counted too


def test_nonfinite_samples_reported_not_averaged():
    target, sde = gaussian(2), scoresde.VPSDE()
    exact = target.as_model(sde, "eps").net

    def net(x, t):
        out = exact(x, t)
        return torch.where((x[:, :1] > 2.5), torch.full_like(out, float("nan")), out)

    model = scoresde.ScoreModel(net, sde, "eps")
    mean = target.mean
    x = torch.stack([mean + 3.0, mean, mean + 0.1, mean + 4.0])
    with pytest.raises(NonFiniteError, match=r"samples \[0, 3\]") as info:
        log_likelihood(model, x)
    assert info.value.status[0] == info.value.status[3] == "nonfinite"
    res = log_likelihood(model, x, on_failure="record")
    assert res.status == ("nonfinite", "success", "success", "nonfinite")
    assert res.ok.tolist() == [False, True, True, False]
    assert bool(torch.isnan(res.log_prob[[0, 3]]).all())
    clean = log_likelihood(model, x[1:3])
    assert torch.equal(res.log_prob[1:3], clean.log_prob)
    assert res.stats["status_counts"] == {"nonfinite": 2, "success": 2}


# ------------------------------------------------------------------ bad input
def _model_and_x():
    calls = []

    def net(x, t):
        calls.append(1)
        return 0.1 * x

    return scoresde.ScoreModel(net, scoresde.VPSDE(), "eps"), torch.zeros(3, 2, dtype=F64), calls


@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(t_end=0.0), ValueError, r"t_end.*\[0, T\]=\[0, 1\]"),
    (dict(t_end=-1e-3), ValueError, r"t_end.*\[0, T\]"),
    (dict(t_end=1.0), ValueError, r"t_end.*\[0, T\]"),
    (dict(t_end=1.5), ValueError, r"t_end.*\[0, T\]"),
    (dict(t_end=float("nan")), ValueError, r"t_end"),
    (dict(trace="hutchinson", probes=0), ValueError, r"probes must be >= 1"),
    (dict(trace="hutchinson", probes=1.5), TypeError, r"probes must be an int"),
    (dict(trace="hutchinson", probes=True), TypeError, r"probes must be an int"),
    (dict(probes=2), ValueError, r"probes=2 applies to trace='hutchinson'"),
    (dict(trace="hutch"), ValueError, r"trace must be one of 'exact', 'hutchinson'"),
    (dict(trace="hutchinson", noise="uniform"), ValueError, r"noise must be one of 'rademacher', 'gaussian'"),
    (dict(rtol=-1e-5), ValueError, r"rtol must be >= 0"),
    (dict(atol=-1.0), ValueError, r"atol must be >= 0"),
    (dict(rtol=torch.tensor(1e-5, requires_grad=True)), ValueError, r"rtol"),
    (dict(method="rk45"), ValueError, r"method must be one of"),
    (dict(method="scipy_solver"), ValueError, r"method must be one of"),
    (dict(method="rk4"), ValueError, r"pass steps"),
    (dict(steps=10), ValueError, r"steps applies to fixed-step methods"),
    (dict(max_steps=0), ValueError, r"max_steps must be >= 1"),
    (dict(chunk_size=0), ValueError, r"chunk_size must be >= 1"),
    (dict(products="fwd"), ValueError, r"products must be one of"),
    (dict(on_failure="ignore"), ValueError, r"on_failure must be one of"),
    (dict(per_sample=1), TypeError, r"per_sample must be a bool"),
    (dict(trace="hutchinson", generator=3), TypeError, r"generator"),
])
def test_bad_arguments(kwargs, exc, pattern):
    model, x, calls = _model_and_x()
    with pytest.raises(exc, match=pattern):
        log_likelihood(model, x, **kwargs)
    assert not calls and model.nfe == 0


@pytest.mark.parametrize("x, exc, pattern", [
    (torch.zeros(3, 2, dtype=torch.int64), TypeError, r"x must be floating point"),
    (torch.zeros(3, 2, dtype=torch.float16), ValueError, r"float16.*float32 or float64"),
    (torch.zeros(3, 2, dtype=torch.bfloat16), ValueError, r"bfloat16"),
    (torch.tensor([[0.0, float("nan")], [0.0, 0.0], [float("inf"), 0.0]], dtype=F64), ValueError,
     r"x has 2 non-finite values \(samples \[0, 2\]\)"),
    (torch.tensor(1.0, dtype=F64), ValueError, r"batch dimension"),
    ([[0.0, 1.0]], TypeError, r"torch.Tensor"),
])
def test_bad_data(x, exc, pattern):
    model, _, calls = _model_and_x()
    with pytest.raises(exc, match=pattern):
        log_likelihood(model, x)
    with pytest.raises(exc, match=pattern):
        encode(model, x)
    assert not calls


@given(t_end=st.one_of(st.floats(-10.0, 0.0), st.floats(1.0, 10.0)),
       tol=st.floats(-1.0, -1e-300, allow_subnormal=False))
def test_invalid_t_end_and_tolerances_never_reach_the_net(t_end, tol):
    """Validation as a property: invalid input raises, names the argument, makes no network
    call and leaves the input untouched."""
    model, x, calls = _model_and_x()
    x0 = x.clone()
    with pytest.raises(ValueError, match=r"t_end"):
        log_likelihood(model, x, t_end=t_end)
    with pytest.raises(ValueError, match=r"rtol"):
        log_likelihood(model, x, rtol=tol)
    with pytest.raises(ValueError, match=r"atol"):
        log_likelihood(model, x, "hutchinson", atol=tol)
    assert not calls and torch.equal(x, x0)


def test_model_must_be_a_score_model():
    with pytest.raises(TypeError, match="model must be a scoresde.ScoreModel"):
        log_likelihood(lambda x, t: x, torch.zeros(2, 2))


def test_tiny_rtol_is_clamped_with_a_warning():
    model, x, _ = _model_and_x()
    with pytest.warns(RuntimeWarning, match="rtol=1e-20 is below 100"):
        res = log_likelihood(model, x, rtol=1e-20, method="euler", steps=2)
    assert res.stats["rtol"] == pytest.approx(100 * torch.finfo(F64).eps)


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_empty_batch(trace):
    model, _, calls = _model_and_x()
    res = log_likelihood(model, torch.zeros(0, 2, dtype=F64), trace, generator=torch.Generator().manual_seed(0))
    assert res.nfe == 0 and not calls
    assert res.status == ()
    for v in (res.log_prob, res.prior_log_prob, res.delta_log_prob):
        assert v.shape == (0,) and v.dtype == F64
    assert res.z.shape == (0, 2)
    if trace == "hutchinson":
        assert res.trace_std_err.shape == (0,)


# ------------------------------------------------------------------ encoding
def test_encode_is_the_exact_flow_and_decode_round_trips():
    target, sde = gaussian(2), scoresde.VPSDE()
    model, x = target.as_model(sde), data(target, 16)
    enc = encode(model, x, rtol=1e-8, atol=1e-8)
    te = sde.default_t_end
    assert enc.nfe > 0 and enc.stats["status"] == "success"
    assert float(enc.timesteps[0]) == te and float(enc.timesteps[-1]) == sde.T
    torch.testing.assert_close(enc.x, target.flow(x, te, sde.T, sde), rtol=0, atol=1e-6)
    dec = solvers.sample(model, enc.x, "pf_ode", t_end=te, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(dec.x, x, rtol=0, atol=1e-6)            # measured ~1e-8
    # the likelihood's latent is the same encoding
    torch.testing.assert_close(log_likelihood(model, x, rtol=1e-8, atol=1e-8).z, enc.x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("tol", [1e-4, 1e-6])
def test_mixture_round_trip_within_tolerance(tol):
    target, sde = two_mode_mixture(), scoresde.VPSDE()
    model, x = target.as_model(sde), data(two_mode_mixture(), 64)
    z = encode(model, x, rtol=tol, atol=tol).x
    back = solvers.sample(model, z, "pf_ode", rtol=tol, atol=tol).x
    err = float((back - x).abs().max())
    assert err <= 100 * tol * (1 + float(x.abs().max()))


def test_encode_bad_t_end_and_fixed_steps():
    target, sde = gaussian(2), scoresde.VPSDE()
    model, x = target.as_model(sde), data(target, 4)
    with pytest.raises(ValueError, match=r"t_end.*\[0, T\]"):
        encode(model, x, t_end=2.0)
    sol = encode(model, x, method="rk4", steps=100)
    assert sol.nfe == 400
    torch.testing.assert_close(sol.x, target.flow(x, sde.default_t_end, sde.T, sde), rtol=0, atol=1e-5)


# ------------------------------------------------------------------ bits per dim
def test_bits_per_dim_plain():
    assert bits_per_dim(-3 * 10 * math.log(2), 10) == pytest.approx(3.0, abs=1e-12)
    t = bits_per_dim(torch.tensor([-3 * 10 * math.log(2), 0.0], dtype=F64), 10)
    assert isinstance(t, torch.Tensor) and t.tolist() == pytest.approx([3.0, 0.0], abs=1e-12)


def test_bits_per_dim_conventions_hand_computed():
    # 8-bit, [-1, 1], uniform dequantization: 1000/(3072 ln 2) + 8 - log2(2) = 0.469627... + 7
    assert bits_per_dim(-1000.0, 3072, data_range=(-1, 1), dequantization="uniform") == \
        pytest.approx(7.4696272919560425, abs=1e-12)
    # [0, 1], uniform: offset 8 (bins of width 1/256); 5 bits: offset 5
    assert bits_per_dim(0.0, 4, data_range=(0, 1), dequantization="uniform") == pytest.approx(8.0)
    assert bits_per_dim(0.0, 4, data_range=(0, 1), dequantization="uniform", bits=5) == pytest.approx(5.0)
    # no dequantization, grid x = n/255 on [0, 1]: offset -log2(1/255) = log2(255) = 7.99435...
    assert bits_per_dim(0.0, 1, data_range=(0, 1), dequantization="none") == pytest.approx(7.994353436858858)
    # [-1, 1], no dequantization: -log2(2/255) = 6.99435...
    assert bits_per_dim(0.0, 1, data_range=(-1, 1), dequantization="none") == pytest.approx(6.994353436858858)
    # data already on the integer scale [0, 255]: the Jacobian term is 0
    assert bits_per_dim(-5.0, 2, data_range=(0, 255), dequantization="none") == pytest.approx(5 / (2 * math.log(2)))


@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(data_range=(-1, 1)), ValueError, r"data_range needs dequantization"),
    (dict(dequantization="uniform"), ValueError, r"dequantization needs data_range"),
    (dict(bits=8), ValueError, r"bits needs data_range"),
    (dict(data_range=(1, -1), dequantization="uniform"), ValueError, r"data_range must have a < b"),
    (dict(data_range=(1, 1), dequantization="none"), ValueError, r"data_range must have a < b"),
    (dict(data_range=(0,), dequantization="none"), ValueError, r"data_range must be a pair"),
    (dict(data_range=(0, 1), dequantization="variational"), ValueError, r"dequantization must be one of"),
    (dict(data_range=(0, 1), dequantization="uniform", bits=0), ValueError, r"bits must be >= 1"),
    (dict(data_range=(0, 1), dequantization="uniform", bits=64), ValueError, r"bits must be in 1..32"),
    (dict(data_range=(0, 1), dequantization="uniform", bits=8.0), TypeError, r"bits must be an int"),
])
def test_bits_per_dim_refuses_what_it_cannot_interpret(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        bits_per_dim(-1.0, 3, **kwargs)


@given(a=st.floats(-100.0, 100.0), width=st.floats(1e-3, 1e3), bits=st.integers(1, 16),
       lp=st.floats(-1e4, 1e4), dims=st.integers(1, 4096))
def test_bits_per_dim_offsets_are_the_stated_jacobians(a, width, bits, lp, dims):
    """bpd(conventions) - bpd(plain) is exactly the documented per-dimension offset."""
    plain = bits_per_dim(lp, dims)
    uni = bits_per_dim(lp, dims, data_range=(a, a + width), dequantization="uniform", bits=bits)
    grid = bits_per_dim(lp, dims, data_range=(a, a + width), dequantization="none", bits=bits)
    w = (a + width) - a                       # the width bits_per_dim sees
    tol = 1e-12 * (1.0 + abs(plain) + abs(math.log2(w)))
    assert uni - plain == pytest.approx(bits - math.log2(w), abs=tol)
    assert grid - plain == pytest.approx(math.log2(2 ** bits - 1) - math.log2(w), abs=tol)


def test_bits_per_dim_bad_arguments():
    with pytest.raises(ValueError, match="num_dims must be >= 1"):
        bits_per_dim(-1.0, 0)
    with pytest.raises(TypeError, match="num_dims must be an int"):
        bits_per_dim(-1.0, 3.0)
    with pytest.raises(TypeError, match="log_prob must be floating point"):
        bits_per_dim(torch.tensor([1, 2]), 3)
    with pytest.raises(TypeError, match="log_prob must be a tensor or a number"):
        bits_per_dim("x", 3)


# ------------------------------------------------------------------ slow
@pytest.mark.slow
def test_slow_mixture_hutchinson_many_probes_matches_exact():
    target, sde = two_mode_mixture(), scoresde.VPSDE()
    model, x = target.as_model(sde), data(two_mode_mixture(), 32)
    exact = log_likelihood(model, x, rtol=1e-7, atol=1e-7)
    res = log_likelihood(model, x, "hutchinson", probes=512, generator=torch.Generator().manual_seed(0),
                         rtol=1e-7, atol=1e-7)
    z = (res.delta_log_prob - exact.delta_log_prob) / res.trace_std_err
    assert float(z.abs().max()) < 4.5       # 32 samples: max |z| of 32 normals stays below 4.5


@pytest.mark.slow
def test_slow_discrete_vp_exact_model_density():
    """DiscreteVPSDE has piecewise-constant f, g^2 (1000 knots in t): dopri5's error estimate
    misses the kinks and the integral converges slowly (measured: 2.1e-3 nats at rtol 1e-6,
    1.3e-3 at 1e-7; ~2e4 NFE at 1e-8).  Documented limitation; this pins the measured size."""
    sde, target = make_sde("discrete"), gaussian(2)
    x = data(target, 8)
    res = log_likelihood(target.as_model(sde), x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(res.log_prob, exact_model_log_prob(target, sde, x, sde.default_t_end),
                               rtol=0, atol=5e-3)


@pytest.mark.slow
@pytest.mark.parametrize("d", [2, 16])
def test_slow_gaussian_tighter(d):
    target, sde = gaussian(d), scoresde.VPSDE()
    x = data(target, 256, seed=7)
    res = log_likelihood(target.as_model(sde), x, rtol=1e-10, atol=1e-10, method="dopri8")
    torch.testing.assert_close(res.log_prob, exact_model_log_prob(target, sde, x, sde.default_t_end),
                               rtol=0, atol=1e-7)
