r"""Denoising score matching with the weightings researchers compare.

With :math:`x_t = \alpha_t x_0 + \sigma_t\epsilon` every weighting below is one objective

.. math:: \mathcal L(\theta) = \int_{t_{min}}^{T} w(t)\;
          \mathbb E_{x_0,\epsilon}\,\big\|\hat y_\theta(x_t, t) - y\big\|^2\,dt,

a positive measure :math:`w(t)\,dt` on time and a *target space* :math:`y` (the quantity whose
squared error is weighted).  The network may predict anything (``eps``, ``x0``, ``v``,
``score``, ``edm``, ``flow``): :class:`~scoresde.model.ScoreModel` converts its output to the
target space, so every weighting works with every prediction type (and the exact model of a
Gaussian attains the analytic minimum whatever it predicts).

===============  ==========  ==========================================  ===================
weighting        target y    w(t)                                        default sampling
===============  ==========  ==========================================  ===================
``"eps"``        epsilon     1/(T - t_min)  (Ho et al. 2020, "simple")   uniform
``"sigma2"``     score       sigma^2/(T - t_min)  (Song et al. 2021,     uniform
                             lambda = sigma^2; equal to ``"eps"``)
``"likelihood"`` score       g(t)^2 / 2  (Song, Durkan, Murray & Ermon   log_snr (importance)
                             2021: the score-matching part of the NLL
                             bound, in nats)
``"snr"``        x0          1/(T - t_min) (= SNR-weighted eps-MSE)      uniform
``"min_snr"``    x0          min(SNR, gamma)/(T - t_min) (Hang et al.    uniform
                             2023, "Min-SNR weighting")
``"v"``          v           1/(T - t_min) (Salimans & Ho 2022)          uniform
``"edm"``        x0          lambda(s) p_train(t), lambda = (s^2 +        lognormal
                             sigma_d^2)/(s sigma_d)^2, s = sigma/alpha
                             (Karras et al. 2022)
===============  ==========  ==========================================  ===================

**Sampling of t** is only a variance-reduction device: a sample drawn from density
:math:`q(t)` is weighted by :math:`w(t)/q(t)`, so every sampler estimates the *same*
objective.

- ``"uniform"``: :math:`q = 1/(T-t_{min})`.
- ``"log_snr"``: :math:`\lambda = \log\mathrm{SNR}` uniform on :math:`[\lambda(T), \lambda(t_{min})]`,
  i.e. :math:`q(t) \propto g^2/\sigma^2 = -d\lambda/dt`.  This is the importance sampling of
  Song et al. 2021 for the likelihood weighting: there :math:`w/q = \tfrac12\sigma^2\Delta\lambda`
  and the loss is :math:`\tfrac12\Delta\lambda\,\|\hat\epsilon-\epsilon\|^2` (a constant weight, no
  :math:`1/t` spikes), the same expectation with a far smaller variance.
- ``"lognormal"``: EDM's :math:`\log s \sim \mathcal N(P_{mean}, P_{std}^2)`, truncated to the
  :math:`s` range of :math:`[t_{min}, T]` (exactly, by the inverse CDF).

**Reduction over dimensions.**  The squared error is averaged over the non-batch dimensions
(``dim_reduction="mean"``), except for ``"likelihood"``, which sums (``"sum"``) so that the
loss is the NLL bound's term in nats.  Override with ``dim_reduction``.

Randomness (t and epsilon) comes only from ``generator``; ``t=`` and ``noise=`` can also be
given explicitly (then the importance weight uses the configured sampler's density).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._checks import append_dims, check_float, check_floating, check_positive_float
from .model import ScoreModel
from .sde import LinearSDE

__all__ = ["DSMLoss", "dsm_loss", "WEIGHTINGS", "TIME_SAMPLINGS"]

WEIGHTINGS = ("eps", "sigma2", "likelihood", "snr", "min_snr", "v", "edm")
TIME_SAMPLINGS = ("uniform", "log_snr", "lognormal")
_TARGET = {"eps": "eps", "sigma2": "score", "likelihood": "score", "snr": "x0", "min_snr": "x0",
           "v": "v", "edm": "x0"}
_DEFAULT_SAMPLING = {"likelihood": "log_snr", "edm": "lognormal"}
_SQRT2 = math.sqrt(2.0)


def _ndtr(z: Tensor) -> Tensor:
    return 0.5 * torch.erfc(-z / _SQRT2)


def _ndtri(p: Tensor) -> Tensor:
    return _SQRT2 * torch.erfinv(2.0 * p - 1.0)


@dataclass(frozen=True)
class DSMLoss:
    r"""Denoising score matching with a weighting and a time sampler (module docstring).

    **Arguments** (all keyword, validated at construction):

    - ``weighting``: one of :data:`WEIGHTINGS`.
    - ``time_sampling``: one of :data:`TIME_SAMPLINGS`; ``None`` picks the weighting's
      natural one (``log_snr`` for ``likelihood``, ``lognormal`` for ``edm``, else uniform).
    - ``t_min``: lower end of the time integral; ``None`` = ``sde.default_t_end``.
    - ``gamma``: the min-SNR clip (5 in Hang et al.).
    - ``p_mean``, ``p_std``, ``sigma_data``: EDM's log-normal and data std (-1.2, 1.2, 0.5).
    - ``dim_reduction``: ``"mean"`` | ``"sum"`` over non-batch dims (``None``: ``"sum"`` for
      ``likelihood``, else ``"mean"``).

    Call ``loss(model, x0, generator=g)`` for the batch mean (a scalar to backpropagate) or
    :meth:`per_sample` for the ``[B]`` unbiased estimates.
    """

    weighting: str = "eps"
    time_sampling: str | None = None
    t_min: float | None = None
    gamma: float = 5.0
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = 0.5
    dim_reduction: str | None = None

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.time_sampling is not None and self.time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"time_sampling must be one of {TIME_SAMPLINGS} or None, got {self.time_sampling!r}")
        if self.t_min is not None:
            check_float(self.t_min, "t_min", low=0.0, low_open=True)
        check_positive_float(self.gamma, "gamma")
        check_float(self.p_mean, "p_mean")
        check_positive_float(self.p_std, "p_std")
        check_positive_float(self.sigma_data, "sigma_data")
        if self.dim_reduction not in (None, "mean", "sum"):
            raise ValueError(f"dim_reduction must be 'mean', 'sum' or None, got {self.dim_reduction!r}")

    # ---------------------------------------------------------------- pieces
    @property
    def sampling(self) -> str:
        return self.time_sampling or _DEFAULT_SAMPLING.get(self.weighting, "uniform")

    @property
    def target(self) -> str:
        """The space whose squared error is weighted: ``eps``, ``score``, ``x0`` or ``v``."""
        return _TARGET[self.weighting]

    def _range(self, sde: LinearSDE) -> tuple[float, float]:
        t_min = sde.default_t_end if self.t_min is None else float(self.t_min)
        if not 0.0 < t_min < sde.T:
            raise ValueError(f"t_min must be in (0, T)=(0, {sde.T:.6g}) for {type(sde).__name__}, got {t_min}")
        return t_min, float(sde.T)

    def _lam_range(self, sde: LinearSDE) -> tuple[float, float]:
        t_min, T = self._range(sde)
        lam = sde._log_snr(torch.tensor([T, t_min], dtype=torch.float64))
        return float(lam[0]), float(lam[1])       # lambda(T) < lambda(t_min)

    def _lognormal_bounds(self, sde: LinearSDE) -> tuple[float, float]:
        lo_lam, hi_lam = self._lam_range(sde)     # log s = -lambda/2 in [-hi/2, -lo/2]
        a = (-0.5 * hi_lam - self.p_mean) / self.p_std
        b = (-0.5 * lo_lam - self.p_mean) / self.p_std
        return a, b

    def sample_time(self, sde: LinearSDE, n: int, generator: torch.Generator | None = None,
                    device: Any = None) -> Tensor:
        """``n`` times (float64, ``[n]``) from the sampler's density on ``[t_min, T]``."""
        _check_sde(sde)
        t_min, T = self._range(sde)
        dev = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=dev)
        s = self.sampling
        if s == "uniform":
            t = t_min + (T - t_min) * u
        elif s == "log_snr":
            lo, hi = self._lam_range(sde)
            t = sde._t_of_log_snr(lo + (hi - lo) * u)
        else:
            a, b = self._lognormal_bounds(sde)
            pa, pb = _ndtr(torch.tensor(a, dtype=torch.float64)), _ndtr(torch.tensor(b, dtype=torch.float64))
            z = _ndtri((pa + (pb - pa) * u).clamp(1e-300, 1.0 - 1e-16))
            log_s = self.p_mean + self.p_std * z
            t = sde._t_of_log_snr(-2.0 * log_s)
        t = t.clamp(t_min, T)
        return t if device is None else t.to(device)

    def density(self, sde: LinearSDE, t: Tensor) -> Tensor:
        """The sampler's density :math:`q(t)` on ``[t_min, T]`` (float64, shaped like ``t``)."""
        t64 = t.to(torch.float64)
        t_min, T = self._range(sde)
        s = self.sampling
        if s == "uniform":
            return torch.full_like(t64, 1.0 / (T - t_min))
        rate = sde._g2(t64) / torch.exp(2.0 * sde._log_sigma(t64))       # -d lambda/dt
        if s == "log_snr":
            lo, hi = self._lam_range(sde)
            return rate / (hi - lo)
        a, b = self._lognormal_bounds(sde)
        z = (-0.5 * sde._log_snr(t64) - self.p_mean) / self.p_std
        mass = float(_ndtr(torch.tensor(b, dtype=torch.float64)) - _ndtr(torch.tensor(a, dtype=torch.float64)))
        phi = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        return phi / (self.p_std * mass) * 0.5 * rate                    # d log s/dt = rate/2

    def weight(self, sde: LinearSDE, t: Tensor) -> Tensor:
        """The objective's measure :math:`w(t)` (float64, shaped like ``t``)."""
        t64 = t.to(torch.float64)
        t_min, T = self._range(sde)
        c = sde.coefficients(t64)
        w = self.weighting
        if w in ("eps", "snr", "v"):
            return torch.full_like(t64, 1.0 / (T - t_min))
        if w == "sigma2":
            return c["sigma"] ** 2 / (T - t_min)
        if w == "likelihood":
            return 0.5 * c["g2"]
        if w == "min_snr":
            return torch.exp(c["log_snr"]).clamp(max=self.gamma) / (T - t_min)
        # edm: lambda(s) * p_train(t), p_train the truncated log-normal density in t
        s2 = torch.exp(-c["log_snr"])
        lam = (s2 + self.sigma_data ** 2) / (s2 * self.sigma_data ** 2)
        train = DSMLoss(weighting="edm", time_sampling="lognormal", t_min=self.t_min, p_mean=self.p_mean,
                        p_std=self.p_std, sigma_data=self.sigma_data)
        return lam * train.density(sde, t64)

    # ------------------------------------------------------------------ loss
    def per_sample(self, model: ScoreModel, x0: Tensor, generator: torch.Generator | None = None, *,
                   t: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
        """Unbiased estimates of the objective, one per sample: ``[B]``, differentiable in
        the network's parameters.  ``t`` (``[B]``) and ``noise`` (like ``x0``) override the
        draws from ``generator``."""
        if not isinstance(model, ScoreModel):
            raise TypeError(f"model must be a scoresde.ScoreModel, got {type(model).__name__}")
        sde = _check_sde(model.sde)
        check_floating(x0, "x0")
        if x0.ndim < 1:
            raise ValueError("x0 must have a batch dimension, got a 0-d tensor")
        b = x0.shape[0]
        if t is None:
            t64 = self.sample_time(sde, b, generator)
        else:
            t64 = sde.check_time(t, batch=b, name="t")
            t_min, T = self._range(sde)
            if b and (float(t64.min()) < t_min * (1 - 1e-12) or float(t64.max()) > T):
                raise ValueError(f"t must lie in [t_min, T]=[{t_min:.6g}, {T:.6g}]")
        t64 = t64.detach().cpu()
        ratio = (self.weight(sde, t64) / self.density(sde, t64)).to(dtype=x0.dtype, device=x0.device)
        if noise is None:
            dev = generator.device if generator is not None else x0.device
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=dev).to(x0.device)
        elif noise.shape != x0.shape:
            raise ValueError(f"noise must have x0's shape {list(x0.shape)}, got {list(noise.shape)}")
        c = sde.coefficients(t64)
        a = append_dims(c["alpha"].to(dtype=x0.dtype, device=x0.device), x0.ndim)
        s = append_dims(c["sigma"].to(dtype=x0.dtype, device=x0.device), x0.ndim)
        xt = a * x0 + s * noise
        with warnings.catch_warnings():   # training mode is what a loss expects (the warning is for sampling)
            warnings.filterwarnings("ignore", message="net is in training mode", category=RuntimeWarning)
            d = model.evaluate(xt, t64.to(x0.device))
        target = self.target
        if target == "eps":
            err = d.eps - noise
        elif target == "x0":
            err = d.x0 - x0
        elif target == "score":
            err = d.score + noise / s                 # target: grad log p(x_t | x0) = -eps/sigma
        else:
            r = torch.sqrt(a * a + s * s)
            err = (a * d.eps - s * d.x0) / r - (a * noise - s * x0) / r
        sq = err.reshape(b, -1).square()
        red = self.dim_reduction or ("sum" if self.weighting == "likelihood" else "mean")
        per = sq.sum(dim=1) if red == "sum" else sq.mean(dim=1)
        return ratio * per

    def __call__(self, model: ScoreModel, x0: Tensor, generator: torch.Generator | None = None, **kwargs) -> Tensor:
        """The batch mean of :meth:`per_sample` (a scalar)."""
        return self.per_sample(model, x0, generator, **kwargs).mean()


def _check_sde(sde: Any) -> LinearSDE:
    if not isinstance(sde, LinearSDE):
        raise TypeError(f"denoising score matching needs a LinearSDE (x_t = alpha x0 + sigma eps); "
                        f"got {type(sde).__name__}")
    return sde


def dsm_loss(model: ScoreModel, x0: Tensor, weighting: str = "eps", *, generator: torch.Generator | None = None,
             **options: Any) -> Tensor:
    """``DSMLoss(weighting=weighting, **options)(model, x0, generator)``: the batch mean."""
    return DSMLoss(weighting=weighting, **options)(model, x0, generator)
