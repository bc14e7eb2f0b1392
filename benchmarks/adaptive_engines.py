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
- ``lib 1-at-a-time`` ``solvers.log_likelihood(per_sample=False)`` called on one point at a time
                    (torchdiffeq on batches of one: what batch-independent likelihoods cost
                    before the per-sample engine), timed on ``--loop-points`` points, scaled to N.
- ``tdq shared``    torchdiffeq ``odeint`` (dopri5, shared step) called directly on this file's
                    right-hand side -- the same function the per-sample engines call, so that
                    ``torchode / tdq shared`` compares the engines, not the right-hand sides.
- ``torchode``      ``torchode`` dopri5 with an ``IntegralController`` (per-sample step size,
                    per-sample accept/reject, per-sample time ``t[B]``) on the flat state
                    ``[B, d+1]``, with the per-sample analogue of torchdiffeq's mixed norm
                    ``max(rms(err_x), |err_delta|)``.  It evaluates every stage on the whole
                    batch, finished samples included.
- ``engine``        ``solvers.adaptive.solve_per_sample``: the library's vectorised dopri5 with
                    the same per-sample control, evaluating only the samples still running, on
                    this file's right-hand side.
- ``lib per_sample`` ``solvers.log_likelihood(per_sample=True)``: the same engine behind the
                    public API (its own right-hand side; ``evals/pt`` not reported, ``steps``
                    the mean only).

Printed per engine: wall time, NFE (network calls, each on the whole batch), accepted steps per
sample (mean/max), the largest integration error against the closed form, and the two ratios
(per-sample engine / one-at-a-time, target <= 1/20; per-sample engine / shared step, target
<= 2).  Integration error = ``|log p_T(z) + delta - log p_{t_end}(x)|`` with the *exact* terminal
marginal ``p_T`` in place of the N(0, I) prior, so that it measures the solver, not the prior
mismatch (printed once, separately, as ``prior gap``).  For Hutchinson that error is the
estimator's (the same probes in every engine), so the column ``|vs lib|`` gives the largest
difference from the library's shared-step result instead.  ``batch dependence``: a per-sample
engine's largest difference between a point solved alone and the same point inside the batch.

Measured (N = 2000, loaded 2-core CPU, one thread; timings vary by up to 2-3x between runs on
this machine, ratios within one run less so): the library's per-sample engine (``lib
per_sample``) takes 0.0017 / 0.0021 / 0.012 / 0.0058 / 0.073 / 0.015 of the one-at-a-time time
and 0.63 / 0.87 / 0.71 / 0.90 / 0.86 / 0.91 of the shared step's (d = 2, 16, 64; exact then
Hutchinson each), torchode 0.96-1.75x the shared step; every per-sample engine is
batch-independent to 2.6e-13 nats and 9-30x more accurate than the shared step at the same
tolerance (max error 2.3e-3 vs 1.4e-2 nats at d = 2, 1.8e-3 vs 9.5e-2 at d = 16, 7.8e-3 vs
1.5e-1 at d = 64, exact trace), because the shared step's error norm is an RMS over the batch.
The 1/20 target against one at a time is missed only at d = 64 with the exact trace (0.073),
where the 64 products per evaluation make the solve compute-bound (the shared step: 0.085).

Run:  python benchmarks/adaptive_engines.py [--points 2000] [--dims 2 16 64] [--loop-points 40] [--repeats 1]
[--no-engine]  (torchode 1.0.1 requires ``torchtyping``, itself pinning ``typeguard<3``; install it if missing.)
"""
from __future__ import annotations

import argparse
import sys
import importlib
import statistics
import time
from pathlib import Path

import torch

import scoresde
import solvers
from solvers.adaptive import solve_per_sample
from solvers.likelihood import _default_chunk

DT = torch.float64
RTOL = ATOL = 1e-5
T_END = 1e-5


# ----------------------------------------------------------------------------- problem
def make_target(d: int, k: int = 4, seed: int = 0) -> scoresde.GaussianMixture:
    """The likelihood benchmark's mixture (``benchmarks/likelihood.py``): the same problems."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from likelihood import make_target as likelihood_target
    return likelihood_target(d, k, seed)


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
    res = solvers.log_likelihood(model, x, trace, rtol=RTOL, atol=ATOL, t_end=T_END, per_sample=False, **kw)
    steps = torch.full((x.shape[0],), float(res.stats["accepted_steps"]), dtype=DT)
    return res.z, res.delta_log_prob, res.nfe, steps


