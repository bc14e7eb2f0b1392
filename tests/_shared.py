"""Helpers shared by several test modules (imported as ``from _shared import ...``)."""
import functools
import math

import torch

import scoresde


class OU(scoresde.SDE):
    """dx = -b/2 x dt + sqrt(b) dW: the constant-rate VP process written as a user's plain SDE
    (not a LinearSDE), whose exact twin is ``VPSDE(beta_min=b, beta_max=b)``."""

    T = 1.0
    default_t_end = 1e-3

    def __init__(self, b=4.0):
        self.b = b

    def drift(self, x, t):
        return -0.5 * self.b * x

    def diffusion(self, t):
        return torch.full_like(torch.as_tensor(t, dtype=torch.float64), self.b ** 0.5)


@functools.lru_cache(maxsize=None)
def two_mode_mixture() -> scoresde.GaussianMixture:
    """d=2, two well separated anisotropic components (axis ratios 30 and 7.5, rotated)."""
    def rot(th, a, b):
        c, s = math.cos(th), math.sin(th)
        r = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
        return r @ torch.diag(torch.tensor([a, b], dtype=torch.float64)) @ r.T

    return scoresde.GaussianMixture(torch.tensor([0.35, 0.65], dtype=torch.float64),
                                    torch.tensor([[-2.0, 1.0], [1.5, -0.5]], dtype=torch.float64),
                                    torch.stack([rot(0.4, 0.3, 0.01), rot(-1.0, 0.15, 0.02)]))


def counting_zero_model(sde=None) -> tuple[scoresde.ScoreModel, list]:
    """An eps model that returns zeros and appends to ``calls`` on every network call (for
    "bad input is refused before any network call" tests)."""
    calls: list = []

    def net(x, t):
        calls.append(1)
        return torch.zeros_like(x)

    return scoresde.ScoreModel(net, sde or scoresde.VPSDE(), "eps"), calls


def calibration_mixture() -> scoresde.GaussianMixture:
    """The calibration tests' d=8 three-component diagonal mixture (seed 0)."""
    g = torch.Generator().manual_seed(0)
    means = 2.0 * torch.randn(3, 8, generator=g, dtype=torch.float64)
    var = torch.exp(torch.empty(3, 8, dtype=torch.float64).uniform_(-3.0, 0.0, generator=g))
    return scoresde.GaussianMixture(torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64), means, var)
