r"""The analytic first step: the first network evaluation at :math:`t_{start} = T` replaced by
its Gaussian limit, at no NFE (Zhou et al. 2024, "Fast ODE-based sampling for diffusion
models in around 5 steps", sec. 4: AFS).

At :math:`T` the data signal is nearly gone (VP: :math:`\alpha_T \approx 6\cdot10^{-3}`), so
the prediction of any data distribution is close to that of the data model
:math:`x_0 \sim N(0, \sigma_d^2 I)`, :math:`\sigma_d = 1`.  For a LinearSDE,
:math:`x_t = \alpha x_0 + \sigma\epsilon`, i.e. :math:`x_t \sim N(0, (\alpha^2\sigma_d^2+\sigma^2)I)`,
and the exact predictions are

.. math:: \hat\epsilon(x) = \frac{\sigma\,x}{\sigma^2 + \alpha^2\sigma_d^2},\qquad
          \hat x_0(x) = \frac{\alpha\sigma_d^2\,x}{\sigma^2 + \alpha^2\sigma_d^2}.

For data of mean :math:`\mu` and covariance :math:`\Sigma` the true :math:`\hat\epsilon` differs
by :math:`\sigma\big[(\alpha^2\Sigma+\sigma^2)^{-1} - (\alpha^2+\sigma^2)^{-1}\big]x
- \alpha\sigma(\alpha^2\Sigma+\sigma^2)^{-1}\mu`: for :math:`x` of size :math:`\sigma`,
:math:`O(e^{\lambda_T}|\mu|)` from the mean plus :math:`O(e^{2\lambda_T})`, :math:`e^{\lambda} = \alpha/\sigma`
(VP: :math:`O(\alpha_T)`): the error is of the size of the signal it ignores.  The implied
:math:`\hat x_0` (:math:`\approx 0`) is off by about the data mean, which data-prediction
multistep methods keep in their history: the option suits centred data (images in [-1, 1]).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from scoresde.model import Coefficients, Denoised, Prediction
from scoresde.sde import LinearSDE

__all__ = ["SIGMA_DATA", "gaussian_prediction", "analytic_denoised", "check_analytic_first_step"]

#: standard deviation of the Gaussian data model whose prediction replaces the first evaluation
SIGMA_DATA = 1.0


def gaussian_prediction(x: Tensor, alpha: float, sigma: float,
                        sigma_data: float = SIGMA_DATA) -> tuple[Tensor, Tensor]:
    """``(x0, eps)`` of data :math:`N(0, \\sigma_d^2 I)` at ``x`` (module docstring)."""
    var = sigma * sigma + alpha * alpha * sigma_data * sigma_data
    return x * (alpha * sigma_data * sigma_data / var), x * (sigma / var)


def analytic_denoised(sde: LinearSDE, x: Tensor, t64: Tensor) -> Denoised:
    """A :class:`~scoresde.model.Denoised` holding :func:`gaussian_prediction` at the scalar
    time ``t64`` (its x0, eps and score views), without calling a network."""
    c = sde.coefficients(t64.reshape(1).to(torch.float64).cpu())
    alpha, sigma = float(c["alpha"][0]), float(c["sigma"][0])
    x0, eps = gaussian_prediction(x, alpha, sigma)
    d = Denoised(x, eps, Prediction.EPS, Coefficients(alpha, sigma))
    d._x0 = x0
    return d


def check_analytic_first_step(value: Any, solver: Any, sde: Any) -> bool:
    """Validate ``analytic_first_step`` for ``solver``: a bool; True only for a fixed-step
    deterministic method on a LinearSDE (their first evaluation is at the grid's start)."""
    if not isinstance(value, bool):
        raise TypeError(f"analytic_first_step must be a bool, got {value!r}")
    if not value:
        return False
    if getattr(solver, "stochastic", False):
        raise ValueError(f"analytic_first_step=True needs a deterministic method; {solver.name} draws noise")
    if hasattr(solver, "run"):
        raise ValueError(f"analytic_first_step=True needs a fixed-step method; {solver.name} chooses its own "
                         "evaluation points")
    if not isinstance(sde, LinearSDE):
        raise ValueError(f"analytic_first_step=True needs a LinearSDE (alpha, sigma); got {type(sde).__name__}")
    return True
