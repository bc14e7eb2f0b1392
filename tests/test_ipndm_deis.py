"""iPNDM and DEIS-tAB: fitted orders against the exact Gaussian flow, NFE, options, the
k-diffusion iPNDM reproduction and a few-step sanity check against DDIM."""
import numpy as np
import pytest
import torch

import scoresde
import solvers
from scoresde.integrations import kdiffusion as sd_kdiffusion

F64 = torch.float64
TARGET = scoresde.Gaussian(torch.tensor([1.0, -0.5], dtype=F64), torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=F64))
SDES = {"vp": scoresde.VPSDE, "edm": scoresde.EDMSDE}


def problem(sde_name, batch=8):
    sde = SDES[sde_name]()
    x_T = TARGET.marginal(sde, sde.T).sample(batch, generator=torch.Generator().manual_seed(2)).double()
    return TARGET.as_model(sde), x_T, TARGET.flow(x_T, sde.T, sde.default_t_end, sde)


def fitted_order(sde_name, method, options, ladder):
    model, x_T, exact = problem(sde_name)
    errs = []
    for n in ladder:
        sol = solvers.sample(model, x_T, method, n, schedule="log_snr", **options)
        assert sol.nfe == n
        errs.append(float((sol.x - exact).abs().max()))
    assert min(errs) > 1e-11, f"ladder reaches round-off: {errs}"
    return float(-np.polyfit(np.log(ladder), np.log(errs), 1)[0])


# (method, options, expected global order, ladder).  iPNDM's fixed equal-step weights give
# local error O(h^3) on a smoothly mapped grid, so order 2 whatever its AB order >= 2.
ORDER_CASES = [
    ("ipndm", {}, 2, (16, 32, 64, 128)),
    ("ipndm", {"order": 2}, 2, (16, 32, 64, 128)),
    ("ipndm", {"order": 1}, 1, (16, 32, 64, 128)),
    ("deis", {}, 3, (32, 64, 128, 256)),
    ("deis", {"order": 2}, 2, (32, 64, 128, 256)),
    ("deis", {"order": 1}, 1, (16, 32, 64, 128)),
]


@pytest.mark.parametrize("sde_name", sorted(SDES))
@pytest.mark.parametrize("method,options,expected,ladder", ORDER_CASES)
def test_fitted_order(sde_name, method, options, expected, ladder):
    order = fitted_order(sde_name, method, options, ladder)
    assert abs(order - expected) < 0.3, f"{method} {options} on {sde_name}: fitted order {order:.2f}"


def test_ipndm_weights_are_fixed_deis_weights_follow_the_grid():
    """The two methods differ where the grid is uneven: iPNDM-2 is not DEIS-2 (which is exact
    for eps linear in t), but order 1 of both is DDIM."""
    model, x_T, _ = problem("vp")
    ddim = solvers.sample(model, x_T, "ddim", 10, schedule="log_snr").x
    for m in ("ipndm", "deis"):
        torch.testing.assert_close(solvers.sample(model, x_T, m, 10, order=1).x, ddim, rtol=1e-12, atol=1e-12)
    a = solvers.sample(model, x_T, "ipndm", 10, order=2).x
    b = solvers.sample(model, x_T, "deis", 10, order=2).x
    assert float((a - b).abs().max()) > 1e-4


@pytest.mark.parametrize("method,top", [("ipndm", 4), ("deis", 3)])
def test_nfe_orders_and_bad_order(method, top):
    model, x_T, _ = problem("vp", batch=3)
    sol = solvers.sample(model, x_T, method, 6, lower_order_final=False)
    assert sol.nfe == 6 == solvers.get(method).expected_nfe(6)
    assert sol.stats["orders"] == [min(top, i + 1) for i in range(6)]
    for bad in (0, top + 1):
        with pytest.raises(ValueError, match=rf"order must be in 1\.\.{top}"):
            solvers.get(method, order=bad)
    with pytest.raises(TypeError, match="order must be an int"):
        solvers.get(method, order=2.0)


AB_WEIGHTS = ([1.0], [1.5, -0.5], [23 / 12, -16 / 12, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -9 / 24])


def reference_ipndm(D, x, sigmas, max_order=4):
    """iPNDM written from its definition (Zhang & Chen 2023): fixed-weight Adams-Bashforth on
    dx/dsigma = (x - D(x, sigma))/sigma with warm-up orders 1, 2, ...; a last step to sigma = 0
    returns D.  Used where the installed k-diffusion has no ``sample_ipndm``."""
    slopes = []                                   # newest first
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x0 = D(x, s * x.new_ones(x.shape[0]))
        slopes.insert(0, (x - x0) / s)
        if s_next == 0:
            return x0
        w = AB_WEIGHTS[min(max_order, len(slopes)) - 1]
        x = x + (s_next - s) * sum(c * d for c, d in zip(w, slopes))
        del slopes[max_order - 1:]                # keep the max_order - 1 newest for the next step
    return x


def _kdiffusion_ipndm():
    try:
        return getattr(sd_kdiffusion.load_sampling(), "sample_ipndm", None)
    except ImportError:
        return None


@pytest.mark.parametrize("max_order", [1, 2, 3, 4])
def test_equals_kdiffusion_ipndm(max_order):
    """Exact EDM denoiser, the same Karras sigmas ending at 0 (our final_denoise): equal to
    1e-10 in float64 with the same number of denoiser calls."""
    sde, calls = scoresde.EDMSDE(), [0, 0]
    exact = TARGET.as_model(sde, "x0")

    def denoiser(which):
        def D(x, sigma):
            calls[which] += 1
            return exact.x0(x, sigma)
        return D

    t = solvers.make_grid(sde, 12, "karras").t
    x_T = sde.T * torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    ref = _kdiffusion_ipndm() or reference_ipndm
    theirs = ref(denoiser(0), x_T.clone(), torch.cat([t, t.new_zeros(1)]), max_order=max_order)
    model = sd_kdiffusion.from_denoiser(denoiser(1), sde.sigma_min, sde.sigma_max)
    sol = solvers.sample(model, x_T, "ipndm", timesteps=t, final_denoise=True, order=max_order,
                         lower_order_final=False)
    rel = float((sol.x - theirs).abs().max() / theirs.abs().max())
    assert rel < 1e-10, f"max relative difference {rel:.3g}"
    assert sol.nfe == calls[0] == calls[1] == 13


@pytest.mark.parametrize("schedule", solvers.SCHEDULES)
def test_few_steps_finite_and_no_worse_than_ddim(schedule):
    model, x_T, exact = problem("vp", batch=64)
    for n in range(3, 11):
        err = {m: float((solvers.sample(model, x_T, m, n, schedule=schedule).x - exact).norm(dim=1).mean())
               for m in ("ddim", "ipndm", "deis")}
        assert all(np.isfinite(v) for v in err.values()), err
        assert err["ipndm"] <= err["ddim"] and err["deis"] <= err["ddim"], (n, err)
