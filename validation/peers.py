r"""Peers, side by side (optional ``bench`` extra): diffusers schedulers and k-diffusion samplers
on the same exact problems, with their conventions converted exactly.

**One map per peer run.**  The probability-flow ODE between two noise levels depends only on
their log-SNRs :math:`\log(\alpha^2/\sigma^2)` (``log_snr``, twice :math:`\lambda = \log(\alpha/\sigma)`),
not on the SDE that parameterises time.  Every peer run is therefore described by the map it
actually computes, read from the peer's own arrays after ``set_timesteps`` / from its sigma grid:

- ``log_snr_start``: the noise level of the state it starts from (its first timestep);
- an end: ``"denoise"`` (its last step jumps to sigma = 0 with a first-order step, i.e. it
  returns the Tweedie estimate :math:`\hat x_0` at the last evaluated level ``log_snr_last``),
  ``"flow0"`` (a higher-order step to sigma = 0: the flow to the data end, approximated by
  sigma/alpha = 1e-7) or ``"sigma"`` (it stops at ``log_snr_end`` > -inf).

The reference is the exact map for that run (closed-form flow for the Gaussian, a chain of
tight pf_ode solves for the mixtures) on a continuous VP SDE (``REF_SDE``) at the same
log-SNRs, followed by the exact :math:`\hat x_0` for ``"denoise"``.  Our methods are run on
the same map (same start samples, same end, the same NFE; a ``"denoise"`` map costs us one
NFE for ``final_denoise``), on our own grids.

**Conventions.**  diffusers: a DDPM schedule of 1000 steps (its defaults: linear betas
1e-4..0.02); the exact model is evaluated at the noise level the scheduler assigns to the
timestep it passes (its own ``timesteps``/``sigmas`` table; for integer timesteps this is
:math:`\bar\alpha_\tau` of ``scoresde.DiscreteVPSDE(alphas_cumprod=...)`` at
:math:`t = (\tau+1)/N`, checked), on the VP-scaled input it receives (after
``scale_model_input``).  Euler/Heun keep the state in sigma space (:math:`x/\alpha`);
the others in VP space.  diffusers upcasts to float32 inside ``step``: its error floor is about
1e-7 relative.  k-diffusion: sigma space, :math:`\hat x = x/\alpha`, denoiser
:math:`D(\hat x, \hat\sigma) = \hat x_0(\alpha\hat x)`, Karras grid (rho = 7) from
:math:`\hat\sigma_{max}` of VP at T to :math:`\hat\sigma_{min}` at the suite's ``t_end``, then 0
(``dpm_fast`` stops at :math:`\hat\sigma_{min}`); run with float64 as the default dtype so
that its grids are float64 like its state.
"""
from __future__ import annotations

import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

import scoresde
import solvers

from .metrics import fit_order
from .problems import END_NOISE, F64, Problem, end_time, reference_map, rms, start_samples

#: the continuous VP on which every peer map is expressed (T = 1.1 reaches diffusers' first
#: timestep, log-SNR -10.12, beyond VPSDE()'s -10.05 at t = 1)
REF_SDE = scoresde.VPSDE(T=1.1)
#: sigma/alpha standing for "sigma = 0" (an error of O(1e-14))
SIGMA_ZERO = 1e-7

COMPARE_NFE = (5, 6, 8, 10, 15, 20, 50)
ORDER_NFE = (10, 14, 20, 28, 40, 56, 80, 113, 160)


def t_of_log_snr(log_snr: float) -> float:
    return float(REF_SDE.t_of_log_snr(torch.tensor(log_snr, dtype=F64)))


def log_snr_of_t(t: float) -> float:
    return float(REF_SDE.log_snr(torch.tensor(t, dtype=F64)))


@dataclass
class PeerRun:
    x: torch.Tensor          # output, VP scale (data scale after a denoise/flow0 end)
    x_start: torch.Tensor    # the VP-scale start samples
    nfe: int
    log_snr_start: float
    log_snr_last: float      # noise level of the last evaluation
    end: str                 # "denoise" | "flow0" | "sigma"
    log_snr_end: float       # where the map ends ("sigma"), else +inf
    seconds: float = 0.0


