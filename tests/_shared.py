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
