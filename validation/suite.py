"""The accuracy suite: every solver against exact answers, a verdict, and a report.

``python -m validation`` (the quick tier, < 3 minutes on 2 CPU cores) or ``--full``;
``--methods``, ``--sdes``, ``--out`` select; ``--quiet`` silences the progress bar.

Sections (``--sections``; all by default):

- ``det``: deterministic methods on a d=4 Gaussian (exact flow), a 2-D anisotropic
  well-separated mixture and diagonal mixtures in d=64 (and d=3072, ``--full``) under VP,
  sub-VP, VE, cosine, EDM and rectified flow: error vs NFE (5..200), fitted order on a doubling
  ladder vs theory, NFE to reach 1e-2 / 1e-3 / 1e-4.
- ``grids``: euler, heun and dpmpp_2m under each schedule (uniform t, log-SNR, quadratic,
  Karras), per SDE, on the 2-D mixture.
- ``stoch``: stochastic methods, weak errors (mean, covariance) on the Gaussian (exact moments
  by linearity for affine samplers, else Monte Carlo with its floor) and sliced Wasserstein on
  the 2-D mixture (floor: two independent exact sets of the same size).
- ``lik``: ``solvers.log_likelihood`` vs tolerance and NFE, exact trace and Hutchinson.
- ``fewstep``: ``method="auto"`` against every peer configuration (diffusers, k-diffusion, their
  documented grids) on each peer's own map, NFE 5..50, on the *held-out* problems of
  :mod:`validation.heldout` (two of them in the quick tier, all six in ``--full``); the rule
  was tuned on the other half (``python -m validation.fewstep --half tuning``).
- ``peers``: diffusers and k-diffusion (the ``bench`` extra), converted exactly, order-checked,
  against our methods on the same maps; per-step overhead.
- ``stochpeers``: our stochastic samplers against the peers' (k-diffusion, diffusers, score_sde's
  PC) by distribution at NFE 10..200: exact Gaussian KL, sliced W2 and energy distance on
  mixtures, each with its floor; a recommended sampler per budget, tuned on two problems and
  reported on three held-out ones (:mod:`validation.stochastic_peers`).

Gate (exit status 1, each failure listed): on the Gaussian the fitted order must reach
theory - ``--tol`` (0.3; several multistep methods superconverge there: dpmpp_3m measures ~4
with log-SNR grids); on the 2-D mixture it must lie within ``--tol`` of theory (up to a proven
ceiling: UniPC-3 may reach 4 through its corrector); affine stochastic samplers must reach weak
order 1 - tol; the exact-trace likelihood error must stay below 50 x tol and Hutchinson's
bias within 4 standard errors; the analytic layer must agree with autograd and invert itself;
and every error with a recorded bound (``validation/bounds.json``, 2x the recorded value;
``--record-bounds`` rewrites it) must stay below it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

import scoresde  # noqa: F401
import solvers

from . import deterministic as det
from . import stochastic as sto
from .problems import SDES, end_time, make_problems

BOUNDS_FILE = Path(__file__).with_name("bounds.json")
BOUND_FACTOR = 2.0
SECTIONS = ("det", "grids", "stoch", "lik", "fewstep", "peers", "stochpeers")


# ----------------------------------------------------------------------------- plan
class Plan:
    """What a tier runs."""

    def __init__(self, args):
        full = not args.quick
        self.full = full
        self.sdes = args.sdes or list(SDES)
        avail = set(solvers.available_methods())
        self.methods = [m for m in det.METHODS if m.name in avail and (not args.methods or m.name in args.methods)]
        self.stoch = [s for s in sto.STOCH_METHODS if s.name in avail and (not args.methods or s.name in args.methods)]
        self.sections = args.sections or list(SECTIONS)
        self.det_problems = ["gaussian", "mixture2d", "mixture64"] + (["mixture3072"] if full else [])
        # the d=64 mixture under every SDE in full, VP and VE in quick; d=3072: sweep only
        self.mix64_sdes = self.sdes if full else [s for s in self.sdes if s == "vp"]
        self.mix3072_methods = ["ddim", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "dpm_solver_3"]
        self.grid_sdes = self.sdes
        self.stoch_sdes = self.sdes if full else [s for s in self.sdes if s in ("vp", "ve")]
        self.weak_steps = (10, 20, 50, 100, 200, 500) if full else (10, 20, 50, 100, 200)
        self.mc_samples = 8000 if full else 2000
        self.sw_samples = 8000 if full else 2000
        self.adaptive_tols = sto.ADAPTIVE_TOLS if full else sto.ADAPTIVE_TOLS[:3]
        self.lik_sdes = self.sdes if full else [s for s in self.sdes if s == "vp"]
        self.lik_tols = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7) if full else (1e-3, 1e-4, 1e-5, 1e-6)
        self.lik_samples = 128 if full else 64
        self.peer_problems = ["mixture2d", "mixture64"] if full else ["mixture2d"]
        self.peer_nfe = (5, 6, 8, 10, 15, 20, 50) if full else (10, 20)
        self.overhead = full
        from .heldout import HELDOUT
        self.fewstep_problems = list(HELDOUT) if full else ["held-mix2-poor", "held-gauss8"]
        # stochpeers: quick = the two tuning problems at NFE 10 and 20, fewer samples
        self.stochpeers = dict(problems=None, budgets=(10, 20, 50, 100, 200), samples=4000, mc_samples=8000) \
            if full else dict(problems=["gaussian", "mixture2d"], budgets=(10, 20), samples=1000, mc_samples=2000)


# ---------------------------------------------------------------------------- tasks
def analytic_checks(sde_names, target) -> list[dict]:
    rows = []
    for key in sde_names:
        sde = SDES[key]()
        t = torch.linspace(end_time(sde), sde.T, 101, dtype=torch.float64)
        rt = float(((sde.t_of_log_snr(sde.log_snr(t)) - t).abs() / t).max())
        x = target.marginal(sde, sde.T).sample(64, torch.Generator().manual_seed(3))
        xr = x.clone().requires_grad_(True)
        tm = 0.37 * sde.T
        (grad,) = torch.autograd.grad(target.marginal(sde, tm).log_prob(xr).sum(), xr)
        score_err = float((grad - target.score(x, tm, sde)).abs().max())
        back = target.flow(target.flow(x, sde.T, end_time(sde), sde), end_time(sde), sde.T, sde)
        flow_err = float((back - x).abs().max() / x.abs().max())
        ok = rt < 1e-8 and score_err < 1e-8 and flow_err < 1e-8
        rows.append(dict(sde=key, t_end=end_time(sde), t_of_log_snr_rel_err=rt, score_vs_autograd=score_err,
                         flow_roundtrip_rel=flow_err, ok=ok))
    return rows


def fewstep_tasks(plan: Plan, args, store: dict) -> list[tuple[str, callable]]:
    """``method="auto"`` against every peer configuration on the held-out problems."""
    from . import fewstep, heldout
    from .peers import fewstep_peers
    few_peers, missing = fewstep_peers()
    store["fewstep"] = dict(problems=[], missing=missing, rule=fewstep.rule_rows())
    tasks = []
    for name in plan.fewstep_problems if few_peers else ():
        def t(name=name):
            prob = heldout.make_heldout_problems([name], cache_dir=Path(args.out) / "nets")[name]
            store["fewstep"]["problems"].append(fewstep.evaluate(prob, peers=few_peers, log=lambda *a: None))
        tasks.append((f"fewstep {name}", t))
    return tasks


def peer_tasks(plan: Plan, args, problems, store: dict) -> list[tuple[str, callable]]:
    """The peers' order checks, their comparison with our methods, and the overhead."""
    from . import peers as pe
    peers, missing = pe.available_peers()
    store["peers"]["missing"] = missing
    refs = pe.RefCache()
    tasks = []
    for peer in peers:
        def t(peer=peer):
            store["peers"]["orders"].append(pe.check_order(peer, problems["gaussian"], refs, args.tol))
        tasks.append((f"peer order {peer.name}", t))
    for pname in plan.peer_problems:
        for peer in peers:
            def t(peer=peer, pname=pname):
                store["peers"]["compare"].append(pe.compare(peer, problems[pname], refs, plan.peer_nfe))
            tasks.append((f"peer {pname}/{peer.name}", t))
    if plan.overhead and peers:
        def t():
            store["peers"]["overhead"] = pe.overhead(peers)
        tasks.append(("peer overhead", t))
    return tasks


