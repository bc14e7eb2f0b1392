r"""Validate the solvers on *your* network: every deterministic method, under every standard
time grid, against a tight probability-flow reference of that same network.

The analytic suite measures each solver against an exact answer, but a trained network is
not an exact score: its probability-flow field can be rougher (in ``t`` and in ``x``) than any
Gaussian mixture's, so the ranking of methods, grids and orders need not carry over.
:func:`on_model` measures it on the network itself:

- start: ``x_T`` drawn from the SDE prior :math:`\mathcal N(0, \sigma_T^2 I)` with a seed;
- reference: the probability-flow ODE of the network,
  :math:`\mathrm d x/\mathrm d t = f(t)\,x - \tfrac12 g(t)^2\, s_\theta(x, t)` (Song et al. 2021,
  eq. 13), solved by an adaptive dopri8 at ``rtol = atol = ref_tol`` from ``T`` to ``t_end``;
  its own error is estimated against a 10x tighter solve and recorded (errors within 10x of
  it are not resolved and are left out of the order fits);
- each configuration (method, options, schedule) at each target NFE (the largest step count
  whose NFE fits, the NFE actually made recorded): RMS error per coordinate against the
  reference (:func:`validation.problems.rms`, the suite's metric), fitted order over the last
  three points (:func:`validation.metrics.fit_order`), NFE to reach 1e-2 / 1e-3 / 1e-4
  (:func:`validation.metrics.nfe_to_reach`, log-log interpolation);
- recommended: for each NFE budget, the configuration with the smallest measured error at an
  NFE within the budget.

``python -m scoresde validate --checkpoint PATH --out DIR`` runs it on a checkpoint (float64).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

import scoresde
import solvers

from . import report as rep
from .deterministic import LEVELS, SWEEP_NFE, sweep
from .metrics import ROUNDOFF_FLOOR, fit_order
from .problems import rms

__all__ = ["Config", "configurations", "deterministic_methods", "reference", "on_model", "recommend",
           "write_report", "QUICK_NFE", "FULL_NFE"]

FULL_NFE = SWEEP_NFE
QUICK_NFE = (5, 10, 20, 50)
#: methods measured in several option settings (every other method: its defaults)
VARIANTS = {"unipc": ({"order": 2, "variant": "bh1"}, {"order": 2, "variant": "bh2"},
                      {"order": 3, "variant": "bh1"}, {"order": 3, "variant": "bh2"})}


@dataclass(frozen=True)
class Config:
    """One measured configuration: a method, its options and a time grid."""
    method: str
    schedule: str
    options: dict = field(default_factory=dict, hash=False)

    @property
    def name(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.method}({opts})[{self.schedule}]" if opts else f"{self.method}[{self.schedule}]"

    @property
    def order(self) -> float:
        return float(solvers.get(self.method, **self.options).order)


def deterministic_methods() -> list[str]:
    """Registered fixed-step methods that draw no noise (``stochastic`` False, not adaptive)."""
    out = []
    for m in solvers.available_methods():
        s = solvers.get(m)
        if not s.stochastic and not getattr(s, "adaptive", False):
            out.append(m)
    return out


def configurations(methods: Sequence[str] | None = None, schedules: Sequence[str] | None = None) -> list[Config]:
    """Every deterministic method (``unipc`` in orders 2/3 x bh1/bh2) under each schedule
    (``None`` in ``schedules``: the method's own default grid)."""
    known = deterministic_methods()
    if methods is None:
        methods = known
    bad = [m for m in methods if m not in known]
    if bad:
        raise ValueError(f"methods: {bad} are not deterministic fixed-step methods; choose from {known}")
    schedules = list(solvers.SCHEDULES) if schedules is None else list(schedules)
    bad = [s for s in schedules if s is not None and s not in solvers.SCHEDULES]
    if bad or not schedules:
        raise ValueError(f"schedules: expected a non-empty list of {list(solvers.SCHEDULES)} (or None), "
                         f"got {schedules}")
    out = []
    for m in methods:
        for opts in VARIANTS.get(m, ({},)):
            for s in schedules:
                cfg = Config(m, s or solvers.get(m, **opts).default_schedule, dict(opts))
                if cfg not in out:
                    out.append(cfg)
    return out


def reference(model, x_T: torch.Tensor, t_end: float, ref_tol: float, max_steps: int = 200_000) -> tuple:
    """The pf_ode map of ``model`` from T to ``t_end`` (dopri8, rtol = atol = ``ref_tol``) and
    its record: tolerances, NFE, and its RMS difference from a 10x tighter solve (the estimate
    of its own error)."""
    def solve(tol):
        return solvers.sample(model, x_T, "pf_ode", t_end=t_end, rtol=tol, atol=tol, ode_method="dopri8",
                              max_steps=max_steps)
    ref, tight = solve(ref_tol), solve(ref_tol / 10)
    info = dict(method="pf_ode", ode_method="dopri8", rtol=ref_tol, atol=ref_tol, nfe=int(ref.nfe),
                check=dict(rtol=ref_tol / 10, atol=ref_tol / 10, nfe=int(tight.nfe)),
                error=rms(ref.x, tight.x))
    return ref.x, info


class _ModelCase:
    """What :func:`validation.deterministic.sweep` needs: ``error(method, steps, schedule, **options)``."""

    def __init__(self, model, x_T, t_end, ref):
        self.model, self.x_T, self.t_end, self.ref = model, x_T, t_end, ref

    def error(self, method, steps, schedule=None, **options):
        sol = solvers.sample(self.model, self.x_T, method, steps, t_end=self.t_end, schedule=schedule, **options)
        return rms(sol.x, self.ref), int(sol.nfe)


def recommend(methods: dict, budgets: Sequence[int]) -> dict:
    """For each NFE budget: the configuration with the smallest finite error measured at an
    NFE within the budget (None where nothing fits)."""
    out = {}
    for b in budgets:
        best = None
        for name, r in methods.items():
            for n, e in zip(r["nfe"], r["error"]):
                if n <= b and math.isfinite(e) and (best is None or e < best["error"]):
                    best = dict(name=name, method=r["method"], schedule=r["schedule"], options=r["options"],
                                error=e, nfe=n)
        out[str(b)] = best
    return out


def _check_inputs(model, x_T, t_end, nfes, ref_tol):
    if not isinstance(model, scoresde.ScoreModel):
        raise TypeError(f"model must be a scoresde.ScoreModel, got {type(model).__name__}")
    if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point() or x_T.dim() < 2 or x_T.shape[0] < 1:
        raise ValueError(f"x_T must be a floating tensor [N, ...] with N >= 1, got "
                         f"{getattr(x_T, 'shape', type(x_T).__name__)}")
    if not bool(torch.isfinite(x_T).all()):
        raise ValueError("x_T has non-finite entries")
    T = float(model.sde.T)
    t_end = float(model.sde.default_t_end if t_end is None else t_end)
    if not 0.0 < t_end < T:
        raise ValueError(f"t_end must be in (0, T) = (0, {T:g}), got {t_end}")
    nfes = [int(n) for n in nfes]
    if not nfes or min(nfes) < 1:
        raise ValueError(f"nfes must be a non-empty list of positive NFE targets, got {nfes}")
    if not (isinstance(ref_tol, (int, float)) and 0.0 < ref_tol <= 1e-3):
        raise ValueError(f"ref_tol must be in (0, 1e-3], got {ref_tol!r}")
    return t_end, sorted(set(nfes))


def on_model(model, x_T: torch.Tensor, *, t_end: float | None = None, nfes: Sequence[int] = FULL_NFE,
             methods: Sequence[str] | None = None, schedules: Sequence[str | None] | None = None,
             ref_tol: float | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Every deterministic configuration on ``model`` from ``x_T`` (at T) to ``t_end``
    (default the SDE's ``default_t_end``), against a pf_ode reference of ``model`` itself.

    ``nfes``: target NFE values (each configuration runs the largest step count that fits;
    ``nfe`` lists what was made); ``schedules``: default every standard grid
    (``solvers.SCHEDULES``; ``None`` entries mean each method's default); ``ref_tol``: the
    reference tolerance (default 1e-9 for float64 ``x_T``, 1e-5 otherwise); ``progress``:
    called with each configuration's name before it runs.

    Returns a dict with ``reference`` (method, tolerances, ``error`` against a 10x tighter
    solve, ``nfe``), ``methods`` (configuration name -> method, schedule, options, theory
    order, ``nfe``, ``error``, ``fitted_order``, ``nfe_to``), ``recommended`` (str(NFE) ->
    the configuration with the smallest error within that budget) and ``setup``.

    Raises ``TypeError``/``ValueError`` for bad input, before any network call."""
    if ref_tol is None:
        ref_tol = 1e-9 if isinstance(x_T, torch.Tensor) and x_T.dtype == torch.float64 else 1e-5
    t_end, nfes = _check_inputs(model, x_T, t_end, nfes, ref_tol)
    configs = configurations(methods, schedules)
    t0 = time.time()
    ref, ref_info = reference(model, x_T, t_end, ref_tol)
    floor = max(ROUNDOFF_FLOOR, 10.0 * ref_info["error"])
    case = _ModelCase(model, x_T, t_end, ref)
    results = {}
    for cfg in configs:
        if progress is not None:
            progress(cfg.name)
        sw = sweep(case, cfg.method, cfg.options, cfg.schedule, tuple(nfes))
        results[cfg.name] = dict(method=cfg.method, schedule=cfg.schedule, options=cfg.options,
                                 theory_order=cfg.order, nfe=sw["nfe"], error=sw["errors"],
                                 fitted_order=fit_order(sw["nfe"], sw["errors"], floor), nfe_to=sw["nfe_to"])
    setup = dict(n=int(x_T.shape[0]), shape=list(x_T.shape[1:]), dtype=str(x_T.dtype).replace("torch.", ""),
                 sde=model.sde.config() if hasattr(model.sde, "config") else type(model.sde).__name__,
                 prediction=str(getattr(model, "prediction", "")), t_start=float(model.sde.T), t_end=t_end,
                 nfe_targets=nfes, metric="RMS per coordinate against the reference", levels=list(LEVELS),
                 order_fit_floor=floor, seconds=time.time() - t0)
    return dict(reference=ref_info, methods=results, recommended=recommend(results, nfes), setup=setup)


# --------------------------------------------------------------------------- report
def ranking(results: dict, nfe: int) -> list[tuple[str, float, int]]:
    """(configuration, error, NFE made) of each configuration's best measurement within ``nfe``, best first."""
    out = []
    for name, r in results["methods"].items():
        pts = [(e, n) for n, e in zip(r["nfe"], r["error"]) if n <= nfe and math.isfinite(e)]
        if pts:
            e, n = min(pts)
            out.append((name, e, n))
    return sorted(out, key=lambda v: v[1])


def _markdown(results: dict, title: str, plot: str | None) -> str:
    ref, setup = results["reference"], results["setup"]
    L = [f"# {title}\n",
         f"{setup['n']} samples of shape {setup['shape']} ({setup['dtype']}) from the prior at t = "
         f"{setup['t_start']:g}, integrated to t_end = {setup['t_end']:g}; SDE {setup['sde']}. Error: RMS per "
         f"coordinate against the reference. {setup['seconds']:.0f} s.\n",
         "## Reference\n",
         f"pf_ode of this network (dopri8, rtol = atol = {ref['rtol']:g}, {ref['nfe']} NFE). Its own error, "
         f"against a 10x tighter solve ({ref['check']['nfe']} NFE): **{ref['error']:.2e}** RMS. Errors below "
         f"{setup['order_fit_floor']:.1e} (10x that) are not resolved and are left out of the order fits.\n",
         "## Recommended configuration per NFE budget\n",
         "The smallest error measured at an NFE within the budget (same start points for every configuration).\n"]
    rows = []
    for b, c in results["recommended"].items():
        if c is None:
            rows.append([b, "-", "-", "-", "-", "-"])
            continue
        opts = ", ".join(f"{k}={v}" for k, v in c["options"].items()) or "-"
        runner = [r for r in ranking(results, int(b)) if r[0] != c["name"]][:1]
        rows.append([b, c["method"], c["schedule"], opts, f"{c['error']:.2e} ({c['nfe']})",
                     f"{runner[0][0]} {runner[0][1]:.2e}" if runner else "-"])
    header = ["NFE budget", "method", "schedule", "options", "error (NFE made)", "runner-up"]
    L.append(rep.md_table(header, rows) + "\n")
    L.append("## Every configuration\n")
    L.append("Sorted by error at NFE 10 (or the smallest budget measured). Fitted order: the last three "
             "points above the reference floor. NFE to reach: log-log interpolation.\n")
    nfes = setup["nfe_targets"]
    key = 10 if 10 in nfes else nfes[0]
    shown = [n for n in (5, 10, 20, 50, 200) if n in nfes]
    order = [name for name, _, _ in ranking(results, key)]
    order += [n for n in results["methods"] if n not in order]
    rows = []
    for name in order:
        r = results["methods"][name]
        at = dict(zip(r["nfe"], r["error"]))
        best_at = {n: min((e for m, e in at.items() if m <= n), default=None) for n in shown}
        rows.append([name, rep.fmt(r["theory_order"], "g"), rep.fmt(r["fitted_order"]),
                     rep.fmt(r["nfe_to"].get("1e-02"), ".0f", f"> {max(r['nfe'], default=0)}"),
                     rep.fmt(r["nfe_to"].get("1e-03"), ".0f", f"> {max(r['nfe'], default=0)}")]
                    + [rep.fmt(best_at[n], ".1e") for n in shown])
    L.append(rep.md_table(["configuration", "theory", "fitted", "NFE to 1e-2", "NFE to 1e-3"]
                          + [f"err @{n}" for n in shown], rows) + "\n")
    if plot:
        L.append(f"![error vs NFE]({plot})\n")
    return "\n".join(L)


def plot(results: dict, path: Path) -> bool:
    """Error vs NFE, one panel per schedule, one curve per method configuration."""
    plt = rep._plt()
    scheds = list(dict.fromkeys(r["schedule"] for r in results["methods"].values()))
    cols = min(2, len(scheds))
    nr = (len(scheds) + cols - 1) // cols
    fig, axes = plt.subplots(nr, cols, figsize=(5.0 * cols, 3.6 * nr), squeeze=False)
    floor = results["setup"]["order_fit_floor"]
    for ax, s in zip(axes.flat, scheds):
        xs, ys = [], []
        for name, r in results["methods"].items():
            if r["schedule"] != s or not r["nfe"]:
                continue
            e = [max(v, 1e-16) if math.isfinite(v) else float("nan") for v in r["error"]]
            ax.loglog(r["nfe"], e, marker=".", ms=3, lw=1, label=name.split("[")[0])
            xs += r["nfe"]
            ys += [v for v in e if math.isfinite(v)]
        rep._slopes(ax, xs, ys)
        lo = min(ys, default=1e-8) / 3
        if floor > lo:
            ax.axhline(floor, color="r", lw=0.6, ls="--")
        ax.set_ylim(lo, max(ys, default=1.0) * 3)
        for lv in (1e-2, 1e-3):
            ax.axhline(lv, color="0.85", lw=0.6)
        ax.set_title(f"schedule {s}" + (" (red: reference floor)" if floor > lo else ""), fontsize=9)
        ax.set_xlabel("NFE", fontsize=8)
        ax.set_ylabel("RMS error", fontsize=8)
        ax.tick_params(labelsize=7)
        for txt in ax.texts:    # slope labels outside the data range
            txt.set_clip_on(True)
    for ax in list(axes.flat)[len(scheds):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=6.5, frameon=False)
    fig.tight_layout(rect=(0, 0.03 + 0.02 * math.ceil(len(labels) / 5) / nr, 1, 1))
    rep._save(fig, path)
    return True


def write_report(results: dict, out: str | Path, title: str = "Solvers on this network", plots: bool = True) -> Path:
    """``report.md``, ``results.json`` and (with matplotlib, unless ``plots=False``) ``error_vs_nfe.png`` in ``out``."""
    from .suite import write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png = None
    try:
        if plots and plot(results, out / "error_vs_nfe.png"):
            png = "error_vs_nfe.png"
    except ImportError:   # matplotlib is optional: numbers only
        pass
    (out / "report.md").write_text(_markdown(results, title, png))
    write_json(out / "results.json", results, indent=1)
    return out
