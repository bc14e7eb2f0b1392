r"""Few steps, side by side: every peer configuration and ours on each peer's own map, on the
tuning and the held-out problems of :mod:`validation.heldout`.

For each problem and NFE budget (5, 6, 8, 10, 15, 20, 50), every peer configuration (diffusers
schedulers with their default and Karras grids, k-diffusion samplers with their Karras and
exponential grids; :func:`validation.peers.fewstep_peers`) is run with its own grid from exact
start samples; its map (start, end, denoise) and its NFE, counted at the model, define the
comparison (:mod:`validation.peers`).  On every distinct map we run

- ``auto``: ``solvers.sample(..., method="auto", steps=...)`` with the same NFE (held-out only
  matters for claims; it is run on both halves),
- on the tuning half only, a set of fixed candidates (:data:`CANDIDATES`: method, options,
  schedule, analytic first step) from which the auto rule's table was chosen
  (:func:`tune_table` prints the choice).

Ratios are ours / peer on the *same map*; the **best peer** at a point is the peer
configuration with the smallest error there (an oracle over the peers, chosen per point), and
the ratio against it is taken on its map.  ``worst`` is the largest ratio over all peer
configurations.  Errors: RMS per coordinate against the exact map.

Run:  ``python -m validation.fewstep [--half heldout|tuning|both] [--out DIR]``.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import solvers

from .heldout import HELDOUT, TUNING, make_heldout_problems
from .metrics import steps_for_nfe
from .peers import REF_SDE, fewstep_peers, map_times, ours_map
from .problems import Problem, reference_map, rms

FEW_NFE = (5, 6, 8, 10, 15, 20, 50)
#: the peer whose map is the plain one (VP from t = 1 to the data end, then the denoising step):
#: candidates are also tuned there, so that the rule holds on the map users run by default
CANONICAL = "k-diffusion dpmpp_2m"
#: the tuning constraint: no tuning problem may be worse than this many times the best peer
MAX_WORST_RATIO = 2.0
#: tolerance of the reference solves (dopri8, float64): far below the smallest error measured
REF_TOL_FEWSTEP = 1e-9


@dataclass(frozen=True)
class Candidate:
    """One fixed configuration of ours: method, options, schedule (``rho`` for karras), and the
    analytic first step (which frees one evaluation: the budget buys one more step)."""

    method: str
    options: tuple = ()
    schedule: str = "log_snr"
    rho: float = 7.0
    afs: bool = False
    lof: bool | None = None       # lower_order_final (None: the method's default)

    @property
    def label(self) -> str:
        o = ",".join(f"{k}={v}" for k, v in self.options)
        sch = f"{self.schedule}{self.rho:g}" if self.schedule in ("karras", "vp_time") else self.schedule
        lof = "" if self.lof is None else f", lof={int(self.lof)}"
        return f"{self.method}({o}) [{sch}{', afs' if self.afs else ''}{lof}]"

    def kwargs(self, steps: int | None = None, t_start: float | None = None, t_end: float | None = None) -> dict:
        """Options for ``solvers.sample``; a ``"vp_time"`` grid (power ``rho``, see
        :func:`solvers.auto.auto_timesteps`) needs ``steps`` and the map's ends."""
        if self.schedule == "vp_time":
            from solvers.auto import auto_timesteps
            kw = dict(self.options, timesteps=auto_timesteps(REF_SDE, steps, "vp_time", self.rho, t_start, t_end))
        else:
            kw = dict(self.options, schedule=self.schedule)
        if self.schedule == "karras":
            kw["rho"] = self.rho
        if self.afs:
            kw["analytic_first_step"] = True
        if self.lof is not None:
            kw["lower_order_final"] = self.lof
        return kw

    def steps_for(self, budget: int) -> int | None:
        s = steps_for_nfe(self.method, dict(self.options), budget + (1 if self.afs else 0))
        return s


def _grid(methods, schedules=(("log_snr", 7.0), ("karras", 7.0), ("quadratic", 7.0), ("uniform", 7.0)),
          afs=(False, True), lof=(False, True)):
    return [Candidate(m, tuple(sorted(o.items())), s, r, a, f) for m, o in methods for s, r in schedules
            for a in afs for f in lof]


#: the tuning candidates (the auto rule's table is chosen from these, on the tuning half)
CANDIDATE_METHODS = [("dpmpp_2m", {}), ("dpmpp_3m", {}), ("dpmpp_3m", {"formula": "paper"}),
                     ("unipc", {"order": 2}), ("unipc", {"order": 3}), ("unipc", {"order": 2, "variant": "bh2"}),
                     ("unipc", {"order": 3, "variant": "bh2"}), ("ipndm", {"order": 3}), ("ipndm", {"order": 4}),
                     ("deis", {"order": 2}), ("deis", {"order": 3})]


