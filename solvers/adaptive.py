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

__all__ = ["PerSampleSolution", "solve_per_sample", "solve_shared", "STATUS_NAMES"]

#: Status codes of :attr:`PerSampleSolution.status`, indexed by code (``-1``: still running when
#: the solve was stopped, named ``"aborted"``).
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
    - ``ys`` ``[len(t_eval), B, ...]``: the states at the times ``t_eval`` (None if not asked);
      a failed sample's rows after it stopped are NaN.
    - ``dt`` ``[B]``: the last step size each sample tried (None where unknown).
    """

    y: Tensor
    t: Tensor
    status: Tensor
    accepted: Tensor
    rejected: Tensor
    evaluations: Tensor
    calls: int
    ys: Tensor | None = None
    dt: Tensor | None = None

    @property
    def status_names(self) -> tuple:
        return tuple("aborted" if s < 0 else STATUS_NAMES[s] for s in self.status.tolist())

    @property
    def ok(self) -> Tensor:
        """``[B]`` bool: the samples that reached ``t1``."""
        return self.status == SUCCESS


def rms_norm(err: Tensor) -> Tensor:
    """Per-sample root mean square ``[B, ...] -> [B]``."""
    return err.flatten(1).pow(2).mean(1).sqrt() if err.ndim > 1 else err.abs()


def _check_args(y0, t0, t1, rtol, atol, max_steps, dt_min, jump_t, t_eval) -> tuple[float, float]:
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
    if t_eval is not None:
        if not isinstance(t_eval, Tensor) or t_eval.ndim != 1 or not t_eval.numel():
            raise TypeError(f"t_eval must be a non-empty 1-D tensor of times or None, got {t_eval!r}")
        te = t_eval.detach().double().cpu()
        step = (te[1:] - te[:-1]) * (1.0 if t1 > t0 else -1.0)
        lo, hi = min(t0, t1), max(t0, t1)
        if bool((step <= 0).any()) or float(te.min()) < lo or float(te.max()) > hi:
            raise ValueError(f"t_eval must run strictly from t0={t0} towards t1={t1} inside [t0, t1]")
    return float(t0), float(t1)


def _stops(t0: float, t1: float, jump_t: Tensor | None, t_eval: Tensor | None, tdtype,
           device) -> tuple[Tensor, Tensor, Tensor]:
    """Where every sample lands, in the direction of integration: the knots strictly between t0
    and t1, the times of ``t_eval`` after t0, and t1.  Returns the times, whether each is a knot
    (the next step restarts its first stage there) and the ``t_eval`` row it fills (-1: none)."""
    lo, hi = min(t0, t1), max(t0, t1)
    times = {t1: [False, -1]}
    if jump_t is not None:
        for k in jump_t.detach().to(tdtype).cpu().tolist():
            if lo < k < hi:
                times.setdefault(k, [False, -1])[0] = True
    if t_eval is not None:
        for j, v in enumerate(t_eval.detach().to(tdtype).cpu().tolist()):
            if v != t0:
                times.setdefault(v, [False, -1])[1] = j
    order = sorted(times, reverse=t1 < t0)
    return (torch.tensor(order, dtype=tdtype, device=device),
            torch.tensor([times[v][0] for v in order], device=device),
            torch.tensor([times[v][1] for v in order], dtype=torch.long, device=device))


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
                     max_steps: int = 10_000, dt_min: float = 0.0, jump_t: Tensor | None = None,
                     t_eval: Tensor | None = None,
                     on_step: Callable[[int, Tensor, Tensor], None] | None = None) -> PerSampleSolution:
    """Integrate ``dy/dt = rhs(t, y, idx)`` from ``t0`` to ``t1`` with one adaptive step per
    sample (module docstring: Dormand-Prince 5(4), per-sample step control, failures).

    ``rhs(t, y, idx)`` receives the running samples' times ``t [B']`` (float64; float32 on MPS),
    states ``y [B', ...]`` and their indices ``idx [B']`` into the batch (e.g. to select
    per-sample data), and returns ``dy/dt [B', ...]``; row ``j`` must depend only on row ``j``.
    ``max_steps``: step attempts per sample.  ``jump_t``: increasing times every sample lands on
    (knots of the right-hand side).  ``t_eval``: times (from ``t0`` towards ``t1``) every sample
    also lands on, its state there returned in ``ys`` (landing changes the steps, not the order).
    ``on_step(iteration, t, y)``: called after every round of step attempts.
    """
    t0, t1 = _check_args(y0, t0, t1, rtol, atol, max_steps, dt_min, jump_t, t_eval)
    b, dev = y0.shape[0], y0.device
    tdtype = torch.float32 if dev.type == "mps" else torch.float64
    st = _State(y0, t0, t1, rtol, atol, rms_norm if norm is None else norm, dt_min,
                _stops(t0, t1, jump_t, t_eval, tdtype, dev), tdtype, rhs)
    if t_eval is not None:
        st.ys = y0.new_full((t_eval.numel(), *y0.shape), math.nan)
        if float(t_eval[0]) == t0:
            st.ys[0] = y0
    every = torch.arange(b, device=dev)
    k1 = st.call(every, st.t, st.y) if b else st.y.clone()
    st.k1 = k1
    run = st.stop_nonfinite(every, torch.cat([st.y.flatten(1), k1.flatten(1)], 1) if st.y.ndim > 1 else st.y + k1)
    if run.numel():
        st.h[run] = _initial_step(st.call, run, st.t[run], st.y[run], k1[run], st.direction,
                                  abs(st.stops[0].item() - t0), rtol, atol, st.norm)
        run = st.stop_nonfinite(run, st.h[run])
    iteration = 0
    while run.numel():
        over = (st.accepted[run] + st.rejected[run]) >= max_steps
        st.status[run[over]] = MAX_STEPS
        run = run[~over]
        need = run[st.fresh[run]]
        if need.numel():
            after = torch.nextafter(st.t[need], torch.full_like(st.t[need], st.direction * math.inf))
            st.k1[need] = st.call(need, after, st.y[need])
            st.fresh[need] = False
            run = st.stop_nonfinite(run, st.k1[run])
        if not run.numel():
            break
        run = _attempt(st, run)
        if on_step is not None:
            on_step(iteration, st.t, st.y)
        iteration += 1
    return PerSampleSolution(st.y, st.t, st.status, st.accepted, st.rejected, st.evals, st.calls, st.ys, st.h)


class _State:
    """The per-sample state of one :func:`solve_per_sample` call."""

    def __init__(self, y0, t0, t1, rtol, atol, norm, dt_min, stops, tdtype, rhs):
        b, dev = y0.shape[0], y0.device
        self.rtol, self.atol, self.norm, self.dt_min, self.rhs = rtol, atol, norm, dt_min, rhs
        self.stops, self.knot, self.save = stops
        self.direction = 1.0 if t1 > t0 else -1.0
        self.t = torch.full((b,), t0, dtype=tdtype, device=dev)
        self.y = y0.detach().clone()
        self.h = torch.zeros(b, dtype=tdtype, device=dev)
        self.status = torch.full((b,), _RUNNING, dtype=torch.long, device=dev)
        self.accepted, self.rejected, self.evals = (torch.zeros(b, dtype=torch.long, device=dev) for _ in range(3))
        self.nxt = torch.zeros(b, dtype=torch.long, device=dev)          # index of the next stop
        self.fresh = torch.zeros(b, dtype=torch.bool, device=dev)        # first stage to recompute (past a knot)
        self.k1, self.ys, self.calls = None, None, 0

    def call(self, idx: Tensor, tt: Tensor, yy: Tensor) -> Tensor:
        self.calls += 1
        self.evals[idx] += 1
        return self.rhs(tt, yy, idx)

    def stop_nonfinite(self, idx: Tensor, values: Tensor) -> Tensor:
        """Mark rows of ``idx`` whose ``values`` are not finite; return the others."""
        ok = _rows_finite(values)
        self.status[idx[~ok]] = NONFINITE
        return idx[ok]


def _attempt(st: _State, run: Tensor) -> Tensor:
    """One step attempt for the samples ``run`` (updates ``st`` in place); returns the samples
    still running."""
    direction = st.direction
    tr, yr = st.t[run], st.y[run]
    target = st.stops[st.nxt[run]]
    gap = (target - tr).abs()
    lands = st.h[run] >= gap
    hr = torch.where(lands, gap, st.h[run])
    under = (hr <= st.dt_min) | (tr + direction * hr == tr)
    st.status[run[under]] = UNDERFLOW
    if bool(under.any()):
        keep = ~under
        run, tr, yr, target, lands, hr = run[keep], tr[keep], yr[keep], target[keep], lands[keep], hr[keep]
        if not run.numel():
            return run
    # a step onto a knot evaluates its c = 1 stages just before the knot
    before = torch.nextafter(target, target - direction)
    hy = _col(direction * hr, yr)
    ks = [st.k1[run]]
    for s in range(1, 7):
        ts = tr + direction * _C[s] * hr
        if _C[s] == 1.0:
            ts = torch.where(lands, before, ts)
        ys = yr + hy * sum(a * k for a, k in zip(_A[s], ks) if a != 0.0)
        ks.append(st.call(run, ts, ys))
    y_new = ys                                                   # the seventh stage sits at y_new
    err = hy * sum(e * k for e, k in zip(_E, ks) if e != 0.0)
    ratio = st.norm(err / (st.atol + st.rtol * torch.maximum(yr.abs(), y_new.abs())))
    bad = ~torch.isfinite(ratio) | ~_rows_finite(y_new) | ~_rows_finite(ks[6])
    st.status[run[bad]] = NONFINITE
    ok = (ratio <= 1.0) & ~bad
    acc, rej = run[ok], run[~ok & ~bad]
    landed = lands[ok]
    st.t[acc] = torch.where(landed, target[ok], tr[ok] + direction * hr[ok])
    st.y[acc], st.k1[acc] = y_new[ok], ks[6][ok]
    st.accepted[acc] += 1
    st.rejected[rej] += 1
    on_stop = acc[landed]
    stop = st.nxt[on_stop]
    if st.ys is not None:
        row = st.save[stop]
        keep = row >= 0
        st.ys[row[keep], on_stop[keep]] = st.y[on_stop[keep]]
    last = stop == st.stops.numel() - 1
    st.status[on_stop[last]] = SUCCESS
    moving = on_stop[~last]
    st.fresh[moving] = st.knot[st.nxt[moving]]
    st.nxt[moving] += 1
    factor = (_SAFETY * ratio.clamp_min(1e-10) ** -_ORDER_EXP).clamp(_FACTOR_MIN, _FACTOR_MAX)
    factor = torch.where(ok, factor, factor.clamp_max(1.0)).to(hr.dtype)
    live = ~bad
    st.h[run[live]] = (hr * factor)[live]
    return run[st.status[run] == _RUNNING]


class _Stop(Exception):
    """Raised from inside torchdiffeq's loop by :func:`solve_shared`'s own checks."""

    def __init__(self, code: int, rows: Tensor | None = None):
        super().__init__(STATUS_NAMES[code])
        self.code, self.rows = code, rows


def _odeint_options(t1: float, max_steps: int, jump_t: Tensor | None, grid: Tensor | None, tdtype,
                    dev) -> dict:
    """torchdiffeq options: the fixed grid, or never past ``t1``, the knots, and torchdiffeq's
    own step limit far above ours (ours is checked first, in the step callback)."""
    if grid is not None:
        g = grid.to(dtype=tdtype, device=dev)
        return {"grid_constructor": lambda f, y_, t_: g}
    options = {"step_t": torch.tensor([t1], dtype=tdtype), "max_num_steps": 10 * max_steps + 10}
    if jump_t is not None and jump_t.numel():
        options["jump_t"] = jump_t.to(tdtype)
    return options


def solve_shared(rhs: Callable[[Tensor, Tensor, Tensor], Tensor], y0: Tensor, t0: float, t1: float, *,
                 method: str, rtol: float, atol: float, norm: Callable[[Tensor], Tensor] | None = None,
                 max_steps: int = 10_000, jump_t: Tensor | None = None, grid: Tensor | None = None,
                 t_eval: Tensor | None = None,
                 on_accept: Callable[[int, float, Tensor], None] | None = None) -> PerSampleSolution:
    """torchdiffeq's ``odeint`` with one step size for the whole batch, returning the same
    :class:`PerSampleSolution` as :func:`solve_per_sample` (counters equal for every sample).

    ``rhs(t, y, idx)``: ``t`` a 0-d float64 tensor (float32 on MPS), ``idx`` every row.  ``norm``:
    the batch's error norm ``[B, ...] -> scalar`` (default RMS over everything).  Adaptive
    methods step onto ``jump_t`` and never evaluate past ``t1``; fixed-step methods step on
    ``grid`` (times from ``t0`` to ``t1``).  Failures are detected by this function's own checks
    before torchdiffeq's (``max_steps`` attempts, a step that no longer moves ``t``, a
    non-finite state or right-hand side), never read from torchdiffeq's messages: the status of
    every sample is then the failure's (non-finite rows: ``nonfinite``, the others ``aborted``)
    and ``y``, ``t`` the start of the last accepted step.  ``on_accept(i, t, y)``: called with
    the state at the start of every accepted step after the first (fixed grids: every step).
    """
    from torchdiffeq import odeint

    t0, t1 = _check_args(y0, t0, t1, rtol, atol, max_steps, 0.0, jump_t, t_eval)
    b, dev = y0.shape[0], y0.device
    tdtype = torch.float32 if dev.type == "mps" else torch.float64
    every = torch.arange(b, device=dev)
    track = {"calls": 0, "attempts": 0, "accepted": 0, "t": t0, "y": y0, "dt": math.nan}
    tiny = 4.0 * torch.finfo(tdtype).eps

    def func(t: Tensor, y: Tensor) -> Tensor:
        track["calls"] += 1
        out = rhs(t.detach().to(tdtype), y, every)
        ok = _rows_finite(out)
        if not bool(ok.all()):
            raise _Stop(NONFINITE, every[~ok])
        return out

    def on_step(t: Tensor, y: Tensor, dt: Tensor) -> None:
        track["attempts"] += 1
        track["dt"] = abs(float(dt))
        if grid is not None:
            accept(t, y, dt)
            return
        if track["attempts"] > max_steps:
            raise _Stop(MAX_STEPS)
        if not bool(dt.abs() > tiny * t.abs()):
            raise _Stop(UNDERFLOW)
        if not bool(torch.isfinite(y).all()):
            raise _Stop(NONFINITE, every[~_rows_finite(y)])

    def accept(t: Tensor, y: Tensor, dt: Tensor) -> None:
        if track["accepted"] and on_accept is not None:
            on_accept(track["accepted"] - 1, float(t), y)
        track.update(t=float(t), y=y)
        track["accepted"] += 1

    func.callback_step = on_step
    if grid is None:
        func.callback_accept_step = accept
    options = _odeint_options(t1, max_steps, jump_t, grid, tdtype, dev)
    times = t_eval if t_eval is not None else torch.tensor([t0, t1], dtype=tdtype)
    status = torch.full((b,), SUCCESS, dtype=torch.long, device=dev)
    ys = None
    try:
        out = odeint(func, y0, times.to(dtype=tdtype, device=dev), method=method, rtol=rtol, atol=atol,
                     options=options if norm is None else {**options, "norm": norm})
        y, t_reached = out[-1], t1
        ys = out if t_eval is not None else None
    except _Stop as stop:
        status.fill_(_RUNNING if stop.rows is not None else stop.code)
        if stop.rows is not None:
            status[stop.rows] = stop.code
        y, t_reached = track["y"], track["t"]
    attempts, acc = track["attempts"], track["accepted"]
    counts = [torch.full((b,), v, dtype=torch.long, device=dev) for v in (acc, attempts - acc, track["calls"])]
    return PerSampleSolution(y, torch.full((b,), t_reached, dtype=tdtype, device=dev), status, *counts,
                             track["calls"], ys, torch.full((b,), track["dt"], dtype=tdtype, device=dev))
