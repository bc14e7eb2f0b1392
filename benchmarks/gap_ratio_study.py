"""Which ``min_gap_ratio`` should the multistep exponential integrators use by default?

For every built-in SDE family x schedule (uniform / log_snr / quadratic / karras) x steps
(3..50), every multistep method is run with each candidate bound of the step-ratio rule of
``ExponentialMultistep.stable_orders`` (and one smooth alternative, below), and its error is
divided by the first-order method's error on the same grid: DDIM for the ODE methods, the
first-order SDE-DPM-Solver++ (eta = 1, all orders 1) for the SDE variants.  Everything in
float64 with exact models:

- ODE error: rms over a few exact samples at T against the exact flow (``Gaussian.flow``) or,
  for mixtures, a tight dopri8 ``pf_ode`` reference computed once per SDE (all grids of one
  SDE share their end points).
- SDE error: |mean - exact mean| + |cov - exact cov|_F of the exact output moments
  (``validation.metrics.exact_moments``; Gaussian data only, the sampler is then affine).

Rules compared (per step i of order k, step sizes h in lambda = log(alpha/sigma)):

- ``gap r``: keep the largest k' <= k with h_{i-j} >= r h_i for all 1 <= j < k' (the library's
  rule; r = 0 is off).
- ``wsum B`` (alternative): keep the largest k' <= k whose exponential-Adams (Lagrange)
  weights satisfy sum_j |c_j| / |sum_j c_j| <= B (an extrapolation-amplification bound).

Identical order sequences are solved once, so rules that change nothing cost nothing.

Tuning set: the Gaussian d=4 and the 2-D mixture of ``validation.problems``; held-out: a
d=8, 5-component mixture with random full covariances (ODE) and a d=8 Gaussian of another
seed (SDE).  Run: ``.venv/bin/python benchmarks/gap_ratio_study.py [--quick] [--json out.json]``.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import scoresde  # noqa: E402
import solvers  # noqa: E402
from solvers.dpm import _MultistepSDE  # noqa: E402
from solvers.exponential import lagrange_weights  # noqa: E402
from solvers.timesteps import make_grid  # noqa: E402
from validation.metrics import exact_moments  # noqa: E402
from validation.problems import gaussian_problem, mixture2d_problem  # noqa: E402

F64 = torch.float64

SDES = {name: partial(scoresde.make_sde, name)
        for name in ("vp", "subvp", "ve", "cosine", "edm", "rf", "discrete")}
SCHEDULES = ("uniform", "log_snr", "quadratic", "karras")
STEPS = (3, 5, 8, 10, 15, 20, 50)
THRESHOLDS = (0.0, 0.04, 0.1, 0.15, 0.2, 0.25, 0.33, 0.5)
WSUM_BOUNDS = (4.0, 5.0, 6.0, 8.0, 11.0, 26.0)
RULES = [("gap", r) for r in THRESHOLDS] + [("wsum", b) for b in WSUM_BOUNDS]

ODE_METHODS = {
    "dpmpp_2m": ("dpmpp_2m", {}),
    "dpmpp_3m": ("dpmpp_3m", {}),
    "unipc2_bh1": ("unipc", {"order": 2, "variant": "bh1"}),
    "unipc2_bh2": ("unipc", {"order": 2, "variant": "bh2"}),
    "unipc3_bh1": ("unipc", {"order": 3, "variant": "bh1"}),
    "unipc3_bh2": ("unipc", {"order": 3, "variant": "bh2"}),
}
SDE_METHODS = {"dpmpp_2m_sde": ("dpmpp_2m_sde", {}), "dpmpp_3m_sde": ("dpmpp_3m_sde", {})}


@dataclass
class SDEDPM1(_MultistepSDE):
    """First-order SDE-DPM-Solver++ (eta = 1, all orders 1): the SDE reference."""

    order: ClassVar[int] = 1


# ------------------------------------------------------------------------------- rules
def rule_orders(solver, h: list[float], rule: tuple[str, float]) -> tuple[int, ...]:
    kind, v = rule
    base = solver.orders_for(len(h))
    if kind == "gap":
        solver.min_gap_ratio = v
        return tuple(type(solver).stable_orders(solver, base, h)[0])
    out = []
    for i, k in enumerate(base):
        k_new = k
        while k_new > 1 and i >= 1:
            nodes = [-sum(h[i - m:i]) for m in range(min(k_new, i + 1))]
            if len(nodes) < k_new:            # beyond the history (singlestep warm-up): kept
                break
            c = lagrange_weights(nodes, h[i])
            if sum(abs(w) for w in c) <= v * abs(sum(c)):
                break
            k_new -= 1
        out.append(k_new)
    return tuple(out)


def forced(method: str, opts: dict, orders: tuple[int, ...]):
    """A solver instance that runs exactly ``orders`` (min_gap_ratio off, orders imposed)."""
    s = solvers.get(method, **opts, min_gap_ratio=0.0)
    s.stable_orders = lambda o, h: (list(orders), [i for i, (a, b) in enumerate(zip(o, orders)) if a != b])
    return s


# --------------------------------------------------------------------------- problems
def mixture_problem(d: int = 8, k: int = 5, seed: int = 7) -> scoresde.GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    means = 1.5 * torch.randn(k, d, generator=g, dtype=F64)
    a = torch.randn(k, d, d, generator=g, dtype=F64) / math.sqrt(d)
    covs = 0.3 * a @ a.transpose(1, 2) + 0.05 * torch.eye(d, dtype=F64)
    w = torch.rand(k, generator=g, dtype=F64) + 0.3
    return scoresde.GaussianMixture(w / w.sum(), means, covs)


@dataclass
class Problem:
    name: str
    target: object
    exact: bool
    samples: int
    sde_too: bool
    ode_too: bool = True


def reference(p: Problem, sde, x: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
    if p.exact:
        return p.target.flow(x, t0, t1, sde)
    return solvers.sample(p.target.as_model(sde), x, "pf_ode", t_start=t0, t_end=t1, rtol=1e-11, atol=1e-11,
                          ode_method="dopri8", max_steps=200_000).x


def rms(a, b) -> float:
    return float((a - b).pow(2).mean().sqrt())


def sde_error(p: Problem, sde, t: list[float], solver) -> float:
    model = p.target.as_model(sde)
    s, e = p.target.marginal(sde, t[0]), p.target.marginal(sde, t[-1])
    mean, cov = exact_moments(model, solver, None, s.mean, s.cov, timesteps=t)[:2]
    return float((mean - e.mean).norm() + (cov - e.cov).norm())


# ----------------------------------------------------------------------------- study
def study(p: Problem, steps=STEPS, sdes=SDES) -> list[dict]:
    rows = []
    for sde_name, make in sdes.items():
        sde = make()
        model = p.target.as_model(sde)
        T, te = float(sde.T), float(sde.default_t_end)
        x = p.target.marginal(sde, T).sample(p.samples, torch.Generator().manual_seed(1))
        ref = reference(p, sde, x, T, te) if p.ode_too else None
        for sched in SCHEDULES:
            for n in steps:
                t = make_grid(sde, n, sched).t.tolist()
                lam = 0.5 * sde.log_snr(torch.tensor(t, dtype=F64))
                h = (lam[1:] - lam[:-1]).tolist()
                gaps = [h[i - 1] / h[i] for i in range(1, n)]
                row = dict(sde=sde_name, schedule=sched, steps=n, min_ratio=min(gaps, default=float("nan")), res={})
                if p.ode_too:
                    row["ode_ref"] = rms(solvers.sample(model, x, "ddim", timesteps=t).x, ref)
                families = ([(ODE_METHODS, False)] if p.ode_too else []) + ([(SDE_METHODS, True)] if p.sde_too else [])
                if p.sde_too:
                    row["sde_ref"] = sde_error(p, sde, t, SDEDPM1())
                for methods, is_sde in families:
                    for label, (m, opts) in methods.items():
                        probe = solvers.get(m, **opts)
                        cache: dict = {}
                        res = {}
                        for rule in RULES:
                            o = rule_orders(probe, h, rule)
                            if o not in cache:
                                s = forced(m, opts, o)
                                if is_sde:
                                    err = sde_error(p, sde, t, s)
                                else:
                                    out = solvers.sample(model, x, s, timesteps=t, nonfinite="return").x
                                    err = rms(out, ref) if out.shape == ref.shape else float("inf")
                                cache[o] = err / row["sde_ref" if is_sde else "ode_ref"]
                            res[f"{rule[0]}{rule[1]:g}"] = (cache[o], o != rule_orders(probe, h, ("gap", 0.0)))
                        row["res"][label] = res
                rows.append(row)
    return rows


def summarise(rows: list[dict], title: str) -> None:
    labels = list(rows[0]["res"])
    rules = [f"{k}{v:g}" for k, v in RULES]
    print(f"\n=== {title}: {len(rows)} grids; ratio = error / first-order error on the same grid")
    print("rule      " + "".join(f"{lab:>25}" for lab in labels))
    print("          " + "".join(f"{'worst  med  n>2  lsnr':>25}" for _ in labels))
    for r in rules:
        cells = []
        for lab in labels:
            q = [row["res"][lab][r][0] for row in rows]
            ls = [row["res"][lab][r][0] / row["res"][lab]["gap0"][0] for row in rows if row["schedule"] == "log_snr"]
            gm = math.exp(statistics.fmean(math.log(v) for v in ls))
            cells.append(f"{max(q):8.3g} {statistics.median(q):5.2f} {sum(v > 2 for v in q):3d} {gm:6.3f}")
        print(f"{r:<10}" + "".join(f"{c:>25}" for c in cells))


def change_counts(rows: list[dict], title: str) -> None:
    """Per rule, over all methods: (grid, method) pairs whose orders the rule changes, how many
    of them got better / worse by more than 10 %, and the largest worsening factor."""
    print(f"\n--- {title}: pairs changed vs off: n, better>10%, worse>10%, max worsening x, max ratio after")
    for kind, v in RULES[1:]:
        rule = f"{kind}{v:g}"
        pairs = [(res["gap0"][0], res[rule][0]) for row in rows for res in row["res"].values() if res[rule][1]]
        worse = [b / a for a, b in pairs if b > 1.1 * a]
        print(f"  {rule:<9} {len(pairs):4d} {sum(b < a / 1.1 for a, b in pairs):4d} {len(worse):4d}"
              f" {max(worse, default=1.0):7.2f} {max((b for a, b in pairs if b > 1.1 * a), default=0.0):7.2f}")


def changed(rows: list[dict], rule: str) -> None:
    """The grids whose orders ``rule`` changes against the rule switched off."""
    print(f"\n--- grids changed by {rule} (ratio to first order: off -> {rule})")
    for row in rows:
        for lab, res in row["res"].items():
            if res[rule][1]:
                a, b = res["gap0"][0], res[rule][0]
                print(f"  {row['sde']:>8} {row['schedule']:>9} {row['steps']:>3}  {lab:<13} {a:9.3g} -> {b:9.3g}"
                      f"  ({'better' if b < a else 'worse'} x{max(a, b) / max(min(a, b), 1e-300):.2f})"
                      f"  min h_(i-1)/h_i {row['min_ratio']:.3f}")


def worst(rows: list[dict], rule: str, top: int = 3) -> None:
    """Per method, the grids with the largest ratio under ``rule`` (and with the rule off)."""
    print(f"\n--- worst grids under {rule} (ratio; off in brackets)")
    for lab in rows[0]["res"]:
        w = sorted(rows, key=lambda r: -r["res"][lab][rule][0])[:top]
        print(f"  {lab:<13}" + "; ".join(f"{r['sde']} {r['schedule']} {r['steps']}: {r['res'][lab][rule][0]:.3g}"
                                         f" ({r['res'][lab]['gap0'][0]:.3g})" for r in w))


def main() -> None:
    torch.set_num_threads(1)        # tiny tensors: intra-op threads only cost (10x on a busy machine)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="steps 5, 10 only (a smoke run)")
    ap.add_argument("--json", default=None, help="write the raw rows here")
    ap.add_argument("--changed", default="gap0.25,gap0.33", help="rules whose changed grids are listed")
    ap.add_argument("--only", default="tune,held", help="which sets to run: tune, held (comma-separated)")
    args = ap.parse_args()
    steps = (5, 10) if args.quick else STEPS
    problems = {
        "tune: Gaussian d=4": Problem("gauss4", gaussian_problem(4, 0), True, 8, True),
        "tune: 2-D mixture": Problem("mix2", mixture2d_problem(), False, 16, False),
        "held-out: mixture d=8 K=5 (ODE) + Gaussian d=8 seed 3 (SDE)": None,
    }
    out = {}
    for title, p in problems.items():
        if title.split(":")[0].replace("held-out", "held") not in args.only.split(","):
            continue
        t0 = time.perf_counter()
        if p is None:
            rows = study(Problem("mix8", mixture_problem(), False, 16, False), steps)
            sde_rows = study(Problem("gauss8", gaussian_problem(8, 3), True, 8, True, False), steps)
            for r, s in zip(rows, sde_rows):
                r["res"].update({k: v for k, v in s["res"].items() if k in SDE_METHODS})
        else:
            rows = study(p, steps)
        summarise(rows, title)
        change_counts(rows, title)
        for rule in args.changed.split(","):
            changed(rows, rule)
        for rule in ["gap0"] + args.changed.split(","):
            worst(rows, rule)
        print(f"({time.perf_counter() - t0:.0f} s)")
        out[title] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
