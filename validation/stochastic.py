"""Stochastic methods: weak errors (mean, covariance) on the Gaussian and the sliced
Wasserstein distance on the 2-D mixture, against exact answers, vs NFE.

Weak errors: for the *affine* samplers (every fixed-step one whose coefficients do not depend
on x: all but the Langevin correctors whose step depends on the score's norm, and the adaptive
solver) the output mean and covariance are computed exactly by linearity
(:func:`validation.metrics.exact_moments`), so the errors carry no Monte-Carlo noise and the
weak order can be fitted.  The others use Monte Carlo, and their noise floor (the same errors
for exact samples of the same size) is stated.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import solvers

from .metrics import exact_moments, fit_order, mc_weak_errors, sliced_wasserstein, weak_errors
from .problems import Problem, end_time, start_samples


@dataclass
class StochSpec:
    name: str
    options: dict = field(default_factory=dict)
    affine: bool = True        # exact moments by linearity
    order: float = 1.0         # weak order

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.name}({opts})" if opts else self.name


STOCH_METHODS = [
    StochSpec("euler_maruyama"),
    StochSpec("reverse_diffusion"),
    StochSpec("ancestral"),
    StochSpec("ddim", {"eta": 1.0}),
    StochSpec("dpmpp_2m_sde"),
    StochSpec("dpmpp_3m_sde"),
    StochSpec("pc", {"corrector": "paced_langevin"}),          # pc's default corrector
    StochSpec("pc", {"corrector": "annealed_langevin"}),
    StochSpec("pc", {"corrector": "langevin_score_sde"}, affine=False),   # score_sde's PC sampler
    StochSpec("adaptive_sde", {"on_reject": "bridge"}, affine=False),
]

ADAPTIVE_TOLS = (0.2, 0.1, 0.05, 0.02, 0.01)


def _runs(spec: StochSpec, steps_list, tols=ADAPTIVE_TOLS) -> list[tuple[dict, int | None]]:
    """(options, steps) of each point of the sweep: steps for fixed-step methods, a tolerance
    (rtol = atol) for adaptive_sde."""
    if spec.name == "adaptive_sde":
        return [({**spec.options, "rtol": tl, "atol": tl}, None) for tl in tols]
    return [(spec.options, s) for s in steps_list]


def weak_sweep(sde_key: str, sde, problem: Problem, spec: StochSpec, steps_list, mc_samples: int,
               tol: float, tols=ADAPTIVE_TOLS) -> dict:
    """Weak errors of one sampler on the Gaussian vs NFE; fitted weak order (affine samplers)."""
    t_end = end_time(sde)
    model = problem.target.as_model(sde, "eps")
    pT = problem.target.marginal(sde, sde.T)
    exact = problem.target.marginal(sde, t_end)
    nfe, mean_err, cov_err = [], [], []
    for opts, steps in _runs(spec, steps_list, tols):
        if spec.affine:
            m, c, n = exact_moments(model, spec.name, steps, pT.mean, pT.cov, t_end=t_end, **opts)
            em, ec = weak_errors(m, c, exact)
        else:
            x_T = start_samples(problem, sde, n=mc_samples, seed=11)
            sol = solvers.sample(model, x_T, spec.name, steps, t_end=t_end,
                                 generator=torch.Generator().manual_seed(12), **opts)
            em, ec = mc_weak_errors(sol.x, exact)
            n = sol.nfe
        nfe.append(n)
        mean_err.append(em)
        cov_err.append(ec)
    row = dict(sde=sde_key, problem=problem.name, method=spec.label, affine=spec.affine, theory=spec.order,
               nfe=nfe, mean_errors=mean_err, cov_errors=cov_err, t_end=t_end)
    if spec.affine:
        total = [a + b for a, b in zip(mean_err, cov_err)]
        row["fitted"] = fit_order(nfe, total)
        row["ok"] = bool(row["fitted"] >= spec.order - tol)
    else:
        floors = [mc_weak_errors(exact.sample(mc_samples, torch.Generator().manual_seed(100 + k)), exact)
                  for k in range(3)]
        row["samples"] = mc_samples
        row["floor_mean"] = sum(f[0] for f in floors) / len(floors)
        row["floor_cov"] = sum(f[1] for f in floors) / len(floors)
        row["fitted"] = None
        row["ok"] = None
    return row


def sw_sweep(sde_key: str, sde, problem: Problem, spec: StochSpec, steps_list, n: int,
             keep_samples_at: int | None = None, tols=ADAPTIVE_TOLS) -> tuple[dict, torch.Tensor | None]:
    """Sliced W2 between n sampler outputs and n exact samples of the marginal at t_end, vs
    NFE; the floor is the distance between two independent exact sets of n samples."""
    t_end = end_time(sde)
    model = problem.target.as_model(sde, "eps")
    exact = problem.target.marginal(sde, t_end)
    ref = exact.sample(n, torch.Generator().manual_seed(21))
    x_T = start_samples(problem, sde, n=n, seed=22)
    nfe, dist, kept = [], [], None
    for opts, steps in _runs(spec, steps_list, tols):
        sol = solvers.sample(model, x_T, spec.name, steps, t_end=t_end,
                             generator=torch.Generator().manual_seed(23), **opts)
        nfe.append(sol.nfe)
        dist.append(sliced_wasserstein(sol.x, ref))
        if keep_samples_at is not None and steps == keep_samples_at:
            kept = sol.x
    floor = [sliced_wasserstein(exact.sample(n, torch.Generator().manual_seed(30 + 2 * k)),
                                exact.sample(n, torch.Generator().manual_seed(31 + 2 * k))) for k in range(5)]
    # the floor is itself random (which component each sample falls in): its mean and range
    # over 5 independent pairs; a distance inside that range is indistinguishable from exact
    row = dict(sde=sde_key, problem=problem.name, method=spec.label, nfe=nfe, sw=dist, samples=n,
               floor=sum(floor) / len(floor), floor_min=min(floor), floor_max=max(floor), t_end=t_end)
    return row, kept