@dataclass
class Peer:
    name: str
    family: str
    order: float
    runner: Callable         # (n, problem, exact, dtype, timer) -> PeerRun
    nfe_of: Callable[[int], int] = lambda n: n
    note: str = ""
    steps_for: Callable[[int], int] = field(default=None)

    def n_for(self, target: int) -> int | None:
        best = None
        for n in range(1, target + 1):
            if self.nfe_of(n) <= target:
                best = n
        return best


# --------------------------------------------------------------------- exact models
class ExactVP:
    """Exact eps / x0 of a target at a given log-SNR, on VP-scaled inputs; counts calls."""

    def __init__(self, problem: Problem):
        self.target = problem.target
        self.calls = 0
        self.log_snrs: list[float] = []

    def eps(self, x_vp: torch.Tensor, log_snr: float) -> torch.Tensor:
        self.calls += 1
        self.log_snrs.append(log_snr)
        return self.target.eps(x_vp, t_of_log_snr(log_snr), REF_SDE)

    def x0(self, x_vp: torch.Tensor, log_snr: float) -> torch.Tensor:
        self.calls += 1
        self.log_snrs.append(log_snr)
        return self.target.x0(x_vp, t_of_log_snr(log_snr), REF_SDE)


def _start(problem: Problem, log_snr: float, n: int | None = None) -> torch.Tensor:
    return start_samples(problem, REF_SDE, t_start=t_of_log_snr(log_snr), n=n, seed=41)


@contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# ------------------------------------------------------------------------- diffusers
def _diffusers_runner(cls_name: str, kwargs: dict, sigma_state: bool, check_kwargs: dict | None = None):
    """A runner for a diffusers scheduler.  ``sigma_state``: the scheduler keeps x/alpha
    (Euler, Heun) rather than the VP-scaled x.  ``check_kwargs``: the options of the order
    check (a grid whose map does not move with n, e.g. Karras sigmas)."""
    check_kwargs = check_kwargs or {}

    def run(n: int, problem: Problem, net=None, samples: int | None = None, check: bool = False) -> PeerRun:
        import diffusers

        diffusers.utils.logging.set_verbosity_error()
        sched = getattr(diffusers, cls_name)(**{**kwargs, **(check_kwargs if check else {})})
        t_set = time.perf_counter()
        sched.set_timesteps(n)
        t_set = time.perf_counter() - t_set   # part of a sampling call: counted in the overhead
        ac = sched.alphas_cumprod.to(F64)
        dsde = scoresde.DiscreteVPSDE(alphas_cumprod=ac)
        sig = getattr(sched, "sigmas", None)
        sig = [float(s) for s in sig] if sig is not None and len(sig) >= len(sched.timesteps) else None

        def log_snr_of(i: int, tau: float) -> float:
            """The noise level of the i-th evaluation: the scheduler's own sigma for that step
            where it has one, else alphas_cumprod at the (integer) timestep."""
            if sig is not None and sig[i] > 0:
                return -2.0 * math.log(sig[i])
            k = int(round(tau))
            if abs(tau - k) > 1e-6:
                raise ValueError(f"{cls_name}: fractional timestep {tau} without a sigma table")
            # DiscreteVPSDE's knot t = (k + 1)/N carries alphas_cumprod[k]
            return float(dsde.log_snr(torch.tensor((k + 1) / dsde.num_steps, dtype=F64)))

        taus = [float(t) for t in sched.timesteps.tolist()]
        log_snr0 = log_snr_of(0, taus[0])
        # the end: sigma = 0 after the last step (sigmas[-1] = 0, or DDIM's final alpha 1)
        if sig is not None:
            s_final = sig[-1]
        else:
            fa = float(getattr(sched, "final_alpha_cumprod", torch.tensor(1.0)))
            s_final = math.sqrt(max(1.0 - fa, 0.0) / fa)
        x_vp0 = _start(problem, log_snr0, samples)
        exact = ExactVP(problem)
        state = x_vp0 * math.sqrt(1.0 + math.exp(-log_snr0)) if sigma_state else x_vp0.clone()
        t0 = time.perf_counter()
        with torch.no_grad():
            for i, tau in enumerate(sched.timesteps):
                x_in = sched.scale_model_input(state, tau)
                if net is not None:
                    exact.calls += 1
                    eps = net(x_in, tau.reshape(1).expand(x_in.shape[0]))
                else:
                    eps = exact.eps(x_in, log_snr_of(i, taus[i]))
                state = sched.step(eps, tau, state).prev_sample
        secs = time.perf_counter() - t0 + t_set
        log_snr_last = exact.log_snrs[-1] if exact.log_snrs else log_snr0
        if s_final == 0.0:
            end, log_snr_end, x_out = "denoise", math.inf, state
        else:
            log_snr_end = -2.0 * math.log(s_final)
            end = "sigma"
            x_out = state / math.sqrt(1.0 + math.exp(-log_snr_end)) if sigma_state else state
        return PeerRun(x_out.to(F64), x_vp0, exact.calls, log_snr0, log_snr_last, end, log_snr_end, secs)

    return run


