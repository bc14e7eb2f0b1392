"""Deterministic methods: error vs NFE, fitted order, NFE to reach 1e-2/1e-3/1e-4, and the
time-grid study (one method under each schedule, per SDE).

For each (SDE, problem) the solvers start from exact samples of the marginal at T and stop
at ``t_end`` (see :mod:`validation.problems`); the error is the RMS per coordinate against
the exact map (Gaussian) or a pf_ode reference at rtol = atol = 1e-11 (mixtures), float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

import solvers

from .metrics import fit_order, nfe_to_reach, steps_for_nfe
from .problems import Problem, end_time, reference_map, rms, start_samples


@dataclass
class MethodSpec:
    name: str
    order: float
    options: dict = field(default_factory=dict)   # options of the order ladder
    schedule: str = "log_snr"                      # grid of the order ladder
    ladder: tuple = (16, 32, 64, 128)              # steps on the Gaussian; doubled on the mixtures
    max_order: float | None = None                 # a proven ceiling above ``order`` (UniPC-3: 4)
    note: str = ""

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.name}({opts})" if opts else self.name

    @property
    def sweep_options(self) -> dict:
        """The error-vs-NFE sweep uses the user's defaults where the ladder needs a special
        option: singlestep methods with DPM-Solver's "fast" allocation (any NFE)."""
        return {k: v for k, v in self.options.items() if k != "allocation"}


METHODS = [
    MethodSpec("euler", 1, schedule="uniform", ladder=(64, 128, 256, 512)),
    MethodSpec("ddim", 1),
    MethodSpec("dpm_solver_1", 1),
    MethodSpec("heun", 2, schedule="log_snr"),
    MethodSpec("dpm_solver_2", 2, {"allocation": "fixed"}),
    MethodSpec("dpmpp_2s", 2, {"allocation": "fixed"}),
    MethodSpec("dpmpp_2m", 2),
    MethodSpec("dpm_solver_3", 3, {"allocation": "fixed"}, ladder=(24, 48, 96, 192)),
    MethodSpec("dpmpp_3m", 3, {"warmup": "singlestep"}, ladder=(32, 64, 128, 256),
               note="superconverges to ~4 on the Gaussian with log-SNR grids"),
    # UniPC-3: the corrector lifts the corrected steps to order 4; the first-order warm-up caps the
    # global order at 3, but from t = T that cap sits below the float64 floor, so 3 to 4 is expected
    MethodSpec("unipc", 3, {"order": 3}, ladder=(32, 64, 128, 256), max_order=4,
               note="corrector: 3 to 4 measured (order-4 corrected steps)"),
]

SWEEP_NFE = (5, 6, 8, 10, 15, 20, 30, 50, 100, 200)
LEVELS = (1e-2, 1e-3, 1e-4)
GRID_METHODS = ("euler", "heun", "dpmpp_2m")


class Case:
    """One (SDE, problem): the exact model, the start samples and the reference (cached)."""

    def __init__(self, sde_key: str, sde, problem: Problem, samples: int | None = None):
        self.sde_key, self.sde, self.problem = sde_key, sde, problem
        self.model = problem.target.as_model(sde, "eps")
        self.t_end = end_time(sde)
        self.x_T = start_samples(problem, sde, n=samples)
        self._ref = None
        self.ref_check = None

    @property
    def ref(self) -> torch.Tensor:
        if self._ref is None:
            self._ref = reference_map(self.problem, self.model, self.x_T, self.sde.T, [self.t_end])[self.t_end]
            if not self.problem.exact:     # the reference's own accuracy: against a 10x looser solve
                loose = reference_map(self.problem, self.model, self.x_T, self.sde.T, [self.t_end], tol=1e-10)
                self.ref_check = rms(loose[self.t_end], self._ref)
        return self._ref

    def error(self, method: str, steps: int, schedule: str | None = None, **options) -> tuple[float, int]:
        sol = solvers.sample(self.model, self.x_T, method, steps, t_end=self.t_end, schedule=schedule, **options)
        return rms(sol.x, self.ref), sol.nfe


def sweep(case: Case, method: str, options: dict, schedule: str | None, nfes=SWEEP_NFE) -> dict:
    """Error at each target NFE (largest step count within it; the NFE actually made is kept)."""
    got_nfe, errs = [], []
    for target in nfes:
        s = steps_for_nfe(method, options, target)
        if s is None:
            continue
        try:
            e, n = case.error(method, s, schedule, **options)
        except (ValueError, solvers.SolverError):     # e.g. a grid that cannot be built
            continue
        if n in got_nfe:
            continue
        got_nfe.append(n)
        errs.append(e if math.isfinite(e) else float("inf"))
    return dict(nfe=got_nfe, errors=errs,
                nfe_to={f"{lv:.0e}": nfe_to_reach(got_nfe, errs, lv) for lv in LEVELS})


def run_method(case: Case, spec: MethodSpec, tol: float, ladder: bool = True, nfes=SWEEP_NFE) -> dict:
    """Order ladder (fit) and error-vs-NFE sweep of one method on one case."""
    p = case.problem
    row = dict(sde=case.sde_key, problem=p.name, method=spec.label, name=spec.name, theory=spec.order,
               max_order=spec.max_order, t_end=case.t_end)
    if ladder:
        steps = spec.ladder if p.exact else tuple(2 * n for n in spec.ladder)
        errs, nfe = zip(*[case.error(spec.name, n, spec.schedule, **spec.options) for n in steps])
        order = fit_order(list(steps), list(errs))
        top = spec.max_order if spec.max_order is not None else spec.order
        if p.exact:   # an order above theory is not a defect on the Gaussian (superconvergence)
            ok = order >= spec.order - tol
        else:
            ok = spec.order - tol <= order <= top + tol
        row.update(ladder_steps=list(steps), ladder_nfe=list(nfe), ladder_errors=list(errs), fitted=order,
                   gated=p.gated, ok=bool(ok) if p.gated else None, ladder_schedule=spec.schedule)
    sw = sweep(case, spec.name, spec.sweep_options, None, nfes)
    row.update(sweep_nfe=sw["nfe"], sweep_errors=sw["errors"], nfe_to=sw["nfe_to"],
               sweep_schedule=solvers.get(spec.name, **spec.sweep_options).default_schedule)
    return row


def run_grid(case: Case, method: str, schedule: str, nfes=SWEEP_NFE) -> dict:
    sw = sweep(case, method, {}, schedule, nfes)
    return dict(sde=case.sde_key, problem=case.problem.name, method=method, schedule=schedule,
                nfe=sw["nfe"], errors=sw["errors"], nfe_to=sw["nfe_to"])
