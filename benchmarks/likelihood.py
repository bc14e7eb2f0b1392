"""Likelihood benchmark: wall time, NFE and error against the exact
log-density, side by side in one run, for N points (default 512) of a d=16 Gaussian mixture
(4 components, full anisotropic covariances) with its exact analytic model.

Methods (all float64, CPU, the same exact network, the same process: EDMSDE, alpha = 1,
sigma = t in [0.002, 80], prior N(0, 80^2 I), so that every method integrates the same ODE
dx/dsigma = eps(x, sigma) in the same variable):

  (a) score_sde  -- the classic approach of the score_sde reference code, reimplemented here:
                    scipy.integrate.solve_ivp(RK45) on the flattened [x, logp] batch, numpy <->
                    torch conversions at every evaluation, the drift and a reverse-mode
                    Hutchinson product (Rademacher, one probe) computed by two separate model
                    calls, as score_sde's ``drift_fn`` and ``div_fn`` do.  (score_sde casts to
                    float32 at every evaluation; this reimplementation keeps float64.)
  (b) k-diffusion -- ``k_diffusion.sampling.log_likelihood`` (torchdiffeq dopri5, one
                    Rademacher probe), if installed (``pip install --no-deps k-diffusion``); only
                    its sampling module is loaded (its package __init__ needs torchvision etc.).
  ours            -- ``solvers.log_likelihood`` with the Hutchinson estimator (one probe: the
                    same estimator as (a) and (b)) and with the exact trace.

Error = the integration error per sample, |log_prob - log pi(z) + log p_T(z) - log p_{t_end}(x)|
(pi the N(0, 80^2 I) prior every method uses, p_T the exact terminal marginal): the prior
mismatch log pi(z) - log p_T(z) is common to all methods and is printed once, separately.
With one Hutchinson probe the error is dominated by the estimator's noise, not the solver.

A single-probe method reduces its estimator noise only by repeating the solve with fresh
probes and averaging (score_sde does this over the data set: ``bpd_num_repeats``).  So each
baseline is run --solves times (independent probes) at rtol=atol=--rtol and at 1e-3, and the
mean of the first m in {1, 4, 16} solves is one accuracy level; ours is run with 1 probe, with
4 or 16 probes in one batched pass, and with the exact trace, at several tolerances.  Printed:

- same estimator, same tolerance (one probe, one solve): the implementation overhead alone;
- at equal or smaller error: for every baseline configuration, the fastest of ours whose RMS
  error is <= its RMS error, and the ratio of times;
- cost at equal accuracy: per accuracy level m, the baseline at its cheaper tolerance vs ours.

Times: all runs are interleaved round by round (the machine may be shared: load then falls on
every method alike) after one warm-up run each; ours, the median of --repeats runs; a
baseline's m solves, m times the median of its --solves single-solve times.  ``--products``
also prints the forward-mode (jvp) vs reverse-mode (vjp) timing of one evaluation of the exact
divergence (the numbers in solvers/likelihood.py).

Measured (shared, loaded 2-core CPU, 1 thread, defaults; two runs): same estimator and
tolerance: 1.13-1.20x vs (a), 0.97-1.11x vs (b) (the same algorithm as (b); the network
dominates).  Cost at equal accuracy, each baseline at its cheaper tolerance:
one single-probe solve (RMS 3.24 nats) 1.13-1.19x vs (a), 0.97-0.99x vs (b) (1.9-2.2x against
their 1e-5 runs); 4 averaged solves (RMS 1.56): ours with 4 probes in one pass, 2.12-2.20x vs
(a), 1.82x vs (b); 16 averaged solves (RMS 0.79): ours with the exact trace at rtol 1e-3
(RMS 0.11), 3.10-3.35x vs (a), 2.57-2.88x vs (b).

Run:  python benchmarks/likelihood.py [--n 512] [--repeats 5] [--solves 16] [--products] [--threads 1]
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import scoresde
import solvers
from solvers.base import CheckedModel
from solvers.likelihood import _Problem, _default_chunk
from solvers.ode import pf_ode_drift

sys.path.insert(0, str(Path(__file__).resolve().parent))
from validation.peers import MLP  # noqa: E402  (the benchmarks' one network)

DT = torch.float64


# ----------------------------------------------------------------------------- problem
def make_target(d: int = 16, k: int = 4, seed: int = 0) -> scoresde.GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    means = 6.0 * torch.randn(k, d, generator=g, dtype=DT) / math.sqrt(d)
    a = torch.randn(k, d, d, generator=g, dtype=DT)
    covs = 0.3 * a @ a.transpose(1, 2) / d + 0.05 * torch.eye(d, dtype=DT)
    w = torch.softmax(torch.randn(k, generator=g, dtype=DT), 0)
    return scoresde.GaussianMixture(w, means, covs)


# ----------------------------------------------------------------------------- (a) score_sde
def score_sde_likelihood(eps_net, sde, x: torch.Tensor, t_end: float, rtol: float, atol: float, seed: int):
    """score_sde's ``get_likelihood_fn`` (likelihood.py), reimplemented for this process:
    RK45 from scipy on the flattened batch, numpy conversions at every evaluation, the drift
    and the Hutchinson divergence from two separate model calls."""
    from scipy import integrate

    shape = x.shape
    gen = torch.Generator().manual_seed(seed)
    epsilon = (torch.randint(0, 2, shape, generator=gen) * 2 - 1).to(x.dtype)
    calls = [0]

    def drift_fn(xx, t):                         # PF drift: f x - g^2/2 score = -t score = eps (EDM)
        calls[0] += 1
        return eps_net(xx, t)

    def div_fn(xx, t, eps):                      # Hutchinson, reverse mode
        with torch.enable_grad():
            xx.requires_grad_(True)
            fn_eps = torch.sum(drift_fn(xx, t) * eps)
            grad_fn_eps = torch.autograd.grad(fn_eps, xx)[0]
        xx.requires_grad_(False)
        return torch.sum(grad_fn_eps * eps, dim=tuple(range(1, len(xx.shape))))

    def to_flattened_numpy(v):
        return v.detach().cpu().numpy().reshape((-1,))

    def from_flattened_numpy(v, shp):
        return torch.from_numpy(v.reshape(shp))

    def ode_func(t, y):
        sample = from_flattened_numpy(y[:-shape[0]], shape).to(x.device).type(x.dtype)
        vec_t = torch.ones(sample.shape[0], device=sample.device, dtype=x.dtype) * t
        drift = to_flattened_numpy(drift_fn(sample, vec_t))
        logp_grad = to_flattened_numpy(div_fn(sample, vec_t, epsilon))
        return np.concatenate([drift, logp_grad], axis=0)

    init = np.concatenate([to_flattened_numpy(x), np.zeros((shape[0],))], axis=0)
    with torch.no_grad():
        solution = integrate.solve_ivp(ode_func, (t_end, sde.T), init, rtol=rtol, atol=atol, method="RK45")
    zp = solution.y[:, -1]
    z = from_flattened_numpy(zp[:-shape[0]], shape).to(x.dtype)
    delta = from_flattened_numpy(zp[-shape[0]:], (shape[0],)).to(x.dtype)
    return delta, z, calls[0]


# ----------------------------------------------------------------------------- (b) k-diffusion
def load_k_diffusion_sampling():
    """k_diffusion.sampling without running k_diffusion/__init__.py (which imports torchvision):
    the package's shared loader; None (with the reason printed) when it cannot be loaded."""
    from scoresde.integrations.kdiffusion import load_sampling
    try:
        return load_sampling()
    except ImportError as err:
        print(f"k-diffusion is unavailable: {err}")
        return None