# ---------------------------------------------------------------------- k-diffusion
def load_kdiffusion():
    """k-diffusion's sampling module, loaded without its package ``__init__`` (which imports
    torchvision): :func:`scoresde.integrations.kdiffusion.load_sampling`."""
    from scoresde.integrations.kdiffusion import load_sampling
    return load_sampling()


def kd_sigma_range() -> tuple[float, float]:
    vp = scoresde.VPSDE()
    log_snr_max = float(vp.log_snr(torch.tensor(vp.T, dtype=F64)))
    log_snr_min = float(vp.log_snr(torch.tensor(end_time(vp), dtype=F64)))
    return math.exp(-0.5 * log_snr_min), math.exp(-0.5 * log_snr_max)


def _kd_runner(fn_name: str, end: str, fast: bool = False, grid: str = "karras", **fn_kwargs):
    """A runner for a k-diffusion sampler on its ``grid``: ``"karras"`` (rho = 7, its documented
    default) or ``"exponential"`` (uniform in log sigma), both from sigma_max to sigma_min, then 0."""
    def run(n: int, problem: Problem, net=None, samples: int | None = None, check: bool = False) -> PeerRun:
        kd = load_kdiffusion()
        s_min, s_max = kd_sigma_range()
        exact = ExactVP(problem)

        def denoiser(x, sigma):
            s = float(sigma.reshape(-1)[0])
            scale = 1.0 / math.sqrt(1.0 + s * s)
            if net is not None:
                exact.calls += 1
                eps = net(x * scale, torch.full((x.shape[0],), math.log(s), dtype=x.dtype))
                return x - s * eps
            return exact.x0(x * scale, -2.0 * math.log(s))

        # float64 grids for the float64 accuracy runs; the overhead runs (a float32 net) keep float32
        with default_dtype(F64 if net is None else torch.float32):
            if fast:
                log_snr0, log_snr_end = -2.0 * math.log(s_max), -2.0 * math.log(s_min)
                t_set = 0.0
            else:
                t_set = time.perf_counter()
                sigmas = (kd.get_sigmas_karras(n, s_min, s_max, rho=7.0) if grid == "karras"
                          else kd.get_sigmas_exponential(n, s_min, s_max))
                t_set = time.perf_counter() - t_set
                log_snr0 = -2.0 * math.log(float(sigmas[0]))
            x_vp0 = _start(problem, log_snr0, samples)
            x = x_vp0 * math.sqrt(1.0 + math.exp(-log_snr0))
            t0 = time.perf_counter()
            with torch.no_grad():
                if fast:
                    out = kd.sample_dpm_fast(denoiser, x, s_min, s_max, n, disable=True, **fn_kwargs)
                else:
                    out = getattr(kd, fn_name)(denoiser, x, sigmas, disable=True, **fn_kwargs)
            secs = time.perf_counter() - t0 + t_set
        log_snr_last = exact.log_snrs[-1] if exact.log_snrs else log_snr0
        if fast:
            return PeerRun(out / math.sqrt(1.0 + math.exp(-log_snr_end)), x_vp0, exact.calls, log_snr0,
                           log_snr_last, "sigma", log_snr_end, secs)
        return PeerRun(out, x_vp0, exact.calls, log_snr0, log_snr_last, end, math.inf, secs)

    return run