def build_tasks(plan: Plan, args, problems, store: dict) -> list[tuple[str, callable]]:
    tasks = []
    cases: dict = {}

    def case(sde_key, pname):
        if (sde_key, pname) not in cases:
            cases[(sde_key, pname)] = det.Case(sde_key, SDES[sde_key](), problems[pname])
        return cases[(sde_key, pname)]

    store["cases"] = cases
    if "det" in plan.sections:
        for sde_key in plan.sdes:
            for pname in plan.det_problems:
                if pname == "mixture64" and sde_key not in plan.mix64_sdes:
                    continue
                for spec in plan.methods:
                    if pname == "mixture3072" and spec.name not in plan.mix3072_methods:
                        continue

                    def t(sde_key=sde_key, pname=pname, spec=spec):
                        ladder = pname != "mixture3072"
                        nfes = det.SWEEP_NFE if pname != "mixture3072" else tuple(n for n in det.SWEEP_NFE if n <= 100)
                        store["det"].append(det.run_method(case(sde_key, pname), spec, args.tol, ladder, nfes))
                    tasks.append((f"det {sde_key}/{pname}/{spec.name}", t))
    if "grids" in plan.sections:
        for sde_key in plan.grid_sdes:
            for m in det.GRID_METHODS:
                if m not in {s.name for s in plan.methods} and args.methods:
                    continue
                for sch in solvers.SCHEDULES:
                    def t(sde_key=sde_key, m=m, sch=sch):
                        store["grids"].append(det.run_grid(case(sde_key, "mixture2d"), m, sch))
                    tasks.append((f"grid {sde_key}/{m}/{sch}", t))
    if "stoch" in plan.sections:
        for sde_key in plan.stoch_sdes:
            for spec in plan.stoch:
                def t(sde_key=sde_key, spec=spec):
                    sde = SDES[sde_key]()
                    store["weak"].append(sto.weak_sweep(sde_key, sde, problems["gaussian"], spec, plan.weak_steps,
                                                        plan.mc_samples, args.tol, plan.adaptive_tols))
                    row, kept = sto.sw_sweep(sde_key, sde, problems["mixture2d"], spec,
                                             plan.weak_steps[:-1] if len(plan.weak_steps) > 5 else plan.weak_steps,
                                             plan.sw_samples, keep_samples_at=20, tols=plan.adaptive_tols)
                    store["sw"].append(row)
                    if kept is not None and sde_key == "vp":
                        store["scatter"][f"{spec.label}, 20 steps"] = kept
                tasks.append((f"stoch {sde_key}/{spec.label}", t))
    if "lik" in plan.sections:
        from . import loglik
        if loglik.log_likelihood is None:
            store["notes"].append("likelihood section skipped: solvers.log_likelihood is not importable")
        else:
            for sde_key in plan.lik_sdes:
                for pname in ("gaussian", "mixture2d"):
                    def t(sde_key=sde_key, pname=pname):
                        store["lik"] += loglik.run_likelihood(sde_key, SDES[sde_key](), problems[pname],
                                                              plan.lik_samples, plan.lik_tols)
                    tasks.append((f"lik {sde_key}/{pname}", t))
    if "fewstep" in plan.sections:
        tasks += fewstep_tasks(plan, args, store)
    if "peers" in plan.sections:
        tasks += peer_tasks(plan, args, problems, store)
    if "stochpeers" in plan.sections:
        def t():
            from . import stochastic_peers
            store["stochpeers"] = stochastic_peers.run(**plan.stochpeers)
        tasks.append(("stochastic peers", t))
    if "stoch" in plan.sections and "vp" in plan.stoch_sdes:
        def t():   # a deterministic panel for the 2-D scatter: an ODE sampler at 10 NFE
            c = det.Case("vp", SDES["vp"](), problems["mixture2d"], samples=plan.sw_samples)
            for name, n in (("dpmpp_2m", 10),):
                x = solvers.sample(c.model, c.x_T, name, n, t_end=c.t_end).x
                store["scatter"][f"{name} (ODE), {n} NFE"] = x
        tasks.append(("scatter ode", t))
    return tasks