#: the second tuning round: the strongest methods of the first, on power grids in VP time
ROUND2_METHODS = [("ipndm", {"order": 3}), ("ipndm", {"order": 4}), ("unipc", {"order": 3}),
                  ("unipc", {"order": 3, "variant": "bh2"})]
ROUND2_GRIDS = (("log_snr", 7.0), ("vp_time", 1.5), ("vp_time", 2.0), ("vp_time", 2.5), ("vp_time", 3.0))


def candidates(round_: int = 1) -> list[Candidate]:
    """The tuning candidates whose options this version of the library accepts (a method
    without ``lower_order_final`` is kept once, with its default)."""
    afs_ok = "analytic_first_step" in inspect.signature(solvers.sample).parameters
    out = []
    methods, grids = (CANDIDATE_METHODS, None) if round_ == 1 else (ROUND2_METHODS, ROUND2_GRIDS)
    for c in _grid(methods, *([grids] if grids else []), afs=(False, True) if afs_ok else (False,)):
        try:
            solvers.get(c.method, **dict(c.options))
        except (TypeError, ValueError):
            continue
        try:
            solvers.get(c.method, **dict(c.options), lower_order_final=c.lof)
        except (TypeError, ValueError):
            c = Candidate(c.method, c.options, c.schedule, c.rho, c.afs, None)
        if c not in out:
            out.append(c)
    return out


def run_on_map(model, x_start, ts: float, te: float, den: bool, budget: int, method: str, steps: int,
               **kwargs) -> tuple[torch.Tensor, int] | None:
    """One of our runs on a map: ``steps`` intervals from ``ts`` to ``te`` (plus the denoising
    evaluation); None where the grid cannot be built; an AssertionError if it overspends."""
    ends = dict(t_start=ts, t_end=te) if "timesteps" not in kwargs else {}
    try:
        sol = solvers.sample(model, x_start, method, steps, final_denoise=den, **ends, **kwargs)
    except ValueError:
        return None
    if sol.nfe > budget:
        raise AssertionError(f"{method}{kwargs} used {sol.nfe} NFE on a {budget}-NFE map")
    return sol.x, sol.nfe


@dataclass
class MapResult:
    key: tuple
    nfe: int
    ours: dict = field(default_factory=dict)      # label -> error
    auto: dict | None = None                       # error, nfe
    run: object = None
    ref: object = None


def _map_key(run) -> tuple:
    ts, te, den = ours_map(run)
    return (round(ts, 12), round(te, 12), den, run.nfe)


def chained_references(problem: Problem, runs: list, tol: float = REF_TOL_FEWSTEP) -> dict[tuple, torch.Tensor]:
    """The exact map of every run, keyed by :func:`_map_key`: one chain of tight solves per
    distinct start (:func:`validation.problems.reference_map` through all that start's end
    times), then the exact Tweedie step for a ``denoise`` end."""
    model = problem.target.as_model(REF_SDE, "eps")
    by_start: dict = {}
    for run in runs:
        by_start.setdefault(round(map_times(run)[0], 12), []).append(run)
    out = {}
    for group in by_start.values():
        ts = map_times(group[0])[0]
        ends = sorted({map_times(r)[1] for r in group}, reverse=True)
        xs = reference_map(problem, model, group[0].x_start, ts, ends, tol=tol)
        for r in group:
            _, te, den = map_times(r)
            x = xs[te]
            out[_ref_key(r)] = problem.target.x0(x, te, REF_SDE) if den else x
    return out


def _ref_key(run) -> tuple:
    ts, te, den = map_times(run)
    return (round(ts, 12), round(te, 12), den)


