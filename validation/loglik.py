"""Likelihood: ``solvers.log_likelihood`` against exact answers, error vs tolerance and NFE,
for the exact trace and Hutchinson's estimator.

What ``log_likelihood`` computes is :math:`\\log\\pi(z) + \\int_{t_{end}}^T\\nabla\\cdot v\\,dt`
with :math:`z` the flow of x to T and :math:`\\pi` the SDE's prior.  Its exact value:

- Gaussian: closed form, :math:`z = \\Phi(x)` (``Gaussian.flow``) and
  :math:`\\int\\nabla\\cdot v = \\log|\\det\\partial\\Phi/\\partial x| = \\sum_k\\log\\frac{s_k(T)}{s_k(t_{end})}`,
  :math:`s_k(t) = \\sqrt{\\alpha_t^2\\lambda_k+\\sigma_t^2}`;
- mixture: :math:`\\log p_{t_{end}}(x) - \\log p_T(z) + \\log\\pi(z)` (exact densities), with z from a
  solve at rtol = atol = 1e-10 (its error enters only through smooth functions of z).

Hutchinson's estimate is unbiased: its error is Monte-Carlo noise, so the check is that the
mean error over the samples lies within 4 standard errors of zero.
"""
from __future__ import annotations

import math

import torch

from .problems import F64, Problem, end_time

try:  # written concurrently; the section is skipped when it is not there
    from solvers import log_likelihood
except ImportError:  # pragma: no cover
    log_likelihood = None

TOLS = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
#: exact trace: mean |error| <= EXACT_BOUND x tol (measured 1-7 x tol)
EXACT_BOUND = 50.0


def exact_log_prob(problem: Problem, sde, x: torch.Tensor, t_end: float) -> torch.Tensor:
    tg = problem.target
    T = torch.tensor(sde.T, dtype=F64)
    te = torch.tensor(t_end, dtype=F64)
    if problem.exact:
        z = tg.flow(x, t_end, sde.T, sde)
        lam = tg.lam[0]
        s_T = sde.alpha(T) ** 2 * lam + sde.sigma(T) ** 2
        s_e = sde.alpha(te) ** 2 * lam + sde.sigma(te) ** 2
        return sde.prior_log_prob(z) + 0.5 * torch.log(s_T / s_e).sum()
    model = tg.as_model(sde, "eps")
    z = log_likelihood(model, x, "exact", rtol=1e-10, atol=1e-10, t_end=t_end, method="dopri8").z
    return tg.marginal(sde, t_end).log_prob(x) - tg.marginal(sde, sde.T).log_prob(z) + sde.prior_log_prob(z)


def run_likelihood(sde_key: str, sde, problem: Problem, samples: int, tols=TOLS, probes=(1, 16)) -> list[dict]:
    t_end = end_time(sde)
    model = problem.target.as_model(sde, "eps")
    x = problem.target.marginal(sde, t_end).sample(samples, torch.Generator().manual_seed(5))
    ref = exact_log_prob(problem, sde, x, t_end)
    rows = []
    for trace, k in [("exact", 1)] + [("hutchinson", p) for p in probes]:
        errs, bias, se, nfe = [], [], [], []
        for tol in tols:
            kw = dict(probes=k, generator=torch.Generator().manual_seed(7)) if trace == "hutchinson" else {}
            res = log_likelihood(model, x, trace, rtol=tol, atol=tol, t_end=t_end, **kw)
            e = (res.log_prob.to(F64) - ref)
            errs.append(float(e.abs().mean()))
            bias.append(float(e.mean()))
            se.append(float(e.std() / math.sqrt(e.numel())))
            nfe.append(res.nfe)
        row = dict(sde=sde_key, problem=problem.name, trace=trace, probes=k if trace == "hutchinson" else None,
                   tols=list(tols), nfe=nfe, mean_abs_error=errs, bias=bias, std_err=se, samples=samples,
                   t_end=t_end, mean_log_prob=float(ref.mean()))
        if trace == "exact":
            row["bound"] = [EXACT_BOUND * t for t in tols]
            row["ok"] = all(e <= b for e, b in zip(errs, row["bound"]))
        else:
            row["ok"] = abs(bias[-1]) <= 4.0 * se[-1]
        rows.append(row)
    return rows
