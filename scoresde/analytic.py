r"""Exact data distributions: Gaussians and Gaussian mixtures.

Under a :class:`~scoresde.sde.LinearSDE` the marginal of a Gaussian component
:math:`\mathcal N(\mu, C)` at time t is :math:`\mathcal N(\alpha_t\mu,\ \alpha_t^2 C + \sigma_t^2 I)`.
Each covariance is diagonalised once, :math:`C = U\,\mathrm{diag}(\lambda)\,U^\top` (float64
``eigh``; diagonal and scalar covariances skip it), so every marginal shares the
eigenvectors and has variances :math:`v_k(t) = \alpha_t^2\lambda_k + \sigma_t^2`.  Scores,
densities and the probability-flow map are then exact, cheap for per-sample times, and
free of explicit inverses; mixtures combine components with log-sum-exp.

Cost per evaluation: :math:`O(B K d)` for diagonal/scalar covariances, :math:`O(B K d^2)` for
full ones.  Everything is computed in float64 and returned in the caller's dtype.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._checks import append_dims, check_floating, check_int, time_vector
from .model import Prediction, ScoreModel, to_prediction, _coefficients
from .sde import LinearSDE

__all__ = ["Gaussian", "GaussianMixture"]

_LOG_2PI = math.log(2.0 * math.pi)
_CHUNK_ELEMENTS = 2 ** 25  # bound on B*K*d float64 temporaries per chunk


def _as64(v: Any, name: str) -> Tensor:
    if isinstance(v, Tensor):
        if v.is_complex():
            raise TypeError(f"{name} must be real, got {v.dtype}")
        out = v.detach().to(device="cpu", dtype=torch.float64)
    else:
        try:
            out = torch.as_tensor(v, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be a tensor or array of numbers, got {type(v).__name__}") from err
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{name} must be finite")
    return out


def _check_sde(sde: Any) -> LinearSDE:
    if not isinstance(sde, LinearSDE):
        raise TypeError(f"sde must be a LinearSDE (exact marginals need alpha, sigma); got {type(sde).__name__}")
    return sde


class _GaussianFamily:
    """K weighted Gaussian components sharing the eigen-representation described above.

    Internal state (float64, CPU until first use on a device):
    ``log_w`` [K], ``means`` [K, d], ``lam`` [K, d] (eigenvalues), ``U`` [K, d, d] or None
    (diagonal), ``_dtype`` (the default output dtype).
    """

    log_w: Tensor
    means: Tensor
    lam: Tensor
    U: Tensor | None

    # ------------------------------------------------------------ construction
    @staticmethod
    def _eig(cov: Tensor, name: str) -> tuple[Tensor, Tensor]:
        if not bool(torch.allclose(cov, cov.transpose(-1, -2), rtol=1e-10, atol=1e-12)):
            raise ValueError(f"{name} must be symmetric")
        cov = 0.5 * (cov + cov.transpose(-1, -2))
        lam, U = torch.linalg.eigh(cov)
        scale = lam.abs().amax(dim=-1, keepdim=True).clamp(min=1e-300)
        if bool((lam < -1e-12 * scale).any()):
            raise ValueError(f"{name} must be positive semi-definite; smallest eigenvalue {float(lam.min()):.3g}")
        return lam.clamp(min=0.0), U

    def _init_components(self, log_w: Tensor, means: Tensor, lam: Tensor, U: Tensor | None, dtype) -> None:
        self.log_w, self.means, self.lam, self.U = log_w, means, lam, U
        self._dtype = dtype
        self._dev_cache: dict = {}

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        key = str(device)
        if key not in self._dev_cache:
            mv = lambda v: None if v is None else v.to(device)  # noqa: E731
            self._dev_cache[key] = (mv(self.log_w), mv(self.means), mv(self.lam), mv(self.U))
        return self._dev_cache[key]

    @property
    def dim(self) -> int:
        return int(self.means.shape[-1])

    @property
    def num_components(self) -> int:
        return int(self.means.shape[0])

    def _new(self, log_w, means, lam, U):
        obj = object.__new__(type(self))
        obj._init_components(log_w, means, lam, U, self._dtype)
        return obj

    # ------------------------------------------------------------------ checks
    def _check_x(self, x: Any, name: str = "x") -> Tensor:
        check_floating(x, name)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{name} must have shape [B, {self.dim}], got {list(x.shape)}")
        return x

    # ------------------------------------------------------------- core math
    def _eigen_coords(self, diff: Tensor, U: Tensor | None) -> Tensor:
        # diff [B, K, d] -> coordinates in each component's eigenbasis
        return diff if U is None else torch.einsum("kij,bki->bkj", U, diff)

    def _from_eigen(self, y: Tensor, U: Tensor | None) -> Tensor:
        return y if U is None else torch.einsum("kij,bkj->bki", U, y)

    def _terms(self, x64: Tensor, a: Tensor, s2: Tensor, want_score: bool):
        """log p(x) [B] and (optionally) the score [B, d] of the family scaled by a [B],
        with added isotropic variance s2 [B]."""
        log_w, means, lam, U = self._on(x64.device)
        v = a[:, None, None] ** 2 * lam[None] + s2[:, None, None]                # [B, K, d]
        diff = x64[:, None, :] - a[:, None, None] * means[None]                  # [B, K, d]
        y = self._eigen_coords(diff, U)
        quad = (y * y / v).sum(-1)                                               # [B, K]
        logdet = torch.log(v).sum(-1)
        comp = log_w[None] - 0.5 * (quad + logdet + self.dim * _LOG_2PI)        # [B, K]
        logp = torch.logsumexp(comp, dim=1)
        if not want_score:
            return logp, None
        r = torch.softmax(comp, dim=1)                                           # [B, K]
        score = -(self._from_eigen(r[:, :, None] * y / v, U)).sum(1)
        return logp, score

    def _chunked(self, x64: Tensor, a: Tensor, s2: Tensor, want_score: bool):
        per_row = max(1, self.num_components * self.dim * (self.dim if self.U is not None else 1))
        step = max(1, _CHUNK_ELEMENTS // per_row)
        if x64.shape[0] <= step:
            return self._terms(x64, a, s2, want_score)
        parts = [self._terms(x64[i:i + step], a[i:i + step], s2[i:i + step], want_score)
                 for i in range(0, x64.shape[0], step)]
        logp = torch.cat([p[0] for p in parts])
        score = torch.cat([p[1] for p in parts]) if want_score else None
        return logp, score

    def _schedule(self, sde: LinearSDE, t: Any, batch: int, device) -> tuple[Tensor, Tensor]:
        t64 = _check_sde(sde).check_time(t, batch=batch).to(device)
        return torch.exp(sde._log_alpha(t64)), torch.exp(2.0 * sde._log_sigma(t64))

    # --------------------------------------------------------------- public
    def log_prob(self, x: Tensor) -> Tensor:
        """Log-density of the data distribution at ``x`` ([B, d]): shape ``[B]``."""
        self._check_x(x)
        if bool((self.lam <= 0).any()):
            raise ValueError("log_prob is undefined for a singular covariance (an eigenvalue is 0); "
                             "use marginal(sde, t) with sigma(t) > 0")
        x64 = x.to(torch.float64)
        b = x64.shape[0]
        one = torch.ones(b, dtype=torch.float64, device=x.device)
        logp, _ = self._chunked(x64, one, torch.zeros_like(one), False)
        return logp.to(x.dtype)

    def _score64(self, x: Tensor, t: Any, sde: LinearSDE) -> tuple[Tensor, Tensor, Tensor]:
        """(score, alpha, sigma^2) in float64, alpha and sigma^2 shaped ``[B, 1]``."""
        self._check_x(x)
        a, s2 = self._schedule(sde, t, x.shape[0], x.device)
        _, score = self._chunked(x.to(torch.float64), a, s2, True)
        return score, a[:, None], s2[:, None]

    def score(self, x: Tensor, t: Any, sde: LinearSDE) -> Tensor:
        r"""Exact :math:`\nabla_x\log p_t(x)` under ``sde``; ``t`` a float, 0-d or ``[B]``."""
        return self._score64(x, t, sde)[0].to(x.dtype)

    def marginal_log_prob(self, x: Tensor, t: Any, sde: LinearSDE) -> Tensor:
        r""":math:`\log p_t(x)` (per-sample t allowed), shape ``[B]``."""
        self._check_x(x)
        a, s2 = self._schedule(sde, t, x.shape[0], x.device)
        logp, _ = self._chunked(x.to(torch.float64), a, s2, False)
        return logp.to(x.dtype)

    def eps(self, x: Tensor, t: Any, sde: LinearSDE) -> Tensor:
        r"""Exact :math:`E[\epsilon \mid x_t = x] = -\sigma_t\nabla\log p_t(x)`."""
        score, _, s2 = self._score64(x, t, sde)
        return (-torch.sqrt(s2) * score).to(x.dtype)

    def x0(self, x: Tensor, t: Any, sde: LinearSDE) -> Tensor:
        r"""Exact :math:`E[x_0 \mid x_t = x] = (x + \sigma_t^2\nabla\log p_t(x))/\alpha_t` (Tweedie).

        Computed in float64 throughout (the sum cancels when :math:`\sigma_t` is large),
        then cast to ``x.dtype``."""
        score, a, s2 = self._score64(x, t, sde)
        return ((x.to(torch.float64) + s2 * score) / a).to(x.dtype)

    def marginal(self, sde: LinearSDE, t: Any):
        r"""The distribution of :math:`x_t` (same type): means :math:`\alpha_t\mu_k`,
        covariances :math:`\alpha_t^2 C_k + \sigma_t^2 I`.  ``t``: one time (float or 0-d)."""
        t64 = _check_sde(sde).check_time(t)
        if t64.ndim != 0:
            raise ValueError(f"t must be a single time (float or 0-d tensor) for marginal, got shape {list(t64.shape)}")
        a = float(torch.exp(sde._log_alpha(t64)))
        s2 = float(torch.exp(2.0 * sde._log_sigma(t64)))
        return self._new(self.log_w, a * self.means, a * a * self.lam + s2, self.U)

    def sample(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
               device: Any = None) -> Tensor:
        """``n`` exact samples, shape ``[n, d]`` (component, then Gaussian noise, both from ``generator``)."""
        n = check_int(n, "n", minimum=0)
        dtype = dtype or self._dtype
        gen_device = generator.device if generator is not None else torch.device("cpu")
        log_w, means, lam, U = self._on(gen_device)
        if self.num_components == 1:
            k = torch.zeros(n, dtype=torch.long, device=gen_device)
        else:
            k = torch.multinomial(torch.exp(log_w), n, replacement=True, generator=generator) if n else \
                torch.zeros(0, dtype=torch.long, device=gen_device)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64, device=gen_device)
        y = torch.sqrt(lam[k]) * z
        x = means[k] + (y if U is None else torch.einsum("bij,bj->bi", U[k], y))
        return x.to(dtype=dtype, device=device if device is not None else gen_device)

    def as_model(self, sde: LinearSDE, prediction: Prediction | str = "eps", **model_kwargs) -> ScoreModel:
        """A :class:`ScoreModel` whose network returns the exact ``prediction`` for this
        distribution under ``sde`` (each call counted as one NFE).  ``model_kwargs`` go to
        :class:`ScoreModel` (``sigma_data``, ``time_input``, ...); the exact network inverts
        the time input and, for ``"edm"``, the ``c_in`` scaling to recover x and t."""
        net = _ExactNet(self, _check_sde(sde), Prediction.parse(prediction), 0.5)
        model = ScoreModel(net, sde, prediction, **model_kwargs)
        if callable(model.time_input):
            raise ValueError("time_input of an exact model must be one of 't', 'discrete', 'c_noise', "
                             "'log_snr', 'sigma' (the exact net has to recover t from it); got a function")
        net.time_input, net.sigma_data = model.time_input, model.sigma_data
        return model


class _ExactNet:
    r"""net(x_in, t_in) returning the exact prediction of a Gaussian family.

    It inverts what :class:`ScoreModel` feeds a network: the time input (``"t"``,
    ``"discrete"``, ``"c_noise"``, ``"log_snr"`` or ``"sigma"``; set by :meth:`as_model`
    from the model it builds) and, for ``"edm"``, the scaled input :math:`c_{in}\hat x`."""

    def __init__(self, target: _GaussianFamily, sde: LinearSDE, prediction: Prediction, sigma_data: float):
        self.target, self.sde, self.prediction, self.sigma_data = target, sde, prediction, sigma_data
        self.time_input = "t"

    def _decode_time(self, t_in: Tensor) -> tuple[Tensor, Tensor | None]:
        """(t, log-SNR or None) from the network's time input, float64."""
        sde, ti, v = self.sde, self.time_input, t_in.to(torch.float64)
        if ti == "t":
            return v.clamp(0.0, sde.T), None
        if ti == "discrete":
            return ((v + 1.0) / sde.num_steps).clamp(0.0, sde.T), None
        if ti == "log_snr":
            lam = v
        elif ti == "sigma":
            lam = -2.0 * torch.log(v)
        else:                                                             # c_noise = -lam/8
            lam = -8.0 * v
        return sde._t_of_log_snr(lam).clamp(0.0, sde.T), lam

    def __call__(self, x_in: Tensor, t_in: Tensor) -> Tensor:
        sde = self.sde
        t64, lam = self._decode_time(t_in)
        x = x_in.to(torch.float64)
        if self.prediction is Prediction.EDM:
            a = torch.exp(sde._log_alpha(t64))
            sh = torch.exp(-0.5 * lam) if lam is not None else torch.exp(sde._log_sigma(t64)) / a
            x = x * append_dims(torch.sqrt(sh * sh + self.sigma_data ** 2) * a, x.ndim)
        a64, s2 = torch.exp(sde._log_alpha(t64)), torch.exp(2.0 * sde._log_sigma(t64))
        _, score = self.target._chunked(x, a64, s2, True)
        c = _coefficients(sde, t64, x, self.prediction is Prediction.FLOW)
        eps = -c.sigma * score
        x0 = (x - c.sigma * eps) / c.alpha
        return to_prediction(self.prediction, x, x0, eps, c, self.sigma_data).to(x_in.dtype)


