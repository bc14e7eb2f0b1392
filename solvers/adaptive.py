r"""Per-sample adaptive Dormand-Prince 5(4): one batched solve, one step size per sample.

:func:`solve_per_sample` integrates :math:`dy_i/dt = F(t_i, y_i)` for every sample ``i`` of a
batch with its *own* step size, error estimate and accept/reject decision, so a sample's
result does not depend on its batch-mates (up to the rounding of the batched right-hand side),
and evaluates the right-hand side only on the samples still running (gathered by index,
scattered back).  A sample that fails stops with its own status; the others continue.

**Method.**  Dormand & Prince (1980), RK5(4)7M, with FSAL (the seventh stage of an accepted
step is the first of the next).  Butcher tableau (``c | A``, then the fifth-order weights ``b``
that advance the solution, and ``e = b - b*`` with the embedded fourth-order ``b*``)::

    0    |
    1/5  | 1/5
    3/10 | 3/40        9/40
    4/5  | 44/45      -56/15       32/9
    8/9  | 19372/6561 -25360/2187  64448/6561  -212/729
    1    | 9017/3168  -355/33      46732/5247  49/176   -5103/18656
    1    | 35/384      0           500/1113    125/192  -2187/6784   11/84
    -----+----------------------------------------------------------------------
    b    | 35/384      0           500/1113    125/192  -2187/6784   11/84     0
    b*   | 5179/57600  0           7571/16695  393/640  -92097/339200 187/2100 1/40

Global error of order 5 (local error estimate of order 4, local extrapolation).

**Step control** (Hairer, Norsett & Wanner, *Solving ODEs I*, II.4), per sample:
``err = h sum_j e_j k_j``, ``ratio = norm(err / (atol + rtol max(|y|, |y_new|)))`` (``norm``:
``[B', ...] -> [B']``, default RMS over a sample's entries); accept iff ``ratio <= 1``;
``h <- h min(10, max(0.2, 0.9 ratio^(-1/5)))`` (at most ``h`` after a rejection).  First step:
the II.4 heuristic (one extra evaluation per sample).  Steps are clipped to land exactly on
``t1`` and on every time of ``jump_t``; the stages at the end of a step that lands on a knot
are evaluated at the float just before it, and the next step restarts with a fresh first stage
just past it (no FSAL across a knot), as torchdiffeq does.

**Failures** (per sample, ``status``): ``"max_steps"`` (``max_steps`` attempts, accepted +
rejected, without reaching ``t1``), ``"step_size_underflow"`` (a step no larger than
``dt_min`` or one that no longer moves ``t``), ``"nonfinite"`` (the state, a stage or the error
estimate is not finite).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = ["PerSampleSolution", "solve_per_sample", "STATUS_NAMES"]

#: Status codes of :attr:`PerSampleSolution.status`, indexed by code.
STATUS_NAMES = ("success", "max_steps", "step_size_underflow", "nonfinite")
SUCCESS, MAX_STEPS, UNDERFLOW, NONFINITE = range(4)
_RUNNING = -1

_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
      (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
      (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
      (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
_B_LOW = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_E = tuple(b - bl for b, bl in zip(_A[6] + (0.0,), _B_LOW))
_SAFETY, _FACTOR_MIN, _FACTOR_MAX, _ORDER_EXP = 0.9, 0.2, 10.0, 1.0 / 5.0


@dataclass(frozen=True)
class PerSampleSolution:
    """Result of :func:`solve_per_sample`.

    - ``y`` ``[B, ...]``: the state at ``t1`` (a failed sample: where it stopped).
    - ``t`` ``[B]``: the time each sample reached (``t1`` on success).
    - ``status`` ``[B]`` long: codes into :data:`STATUS_NAMES`; ``status_names`` gives strings.
    - ``accepted``, ``rejected``, ``evaluations`` ``[B]`` long: per-sample accepted and rejected
      steps and right-hand-side evaluations (rows of ``rhs`` calls that held the sample).
    - ``calls``: batched ``rhs`` calls in all.
    """

    y: Tensor
    t: Tensor
    status: Tensor
    accepted: Tensor
    rejected: Tensor
    evaluations: Tensor
    calls: int

    @property
    def status_names(self) -> tuple:
        return tuple(STATUS_NAMES[int(s)] for s in self.status.tolist())


def rms_norm(err: Tensor) -> Tensor:
    """Per-sample root mean square ``[B, ...] -> [B]``."""
    return err.flatten(1).pow(2).mean(1).sqrt() if err.ndim > 1 else err.abs()


def _check_args(y0, t0, t1, rtol, atol, max_steps, dt_min, jump_t) -> tuple[float, float]:
    if not isinstance(y0, Tensor) or not y0.is_floating_point() or y0.ndim < 1:
        raise TypeError(f"y0 must be a floating-point tensor [B, ...], got {type(y0).__name__}"
                        + (f" {y0.dtype} of shape {tuple(y0.shape)}" if isinstance(y0, Tensor) else ""))
    for name, v in (("t0", t0), ("t1", t1), ("rtol", rtol), ("atol", atol), ("dt_min", dt_min)):
        if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v):
            raise TypeError(f"{name} must be a finite real number, got {v!r}")
    if t0 == t1:
        raise ValueError(f"t0 and t1 must differ, got t0 = t1 = {t0}")
    if rtol < 0 or atol < 0 or rtol + atol <= 0:
        raise ValueError(f"rtol and atol must be >= 0 and not both 0, got rtol={rtol}, atol={atol}")
    if dt_min < 0:
        raise ValueError(f"dt_min must be >= 0, got {dt_min}")
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
        raise ValueError(f"max_steps must be an int >= 1, got {max_steps!r}")
    if jump_t is not None:
        if not isinstance(jump_t, Tensor) or jump_t.ndim != 1:
            raise TypeError(f"jump_t must be a 1-D tensor of times or None, got {jump_t!r}")
        if jump_t.numel() > 1 and not bool((jump_t[1:] > jump_t[:-1]).all()):
            raise ValueError("jump_t must be strictly increasing")
    return float(t0), float(t1)


def _stops(t0: float, t1: float, jump_t: Tensor | None, tdtype, device) -> Tensor:
    """The knots strictly between t0 and t1 in the direction of integration, then t1."""
    end = torch.tensor([t1], dtype=tdtype, device=device)
    if jump_t is None or not jump_t.numel():
        return end
    k = jump_t.detach().to(device=device, dtype=tdtype)
    lo, hi = min(t0, t1), max(t0, t1)
    k = k[(k > lo) & (k < hi)]
    if t1 < t0:
        k = k.flip(0)
    return torch.cat([k, end])


def _initial_step(call, idx, t, y, f0, direction, span, rtol, atol, norm) -> Tensor:
    """Hairer-Norsett-Wanner II.4 starting step per sample (one evaluation)."""
    scale = atol + rtol * y.abs()
    d0, d1 = norm(y / scale), norm(f0 / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    h0 = h0.clamp_max(span).to(t.dtype)
    f1 = call(idx, t + direction * h0, y + _col(h0 * direction, y) * f0)
    d2 = norm((f1 - f0) / scale) / h0.to(y.dtype)
    big = torch.maximum(d1, d2)
    h1 = torch.where(big <= 1e-15, (h0 * 1e-3).clamp_min(1e-6).to(y.dtype), (0.01 / big) ** _ORDER_EXP)
    return torch.minimum(100 * h0, h1.to(t.dtype))


def _col(v: Tensor, like: Tensor) -> Tensor:
    """``[B]`` -> ``[B, 1, ...]`` in ``like``'s dtype, for broadcasting over a sample's entries."""
    return v.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def _rows_finite(v: Tensor) -> Tensor:
    return torch.isfinite(v).flatten(1).all(1) if v.ndim > 1 else torch.isfinite(v)


def solve_per_sample(rhs: Callable[[Tensor, Tensor, Tensor], Tensor], y0: Tensor, t0: float, t1: float, *,
                     rtol: float, atol: float, norm: Callable[[Tensor], Tensor] | None = None,
                     max_steps: int = 10_000, dt_min: float = 0.0,
                     jump_t: Tensor | None = None) -> PerSampleSolution:
    """Integrate ``dy/dt = rhs(t, y, idx)`` from ``t0`` to ``t1`` with one adaptive step per
    sample (module docstring: Dormand-Prince 5(4), per-sample step control, failures).

    ``rhs(t, y, idx)`` receives the running samples' times ``t [B']`` (float64; float32 on MPS),
    states ``y [B', ...]`` and their indices ``idx [B']`` into the batch (e.g. to select
    per-sample data), and returns ``dy/dt [B', ...]``; row ``j`` must depend only on row ``j``.
    ``max_steps``: step attempts per sample.  ``jump_t``: increasing times every sample lands on.
    """
    t0, t1 = _check_args(y0, t0, t1, rtol, atol, max_steps, dt_min, jump_t)
    norm = rms_norm if norm is None else norm
    b, dev = y0.shape[0], y0.device
    tdtype = torch.float32 if dev.type == "mps" else torch.float64
    direction = 1.0 if t1 > t0 else -1.0
    stops = _stops(t0, t1, jump_t, tdtype, dev)
    t = torch.full((b,), t0, dtype=tdtype, device=dev)
    y = y0.detach().clone()
    status = torch.full((b,), _RUNNING, dtype=torch.long, device=dev)
    accepted, rejected, evals = (torch.zeros(b, dtype=torch.long, device=dev) for _ in range(3))
    nxt = torch.zeros(b, dtype=torch.long, device=dev)          # index of the next stop
    calls = [0]

    def call(idx: Tensor, tt: Tensor, yy: Tensor) -> Tensor:
        calls[0] += 1
        evals[idx] += 1
        return rhs(tt, yy, idx)

    def stop_nonfinite(idx: Tensor, values: Tensor) -> Tensor:
        """Mark rows of ``idx`` whose ``values`` are not finite; return the others."""
        ok = _rows_finite(values)
        status[idx[~ok]] = NONFINITE
        return idx[ok]

    every = torch.arange(b, device=dev)
    k1 = call(every, t, y) if b else y.clone()
    run = stop_nonfinite(every, torch.cat([y.flatten(1), k1.flatten(1)], 1) if y.ndim > 1 else y + k1)
    h = torch.zeros(b, dtype=tdtype, device=dev)
    if run.numel():
        h[run] = _initial_step(call, run, t[run], y[run], k1[run], direction, abs(stops[0].item() - t0),
                               rtol, atol, norm)
        run = stop_nonfinite(run, h[run])
    fresh = torch.zeros(b, dtype=torch.bool, device=dev)        # first stage to recompute (after a knot)
    while run.numel():
        over = (accepted[run] + rejected[run]) >= max_steps
        status[run[over]] = MAX_STEPS
        run = run[~over]
        need = run[fresh[run]]
        if need.numel():
            after = torch.nextafter(t[need], torch.full_like(t[need], direction * math.inf))
            k1[need] = call(need, after, y[need])
            fresh[need] = False
            run = stop_nonfinite(run, k1[run])
        if not run.numel():
            break
        run = _attempt(call, run, t, y, h, k1, status, accepted, rejected, nxt, fresh, stops, direction,
                       rtol, atol, norm, dt_min)
    return PerSampleSolution(y, t, status, accepted, rejected, evals, calls[0])


def _attempt(call, run, t, y, h, k1, status, accepted, rejected, nxt, fresh, stops, direction, rtol, atol,
             norm, dt_min) -> Tensor:
    """One step attempt for the samples ``run`` (updates the state in place); returns the
    samples still running."""
    tr, yr = t[run], y[run]
    target = stops[nxt[run]]
    gap = (target - tr).abs()
    lands = h[run] >= gap
    hr = torch.where(lands, gap, h[run])
    under = (hr <= dt_min) | (tr + direction * hr == tr)
    status[run[under]] = UNDERFLOW
    if bool(under.any()):
        keep = ~under
        run, tr, yr, target, lands, hr = run[keep], tr[keep], yr[keep], target[keep], lands[keep], hr[keep]
        if not run.numel():
            return run
    # a step onto a knot evaluates its c = 1 stages just before the knot
    before = torch.nextafter(target, target - direction)
    hy = _col(direction * hr, yr)
    ks = [k1[run]]
    for s in range(1, 7):
        ts = tr + direction * _C[s] * hr
        if _C[s] == 1.0:
            ts = torch.where(lands, before, ts)
        ys = yr + hy * sum(a * k for a, k in zip(_A[s], ks) if a != 0.0)
        ks.append(call(run, ts, ys))
    y_new = ys                                                   # the seventh stage sits at y_new
    err = hy * sum(e * k for e, k in zip(_E, ks) if e != 0.0)
    ratio = norm(err / (atol + rtol * torch.maximum(yr.abs(), y_new.abs())))
    bad = ~torch.isfinite(ratio) | ~_rows_finite(y_new) | ~_rows_finite(ks[6])
    status[run[bad]] = NONFINITE
    ok = (ratio <= 1.0) & ~bad
    acc, rej = run[ok], run[~ok & ~bad]
    landed = lands[ok]
    t[acc] = torch.where(landed, target[ok], tr[ok] + direction * hr[ok])
    y[acc], k1[acc] = y_new[ok], ks[6][ok]
    accepted[acc] += 1
    rejected[rej] += 1
    done = acc[landed & (nxt[acc] == stops.numel() - 1)]
    status[done] = SUCCESS
    knot = acc[landed & (nxt[acc] < stops.numel() - 1)]
    nxt[knot] += 1
    fresh[knot] = True
    factor = (_SAFETY * ratio.clamp_min(1e-10) ** -_ORDER_EXP).clamp(_FACTOR_MIN, _FACTOR_MAX)
    factor = torch.where(ok, factor, factor.clamp_max(1.0)).to(hr.dtype)
    live = ~bad
    h[run[live]] = (hr * factor)[live]
    return run[status[run] == _RUNNING]