# ----------------------------------------------------------------------------- timing
def median_time(fn, repeats: int):
    out = fn()                                    # warm-up (and the result we report)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def integration_error(delta, z, target, sde, x, t_end) -> torch.Tensor:
    """Per sample delta + log p_T(z) - log p_{t_end}(x) (signed): the error of the integral (and of
    the trace estimator), with the exact terminal marginal in place of the prior."""
    return delta + target.marginal(sde, sde.T).log_prob(z) - target.marginal(sde, t_end).log_prob(x)


def rms(e: torch.Tensor) -> float:
    return float(torch.sqrt((e * e).mean()))


def run_benchmark(n: int, repeats: int, rtol: float, solves: int) -> None:
    target = make_target()
    sde = scoresde.EDMSDE(sigma_min=0.002, sigma_max=80.0)
    t_end = sde.default_t_end
    model = target.as_model(sde, "eps")          # net(x, t) = exact eps, t = sigma
    eps_net = model.net
    x = target.sample(n, torch.Generator().manual_seed(1))
    print(f"problem: {n} points of a d={target.dim} Gaussian mixture (K={target.num_components}, full covariances), "
          f"EDMSDE sigma in [{t_end}, {sde.T}], float64, CPU, torch threads={torch.get_num_threads()}")
    kd = load_k_diffusion_sampling()

    def kd_solve(tol, seed):
        torch.manual_seed(seed)
        rec = {}
        denoiser = lambda xx, sigma: xx - sigma[:, None] * eps_net(xx, sigma)  # noqa: E731
        orig = kd.odeint

        def odeint_rec(*a, **kw):                # records the latent (k-diffusion returns only
            sol = orig(*a, **kw)                 # log_prob); costs nothing
            rec["z"] = sol[0][-1]
            return sol

        kd.odeint = odeint_rec
        try:
            ll, info = kd.log_likelihood(denoiser, x, t_end, sde.T, atol=tol, rtol=tol)
        finally:
            kd.odeint = orig
        z = rec["z"]
        return ll - torch.distributions.Normal(0, sde.T).log_prob(z).flatten(1).sum(1), z, info["fevals"]

    # Baselines: `solves` independent single-probe solves per tolerance (seed = round); averaging
    # the first m of them is how a single-probe method reduces its estimator noise (score_sde
    # repeats the evaluation over the data set: bpd_num_repeats).  Ours: `repeats` runs of each
    # configuration.  All runs are interleaved round by round, so that a shared machine's load
    # falls on every method alike; times are medians over the rounds.
    baselines = [("(a) score_sde", lambda tol, seed: score_sde_likelihood(eps_net, sde, x, t_end, tol, tol, seed))]
    if kd is not None:
        baselines.append(("(b) k-diffusion", kd_solve))
    else:
        print("(b) k-diffusion: not installed (pip install --no-deps k-diffusion); skipped")

    def ours(trace, tol, probes=1):
        def go(seed):
            r = solvers.log_likelihood(model, x, trace, rtol=tol, atol=tol, t_end=t_end, probes=probes,
                                       generator=torch.Generator().manual_seed(0) if trace == "hutchinson" else None)
            return r.delta_log_prob, r.z, r.nfe
        return go

    configs = []                                   # (kind, name, label, tol, probes/trace, fn)
    for name, fn in baselines:
        for tol in (rtol, 1e-3):
            configs.append(dict(kind="base", name=name, tol=tol, fn=(lambda seed, fn=fn, tol=tol: fn(tol, seed))))
    for tol in (rtol, 1e-3):
        configs.append(dict(kind="ours", label=f"ours hutchinson, 1 probe, rtol=atol={tol:g}", trace="hutchinson",
                            tol=tol, probes=1, fn=ours("hutchinson", tol)))
    for k in (4, 16):
        configs.append(dict(kind="ours", label=f"ours hutchinson, {k} probes (one pass), rtol=atol=1e-3",
                            trace="hutchinson", tol=1e-3, probes=k, fn=ours("hutchinson", 1e-3, k)))
    for tol in (rtol, 1e-4, 1e-3):
        configs.append(dict(kind="ours", label=f"ours exact trace, rtol=atol={tol:g}", trace="exact", tol=tol,
                            probes=None, fn=ours("exact", tol)))
    for c in configs:
        c["times"], c["runs"] = [], []
        c["fn"](0)                                 # warm-up
    rounds = max(solves, repeats)
    print(f"running {rounds} interleaved rounds ...", flush=True)
    for r in range(rounds):
        for c in configs:
            if c["kind"] == "ours" and r >= repeats:
                continue
            t0 = time.perf_counter()
            delta, z, nfe = c["fn"](r)
            c["times"].append(time.perf_counter() - t0)
            if c["kind"] == "base" or r == 0:
                c["runs"].append((integration_error(delta, z, target, sde, x, t_end), nfe, z))

    ms = [m for m in (1, 4, 16) if m <= solves]
    base_rows, ours_rows = [], []
    print(f"\n{'method':52s} {'time s':>8s} {'nfe':>7s}   integration error (nats): mean, rms, max")
    for c in configs:
        t1 = statistics.median(c["times"])
        if c["kind"] == "base":
            for m in ms:                           # m solves cost m times the median single solve
                err = torch.stack([run[0] for run in c["runs"][:m]]).mean(0).abs()
                nfe = sum(run[1] for run in c["runs"][:m])
                row = dict(label=f"{c['name']} rtol=atol={c['tol']:g}, mean of {m} solve{'s' if m > 1 else ''}",
                           time=m * t1, nfe=nfe, mean=float(err.mean()), rms=rms(err), max=float(err.max()),
                           tol=c["tol"], m=m, name=c["name"])
                base_rows.append(row)
        else:
            err = c["runs"][0][0].abs()
            row = dict(label=c["label"], time=t1, nfe=c["runs"][0][1], mean=float(err.mean()), rms=rms(err),
                       max=float(err.max()), trace=c["trace"], tol=c["tol"], probes=c["probes"], z=c["runs"][0][2])
            ours_rows.append(row)
    for row in base_rows + ours_rows:
        print(f"  {row['label']:50s} {row['time']:8.2f} {row['nfe']:7d}   {row['mean']:.2e} {row['rms']:.2e} "
              f"{row['max']:.2e}")

    z = ours_rows[-1]["z"]
    mismatch = (torch.distributions.Normal(0, sde.T).log_prob(z).sum(1) - target.marginal(sde, sde.T).log_prob(z)).abs()
    print(f"\nprior mismatch |log N(z; 0, 80^2 I) - log p_T(z)|, common to all methods and excluded above: "
          f"mean {float(mismatch.mean()):.2e} nats")

    print("\nsame estimator, same tolerance (1 probe, 1 solve): baseline time / ours = implementation overhead")
    for tol in (rtol, 1e-3):
        mine = next(r for r in ours_rows if r["trace"] == "hutchinson" and r["probes"] == 1 and r["tol"] == tol)
        for base in (r for r in base_rows if r["tol"] == tol and r["m"] == 1):
            print(f"  rtol={tol:g}: {base['name']}: {base['time'] / mine['time']:.2f}x "
                  f"(nfe {base['nfe']} vs {mine['nfe']})")
    print("\nat equal or smaller error: for each baseline configuration, the fastest of ours with rms error <= its rms")
    for base in base_rows:
        ok = [r for r in ours_rows if r["rms"] <= base["rms"]]
        if not ok:
            print(f"  {base['label']:50s} rms {base['rms']:.2e}: none of ours is as accurate")
            continue
        best = min(ok, key=lambda r: r["time"])
        print(f"  {base['label']:50s} rms {base['rms']:.2e} {base['time']:6.2f} s | {best['label']} rms "
              f"{best['rms']:.2e} {best['time']:6.2f} s | {base['time'] / best['time']:.2f}x")
    print("\ncost at equal accuracy: for the accuracy of m averaged single-probe solves, each baseline at its cheapest "
          "(either tolerance) vs the fastest of ours at least as accurate")
    for m in ms:
        for name in dict.fromkeys(r["name"] for r in base_rows):
            cands = [r for r in base_rows if r["name"] == name and r["m"] == m]
            level = max(r["rms"] for r in cands)
            cheapest = min(cands, key=lambda r: r["time"])
            ok = [r for r in ours_rows if r["rms"] <= level]
            if not ok:
                print(f"  m={m:2d} {name}: rms {level:.2e}: none of ours is as accurate")
                continue
            best = min(ok, key=lambda r: r["time"])
            print(f"  m={m:2d} {name:16s} rms <= {level:.2e}: {cheapest['time']:6.2f} s (rtol={cheapest['tol']:g}) vs "
                  f"ours {best['time']:6.2f} s [{best['label'][5:]}, rms {best['rms']:.2e}]: "
                  f"{cheapest['time'] / best['time']:.2f}x")