# ----------------------------------------------------------------------------- gate
def bound_values(res: dict) -> dict[str, float]:
    """The errors that get a recorded bound: deterministic errors at NFE 10 and 20 on the
    gated problems, affine weak errors and sliced-Wasserstein distances at the largest NFE."""
    out = {}
    for r in res["det"]:
        if r["problem"] in ("gaussian", "mixture2d"):
            for n, e in zip(r["sweep_nfe"], r["sweep_errors"]):
                if n in (10, 20):
                    out[f"det/{r['sde']}/{r['problem']}/{r['method']}/nfe{n}"] = e
    for r in res["weak"]:
        if r["affine"]:
            out[f"weak/{r['sde']}/{r['method']}/nfe{r['nfe'][-1]}"] = r["mean_errors"][-1] + r["cov_errors"][-1]
    for r in res["sw"]:
        out[f"sw/{r['sde']}/{r['method']}/nfe{r['nfe'][-1]}/n{r['samples']}"] = max(r["sw"][-1], 1.5 * r["floor"])
    return out


def gate(res: dict, tol: float, bounds: dict | None) -> list[str]:
    fails = []
    for r in res["analytic"]:
        if not r["ok"]:
            fails.append(f"analytic/{r['sde']}: t_of_log_snr {r['t_of_log_snr_rel_err']:.1e}, score "
                         f"{r['score_vs_autograd']:.1e}, flow round trip {r['flow_roundtrip_rel']:.1e} (bound 1e-8)")
    for r in res["det"]:
        if r.get("ok") is False:
            rule = f">= {r['theory'] - tol:.2f}" if r["problem"] == "gaussian" else \
                f"in [{r['theory'] - tol:.2f}, {(r['max_order'] or r['theory']) + tol:.2f}]"
            fails.append(f"det/{r['sde']}/{r['problem']}/{r['method']}: fitted order {r['fitted']:.2f}, "
                         f"theory {r['theory']:g} (needs {rule})")
    for r in res["weak"]:
        if r.get("ok") is False:
            fails.append(f"weak/{r['sde']}/{r['method']}: fitted weak order {r['fitted']:.2f}, theory "
                         f"{r['theory']:g} (needs >= {r['theory'] - tol:.2f})")
    for r in res["lik"]:
        if not r["ok"]:
            if r["trace"] == "exact":
                fails.append(f"lik/{r['sde']}/{r['problem']}/exact: errors {['%.1e' % e for e in r['mean_abs_error']]}"
                             f" exceed 50 x tol")
            else:
                fails.append(f"lik/{r['sde']}/{r['problem']}/hutchinson(probes={r['probes']}): bias "
                             f"{r['bias'][-1]:.3g} beyond 4 standard errors ({r['std_err'][-1]:.3g})")
    if bounds:
        for key, v in bound_values(res).items():
            if key in bounds and not (v <= bounds[key]):
                fails.append(f"{key}: error {v:.3e} exceeds its recorded bound {bounds[key]:.3e}")
    return fails


