"""scoresde: continuous-time score-based diffusion models.

The model side of the library: forward SDEs (:mod:`scoresde.sde`), exact analytic
targets (:mod:`scoresde.analytic`) and the :class:`ScoreModel` wrapper
(:mod:`scoresde.model`).  The numerical side lives in the sibling package ``solvers``.
"""
from .sde import (
    SDE,
    LinearSDE,
    VPSDE,
    SubVPSDE,
    VESDE,
    CosineVPSDE,
    EDMSDE,
    RectifiedFlowSDE,
    DiscreteVPSDE,
)
from .model import Prediction, ScoreModel, Denoised
from .analytic import Gaussian, GaussianMixture
from ._checks import append_dims

__version__ = "0.1.0"

__all__ = [
    "SDE", "LinearSDE", "VPSDE", "SubVPSDE", "VESDE", "CosineVPSDE", "EDMSDE",
    "RectifiedFlowSDE", "DiscreteVPSDE", "Prediction", "ScoreModel", "Denoised",
    "Gaussian", "GaussianMixture", "append_dims", "__version__",
]
