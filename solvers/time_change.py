r"""Integrating an ODE in half-log-SNR time :math:`\lambda = \log(\alpha/\sigma)` instead of ``t``.

For a :class:`~scoresde.LinearSDE` the half-log-SNR is strictly decreasing in ``t``,

.. math:: \frac{d\lambda}{dt} = \frac{d\log\alpha}{dt} - \frac{d\log\sigma}{dt}
          = -\frac{g(t)^2}{2\sigma(t)^2} < 0

(from :math:`g^2 = 2\sigma^2(d\log\sigma/dt - f)`), so ``t`` can be traded for :math:`\lambda`:
any :math:`dy/dt = F(t, y)` becomes :math:`dy/d\lambda = F(t(\lambda), y)\,dt/d\lambda`
(the chain rule, exact).  The probability-flow ODE
:math:`dx/dt = f x + \tfrac{g^2}{2\sigma}\hat\epsilon` turns into

.. math:: \frac{dx}{d\lambda} = \frac{f}{d\lambda/dt}\,x - \sigma\,\hat\epsilon
          = -\frac{2 f\sigma^2}{g^2}\,x - \sigma\,\hat\epsilon,

which for every variance-preserving schedule (:math:`g^2 = -2f`) is
:math:`dx/d\lambda = \sigma^2 x - \sigma\hat\epsilon` with :math:`\sigma^2 = \mathrm{sigmoid}(-2\lambda)`:
no ``f`` or ``g`` left (the change of variable behind DPM-Solver, Lu et al. 2022, there
written for :math:`\hat x = x/\alpha`: :math:`d\hat x/d\lambda = -e^{-\lambda}\hat\epsilon`).
A :class:`~scoresde.DiscreteVPSDE` has ``f`` and ``g`` jumping at each of its knots, so an
adaptive solver in ``t`` must stop on every knot (7 evaluations per segment with dopri5);
in :math:`\lambda` the right-hand side of a model whose output depends on ``t`` only through
:math:`(\alpha, \sigma)` is smooth and needs no knots.  The augmented likelihood state
:math:`[x, \delta]` changes variable the same way:
:math:`d\delta/d\lambda = \nabla\!\cdot(dx/dt)\; dt/d\lambda = \nabla\!\cdot(dx/d\lambda)`.

A network that reads ``t`` itself (e.g. DDPM's integer step ``N t - 1``) sees ``t(\lambda)``,
continuous with a kink at each knot, which dopri5's error estimate underrates: with
:math:`\hat\epsilon` exact plus :math:`0.1\sin(6t)\,x`, rtol = atol = 1e-8 ended 1.4e-7 (N = 1000)
and 7.8e-6 (N = 100) from the flow, against 1e-11 and 2e-8 in ``t`` with the knots.

This module keeps the variable ``s`` = :math:`\lambda` (``log_snr = 2 s`` in :mod:`scoresde`).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import torch
from torch import Tensor

from scoresde.sde import SDE, LinearSDE

__all__ = ["LogSNRTime", "default_time_variable", "TIME_VARIABLES"]

#: The integration variables an adaptive probability-flow solve can use.
TIME_VARIABLES = ("t", "log_snr")


def default_time_variable(sde: Any) -> str:
    """``"log_snr"`` for a :class:`~scoresde.LinearSDE` with knots (a piecewise schedule such
    as :class:`~scoresde.DiscreteVPSDE`, whose coefficients jump in ``t`` but whose
    half-log-SNR flow is smooth), ``"t"`` otherwise (smooth schedules keep their NFE)."""
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be a scoresde SDE, got {type(sde).__name__}")
    return "log_snr" if isinstance(sde, LinearSDE) and sde.knots.numel() > 0 else "t"


def _check_end(v: Any, name: str, sde: LinearSDE) -> float:
    if isinstance(v, Tensor) and v.numel() == 1:
        v = float(v)
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise TypeError(f"{name} must be a finite real number, got {v!r}")
    if not 0.0 <= float(v) <= sde.T:
        raise ValueError(f"{name}={v} is outside [0, T]=[0, {sde.T}] of {type(sde).__name__}")
    return float(v)


class LogSNRTime:
    r"""The change of variable :math:`t \to s = \lambda(t) = \tfrac12\log\mathrm{SNR}(t)` on the
    interval from ``t_from`` to ``t_to`` of a :class:`~scoresde.LinearSDE`.

    - ``s0``, ``s1``: :math:`\lambda(t_{from})`, :math:`\lambda(t_{to})` (floats; integrate from
      ``s0`` to ``s1``; ``s1 > s0`` when ``t_to < t_from``).
    - :meth:`t_of`: :math:`t(s)` in float64, clamped into the interval, exact at both ends.
    - :meth:`rate`: :math:`dt/d\lambda = -2\sigma^2/g^2` at float64 times.
    - :meth:`wrap`: ``rhs(t, y, ...) -> dy/dt`` into ``rhs_s(s, y, ...) -> dy/ds``.
    """

    def __init__(self, sde: LinearSDE, t_from: Any, t_to: Any):
        if not isinstance(sde, LinearSDE):
            raise TypeError(f"sde must be a scoresde LinearSDE (the log-SNR time needs alpha and sigma), "
                            f"got {type(sde).__name__}")
        self.sde = sde
        self.t_from = _check_end(t_from, "t_from", sde)
        self.t_to = _check_end(t_to, "t_to", sde)
        if self.t_from == self.t_to:
            raise ValueError(f"t_from and t_to must differ, got {self.t_from}")
        ends = torch.tensor([self.t_from, self.t_to], dtype=torch.float64)
        self.s0, self.s1 = (0.5 * sde.log_snr_unchecked(ends)).tolist()
        if not (math.isfinite(self.s0) and math.isfinite(self.s1)):
            raise ValueError(f"the log-SNR must be finite at both ends, got log_snr({self.t_from})="
                             f"{2 * self.s0}, log_snr({self.t_to})={2 * self.s1}; t = 0 has sigma = 0 "
                             f"for this SDE: use t_end > 0")
        if not self.s0 != self.s1:
            raise ValueError(f"the log-SNR is the same at t_from={self.t_from} and t_to={self.t_to}")
        self.t_lo, self.t_hi = min(self.t_from, self.t_to), max(self.t_from, self.t_to)
        self.s_lo, self.s_hi = min(self.s0, self.s1), max(self.s0, self.s1)

    def t_of(self, s: Tensor) -> Tensor:
        """Float64 times of the half-log-SNRs ``s`` (any shape, any float dtype): the SDE's
        closed-form inverse, clamped into ``[t_lo, t_hi]``, with ``s0 -> t_from`` and
        ``s1 -> t_to`` exactly (so the model is evaluated at the interval's own end points)."""
        s64 = s.detach().to(torch.float64).clamp(self.s_lo, self.s_hi)
        t = self.sde.t_of_log_snr_unchecked(2.0 * s64).clamp(self.t_lo, self.t_hi)
        t = torch.where(s64 == self.s0, torch.full_like(t, self.t_from), t)
        return torch.where(s64 == self.s1, torch.full_like(t, self.t_to), t)

    def rate(self, t64: Tensor) -> Tensor:
        r""":math:`dt/d\lambda = -2\sigma(t)^2/g(t)^2` at float64 ``t64`` (float64, shaped like
        ``t64``: ``[B]`` or a scalar).  Negative; for a VP schedule :math:`\sigma^2/f`."""
        sde = self.sde
        return -2.0 * torch.exp(2.0 * sde.log_sigma_unchecked(t64)) / sde.g2_unchecked(t64)

    def wrap(self, rhs: Callable[..., Any]) -> Callable[..., Any]:
        """``rhs(t64, y, *args) -> dy/dt`` (a tensor, or a tuple of tensors for a tuple state)
        into ``rhs_s(s, y, *args) -> dy/ds = rhs(t(s), y, *args) * dt/ds``.  ``s`` is a scalar
        (torchdiffeq) or ``[B]`` (one time per sample, :func:`solvers.adaptive.solve_per_sample`);
        the rate broadcasts over each sample's entries and is cast to each output's dtype."""
        def rhs_s(s: Tensor, y: Any, *args: Any) -> Any:
            t64 = self.t_of(s)
            dt_ds = self.rate(t64)
            out = rhs(t64, y, *args)
            if isinstance(out, tuple):
                return tuple(_scale(v, dt_ds) for v in out)
            return _scale(out, dt_ds)
        return rhs_s


def _scale(v: Tensor, rate: Tensor) -> Tensor:
    """``v [B, ...] * rate [B]`` broadcast over a sample's entries (or times a scalar rate)."""
    r = rate.to(dtype=v.dtype, device=v.device)
    if r.ndim:
        r = r.reshape(-1, *([1] * (v.ndim - 1)))
    return v * r
