r"""Per-sample adaptive ODE engines for the likelihood ODE: which one to build on (measurement only).

The problem: the augmented probability-flow ODE of :func:`solvers.log_likelihood`,

.. math:: \frac{d}{dt}\begin{bmatrix}x\\ \delta\end{bmatrix} =
          \begin{bmatrix}v(x,t)\\ \nabla\cdot v(x,t)\end{bmatrix},\qquad
          v = f(t)\,x + \tfrac12 g(t)^2\,\hat\epsilon(x,t)/\sigma(t),

from ``t_end = 1e-5`` to ``T = 1`` (VPSDE), dopri5 at ``rtol = atol = 1e-5``, float64, for N
points of a Gaussian mixture (4 components, anisotropic covariances) with its exact eps network
(``target.as_model(sde, "eps")``), d = 2, 16, 64; the divergence exact (d reverse-mode products)
or Hutchinson (one Rademacher probe per point, drawn once per point from its own generator).

Engines, all run in the same process, one after another on the same points:

- ``lib shared``    ``solvers.log_likelihood(per_sample=False)``: torchdiffeq dopri5, one step size
                    for the whole batch (error norm over the batch).
- ``lib 1-at-a-time`` ``solvers.log_likelihood`` called on one point at a time (what
                    ``per_sample=True`` does), timed on ``--loop-points`` points and scaled to N.
- ``tdq shared``    torchdiffeq ``odeint`` (dopri5, shared step) called directly on this file's
                    right-hand side -- the same function the per-sample engines call, so that
                    ``torchode / tdq shared`` compares the engines, not the right-hand sides.
- ``torchode``      ``torchode`` dopri5 with an ``IntegralController`` (per-sample step size,
                    per-sample accept/reject, per-sample time ``t[B]``) on the flat state
                    ``[B, d+1]``, with the per-sample analogue of torchdiffeq's mixed norm
                    ``max(rms(err_x), |err_delta|)``.  It evaluates every stage on the whole
                    batch, finished samples included.
- ``prototype``     PROTOTYPE (this file only): a minimal vectorised dopri5 with the same
                    per-sample control that evaluates only the samples still running.

Printed per engine: wall time, NFE (network calls, each on the whole batch), accepted steps per
sample (mean/max), the largest integration error against the closed form, and the two ratios
(per-sample engine / one-at-a-time, target <= 1/20; per-sample engine / shared step, target
<= 2).  Integration error = ``|log p_T(z) + delta - log p_{t_end}(x)|`` with the *exact* terminal
marginal ``p_T`` in place of the N(0, I) prior, so that it measures the solver, not the prior
mismatch (printed once, separately, as ``prior gap``).  For Hutchinson that error is the
estimator's (the same probes in every engine), so the column ``|vs lib|`` gives the largest
difference from the library's shared-step result instead.  ``batch dependence``: a per-sample
engine's largest difference between a point solved alone and the same point inside the batch.

Measured (shared, loaded 2-core CPU, one thread, N = 2000; timings vary by up to 2-3x between
runs on this machine, ratios within one run less so): every per-sample engine is
batch-independent to 1e-12 nats and 9-30x more accurate than the shared step at the same
tolerance (max error 1.2e-3 vs 1.4e-2 nats at d = 2, 3.2e-3 vs 9.5e-2 at d = 16, 1.6e-2 vs
1.5e-1 at d = 64, exact trace), because the shared step's error norm is an RMS over the batch.
torchode: 0.6-1.6x the shared-step time, 0.002-0.03x one-at-a-time (0.10x for d = 64 exact,
where the batched trace is compute bound: the shared step gets only 0.08x there); prototype:
0.3-1.3x (mostly ~0.7x) the shared step, ~40% fewer sample evaluations than torchode (as many as one at a time).

Run:  python benchmarks/adaptive_engines.py [--points 2000] [--dims 2 16 64] [--loop-points 40] [--repeats 1]
[--no-prototype]  (torchode 1.0.1 requires ``torchtyping``, itself pinning ``typeguard<3``; install it if missing.)
"""
from __future__ import annotations

import argparse
import importlib
import math
import statistics
import time

import torch

import scoresde
import solvers
from solvers.likelihood import _default_chunk

DT = torch.float64
RTOL = ATOL = 1e-5
T_END = 1e-5


