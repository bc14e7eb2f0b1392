"""UniPC (solvers/unipc.py): convergence order against the exact Gaussian flow, equivalences
with DDIM / DPM-Solver-1 / DPM-Solver++(2M) and the exponential Adams weights, exactness for
point-mass data, NFE accounting and option checks.

Everything runs in float64.  The exact answer is ``Gaussian.flow``; the order is the slope
of log(max error) against log(steps) fitted over the asymptotic range.
"""
from __future__ import annotations

import math

import pytest
import torch

import scoresde
import solvers
from solvers.exponential import lagrange_weights
from solvers.unipc import UniPC, unipc_rhos
from conftest import make_sde

F64 = torch.float64


def _target(cov_scale: float = 1.0) -> scoresde.Gaussian:
    """d = 4, mean != 0, covariance eigenvalues spread over two decades (0.02 .. 2)."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=F64))
    ev = torch.tensor([0.02, 0.1, 0.5, 2.0], dtype=F64) * cov_scale
    return scoresde.Gaussian(torch.tensor([1.0, -0.5, 0.3, 2.0], dtype=F64), (Q * ev) @ Q.T)


def _problem(sde_name: str, t_start: float | None = None, n: int = 8):
    """(model, x at t_start drawn from the exact marginal, exact flow to t_end, t_start)."""
    sde = make_sde(sde_name)
    tgt = _target()
    ts = sde.T if t_start is None else t_start
    x = tgt.marginal(sde, ts).sample(n, generator=torch.Generator().manual_seed(1))
    return tgt.as_model(sde), x, tgt.flow(x, ts, sde.default_t_end, sde), ts


def _fit_order(model, x, exact, ts, steps_list, **opts) -> tuple[float, list[float]]:
    errs = []
    for n in steps_list:
        sol = solvers.sample(model, x, "unipc", n, schedule="log_snr", t_start=ts, **opts)
        errs.append(float((sol.x - exact).abs().max()))
    lx = torch.log(torch.tensor(steps_list, dtype=F64))
    ly = torch.log(torch.tensor(errs, dtype=F64))
    slope = float(((lx - lx.mean()) * (ly - ly.mean())).sum() / ((lx - lx.mean()) ** 2).sum())
    return -slope, errs


# ------------------------------------------------------------------ convergence order
CONFIGS = [dict(order=p, use_corrector=c, variant=v) for p in (1, 2, 3) for c in (True, False)
           for v in ("bh1", "bh2")]


def _id(o: dict) -> str:
    return f"p{o['order']}-{'pc' if o['use_corrector'] else 'p'}-{o['variant']}"


def test_expected_order_declared():
    assert [UniPC(order=p).expected_order for p in (1, 2, 3)] == [2, 3, 3]
    assert [UniPC(order=p, use_corrector=False).expected_order for p in (1, 2, 3)] == [1, 2, 2]
    assert UniPC(order=3, lower_order_final=True).expected_order == 2


# Started at an interior time (alpha and sigma both O(1)) every error term is generic, so the
# fit shows the asymptotic order, warm-up included: the corrected first-order start (local
# O(h^3)) caps UniPC-3 at 3, and the uncorrected one (local O(h^2)) caps UniP-3 at 2.
INTERIOR = {"vp": 0.3, "ve": 0.5}


@pytest.mark.parametrize("opts", CONFIGS, ids=_id)
@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_order_interior_start(sde_name, opts):
    model, x, exact, ts = _problem(sde_name, INTERIOR[sde_name])
    order, errs = _fit_order(model, x, exact, ts, [32, 64, 128, 256], **opts)
    expected = UniPC(**opts).expected_order
    assert abs(order - expected) < 0.3, (order, expected, errs)


# From T (x_T drawn from the exact marginal at T).  For p = 1, 2 the fit
# is the declared order at once.
@pytest.mark.parametrize("opts", [o for o in CONFIGS if o["order"] < 3], ids=_id)
@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_order_from_T(sde_name, opts):
    model, x, exact, ts = _problem(sde_name)
    order, errs = _fit_order(model, x, exact, ts, [32, 64, 128, 256], **opts)
    expected = UniPC(**opts).expected_order
    assert abs(order - expected) < 0.3, (order, expected, errs)


# From T with p = 3 the warm-up's error is scaled by the derivatives of x0 near T, which are
# O(e^lambda_T) = O(alpha_T / sigma_T) (0.007 for VP, 0.02 for VE): the cap stays below the
# float64 floor over every step count we can resolve, and the fit shows the order p + 1 = 4
# of the corrected steps (measured 3.9-4.2).  We assert it is at least the declared order
# and at most p + 1 (no wrong-signed surprise either way).
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_order3_from_T(sde_name, variant):
    model, x, exact, ts = _problem(sde_name)
    opts = dict(order=3, variant=variant)
    order, errs = _fit_order(model, x, exact, ts, [128, 256, 512, 1024], **opts)
    expected = UniPC(**opts).expected_order
    assert expected - 0.3 < order < 3 + 1 + 0.3, (order, errs)


@pytest.mark.slow
@pytest.mark.parametrize("opts", CONFIGS, ids=_id)
@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_order_interior_start_long(sde_name, opts):
    model, x, exact, ts = _problem(sde_name, INTERIOR[sde_name])
    order, errs = _fit_order(model, x, exact, ts, [256, 512, 1024, 2048], **opts)
    assert abs(order - UniPC(**opts).expected_order) < 0.15, (order, errs)


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_corrector_improves_at_equal_nfe(variant):
    model, x, exact, ts = _problem("vp")
    for p in (1, 2, 3):
        err = {c: float((solvers.sample(model, x, "unipc", 20, schedule="log_snr", order=p, variant=variant,
                                        use_corrector=c).x - exact).abs().max()) for c in (True, False)}
        assert err[True] < err[False], (p, err)


# ------------------------------------------------------------------ equivalences of methods
def _start(sde, n=6, seed=3):
    return _target().marginal(sde, sde.T).sample(n, generator=torch.Generator().manual_seed(seed))


def _close(a, b, rel=1e-12):
    scale = max(1.0, float(b.abs().max()))
    torch.testing.assert_close(a, b, rtol=0.0, atol=rel * scale)


@pytest.mark.parametrize("schedule", ["log_snr", "uniform"])
def test_order1_predictor_equals_ddim_and_dpm_solver_1(any_sde, schedule):
    model = _target().as_model(any_sde)
    x = _start(any_sde)
    for variant in ("bh1", "bh2"):
        u = solvers.sample(model, x, "unipc", 7, schedule=schedule, order=1, use_corrector=False, variant=variant).x
        _close(u, solvers.sample(model, x, "ddim", 7, schedule=schedule, eta=0.0).x)
        _close(u, solvers.sample(model, x, "dpm_solver_1", 7, schedule=schedule).x)


def test_order2_bh2_predictor_equals_dpmpp_2m(any_sde):
    # UniP-2 with B(h) = e^{-h} - 1 and rho = 1/2 is DPM-Solver++(2M) (midpoint form)
    model = _target().as_model(any_sde)
    x = _start(any_sde)
    u = solvers.sample(model, x, "unipc", 9, schedule="log_snr", order=2, variant="bh2", use_corrector=False).x
    _close(u, solvers.sample(model, x, "dpmpp_2m", 9, schedule="log_snr", solver_type="midpoint").x)


def test_single_step_is_ddim():
    # one step: first order, and the corrector never runs after the last step
    sde = make_sde("vp")
    model, x = _target().as_model(sde), _start(sde)
    ref = solvers.sample(model, x, "ddim", 1, schedule="log_snr").x
    for p in (1, 2, 3):
        _close(solvers.sample(model, x, "unipc", 1, schedule="log_snr", order=p).x, ref)


def _random_nodes(g, k, h):
    """Offsets 0 > u_1 > u_2 of earlier nodes (uneven steps)."""
    gaps = h * (0.5 + torch.rand(k - 1, generator=g, dtype=F64))
    return [0.0] + (-torch.cumsum(gaps, 0)).tolist()


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("h", [0.05, 0.7, 3.0])
def test_weights_are_exponential_adams(variant, h):
    """Solved systems: UniP-3 is the exponential Adams-Bashforth weight set (= dpmpp_3m's),
    and UniP-k + UniC-k (k = 2, 3) integrates the interpolant through the new point too
    (exponential Adams-Moulton); B(h) cancels, so bh1 == bh2 there."""
    g = torch.Generator().manual_seed(int(h * 100))
    s = UniPC(order=3, variant=variant)
    nodes = _random_nodes(g, 3, h)
    torch.testing.assert_close(torch.tensor(s.weights(3, nodes, h)),
                               torch.tensor(lagrange_weights(nodes, h)), rtol=1e-10, atol=1e-13)
    for k in (2, 3):
        nodes = _random_nodes(g, k, h)
        pred = torch.tensor([0.0] + s.weights(k, nodes, h), dtype=F64)
        full = pred + torch.tensor(s.corrector_weights(k, nodes, h), dtype=F64)
        torch.testing.assert_close(full, torch.tensor(lagrange_weights([h] + nodes, h), dtype=F64),
                                   rtol=1e-10, atol=1e-13)


def test_rho_limits_and_variants():
    for h in (1e-3, 0.1, 1.0):
        rks = [-1.0, -2.0]
        for corrector in (False, True):
            B1, r1 = unipc_rhos(rks, h, "bh1", corrector)
            B2, r2 = unipc_rhos(rks, h, "bh2", corrector)
            assert B1 == -h and B2 == math.expm1(-h)
            torch.testing.assert_close(B1 * torch.tensor(r1, dtype=F64), B2 * torch.tensor(r2, dtype=F64), rtol=1e-10, atol=0.0)
    # the 1x1 systems are fixed at 1/2 (the reference code's choice), where the variants differ
    assert unipc_rhos([], 0.3, "bh1", True)[1] == [0.5] == unipc_rhos([-1.0], 0.3, "bh2", False)[1]
    assert unipc_rhos([], 0.3, "bh1", False)[1] == []
    _, rc = unipc_rhos([-1.0], 1e-6, "bh1", True)
    # solved rho_c at h -> 0: nodes (-1, 1), b = (1/2, 1/3) -> rho = (1/12, 5/12)
    torch.testing.assert_close(torch.tensor(rc, dtype=F64), torch.tensor([1 / 12, 5 / 12], dtype=F64),
                               rtol=0.0, atol=1e-5)


# ------------------------------------------------------------------ point mass
@pytest.mark.parametrize("steps", [1, 2, 3, 6])
def test_exact_for_point_mass(any_sde, steps):
    """cov = 0: x0_hat == mu everywhere and the flow is x_t = alpha_t mu + sigma_t z with
    z = (x_T - alpha_T mu) / sigma_T; every UniPC step integrates a constant exactly."""
    mu = torch.tensor([1.0, -0.5, 0.3, 2.0], dtype=F64)
    tgt = scoresde.Gaussian(mu, 0.0)
    sde = any_sde
    T, te = sde.T, sde.default_t_end
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(7), dtype=F64)
    aT, sT = float(sde.alpha(torch.tensor(T, dtype=F64))), float(sde.sigma(torch.tensor(T, dtype=F64)))
    ae, se = float(sde.alpha(torch.tensor(te, dtype=F64))), float(sde.sigma(torch.tensor(te, dtype=F64)))
    x_T = aT * mu + sT * z
    want = ae * mu + se * z
    model = tgt.as_model(sde)
    for p in (1, 2, 3):
        for variant in ("bh1", "bh2"):
            for c in (True, False):
                got = solvers.sample(model, x_T, "unipc", steps, schedule="log_snr", order=p, variant=variant,
                                     use_corrector=c).x
                _close(got, want, rel=1e-11)


# ------------------------------------------------------------------ accounting
class _CountingNet:
    def __init__(self, net):
        self.net, self.calls = net, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.net(x, t)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 10])
@pytest.mark.parametrize("opts", [dict(order=p, use_corrector=c, lower_order_final=f)
                                  for p in (1, 2, 3) for c in (True, False) for f in (False, True)],
                         ids=lambda o: f"p{o['order']}-c{int(o['use_corrector'])}-lof{int(o['lower_order_final'])}")
def test_nfe_equals_steps(steps, opts):
    sde = make_sde("vp")
    net = _CountingNet(_target().as_model(sde).net)
    model = scoresde.ScoreModel(net, sde, "eps")
    x = _start(sde)
    sol = solvers.sample(model, x, "unipc", steps, **opts)
    assert sol.nfe == steps == net.calls == UniPC(**opts).expected_nfe(steps)
    assert sol.stats["orders"] == UniPC(**opts).orders_for(steps)


def test_orders_and_lower_order_final():
    assert UniPC(order=3, lower_order_final=False).orders_for(5) == [1, 2, 3, 3, 3]
    assert UniPC(order=3).orders_for(5) == [1, 2, 3, 2, 1]              # default: few-step rule
    assert UniPC(order=3, lower_order_final=True).orders_for(5) == [1, 2, 3, 2, 1]
    assert UniPC(order=2).orders_for(1) == [1]


def test_instance_stateless_input_untouched_and_float32():
    sde = make_sde("ve")
    model, x = _target().as_model(sde), _start(sde)
    x_copy = x.clone()
    solver = UniPC(order=3, variant="bh2")
    a = solvers.sample(model, x, solver, 12).x
    b = solvers.sample(model, x, solver, 12).x
    assert torch.equal(a, b) and torch.equal(x, x_copy)
    c = solvers.sample(model, x, "unipc", 12, order=3, variant="bh2").x
    assert torch.equal(a, c)
    x32 = x.to(torch.float32)
    s32 = solvers.sample(model, x32, solver, 12)
    assert s32.x.dtype == torch.float32 and bool(torch.isfinite(s32.x).all())
    torch.testing.assert_close(s32.x.double(), a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))


def test_registered_and_exported():
    assert "unipc" in solvers.available_methods()
    assert solvers.UniPC is UniPC and UniPC.name == "unipc"


# ------------------------------------------------------------------ bad options
@pytest.mark.parametrize("bad, exc, words", [
    (dict(order=4), ValueError, ("order", "1, 2, 3")),
    (dict(order=0), ValueError, ("order", "1, 2, 3")),
    (dict(order=2.0), TypeError, ("order",)),
    (dict(order=True), TypeError, ("order",)),
    (dict(order="3"), TypeError, ("order",)),
    (dict(variant="bh3"), ValueError, ("variant", "bh1", "bh2")),
    (dict(variant="BH1"), ValueError, ("variant",)),
    (dict(variant="midpoint"), ValueError, ("variant",)),
    (dict(use_corrector="yes"), TypeError, ("use_corrector",)),
    (dict(lower_order_final=1), TypeError, ("lower_order_final",)),
    (dict(foo=1), TypeError, ("foo", "order", "variant", "use_corrector")),
])
def test_bad_options(bad, exc, words):
    sde = make_sde("vp")
    model, x = _target().as_model(sde), _start(sde)
    with pytest.raises(exc) as info:
        solvers.sample(model, x, "unipc", 5, **bad)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert model.nfe == 0
    if "foo" not in bad:
        with pytest.raises(exc):
            UniPC(**bad)
