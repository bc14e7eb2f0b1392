r"""Forward diffusion processes written as SDEs.

Every process is :math:`dx = f(x, t)\,dt + g(t)\,dW` on :math:`t \in [0, T]`, time
running forward from data (t = 0) to the prior (t = T); samplers integrate the
reverse process from ``T`` down to ``t_end``.

:class:`SDE` is the general base a user subclasses (drift, diffusion, prior).
:class:`LinearSDE` is the family whose transition kernel is Gaussian,

.. math:: x_t \mid x_0 \sim \mathcal N(\alpha(t)\,x_0,\ \sigma(t)^2 I),

fully described by :math:`\alpha(t)` and :math:`\sigma(t)`: the drift coefficient is
:math:`f(t) = d\log\alpha/dt`, the squared diffusion
:math:`g^2(t) = d\sigma^2/dt - 2 f(t)\sigma^2(t)`, and the log signal-to-noise ratio
``log_snr(t)`` :math:`= \log(\alpha^2/\sigma^2)`, strictly decreasing with derivative
:math:`-g^2/\sigma^2`.  (Solvers write :math:`\lambda = \log(\alpha/\sigma)`, half the log-SNR.)

Precision policy: schedules are evaluated in float64 (``expm1``/``log1p`` forms where
t -> 0 would lose digits, e.g. :math:`\sigma = \sqrt{-\mathrm{expm1}(2\log\alpha)}` for the
VP family) and returned in the caller's dtype and device.  A Python float argument gives
a tensor of the default dtype.  A constructor rejects parameters whose schedule float64 cannot
hold: at ``T`` and at the default ``t_end`` the SNR :math:`\alpha^2/\sigma^2` must lie in
``[1e-300, 1e300]`` (``VPSDE(T=1e9)`` has :math:`\alpha(T) \approx e^{-5\cdot10^{18}}`, 0 in float64), and the
message gives the valid range of the arguments.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor
import torch.nn.functional as F

from ._checks import (
    append_dims,
    as_float64_time,
    check_finite_tensor,
    check_float,
    check_floating,
    check_positive_float,
    time_vector,
)

__all__ = [
    "SDE",
    "LinearSDE",
    "VPSDE",
    "SubVPSDE",
    "VESDE",
    "CosineVPSDE",
    "EDMSDE",
    "RectifiedFlowSDE",
    "DiscreteVPSDE",
    "SDE_CLASSES",
    "SDE_SHORT_NAMES",
    "sde_class",
    "make_sde",
]

_LOG_2PI = math.log(2.0 * math.pi)
# a schedule is usable when its SNR alpha^2/sigma^2 stays in [1e-300, 1e300] on [t_end, T]:
# alpha, sigma and their ratio are then normal float64 numbers with room for products
_LOG_SNR_BOUND = 300.0 * math.log(10.0)


def _out_dtype(t: Any) -> torch.dtype:
    if isinstance(t, Tensor) and t.is_floating_point():
        return t.dtype
    return torch.get_default_dtype()


def _out_device(t: Any) -> torch.device:
    return t.device if isinstance(t, Tensor) else torch.device("cpu")


def _log1mexp(a: Tensor) -> Tensor:
    """log(1 - exp(a)) for a <= 0, accurate for a near 0 and for a << 0."""
    return torch.where(a > -math.log(2.0), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


class SDE:
    r"""A forward SDE :math:`dx = f(x,t)\,dt + g(t)\,dW`, :math:`t\in[0,T]`.

    Subclass it for a process that is not a :class:`LinearSDE`: implement
    :meth:`drift` and :meth:`diffusion` (``t`` arrives as a tensor of shape ``[B]``),
    and optionally :meth:`prior_sample`/:meth:`prior_log_prob` (default
    :math:`\mathcal N(0, \text{prior\_std}^2 I)`).  Such an SDE works with
    Euler--Maruyama, predictor--corrector, ``pf_ode`` and the likelihood; the
    exponential-integrator solvers need a :class:`LinearSDE`.

    **Attributes:** ``T`` (end of the forward time), ``default_t_end`` (where sampling
    stops by default), ``prior_std``, ``knots`` (see :attr:`knots`).
    """

    T: float = 1.0
    default_t_end: float = 1e-3
    prior_std: float = 1.0

    @property
    def knots(self) -> Tensor:
        """The times in ``(0, T)`` where the coefficients are not smooth (a jump in
        :math:`f` or :math:`g`, or in a derivative), sorted, float64; empty for a smooth SDE.
        An adaptive solver steps onto the knots inside its interval (torchdiffeq's
        ``jump_t``) instead of shrinking its steps to cross them."""
        return torch.empty(0, dtype=torch.float64)

    # ------------------------------------------------------------------ contract
    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        """Drift :math:`f(x, t)`, same shape as ``x``."""
        raise NotImplementedError(f"{type(self).__name__} must implement drift(x, t)")

    def diffusion(self, t: Tensor) -> Tensor:
        """Diffusion coefficient :math:`g(t)`, shaped like ``t``."""
        raise NotImplementedError(f"{type(self).__name__} must implement diffusion(t)")

    # ------------------------------------------------------------------ derived
    def check_time(self, t: Any, batch: int | None = None, name: str = "t") -> Tensor:
        """Validate a time argument and return it as float64: shape ``[batch]`` when
        ``batch`` is given, else the argument's own shape.  Values must be finite and in
        ``[0, T]`` (a few ulps of slack, then clamped)."""
        t64 = time_vector(t, batch, name) if batch is not None else as_float64_time(t, name)
        if t64.numel():
            slack = 8.0 * torch.finfo(_out_dtype(t)).eps * max(1.0, self.T)
            lo, hi = float(t64.detach().min()), float(t64.detach().max())
            if lo < -slack or hi > self.T + slack:
                bad = lo if lo < -slack else hi
                raise ValueError(
                    f"{name}={bad:.6g} is outside [0, T]=[0, {self.T:.6g}] of {type(self).__name__}"
                )
        return t64.clamp(0.0, self.T)

    def prior_sample(self, shape: Sequence[int], generator: torch.Generator | None = None,
                     dtype: torch.dtype | None = None, device: Any = None) -> Tensor:
        """Draw from the prior :math:`\\mathcal N(0, \\text{prior\\_std}^2 I)`."""
        if device is None and generator is not None:
            device = generator.device
        z = torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)
        return z * self.prior_std

    def prior_log_prob(self, z: Tensor) -> Tensor:
        """Log-density of the prior at ``z``, summed over non-batch dims: shape ``[B]``."""
        check_floating(z, "z")
        if z.ndim == 0:
            raise ValueError("z must have a batch dimension, got a 0-d tensor")
        d = z[0].numel() if z.shape[0] else math.prod(z.shape[1:])
        s2 = self.prior_std ** 2
        sq = z.reshape(z.shape[0], -1).square().sum(dim=1)
        return -0.5 * sq / s2 - 0.5 * d * (_LOG_2PI + math.log(s2))

    def _g2_like(self, t: Tensor, x: Tensor) -> Tensor:
        """g(t)^2 broadcastable against ``x``, in x's dtype and device (a float64 time must
        not promote a float32 state)."""
        g = append_dims(torch.as_tensor(self.diffusion(t)), x.ndim).to(dtype=x.dtype, device=x.device)
        return g * g

    def pf_drift(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        r"""Probability-flow ODE drift :math:`f(x,t) - \tfrac12 g(t)^2\,\nabla\log p_t(x)`,
        in ``x``'s dtype."""
        return self.drift(x, t).to(x.dtype) - 0.5 * self._g2_like(t, x) * score

    def reverse_drift(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        r"""Reverse-time SDE drift :math:`f(x,t) - g(t)^2\,\nabla\log p_t(x)` (Anderson 1982),
        in ``x``'s dtype."""
        return self.drift(x, t).to(x.dtype) - self._g2_like(t, x) * score

    def config(self) -> dict:
        """A JSON-serialisable description (class name and constructor arguments)."""
        return {"class": type(self).__name__}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "class")
        return f"{type(self).__name__}({args})"


