r"""Stochastic samplers side by side with the peers' stochastic samplers, by distribution.

Every sampler starts from exact samples of the target's marginal at its first noise level and
is judged by the law of what it returns, at NFE budgets 10..200 (NFE counted at the model).

**Maps.**  A run maps a noise level (log-SNR ``log_snr_start``) to either the Tweedie estimate
:math:`\hat x_0` at its last evaluated level (``denoise``: a last step to sigma = 0) or the
state at a final level (``sigma`` end).  Its target is the exact law of that output: the law
of :math:`\hat x_0(x_t)` with :math:`x_t` exact (``denoise``) or the marginal at the end.  The
peers' maps (read off their own sigma tables): k-diffusion, Karras grid (rho = 7) from
:math:`\hat\sigma` of VP at T = 1 to :math:`\hat\sigma` = 0.01 (the suite's end), then 0;
diffusers, its 1000-step DDPM table (linear betas 1e-4..0.02; DPMSolverSDE's own default table
is Stable Diffusion's, set to this one), from timestep 999 (:math:`\hat\sigma` = 157) to the
table's smallest :math:`\hat\sigma` = 0.0100013 (EulerAncestral, DPMSolverSDE: default
``linspace`` spacing; DPMSolverMultistep: ``use_karras_sigmas=True``, since its default spacing
stops at timestep 999/n and denoises from there, a coarser map; SASolver: default, which ends
*at* that sigma without denoising).  Ours run on the same map: the same start samples, the
same end, one NFE of the budget spent on ``final_denoise`` where the map denoises.  Our
samplers use their own default grids on the problem's SDE (VP, or VE for the ``-ve``
problems: the map is a pair of log-SNRs, so it means the same on any SDE).

**Distances.**  Gaussian: the exact KL divergence KL(sampler || target).  Affine samplers (all
fixed-coefficient ones, ours and the peers': the exact denoiser is affine) get their exact
output moments from one run on a batch of impulses (:func:`validation.metrics.exact_moments`;
the peers through their noise hooks: k-diffusion's ``noise_sampler``, diffusers'
``variance_noise``, DPMSolverSDE's ``noise_sampler`` attribute, and for EulerAncestral and
SASolver, which draw with ``randn_tensor``, that function replaced for the run).  Others
(Langevin correctors) use Monte-Carlo moments; their floor is the KL of the moments of as many
exact samples.  Mixtures: sliced W2 and energy distance to exact samples of the target, each
with its floor (two independent exact sets of the same size).  dpmpp_sde's two overlapping
noise queries per step are increments of one Brownian path in sigma (k-diffusion's and
diffusers' BrownianTree), built here from the same normals (:class:`BrownianPath`).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

import scoresde
import solvers

from .metrics import (_CountNoise, _ImpulseNoise, distance_floor, energy_distance, exact_moments, gaussian_kl,
                      mean_pairwise_distance, sliced_wasserstein, steps_for_nfe)
from .peers import REF_SDE, ExactVP, PeerRun, default_dtype, kd_sigma_range, load_kdiffusion, t_of_log_snr
from .problems import F64, Problem, diagonal_mixture_problem, gaussian_problem, mixture2d_problem, start_samples
from .stochastic import StochSpec

for _m in ("churn", "ancestral_split", "sa_solver", "er_sde", "restart"):
    try:
        __import__(f"solvers.{_m}")
    except ImportError:     # a module not there yet: its methods are listed as missing
        pass

BUDGETS = (10, 20, 50, 100, 200)
#: the SDE our samplers run on, by problem family; the VE reaches diffusers' first level
FAMILY_SDES = {"vp": REF_SDE, "ve": scoresde.VESDE(sigma_min=0.01, sigma_max=200.0)}
START_SEED, NOISE_SEED, REF_SEED = 41, 43, 21

OURS = [StochSpec(n, o) for n, o in (
    ("euler_maruyama", {}), ("reverse_diffusion", {}), ("ancestral", {}), ("ddim", {"eta": 1.0}),
    ("dpmpp_2m_sde", {}), ("dpmpp_3m_sde", {}), ("pc", {}), ("edm_sde", {}), ("euler_ancestral", {}),
    ("dpmpp_2s_ancestral", {}), ("dpmpp_sde", {}), ("sa_solver", {}), ("er_sde", {}), ("restart", {}))]


@dataclass
class StochProblem:
    name: str
    target: object
    family: str           # our SDE: "vp" | "ve"
    role: str             # "tuning" | "held-out"
    label: str = ""

    @property
    def target_key(self) -> str:
        """The target's name: the problems that share it share the peers' runs."""
        return self.name.split("-")[0]

    @property
    def gaussian(self) -> bool:
        return isinstance(self.target, scoresde.Gaussian)

    def as_problem(self, samples: int) -> Problem:
        return Problem(self.name, self.label, self.target, self.gaussian, samples, False)


def make_problems() -> dict[str, StochProblem]:
    """Tuning: the d=4 Gaussian and the 2-D mixture on VP.  Held out: the same on VE, a d=16
    diagonal mixture on VP."""
    ps = [StochProblem("gaussian", gaussian_problem(), "vp", "tuning", "Gaussian d=4, VP"),
          StochProblem("mixture2d", mixture2d_problem(), "vp", "tuning", "2-D mixture, VP"),
          StochProblem("gaussian-ve", gaussian_problem(), "ve", "held-out", "Gaussian d=4, VE"),
          StochProblem("mixture2d-ve", mixture2d_problem(), "ve", "held-out", "2-D mixture, VE"),
          StochProblem("mixture16", diagonal_mixture_problem(16), "vp", "held-out", "d=16 diagonal mixture, VP")]
    return {p.name: p for p in ps}


# ------------------------------------------------------------------------ noise plumbing
class Normals:
    """Standard normals shaped like a template, from a seeded generator (float64)."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=self.g, dtype=F64).to(like.dtype)