def available_peers() -> tuple[list[Peer], list[str]]:
    """The peers whose library imports, and a note for each family that does not."""
    peers, missing = [], []
    try:
        import diffusers  # noqa: F401
        D = _diffusers_runner
        karras = {"use_karras_sigmas": True}
        peers += [
            Peer("diffusers DPMSolverMultistep(2)", "diffusers", 2,
                 D("DPMSolverMultistepScheduler", {"solver_order": 2}, False, karras)),
            Peer("diffusers DPMSolverMultistep(3)", "diffusers", 3,
                 D("DPMSolverMultistepScheduler", {"solver_order": 3}, False, karras)),
            Peer("diffusers DPMSolverSinglestep(2)", "diffusers", 2,
                 D("DPMSolverSinglestepScheduler", {}, False, karras)),
            Peer("diffusers UniPCMultistep(2, bh2)", "diffusers", 3, D("UniPCMultistepScheduler", {}, False, karras),
                 note="UniPC-2 with its corrector: order 3"),
            Peer("diffusers DEISMultistep(2)", "diffusers", 2, D("DEISMultistepScheduler", {}, False, karras)),
            # clip_sample=False: the default clips x0 to [-1, 1] (an image-data assumption that
            # changes the problem); eta = 0
            Peer("diffusers DDIM", "diffusers", 1, D("DDIMScheduler", {"clip_sample": False}, False),
                 note="clip_sample=False"),
            Peer("diffusers EulerDiscrete", "diffusers", 1, D("EulerDiscreteScheduler", {}, True, karras)),
            Peer("diffusers HeunDiscrete", "diffusers", 2, D("HeunDiscreteScheduler", {}, True, karras),
                 nfe_of=lambda n: 2 * n - 1),
        ]
    except ImportError:
        missing.append("diffusers (pip install diffusers)")
    try:
        load_kdiffusion()
        K = _kd_runner
        peers += [
            Peer("k-diffusion euler", "k-diffusion", 1, K("sample_euler", "denoise")),
            Peer("k-diffusion heun", "k-diffusion", 2, K("sample_heun", "denoise"), nfe_of=lambda n: 2 * n - 1),
            Peer("k-diffusion dpm_2", "k-diffusion", 2, K("sample_dpm_2", "denoise"), nfe_of=lambda n: 2 * n - 1),
            Peer("k-diffusion lms", "k-diffusion", 4, K("sample_lms", "flow0"),
                 note="order-4 linear multistep in sigma"),
            Peer("k-diffusion dpmpp_2m", "k-diffusion", 2, K("sample_dpmpp_2m", "denoise")),
            Peer("k-diffusion dpm_fast", "k-diffusion", 3, K(None, "sigma", fast=True),
                 note="DPM-Solver-fast: NFE budget split into orders 3, 2, 1"),
        ]
    except ImportError as err:
        missing.append(f"k-diffusion ({err})")
    return peers, missing


def fewstep_peers() -> tuple[list[Peer], list[str]]:
    """:func:`available_peers` plus the documented grid options of each: diffusers' multistep
    schedulers with ``use_karras_sigmas=True``, k-diffusion's samplers on its exponential grid."""
    peers, missing = available_peers()
    extra = []
    for p in peers:
        if p.family == "diffusers" and any(k in p.name for k in ("Multistep", "Singlestep")):
            cls = {"DPMSolverMultistep(2)": ("DPMSolverMultistepScheduler", {"solver_order": 2}),
                   "DPMSolverMultistep(3)": ("DPMSolverMultistepScheduler", {"solver_order": 3}),
                   "DPMSolverSinglestep(2)": ("DPMSolverSinglestepScheduler", {}),
                   "UniPCMultistep(2, bh2)": ("UniPCMultistepScheduler", {}),
                   "DEISMultistep(2)": ("DEISMultistepScheduler", {})}[p.name.split(" ", 1)[1]]
            extra.append(Peer(p.name + " karras", p.family, p.order,
                              _diffusers_runner(cls[0], {**cls[1], "use_karras_sigmas": True}, False)))
        if p.family == "k-diffusion" and "dpm_fast" not in p.name:
            fn = "sample_" + p.name.split(" ", 1)[1]
            end = "flow0" if "lms" in p.name else "denoise"
            extra.append(Peer(p.name + " exponential", p.family, p.order, _kd_runner(fn, end, grid="exponential"),
                              nfe_of=p.nfe_of))
    return peers + extra, missing


