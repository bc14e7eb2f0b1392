r"""Time grids for fixed-step solvers, built once per call in float64 on the CPU.

A grid is a strictly decreasing sequence :math:`t_0 = t_{start} > t_1 > \dots > t_N = t_{end}`
of ``steps + 1`` points (``steps`` = number of intervals).  Schedules:

- ``"uniform"``: uniform in t.
- ``"log_snr"``: uniform in the log-SNR :math:`\log(\alpha^2/\sigma^2)` (DPM-Solver's "logSNR"),
  i.e. uniform in :math:`\lambda = \log(\alpha/\sigma)`.
- ``"quadratic"``: :math:`t_i = t_{end} + (t_{start}-t_{end})(1 - i/N)^2`, dense near the data (DDIM).
- ``"karras"``: EDM's :math:`\rho`-spacing in :math:`\hat\sigma = \sigma/\alpha` (Karras et al. 2022, eq. 5),
  :math:`\hat\sigma_i = (\hat\sigma_{max}^{1/\rho} + \tfrac iN(\hat\sigma_{min}^{1/\rho}-\hat\sigma_{max}^{1/\rho}))^\rho`,
  mapped back to t through :math:`\lambda = -\log\hat\sigma`
  (log-SNR :math:`-2\log\hat\sigma`).

``"log_snr"`` and ``"karras"`` need a LinearSDE.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from scoresde._checks import check_float, check_int
from scoresde.sde import SDE, LinearSDE

__all__ = ["SCHEDULES", "TimeGrid", "make_grid", "check_timesteps", "match_t_end", "given_eps"]

SCHEDULES = ("uniform", "log_snr", "quadratic", "karras")


@dataclass(frozen=True)
class TimeGrid:
    """A decreasing float64 CPU grid ``t`` of ``steps + 1`` points and its schedule name."""

    t: Tensor
    schedule: str
    budget: int | None = None  # the ``steps`` the user asked for, when it differs in meaning (singlestep NFE budget)

    @property
    def steps(self) -> int:
        return int(self.t.numel()) - 1

    @property
    def t_start(self) -> float:
        return float(self.t[0])

    @property
    def t_end(self) -> float:
        return float(self.t[-1])


def check_timesteps(timesteps: Any, sde: SDE) -> Tensor:
    """Validate an explicit grid: 1-d, finite, strictly decreasing, inside ``[0, T]``.
    Lists, ints and half-precision tensors are converted to float64."""
    if isinstance(timesteps, Tensor):
        if timesteps.is_complex():
            raise TypeError("timesteps must be real")
        if timesteps.device.type == "meta":
            raise ValueError("timesteps is on the meta device, which holds no values; pass a CPU tensor or a list")
        t = timesteps.detach().to(device="cpu", dtype=torch.float64)
    elif isinstance(timesteps, (list, tuple)):
        try:
            t = torch.tensor([float(v) for v in timesteps], dtype=torch.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(f"timesteps must hold numbers, got {timesteps!r}") from err
    else:
        raise TypeError(f"timesteps must be a 1-D tensor or a list, got {type(timesteps).__name__}")
    if t.ndim != 1:
        raise ValueError(f"timesteps must be 1-D (one shared grid), got shape {list(t.shape)}")
    if t.numel() < 2:
        raise ValueError(f"timesteps must have at least 2 points (t_start and t_end), got {t.numel()}")
    bad = torch.nonzero(~torch.isfinite(t)).flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"timesteps must be finite; timesteps[{i}]={float(t[i])}")
    diffs = t[1:] - t[:-1]
    if bool((diffs > 0).all()) and t.numel() > 1:
        raise ValueError(
            "timesteps must be strictly decreasing (sampling runs from T down to t_end); got an increasing "
            f"grid {float(t[0]):.6g} -> {float(t[-1]):.6g} (sample() only integrates towards the data; "
            "reverse the grid)"
        )
    nondec = torch.nonzero(diffs >= 0).flatten()
    if nondec.numel():
        i = int(nondec[0]) + 1
        raise ValueError(
            f"timesteps must be strictly decreasing (T -> t_end); timesteps[{i}]={float(t[i]):.6g} >= "
            f"timesteps[{i - 1}]={float(t[i - 1]):.6g}"
        )
    # a grid given in float32 (or lower) holds T only to its own rounding
    if float(t[0]) > sde.T * (1 + max(1e-12, 2.0 * given_eps(timesteps))) or float(t[-1]) < 0:
        raise ValueError(
            f"timesteps must lie in [0, T]=[0, {sde.T:.6g}] of {type(sde).__name__}; got [{float(t[-1]):.6g}, {float(t[0]):.6g}]"
        )
    return t.clamp(0.0, sde.T)


def given_eps(value: Any) -> float:
    """Machine epsilon of the precision a time argument was given in: its dtype's for a
    floating tensor, float64's for Python numbers and lists."""
    if isinstance(value, Tensor) and value.is_floating_point():
        return torch.finfo(value.dtype).eps
    return torch.finfo(torch.float64).eps