def _source(noise) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``like -> normals`` callable from one of metrics' (i, t0, t1, like) noise sources."""
    return lambda like: noise(0, 0.0, 0.0, like)


class BrownianPath:
    r"""One Brownian path W over sigma, built lazily from standard normals ``source(like)``:
    a query ``(s0, s1)`` returns :math:`(W(s_1)-W(s_0))/\sqrt{|s_1-s_0|}`, each new point drawn
    given its known neighbours (Brownian bridge inside, independent increment outside), so
    every value is linear in the normals drawn (the impulse trick applies)."""

    def __init__(self, source, like: torch.Tensor):
        self.source, self.like, self.w = source, like, {}

    def _at(self, s: float) -> torch.Tensor:
        if not self.w:
            self.w[s] = torch.zeros_like(self.like)
        if s not in self.w:
            lo = max((k for k in self.w if k < s), default=None)
            hi = min((k for k in self.w if k > s), default=None)
            z = self.source(self.like)
            if lo is not None and hi is not None:
                f = (s - lo) / (hi - lo)
                self.w[s] = self.w[lo] + f * (self.w[hi] - self.w[lo]) + math.sqrt((s - lo) * (hi - s) / (hi - lo)) * z
            else:
                k = lo if lo is not None else hi
                self.w[s] = self.w[k] + math.sqrt(abs(s - k)) * z
        return self.w[s]

    def __call__(self, s0, s1) -> torch.Tensor:
        a, b = float(s0), float(s1)
        return (self._at(b) - self._at(a)) / math.sqrt(abs(b - a))


# ---------------------------------------------------------------------------- peers
@dataclass
class StochPeer:
    name: str
    family: str
    runner: Callable          # (n, problem, start, source) -> PeerRun; start(log_snr) -> VP start batch
    nfe_of: Callable[[int], int] = lambda n: n
    note: str = ""

    def n_for(self, budget: int) -> int | None:
        ok = [n for n in range(1, budget + 1) if self.nfe_of(n) <= budget]
        return max(ok) if ok else None