# ---------------------------------------------------------------- reference and ours
def map_times(run: PeerRun) -> tuple[float, float, bool]:
    """(t_start, t_end, denoise) of the run's map on REF_SDE."""
    ts = t_of_log_snr(run.log_snr_start)
    if run.end == "denoise":
        return ts, t_of_log_snr(run.log_snr_last), True
    if run.end == "flow0":
        return ts, t_of_log_snr(-2.0 * math.log(SIGMA_ZERO)), False
    return ts, t_of_log_snr(run.log_snr_end), False


class RefCache:
    """Exact maps, cached by (problem, start, end)."""

    def __init__(self):
        self.cache: dict = {}

    def get(self, problem: Problem, run: PeerRun) -> torch.Tensor:
        ts, te, den = map_times(run)
        key = (problem.name, round(ts, 13), round(te, 13), den, run.x_start.shape[0])
        if key not in self.cache:
            model = problem.target.as_model(REF_SDE, "eps")
            x = reference_map(problem, model, run.x_start, ts, [te])[te]
            if den:
                x = problem.target.x0(x, te, REF_SDE)
            self.cache[key] = x
        return self.cache[key]


#: our candidates on a peer's map: methods x grids (our grid choice is ours to make; the map,
#: the start samples and the NFE are the peer's)
OURS_METHODS = [("dpmpp_2m", {}), ("dpmpp_3m", {}), ("unipc", {"order": 2}), ("unipc", {"order": 3}),
                ("unipc", {"order": 2, "variant": "bh2"}), ("unipc", {"order": 3, "variant": "bh2"}),
                ("dpm_solver_3", {})]
#: "calibrated": solvers.calibrate_timesteps for that method, on separate calibration samples
OURS_SCHEDULES = ("log_snr", "karras", "quadratic", "uniform", "calibrated")
CALIBRATED_METHODS = [("unipc", {"order": 2, "variant": "bh2"}), ("unipc", {"order": 3, "variant": "bh2"})]
#: calibration is for the few-step regime: up to this NFE, with this many refinement trials
CALIBRATED_MAX_NFE = 20
CALIBRATION_TRIALS = 200
OURS = [(m, o, s) for m, o in OURS_METHODS for s in OURS_SCHEDULES
        if s != "calibrated" or (m, o) in CALIBRATED_METHODS]
#: calibration samples per calibrated grid, and their seed (the start samples use seed 41)
CALIBRATION_SAMPLES = 128
CALIBRATION_SEED = 1234


def ours_label(name: str, opts: dict, schedule: str | None = None) -> str:
    o = ",".join(f"{k}={v}" for k, v in opts.items())
    base = f"{name}({o})" if o else name
    return f"{base} [{schedule}]" if schedule else base


def ours_map(run: PeerRun) -> tuple[float, float, bool]:
    """(t_start, t_end, denoise) of *our* run on a peer's map.  Equal to :func:`map_times`, except
    on a ``flow0`` map (the flow to sigma = 0): there we integrate to the suite's data-end level
    sigma/alpha = END_NOISE (log-SNR 9.21) and take the first-order denoising step to sigma = 0
    (one NFE), as practitioners (score_sde's ``denoise``, k-diffusion's own samplers) do, rather
    than extrapolating in log-SNR over the last interval to sigma/alpha = 1e-7.  A fixed rule, the
    same at every NFE; the reference stays the peer's map to sigma/alpha = 1e-7."""
    ts, te, den = map_times(run)
    if run.end == "flow0":
        return ts, t_of_log_snr(-2.0 * math.log(END_NOISE)), True
    return ts, te, den


_CALIBRATED: dict = {}


