"""The name -> SDE registry of scoresde.sde and the unchecked float64 evaluation solvers use."""
import pytest
import torch

import scoresde
from scoresde import sde as sde_mod
from scoresde.checkpoint import SDE_CLASSES as CHECKPOINT_CLASSES, sde_from_config

from conftest import SDE_NAMES, interior_times


@pytest.mark.parametrize("name", SDE_NAMES)
def test_short_and_class_names_give_one_class(name):
    cls = scoresde.sde_class(name)
    assert scoresde.sde_class(cls.__name__) is cls
    assert sde_mod.SDE_CLASSES[cls.__name__] is cls
    sde = scoresde.make_sde(name)
    assert type(sde) is cls
    # a config round-trips through the checkpoint reader, which reads the same registry
    assert sde_from_config(sde.config()).config() == sde.config()


def test_checkpoint_reads_the_sde_registry():
    assert CHECKPOINT_CLASSES is sde_mod.SDE_CLASSES
    assert set(sde_mod.SDE_SHORT_NAMES.values()) == set(sde_mod.SDE_CLASSES.values())


def test_make_sde_defaults_and_params():
    assert scoresde.make_sde("ve", sigma_max=80.0).config() == scoresde.VESDE(sigma_max=80.0).config()
    assert scoresde.make_sde("VPSDE").config() == scoresde.VPSDE(beta_min=0.1, beta_max=20.0).config()
    d = scoresde.make_sde("discrete")
    ref = scoresde.DiscreteVPSDE(betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    assert torch.equal(d.alphas_cumprod, ref.alphas_cumprod)
    with pytest.raises(TypeError):
        scoresde.make_sde("vp", sigma_max=1.0)


@pytest.mark.parametrize("bad", ["VP", "vpsde", "", None, 3])
def test_unknown_name_is_rejected_with_the_known_names(bad):
    with pytest.raises(ValueError, match=r"sde name must be one of vp, subvp, .*DiscreteVPSDE; got"):
        scoresde.sde_class(bad)


def test_unchecked_evaluation_equals_the_checked_methods(any_sde):
    t = interior_times(any_sde, 7)
    for name in ("log_alpha", "log_sigma", "log_snr", "f", "g2"):
        assert torch.equal(getattr(any_sde, f"{name}_unchecked")(t), getattr(any_sde, name)(t)), name
    log_snr = any_sde.log_snr(t)
    assert torch.equal(any_sde.t_of_log_snr_unchecked(log_snr).clamp(0.0, any_sde.T), any_sde.t_of_log_snr(log_snr))
    torch.testing.assert_close(any_sde.t_of_log_snr_unchecked(log_snr), t, rtol=1e-8, atol=1e-10)
