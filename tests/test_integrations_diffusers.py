"""scoresde.integrations.diffusers: a diffusers UNet + scheduler sampled by our solvers equals
diffusers' own loop.

The UNet is a tiny ``UNet2DModel`` built and seeded here (random weights, float64); nothing is
downloaded.  diffusers keeps its sigma table in float32 and DPMSolverMultistepScheduler rounds
the state to float32 inside every step, so the loops agree to ~1e-7 relative, not to float64
round-off; the tolerance is 1e-6.
"""
import sys

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,  # noqa: E402
                       ScoreSdeVeScheduler, UNet2DModel, UniPCMultistepScheduler)

import scoresde  # noqa: E402
import solvers  # noqa: E402
from scoresde.integrations import diffusers as sd_diffusers  # noqa: E402

F64 = torch.float64
TOL = 1e-6
# diffusers' schedulers call np.array on tensors (numpy 2 deprecation): theirs, not ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _unet(**kwargs):
    torch.manual_seed(0)
    config = dict(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(4, 8), layers_per_block=1,
                  down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                  norm_num_groups=2)
    config.update(kwargs)
    return UNet2DModel(**config).to(F64).eval()


@pytest.fixture(scope="module")
def unet():
    return _unet()


def _x_T(channels=2):
    return torch.randn(2, channels, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(1))


def diffusers_loop(unet, scheduler, x_T, **call_kwargs):
    """diffusers' own sampling loop (as its pipelines run it), counting network calls."""
    x, calls = x_T.clone(), 0
    with torch.no_grad():
        for k in scheduler.timesteps:
            x = scheduler.step(unet(x, k, **call_kwargs).sample, k, x).prev_sample
            calls += 1
    return x, calls


def _rel(a, b):
    return float((a - b).norm() / b.norm())


SCHEDULERS = {
    "dpmpp_2m-eps": lambda: DPMSolverMultistepScheduler(),
    "dpmpp_2m-v": lambda: DPMSolverMultistepScheduler(prediction_type="v_prediction"),
    "unipc-bh2": lambda: UniPCMultistepScheduler(solver_order=2, solver_type="bh2"),
    "ddim": lambda: DDIMScheduler(clip_sample=False),
}
# each option that changes the update, mapped (one step count each, to keep the run short)
OPTION_CASES = {
    "dpm-sigma_min": lambda: DPMSolverMultistepScheduler(final_sigmas_type="sigma_min"),
    "dpm-sigma_min-no-lower": lambda: DPMSolverMultistepScheduler(final_sigmas_type="sigma_min",
                                                                  lower_order_final=False),
    "dpm-euler_at_final": lambda: DPMSolverMultistepScheduler(final_sigmas_type="sigma_min", euler_at_final=True,
                                                              lower_order_final=False),
    "dpm-heun-trailing": lambda: DPMSolverMultistepScheduler(solver_type="heun", timestep_spacing="trailing"),
    "dpm-order1-leading": lambda: DPMSolverMultistepScheduler(solver_order=1, timestep_spacing="leading",
                                                              steps_offset=1),
    "dpm-sample-scaled_linear": lambda: DPMSolverMultistepScheduler(prediction_type="sample",
                                                                    beta_schedule="scaled_linear",
                                                                    beta_start=0.00085, beta_end=0.012),
    "unipc-bh1-order3-sigma_min": lambda: UniPCMultistepScheduler(solver_order=3, solver_type="bh1",
                                                                  final_sigmas_type="sigma_min"),
    "unipc-no-lower-sigma_min": lambda: UniPCMultistepScheduler(final_sigmas_type="sigma_min",
                                                                lower_order_final=False),
    "unipc-cosine-trailing": lambda: UniPCMultistepScheduler(beta_schedule="squaredcos_cap_v2",
                                                             timestep_spacing="trailing"),
    "ddim-trailing-alpha0": lambda: DDIMScheduler(clip_sample=False, set_alpha_to_one=False,
                                                  timestep_spacing="trailing"),
    "ddim-v-offset": lambda: DDIMScheduler(clip_sample=False, prediction_type="v_prediction", steps_offset=1),
}


def _compare(unet, make, steps):
    theirs_s, ours_s = make(), make()
    theirs_s.set_timesteps(steps)
    ours_s.set_timesteps(steps)
    x_T = _x_T()
    theirs, calls = diffusers_loop(unet, theirs_s, x_T)
    model = sd_diffusers.from_diffusers(unet, ours_s)
    sol = solvers.sample(model, x_T, **sd_diffusers.sample_options(ours_s))
    return _rel(sol.x, theirs), sol.nfe, calls


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_reproduces_diffusers_loop(unet, name, steps):
    rel, nfe, calls = _compare(unet, SCHEDULERS[name], steps)
    assert rel < TOL, f"{name}, {steps} steps: relative difference {rel:.3g}"
    assert nfe == calls == steps


