"""Numbers the suite computes: fitted orders, NFE to reach an error, weak errors without
Monte-Carlo noise (affine samplers), sliced Wasserstein distances with their noise floor."""
from __future__ import annotations

import math

import numpy as np
import torch

import solvers

F64 = torch.float64

#: errors below this are round-off, not truncation: left out of order fits
ROUNDOFF_FLOOR = 1e-10


def fit_order(nfe: list[float], errs: list[float], floor: float = ROUNDOFF_FLOOR, last: int = 3) -> float:
    """Slope of -log(error) against log(NFE) over the last ``last`` points above ``floor``
    (the asymptotic part of a doubling ladder)."""
    pts = [(n, e) for n, e in zip(nfe, errs) if e > floor and math.isfinite(e)][-last:]
    if len(pts) < 2:
        return float("nan")
    n, e = np.array(pts, dtype=float).T
    return float(-np.polyfit(np.log(n), np.log(e), 1)[0])


def nfe_to_reach(nfe: list[float], errs: list[float], level: float) -> float | None:
    """The NFE at which the error first falls to ``level``, interpolated linearly on the
    log-log curve between the bracketing measurements.  ``nfe[0]`` if already below at the
    first point (reported as "<= nfe[0]"); None if never reached."""
    pts = sorted(zip(nfe, errs))
    if not pts:
        return None
    if pts[0][1] <= level:
        return float(pts[0][0])
    for (n0, e0), (n1, e1) in zip(pts, pts[1:]):
        if e1 <= level < e0:
            if n1 == n0:
                return float(n1)
            w = (math.log(e0) - math.log(level)) / (math.log(e0) - math.log(e1))
            return float(math.exp(math.log(n0) + w * (math.log(n1) - math.log(n0))))
    return None


def steps_for_nfe(method: str, options: dict, target: int) -> int | None:
    """The largest ``steps`` whose NFE does not exceed ``target`` (None if even 1 step does)."""
    solver = solvers.get(method, **options)
    best = None
    for s in range(1, target + 1):
        try:
            n = solver.expected_nfe(s)
        except ValueError:
            continue
        if n <= target:
            best = s
        elif best is not None:
            break
    return best


# ------------------------------------------------------- weak errors of affine samplers
class _CountNoise:
    def __init__(self):
        self.calls = 0

    def __call__(self, i, t0, t1, like):
        self.calls += 1
        return torch.zeros_like(like)


class _ImpulseNoise:
    """Rows < offset: zero noise.  Row offset + m*d + j: e_j at the m-th call, zero otherwise."""

    def __init__(self, d: int, offset: int):
        self.d, self.offset, self.calls = d, offset, 0

    def __call__(self, i, t0, t1, like):
        z = torch.zeros_like(like)
        r0 = self.offset + self.calls * self.d
        self.calls += 1
        if r0 + self.d <= like.shape[0]:
            z[r0:r0 + self.d] = torch.eye(self.d, dtype=like.dtype)
        return z


def exact_moments(model, method: str, steps: int, mean_T: torch.Tensor, cov_T: torch.Tensor, **kw):
    """Exact output mean and covariance of an *affine* sampler for x_T ~ N(mean_T, cov_T).

    For Gaussian data the exact model's eps is affine in x, so every fixed-step sampler
    whose coefficients do not depend on x maps (x_T, z_1, ..., z_M) affinely to its output.
    One run on a batch of impulses gives the offset and the linear maps (the idea of
    tests/test_sde_samplers.py): no Monte-Carlo noise at all.  Returns (mean, cov, nfe)."""
    d = mean_T.numel()
    probe = _CountNoise()
    sol = solvers.sample(model, mean_T[None], method, steps, generator=probe, **kw)
    m = probe.calls
    x = mean_T.repeat(1 + d + m * d, 1)
    x[1:1 + d] += torch.eye(d, dtype=F64)
    out = solvers.sample(model, x, method, steps, generator=_ImpulseNoise(d, 1 + d), **kw).x
    mean = out[0]
    a = (out[1:1 + d] - mean).T
    b = out[1 + d:] - mean
    return mean, a @ cov_T @ a.T + b.T @ b, sol.nfe