def run_library_loop(model, x, trace):
    zs, ds, nfe, steps = [], [], 0, []
    for i in range(x.shape[0]):
        kw = {} if trace == "exact" else {"generator": probe_generators(1, start=i)}
        res = solvers.log_likelihood(model, x[i:i + 1], trace, rtol=RTOL, atol=ATOL, t_end=T_END,
                                     per_sample=False, **kw)       # torchdiffeq on a batch of one
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


# ----------------------------------------------------------------------------- library engine
def run_engine(rhs: AugmentedRHS, x, max_steps: int = 10_000):
    """``solvers.adaptive.solve_per_sample`` (per-sample dopri5 evaluating only the running
    samples) on this file's right-hand side, with :func:`per_sample_mixed_norm`."""
    b, d = x.shape
    y0 = torch.cat([x, x.new_zeros(b, 1)], dim=1)
    c0 = rhs.calls
    with torch.no_grad():
        res = solve_per_sample(rhs, y0, T_END, 1.0, rtol=RTOL, atol=ATOL, norm=per_sample_mixed_norm(d),
                               max_steps=max_steps)
    if not bool((res.status == 0).all()):
        raise RuntimeError(f"engine status {sorted(set(res.status_names))}")
    return res.y[:, :d], res.y[:, d], rhs.calls - c0, res.accepted.to(DT)


def run_library_per_sample(model, x, trace):
    """``solvers.log_likelihood(per_sample=True)``: the engine behind the public API."""
    kw = {} if trace == "exact" else {"generator": probe_generators(x.shape[0])}
    res = solvers.log_likelihood(model, x, trace, rtol=RTOL, atol=ATOL, t_end=T_END, per_sample=True, **kw)
    steps = torch.tensor(res.stats["accepted"], dtype=DT)
    return res.z, res.delta_log_prob, res.nfe, steps


# ----------------------------------------------------------------------------- one problem
def timed(fn, *args, repeats: int = 1):
    """Median wall time of ``repeats`` runs and the last run's output."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bench_problem(d: int, trace: str, n: int, loop_points: int, check_points: int, engine: bool,
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
    if engine:
        run_engine(rhs, x[:4])
        run_library_per_sample(model, x[:4], trace)

    rows = {}
    plan = [("lib shared", run_library, (model, x, trace)),
            ("lib 1-at-a-time", run_library_loop, (model, x[:m], trace)),
            ("tdq shared", run_torchdiffeq, (rhs, x))]
    if torchode:
        plan.append(("torchode", run_torchode, (rhs, x)))
    if engine:
        plan.append(("engine", run_engine, (rhs, x)))
        plan.append(("lib per_sample", run_library_per_sample, (model, x, trace)))
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
        elif name == "lib per_sample":
            per_point = float("nan")
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
    for name, fn in (("torchode", run_torchode), ("engine", run_engine)):
        if name in rows:
            dep[name] = 0.0
            for i in range(min(check_points, n)):
                idx = torch.tensor([i])
                _, di, _, _ = fn(rhs.select(idx), x[idx])
                dep[name] = max(dep[name], float((di - rows[name]["delta"][i]).abs().max()))
    if "lib per_sample" in rows:
        dep["lib per_sample"] = 0.0
        for i in range(min(check_points, n)):
            kw = {} if trace == "exact" else {"generator": probe_generators(1, start=i)}
            res = solvers.log_likelihood(model, x[i:i + 1], trace, rtol=RTOL, atol=ATOL, t_end=T_END,
                                         per_sample=True, **kw)
            dep["lib per_sample"] = max(dep["lib per_sample"],
                                        float((res.delta_log_prob[0] - rows["lib per_sample"]["delta"][i]).abs()))
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
    for name in [n for n in ("torchode", "engine", "lib per_sample") if n in rows]:
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
    p.add_argument("--no-engine", action="store_true", help="skip the library's per-sample engine")
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
                                                           not a.no_engine, a.repeats,
                                                           have_torchode))


if __name__ == "__main__":
    main()
