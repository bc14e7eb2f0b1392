"""scoresde: continuous-time score-based diffusion models.

The model side of the library: forward SDEs (:mod:`scoresde.sde`), exact analytic
targets (:mod:`scoresde.analytic`) and the :class:`ScoreModel` wrapper
(:mod:`scoresde.model`); training losses (:mod:`scoresde.losses`), reference networks
(:mod:`scoresde.nets`), data (:mod:`scoresde.data`) and checkpoints (:mod:`scoresde.checkpoint`).
The numerical side lives in the sibling package ``solvers``; the command line
(:mod:`scoresde.cli`) sits on top of both.
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
    make_sde,
    sde_class,
)
from .model import Prediction, ScoreModel, Denoised
from .analytic import Gaussian, GaussianMixture
from ._checks import append_dims
from .losses import DSMLoss, dsm_loss
from .nets import MLPScoreNet, UNet, FixedBatch
from .checkpoint import save_checkpoint, load_checkpoint
from . import data

__version__ = "0.1.0"

__all__ = [
    "SDE", "LinearSDE", "VPSDE", "SubVPSDE", "VESDE", "CosineVPSDE", "EDMSDE",
    "RectifiedFlowSDE", "DiscreteVPSDE", "make_sde", "sde_class", "Prediction", "ScoreModel", "Denoised",
    "Gaussian", "GaussianMixture", "append_dims", "__version__",
    "DSMLoss", "dsm_loss", "MLPScoreNet", "UNet", "FixedBatch", "save_checkpoint", "load_checkpoint", "data",
]