# ----------------------------------------------------------------------------- jvp vs vjp
def run_products(repeats: int) -> None:
    """Forward (jvp) vs reverse (vjp) mode for the exact divergence, through the library's own
    product code, timed interleaved (vjp, jvp, vjp, ...) so that a shared machine's load hits
    both alike; medians."""
    print("\nexact divergence, one evaluation of the drift and its trace (solvers.likelihood), ms, median of "
          f"{max(9, 3 * repeats)} interleaved runs:")
    print(f"  {'net, dtype, d, batch':34s} {'vjp':>9s} {'jvp':>9s} {'jvp/vjp':>8s}")
    sde = scoresde.VPSDE()
    cases = []
    for dtype in (torch.float32, torch.float64):
        for d, b in ((16, 512), (64, 256), (256, 64)):
            torch.manual_seed(0)
            model = scoresde.ScoreModel(MLP(d).to(dtype).eval(), sde, "eps")
            cases.append((f"MLP, {str(dtype)[6:]}, d={d}, B={b}", model, torch.randn(b, d, dtype=dtype)))
    target = make_target()
    cases.append(("exact GMM, float64, d=16, B=512", target.as_model(sde, "eps"),
                  target.sample(512, torch.Generator().manual_seed(1))))
    for name, model, x in cases:
        d = x.shape[1]
        t64 = torch.tensor(0.5, dtype=torch.float64)
        fns = {}
        for products in ("vjp", "jvp"):
            chunk = _default_chunk(d, x.shape[0], x.device)     # the library's default chunking
            prob = _Problem(model, t_end=1e-3, trace="exact", products=products, chunk=chunk, method="dopri5",
                            steps=None, rtol=1e-5, atol=1e-5, max_steps=10, dtype=x.dtype, device=x.device)
            drift = pf_ode_drift(model, CheckedModel(model, None, False), x)
            fn = prob._vjp if products == "vjp" else prob._jvp
            fns[products] = (lambda fn=fn, drift=drift: fn(drift, x, t64, None))
        times = {"vjp": [], "jvp": []}
        with torch.no_grad():
            for p in fns:
                fns[p]()                                    # warm-up
            for _ in range(max(9, 3 * repeats)):
                for p in ("vjp", "jvp"):
                    t0 = time.perf_counter()
                    fns[p]()
                    times[p].append(time.perf_counter() - t0)
        tv, tj = statistics.median(times["vjp"]), statistics.median(times["jvp"])
        print(f"  {name:34s} {tv * 1e3:9.2f} {tj * 1e3:9.2f} {tj / tv:8.2f}", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rtol", type=float, default=1e-5, help="tolerance of the baselines (rtol = atol)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--solves", type=int, default=16, help="independent solves per baseline configuration (averaged)")
    p.add_argument("--products", action="store_true", help="also time jvp vs vjp on an MLP")
    p.add_argument("--only-products", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.only_products:
        run_benchmark(args.n, args.repeats, args.rtol, args.solves)
    if args.products or args.only_products:
        run_products(args.repeats)


if __name__ == "__main__":
    main()
