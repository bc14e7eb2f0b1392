"""A user's own (non-linear-class) SDE: ScoreModel with prediction='score', pf_ode and the
SDE samplers that only need drift and diffusion; exponential integrators refuse it."""
import pytest
import torch

import scoresde
import solvers
from _shared import OU


def _setup():
    b = 4.0
    twin = scoresde.VPSDE(beta_min=b, beta_max=b)          # the same process as a LinearSDE
    target = scoresde.Gaussian(torch.tensor([1.0, -0.5], dtype=torch.float64),
                               torch.tensor([[0.6, 0.2], [0.2, 0.3]], dtype=torch.float64))
    sde = OU(b)
    net = lambda x, t: target.score(x, t.to(torch.float64), twin).to(x.dtype)  # noqa: E731
    model = scoresde.ScoreModel(net, sde, prediction="score")
    x_T = target.marginal(twin, 1.0).sample(64, torch.Generator().manual_seed(0))
    return target, twin, model, x_T


def test_general_sde_needs_score_prediction():
    with pytest.raises(TypeError, match="prediction"):
        scoresde.ScoreModel(lambda x, t: x, OU(), prediction="eps")
    model = scoresde.ScoreModel(lambda x, t: x, OU(), prediction="score")
    with pytest.raises(TypeError, match="LinearSDE"):
        model.eps(torch.zeros(2, 2), 0.5)


def test_pf_ode_on_general_sde_matches_exact_flow():
    target, twin, model, x_T = _setup()
    sol = solvers.sample(model, x_T, "pf_ode", rtol=1e-9, atol=1e-9)
    exact = target.flow(x_T, 1.0, 1e-3, twin)
    assert sol.nfe > 0
    torch.testing.assert_close(sol.x, exact, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["dpmpp_2m", "dpm_solver_2", "ddim", "unipc"])
def test_exponential_methods_refuse_general_sde(method):
    _, _, model, x_T = _setup()
    with pytest.raises(TypeError, match="LinearSDE"):
        solvers.sample(model, x_T, method, 5)
    assert model.nfe == 0