def evaluate(problem: Problem, nfes=FEW_NFE, cands: list[Candidate] | None = None, peers=None,
             log=print) -> dict:
    """Peers and ``auto`` on every peer map of ``problem``; the ``cands`` (tuning) on the best
    peer's map at each NFE.  See the module docstring."""
    peers = fewstep_peers()[0] if peers is None else peers
    model = problem.target.as_model(REF_SDE, "eps")
    t0 = time.time()
    runs = []
    for peer in peers:
        for target in nfes:
            n = peer.n_for(target)
            if n is not None:
                runs.append((peer.name, target, peer.runner(n, problem)))
    refs = chained_references(problem, [r for _, _, r in runs])
    maps: dict[tuple, MapResult] = {}
    peer_rows = []
    for name, target, run in runs:
        key = _map_key(run)
        ref = refs[_ref_key(run)]
        peer_rows.append(dict(peer=name, target_nfe=target, nfe=run.nfe, error=rms(run.x, ref), map=key))
        if key not in maps:
            maps[key] = MapResult(key, run.nfe)
            ts, te, den = ours_map(run)
            out = run_on_map(model, run.x_start, ts, te, den, run.nfe, "auto", run.nfe - (1 if den else 0))
            if out is not None:
                maps[key].auto = dict(error=rms(out[0], ref), nfe=out[1])
            maps[key].run, maps[key].ref = run, ref
    for target in nfes if cands else ():
        rows = [r for r in peer_rows if r["target_nfe"] == target]
        for key in {min(rows, key=lambda r: r["error"])["map"]} | {r["map"] for r in rows if r["peer"] == CANONICAL}:
            _run_candidates(model, maps[key], cands)
    log(f"  {problem.name}: {len(peer_rows)} peer runs, {len(maps)} maps, {time.time() - t0:.0f} s")
    return dict(problem=problem.name, label=problem.label, dim=problem.dim, peers=peer_rows,
                maps=[dict(key=list(m.key), nfe=m.nfe, ours=m.ours, auto=m.auto) for m in maps.values()])


def _run_candidates(model, m: MapResult, cands: list[Candidate]) -> None:
    ts, te, den = ours_map(m.run)
    for c in cands:
        s = c.steps_for(m.nfe - (1 if den else 0))
        out = None if s is None else run_on_map(model, m.run.x_start, ts, te, den, m.nfe, c.method,
                                                 None if c.schedule == "vp_time" else s, **c.kwargs(s, ts, te))
        if out is not None:
            e = rms(out[0], m.ref)
            m.ours[c.label] = e if math.isfinite(e) else float("inf")


# ------------------------------------------------------------------------- summaries
def _maps_by_key(result: dict) -> dict:
    return {tuple(m["key"]): m for m in result["maps"]}


def ratios(result: dict, ours_error) -> dict[int, dict]:
    """Per target NFE: ratio against the best peer (on its map) and the worst ratio over all
    peer configurations, for ``ours_error(map) -> error | None``."""
    maps = _maps_by_key(result)
    out = {}
    for target in sorted({r["target_nfe"] for r in result["peers"]}):
        rows = [r for r in result["peers"] if r["target_nfe"] == target]
        pairs = []
        for r in rows:
            e = ours_error(maps[tuple(r["map"])])
            if e is not None and r["error"] > 0:
                pairs.append((r, e / r["error"]))
        if not pairs:
            continue
        best_row, best_ratio = min(pairs, key=lambda p: p[0]["error"])
        worst_row, worst = max(pairs, key=lambda p: p[1])
        out[target] = dict(best_peer=best_row["peer"], best_peer_error=best_row["error"], vs_best=best_ratio,
                           worst=worst, worst_peer=worst_row["peer"])
    return out


def canonical_ratios(result: dict, ours_error) -> dict[int, float]:
    """Per target NFE: ours / the best peer configuration on the canonical map (every
    k-diffusion sampler there shares it)."""
    maps = _maps_by_key(result)
    out = {}
    for target in sorted({r["target_nfe"] for r in result["peers"]}):
        key = next((tuple(r["map"]) for r in result["peers"] if r["peer"] == CANONICAL
                    and r["target_nfe"] == target), None)
        if key is None:
            continue
        best = min(r["error"] for r in result["peers"] if tuple(r["map"]) == key)
        e = ours_error(maps[key])
        if e is not None and best > 0:
            out[target] = e / best
    return out


def auto_error(m: dict):
    return m["auto"]["error"] if m.get("auto") else None


def tune_table(results: list[dict], nfes=FEW_NFE) -> dict[int, tuple[str, float, float]]:
    """For each NFE, the candidate with the smallest geometric mean over the given (tuning)
    problems of its ratio against the best peer, taken on the best peer's map or on the canonical
    map, whichever is larger, among the candidates whose largest such ratio over the problems is
    at most :data:`MAX_WORST_RATIO` (a robustness constraint: a grid that is excellent on the
    mixtures but blows up on a network must not win)."""
    table = {}
    labels = sorted({lab for res in results for m in res["maps"] for lab in m["ours"]})
    for target in nfes:
        scored = []
        for lab in labels:
            rs, ws = [], []
            for res in results:
                err = (lambda m, lab=lab: m["ours"].get(lab))
                r = ratios(res, err).get(target)
                c = canonical_ratios(res, err).get(target)
                if r is None or c is None:
                    break
                rs.append(max(r["vs_best"], c))
                ws.append(max(r["vs_best"], c))
            else:
                if rs and all(math.isfinite(x) for x in rs):
                    scored.append((statistics.geometric_mean(rs), max(ws), lab))
        robust = [x for x in scored if x[1] <= MAX_WORST_RATIO]
        if robust or scored:
            g, w, lab = min(robust or scored)
            table[target] = (lab, g, w)
    return table