def _kd(fn_name: str, brownian: bool = False):
    def run(n, problem, start, source) -> PeerRun:
        kd = load_kdiffusion()
        s_min, s_max = kd_sigma_range()
        exact = ExactVP(problem)

        def denoiser(x, sigma):
            s = float(sigma.reshape(-1)[0])
            return exact.x0(x / math.sqrt(1.0 + s * s), -2.0 * math.log(s))

        with default_dtype(F64):
            sigmas = kd.get_sigmas_karras(n, s_min, s_max, rho=7.0)
            ls0 = -2.0 * math.log(float(sigmas[0]))
            x_vp0 = start(ls0)
            x = x_vp0 * math.sqrt(1.0 + math.exp(-ls0))
            ns = BrownianPath(source, x) if brownian else (lambda s, s_next: source(x))
            with torch.no_grad():
                out = getattr(kd, fn_name)(denoiser, x, sigmas, disable=True, noise_sampler=ns)
        return PeerRun(out.to(F64), x_vp0, exact.calls, ls0, exact.log_snrs[-1], "denoise", math.inf)

    return run


@contextmanager
def _patched_randn(module_name: str, source):
    """``randn_tensor`` of a diffusers scheduler module replaced by ``source`` for one run."""
    import importlib

    mod = importlib.import_module(f"diffusers.schedulers.{module_name}")
    old = mod.randn_tensor
    mod.randn_tensor = lambda shape, generator=None, device=None, dtype=None, **kw: \
        source(torch.empty(tuple(shape), dtype=dtype or F64))
    try:
        yield
    finally:
        mod.randn_tensor = old


def _diffusers(cls_name: str, kwargs: dict, sigma_state: bool, hook: str, module: str = ""):
    """``hook``: how the noise gets in: "variance_noise" (a step argument), "noise_sampler"
    (DPMSolverSDE's attribute, a Brownian path in sigma) or "randn" (``randn_tensor`` of
    ``module`` replaced)."""
    def run(n, problem, start, source) -> PeerRun:
        import diffusers

        diffusers.utils.logging.set_verbosity_error()
        sched = getattr(diffusers, cls_name)(**kwargs)
        sched.set_timesteps(n)
        sig = [float(s) for s in sched.sigmas]
        ls0 = -2.0 * math.log(sig[0])
        x_vp0 = start(ls0)
        state = x_vp0 * math.sqrt(1.0 + sig[0] ** 2) if sigma_state else x_vp0.clone()
        exact = ExactVP(problem)
        if hook == "noise_sampler":
            sched.noise_sampler = BrownianPath(source, state)
        ctx = _patched_randn(module, source) if hook == "randn" else _nullcontext()
        with torch.no_grad(), ctx:
            for i, tau in enumerate(sched.timesteps):
                x_in = sched.scale_model_input(state, tau)
                level = sig[i]
                if hook == "noise_sampler":   # DPMSolverSDE: its second stage is at the midpoint
                    level = float(sched.sigmas[sched.step_index] if sched.state_in_first_order
                                  else sched.mid_point_sigma)
                eps = exact.eps(x_in, -2.0 * math.log(level))
                kw = dict(variance_noise=source(state)) if hook == "variance_noise" else {}
                state = sched.step(eps, tau, state, **kw).prev_sample
        if sig[-1] == 0.0:
            return PeerRun(state.to(F64), x_vp0, exact.calls, ls0, exact.log_snrs[-1], "denoise", math.inf)
        ls_end = -2.0 * math.log(sig[-1])
        x = state / math.sqrt(1.0 + sig[-1] ** 2) if sigma_state else state
        return PeerRun(x.to(F64), x_vp0, exact.calls, ls0, exact.log_snrs[-1], "sigma", ls_end)

    return run


@contextmanager
def _nullcontext():
    yield