def weak_errors(mean, cov, exact) -> tuple[float, float]:
    """(|mean - exact mean|_2, |cov - exact cov|_F / |exact cov|_F)."""
    ec = exact.cov.to(F64)
    return float((mean.to(F64) - exact.mean.to(F64)).norm()), float((cov.to(F64) - ec).norm() / ec.norm())


def mc_weak_errors(x: torch.Tensor, exact) -> tuple[float, float]:
    return weak_errors(x.mean(0), torch.cov(x.T.to(F64)), exact)


# ---------------------------------------------------------------- sliced Wasserstein
def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: int = 128, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two equal-size sample sets: the root mean over
    ``directions`` fixed random unit directions of the squared W2 of the sorted projections."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(a.shape[1], directions, generator=g, dtype=F64)
    u = u / u.norm(dim=0, keepdim=True)
    pa = torch.sort(a.to(F64) @ u, dim=0).values
    pb = torch.sort(b.to(F64) @ u, dim=0).values
    return float((pa - pb).pow(2).mean().sqrt())


# ------------------------------------------------------------- distribution distances
def mean_pairwise_distance(x: torch.Tensor, y: torch.Tensor, chunk: int = 2048) -> float:
    """Mean Euclidean distance over all pairs (x_i, y_j), in ``chunk``-row blocks, computed
    directly (not through a Gram matrix, whose cancellation costs digits)."""
    tot = sum(float(torch.cdist(x[i:i + chunk], y, compute_mode="donot_use_mm_for_euclid_dist").sum())
              for i in range(0, x.shape[0], chunk))
    return tot / (x.shape[0] * y.shape[0])


def energy_distance(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048) -> float:
    r"""Energy distance (Szekely & Rizzo 2013) between two sample sets, the square root of the
    V-statistic :math:`2\,\overline{|a_i-b_j|} - \overline{|a_i-a_j|} - \overline{|b_i-b_j|}`
    (means over all pairs, Euclidean norm: :func:`mean_pairwise_distance`; as
    scipy.stats.energy_distance in 1-D).  Zero for identical sets; a metric between distributions."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a, b: expected [n, d] and [m, d] sample sets; got {tuple(a.shape)}, {tuple(b.shape)}")
    a, b = a.to(F64), b.to(F64)
    e2 = 2.0 * mean_pairwise_distance(a, b, chunk) - mean_pairwise_distance(a, a, chunk) \
        - mean_pairwise_distance(b, b, chunk)
    return math.sqrt(max(e2, 0.0))


def gaussian_kl(mean_p: torch.Tensor, cov_p: torch.Tensor, mean_q: torch.Tensor, cov_q: torch.Tensor) -> float:
    r""":math:`KL(N(m_p, C_p)\,\|\,N(m_q, C_q)) = \tfrac12[\mathrm{tr}(C_q^{-1}C_p) + (m_q-m_p)^T C_q^{-1}
    (m_q-m_p) - d + \log\det C_q - \log\det C_p]`; ``inf`` if :math:`C_p` is not positive definite."""
    mp, mq, cp, cq = (v.to(F64) for v in (mean_p, mean_q, cov_p, cov_q))
    d = mp.numel()
    lq = torch.linalg.cholesky(cq)
    lp, info = torch.linalg.cholesky_ex(0.5 * (cp + cp.T))
    if int(info) != 0:
        return float("inf")
    sol = torch.cholesky_solve(torch.cat([cp, (mq - mp)[:, None]], dim=1), lq)
    logdet = 2.0 * (torch.log(torch.diagonal(lq)).sum() - torch.log(torch.diagonal(lp)).sum())
    kl = 0.5 * (torch.trace(sol[:, :d]) + (mq - mp) @ sol[:, d] - d + logdet)
    return max(float(kl), 0.0)


def distance_floor(distance, draw, pairs: int = 5) -> dict:
    """The noise floor of a sample-based distance: ``distance`` between ``draw(seed)`` and
    ``draw(seed + 1)`` (two independent exact sets of the same size) over ``pairs`` seed pairs;
    its mean and range (a distance inside the range is indistinguishable from exact sampling)."""
    vals = [distance(draw(1000 + 2 * k), draw(1001 + 2 * k)) for k in range(pairs)]
    return dict(mean=sum(vals) / len(vals), min=min(vals), max=max(vals))