def _parse_cov(cov: Any, d: int, name: str, batch: int | None = None):
    """cov as (lam, U): scalar -> isotropic, [d] diagonal, [d, d] full (with leading K if batch)."""
    c = _as64(cov, name)
    lead = () if batch is None else (batch,)
    if c.shape == lead:                                        # scalar per component
        if bool((c < 0).any()):
            raise ValueError(f"{name} must be >= 0 (a variance), got {c.min().item()}")
        return c.reshape(lead + (1,)).expand(lead + (d,)).clone(), None
    if c.shape == lead + (d,):                                 # diagonal
        if bool((c < 0).any()):
            raise ValueError(f"{name} (diagonal variances) must be >= 0; smallest {c.min().item():.3g}")
        return c.clone(), None
    if c.shape == lead + (d, d):
        return _GaussianFamily._eig(c, name)
    shapes = " or ".join(str(list(lead + s)) for s in [(), (d,), (d, d)])
    raise ValueError(f"{name} must have shape {shapes}, got {list(c.shape)}")


class Gaussian(_GaussianFamily):
    r"""The Gaussian :math:`\mathcal N(\mu, C)` in d dimensions.

    **Arguments:** ``mean`` (shape ``[d]``), ``cov``: a scalar variance, a ``[d]`` vector
    of variances (diagonal) or a ``[d, d]`` symmetric positive semi-definite matrix (a
    zero covariance gives a point mass, whose marginals at t > 0 are still Gaussian).

    Besides the mixture methods it has the exact probability-flow map :meth:`flow`.
    """

    def __init__(self, mean: Any, cov: Any = 1.0):
        mu = _as64(mean, "mean")
        if mu.ndim != 1 or mu.numel() < 1:
            raise ValueError(f"mean must have shape [d], got {list(mu.shape)}")
        lam, U = _parse_cov(cov, mu.numel(), "cov")
        dtype = mean.dtype if isinstance(mean, Tensor) and mean.is_floating_point() else torch.get_default_dtype()
        self._init_components(torch.zeros(1, dtype=torch.float64), mu[None], lam[None],
                              None if U is None else U[None], dtype)

    @property
    def mean(self) -> Tensor:
        return self.means[0].to(self._dtype)

    @property
    def cov(self) -> Tensor:
        lam = self.lam[0]
        if self.U is None:
            return torch.diag(lam).to(self._dtype)
        U = self.U[0]
        return ((U * lam) @ U.T).to(self._dtype)

    def flow(self, x: Tensor, t_from: Any, t_to: Any, sde: LinearSDE) -> Tensor:
        r"""Exact probability-flow map from ``t_from`` to ``t_to`` (either direction):

        .. math:: x_{t'} = \alpha_{t'}\mu + U\,\mathrm{diag}\!\big(s(t')/s(t)\big)\,U^\top (x_t - \alpha_t\mu),
                  \qquad s_k(t) = \sqrt{\alpha_t^2\lambda_k + \sigma_t^2}.

        Times: floats, 0-d or ``[B]`` tensors."""
        self._check_x(x)
        sde = _check_sde(sde)
        b = x.shape[0]
        t0 = sde.check_time(t_from, batch=b, name="t_from").to(x.device)
        t1 = sde.check_time(t_to, batch=b, name="t_to").to(x.device)
        _, means, lam, U = self._on(x.device)
        a0, a1 = torch.exp(sde._log_alpha(t0)), torch.exp(sde._log_alpha(t1))
        s0, s1 = torch.exp(2.0 * sde._log_sigma(t0)), torch.exp(2.0 * sde._log_sigma(t1))
        ratio = torch.sqrt((a1[:, None] ** 2 * lam[0] + s1[:, None]) / (a0[:, None] ** 2 * lam[0] + s0[:, None]))
        diff = x.to(torch.float64) - a0[:, None] * means[0]
        Ud = None if U is None else U[0]
        y = diff if Ud is None else diff @ Ud
        y = ratio * y
        out = a1[:, None] * means[0] + (y if Ud is None else y @ Ud.T)
        return out.to(x.dtype)

    def __repr__(self) -> str:
        return f"Gaussian(d={self.dim}, {'full' if self.U is not None else 'diagonal'} covariance)"


