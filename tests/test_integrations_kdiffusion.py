"""scoresde.integrations.kdiffusion: our samplers on a k-diffusion denoiser equal k-diffusion's own.

The denoiser is exact (a two-component Gaussian mixture's E[x0 | x_sigma], nonlinear in x), so
every difference is a difference of the two samplers' arithmetic: float64 round-off only.
"""
import sys

import pytest
import torch

import scoresde
import solvers
from scoresde.integrations import kdiffusion as sd_kdiffusion
from _shared import two_mode_mixture

F64 = torch.float64
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


class CountingDenoiser:
    """D(x, sigma) = E[x0 | x] of the mixture under x = x0 + sigma eps, counting its calls."""

    def __init__(self):
        self.target, self.sde, self.calls = two_mode_mixture(), scoresde.EDMSDE(SIGMA_MIN, SIGMA_MAX), 0

    def __call__(self, x, sigma):
        self.calls += 1
        return self.target.x0(x, sigma, self.sde)


def _sigmas(steps):
    """A Karras grid (float64) of ``steps`` intervals from sigma_max to sigma_min."""
    return solvers.make_grid(scoresde.EDMSDE(SIGMA_MIN, SIGMA_MAX), steps, "karras").t


def _x_T(batch=64):
    return SIGMA_MAX * torch.randn(batch, 2, dtype=F64, generator=torch.Generator().manual_seed(3))


KD_RUNS = {  # our method and options for each k-diffusion sampler
    "sample_euler": ("euler", {}),
    "sample_heun": ("heun", {"last_step_euler": False}),
    "sample_dpmpp_2m": ("dpmpp_2m", {"lower_order_final": False}),
}


@pytest.mark.parametrize("end", ["zero", "sigma_min"])
@pytest.mark.parametrize("kd_name", sorted(KD_RUNS))
def test_equals_kdiffusion_sampler(kd, kd_name, end):
    """Same sigmas, same map: equal to 1e-8 relative with the same number of denoiser calls.
    k-diffusion's last step to sigma = 0 returns D(x, sigma_{N-1}): our final_denoise."""
    method, options = KD_RUNS[kd_name]
    t = _sigmas(12)
    sigmas = torch.cat([t, t.new_zeros(1)]) if end == "zero" else t
    x_T = _x_T()
    theirs_d, ours_d = CountingDenoiser(), CountingDenoiser()
    theirs = getattr(kd, kd_name)(theirs_d, x_T.clone(), sigmas, disable=True)
    model = sd_kdiffusion.from_denoiser(ours_d, SIGMA_MIN, SIGMA_MAX)
    sol = solvers.sample(model, x_T, method, timesteps=t, final_denoise=(end == "zero"), **options)
    rel = float((sol.x - theirs).abs().max() / theirs.abs().max())
    assert rel < 1e-8, f"{kd_name} ({end}): max relative difference {rel:.3g}"
    assert sol.nfe == ours_d.calls == theirs_d.calls


def test_differs_without_final_denoise(kd):
    """The check has teeth: forgetting the final denoise (k-diffusion's step to sigma = 0)
    leaves a difference of the order of sigma_min, far above the tolerance."""
    t = _sigmas(12)
    x_T = _x_T()
    theirs = kd.sample_dpmpp_2m(CountingDenoiser(), x_T.clone(), torch.cat([t, t.new_zeros(1)]), disable=True)
    sol = solvers.sample(sd_kdiffusion.from_denoiser(CountingDenoiser(), SIGMA_MIN, SIGMA_MAX), x_T, "dpmpp_2m",
                         timesteps=t)
    assert float((sol.x - theirs).abs().max() / theirs.abs().max()) > 1e-5


def test_sigma_data_applies_edm_preconditioning():
    """With sigma_data the callable is k-diffusion's inner network F(c_in x, sigma), and
    x0 = c_skip x + c_out F (k_diffusion.layers.Denoiser.get_scalings, written out here)."""
    sigma_data = 0.7
    weight = torch.tensor([[0.3, -1.2], [0.8, 0.5]], dtype=F64)
    seen = []

    def inner(x_in, sigma):
        seen.append(sigma.clone())
        return torch.tanh(x_in @ weight) * (1.0 + sigma[:, None])

    model = sd_kdiffusion.from_denoiser(inner, SIGMA_MIN, SIGMA_MAX, sigma_data=sigma_data)
    x = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(0)) * 3.0
    sigma = torch.tensor([0.01, 0.3, 1.0, 7.0, 80.0], dtype=F64)
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2) ** 0.5
    c_in = 1.0 / (sigma ** 2 + sigma_data ** 2) ** 0.5
    expected = c_skip[:, None] * x + c_out[:, None] * inner(c_in[:, None] * x, sigma)
    torch.testing.assert_close(model.x0(x, sigma), expected, rtol=1e-13, atol=0.0)
    torch.testing.assert_close(seen[0], sigma, rtol=0.0, atol=0.0)   # the network sees sigma itself


def test_time_is_sigma():
    """The plain denoiser receives sigma (= t of EDMSDE) unchanged, in x's dtype, shape [B]."""
    seen = []

    def denoiser(x, sigma):
        seen.append(sigma)
        return x / (1.0 + sigma[:, None] ** 2)

    model = sd_kdiffusion.from_denoiser(denoiser, SIGMA_MIN, SIGMA_MAX)
    assert isinstance(model.sde, scoresde.EDMSDE) and model.sde.T == SIGMA_MAX
    x = torch.ones(3, 2, dtype=torch.float32)
    torch.testing.assert_close(model.x0(x, 2.5), x / 7.25)
    assert seen[0].dtype == torch.float32 and seen[0].tolist() == [2.5, 2.5, 2.5]


@pytest.mark.parametrize("args, err, match", [
    (("not callable", SIGMA_MIN, SIGMA_MAX), TypeError, "denoiser must be callable"),
    ((lambda x, s: x, 1.0, 0.5), ValueError, "sigma_min must be < sigma_max"),
    ((lambda x, s: x, -1.0, 80.0), ValueError, "sigma_min"),
    ((lambda x, s: x, SIGMA_MIN, SIGMA_MAX, 0.0), ValueError, "sigma_data"),
])
def test_bad_input(args, err, match):
    with pytest.raises(err, match=match):
        sd_kdiffusion.from_denoiser(*args)


def test_load_sampling_is_cached_and_private(kd):
    assert sd_kdiffusion.load_sampling() is kd
    assert callable(kd.sample_heun) and callable(kd.get_sigmas_karras)
    assert "k_diffusion" not in sys.modules or sys.modules["k_diffusion"] is not kd
