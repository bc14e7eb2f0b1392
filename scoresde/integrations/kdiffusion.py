r"""k-diffusion / EDM denoisers as scoresde models.

k-diffusion's convention (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models"): a denoiser :math:`D(x, \sigma)` returns the denoised :math:`\hat x_0` of
:math:`x = x_0 + \sigma\epsilon`.  That is the :class:`scoresde.EDMSDE`
(:math:`\alpha = 1`, :math:`\sigma(t) = t`) with ``prediction="x0"``: time *is* sigma, so a
k-diffusion sigma schedule is a scoresde grid as it stands.  k-diffusion's samplers end with a
step to :math:`\sigma = 0` that returns :math:`D(x, \sigma_{N-1})`; on our side that step is
``final_denoise=True`` on the grid without its trailing zero::

    model = from_denoiser(D, sigma_min, sigma_max)
    sol = solvers.sample(model, x_T, "heun", timesteps=sigmas[:-1], final_denoise=True,
                         last_step_euler=False)       # == k_diffusion.sampling.sample_heun

:func:`load_sampling` loads ``k_diffusion/sampling.py`` alone: the package's ``__init__``
imports torchvision, so k-diffusion is installed with ``pip install --no-deps k-diffusion``
(it cannot be a scoresde extra).
"""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any, Callable

from torch import Tensor

from scoresde._checks import check_positive_float
from scoresde.model import ScoreModel
from scoresde.sde import EDMSDE

__all__ = ["from_denoiser", "load_sampling"]


def from_denoiser(denoiser: Callable[[Tensor, Tensor], Tensor], sigma_min: float, sigma_max: float,
                  sigma_data: float | None = None) -> ScoreModel:
    r"""A :class:`~scoresde.ScoreModel` over :class:`~scoresde.EDMSDE`\ ``(sigma_min, sigma_max)``
    of a k-diffusion denoiser.

    - ``sigma_data=None``: ``denoiser(x, sigma)`` returns :math:`\hat x_0` (``sigma`` a tensor
      of shape ``[B]`` in x's dtype, as k-diffusion's samplers pass it); ``prediction="x0"``.
    - ``sigma_data`` a float: ``denoiser`` is the raw network of k-diffusion's
      ``layers.Denoiser(inner_model, sigma_data)``, called ``denoiser(c_in x, sigma)``, and the
      EDM preconditioning :math:`\hat x_0 = c_{skip}x + c_{out}F` is applied here
      (``prediction="edm"`` with sigma as the time input).

    **Raises:** ``TypeError`` if ``denoiser`` is not callable; ``ValueError`` for sigmas that are
    not ``0 < sigma_min < sigma_max`` or a non-positive ``sigma_data``.
    """
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable as denoiser(x, sigma), got {type(denoiser).__name__}")
    sde = EDMSDE(sigma_min=sigma_min, sigma_max=sigma_max)
    if sigma_data is None:
        return ScoreModel(denoiser, sde, "x0", time_input="t")
    sigma_data = check_positive_float(sigma_data, "sigma_data")
    return ScoreModel(denoiser, sde, "edm", sigma_data=sigma_data, time_input="t")


_SAMPLING: types.ModuleType | None = None
_STUB = "_scoresde_kdiffusion"


def _append_dims(x: Tensor, target_dims: int) -> Tensor:
    """k_diffusion.utils.append_dims (the one utility sampling.py uses)."""
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * dims_to_append]


def load_sampling() -> Any:
    """``k_diffusion.sampling`` without running ``k_diffusion/__init__.py`` (which imports
    torchvision, PIL, ...): the file is loaded under a private package name whose ``utils`` is a
    stub holding ``append_dims``; nothing named ``k_diffusion`` enters ``sys.modules``.
    Loaded once and cached.

    **Raises:** ``ImportError`` naming the install line when k-diffusion (or one of the modules
    sampling.py imports: scipy, torchdiffeq, torchsde, tqdm) is missing.
    """
    global _SAMPLING
    if _SAMPLING is not None:
        return _SAMPLING
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed: pip install --no-deps k-diffusion "
                          "(its own requirements pull torchvision)")
    path = Path(next(iter(spec.submodule_search_locations))) / "sampling.py"
    pkg = types.ModuleType(_STUB)
    pkg.__path__ = []
    utils = types.ModuleType(f"{_STUB}.utils")
    utils.append_dims = _append_dims
    pkg.utils = utils
    sys.modules[_STUB], sys.modules[f"{_STUB}.utils"] = pkg, utils
    mspec = importlib.util.spec_from_file_location(f"{_STUB}.sampling", path)
    module = importlib.util.module_from_spec(mspec)
    sys.modules[f"{_STUB}.sampling"] = module
    try:
        mspec.loader.exec_module(module)
    except ImportError as err:
        del sys.modules[f"{_STUB}.sampling"]
        raise ImportError(f"k_diffusion/sampling.py needs a module that is missing ({err}); install scipy, "
                          "torchdiffeq, torchsde and tqdm") from err
    _SAMPLING = module
    return module