@pytest.mark.parametrize("name", sorted(OPTION_CASES))
def test_reproduces_scheduler_options(unet, name):
    rel, nfe, calls = _compare(unet, OPTION_CASES[name], 8)
    assert rel < TOL, f"{name}: relative difference {rel:.3g}"
    assert nfe == calls


def test_a_wrong_mapping_is_detected(unet):
    """The comparison has teeth: flipping lower_order_final, or leaving out the final denoise,
    moves the result well beyond the tolerance."""
    sch = DPMSolverMultistepScheduler(final_sigmas_type="sigma_min")
    sch.set_timesteps(8)
    x_T = _x_T()
    theirs, _ = diffusers_loop(unet, sch, x_T)
    model = sd_diffusers.from_diffusers(unet, sch)
    opts = sd_diffusers.sample_options(sch)
    assert opts["lower_order_final"] is True
    wrong = solvers.sample(model, x_T, **{**opts, "lower_order_final": False}).x
    assert _rel(wrong, theirs) > 20 * TOL
    sch = DPMSolverMultistepScheduler()
    sch.set_timesteps(8)
    theirs, _ = diffusers_loop(unet, sch, x_T)
    opts = sd_diffusers.sample_options(sch)
    assert opts["final_denoise"] is True
    wrong = solvers.sample(model, x_T, **{**opts, "final_denoise": False}).x
    assert _rel(wrong, theirs) > 1e3 * TOL


# ------------------------------------------------------------------------ the model
@pytest.mark.parametrize("prediction_type, view", [("epsilon", "eps"), ("v_prediction", "v"), ("sample", "x0")])
def test_model_is_the_unet_at_its_training_steps(unet, prediction_type, view):
    """At t = (k+1)/N the network is called with timestep k, and its output is the named view."""
    sch = DDIMScheduler(prediction_type=prediction_type, clip_sample=False)
    model = sd_diffusers.from_diffusers(unet, sch)
    assert isinstance(model.sde, scoresde.DiscreteVPSDE) and model.sde.num_steps == 1000
    torch.testing.assert_close(model.sde.alpha(torch.tensor([1.0, 0.5], dtype=F64)) ** 2,
                               sch.alphas_cumprod[[999, 499]].to(F64), rtol=1e-15, atol=0.0)
    x = _x_T()
    with torch.no_grad():
        expected = unet(x, 499).sample
    torch.testing.assert_close(getattr(model, view)(x, 0.5), expected, rtol=1e-12, atol=1e-14)


def test_sde_reads_trained_betas():
    betas = torch.linspace(1e-3, 0.05, 50, dtype=F64)
    sde = sd_diffusers.sde_from(DDIMScheduler(trained_betas=betas.numpy(), num_train_timesteps=50))
    assert sde.num_steps == 50
    expected = torch.cumprod(1.0 - betas.to(torch.float32), 0).to(F64)  # diffusers keeps betas in float32
    torch.testing.assert_close(sde.alphas_cumprod, expected, rtol=1e-12, atol=0.0)


def test_class_labels_and_guidance():
    """call_kwargs reach the UNet; guided() feeds cond/uncond to class_labels in one doubled batch
    and combines the outputs as eps_u + w (eps_c - eps_u)."""
    unet = _unet(num_class_embeds=3)
    sch = DDIMScheduler(clip_sample=False)
    x, t, k = _x_T(), 0.6, 599
    labels = torch.tensor([0, 2])
    model = sd_diffusers.from_diffusers(unet, sch, class_labels=labels)
    with torch.no_grad():
        eps_c = unet(x, k, class_labels=labels).sample
        eps_u = unet(x, k, class_labels=torch.tensor([1, 1])).sample
    torch.testing.assert_close(model.eps(x, t), eps_c, rtol=1e-12, atol=1e-14)
    guided = sd_diffusers.from_diffusers(unet, sch).guided(labels, torch.tensor([1]), scale=3.0)
    n0 = guided.nfe
    torch.testing.assert_close(guided.eps(x, t), eps_u + 3.0 * (eps_c - eps_u), rtol=1e-10, atol=1e-12)
    assert guided.nfe == n0 + 1


# ------------------------------------------------------------------------ the grid
def test_timesteps_are_the_schedulers_own():
    sch = DPMSolverMultistepScheduler(final_sigmas_type="sigma_min", timestep_spacing="trailing")
    sch.set_timesteps(10)
    t = sd_diffusers.timesteps_from(sch)
    assert t.dtype == F64
    expected = [(k + 1) / 1000 for k in sch.timesteps.tolist()] + [1 / 1000]
    assert t.tolist() == expected and t[0] == 1.0 and t.numel() == 11
    sch = DDIMScheduler(clip_sample=False, steps_offset=1)       # leading, set_alpha_to_one: ends at the data
    sch.set_timesteps(10)
    t = sd_diffusers.timesteps_from(sch)
    assert t.tolist() == [(k + 1) / 1000 for k in range(901, 0, -100)]
    assert sd_diffusers.sample_options(sch)["final_denoise"] is True