def available_peers() -> tuple[list[StochPeer], list[str]]:
    """The peers' stochastic samplers whose library imports; a note for each that does not."""
    peers, missing = [], []
    try:
        load_kdiffusion()
        two = lambda n: 2 * n - 1       # noqa: E731  (2 NFE a step, the last step to 0 one)
        peers += [StochPeer("k-diffusion euler_ancestral", "k-diffusion", _kd("sample_euler_ancestral")),
                  StochPeer("k-diffusion dpm_2_ancestral", "k-diffusion", _kd("sample_dpm_2_ancestral"), two),
                  StochPeer("k-diffusion dpmpp_2s_ancestral", "k-diffusion", _kd("sample_dpmpp_2s_ancestral"), two),
                  StochPeer("k-diffusion dpmpp_sde", "k-diffusion", _kd("sample_dpmpp_sde", brownian=True), two,
                            "Brownian-tree noise"),
                  StochPeer("k-diffusion dpmpp_2m_sde", "k-diffusion", _kd("sample_dpmpp_2m_sde")),
                  StochPeer("k-diffusion dpmpp_3m_sde", "k-diffusion", _kd("sample_dpmpp_3m_sde"))]
    except ImportError as err:
        missing.append(f"k-diffusion ({err})")
    try:
        import diffusers  # noqa: F401
        ddpm = {"beta_start": 1e-4, "beta_end": 0.02}
        peers += [
            StochPeer("diffusers EulerAncestralDiscrete", "diffusers",
                      _diffusers("EulerAncestralDiscreteScheduler", {}, True, "randn",
                                 "scheduling_euler_ancestral_discrete")),
            StochPeer("diffusers DPMSolverSDE", "diffusers",
                      _diffusers("DPMSolverSDEScheduler", ddpm, True, "noise_sampler"), lambda n: 2 * n - 1,
                      "DDPM betas"),
            StochPeer("diffusers SASolver", "diffusers",
                      _diffusers("SASolverScheduler", {}, False, "randn", "scheduling_sasolver"),
                      note="ends at sigma 0.01, no denoising"),
            StochPeer("diffusers DPMSolverMultistep(sde-dpmsolver++)", "diffusers",
                      _diffusers("DPMSolverMultistepScheduler",
                                 {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}, False,
                                 "variance_noise"), note="Karras sigmas"),
        ]
    except ImportError:
        missing.append("diffusers (pip install diffusers)")
    return peers, missing


def score_sde_pc() -> tuple[StochSpec, str]:
    """score_sde's PC sampler: our ``pc`` with the batch-mean Langevin corrector if present."""
    from solvers import correctors
    if "langevin_score_sde" in correctors.CORRECTORS:
        return StochSpec("pc", {"predictor": "reverse_diffusion", "corrector": "langevin_score_sde",
                                "snr": 0.16}), "score_sde PC"
    return StochSpec("pc", {"predictor": "reverse_diffusion", "corrector": "langevin", "snr": 0.16}), \
        "score_sde-like PC (per-sample norms)"


# ------------------------------------------------------------------------------ maps
@dataclass(frozen=True)
class Map:
    log_snr_start: float
    log_snr_stop: float      # the last evaluated level (denoise) or the end level (sigma)
    denoise: bool

    @staticmethod
    def of(run: PeerRun) -> "Map":
        stop = run.log_snr_last if run.end == "denoise" else run.log_snr_end
        return Map(round(run.log_snr_start, 9), round(stop, 9), run.end == "denoise")

    def times(self, sde) -> tuple[float, float]:
        tl = lambda ls: float(sde.t_of_log_snr(torch.tensor(ls, dtype=F64)))  # noqa: E731
        return min(tl(self.log_snr_start), sde.T), tl(self.log_snr_stop)

    def key(self) -> str:
        return f"{self.log_snr_start:.4f}->{self.log_snr_stop:.4f}{' denoise' if self.denoise else ''}"


def to_sde_scale(x_vp: torch.Tensor, log_snr: float, sde, t: float) -> torch.Tensor:
    """x/alpha is the same on every SDE at equal log-SNR."""
    return x_vp * math.sqrt(1.0 + math.exp(-log_snr)) * float(sde.alpha(torch.tensor(t, dtype=F64)))


