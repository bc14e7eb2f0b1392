"""Every deterministic fixed-step ODE method against DDIM at 3..10 steps.

For every method x schedule (uniform / log_snr / quadratic / karras) x SDE family
(``validation.problems.SDES``) x steps 3..10, the rms error of the method at ``end_time(sde)``
divided by DDIM's error on the same schedule and steps.  Float64, exact starting samples at T;
references: the closed-form flow (Gaussian) or a tight dopri8 ``pf_ode`` solve (mixtures),
computed once per (problem, family).

Problems: ``gaussian`` (d=4) and ``mixture2d`` (the tuning set), ``heldout`` (the d=8
diagonal mixture of seed 3, not tuned on).
Run: ``.venv/bin/python benchmarks/few_steps_vs_ddim.py [--problems gaussian,mixture2d] [--json out]``.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import solvers  # noqa: E402
from validation.problems import (SDES, Problem, diagonal_mixture_problem, end_time,  # noqa: E402
                                 gaussian_problem, mixture2d_problem, reference_map, rms, start_samples)

SCHEDULES = ("uniform", "log_snr", "quadratic", "karras")
STEPS = tuple(range(3, 11))

METHODS = {
    "euler": ("euler", {}), "heun": ("heun", {}),
    "dpm_solver_1": ("dpm_solver_1", {}), "dpm_solver_2": ("dpm_solver_2", {}),
    "dpm_solver_3": ("dpm_solver_3", {}), "dpmpp_2s": ("dpmpp_2s", {}),
    "dpmpp_2m": ("dpmpp_2m", {}), "dpmpp_3m": ("dpmpp_3m", {}),
    **{f"unipc{p}_{v}{'' if c else '_nocorr'}": ("unipc", dict(order=p, variant=v, use_corrector=c))
       for p in (1, 2, 3) for v in ("bh1", "bh2") for c in (True, False)},
    **{f"ipndm{k}": ("ipndm", {"order": k}) for k in (1, 2, 3, 4)},
    **{f"deis{k}": ("deis", {"order": k}) for k in (1, 2, 3)},
}

PROBLEMS = {
    "gaussian": lambda: Problem("gaussian", "Gaussian d=4", gaussian_problem(), True, 8, True),
    "mixture2d": lambda: Problem("mixture2d", "2-D mixture", mixture2d_problem(), False, 8, True),
    "heldout": lambda: Problem("heldout", "d=8 diagonal mixture seed 3", diagonal_mixture_problem(8, seed=3),
                               False, 8, False),
}


@functools.lru_cache(maxsize=None)
def setup(problem_name: str, sde_name: str):
    """(problem, sde, model, x_T, exact x at end_time): one reference per problem and family."""
    problem = PROBLEMS[problem_name]()
    sde = SDES[sde_name]()
    model = problem.target.as_model(sde)
    x = start_samples(problem, sde)
    te = end_time(sde)
    ref = reference_map(problem, model, x, sde.T, [te])[te]
    return problem, sde, model, x, te, ref


def error(problem_name: str, sde_name: str, schedule: str, steps: int, method: str, opts: dict) -> float:
    _, sde, model, x, te, ref = setup(problem_name, sde_name)
    try:
        out = solvers.sample(model, x, method, steps, schedule=schedule, t_end=te, **opts).x
    except solvers.SolverError:
        return math.inf
    e = rms(out, ref)
    return e if math.isfinite(e) else math.inf


def table(problems, methods=METHODS, families=tuple(SDES), schedules=SCHEDULES, steps=STEPS) -> dict:
    """{(problem, family, schedule, n, method): error / ddim error}."""
    out = {}
    for p in problems:
        for f in families:
            for s in schedules:
                for n in steps:
                    ddim = error(p, f, s, n, "ddim", {})
                    for name, (m, o) in methods.items():
                        out[(p, f, s, n, name)] = error(p, f, s, n, m, o) / ddim
    return out


def worst(tab: dict) -> dict:
    """{method: (worst ratio, its case)}."""
    w = {}
    for key, r in tab.items():
        name = key[-1]
        if name not in w or r > w[name][0]:
            w[name] = (r, key[:-1])
    return w


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", default="gaussian,mixture2d")
    ap.add_argument("--methods", default="")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    methods = {k: v for k, v in METHODS.items() if not a.methods or k in a.methods.split(",")}
    tab = table(a.problems.split(","), methods)
    for name, (r, case) in sorted(worst(tab).items(), key=lambda kv: -kv[1][0]):
        n_bad = sum(1 for k, v in tab.items() if k[-1] == name and v > 1.0)
        n_all = sum(1 for k in tab if k[-1] == name)
        print(f"{name:22s} worst {r:8.3f}  at {case}   >1x in {n_bad}/{n_all}")
    if a.json:
        Path(a.json).write_text(json.dumps({"|".join(map(str, k)): v for k, v in tab.items()}))


if __name__ == "__main__":
    main()
