"""CUDA checks (marked ``cuda``; skipped without a GPU): the fixed-step loop never
synchronises with the host, and results match the CPU."""
import pytest
import torch

import scoresde
import solvers
from solvers.base import CheckedModel

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DETERMINISTIC = ["euler", "heun", "ddim", "dpm_solver_1", "dpm_solver_2", "dpm_solver_3", "dpmpp_2s",
                 "dpmpp_2m", "dpmpp_3m", "unipc"]


class MLP(torch.nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(d + 1, 64), torch.nn.SiLU(), torch.nn.Linear(64, d))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None]], 1))


@pytest.mark.parametrize("method", DETERMINISTIC)
def test_step_loop_has_no_host_sync(method):
    dev = torch.device("cuda")
    model = scoresde.ScoreModel(MLP().to(dev).eval(), scoresde.VPSDE(), "eps")
    x = torch.randn(16, 8, device=dev)
    solver = solvers.get(method)
    grid = solvers.base.build_grid(solver, model.sde, 8, None, None, None, None, 7.0)
    table = solver.prepare(model.sde, grid, x)
    state = solver.init(x)
    ev = CheckedModel(model, grid.steps, check_finite=True)
    with torch.no_grad():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for i in range(grid.steps):
                ev.step_index = i
                x, state = solver.step(ev, i, x, state, table, None)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    ev.check_deferred()
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("method", DETERMINISTIC)
def test_cuda_matches_cpu(method):
    target = scoresde.Gaussian(torch.tensor([1.0, -0.5], dtype=torch.float64), torch.tensor([0.5, 2.0]))
    sde = scoresde.VPSDE()
    x = target.marginal(sde, sde.T).sample(32, torch.Generator().manual_seed(0))
    cpu = solvers.sample(target.as_model(sde), x, method, 6).x
    gpu = solvers.sample(target.as_model(sde), x.cuda(), method, 6).x
    assert gpu.device.type == "cuda" and gpu.dtype == x.dtype
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-10, atol=1e-10)


def test_cpu_generator_reproducible_on_cuda():
    target = scoresde.Gaussian(torch.zeros(2, dtype=torch.float64), 1.0)
    sde = scoresde.VPSDE()
    x = target.marginal(sde, sde.T).sample(8, torch.Generator().manual_seed(0))
    a = solvers.sample(target.as_model(sde), x, "euler_maruyama", 10, generator=torch.Generator().manual_seed(5)).x
    b = solvers.sample(target.as_model(sde), x.cuda(), "euler_maruyama", 10,
                       generator=torch.Generator().manual_seed(5)).x
    torch.testing.assert_close(b.cpu(), a, rtol=1e-9, atol=1e-9)


def test_cuda_generator_with_cpu_x_is_refused():
    target = scoresde.Gaussian(torch.zeros(2, dtype=torch.float64), 1.0)
    sde = scoresde.VPSDE()
    x = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="generator"):
        solvers.sample(target.as_model(sde), x, "euler_maruyama", 4,
                       generator=torch.Generator(device="cuda").manual_seed(0))


def test_calibrate_timesteps_on_cuda():
    """The calibration runs with the model and samples on the GPU (costs gathered on the CPU),
    returns a CPU float64 grid with exact end points, and its refinement only improves."""
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = scoresde.ScoreModel(MLP().double().to(dev).eval(), scoresde.VPSDE(), "eps")
    x = torch.randn(32, 8, dtype=torch.float64, device=dev)
    for method in (None, "unipc"):
        cal = solvers.calibrate_timesteps(model, x, 6, t_end=1e-2, fine_steps=40, method=method, max_trials=20)
        t = cal.timesteps
        assert t.device.type == "cpu" and t.dtype == torch.float64 and t.numel() == 7
        assert float(t[0]) == model.sde.T and float(t[-1]) == 1e-2 and bool((t[1:] < t[:-1]).all())
        if method is not None:
            assert cal.calibration_error <= cal.start_error