# ---------------------------------------------------------------------------- targets
def target_moments(problem: StochProblem, mp: Map) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean and covariance of the map's output law (Gaussian target): the marginal at the
    stop level, through the affine Tweedie map where the map denoises."""
    t = t_of_log_snr(mp.log_snr_stop)
    marg = problem.target.marginal(REF_SDE, t)
    if not mp.denoise:
        return marg.mean, marg.cov
    d = marg.mean.numel()
    rows = marg.mean.repeat(d + 1, 1)
    rows[1:] += torch.eye(d, dtype=F64)
    out = problem.target.x0(rows, t, REF_SDE)
    a = (out[1:] - out[0]).T
    return out[0], a @ marg.cov @ a.T


def target_samples(problem: StochProblem, mp: Map, n: int, seed: int) -> torch.Tensor:
    t = t_of_log_snr(mp.log_snr_stop)
    x = problem.target.marginal(REF_SDE, t).sample(n, torch.Generator().manual_seed(seed))
    return problem.target.x0(x, t, REF_SDE) if mp.denoise else x


def _impulse_batch(problem: StochProblem, log_snr: float, calls: int):
    marg = problem.target.marginal(REF_SDE, t_of_log_snr(log_snr))
    d = marg.mean.numel()
    x = marg.mean.repeat(1 + d + calls * d, 1)
    x[1:1 + d] += torch.eye(d, dtype=F64)
    return x, marg.cov


def peer_moments(peer: StochPeer, n: int, problem: StochProblem) -> tuple[torch.Tensor, torch.Tensor, PeerRun]:
    """Exact output moments of an affine peer run: a probe counts its normals, then one run
    on start impulses and noise impulses (as :func:`validation.metrics.exact_moments`)."""
    prob = problem.as_problem(1)
    probe = _CountNoise()
    d = problem.target.dim
    peer.runner(n, prob, lambda ls: _impulse_batch(problem, ls, 0)[0][:1], _source(probe))
    covs = {}

    def start(ls):
        x, covs["c"] = _impulse_batch(problem, ls, probe.calls)
        return x

    run = peer.runner(n, prob, start, _source(_ImpulseNoise(d, 1 + d)))
    out = run.x
    mean = out[0]
    a, b = (out[1:1 + d] - mean).T, out[1 + d:] - mean
    return mean, a @ covs["c"] @ a.T + b.T @ b, run


# ------------------------------------------------------------------------- evaluation
def is_affine(spec: StochSpec, problem: StochProblem) -> bool:
    """Empirically: does the sampler map (x_T, noise) affinely to its output?  Three separate
    runs (so batch coupling shows): f((a+b)/2, z/2) vs (f(a, z) + f(b, 0))/2."""
    sde = FAMILY_SDES[problem.family]
    model = problem.target.as_model(sde, "eps")
    g = torch.Generator().manual_seed(5)
    xa, xb = (torch.randn(3, problem.target.dim, generator=g, dtype=F64) for _ in range(2))

    def run(x, w):
        src = lambda i, t0, t1, like: w * Normals(1000 + i)(like)  # noqa: E731
        return solvers.sample(model, x, spec.name, 4, generator=src, **spec.options).x

    mid = run(0.5 * (xa + xb), 0.5)
    pred = 0.5 * (run(xa, 1.0) + run(xb, 0.0))      # f((a+b)/2, (n+0)/2) if affine
    return bool(torch.allclose(mid, pred, rtol=1e-9, atol=1e-9))


@dataclass
class Context:
    """What one benchmark run shares: sizes, caches."""
    samples: int = 4000             # per mixture measurement
    mc_samples: int = 8000          # Monte-Carlo moments (non-affine samplers on the Gaussian)
    floor_pairs: int = 5
    cache: dict = field(default_factory=dict)

    def memo(self, key, fn):
        if key not in self.cache:
            self.cache[key] = fn()
        return self.cache[key]


def _mixture_metrics(ctx: Context, problem: StochProblem, mp: Map, x: torch.Tensor) -> dict:
    """Sliced W2 and energy distance to the map's exact reference set (its own pair term cached)."""
    ref = ctx.memo(("ref", problem.target_key, mp), lambda: target_samples(problem, mp, ctx.samples, REF_SEED))
    ref_self = ctx.memo(("ref_self", problem.target_key, mp), lambda: mean_pairwise_distance(ref, ref))
    x = x.to(F64)
    e2 = 2.0 * mean_pairwise_distance(x, ref) - mean_pairwise_distance(x, x) - ref_self
    return dict(sw=sliced_wasserstein(x, ref), energy=math.sqrt(max(e2, 0.0)))


