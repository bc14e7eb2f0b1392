"""log_likelihood refuses a network whose output autograd cannot differentiate in x.

The divergence of the probability-flow drift needs d net / d x.  A network that breaks its
autograd graph (a detach, no_grad, inference_mode, a numpy round trip, an integer cast, features
computed on a detached copy) would lose that term: the drift's own f(t) x still depends on x,
so nothing failed and the result was silently wrong (measured on the d=2 Gaussian under the
default VP, an exact network called on x.detach(): -12.14 nats returned, -1.29 exact).  Now the first
evaluation checks that autograd reaches x from the network output, and raises ValueError.
A network whose output is constant in x is refused the same way (autograd cannot tell it from a
detached one); written as ``0 * x + c`` it is accepted and exact.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import scoresde
from conftest import make_sde
from solvers import log_likelihood

F64 = torch.float64


def _no_grad(net):
    def f(x, t):
        with torch.no_grad():
            return net(x, t)
    return f


def _inference_mode(net):
    def f(x, t):
        with torch.inference_mode():
            return net(x, t)
    return f


class _DetachedEmbedding:
    """Features of a detached copy of x (a fixed random projection) fed to the network."""

    def __init__(self, net, d: int):
        self.net = net
        self.w = torch.linalg.qr(torch.randn(d, d, dtype=F64, generator=torch.Generator().manual_seed(3)))[0]

    def __call__(self, x, t):
        return self.net((x.detach() @ self.w) @ self.w.T, t)


BREAKS = {
    "detach": lambda net: (lambda x, t: net(x.detach(), t)),
    "detach_output": lambda net: (lambda x, t: net(x, t).detach()),
    "no_grad": _no_grad,
    "inference_mode": _inference_mode,
    "numpy_round_trip": lambda net: (lambda x, t: net(torch.from_numpy(x.detach().numpy()), t)),
    "integer_cast": lambda net: (lambda x, t: net(torch.round(x * 2.0 ** 20).long().to(x.dtype) / 2.0 ** 20, t)),
    "detached_embedding": lambda net: _DetachedEmbedding(net, 2),
}


class MLP(nn.Module):
    """A small network whose parameters require grad (its output requires grad even when x
    is detached: only the path from x tells)."""

    def __init__(self, d: int = 2, width: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(d + 1, width), nn.SiLU(), nn.Linear(width, d)).to(F64)

    def forward(self, x, t):
        return 0.3 * self.net(torch.cat([x, t[:, None].to(x.dtype)], dim=1))


def _target():
    return scoresde.Gaussian(torch.tensor([0.5, -0.3], dtype=F64), torch.tensor([[0.6, 0.2], [0.2, 0.4]], dtype=F64))


def _inner(kind: str, sde):
    return _target().as_model(sde).net if kind == "exact_net" else MLP().eval()


@pytest.mark.parametrize("products", ["vjp", "jvp"])
@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
@pytest.mark.parametrize("inner", ["exact_net", "mlp"])
@pytest.mark.parametrize("brk", sorted(BREAKS))
def test_broken_graph_raises_at_the_first_evaluation(brk, inner, trace, products):
    sde = scoresde.VPSDE()
    net = _inner(inner, sde)
    model = scoresde.ScoreModel(BREAKS[brk](net), sde, "eps")
    x = _target().sample(3, torch.Generator().manual_seed(1))
    kw = dict(generator=torch.Generator().manual_seed(0), probes=2) if trace == "hutchinson" else {}
    with pytest.raises(ValueError, match=r"network's output is not differentiable with respect to x") as info:
        log_likelihood(model, x, trace, products=products, method="euler", steps=4, **kw)
    assert "detach" in str(info.value) and "numpy" in str(info.value)
    assert model.nfe == 1                         # found at the first network call
    if isinstance(net, nn.Module):
        assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("name", ["ve", "edm"])
def test_zero_drift_sde_is_refused_too(name):
    """VE/EDM: f = 0, the drift is the score term alone; it used to count as a zero divergence."""
    sde = make_sde(name)
    model = scoresde.ScoreModel(BREAKS["detach"](_target().as_model(sde).net), sde, "eps")
    x = _target().sample(3, torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"not differentiable with respect to x"):
        log_likelihood(model, x, method="euler", steps=4)


def test_a_later_call_that_loses_the_graph_is_never_a_zero_divergence():
    """The full path check runs on the first call; later calls check (at no cost) that the
    output still requires grad, so a parameter-free network that drops its graph later (here:
    for t > 0.5) still raises instead of adding zero."""
    sde = make_sde("ve")
    exact = _target().as_model(sde).net

    def net(x, t):
        return exact(x.detach() if float(t[0]) > 0.5 else x, t)

    model = scoresde.ScoreModel(net, sde, "eps")
    x = _target().sample(3, torch.Generator().manual_seed(1))
    msg = r"not differentiable with respect to x \(the network output does not require grad, t=0\.500005"
    with pytest.raises(ValueError, match=msg):
        log_likelihood(model, x, method="euler", steps=4)


def _point_mass_log_prob(sde, x: torch.Tensor, mu: torch.Tensor, t_end: float) -> torch.Tensor:
    """Model density of the constant x0-prediction mu: p_t = N(alpha mu, sigma^2 I), whose PF
    flow scales x - alpha mu by sigma(T)/sigma(t_end)."""
    te, T = torch.tensor(t_end, dtype=F64), torch.tensor(sde.T, dtype=F64)
    ratio = sde.sigma(T) / sde.sigma(te)
    z = sde.alpha(T) * mu + ratio * (x - sde.alpha(te) * mu)
    return sde.prior_log_prob(z) + x.shape[1] * torch.log(ratio)


def test_constant_output_written_as_a_function_of_x_is_accepted_and_exact():
    sde, mu = scoresde.VPSDE(), torch.tensor([0.5, -0.3], dtype=F64)
    x = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(2)) * 0.01 + mu
    constant = scoresde.ScoreModel(lambda x, t: mu.expand(x.shape[0], -1), sde, "x0")
    with pytest.raises(ValueError, match=r"constant in x is refused too.*0 \* x \+ c"):
        log_likelihood(constant, x, method="euler", steps=2)
    model = scoresde.ScoreModel(lambda x, t: 0 * x + mu, sde, "x0")
    res = log_likelihood(model, x, rtol=1e-8, atol=1e-8)
    ref = _point_mass_log_prob(sde, x, mu, sde.default_t_end)
    torch.testing.assert_close(res.log_prob, ref, rtol=0, atol=1e-6)
    assert math.isfinite(float(res.log_prob.sum()))
    grid = dict(method="rk4", steps=3)
    torch.testing.assert_close(log_likelihood(model, x, products="jvp", **grid).log_prob,
                               log_likelihood(model, x, **grid).log_prob, rtol=0, atol=1e-10)


def test_network_independent_of_some_coordinates_is_accepted():
    """A path from x to the output is all the check asks: a network that ignores a coordinate
    (a zero Jacobian column) is legitimate, and vjp and jvp agree on it."""
    sde = scoresde.VPSDE()
    model = scoresde.ScoreModel(lambda x, t: torch.tanh(x[:, :1]).expand(-1, 2) * 0.5, sde, "eps")
    x = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    grid = dict(method="rk4", steps=3)
    a, b = log_likelihood(model, x, **grid), log_likelihood(model, x, products="jvp", **grid)
    torch.testing.assert_close(a.log_prob, b.log_prob, rtol=0, atol=1e-10)
    assert a.status == ("success",) * 3