class LinearSDE(SDE):
    r"""An SDE with Gaussian transition kernel :math:`\mathcal N(\alpha(t) x_0, \sigma(t)^2 I)`.

    A subclass implements the float64 hooks ``_log_alpha(t)`` and ``_log_sigma(t)``;
    it may override ``_f`` (:math:`d\log\alpha/dt`), ``_g2``, ``_log_snr`` and
    ``_t_of_log_snr`` with closed forms.  The defaults differentiate by autograd and
    invert the log-SNR by bisection (monotone, 64 halvings of ``[0, T]`` in
    float64), so a user only needs :math:`\log\alpha` and :math:`\log\sigma`.
    """

    # ---------------------------------------------------------------- float64 hooks
    def _log_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement _log_alpha(t)")

    def _log_sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement _log_sigma(t)")

    def _grad(self, fn, t: Tensor) -> Tensor:
        with torch.enable_grad():
            tt = t.detach().clone().requires_grad_(True)
            y = fn(tt)
            if not y.requires_grad:      # a constant hook (e.g. log alpha = 0 for a VE-type SDE)
                return torch.zeros_like(t)
            (d,) = torch.autograd.grad(y.sum(), tt, allow_unused=True, materialize_grads=True)
        return d

    def _f(self, t: Tensor) -> Tensor:
        return self._grad(self._log_alpha, t)

    def _g2(self, t: Tensor) -> Tensor:
        # g^2 = d sigma^2/dt - 2 f sigma^2 = 2 sigma^2 (d log sigma/dt - f)
        return 2.0 * torch.exp(2.0 * self._log_sigma(t)) * (self._grad(self._log_sigma, t) - self._f(t))

    def _log_snr(self, t: Tensor) -> Tensor:
        return 2.0 * (self._log_alpha(t) - self._log_sigma(t))

    def _t_of_log_snr(self, lam: Tensor) -> Tensor:
        lo = torch.zeros_like(lam)
        hi = torch.full_like(lam, self.T)
        for _ in range(64):  # log_snr is decreasing: lam(mid) > lam  =>  t is above mid
            mid = 0.5 * (lo + hi)
            above = self._log_snr(mid) > lam
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return 0.5 * (lo + hi)

    def _newton_polish(self, t: Tensor, lam: Tensor) -> Tensor:
        """One Newton step on log_snr(t) = lam, using d log_snr/dt = -g^2/sigma^2."""
        slope = -self._g2(t) / torch.exp(2.0 * self._log_sigma(t))
        step = (self._log_snr(t) - lam) / slope
        ok = torch.isfinite(step) & (slope < 0)
        return torch.where(ok, t - step, t).clamp(0.0, self.T)

    # ---------------------------------------------------------------- construction
    def _check_schedule(self) -> None:
        r"""ValueError unless the schedule can be evaluated in float64 on ``[default_t_end, T]``:
        ``0 < default_t_end <= T``, and at both ends the SNR :math:`\alpha^2/\sigma^2` lies in
        ``[1e-300, 1e300]`` (so neither alpha(T) nor sigma(t_end) underflows and the
        conversions between x0, eps and the score stay finite) with finite ``f`` and ``g2``.
        Every constructor calls it; the message names the arguments and their valid range
        (:meth:`_valid_range`)."""
        name = repr(self)
        if not 0.0 < self.default_t_end <= self.T:
            raise ValueError(f"{name}: T={self.T:.6g} is below the default t_end={self.default_t_end:.6g} "
                             f"where sampling stops; {self._valid_range()}")
        for where, t in (("T", self.T), ("t_end", self.default_t_end)):
            c = self.coefficients(torch.tensor([t], dtype=torch.float64))
            lam = float(c["log_snr"])
            finite = bool(torch.isfinite(c["f"]).all() and torch.isfinite(c["g2"]).all())
            if -_LOG_SNR_BOUND <= lam <= _LOG_SNR_BOUND and finite:
                continue
            what = (f"alpha^2/sigma^2 = exp({lam:.4g}) at {where}={t:.6g} is outside [1e-300, 1e300] "
                    f"({'alpha underflows' if lam < 0 else 'sigma underflows'})" if finite and lam == lam else
                    f"its coefficients at {where}={t:.6g} are not finite (log-SNR {lam:.4g})")
            raise ValueError(f"{name} cannot be evaluated in float64: {what}; {self._valid_range()}")

    def _valid_range(self) -> str:
        """The constructor arguments' valid range, for :meth:`_check_schedule`'s message."""
        return "choose parameters with a moderate signal-to-noise ratio at T and t_end"

    # ------------------------------------------------------------ evaluation helper
    def _apply(self, hook, t: Any, name: str = "t") -> Tensor:
        t64 = self.check_time(t, name=name)
        return hook(t64).to(dtype=_out_dtype(t), device=_out_device(t))

    # ----------------------------------------------------------------- public API
    def alpha(self, t: Any) -> Tensor:
        r""":math:`\alpha(t)`, shaped like ``t``."""
        return self._apply(lambda s: torch.exp(self._log_alpha(s)), t)

    def sigma(self, t: Any) -> Tensor:
        r""":math:`\sigma(t)`, shaped like ``t``."""
        return self._apply(lambda s: torch.exp(self._log_sigma(s)), t)

    def log_alpha(self, t: Any) -> Tensor:
        r""":math:`\log\alpha(t)`."""
        return self._apply(self._log_alpha, t)

    def log_sigma(self, t: Any) -> Tensor:
        r""":math:`\log\sigma(t)`."""
        return self._apply(self._log_sigma, t)

    def log_snr(self, t: Any) -> Tensor:
        r"""The log-SNR :math:`\log(\alpha(t)^2/\sigma(t)^2)`, strictly decreasing."""
        return self._apply(self._log_snr, t)

    def f(self, t: Any) -> Tensor:
        r"""Drift coefficient :math:`f(t) = d\log\alpha/dt` (the drift is :math:`f(t)x`)."""
        return self._apply(self._f, t)

    def g2(self, t: Any) -> Tensor:
        r"""Squared diffusion :math:`g(t)^2 = d\sigma^2/dt - 2 f(t)\sigma(t)^2`."""
        return self._apply(self._g2, t)

    def diffusion(self, t: Any) -> Tensor:
        """Diffusion coefficient :math:`g(t)`."""
        return self._apply(lambda s: torch.sqrt(self._g2(s)), t)

    def drift(self, x: Tensor, t: Any) -> Tensor:
        """Drift :math:`f(t)\\,x`; ``t`` a float, a 0-d tensor or shape ``[B]``."""
        check_floating(x, "x")
        t64 = self.check_time(t, batch=x.shape[0] if x.ndim else None)
        fx = self._f(t64).to(dtype=x.dtype, device=x.device)
        return append_dims(fx, x.ndim) * x

    def t_of_log_snr(self, lam: Any) -> Tensor:
        r"""Inverse of :meth:`log_snr`: the t in ``[0, T]`` whose log-SNR is ``lam`` (the full
        log-SNR :math:`\log(\alpha^2/\sigma^2)`, not the solvers' half-log-SNR :math:`\lambda`).

        ``lam`` must lie in ``[log_snr(T), log_snr(0)]`` (a small relative slack is
        clamped); closed form where one exists, else monotone bisection."""
        if isinstance(lam, Tensor):
            if not lam.is_floating_point():
                lam = lam.to(torch.get_default_dtype())
            l64 = lam.detach().to(torch.float64)
        else:
            l64 = as_float64_time(lam, "lam") if not (isinstance(lam, float) and math.isinf(lam)) \
                else torch.tensor(lam, dtype=torch.float64)
        if bool(torch.isnan(l64).any()):
            raise ValueError("lam must not be NaN")
        lam_T = float(self._log_snr(torch.tensor(self.T, dtype=torch.float64)))
        lam_0 = float(self._log_snr(torch.tensor(0.0, dtype=torch.float64)))
        if l64.numel():
            slack = 1e-6 * (1.0 + abs(lam_T))
            if float(l64.min()) < lam_T - slack or (math.isfinite(lam_0) and float(l64.max()) > lam_0 + 1e-6 * (1.0 + abs(lam_0))):
                raise ValueError(
                    f"lam must lie in [log_snr(T), log_snr(0)] = [{lam_T:.6g}, {lam_0:.6g}] for "
                    f"{type(self).__name__}, got [{float(l64.min()):.6g}, {float(l64.max()):.6g}]"
                )
        l64 = l64.clamp(min=lam_T)
        if math.isfinite(lam_0):
            l64 = l64.clamp(max=lam_0)
        t = self._t_of_log_snr(l64).clamp(0.0, self.T)
        return t.to(dtype=_out_dtype(lam), device=_out_device(lam))

    def marginal(self, x0: Tensor, t: Any) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation of :math:`x_t \\mid x_0`: ``(alpha(t) x0, sigma(t))``,
        the std shaped ``[B, 1, ..., 1]`` so that ``mean + std * eps`` samples :math:`x_t`."""
        check_floating(x0, "x0")
        if x0.ndim == 0:
            raise ValueError("x0 must have a batch dimension, got a 0-d tensor")
        t64 = self.check_time(t, batch=x0.shape[0])
        a = torch.exp(self._log_alpha(t64)).to(dtype=x0.dtype, device=x0.device)
        s = torch.exp(self._log_sigma(t64)).to(dtype=x0.dtype, device=x0.device)
        return append_dims(a, x0.ndim) * x0, append_dims(s, x0.ndim)

    def coefficients(self, t: Tensor) -> dict[str, Tensor]:
        """All schedule coefficients at float64 times ``t`` (no validation, float64 out):
        ``alpha, sigma, log_alpha, log_sigma, log_snr, f, g2``.  Used by solvers to
        precompute their tables once per call."""
        la, ls = self._log_alpha(t), self._log_sigma(t)
        return {
            "alpha": torch.exp(la), "sigma": torch.exp(ls), "log_alpha": la, "log_sigma": ls,
            "log_snr": self._log_snr(t), "f": self._f(t), "g2": self._g2(t),
        }

    # ------------------------------------------------ unchecked float64 evaluation
    # The solvers' contract with a LinearSDE: float64 times (or log-SNRs) in, float64 out, no
    # validation, no clamping, no dtype/device conversion.  A solver checks its time grid once
    # per call and evaluates these per step; everything else wants the checked methods above,
    # which give the same values.  Subclasses override the private hooks, not these.
    def log_alpha_unchecked(self, t: Tensor) -> Tensor:
        r""":math:`\log\alpha(t)` at float64 ``t`` (no checks)."""
        return self._log_alpha(t)

    def log_sigma_unchecked(self, t: Tensor) -> Tensor:
        r""":math:`\log\sigma(t)` at float64 ``t`` (no checks)."""
        return self._log_sigma(t)

    def log_snr_unchecked(self, t: Tensor) -> Tensor:
        r"""Log-SNR :math:`\log(\alpha^2/\sigma^2)` at float64 ``t`` (no checks)."""
        return self._log_snr(t)

    def f_unchecked(self, t: Tensor) -> Tensor:
        r"""Drift coefficient :math:`f(t) = d\log\alpha/dt` at float64 ``t`` (no checks)."""
        return self._f(t)

    def g2_unchecked(self, t: Tensor) -> Tensor:
        r"""Squared diffusion :math:`g(t)^2` at float64 ``t`` (no checks)."""
        return self._g2(t)

    def t_of_log_snr_unchecked(self, log_snr: Tensor) -> Tensor:
        r"""Inverse of the log-SNR at float64 ``log_snr``: :meth:`t_of_log_snr` without its range
        check, clamping to ``[0, T]`` and dtype conversion.  ``log_snr`` must lie in
        :math:`[\log\mathrm{SNR}(T), \log\mathrm{SNR}(0)]`; the result may leave ``[0, T]`` by
        round-off."""
        return self._t_of_log_snr(log_snr)


# --------------------------------------------------------------------------- VP family
class _VPFamily(LinearSDE):
    """alpha^2 + sigma^2 = 1: sigma from log alpha by expm1, g^2 = -2 f."""

    def _log_sigma(self, t: Tensor) -> Tensor:
        return 0.5 * _log1mexp(2.0 * self._log_alpha(t))

    def _log_snr(self, t: Tensor) -> Tensor:
        la2 = 2.0 * self._log_alpha(t)
        return la2 - _log1mexp(la2)

    def _g2(self, t: Tensor) -> Tensor:
        return -2.0 * self._f(t)

    @staticmethod
    def _log_alpha_of_log_snr(lam: Tensor) -> Tensor:
        # alpha^2 = sigmoid(lam)  =>  log alpha = -softplus(-lam)/2
        return -0.5 * F.softplus(-lam)


class VPSDE(_VPFamily):
    r"""Variance-preserving SDE (Song et al. 2021, "Score-Based Generative Modeling through SDEs").

    :math:`\beta(t) = \beta_{min} + t(\beta_{max}-\beta_{min})`,
    :math:`\log\alpha(t) = -\tfrac14 t^2(\beta_{max}-\beta_{min}) - \tfrac12 t\beta_{min}`,
    :math:`\sigma = \sqrt{1-\alpha^2}`, :math:`f = -\beta/2`, :math:`g^2 = \beta`.
    ``T = 1``, prior :math:`\mathcal N(0, I)`, default ``t_end = 1e-3``.
    ``beta_min == beta_max`` (constant rate) is allowed.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, T: float = 1.0):
        self.beta_min = check_positive_float(beta_min, "beta_min")
        self.beta_max = check_positive_float(beta_max, "beta_max")
        if self.beta_min > self.beta_max:
            raise ValueError(
                f"beta_min must be <= beta_max, got beta_min={self.beta_min}, beta_max={self.beta_max}"
            )
        self.T = check_positive_float(T, "T")
        self.default_t_end = 1e-3 * self.T
        self._check_schedule()

    def _valid_range(self) -> str:
        # alpha^2/sigma^2 >= 1e-300 at T and <= 1e300 at t_end = T/1000, solved for T
        bound = torch.tensor([-_LOG_SNR_BOUND, _LOG_SNR_BOUND], dtype=torch.float64)
        t_max, t_min = self._t_of_log_snr(bound).tolist()
        t_min *= 1e3
        betas = f"beta_min={self.beta_min:.6g}, beta_max={self.beta_max:.6g}"
        if not t_min < t_max:
            return f"no T works for {betas}; beta_min and beta_max must be > 0 and moderate (e.g. 0.1 and 20)"
        return f"T must be in [{t_min:.6g}, {t_max:.6g}] for {betas}"

    def _log_alpha(self, t: Tensor) -> Tensor:
        return -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def _f(self, t: Tensor) -> Tensor:
        return -0.5 * (self.beta_min + t * (self.beta_max - self.beta_min))

    def _t_of_log_alpha(self, la: Tensor) -> Tensor:
        # 0.25 d t^2 + 0.5 b0 t = c, c = -log alpha >= 0; stable root 2c / (b0/2 + sqrt(b0^2/4 + d c))
        c = (-la).clamp(min=0.0)
        b = 0.5 * self.beta_min
        return 2.0 * c / (b + torch.sqrt(b * b + (self.beta_max - self.beta_min) * c))

    def _t_of_log_snr(self, lam: Tensor) -> Tensor:
        return self._t_of_log_alpha(self._log_alpha_of_log_snr(lam))

    def config(self) -> dict:
        return {"class": "VPSDE", "beta_min": self.beta_min, "beta_max": self.beta_max, "T": self.T}


