"""ScoreModel: parameterisations, conversions, EDM preconditioning, time inputs, NFE,
guidance, dtype; the conversions between parameterisations checked as properties."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

import scoresde
from scoresde import (
    DiscreteVPSDE,
    EDMSDE,
    Gaussian,
    GaussianMixture,
    Prediction,
    ScoreModel,
    VPSDE,
    append_dims,
)
from scoresde.model import Coefficients, from_prediction, to_prediction
from conftest import SDE_NAMES, interior_times, make_sde

F64 = torch.float64
PREDICTIONS = ("eps", "x0", "v", "score", "edm", "flow")


def _targets():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 3, generator=g, dtype=F64)
    full = A @ A.T / 3 + 0.2 * torch.eye(3, dtype=F64)
    means = torch.tensor([[-1.5, 0.0, 1.0], [1.0, 1.0, -0.5]], dtype=F64)
    return {
        "gaussian": Gaussian(torch.tensor([0.5, -1.0, 2.0], dtype=F64), full),
        "mixture": GaussianMixture(torch.tensor([0.3, 0.7], dtype=F64), means,
                                   torch.tensor([[0.2, 0.9, 0.4], [1.1, 0.3, 0.6]], dtype=F64)),
    }


TARGETS = _targets()


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


def _rows_close(got, ref, x, sde, t, rel, unit, what=""):
    """Row i within ``rel`` of max|ref_i| plus the conditioning floor of the conversions:
    a net output rounded to ``unit`` becomes an error of about unit*|x|/sigma^2 in the score,
    unit*|x|/sigma in eps and unit*|x|/alpha in x0 (e.g. x0-prediction at t -> 0)."""
    a, s = sde.alpha(t), sde.sigma(t)
    for i in range(t.shape[0]):
        k = 1.0 / float(s[i]) ** 2 + 1.0 / float(s[i]) + 1.0 / float(a[i])
        tol = rel * float(ref[i].abs().max()) + 4 * unit * float(x[i].abs().max()) * k
        err = float((got[i] - ref[i]).abs().max())
        assert err <= tol, (what, float(t[i]), err, tol)


class Recorder:
    """net(x_in, t_in[, cond]) that records its inputs and returns fn(x_in, t_in[, cond])."""

    def __init__(self, fn=None):
        self.fn = fn or (lambda x, t, *c: 0.5 * x + append_dims(t, x.ndim))
        self.calls: list[tuple] = []

    def __call__(self, x, t, *cond):
        self.calls.append((x.clone(), t.clone(), *cond))
        return self.fn(x, t, *cond)


def _exact_points(sde, t: torch.Tensor, n_seed: int = 0) -> torch.Tensor:
    """x_t = alpha x0 + sigma eps with x0 from the Gaussian target."""
    g = torch.Generator().manual_seed(n_seed)
    x0 = TARGETS["gaussian"].sample(t.shape[0], generator=g)
    eps = torch.randn(t.shape[0], 3, generator=g, dtype=F64)
    return sde.alpha(t)[:, None] * x0 + sde.sigma(t)[:, None] * eps


def _coefficients_by_autograd(sde, t: torch.Tensor, ndim: int) -> Coefficients:
    """alpha, sigma and their time derivatives by autograd through the public schedule."""
    tt = t.clone().requires_grad_(True)
    a, s = sde.alpha(tt), sde.sigma(tt)
    da = torch.autograd.grad(a.sum(), tt)[0] if a.requires_grad else torch.zeros_like(t)
    ds = torch.autograd.grad(s.sum(), tt)[0]
    c = lambda v: append_dims(v.detach(), ndim)  # noqa: E731
    return Coefficients(c(a), c(s), c(da), c(ds))


# --------------------------------------------------------------------------- exact models
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_as_model_gives_the_exact_outputs(any_sde, prediction):
    """target.as_model(sde, p) reproduces the exact score, eps, x0 and v for every p."""
    sde = any_sde
    t = interior_times(sde, 10)
    for name, tgt in TARGETS.items():
        x = _exact_points(sde, t)
        model = tgt.as_model(sde, prediction)
        assert model.prediction is Prediction(prediction) and model.nfe == 0
        score, eps, x0 = tgt.score(x, t, sde), tgt.eps(x, t, sde), tgt.x0(x, t, sde)
        a, s = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
        v = (a * eps - s * x0) / torch.sqrt(a * a + s * s)
        for got, ref, what in ((model.score(x, t), score, "score"), (model.eps(x, t), eps, "eps"),
                               (model.x0(x, t), x0, "x0"), (model.v(x, t), v, "v")):
            assert got.dtype == F64
            _rows_close(got, ref, x, sde, t, 1e-10, 2.0 ** -52, (name, prediction, what))
        assert model.nfe == 4
        # a scalar time broadcasts to the batch
        tm = float(t[5])
        assert _max_err(model.eps(x, tm), tgt.eps(x, tm, sde)) <= 1e-9


# --------------------------------------------------------------------------- conversions
_arr = arrays(np.float64, (3, 2, 2), elements=st.floats(-5.0, 5.0, allow_nan=False, allow_subnormal=False))


@given(x0=_arr, eps=_arr, u=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3))
def test_conversions_round_trip(any_sde, x0, eps, u):
    """For every prediction type: to_prediction then from_prediction is the identity on
    (x0, eps), and the network target matches its defining formula."""
    sde = any_sde
    te, T = sde.default_t_end, sde.T
    t = torch.tensor([te * (T / te) ** ui for ui in u], dtype=F64).clamp(te, T)
    x0, eps = torch.from_numpy(x0), torch.from_numpy(eps)
    c = _coefficients_by_autograd(sde, t, 3)
    a, s = c.alpha, c.sigma
    x = a * x0 + s * eps
    scale = float(torch.maximum(x0.abs().max(), eps.abs().max()).clamp(min=1e-3))
    sh = s / a
    sd = 0.5
    x_hat = x / a
    c_skip = sd ** 2 / (sh ** 2 + sd ** 2)
    c_out = sh * sd / torch.sqrt(sh ** 2 + sd ** 2)
    defining = {
        "eps": eps,
        "x0": x0,
        "score": -eps / s,
        "v": (a * eps - s * x0) / torch.sqrt(a * a + s * s),
        "flow": c.dalpha * x0 + c.dsigma * eps,
        "edm": (x0 - c_skip * x_hat) / c_out,
    }
    for p in PREDICTIONS:
        out = to_prediction(p, x, x0, eps, c, sd)
        ref = defining[p]
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max().clamp(min=1e-300)))
        x0_b, eps_b = from_prediction(p, x, out, c, sd)
        assert float((x0_b - x0).abs().max()) <= 1e-10 * scale * (1 + 1 / float(a.min())), p
        assert float((eps_b - eps).abs().max()) <= 1e-10 * scale * (1 + 1 / float(s.min())), p
        # the chain eps -> x0 -> v -> x0 -> eps through ScoreModel's conversions
        x0_c, eps_c = from_prediction("v", x, to_prediction("v", x, *from_prediction("eps", x, eps, c), c), c)
        assert float((eps_c - eps).abs().max()) <= 1e-10 * scale * (1 + 1 / float(s.min()))


def test_flow_coefficients_match_autograd(any_sde):
    """The time derivatives ScoreModel uses for "flow" equal autograd of alpha and sigma."""
    sde = any_sde
    t = interior_times(sde, 20)
    x = torch.zeros(20, 3, dtype=F64)
    lib = scoresde.model._coefficients(sde, t, x, True)
    ref = _coefficients_by_autograd(sde, t, 2)
    torch.testing.assert_close(lib.dalpha, ref.dalpha, rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(lib.dsigma, ref.dsigma, rtol=1e-10, atol=0.0)
    if isinstance(sde, scoresde.RectifiedFlowSDE):   # flow target eps - x0
        torch.testing.assert_close(lib.dalpha, -torch.ones_like(lib.dalpha), rtol=1e-15, atol=0.0)
        torch.testing.assert_close(lib.dsigma, torch.ones_like(lib.dsigma), rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_score_model_converts_net_output(any_sde, prediction):
    """A net returning the prediction for known (x0, eps) gives back x0, eps, score, v."""
    sde = any_sde
    g = torch.Generator().manual_seed(1)
    t = interior_times(sde, 6)
    x0 = torch.randn(6, 2, 3, generator=g, dtype=F64)
    eps = torch.randn(6, 2, 3, generator=g, dtype=F64)
    c = _coefficients_by_autograd(sde, t, 3)
    x = c.alpha * x0 + c.sigma * eps
    out = to_prediction(prediction, x, x0, eps, c, 0.5)
    model = ScoreModel(lambda x_in, t_in: out, sde, prediction)
    scale = 1 + 1 / float(min(c.alpha.min(), c.sigma.min()))
    for got, ref in ((model.x0(x, t), x0), (model.eps(x, t), eps), (model.score(x, t), -eps / c.sigma),
                     (model.v(x, t), (c.alpha * eps - c.sigma * x0) / torch.sqrt(c.alpha ** 2 + c.sigma ** 2))):
        torch.testing.assert_close(got, ref, rtol=1e-10 * scale, atol=1e-10 * scale)
    d = model.evaluate(x, t)
    torch.testing.assert_close(d.score, -d.eps / d.sigma, rtol=0.0, atol=0.0)
    assert model.nfe == 5


# --------------------------------------------------------------------------- EDM preconditioning
@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_edm_preconditioning_formulas(sigma_data):
    """With EDMSDE (alpha = 1, sigma = t): the net sees c_in x and c_noise = log(sigma)/4 and
    x0 = c_skip x + c_out F (Karras et al. 2022, Table 1)."""
    sde = EDMSDE()
    sig = torch.tensor([0.002, 0.05, 1.0, 7.0, 80.0], dtype=F64)
    x = torch.randn(5, 2, 4, generator=torch.Generator().manual_seed(2), dtype=F64) * append_dims(
        torch.sqrt(sig ** 2 + 1), 3)
    net = Recorder(lambda xi, ti: torch.sin(xi) + append_dims(ti, xi.ndim))
    model = ScoreModel(net, sde, "edm", sigma_data=sigma_data)
    assert model.time_input == "c_noise"
    x0 = model.x0(x, sig)
    (x_in, t_in), = net.calls
    s = append_dims(sig, 3)
    c_skip = sigma_data ** 2 / (s ** 2 + sigma_data ** 2)
    c_out = s * sigma_data / torch.sqrt(s ** 2 + sigma_data ** 2)
    c_in = 1 / torch.sqrt(s ** 2 + sigma_data ** 2)
    torch.testing.assert_close(x_in, c_in * x, rtol=1e-15, atol=0.0)
    torch.testing.assert_close(t_in, torch.log(sig) / 4, rtol=1e-14, atol=1e-16)
    F = torch.sin(x_in) + append_dims(t_in, 3)
    torch.testing.assert_close(x0, c_skip * x + c_out * F, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(model.eps(x, sig), (x - x0) / s, rtol=1e-12, atol=1e-12)


def test_edm_preconditioning_on_vp_uses_scaled_state():
    """On a VP SDE the EDM parameterisation acts on x_hat = x/alpha, sigma_hat = sigma/alpha."""
    sde = VPSDE()
    t = torch.tensor([1e-3, 0.3, 1.0], dtype=F64)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    net = Recorder(lambda xi, ti: torch.cos(xi))
    model = ScoreModel(net, sde, "edm")
    x0 = model.x0(x, t)
    (x_in, t_in), = net.calls
    a, s = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
    sh, xh, sd = s / a, x / a, 0.5
    torch.testing.assert_close(x_in, xh / torch.sqrt(sh ** 2 + sd ** 2), rtol=1e-14, atol=0.0)
    torch.testing.assert_close(t_in, torch.log(sh[:, 0]) / 4, rtol=1e-12, atol=1e-15)
    ref = sd ** 2 / (sh ** 2 + sd ** 2) * xh + sh * sd / torch.sqrt(sh ** 2 + sd ** 2) * torch.cos(x_in)
    torch.testing.assert_close(x0, ref, rtol=1e-13, atol=1e-13)


# --------------------------------------------------------------------------- NFE, guidance
def test_nfe_counts_every_net_call():
    net = Recorder()
    model = ScoreModel(net, VPSDE(), "eps")
    x = torch.randn(4, 3, dtype=F64)
    assert model.nfe == 0
    model.eps(x, 0.5)
    assert model.nfe == 1
    model.x0(x, 0.5)
    model.score(x, 0.5)
    model.v(x, 0.5)
    assert model.nfe == 4 == len(net.calls)
    model.evaluate(x, torch.full((4,), 0.5, dtype=F64), validate=False)
    assert model.nfe == 5 == len(net.calls)
    model.reset_nfe()
    assert model.nfe == 0
    model.eps(x, 0.2)
    assert model.nfe == 1 == len(net.calls) - 5


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_guidance_is_one_doubled_call(prediction):
    """guided(cond, uncond, w): ONE net call on a doubled batch, out = out_u + w (out_c - out_u)
    in the prediction space; the copy shares the NFE counter."""
    B = 4
    net = Recorder(lambda x, t, c: x * append_dims(c, x.ndim) + append_dims(t, x.ndim))
    sde = VPSDE()
    model = ScoreModel(net, sde, prediction)
    cond, uncond, w = torch.tensor([2.0], dtype=F64), torch.tensor([0.5], dtype=F64), 3.0
    gm = model.guided(cond, uncond, w)
    x = torch.randn(B, 3, generator=torch.Generator().manual_seed(4), dtype=F64)
    t = torch.linspace(0.1, 0.9, B, dtype=F64)
    d = gm.evaluate(x, t)
    assert len(net.calls) == 1 and gm.nfe == 1 and model.nfe == 1
    x_in, t_in, c_in = net.calls[0]
    assert x_in.shape == (2 * B, 3) and t_in.shape == (2 * B,) and c_in.shape == (2 * B,)
    torch.testing.assert_close(x_in, torch.cat([x, x]), rtol=0.0, atol=0.0)
    torch.testing.assert_close(c_in, torch.cat([cond.expand(B), uncond.expand(B)]), rtol=0.0, atol=0.0)
    out_c, out_u = 2.0 * x + t[:, None], 0.5 * x + t[:, None]
    guided_out = out_u + w * (out_c - out_u)
    c = _coefficients_by_autograd(sde, t, 2)
    x0_ref, eps_ref = from_prediction(prediction, x, guided_out, c)
    torch.testing.assert_close(d.x0, x0_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d.eps, eps_ref, rtol=1e-12, atol=1e-12)
    gm.eps(x, t)
    gm.x0(x, t)
    assert gm.nfe == 3 == model.nfe == len(net.calls)
    # plain conditioning: net(x, t, cond) with a per-sample cond
    cm = ScoreModel(net, sde, prediction, cond=torch.arange(B, dtype=F64))
    cm.eps(x, t)
    assert net.calls[-1][2].shape == (B,) and cm.nfe == 1


# --------------------------------------------------------------------------- time inputs
def test_time_input_options():
    x = torch.randn(4, 3, dtype=F64)
    disc = DiscreteVPSDE(betas=torch.linspace(1e-4, 0.02, 1000, dtype=F64))
    n = torch.tensor([0, 9, 500, 999])
    t_grid = (n + 1).to(F64) / 1000
    net = Recorder()
    ScoreModel(net, disc, "eps", time_input="discrete").eps(x, t_grid)
    torch.testing.assert_close(net.calls[-1][1], n.to(F64), rtol=0.0, atol=1e-12)
    for sde in (VPSDE(), make_sde("ve"), EDMSDE(), disc):
        t = interior_times(sde, 4)
        a, s = sde.alpha(t), sde.sigma(t)
        expected = {
            "t": t,
            "c_noise": torch.log(s / a) / 4,
            "log_snr": sde.log_snr(t),
            "sigma": s / a,
        }
        for opt, ref in expected.items():
            net = Recorder()
            ScoreModel(net, sde, "eps", time_input=opt).eps(x, t)
            torch.testing.assert_close(net.calls[-1][1], ref, rtol=1e-13, atol=1e-15)
        seen = []

        def fn(tt):
            seen.append(tt)
            return 1000.0 * tt

        net = Recorder()
        ScoreModel(net, sde, "eps", time_input=fn).eps(x.float(), t.float())
        assert seen[0].dtype == F64 and seen[0].shape == (4,)
        assert net.calls[-1][1].dtype == torch.float32
        torch.testing.assert_close(net.calls[-1][1], (1000.0 * t).float(), rtol=1e-6, atol=0.0)
    # defaults: "t", and "c_noise" for the EDM parameterisation
    assert ScoreModel(Recorder(), VPSDE(), "eps").time_input == "t"
    assert ScoreModel(Recorder(), VPSDE(), "edm").time_input == "c_noise"


# --------------------------------------------------------------------------- dtype, modes
def test_dtype_preserved_and_close_to_float64():
    sde = VPSDE()
    tgt = TARGETS["mixture"]
    t = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=F64)
    x64 = _exact_points(sde, t).to(torch.float32).to(F64)
    x32 = x64.to(torch.float32)
    for p in PREDICTIONS:
        model = tgt.as_model(sde, p)
        for fn in ("eps", "x0", "score", "v"):
            o32 = getattr(model, fn)(x32, t.float())
            o64 = getattr(model, fn)(x64, t)
            assert o32.dtype == torch.float32 and o64.dtype == F64
            _rows_close(o32.to(F64), o64, x64, sde, t, 1e-6, 2.0 ** -23, (p, fn))
    # a net that returns float64 for a float32 state is cast to the state dtype
    m = ScoreModel(lambda xi, ti: xi.to(F64), sde, "eps")
    assert m.eps(x32, 0.5).dtype == torch.float32
    # a Python-float time with a float64 state
    assert m.eps(x64, 0.5).dtype == F64


class _DropNet(nn.Module):
    def __init__(self, dropout: bool = True):
        super().__init__()
        self.lin = nn.Linear(3, 3).double()
        self.drop = nn.Dropout(0.1) if dropout else nn.Identity()

    def forward(self, x, t):
        return self.drop(self.lin(x))


def test_train_mode_with_dropout_warns_once():
    x = torch.randn(4, 3, dtype=F64)
    model = ScoreModel(_DropNet(), VPSDE(), "eps")
    with pytest.warns(RuntimeWarning, match="training mode"):
        model.eps(x, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.eps(x, 0.5)
        model.x0(x, 0.3)
        ScoreModel(_DropNet().eval(), VPSDE(), "eps").eps(x, 0.5)        # eval mode: silent
        ScoreModel(_DropNet(dropout=False), VPSDE(), "eps").eps(x, 0.5)  # nothing stochastic


def test_evaluate_validate_false_equals_validated():
    tgt = TARGETS["gaussian"]
    sde = VPSDE()
    model = tgt.as_model(sde, "x0")
    t = torch.tensor([0.01, 0.2, 0.7], dtype=F64)
    x = _exact_points(sde, t)
    a, b = model.evaluate(x, t), model.evaluate(x, t, validate=False)
    assert torch.equal(a.x0, b.x0) and torch.equal(a.eps, b.eps)


def test_exact_model_with_other_time_inputs():
    """as_model keeps working when the caller picks another time input for the exact net."""
    sde = VPSDE()
    tgt = TARGETS["mixture"]
    t = torch.tensor([0.01, 0.2, 0.7], dtype=F64)
    x = _exact_points(sde, t)
    ref = tgt.eps(x, t, sde)
    for p in PREDICTIONS:
        for ti in ("t", "log_snr", "sigma", "c_noise"):
            got = tgt.as_model(sde, p, time_input=ti).eps(x, t)
            assert _max_err(got, ref) <= 1e-9, (p, ti)


# --------------------------------------------------------------------------- CUDA (when present)
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_and_dtype_preserved():
    """Schedules, exact targets and every parameterisation keep the CUDA device and the
    dtype, and agree with the CPU result (float64: 1e-12; float32: conditioning-scaled)."""
    dev = torch.device("cuda")
    for name in SDE_NAMES:
        sde = make_sde(name)
        t = interior_times(sde, 8)
        for dtype, rtol in ((torch.float32, 1e-6), (F64, 1e-12)):
            tc = t.to(dev, dtype)
            for fn in (sde.alpha, sde.sigma, sde.log_snr, sde.f, sde.g2):
                out = fn(tc)
                assert out.device.type == "cuda" and out.dtype == dtype
                torch.testing.assert_close(out.cpu(), fn(t.to(dtype)), rtol=rtol, atol=0.0)
            back = sde.t_of_log_snr(sde.log_snr(tc))
            assert back.device.type == "cuda" and back.dtype == dtype
        z = sde.prior_sample((4, 3), generator=torch.Generator(device=dev).manual_seed(0), dtype=F64)
        assert z.device.type == "cuda" and sde.prior_log_prob(z).device.type == "cuda"
        for p in PREDICTIONS:
            for tgt in TARGETS.values():
                x = _exact_points(sde, t)
                m = tgt.as_model(sde, p)
                for dtype, rel, unit in ((torch.float32, 1e-5, 2.0 ** -23), (F64, 1e-12, 2.0 ** -52)):
                    out = m.eps(x.to(dev, dtype), t.to(dev))
                    assert out.device.type == "cuda" and out.dtype == dtype
                    _rows_close(out.cpu().to(F64), m.eps(x.to(dtype), t).to(F64), x, sde, t, rel, unit, (name, p))
    g = TARGETS["gaussian"]
    xs = g.sample(5, generator=torch.Generator(device=dev).manual_seed(1))
    assert xs.device.type == "cuda"
    y = g.flow(xs, 1.0, 1e-3, VPSDE())
    assert y.device.type == "cuda"
    torch.testing.assert_close(y.cpu(), g.flow(xs.cpu(), 1.0, 1e-3, VPSDE()), rtol=1e-12, atol=1e-12)
    model = ScoreModel(lambda xi, ti: xi.cpu(), VPSDE(), "eps")
    with pytest.raises(ValueError, match=r"net returned a tensor on cpu"):
        model.eps(xs, 0.5)