class GaussianMixture(_GaussianFamily):
    r"""A mixture :math:`\sum_k w_k\,\mathcal N(\mu_k, C_k)` of K Gaussians in d dimensions.

    **Arguments:** ``weights`` ``[K]`` (non-negative, summing to 1 within 1e-6; they are
    renormalised exactly), ``means`` ``[K, d]``, ``covs``: ``[K]`` scalar variances,
    ``[K, d]`` diagonal variances, or ``[K, d, d]`` full covariances.
    """

    def __init__(self, weights: Any, means: Any, covs: Any):
        w = _as64(weights, "weights")
        mu = _as64(means, "means")
        if mu.ndim != 2 or mu.shape[0] < 1 or mu.shape[1] < 1:
            raise ValueError(f"means must have shape [K, d], got {list(mu.shape)}")
        k, d = mu.shape
        if w.shape != (k,):
            raise ValueError(f"weights must have shape [K]=[{k}], got {list(w.shape)}")
        if bool((w < 0).any()):
            raise ValueError(f"weights must be >= 0, got min {float(w.min())}")
        if abs(float(w.sum()) - 1.0) > 1e-6:
            raise ValueError(f"weights must sum to 1, got {float(w.sum())}")
        lam, U = _parse_cov(covs, d, "covs", batch=k)
        dtype = means.dtype if isinstance(means, Tensor) and means.is_floating_point() else torch.get_default_dtype()
        self._init_components(torch.log(w / w.sum()), mu, lam, U, dtype)

    @property
    def weights(self) -> Tensor:
        return torch.exp(self.log_w).to(self._dtype)

    def __repr__(self) -> str:
        return (f"GaussianMixture(K={self.num_components}, d={self.dim}, "
                f"{'full' if self.U is not None else 'diagonal'} covariances)")