class SubVPSDE(VPSDE):
    r"""Sub-VP SDE (Song et al. 2021): the VP :math:`\alpha(t)` with
    :math:`\sigma(t) = 1 - \alpha(t)^2` (a *standard deviation*, not a variance),
    :math:`g^2 = \beta(t)(1 - \alpha(t)^4)`.  ``T = 1``, prior :math:`\mathcal N(0,I)`,
    default ``t_end = 1e-3``.

    It subclasses :class:`VPSDE` to share :math:`\alpha(t)` and the parameters only: it is
    *not* variance preserving (:math:`\alpha^2+\sigma^2 \ne 1`), so code must not read
    VP identities off ``isinstance(sde, VPSDE)``; every schedule hook is overridden here."""

    def _log_sigma(self, t: Tensor) -> Tensor:
        return _log1mexp(2.0 * self._log_alpha(t))

    def _log_snr(self, t: Tensor) -> Tensor:
        la2 = 2.0 * self._log_alpha(t)
        return la2 - 2.0 * _log1mexp(la2)

    def _g2(self, t: Tensor) -> Tensor:
        beta = -2.0 * self._f(t)
        return -beta * torch.expm1(4.0 * self._log_alpha(t))

    def _log_alpha_of_log_snr(self, lam: Tensor) -> Tensor:  # type: ignore[override]
        # (overrides the VP formula alpha^2 = sigmoid(lam), which is wrong here)
        # u = alpha^2 solves e^lam (1-u)^2 = u; the root in (0, 1) is
        # u = 2 / (2 + m + sqrt(m^2 + 4m)), m = e^{-lam}.  Without cancellation:
        #   lam > 0 (u -> 1):  log u = -log1p((m + sqrt(m^2 + 4m)) / 2)
        #   lam <= 0 (u -> 0): log u = log 2 + lam - log(1 + 2e + sqrt(1 + 4e)), e = e^{lam}
        m = torch.exp(-lam.clamp(min=0.0))
        log_u_pos = -torch.log1p(0.5 * (m + torch.sqrt(m * m + 4.0 * m)))
        e = torch.exp(lam.clamp(max=0.0))
        log_u_neg = math.log(2.0) + lam - torch.log(1.0 + 2.0 * e + torch.sqrt(1.0 + 4.0 * e))
        return 0.5 * torch.where(lam > 0, log_u_pos, log_u_neg)

    def _t_of_log_snr(self, lam: Tensor) -> Tensor:
        la = self._log_alpha_of_log_snr(lam)
        return self._t_of_log_alpha(la)

    def config(self) -> dict:
        return {"class": "SubVPSDE", "beta_min": self.beta_min, "beta_max": self.beta_max, "T": self.T}