def calibrated_grid(problem: Problem, ts: float, te: float, steps: int, name: str, opts: dict,
                    denoise: bool) -> solvers.CalibratedGrid:
    """``solvers.calibrate_timesteps`` for this method, problem and map, fitted on its own
    calibration samples (exact marginal at ``ts``, seed CALIBRATION_SEED: never the measured
    samples); cached."""
    key = (problem.name, round(ts, 13), round(te, 13), steps, ours_label(name, opts), denoise)
    if key not in _CALIBRATED:
        model = problem.target.as_model(REF_SDE, "eps")
        x_cal = problem.target.marginal(REF_SDE, ts).sample(CALIBRATION_SAMPLES,
                                                            torch.Generator().manual_seed(CALIBRATION_SEED))
        _CALIBRATED[key] = solvers.calibrate_timesteps(model, x_cal, steps, method=name, method_options=opts,
                                                       t_start=ts, t_end=te, final_denoise=denoise,
                                                       max_trials=CALIBRATION_TRIALS)
    return _CALIBRATED[key]


def ours_on_map(problem: Problem, run: PeerRun, name: str, opts: dict, nfe: int, ref: torch.Tensor,
                schedule: str | None = None) -> tuple[float, int, int] | None:
    """(error, NFE used, calibration NFE) of one of our candidates on the peer's map, or None
    where it does not apply (too few NFE, a calibrated grid above CALIBRATED_MAX_NFE, a grid
    that cannot be built)."""
    from .metrics import steps_for_nfe

    if schedule == "calibrated" and nfe > CALIBRATED_MAX_NFE:
        return None
    ts, te, den = ours_map(run)
    s = steps_for_nfe(name, opts, nfe - (1 if den else 0))
    if s is None:
        return None
    model = problem.target.as_model(REF_SDE, "eps")
    cal_nfe = 0
    if schedule == "calibrated":
        cal = calibrated_grid(problem, ts, te, s, name, opts, den)
        grid, cal_nfe = dict(timesteps=cal.timesteps), cal.nfe
    else:
        grid = dict(steps=s, schedule=schedule, t_start=ts, t_end=te)
    try:
        sol = solvers.sample(model, run.x_start, name, final_denoise=den, **grid, **opts)
    except ValueError:          # a grid that cannot be built for this map
        return None
    if sol.nfe > nfe:
        raise AssertionError(f"{ours_label(name, opts, schedule)} used {sol.nfe} NFE on a {nfe}-NFE map")
    e = rms(sol.x, ref)
    return (e if math.isfinite(e) else float("inf")), sol.nfe, cal_nfe


# ------------------------------------------------------------------------ overhead
class MLP(torch.nn.Module):
    """The overhead benchmark's network (here and in ``benchmarks/``): width 256, 3 hidden layers,
    SiLU, seeded weights; eps prediction."""

    def __init__(self, d: int, width: int = 256):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.inp = torch.nn.Linear(d + 1, width)
        self.body = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(width, width), torch.nn.SiLU(),
                                        torch.nn.Linear(width, width), torch.nn.SiLU())
        self.out = torch.nn.Linear(width, d)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))

    def forward(self, x, t):
        return self.out(self.body(self.inp(torch.cat([x, t[:, None].to(x.dtype)], dim=1))))


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


OVERHEAD_CASES = (("MLP width 256, batch 256", 256, 256), ("MLP width 32, batch 16", 32, 16))