def _kl(problem: StochProblem, mp: Map, mean, cov) -> float:
    return gaussian_kl(mean, cov, *target_moments(problem, mp))


def floors(ctx: Context, problem: StochProblem, mp: Map) -> dict:
    """Each distance's floor on this map's target (mean, min, max over independent pairs)."""
    def compute():
        if problem.gaussian:
            m, c = target_moments(problem, mp)
            vals = []
            for k in range(ctx.floor_pairs):
                x = target_samples(problem, mp, ctx.mc_samples, 2000 + k)
                vals.append(gaussian_kl(x.mean(0), torch.cov(x.T), m, c))
            return dict(kl_mc=dict(mean=sum(vals) / len(vals), min=min(vals), max=max(vals),
                                   samples=ctx.mc_samples))
        draw = lambda s: target_samples(problem, mp, ctx.samples, s)  # noqa: E731
        return dict(sw=distance_floor(sliced_wasserstein, draw, ctx.floor_pairs),
                    energy=distance_floor(energy_distance, draw, ctx.floor_pairs), samples=ctx.samples)
    return ctx.memo(("floor", problem.target_key, mp), compute)


def evaluate_peer(ctx: Context, peer: StochPeer, problem: StochProblem, budget: int) -> dict | None:
    n = peer.n_for(budget)
    if n is None:
        return None

    def compute():
        if problem.gaussian:
            mean, cov, run = peer_moments(peer, n, problem)
            vals = dict(kl=_kl(problem, Map.of(run), mean, cov))
        else:
            prob = problem.as_problem(ctx.samples)
            start = lambda ls: start_samples(prob, REF_SDE, t_start=t_of_log_snr(ls), seed=START_SEED)  # noqa
            run = peer.runner(n, prob, start, Normals(NOISE_SEED))
            vals = _mixture_metrics(ctx, problem, Map.of(run), run.x)
        return dict(sampler=peer.name, who=peer.family, budget=budget, nfe=run.nfe, mode="exact" if
                    problem.gaussian else "samples", map=Map.of(run), **vals)
    # the peers do not see our SDE: one evaluation per target
    return ctx.memo(("peer", problem.target_key, peer.name, budget), compute)