class CosineVPSDE(_VPFamily):
    r"""The iDDPM cosine schedule in continuous time (Nichol & Dhariwal 2021):
    :math:`\alpha(t)^2 = \cos^2\!\big(\tfrac{t+s}{1+s}\tfrac\pi2\big) / \cos^2\!\big(\tfrac{s}{1+s}\tfrac\pi2\big)`,
    VP (:math:`\sigma^2 = 1-\alpha^2`), :math:`f = -\tfrac{\pi}{2(1+s)}\tan\theta(t)`.

    Near t = 1, :math:`\alpha \to 0` and :math:`\beta(t)\to\infty`; as in DPM-Solver the
    default end is ``T = 0.9946`` (:math:`\log\alpha(T) \approx -4.8`, like the linear VP at
    t = 1).  Prior :math:`\mathcal N(0,I)`, default ``t_end = 1e-3``.
    """

    def __init__(self, s: float = 0.008, T: float = 0.9946):
        self.s = check_float(s, "s", low=0.0)
        self.T = check_float(T, "T", low=0.0, high=1.0, low_open=True, high_open=True)
        self.default_t_end = 1e-3
        self._theta0 = 0.5 * math.pi * self.s / (1.0 + self.s)
        self._tan0 = math.tan(self._theta0)
        self._scale = 0.5 * math.pi / (1.0 + self.s)
        self._check_schedule()

    def _valid_range(self) -> str:
        return f"T must be in [{self.default_t_end:g}, 1) and s >= 0 small (e.g. 0.008)"

    def _log_alpha(self, t: Tensor) -> Tensor:
        # log(cos(theta0 + d)/cos(theta0)) = log1p(-2 sin^2(d/2) - tan(theta0) sin(d))
        d = self._scale * t
        return torch.log1p(-2.0 * torch.sin(0.5 * d) ** 2 - self._tan0 * torch.sin(d))

    def _f(self, t: Tensor) -> Tensor:
        return -self._scale * torch.tan(self._theta0 + self._scale * t)

    def _t_of_log_snr(self, lam: Tensor) -> Tensor:
        la = self._log_alpha_of_log_snr(lam)
        cos_theta = math.cos(self._theta0) * torch.exp(la)
        t = (torch.arccos(cos_theta.clamp(-1.0, 1.0)) - self._theta0) / self._scale
        t = t.clamp(0.0, self.T)
        return self._newton_polish(self._newton_polish(t, lam), lam)

    def config(self) -> dict:
        return {"class": "CosineVPSDE", "s": self.s, "T": self.T}


