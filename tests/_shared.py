"""Helpers shared by several test modules (imported as ``from _shared import ...``)."""
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