def evaluate_ours(ctx: Context, spec: StochSpec, label: str, problem: StochProblem, budget: int, mp: Map,
                  who: str = "ours") -> dict | None:
    """One of our samplers (or score_sde's PC, ``who="score_sde"``) on the map ``mp``."""
    def compute():
        sde = FAMILY_SDES[problem.family]
        try:
            steps = steps_for_nfe(spec.name, spec.options, budget - (1 if mp.denoise else 0))
        except (ValueError, TypeError, KeyError):
            steps = None
        if steps is None:
            return None
        ts, te = mp.times(sde)
        model = problem.target.as_model(sde, "eps")
        kw = dict(t_start=ts, t_end=te, final_denoise=mp.denoise, **spec.options)
        affine = ctx.memo(("affine", problem.name, label), lambda: is_affine(spec, problem))
        if problem.gaussian and affine:
            marg = problem.target.marginal(sde, ts)
            mean, cov, nfe = exact_moments(model, spec.name, steps, marg.mean, marg.cov, **kw)
            vals, mode = dict(kl=_kl(problem, mp, mean, cov)), "exact"
        else:
            n = ctx.mc_samples if problem.gaussian else ctx.samples
            prob = problem.as_problem(n)
            x_vp = start_samples(prob, REF_SDE, t_start=t_of_log_snr(mp.log_snr_start), seed=START_SEED)
            sol = solvers.sample(model, to_sde_scale(x_vp, mp.log_snr_start, sde, ts), spec.name, steps,
                                 generator=torch.Generator().manual_seed(NOISE_SEED), **kw)
            nfe = sol.nfe
            if problem.gaussian:
                vals, mode = dict(kl=_kl(problem, mp, sol.x.mean(0), torch.cov(sol.x.T))), "mc"
            else:
                vals, mode = _mixture_metrics(ctx, problem, mp, sol.x), "samples"
        return dict(sampler=label, who=who, budget=budget, nfe=nfe, mode=mode, map=mp, **vals)
    return ctx.memo(("ours", problem.name, label, budget, mp), compute)



# ---------------------------------------------------------------------------- driver
PRIMARY = {True: "kl", False: "sw"}      # by problem.gaussian


def canonical_map(ctx: Context, peers: list[StochPeer], problem: StochProblem) -> Map:
    """The k-diffusion map (Karras grid from VP at T to the suite's end, then denoise): where
    every one of ours is shown; else the first peer's."""
    first = sorted(peers, key=lambda p: p.family != "k-diffusion")[0]
    return evaluate_peer(ctx, first, problem, BUDGETS[0])["map"]


def effective(ctx: Context, problem: StochProblem, row: dict, metric: str) -> float:
    """The distance used in comparisons: a Monte-Carlo distance inside its floor's range (at or
    below the largest distance between two independent exact sets) counts as that maximum, since
    sampling noise alone reaches it; exact values as they are."""
    if row["mode"] == "exact":
        return row[metric]
    fl = floors(ctx, problem, row["map"])["kl_mc" if problem.gaussian else metric]
    return max(row[metric], fl["max"])


def run_problem(ctx: Context, problem: StochProblem, budgets, ours: list[StochSpec], peers: list[StochPeer],
                log=lambda *a: None) -> dict:
    """Every sampler at every budget: ours on the canonical map, the peers on theirs, score_sde's
    PC (our pc, its option) on the canonical map; then, per budget, the best peer and ours on
    that peer's own map."""
    metric = PRIMARY[problem.gaussian]
    canon = canonical_map(ctx, peers, problem)
    sspec, slabel = score_sde_pc()
    rows, compare = [], {}
    for b in budgets:
        for p in peers:
            r = evaluate_peer(ctx, p, problem, b)
            if r is not None:
                rows.append(r)
        r = evaluate_ours(ctx, sspec, slabel, problem, b, canon, who="score_sde")
        if r is not None:
            rows.append(r)
        for s in ours:
            r = evaluate_ours(ctx, s, s.label, problem, b, canon)
            if r is not None:
                rows.append(r)
        log(f"{problem.name} NFE {b}")
        theirs = [r for r in rows if r["budget"] == b and r["who"] != "ours"]
        if not theirs:
            continue
        eff = lambda r: effective(ctx, problem, r, metric)  # noqa: E731
        best_peer = min(theirs, key=lambda r: (eff(r), r[metric]))
        mine = [r for r in (evaluate_ours(ctx, s, s.label, problem, b, best_peer["map"]) for s in ours) if r]
        if not mine:
            continue
        best = min(mine, key=lambda r: (eff(r), r[metric]))
        fl = floors(ctx, problem, best_peer["map"]).get("kl_mc" if problem.gaussian else metric)
        compare[b] = dict(peer=best_peer["sampler"], peer_value=best_peer[metric], peer_nfe=best_peer["nfe"],
                          ours=best["sampler"], ours_value=best[metric], ours_nfe=best["nfe"],
                          ratio=eff(best) / eff(best_peer) if eff(best_peer) > 0 else math.inf,
                          map=best_peer["map"].key(), floor=dict(mean=fl["mean"], max=fl["max"]),
                          on_map={r["sampler"]: r[metric] for r in mine},
                          on_map_effective={r["sampler"]: eff(r) for r in mine}, peer_effective=eff(best_peer))
    maps = {r["map"] for r in rows}
    return dict(problem=problem.name, label=problem.label, role=problem.role, family=problem.family,
                metric=metric, canonical_map=canon.key(),
                floors={m.key(): floors(ctx, problem, m) for m in maps},
                rows=[{**r, "map": r["map"].key()} for r in rows], compare=compare)