class DiscreteVPSDE(_VPFamily):
    r"""A discrete-time DDPM schedule of N steps in continuous time (DPM-Solver's recipe).

    Built from ``betas`` (each in (0, 1)) or ``alphas_cumprod`` (in (0, 1], strictly
    decreasing): :math:`\log\alpha` is known at :math:`t_n = (n+1)/N`,
    :math:`\log\alpha(t_n) = \tfrac12\log\bar\alpha_n`, with :math:`\log\alpha(0)=0`, and is
    interpolated piecewise-linearly in between.  VP: :math:`\sigma^2 = 1-\alpha^2`,
    :math:`g^2 = -2f` (piecewise constant).  ``T = 1``; default ``t_end = 1/N`` (the first
    training step).  A network trained on integer steps n takes the time input
    ``N t - 1`` (``ScoreModel(..., time_input="discrete")``).  :math:`f` and :math:`g` jump at
    the interior knots :math:`k/N`, :math:`k = 1, \dots, N-1` (:attr:`knots`); a segment is
    closed on the left, so the coefficients at a knot are those of the segment above it.
    """

    def __init__(self, betas: Any = None, alphas_cumprod: Any = None):
        if (betas is None) == (alphas_cumprod is None):
            raise ValueError("pass exactly one of betas or alphas_cumprod")
        if betas is not None:
            b = self._as_1d(betas, "betas")
            bad = torch.nonzero(~((b > 0) & (b < 1))).flatten()
            if bad.numel():
                i = int(bad[0])
                raise ValueError(f"betas must lie in (0, 1); betas[{i}]={float(b[i])}")
            log_ac = torch.cumsum(torch.log1p(-b), dim=0)
        else:
            ac = self._as_1d(alphas_cumprod, "alphas_cumprod")
            bad = torch.nonzero(~((ac > 0) & (ac <= 1))).flatten()
            if bad.numel():
                i = int(bad[0])
                raise ValueError(f"alphas_cumprod must lie in (0, 1]; alphas_cumprod[{i}]={float(ac[i])}")
            if ac.numel() > 1:
                inc = torch.nonzero(ac[1:] >= ac[:-1]).flatten()
                if inc.numel():
                    i = int(inc[0]) + 1
                    raise ValueError(
                        f"alphas_cumprod must be strictly decreasing; alphas_cumprod[{i}]={float(ac[i])} "
                        f">= alphas_cumprod[{i - 1}]={float(ac[i - 1])}"
                    )
            if float(ac[0]) >= 1.0:
                raise ValueError("alphas_cumprod[0] must be < 1 (beta_0 > 0)")
            log_ac = torch.log(ac)
        self.num_steps = int(log_ac.numel())
        n = self.num_steps
        self.T = 1.0
        self.default_t_end = 1.0 / n
        self._t_knots = torch.cat([torch.zeros(1, dtype=torch.float64),
                                   torch.arange(1, n + 1, dtype=torch.float64) / n])
        self._la_knots = torch.cat([torch.zeros(1, dtype=torch.float64), 0.5 * log_ac])
        self._slopes = (self._la_knots[1:] - self._la_knots[:-1]) * n
        self.alphas_cumprod = torch.exp(log_ac)
        self._check_schedule()

    def _valid_range(self) -> str:
        return "alphas_cumprod[-1] and 1 - alphas_cumprod[0] (= betas[0]) must be >= 1e-300"

    @classmethod
    def _as_1d(cls, v: Any, name: str) -> Tensor:
        if isinstance(v, Tensor) and v.is_complex():
            raise TypeError(f"{name} must be real, got {v.dtype}")
        try:
            out = torch.as_tensor(v, dtype=torch.float64).detach().cpu()
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be a 1-d tensor or sequence of numbers, got {type(v).__name__}") from err
        cls._check_1d(out, name)
        return out

    @staticmethod
    def _check_1d(v: Tensor, name: str) -> None:
        if v.ndim != 1 or v.numel() < 1:
            raise ValueError(f"{name} must be a non-empty 1-d sequence, got shape {list(v.shape)}")
        if not bool(torch.isfinite(v).all()):
            i = int(torch.nonzero(~torch.isfinite(v)).flatten()[0])
            raise ValueError(f"{name} must be finite; {name}[{i}]={float(v[i])}")

    @property
    def knots(self) -> Tensor:
        r"""The interior knots :math:`k/N`, :math:`k = 1, \dots, N-1` (float64), where
        :math:`f` and :math:`g` jump."""
        return self._t_knots[1:-1].clone()

    def _segment(self, t: Tensor) -> Tensor:
        # compared with the knot values themselves (not floor(N t), which can put the float64
        # just below a knot on the knot's own segment): t in [t_k, t_{k+1}) -> segment k
        k = torch.searchsorted(self._t_knots.to(device=t.device, dtype=t.dtype), t.contiguous(), right=True) - 1
        return k.clamp(0, self.num_steps - 1)

    def _log_alpha(self, t: Tensor) -> Tensor:
        k = self._segment(t)
        knots, slopes, tk = (v.to(t.device) for v in (self._la_knots, self._slopes, self._t_knots))
        return knots[k] + slopes[k] * (t - tk[k])

    def _f(self, t: Tensor) -> Tensor:
        return self._slopes.to(t.device)[self._segment(t)]

    def _t_of_log_snr(self, lam: Tensor) -> Tensor:
        la = self._log_alpha_of_log_snr(lam)
        knots, slopes, tk = (v.to(lam.device) for v in (self._la_knots, self._slopes, self._t_knots))
        # knots decrease; searchsorted on the increasing -knots
        k = torch.searchsorted(-knots, -la.contiguous(), right=False) - 1
        k = k.clamp(0, self.num_steps - 1)
        return tk[k] + (la - knots[k]) / slopes[k]

    def config(self) -> dict:
        return {"class": "DiscreteVPSDE", "alphas_cumprod": self.alphas_cumprod.tolist()}

    def __repr__(self) -> str:
        # config() holds all N values (for serialisation); the repr stays one short line
        ac = self.alphas_cumprod
        return (f"DiscreteVPSDE(num_steps={self.num_steps}, alphas_cumprod=[{float(ac[0]):.6g}, ..., "
                f"{float(ac[-1]):.6g}])")