# ------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("make, match", [
    (lambda: ScoreSdeVeScheduler(), "not a variance-preserving"),
    (lambda: DDIMScheduler(prediction_type="bogus"), "prediction_type='bogus'"),
    (lambda: DPMSolverMultistepScheduler(prediction_type="flow_prediction"), "flow matching"),
    (lambda: object(), "diffusers scheduler"),
])
def test_from_diffusers_rejects_scheduler(unet, make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        sd_diffusers.from_diffusers(unet, make())


def test_from_diffusers_rejects_unet():
    sch = DDIMScheduler()
    with pytest.raises(ValueError, match="out_channels"):
        sd_diffusers.from_diffusers(_unet(out_channels=1), sch)
    with pytest.raises(TypeError, match="takes no argument 'labels'"):
        sd_diffusers.from_diffusers(_unet(), sch, labels=torch.tensor([1]))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        sd_diffusers.from_diffusers(lambda x, t: x, sch)


def test_wrong_channels_dtype_or_device_fail_before_the_network(unet, monkeypatch):
    sch = DPMSolverMultistepScheduler()
    sch.set_timesteps(5)
    model = sd_diffusers.from_diffusers(unet, sch)

    def never(*args, **kwargs):
        raise AssertionError("the UNet was called")

    monkeypatch.setattr(unet, "forward", never)
    with pytest.raises(ValueError, match="the UNet takes 2 channels"):
        solvers.sample(model, _x_T(channels=3), **sd_diffusers.sample_options(sch))
    with pytest.raises(ValueError, match="parameters are torch.float64, x is torch.float32"):
        solvers.sample(model, _x_T().float(), **sd_diffusers.sample_options(sch))
    with pytest.raises(ValueError, match="net is on meta"):
        solvers.sample(sd_diffusers.from_diffusers(_unet().to("meta"), sch), _x_T(),
                       **sd_diffusers.sample_options(sch))


@pytest.mark.parametrize("make, match", [
    (lambda: DPMSolverMultistepScheduler(use_karras_sigmas=True), "use_karras_sigmas=True is not reproduced"),
    (lambda: DPMSolverMultistepScheduler(solver_order=3), "solver_order=3"),
    (lambda: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), "algorithm_type='sde-dpmsolver\\+\\+'"),
    (lambda: DPMSolverMultistepScheduler(thresholding=True), "thresholding"),
    (lambda: DDIMScheduler(), "clip_sample=True"),
    (lambda: DDIMScheduler(clip_sample=False, timestep_spacing="linspace"), "not reproduced"),
    (lambda: UniPCMultistepScheduler(disable_corrector=[1]), "disable_corrector"),
    (lambda: UniPCMultistepScheduler(predict_x0=False), "predict_x0=False"),
    (lambda: UniPCMultistepScheduler(solver_order=3), "solver_order=3"),
    (lambda: UniPCMultistepScheduler(lower_order_final=False), "lower_order_final=True"),
    (lambda: EulerDiscreteScheduler(), "scheduler must be one of"),
])
def test_unreproduced_options_raise(make, match):
    sch = make()
    sch.set_timesteps(10)
    with pytest.raises((ValueError, TypeError), match=match):
        sd_diffusers.sample_options(sch)


def test_grid_needs_set_timesteps():
    with pytest.raises(ValueError, match="set_timesteps"):
        sd_diffusers.timesteps_from(UniPCMultistepScheduler())


def test_clear_import_error_without_diffusers(unet, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match=r"scoresde\[diffusers\]"):
        sd_diffusers.from_diffusers(unet, object())


@pytest.mark.slow
def test_encoder_hidden_states_and_guidance():
    """A text-conditioned UNet2DConditionModel: encoder_hidden_states as a call argument, and
    guided() feeding cond/uncond embeddings to it (slow: importing the model takes ~10 s)."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=4, attention_head_dim=2, norm_num_groups=4).to(F64).eval()
    sch = DDIMScheduler(clip_sample=False)
    x = _x_T()
    emb = torch.randn(2, 3, 4, dtype=F64, generator=torch.Generator().manual_seed(5))
    empty = torch.zeros(1, 3, 4, dtype=F64)
    with torch.no_grad():
        eps_c = unet(x, 599, encoder_hidden_states=emb).sample
        eps_u = unet(x, 599, encoder_hidden_states=empty.expand(2, 3, 4)).sample
        model = sd_diffusers.from_diffusers(unet, sch, encoder_hidden_states=emb)
        torch.testing.assert_close(model.eps(x, 0.6), eps_c, rtol=1e-12, atol=1e-14)
        guided = sd_diffusers.from_diffusers(unet, sch).guided(emb, empty, scale=5.0)
        torch.testing.assert_close(guided.eps(x, 0.6), eps_u + 5.0 * (eps_c - eps_u), rtol=1e-10, atol=1e-12)
