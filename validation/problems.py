"""The validation problems: SDEs, analytic targets, end times and reference maps.

Every problem is an exact target from :mod:`scoresde.analytic` integrated from ``T`` down to
a common noise level: ``t_end`` is where :math:`\\sigma/\\alpha = 10^{-2}` (log-SNR 9.21), or
the SDE's ``default_t_end`` if that lies later (VE, whose :math:`\\sigma_{min}` is 0.01).  So
every SDE is measured over the same stretch of the data end, and the numbers of different
SDEs are comparable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch

import scoresde
import solvers

F64 = torch.float64

#: the SDEs of the suite by short name, each a constructor of the SDE with its default parameters
SDES = {name: partial(scoresde.make_sde, name) for name in ("vp", "subvp", "ve", "cosine", "edm", "rf")}

#: sigma/alpha at the data end of every problem
END_NOISE = 1e-2
#: tolerance of the adaptive pf_ode reference solves (torchdiffeq dopri8, float64)
REF_TOL = 1e-11


def end_time(sde) -> float:
    """Where sampling stops: sigma/alpha = END_NOISE, or the SDE's default t_end if later."""
    t = float(sde.t_of_log_snr(torch.tensor(-2.0 * math.log(END_NOISE), dtype=F64)))
    return max(t, float(sde.default_t_end))


def gaussian_problem(d: int = 4, seed: int = 0) -> scoresde.Gaussian:
    """d = 4, mean != 0, a full covariance with eigenvalues spread over two decades."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    cov = (q * torch.logspace(-1, 1, d, dtype=F64)) @ q.T
    mean = torch.linspace(-1.0, 2.0, d, dtype=F64)
    return scoresde.Gaussian(mean, cov)


def mixture2d_problem() -> scoresde.GaussianMixture:
    """2-D, anisotropic, well-separated two-component mixture (full covariances)."""
    covs = torch.tensor([[[0.30, 0.05], [0.05, 0.40]], [[0.15, -0.03], [-0.03, 0.10]]], dtype=F64)
    means = torch.tensor([[2.0, 0.0], [-1.0, 1.5]], dtype=F64)
    return scoresde.GaussianMixture(torch.tensor([0.3, 0.7], dtype=F64), means, covs)


def diagonal_mixture_problem(d: int, k: int = 4, seed: int = 0) -> scoresde.GaussianMixture:
    """A K = 4 component mixture in d dimensions with diagonal covariances: means N(0, I)
    (pairwise distances ~ sqrt(2 d), far above the component scales: well separated),
    variances log-uniform in [e^-3, 1] = [0.05, 1], weights uneven."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, d, generator=g, dtype=F64)
    var = torch.exp(torch.empty(k, d, dtype=F64).uniform_(-3.0, 0.0, generator=g))
    w = torch.rand(k, generator=g, dtype=F64) + 0.5
    return scoresde.GaussianMixture(w / w.sum(), means, var)


@dataclass
class Problem:
    name: str
    label: str
    target: object
    exact: bool          # a closed-form flow (Gaussian) rather than a tight pf_ode reference
    samples: int         # trajectories per measurement
    gated: bool          # fitted orders enter the gate

    @property
    def dim(self) -> int:
        return self.target.dim


def make_problems() -> dict[str, Problem]:
    return {
        "gaussian": Problem("gaussian", "Gaussian d=4 (exact flow)", gaussian_problem(), True, 64, True),
        "mixture2d": Problem("mixture2d", "2-D mixture (pf_ode ref)", mixture2d_problem(), False, 64, True),
        "mixture64": Problem("mixture64", "d=64 diagonal mixture", diagonal_mixture_problem(64), False, 64, False),
        "mixture3072": Problem("mixture3072", "d=3072 diagonal mixture", diagonal_mixture_problem(3072),
                               False, 16, False),
    }


def start_samples(problem: Problem, sde, t_start: float | None = None, n: int | None = None,
                  seed: int = 1) -> torch.Tensor:
    """Exact samples of the marginal at ``t_start`` (default T): every solver starts on the
    true distribution, so what is measured is the solver's error alone."""
    t = sde.T if t_start is None else t_start
    return problem.target.marginal(sde, t).sample(n or problem.samples, torch.Generator().manual_seed(seed))


def reference_map(problem: Problem, model, x_start: torch.Tensor, t_start: float, t_ends: list[float],
                  tol: float = REF_TOL) -> dict[float, torch.Tensor]:
    """The exact probability-flow map from ``t_start`` to each of ``t_ends``: closed form for
    the Gaussian, else a chain of tight adaptive pf_ode solves (one pass through the sorted
    end times, each segment solved to ``tol``)."""
    sde = model.sde
    out: dict[float, torch.Tensor] = {}
    if problem.exact:
        for te in t_ends:
            out[te] = problem.target.flow(x_start, t_start, te, sde)
        return out
    x, t = x_start, t_start
    for te in sorted(set(t_ends), reverse=True):
        if te < t:
            x = solvers.sample(model, x, "pf_ode", t_start=t, t_end=te, rtol=tol, atol=tol,
                               ode_method="dopri8", max_steps=100_000).x
            t = te
        out[te] = x
    return out


def rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Root-mean-square error per coordinate, sqrt(mean over samples and dimensions)."""
    return float((x.to(F64) - ref.to(F64)).pow(2).mean().sqrt())