# --------------------------------------------------------------------------- VE family
class VESDE(LinearSDE):
    r"""Variance-exploding SDE (Song et al. 2021): :math:`\alpha = 1`,
    :math:`\sigma(t) = \sigma_{min}(\sigma_{max}/\sigma_{min})^t`, :math:`f = 0`,
    :math:`g^2 = 2\sigma^2\log(\sigma_{max}/\sigma_{min})`.

    As in score_sde, :math:`\sigma(0) = \sigma_{min} > 0`: the t = 0 marginal is the data
    convolved with :math:`\mathcal N(0,\sigma_{min}^2 I)`.  ``T = 1``, prior
    :math:`\mathcal N(0, \sigma_{max}^2 I)`, default ``t_end = 1e-5``.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        self.sigma_min = check_positive_float(sigma_min, "sigma_min")
        self.sigma_max = check_positive_float(sigma_max, "sigma_max")
        if self.sigma_min >= self.sigma_max:
            raise ValueError(
                f"sigma_min must be < sigma_max, got sigma_min={self.sigma_min}, sigma_max={self.sigma_max}"
            )
        self.T = 1.0
        self.default_t_end = 1e-5
        self.prior_std = self.sigma_max
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)
        self._check_schedule()

    def _valid_range(self) -> str:
        return "sigma_min and sigma_max must be in [1e-150, 1e150]"

    def _log_alpha(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def _log_sigma(self, t: Tensor) -> Tensor:
        return math.log(self.sigma_min) + t * self._log_ratio

    def _f(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def _g2(self, t: Tensor) -> Tensor:
        return 2.0 * self._log_ratio * torch.exp(2.0 * self._log_sigma(t))

    def _t_of_log_snr(self, lam: Tensor) -> Tensor:
        return (-0.5 * lam - math.log(self.sigma_min)) / self._log_ratio

    def config(self) -> dict:
        return {"class": "VESDE", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


class EDMSDE(LinearSDE):
    r"""The EDM process (Karras et al. 2022): :math:`\alpha = 1`, :math:`\sigma(t) = t`,
    :math:`f = 0`, :math:`g^2 = 2t`.  Time *is* the noise level: ``T = sigma_max``, prior
    :math:`\mathcal N(0, \sigma_{max}^2 I)`, default ``t_end = sigma_min``.
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        self.sigma_min = check_positive_float(sigma_min, "sigma_min")
        self.sigma_max = check_positive_float(sigma_max, "sigma_max")
        if self.sigma_min >= self.sigma_max:
            raise ValueError(
                f"sigma_min must be < sigma_max, got sigma_min={self.sigma_min}, sigma_max={self.sigma_max}"
            )
        self.T = self.sigma_max
        self.default_t_end = self.sigma_min
        self.prior_std = self.sigma_max
        self._check_schedule()

    def _valid_range(self) -> str:
        return "sigma_min and sigma_max must be in [1e-150, 1e150]"

    def _log_alpha(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def _log_sigma(self, t: Tensor) -> Tensor:
        return torch.log(t)

    def _f(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def _g2(self, t: Tensor) -> Tensor:
        return 2.0 * t

    def _t_of_log_snr(self, lam: Tensor) -> Tensor:
        return torch.exp(-0.5 * lam)

    def config(self) -> dict:
        return {"class": "EDMSDE", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


class RectifiedFlowSDE(LinearSDE):
    r"""Rectified flow / flow matching (Liu et al. 2022; Lipman et al. 2022):
    :math:`\alpha = 1-t`, :math:`\sigma = t`, :math:`f = -1/(1-t)`,
    :math:`g^2 = 2t + 2t^2/(1-t) = 2t/(1-t)`.

    At t = 1, :math:`\alpha = 0` and the log-SNR is :math:`-\infty`, which the log-SNR
    solvers and the eps/x0 conversions cannot use; the default ``T = 0.999`` (the t = T
    marginal then differs from the :math:`\mathcal N(0,I)` prior by :math:`\alpha(T)=10^{-3}`, less
    than the linear VP's :math:`6.7\cdot10^{-3}`).  Default ``t_end = 1e-3``.
    """

    def __init__(self, T: float = 0.999):
        self.T = check_float(T, "T", low=0.0, high=1.0, low_open=True, high_open=True)
        self.default_t_end = 1e-3
        self._check_schedule()

    def _valid_range(self) -> str:
        return f"T must be in [{self.default_t_end:g}, 1)"

    def _log_alpha(self, t: Tensor) -> Tensor:
        return torch.log1p(-t)

    def _log_sigma(self, t: Tensor) -> Tensor:
        return torch.log(t)

    def _f(self, t: Tensor) -> Tensor:
        return -1.0 / (1.0 - t)

    def _g2(self, t: Tensor) -> Tensor:
        return 2.0 * t / (1.0 - t)

    def _t_of_log_snr(self, lam: Tensor) -> Tensor:
        # alpha/sigma = (1-t)/t = e^{lam/2}  =>  t = sigmoid(-lam/2)
        return torch.sigmoid(-0.5 * lam)

    def config(self) -> dict:
        return {"class": "RectifiedFlowSDE", "T": self.T}


# --------------------------------------------------------------------------- registry
#: The built-in SDE classes by class name: the names their ``config()`` records and the only
#: ones a checkpoint config may name (a checkpoint never names code to import).
SDE_CLASSES: dict[str, type[LinearSDE]] = {
    cls.__name__: cls
    for cls in (VPSDE, SubVPSDE, VESDE, CosineVPSDE, EDMSDE, RectifiedFlowSDE, DiscreteVPSDE)
}

#: Short names of the built-in SDEs (the command line's ``--sde``, the validation suite's keys).
SDE_SHORT_NAMES: dict[str, type[LinearSDE]] = {
    "vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE, "cosine": CosineVPSDE, "edm": EDMSDE,
    "rf": RectifiedFlowSDE, "discrete": DiscreteVPSDE,
}


def sde_class(name: str) -> type[LinearSDE]:
    """The built-in SDE class called ``name``: a short name (``"vp"``, ``"subvp"``, ``"ve"``,
    ``"cosine"``, ``"edm"``, ``"rf"``, ``"discrete"``) or a class name (``"VPSDE"``, ...)."""
    cls = SDE_SHORT_NAMES.get(name) if isinstance(name, str) else None
    if cls is None and isinstance(name, str):
        cls = SDE_CLASSES.get(name)
    if cls is None:
        known = ", ".join([*SDE_SHORT_NAMES, *SDE_CLASSES])
        raise ValueError(f"sde name must be one of {known}; got {name!r}")
    return cls


def make_sde(name: str, **params: Any) -> LinearSDE:
    """A fresh built-in SDE: ``sde_class(name)(**params)``.

    With no ``params`` every class takes its constructor defaults, and ``DiscreteVPSDE`` (which
    has none) takes DDPM's linear schedule, ``betas = linspace(1e-4, 0.02, 1000)`` in float64
    (Ho et al., 2020)."""
    cls = sde_class(name)
    if not params and cls is DiscreteVPSDE:
        params = {"betas": torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)}
    return cls(**params)