# ----------------------------------------------------------------------------- problem
def make_target(d: int, k: int = 4, seed: int = 0) -> scoresde.GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    means = 6.0 * torch.randn(k, d, generator=g, dtype=DT) / math.sqrt(d)
    a = torch.randn(k, d, d, generator=g, dtype=DT)
    covs = 0.3 * a @ a.transpose(1, 2) / d + 0.05 * torch.eye(d, dtype=DT)
    w = torch.softmax(torch.randn(k, generator=g, dtype=DT), 0)
    return scoresde.GaussianMixture(w, means, covs)


def probe_generators(n: int, seed: int = 1000, start: int = 0) -> list:
    """One generator per point, so that a point's probe does not depend on its batch."""
    return [torch.Generator().manual_seed(seed + start + i) for i in range(n)]


def draw_probes(n: int, d: int) -> torch.Tensor:
    """The probes ``solvers.log_likelihood`` draws from :func:`probe_generators` (one each)."""
    return torch.stack([(torch.randint(0, 2, (1, d), generator=g) * 2 - 1).to(DT)[0]
                        for g in probe_generators(n)])


# ----------------------------------------------------------------------------- right-hand side
class AugmentedRHS:
    """``rhs(t[B], y[B, d+1]) -> [B, d+1]``: the PF drift and its divergence at per-sample times
    (exact trace: d vector-Jacobian products from one forward pass, chunked as the library does;
    Hutchinson: ``eps^T J eps`` with the fixed probes ``V[B, d]``).  ``select`` restricts the
    probes to a subset of the points (the batch-independence check)."""

    def __init__(self, model, d: int, probes: torch.Tensor | None):
        self.model, self.sde, self.d, self.V = model, model.sde, d, probes
        self.calls = 0
        self.rows = 0      # sample evaluations (network calls x rows in each)

    def __call__(self, t: torch.Tensor, y: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """``idx``: the points ``y`` holds (their probes), when it is a subset of the batch."""
        self.calls += 1
        self.rows += y.shape[0]
        b, d = y.shape[0], self.d
        V = self.V if self.V is None or idx is None else self.V[idx]
        t64 = t.to(DT).expand(b).clamp(T_END, float(self.sde.T))
        f = self.sde.f_unchecked(t64)[:, None]
        c = (0.5 * self.sde.g2_unchecked(t64) / torch.exp(self.sde.log_sigma_unchecked(t64)))[:, None]
        with torch.enable_grad():
            x = y[:, :d].detach().requires_grad_(True)
            v = f * x + c * self.model.evaluate(x, t64, validate=False).eps
            if V is not None:
                (g,) = torch.autograd.grad(v, x, V)
                div = (g * V).sum(1)
            else:
                div = y.new_zeros(b)
                chunk = _default_chunk(d, b, y.device)
                for i in range(0, d, chunk):
                    j = min(d, i + chunk)
                    e = torch.zeros(j - i, 1, d, dtype=y.dtype)
                    e[torch.arange(j - i), 0, torch.arange(i, j)] = 1.0
                    (g,) = torch.autograd.grad(v, x, e.expand(j - i, b, d), retain_graph=j < d,
                                               is_grads_batched=True)
                    div = div + torch.diagonal(g[:, :, i:j], dim1=0, dim2=2).sum(-1)
        return torch.cat([v.detach(), div.detach()[:, None]], dim=1)

    def select(self, idx: torch.Tensor) -> "AugmentedRHS":
        return AugmentedRHS(self.model, self.d, None if self.V is None else self.V[idx])


# ----------------------------------------------------------------------------- engines
def run_library(model, x, trace):
    kw = {} if trace == "exact" else {"generator": probe_generators(x.shape[0])}
    res = solvers.log_likelihood(model, x, trace, rtol=RTOL, atol=ATOL, t_end=T_END, **kw)
    steps = torch.full((x.shape[0],), float(res.stats["accepted_steps"]), dtype=DT)
    return res.z, res.delta_log_prob, res.nfe, steps


def run_library_loop(model, x, trace):
    zs, ds, nfe, steps = [], [], 0, []
    for i in range(x.shape[0]):
        kw = {} if trace == "exact" else {"generator": probe_generators(1, start=i)}
        res = solvers.log_likelihood(model, x[i:i + 1], trace, rtol=RTOL, atol=ATOL, t_end=T_END, **kw)
        zs.append(res.z), ds.append(res.delta_log_prob)
        nfe += res.nfe
        steps.append(float(res.stats["accepted_steps"]))
    return torch.cat(zs), torch.cat(ds), nfe, torch.tensor(steps, dtype=DT)


def run_torchdiffeq(rhs: AugmentedRHS, x):
    """Shared step on the same flat right-hand side, torchdiffeq's mixed norm over (x, delta)."""
    from torchdiffeq import odeint

    d = x.shape[1]
    accepted = [0]

    def func(t, y):
        return rhs(t, y)
    func.callback_accept_step = lambda t0, y0, dt: accepted.__setitem__(0, accepted[0] + 1)

    def norm(err):
        e = err.reshape(-1, d + 1)
        return torch.maximum(e[:, :d].pow(2).mean().sqrt(), e[:, d].pow(2).mean().sqrt())

    y0 = torch.cat([x, x.new_zeros(x.shape[0], 1)], dim=1)
    span = torch.tensor([T_END, 1.0], dtype=DT)
    c0 = rhs.calls
    with torch.no_grad():
        y = odeint(func, y0, span, method="dopri5", rtol=RTOL, atol=ATOL, options={"norm": norm})[-1]
    steps = torch.full((x.shape[0],), float(accepted[0]), dtype=DT)
    return y[:, :d], y[:, d], rhs.calls - c0, steps


def per_sample_mixed_norm(d: int):
    """Per-sample analogue of torchdiffeq's mixed norm: ``max(rms(err_x), |err_delta|)``, ``[B]``."""
    def norm(err: torch.Tensor) -> torch.Tensor:
        return torch.maximum(err[:, :d].pow(2).mean(1).sqrt(), err[:, d].abs())
    return norm


def run_torchode(rhs: AugmentedRHS, x, max_steps: int = 10_000):
    """torchode dopri5, per-sample step control (``IntegralController``, torchdiffeq's constants)."""
    import torchode as to

    b, d = x.shape
    term = to.ODETerm(rhs)
    method = to.Dopri5(term=term)
    controller = to.IntegralController(atol=ATOL, rtol=RTOL, term=term, norm=per_sample_mixed_norm(d),
                                       safety=0.9, factor_min=0.2, factor_max=10.0)
    solver = to.AutoDiffAdjoint(method, controller, max_steps=max_steps)
    y0 = torch.cat([x, x.new_zeros(b, 1)], dim=1)
    t_start = torch.full((b,), T_END, dtype=DT)
    t_stop = torch.full((b,), 1.0, dtype=DT)
    problem = to.InitialValueProblem(y0=y0, t_start=t_start, t_end=t_stop)
    c0 = rhs.calls
    with torch.no_grad():
        sol = solver.solve(problem)
    if bool((sol.status != 0).any()):
        raise RuntimeError(f"torchode status {sol.status.unique().tolist()} (0 = success)")
    y = sol.ys[:, -1]
    return y[:, :d], y[:, d], rhs.calls - c0, sol.stats["n_accepted"].to(DT)


# ----------------------------------------------------------------------------- PROTOTYPE
# A minimal vectorised Dormand-Prince 5(4) with per-sample step size that evaluates only the
# samples still running (compaction).  A prototype for this benchmark, not library code:
# no dense output, no knots, no failure handling beyond max_steps.
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
      (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
      (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
      (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_E = tuple(b - bl for b, bl in zip(_B, (1951 / 21600, 0.0, 22642 / 50085, 451 / 720, -12231 / 42400,
                                          649 / 6300, 1 / 60)))


def _initial_step(rhs, t, y, f0, idx, norm):
    """Hairer, Norsett & Wanner (1993) II.4 starting step, per sample (one extra evaluation)."""
    scale = ATOL + RTOL * y.abs()
    d0, d1 = norm(y / scale), norm(f0 / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    f1 = rhs(t + h0, y + h0[:, None] * f0, idx)
    d2 = norm((f1 - f0) / scale) / h0
    big = torch.maximum(d1, d2)
    h1 = torch.where(big <= 1e-15, torch.maximum(torch.full_like(h0, 1e-6), h0 * 1e-3), (0.01 / big) ** (1 / 5))
    return torch.minimum(100 * h0, h1)


def run_prototype(rhs: AugmentedRHS, x, max_steps: int = 10_000):
    """Per-sample dopri5: ``err = h sum_j e_j k_j``, ratio = norm(err / (atol + rtol max|y|)),
    accept if ratio <= 1, ``h <- h clamp(0.9 ratio^(-1/5), 0.2 (1 if accepted), 10)`` (torchdiffeq's
    constants); FSAL, 6 evaluations per attempt, on the running samples only."""
    b, d = x.shape
    norm = per_sample_mixed_norm(d)
    c0 = rhs.calls
    y = torch.cat([x, x.new_zeros(b, 1)], dim=1)
    t = torch.full((b,), T_END, dtype=DT)
    every = torch.arange(b)
    k1 = rhs(t, y, every)
    h = _initial_step(rhs, t, y, k1, every, norm)
    accepted = torch.zeros(b, dtype=DT)
    attempts = torch.zeros(b, dtype=torch.long)
    run = every
    while run.numel():
        if int(attempts[run].max()) >= max_steps:
            raise RuntimeError(f"prototype: max_steps={max_steps} reached")
        tr, yr, hr = t[run], y[run], torch.minimum(h[run], 1.0 - t[run])
        ks = [k1[run]]
        for s in range(1, 7):
            ys = yr + hr[:, None] * sum(a * k for a, k in zip(_A[s], ks) if a != 0.0)
            ks.append(rhs(tr + _C[s] * hr, ys, run))
        y_new = ys                                   # stage 7 sits at y_new (FSAL)
        err = hr[:, None] * sum(e * k for e, k in zip(_E, ks) if e != 0.0)
        ratio = norm(err / (ATOL + RTOL * torch.maximum(yr.abs(), y_new.abs())))
        ok = ratio <= 1.0
        low = torch.where(ok, torch.ones_like(ratio), torch.full_like(ratio, 0.2))
        factor = torch.minimum(torch.maximum(0.9 * ratio.clamp_min(1e-10) ** -0.2, low), torch.full_like(ratio, 10.0))
        attempts[run] += 1
        acc = run[ok]
        t[acc] = torch.where(hr[ok] >= 1.0 - tr[ok], torch.ones_like(tr[ok]), tr[ok] + hr[ok])
        y[acc], k1[acc] = y_new[ok], ks[6][ok]
        accepted[acc] += 1
        h[run] = hr * factor
        run = run[t[run] < 1.0]
    return y[:, :d], y[:, d], rhs.calls - c0, accepted


# ----------------------------------------------------------------------------- one problem
def timed(fn, *args, repeats: int = 1):
    """Median wall time of ``repeats`` runs and the last run's output."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bench_problem(d: int, trace: str, n: int, loop_points: int, check_points: int, prototype: bool,
                  repeats: int = 1, torchode: bool = True) -> dict:
    target = make_target(d)
    sde = scoresde.VPSDE()
    model = target.as_model(sde, "eps")
    x = target.marginal(sde, T_END).sample(n, generator=torch.Generator().manual_seed(7 + d), dtype=DT)
    exact = target.marginal(sde, T_END).log_prob(x)
    p_T = target.marginal(sde, 1.0)
    V = draw_probes(n, d) if trace == "hutchinson" else None
    rhs = AugmentedRHS(model, d, V)
    m = min(loop_points, n)

    # warm-up (small batch) so that no engine pays one-time costs
    if torchode:
        run_torchode(rhs.select(torch.arange(4)), x[:4])
    run_torchdiffeq(rhs.select(torch.arange(4)), x[:4])
    run_library(model, x[:4], trace)
    if prototype:
        run_prototype(rhs, x[:4])

    rows = {}
    plan = [("lib shared", run_library, (model, x, trace)),
            ("lib 1-at-a-time", run_library_loop, (model, x[:m], trace)),
            ("tdq shared", run_torchdiffeq, (rhs, x))]
    if torchode:
        plan.append(("torchode", run_torchode, (rhs, x)))
    if prototype:
        plan.append(("prototype", run_prototype, (rhs, x)))
    for name, fn, args in plan:
        r0 = rhs.rows
        sec, (z, delta, nfe, steps) = timed(fn, *args, repeats=1 if name == "lib 1-at-a-time" else repeats)
        if name != "lib 1-at-a-time":
            r0 = rhs.rows - (rhs.rows - r0) // repeats
        k = z.shape[0]
        err = (p_T.log_prob(z) + delta - exact[:k]).abs()
        if name == "lib shared":
            per_point = nfe
        elif name == "lib 1-at-a-time":
            per_point = nfe / k
        else:
            per_point = (rhs.rows - r0) / k
        rows[name] = {"time": sec * n / k, "nfe": nfe * n / k, "steps": steps, "err": float(err.max()),
                      "delta": delta, "z": z, "scaled": k < n, "per_point": per_point}
    ref = rows["lib shared"]["delta"]
    for r in rows.values():
        r["vs_lib"] = float((r["delta"] - ref[:r["delta"].shape[0]]).abs().max())
    z = rows["lib shared"]["z"]
    prior_gap = float((sde.prior_log_prob(z) - p_T.log_prob(z)).abs().max())

    # batch independence of torchode: points solved alone vs the same points inside the batch
    dep = {}
    for name, fn in (("torchode", run_torchode), ("prototype", run_prototype)):
        if name in rows:
            dep[name] = 0.0
            for i in range(min(check_points, n)):
                idx = torch.tensor([i])
                _, di, _, _ = fn(rhs.select(idx), x[idx])
                dep[name] = max(dep[name], float((di - rows[name]["delta"][i]).abs().max()))
    return {"rows": rows, "prior_gap": prior_gap, "batch_dep": dep}


def print_problem(d: int, trace: str, n: int, out: dict) -> None:
    rows = out["rows"]
    print(f"\n== d={d}, trace={trace}, N={n}, dopri5 rtol=atol={RTOL:g}, t_end={T_END:g} "
          f"(prior gap max {out['prior_gap']:.2e} nats, not in 'err') ==")
    print(f"{'engine':<17}{'time s':>9}{'NFE':>8}{'evals/pt':>9}{'steps mean':>11}{'steps max':>10}"
          f"{'err max':>10}{'|vs lib|':>10}")
    for name, r in rows.items():
        tag = "*" if r["scaled"] else " "
        print(f"{name:<17}{r['time']:>8.2f}{tag}{r['nfe']:>8.0f}{r['per_point']:>9.1f}{float(r['steps'].mean()):>11.1f}"
              f"{float(r['steps'].max()):>10.0f}{r['err']:>10.2e}{r['vs_lib']:>10.2e}")
    for name in out["batch_dep"]:
        sec = rows[name]["time"]
        print(f"ratios {name}: / 1-at-a-time = {sec / rows['lib 1-at-a-time']['time']:.4f} (target <= 0.05); "
              f"/ lib shared = {sec / rows['lib shared']['time']:.2f}, "
              f"/ tdq shared = {sec / rows['tdq shared']['time']:.2f} (target <= 2); "
              f"batch dependence max {out['batch_dep'][name]:.1e} nats")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--points", type=int, default=2000, help="N points per problem (quick run: 200)")
    p.add_argument("--dims", type=int, nargs="+", default=[2, 16, 64])
    p.add_argument("--traces", nargs="+", default=["exact", "hutchinson"], choices=["exact", "hutchinson"])
    p.add_argument("--loop-points", type=int, default=40,
                   help="points solved one at a time; its time and NFE are scaled to N (marked *)")
    p.add_argument("--check-points", type=int, default=3, help="points re-solved alone (batch dependence)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1,
                   help="batched engines: median of this many runs (the one-at-a-time loop runs once)")
    p.add_argument("--no-prototype", action="store_true", help="skip the vectorised dopri5 prototype")
    a = p.parse_args()
    if a.points < 1:
        raise ValueError(f"--points must be >= 1, got {a.points}")
    torch.set_num_threads(a.threads)
    try:
        importlib.import_module("torchode")
        have_torchode = True
    except ImportError as err:
        print(f"torchode skipped: {err}")
        have_torchode = False
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, float64, CPU; "
          "* = measured on --loop-points points and scaled to N")
    for d in a.dims:
        for trace in a.traces:
            print_problem(d, trace, a.points, bench_problem(d, trace, a.points, a.loop_points, a.check_points,
                                                           not a.no_prototype, a.repeats,
                                                           have_torchode))


if __name__ == "__main__":
    main()