def overhead(peers: list[Peer], d: int = 64, nfe: int = 20, repeats: int = 7) -> list[dict]:
    """Overhead ratio = total sampling time / (NFE x time of one network call), float32, the
    same network for everyone, medians of ``repeats``; two sizes: a realistic call (~1 ms) and
    a cheap one, where the per-step cost of the sampler itself shows.  Ours: the whole
    ``solvers.sample`` call; peers: ``set_timesteps`` (or the sigma grid) and the loop."""
    from .metrics import steps_for_nfe

    rows = []
    for label, width, batch in OVERHEAD_CASES:
        torch.manual_seed(0)
        net = MLP(d, width).float()
        x = torch.randn(batch, d)
        tvec = torch.full((batch,), 0.5)

        def one_call():
            with torch.no_grad():
                net(x, tvec)

        t_call = _median_time(one_call, repeats * 4)
        model = scoresde.ScoreModel(net, scoresde.VPSDE(), "eps")
        x_T = torch.randn(batch, d)
        for name, opts in [("dpmpp_2m", {}), ("dpmpp_3m", {}), ("unipc", {"order": 3}), ("ddim", {}),
                           ("euler", {}), ("heun", {}), ("dpm_solver_3", {})]:
            s = steps_for_nfe(name, opts, nfe)
            holder = {}

            def go():
                holder["sol"] = solvers.sample(model, x_T, name, s, **opts)

            tot = _median_time(go, repeats)
            n = holder["sol"].nfe
            rows.append(dict(case=label, who="ours", method=ours_label(name, opts), nfe=n, total_ms=1e3 * tot,
                             call_ms=1e3 * t_call, ratio=tot / (n * t_call)))
        prob = Problem("overhead", "overhead", scoresde.Gaussian(torch.zeros(d), 1.0), True, batch, False)  # float32
        netf = (lambda xx, tt, net=net: net(xx.float(), tt.float()))
        for peer in peers:
            n_steps = peer.n_for(nfe)
            peer.runner(n_steps, prob, net=netf)
            runs = [peer.runner(n_steps, prob, net=netf) for _ in range(repeats)]
            tot = statistics.median(r.seconds for r in runs)
            rows.append(dict(case=label, who=peer.family, method=peer.name, nfe=runs[0].nfe, total_ms=1e3 * tot,
                             call_ms=1e3 * t_call, ratio=tot / (runs[0].nfe * t_call)))
    return rows


# --------------------------------------------------------------------------- drivers
def check_order(peer: Peer, problem: Problem, refs: RefCache, tol: float, nfes=ORDER_NFE) -> dict:
    """Error vs NFE of the adapter on the Gaussian against the exact map of each run, in the
    peer's order-check configuration (diffusers: Karras sigmas, whose map does not move with
    the step count; its default grids are uniform in the discrete timestep, whose last interval
    keeps an O(1) log-SNR length and shows order ~1 for every method -- our own solvers on those
    grids measure the same).  The fitted order must reach theory - ``tol`` (else the peer's rows
    are dropped)."""
    nfe, errs = [], []
    for target in nfes:
        n = peer.n_for(target)
        run = peer.runner(n, problem, check=True)
        nfe.append(run.nfe)
        errs.append(rms(run.x, refs.get(problem, run)))
    fitted = fit_order(nfe, errs, floor=1e-6)
    ok = bool(math.isfinite(fitted) and fitted >= peer.order - tol)
    return dict(peer=peer.name, family=peer.family, theory=peer.order, fitted=fitted, nfe=nfe, errors=errs,
                ok=ok, note=peer.note)


def compare(peer: Peer, problem: Problem, refs: RefCache, nfes=COMPARE_NFE) -> dict:
    """Peer vs ours on the peer's own map at each NFE."""
    rows = []
    for target in nfes:
        n = peer.n_for(target)
        if n is None:
            continue
        run = peer.runner(n, problem)
        ref = refs.get(problem, run)
        e_peer = rms(run.x, ref)
        ours = {}
        for name, opts, sch in OURS:
            r = ours_on_map(problem, run, name, opts, run.nfe, ref, sch)
            if r is not None:
                ours[ours_label(name, opts, sch)] = dict(error=r[0], nfe=r[1], **(
                    dict(calibration_nfe=r[2], calibration_samples=CALIBRATION_SAMPLES) if r[2] else {}))
        best = min(ours.items(), key=lambda kv: kv[1]["error"]) if ours else (None, dict(error=float("nan")))
        ts, te, den = map_times(run)
        _, our_te, our_den = ours_map(run)
        rows.append(dict(target_nfe=target, nfe=run.nfe, peer_error=e_peer, ours=ours, best=best[0],
                         best_error=best[1]["error"],
                         map=dict(log_snr_start=run.log_snr_start, log_snr_last=run.log_snr_last, end=run.end,
                                  log_snr_end=run.log_snr_end, t_start=ts, t_end=te, denoise=den),
                         ours_end=dict(t_end=our_te, denoise=our_den)))
    return dict(peer=peer.name, family=peer.family, problem=problem.name, rows=rows)