def recommend(results: list[dict], budgets) -> dict:
    """ONE of our samplers per budget: the one whose worst ratio ours / best peer (on the best
    peer's map, distances floor-clipped by :func:`effective`) over the tuning problems is
    smallest, ties by the geometric mean (a minimax rule: the aim is to be within 1.2x of the
    best peer everywhere, not far ahead on average); then its ratio on each held-out problem,
    within 1.2x or inside the floor's range (indistinguishable from exact sampling at this
    sample size) or not."""
    tuning = [r for r in results if r["role"] == "tuning"]
    held = [r for r in results if r["role"] != "tuning"]
    out = {}
    for b in budgets:
        comps = [r["compare"].get(b) for r in tuning]
        if not tuning or any(c is None for c in comps):
            continue
        names = set.intersection(*(set(c["on_map_effective"]) for c in comps))
        logs = {n: [math.log(max(c["on_map_effective"][n], 1e-300) / c["peer_effective"]) for c in comps]
                for n in names if all(math.isfinite(c["on_map_effective"][n]) for c in comps)}
        if not logs:
            continue
        rule = min(logs, key=lambda n: (round(max(logs[n]), 9), sum(logs[n])))
        rows = []
        for r in held:
            c = r["compare"].get(b)
            if c is None or rule not in c["on_map"]:
                continue
            ratio = c["on_map_effective"][rule] / c["peer_effective"]
            at_floor = bool(r["metric"] != "kl" and c["on_map"][rule] <= c["floor"]["max"])
            rows.append(dict(problem=r["problem"], metric=r["metric"], value=c["on_map"][rule], peer=c["peer"],
                             peer_value=c["peer_value"], ratio=ratio, within=bool(ratio <= 1.2 or at_floor),
                             at_floor=at_floor))
        out[b] = dict(rule=rule, tuning_worst=math.exp(max(logs[rule])),
                      tuning_ratio=math.exp(sum(logs[rule]) / len(logs[rule])), heldout=rows)
    return out


def run(problems: list[str] | None = None, budgets=BUDGETS, samples: int = 4000, mc_samples: int = 8000,
        ours: list[str] | None = None, peer_names: list[str] | None = None, log=lambda *a: None) -> dict:
    """The whole benchmark: per problem (all of :func:`make_problems` by default) the rows, the
    floors, the best-vs-best comparison; the recommended sampler per budget; what was skipped."""
    torch.set_num_threads(1)
    avail = set(solvers.available_methods())
    specs = [s for s in OURS if s.name in avail and (ours is None or s.label in ours or s.name in ours)]
    skipped = [s.label for s in OURS if s.name not in avail]
    peers, missing = available_peers()
    if peer_names is not None:
        peers = [p for p in peers if p.name in peer_names]
    ctx = Context(samples=samples, mc_samples=mc_samples)
    probs = make_problems()
    res = [run_problem(ctx, probs[n], budgets, specs, peers, log) for n in (problems or list(probs))]
    return dict(budgets=list(budgets), samples=samples, mc_samples=mc_samples, problems=res,
                recommended={str(k): v for k, v in recommend(res, budgets).items()}, skipped=skipped,
                missing=missing, score_sde_pc=score_sde_pc()[1],
                peer_notes={p.name: p.note for p in peers if p.note})
