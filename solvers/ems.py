r"""Empirical model statistics (EMS) of DPM-Solver-v3 and their estimation from data.

Zheng, Lu, Bao & Zhu 2023, "DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical Model
Statistics" (NeurIPS), Sec. 3.1-3.2.  In :math:`\lambda = \log(\alpha/\sigma)` the
probability-flow ODE :math:`dx/d\lambda = (\dot\alpha/\alpha)x - \sigma\hat\epsilon` is rewritten
with three per-dimension statistics :math:`l_\lambda, s_\lambda, b_\lambda`:

- :math:`l_\lambda = \arg\min_l E\|\nabla_x N\|_F^2` with :math:`N = \sigma\hat\epsilon - l x`,
  i.e. :math:`l = E[\operatorname{diag}\nabla_x(\sigma\hat\epsilon)]` (the expected Jacobian
  diagonal; exact with one JVP per dimension, or Hutchinson's estimate
  :math:`E[v\odot J v]` with Rademacher probes);
- :math:`f = N/\alpha = e^{-\lambda}\hat\epsilon - l\,x/\alpha` and its derivative along the
  ODE :math:`f^{(1)} = e^{-\lambda}(\tfrac{d\hat\epsilon}{d\lambda} - \hat\epsilon) - l' x/\alpha
  + l e^{-\lambda}\hat\epsilon`; :math:`s, b = \arg\min E\|f^{(1)} - s f - b\|^2` per dimension:
  :math:`s = \mathrm{Cov}(f^{(1)}, f)/\mathrm{Var}(f)`, :math:`b = E f^{(1)} - s E f`.

:math:`d\hat\epsilon/d\lambda` is one JVP of the model in :math:`(x, t)` with tangent
:math:`(dx/d\lambda, dt/d\lambda)`; :math:`l'` is a second-order finite difference of l on
the grid.  The statistics live on a uniform grid in :math:`\lambda` and are read between
grid points by cubic-spline interpolation (:mod:`solvers.dpm_v3`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from scoresde.model import ScoreModel
from scoresde.sde import LinearSDE

__all__ = ["EMS", "ems_statistics"]

F64 = torch.float64


@dataclass(frozen=True, eq=False)
class EMS:
    """Statistics on an increasing log-SNR grid: ``lam`` [N+1] (:math:`\\lambda`, half the
    log-SNR), ``l, s, b`` [N+1, *shape] (float64; ``shape`` a sample's shape, or () for
    statistics shared by every dimension).  ``nfe``: network calls spent estimating them
    (JVPs counted); ``n_samples``: data samples used."""

    lam: Tensor
    l: Tensor  # noqa: E741  (the paper's name)
    s: Tensor
    b: Tensor
    nfe: int = 0
    n_samples: int = 0

    def __post_init__(self) -> None:
        lam = self.lam
        if not isinstance(lam, Tensor) or lam.ndim != 1 or lam.numel() < 2:
            raise ValueError(f"stats.lam must be a 1-D tensor of >= 2 log-SNR values, got {lam!r}")
        if not bool((lam[1:] > lam[:-1]).all()) or not bool(torch.isfinite(lam).all()):
            raise ValueError("stats.lam must be finite and strictly increasing")
        for name in ("l", "s", "b"):
            v = getattr(self, name)
            if not isinstance(v, Tensor) or v.shape[:1] != lam.shape or v.shape != self.l.shape:
                raise ValueError(f"stats.{name} must be a tensor of shape [{lam.numel()}, *shape] like stats.l, "
                                 f"got {getattr(v, 'shape', type(v).__name__)}")
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"stats.{name} has non-finite values")

    @property
    def shape(self) -> tuple[int, ...]:
        """The per-sample shape the statistics apply to (() = shared by all dimensions)."""
        return tuple(self.l.shape[1:])

    @classmethod
    def constant(cls, lam_min: float, lam_max: float, l: float = 1.0, s: float = 0.0,  # noqa: E741
                 shape: tuple = ()) -> "EMS":
        """Constant statistics on ``[lam_min, lam_max]``, b = 0: ``l = 1, s = 0`` interpolates
        :math:`f = -\\hat x_0` (DPM-Solver++, data prediction), ``l = 0, s = -1`` interpolates
        :math:`e^{\\lambda}f = \\hat\\epsilon` (DPM-Solver, noise prediction)."""
        lam = torch.tensor([float(lam_min), float(lam_max)], dtype=F64)
        z = torch.zeros(2, *shape, dtype=F64)
        return cls(lam, z + float(l), z + float(s), z.clone())

    def save(self, path: Any) -> None:
        torch.save({"lam": self.lam, "l": self.l, "s": self.s, "b": self.b,
                    "nfe": self.nfe, "n_samples": self.n_samples}, path)

    @classmethod
    def load(cls, path: Any) -> "EMS":
        d = torch.load(path, map_location="cpu", weights_only=True)
        return cls(d["lam"].to(F64), d["l"].to(F64), d["s"].to(F64), d["b"].to(F64),
                   int(d["nfe"]), int(d["n_samples"]))


# ------------------------------------------------------------------ estimation
def _lam_grid(sde: LinearSDE, t_start: float, t_end: float, grid_steps: int) -> tuple[Tensor, Tensor]:
    """(lam, t): ``grid_steps`` + 1 points uniform in lambda from t_start to t_end."""
    lam_ends = 0.5 * sde.coefficients(torch.tensor([t_start, t_end], dtype=F64))["log_snr"]
    lam = torch.linspace(float(lam_ends[0]), float(lam_ends[1]), grid_steps + 1, dtype=F64)
    t = sde.t_of_log_snr_unchecked(2.0 * lam).clamp(0.0, sde.T)
    t[0], t[-1] = t_start, t_end
    return 0.5 * sde.coefficients(t)["log_snr"], t


def _jvp(fn, primals: tuple, tangents: tuple) -> tuple[Tensor, Tensor]:
    """(fn(*primals), its directional derivative along ``tangents``) by forward-mode AD."""
    with fwAD.dual_level():
        out = fn(*(fwAD.make_dual(p, v) for p, v in zip(primals, tangents)))
        value, deriv = fwAD.unpack_dual(out)
    return value, (torch.zeros_like(value) if deriv is None else deriv)


def _jacobian_diag(eps_fn, x: Tensor, t: Tensor, probes: int | None, generator) -> tuple[Tensor, Tensor]:
    """(eps, diag of d eps/dx) per sample: exact (one JVP per dimension) or Hutchinson."""
    flat = x.reshape(x.shape[0], -1)
    d = flat.shape[1]
    zero_t = torch.zeros_like(t)
    diag = torch.zeros_like(flat)
    eps = None
    n = d if probes is None else probes
    for j in range(n):
        if probes is None:
            v = torch.zeros_like(flat)
            v[:, j] = 1.0
        else:
            v = torch.randint(0, 2, flat.shape, generator=generator, dtype=F64).to(x) * 2.0 - 1.0
        eps, jv = _jvp(eps_fn, (x, t), (v.reshape(x.shape), zero_t))
        diag += (v * jv.reshape(flat.shape)) / (1.0 if probes is None else probes)
    return eps, diag.reshape(x.shape)


def ems_statistics(model: ScoreModel, x0: Tensor, *, grid_steps: int = 240, t_start: float | None = None,
                   t_end: float | None = None, probes: int | None = None,
                   generator: torch.Generator | None = None) -> EMS:
    r"""Estimate :math:`l, s, b` (module docstring) on ``grid_steps`` + 1 points uniform in
    :math:`\lambda` between ``t_start`` (default T) and ``t_end`` (default ``sde.default_t_end``),
    from data samples ``x0`` [n, ...] noised to each grid time (fresh noise from ``generator``).

    ``probes``: None = exact Jacobian diagonal (one JVP per dimension), else that many
    Rademacher probes.  Cost: (dims or probes) + 1 network calls per grid point, each JVP
    counted as one call (recorded in ``EMS.nfe``).  The network must support forward-mode
    AD (``torch.autograd.forward_ad``) in x and t."""
    if not isinstance(model, ScoreModel) or not isinstance(model.sde, LinearSDE):
        raise TypeError("model must be a scoresde.ScoreModel of a LinearSDE")
    if not isinstance(x0, Tensor) or x0.ndim < 2 or x0.shape[0] < 2:
        raise ValueError(f"x0 must be a tensor [n >= 2, ...] of data samples, got {getattr(x0, 'shape', x0)!r}")
    if isinstance(grid_steps, bool) or not isinstance(grid_steps, int) or grid_steps < 2:
        raise ValueError(f"grid_steps must be an int >= 2, got {grid_steps!r}")
    if probes is not None and (isinstance(probes, bool) or not isinstance(probes, int) or probes < 1):
        raise ValueError(f"probes must be None or an int >= 1, got {probes!r}")
    sde = model.sde
    t_start = sde.T if t_start is None else float(t_start)
    t_end = sde.default_t_end if t_end is None else float(t_end)
    if not 0.0 < t_end < t_start <= sde.T:
        raise ValueError(f"need 0 < t_end < t_start <= T, got t_end={t_end}, t_start={t_start}")
    lam, t = _lam_grid(sde, t_start, t_end, grid_steps)
    c = sde.coefficients(t)
    x0 = x0.to(F64)
    n, nfe0 = x0.shape[0], model.nfe
    l_pts, moments = [], []

    def eps_fn(x, tv):
        return model.evaluate(x, tv, validate=False).eps

    with torch.no_grad():
        for k in range(lam.numel()):
            a, s, lk = float(c["alpha"][k]), float(c["sigma"][k]), float(lam[k])
            dlam_dt = -float(c["g2"][k]) / (2.0 * s * s)
            dlogalpha_dlam = float(c["f"][k]) / dlam_dt
            z = torch.randn(x0.shape, generator=generator, dtype=F64)
            x = a * x0 + s * z
            tv = t[k].expand(n).clone()
            eps, diag = _jacobian_diag(eps_fn, x, tv, probes, generator)
            dx = dlogalpha_dlam * x - s * eps
            _, deps = _jvp(eps_fn, (x, tv), (dx, torch.full_like(tv, 1.0 / dlam_dt)))
            l_pts.append(s * diag.mean(0))
            e = torch.exp(torch.tensor(-lk, dtype=F64))
            # per sample: A = e^-lam eps, B = x/alpha, C = e^-lam (deps/dlam - eps)
            moments.append(torch.stack([e * eps, x / a, e * (deps - eps)], 1))   # [n, 3, ...]
    l_all = torch.stack(l_pts)
    dl = torch.gradient(l_all, spacing=(lam,), dim=0, edge_order=2)[0]
    s_all, b_all = [], []
    for k, m in enumerate(moments):
        A, B, C = m[:, 0], m[:, 1], m[:, 2]
        f = A - l_all[k] * B
        f1 = C - dl[k] * B + l_all[k] * A
        fc = f - f.mean(0)
        var = fc.pow(2).mean(0)
        cov = (fc * (f1 - f1.mean(0))).mean(0)
        sk = torch.where(var > 1e-300, cov / var.clamp_min(1e-300), torch.zeros_like(var))
        s_all.append(sk)
        b_all.append(f1.mean(0) - sk * f.mean(0))
    return EMS(lam, l_all, torch.stack(s_all), torch.stack(b_all), model.nfe - nfe0, n)
