"""solvers: the numerical side of scoresde.

``solvers.sample(model, x_T, method=..., steps=...)`` drives any registered method over a
time grid and returns a :class:`Solution`; :func:`available_methods` lists the names.
"""
from ._registry import available_methods, get, register
from .base import NonFiniteError, Solution, Solver, SolverError, StepInfo, StepTable, sample
from .noise import BrownianNoise, GeneratorNoise, ZeroNoise
from .timesteps import SCHEDULES, TimeGrid, make_grid
from . import dpm  # noqa: F401  (registers the methods)
from . import ode  # noqa: F401
from . import sde_samplers, correctors  # noqa: F401
from .sde_samplers import AdaptiveSDE, Ancestral, EulerMaruyama, ReverseDiffusion
from .correctors import AnnealedLangevin, LangevinCorrector, PredictorCorrector
from . import unipc  # noqa: F401
from .dpm_v3 import DPMSolverV3  # noqa: F401  (registers dpm_solver_v3)
from .unipc import UniPC
from . import deis, ipndm  # noqa: F401  (registers deis, ipndm)
from .likelihood import LikelihoodResult, bits_per_dim, encode, log_likelihood
from .calibrate import CalibratedGrid, calibrate_many, calibrate_timesteps
from .ays import OptimizedGrid, optimize_timesteps
from .ems import EMS, ems_statistics
from . import auto  # noqa: F401  (method="auto": solvers.auto.RULE)
from . import churn, ancestral_split  # noqa: F401  (edm_sde; euler_ancestral, dpmpp_2s_ancestral, dpmpp_sde)
from . import sa_solver, er_sde, restart  # noqa: F401  (sa_solver, er_sde, restart)

__all__ = [
    "sample", "available_methods", "get", "register", "Solution", "Solver", "SolverError",
    "NonFiniteError", "StepInfo", "StepTable", "BrownianNoise", "GeneratorNoise", "ZeroNoise",
    "SCHEDULES", "TimeGrid", "make_grid", "UniPC",
    "EulerMaruyama", "ReverseDiffusion", "Ancestral", "AdaptiveSDE",
    "LangevinCorrector", "AnnealedLangevin", "PredictorCorrector",
    "log_likelihood", "bits_per_dim", "encode", "LikelihoodResult",
    "calibrate_timesteps", "calibrate_many", "CalibratedGrid", "optimize_timesteps", "OptimizedGrid",
    "ems_statistics", "EMS", "DPMSolverV3",
]