def rule_rows() -> list[dict]:
    """The auto rule's table, as the report prints it."""
    from solvers import auto
    return [dict(from_nfe=r[0], method=r[1], options=r[2], grid=r[3], grid_param=r[4], analytic_first_step=r[5])
            for r in auto.RULE]


def summarize(results: list[dict]) -> dict[int, dict]:
    """Per NFE over the given problems: the geometric mean and the largest of auto's ratio to the
    best peer, the largest ratio over all peer configurations, and the count of problems."""
    per: dict[int, list] = {}
    canon: dict[int, list] = {}
    for res in results:
        for n, v in ratios(res, auto_error).items():
            per.setdefault(n, []).append(v)
        for n, v in canonical_ratios(res, auto_error).items():
            canon.setdefault(n, []).append(v)
    return {n: dict(geomean_vs_best=statistics.geometric_mean([v["vs_best"] for v in vs]),
                    max_vs_best=max(v["vs_best"] for v in vs), max_worst=max(v["worst"] for v in vs),
                    geomean_canonical=statistics.geometric_mean(canon[n]) if canon.get(n) else None,
                    max_canonical=max(canon[n]) if canon.get(n) else None,
                    problems=len(vs)) for n, vs in sorted(per.items())}


def print_summary(results: list[dict], title: str, write=print) -> None:
    write(f"\n{title}: method='auto' / peer on the same map, per NFE: vs the best peer configuration / "
          "worst over peer configurations / vs the best peer on the canonical map")
    for res in results:
        rr, cr = ratios(res, auto_error), canonical_ratios(res, auto_error)
        cells = "  ".join(f"{n}:{v['vs_best']:.2f}/{v['worst']:.2f}/{cr.get(n, float('nan')):.2f}"
                          for n, v in rr.items())
        write(f"  {res['problem']:<22} {cells}")
    for n, v in summarize(results).items():
        write(f"  NFE {n:>3}: vs best peer geomean {v['geomean_vs_best']:.3f} max {v['max_vs_best']:.2f}; "
              f"worst {v['max_worst']:.2f}; canonical map geomean {v['geomean_canonical'] or float('nan'):.3f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m validation.fewstep", description=__doc__.split("\n\n")[0])
    p.add_argument("--half", choices=("tuning", "heldout", "both"), default="both")
    p.add_argument("--problems", nargs="*", help="a subset of problem names")
    p.add_argument("--nfe", type=int, nargs="*", default=list(FEW_NFE))
    p.add_argument("--candidates", choices=("tuning", "all", "none"), default="tuning",
                   help="where to run the fixed candidates (default: the tuning half only)")
    p.add_argument("--round", type=int, choices=(1, 2), default=1, help="which tuning candidate set")
    p.add_argument("--out", type=Path, default=Path("validation-fewstep"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)    # small problems: one thread is fastest and steady under load
    names = args.problems or (list(TUNING) if args.half in ("tuning", "both") else []) + (
        list(HELDOUT) if args.half in ("heldout", "both") else [])
    args.out.mkdir(parents=True, exist_ok=True)
    problems = make_heldout_problems(names, cache_dir=args.out / "nets")
    cands = candidates(args.round)
    results = []
    for name in names:
        want = args.candidates == "all" or (args.candidates == "tuning" and name in TUNING)
        res = evaluate(problems[name], tuple(args.nfe), cands if want else None)
        results.append(res)
        path = args.out / f"{name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res))
        tmp.replace(path)
    tun = [r for r in results if r["problem"] in TUNING]
    held = [r for r in results if r["problem"] in HELDOUT]
    if tun and any(m["ours"] for r in tun for m in r["maps"]):
        print("\ntuning table (geometric mean over the tuning problems of the ratio vs the best peer; worst):")
        for n, (lab, g, w) in tune_table(tun, tuple(args.nfe)).items():
            print(f"  NFE {n:>3}: {lab:<45} {g:.3f}  worst {w:.2f}")
    if tun:
        print_summary(tun, "tuning half")
    if held:
        print_summary(held, "held-out half")
    return 0


if __name__ == "__main__":
    sys.exit(main())