def match_t_end(t: Tensor, t_end: Any, timesteps: Any, T: float) -> Tensor:
    """The checked float64 grid ``t`` with its last point set to ``t_end`` when the two agree
    at the precision the grid (or ``t_end``) was given in: a float32 grid holds
    ``t_end = 1e-3`` only as 1.00000005e-3.  ValueError when they differ by more than
    2 eps of that precision relative to ``t_end`` (or 1e-12 max(1, T), the float64 tolerance)."""
    t_end_f = check_float(t_end, "t_end")
    eps = max(given_eps(timesteps), given_eps(t_end))
    last = float(t[-1])
    if abs(t_end_f - last) > max(1e-12 * max(1.0, T), 2.0 * eps * abs(t_end_f)):
        raise ValueError(f"t_end={t_end_f} disagrees with timesteps[-1]={last} "
                         "(pass one of them, or equal values)")
    if t_end_f != last:
        if t.numel() > 1 and t_end_f >= float(t[-2]):
            raise ValueError(f"t_end={t_end_f} is not below timesteps[-2]={float(t[-2])}")
        t = t.clone()
        t[-1] = t_end_f
    return t


def _need_linear(sde: SDE, schedule: str) -> LinearSDE:
    if not isinstance(sde, LinearSDE):
        raise TypeError(f"schedule={schedule!r} needs a LinearSDE; got {type(sde).__name__}")
    return sde


def make_grid(sde: SDE, steps: int, schedule: str = "uniform", t_end: float | None = None,
              t_start: float | None = None, rho: float = 7.0) -> TimeGrid:
    """Build a :class:`TimeGrid` of ``steps`` intervals from ``t_start`` (default ``T``)
    down to ``t_end`` (default ``sde.default_t_end``)."""
    steps = check_int(steps, "steps", minimum=1)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}; got {schedule!r}")
    t_start = sde.T if t_start is None else check_float(t_start, "t_start", low=0.0, high=sde.T)
    t_end = sde.default_t_end if t_end is None else check_float(t_end, "t_end", low=0.0, high=sde.T)
    if not t_end < t_start:
        raise ValueError(f"t_end must be < t_start, got t_end={t_end}, t_start={t_start}")
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    if schedule == "uniform":
        t = t_start + (t_end - t_start) * u
    elif schedule == "quadratic":
        t = t_end + (t_start - t_end) * (1.0 - u) ** 2
    elif schedule == "log_snr":
        lin = _need_linear(sde, schedule)
        l0, l1 = lin.log_snr_unchecked(torch.tensor([t_start, t_end], dtype=torch.float64)).tolist()
        if not (math.isfinite(l0) and math.isfinite(l1)):
            raise ValueError(f"schedule='log_snr' needs a finite log-SNR at t_start and t_end; got {l0}, {l1}")
        t = lin.t_of_log_snr_unchecked(l0 + (l1 - l0) * u)
    else:
        lin = _need_linear(sde, schedule)
        rho = check_float(rho, "rho", low=0.0, low_open=True)
        l0, l1 = lin.log_snr_unchecked(torch.tensor([t_start, t_end], dtype=torch.float64)).tolist()
        if not (math.isfinite(l0) and math.isfinite(l1)):
            raise ValueError(f"schedule='karras' needs a finite log-SNR at t_start and t_end; got {l0}, {l1}")
        s_max, s_min = math.exp(-0.5 * l0), math.exp(-0.5 * l1)
        sig = (s_max ** (1 / rho) + u * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
        t = lin.t_of_log_snr_unchecked(-2.0 * torch.log(sig))
    t = t.clamp(0.0, sde.T)
    t[0], t[-1] = t_start, t_end  # exact end points despite round-off of the inverse
    if bool((t[1:] >= t[:-1]).any()):
        raise ValueError(
            f"schedule={schedule!r} with steps={steps} gives a grid that is not strictly decreasing in float64 "
            f"(too many steps for [{t_end}, {t_start}])"
        )
    return TimeGrid(t, schedule)