# ------------------------------------------------------------------------------ run
def _to_jsonable(o):
    if isinstance(o, float):   # 7 significant digits: every number, in half the bytes
        return float(f"{o:.7g}") if math.isfinite(o) else str(o)
    if isinstance(o, dict):
        return {str(k): _to_jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_to_jsonable(v) for v in o]
    if isinstance(o, torch.Tensor):
        return _to_jsonable(o.tolist())
    return o


def write_json(path: Path, obj, indent: int | None = None) -> None:
    """Atomic: a temporary file in the same folder, then os.replace."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(_to_jsonable(obj), fh, indent=indent, separators=(",", ": ") if indent else (",", ":"))
    os.replace(tmp, path)


def run(args) -> int:
    torch.set_num_threads(1)  # the problems are tiny: one thread is fastest and unaffected by load
    t0 = time.time()
    plan = Plan(args)
    problems = make_problems()
    store = dict(det=[], grids=[], weak=[], sw=[], lik=[], scatter={}, notes=[],
                 peers=dict(orders=[], compare=[], overhead=[], missing=[]))
    store["analytic"] = analytic_checks(plan.sdes, problems["gaussian"].target)
    tasks = build_tasks(plan, args, problems, store)
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(tasks), desc="validation", disable=args.quiet, leave=False, file=sys.stderr)
    except ImportError:  # the progress bar is optional
        bar = None
    timings = {}
    for label, fn in tasks:
        if bar is not None:
            bar.set_postfix_str(label, refresh=False)
        t1 = time.time()
        fn()
        timings[label] = time.time() - t1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    for c in store["cases"].values():
        if c.ref_check is not None:
            store.setdefault("ref_checks", []).append(dict(sde=c.sde_key, problem=c.problem.name,
                                                           rms_vs_10x_looser=c.ref_check))
    bounds = None
    if BOUNDS_FILE.exists() and not args.record_bounds:
        bounds = json.loads(BOUNDS_FILE.read_text())
    failures = gate(store, args.tol, bounds)
    seconds = time.time() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = dict(
        tier="full" if plan.full else "quick", seconds=seconds, tol=args.tol, torch=torch.__version__,
        sections=plan.sections, sdes=plan.sdes, t_end={k: end_time(SDES[k]()) for k in plan.sdes},
        analytic=store["analytic"], deterministic=store["det"], grids=store["grids"], weak=store["weak"],
        sliced_wasserstein=store["sw"], likelihood=store["lik"], fewstep=store.get("fewstep"), peers=store["peers"],
        stochpeers=store.get("stochpeers"),
        reference_checks=store.get("ref_checks", []), notes=store["notes"], failures=failures,
        bounds_file=str(BOUNDS_FILE.name) if bounds else None, task_seconds=timings,
    )
    from . import report
    report.console(results, sys.stdout)
    try:
        report.write(results, store, problems, out)
    except ImportError as err:   # matplotlib missing: numbers only
        results["notes"].append(f"no plots: {err}")
        report.write_markdown(results, out, plots=False)
    write_json(out / "results.json", results)
    if args.record_bounds:
        old = json.loads(BOUNDS_FILE.read_text()) if BOUNDS_FILE.exists() else {}
        old.update({k: BOUND_FACTOR * v for k, v in bound_values(store).items()})
        write_json(BOUNDS_FILE, dict(sorted(old.items())), indent=1)
        print(f"recorded {len(old)} bounds in {BOUNDS_FILE}")
    print(f"\nwrote {out}/report.md and results.json ({seconds:.1f} s)")
    if failures:
        print(f"VERDICT: FAIL ({len(failures)} failures)")
        for f in failures:
            print("  -", f)
        return 1
    n = sum(1 for r in store["det"] if r.get("ok") is not None)
    checked = sum(1 for k in bound_values(store) if bounds and k in bounds)
    print(f"VERDICT: PASS ({n} fitted orders within {args.tol} of theory, " +
          (f"{checked} errors within their recorded bounds)" if bounds else "no recorded bounds checked)"))
    return 0


def parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The suite's options (``add_help=False``: as a parent of ``scoresde validate``)."""
    ap = argparse.ArgumentParser(prog="python -m validation", description=__doc__, add_help=add_help,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    tier = ap.add_mutually_exclusive_group()
    tier.add_argument("--quick", action="store_true", default=True, help="the quick tier (default, < 3 min)")
    tier.add_argument("--full", action="store_false", dest="quick", help="everything")
    ap.add_argument("--methods", nargs="*", help="restrict to these method names")
    ap.add_argument("--sdes", nargs="*", choices=sorted(SDES), help="restrict to these SDEs")
    ap.add_argument("--sections", nargs="*", choices=SECTIONS, help="restrict to these sections")
    ap.add_argument("--tol", type=float, default=0.3, help="allowed order difference (default 0.3)")
    ap.add_argument("--out", default="validation-report", help="report folder (default validation-report/)")
    ap.add_argument("--record-bounds", action="store_true",
                    help=f"write {BOUND_FACTOR:g}x this run's errors to validation/bounds.json instead of gating on them")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv=None) -> int:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
