"""Shared test configuration.

Hypothesis profiles (for the property tests listed in docs/reliability.md): ``ci`` is
derandomized so that CI cannot flake, ``dev`` draws fresh random examples; choose with
``HYPOTHESIS_PROFILE=dev``.

The torch default dtype is left alone: tests pass ``dtype=torch.float64`` explicitly.
Torch runs with one intra-op thread unless ``OMP_NUM_THREADS`` is set (see below).
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

import scoresde

settings.register_profile("ci", deadline=None, derandomize=True, max_examples=30)
settings.register_profile("dev", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The tests use tiny tensors, for which intra-op threads only add OpenMP hand-off cost
# (measured on a loaded 2-core machine: a 3x3 Cholesky took 12 ms with 2 threads and
# 25 us with 1).  An explicit OMP_NUM_THREADS is respected.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


#: Every built-in SDE with its default parameters, by short name.
SDE_NAMES = ("vp", "subvp", "ve", "cosine", "edm", "rf", "discrete")


def make_sde(name: str) -> scoresde.LinearSDE:
    """A fresh built-in SDE with its default parameters (:func:`scoresde.make_sde`)."""
    if name not in SDE_NAMES:
        raise KeyError(name)
    return scoresde.make_sde(name)


@pytest.fixture(scope="session", params=SDE_NAMES)
def any_sde(request) -> scoresde.LinearSDE:
    """Each built-in SDE in turn (session scope: SDE objects are immutable)."""
    return make_sde(request.param)


def interior_times(sde: scoresde.LinearSDE, n: int, dtype=torch.float64) -> torch.Tensor:
    """``n`` times spread over ``[t_end, T]`` (uniform in log t near 0, uniform in t above),
    avoiding the knots of a DiscreteVPSDE (piecewise-linear log alpha)."""
    te, T = sde.default_t_end, sde.T
    a = torch.logspace(torch.log10(torch.tensor(te)), torch.log10(torch.tensor(0.1 * T)), n // 2,
                       dtype=torch.float64)
    b = torch.linspace(0.1 * T, T, n - n // 2, dtype=torch.float64)
    t = torch.cat([a, b]).clamp(te, T)
    if isinstance(sde, scoresde.DiscreteVPSDE):
        N = sde.num_steps
        k = torch.floor(t * N).clamp(0, N - 1)
        t = (k + 0.37) / N                      # strictly inside segment k
    return t.to(dtype)


@pytest.fixture(scope="module")
def kd():
    """k_diffusion.sampling (k-diffusion installed with --no-deps: its package __init__ is not
    run); the test is skipped where k-diffusion is not installed."""
    from scoresde.integrations import kdiffusion as sd_kdiffusion
    try:
        return sd_kdiffusion.load_sampling()
    except ImportError as err:
        pytest.skip(str(err))
