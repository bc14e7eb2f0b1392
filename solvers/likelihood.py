r"""Log-likelihood through the probability-flow ODE; encoding; bits per dimension.

**The computation.**  Along the probability-flow ODE :math:`dx/dt = v(x, t) = f(x,t) -
\tfrac12 g(t)^2\nabla\log p_t(x)` the log-density obeys the instantaneous change of variables
(continuity equation) :math:`\frac{d}{dt}\log p_t(x_t) = -\nabla\!\cdot v(x_t, t)`, so, integrating
from the data end ``t_end`` up to ``T``,

.. math:: \log p_{t_{end}}(x) = \log p_T(z) + \int_{t_{end}}^{T} \nabla\!\cdot v(x_t, t)\,dt,
          \qquad z = x_T,\ x_{t_{end}} = x.

:func:`log_likelihood` integrates the augmented state :math:`[x_t,\ \delta_t]` with
:math:`d\delta/dt = \nabla\cdot v` from ``t_end`` to ``T`` through :mod:`solvers.adaptive_driver`
(the per-sample dopri5 engine by default, torchdiffeq's ``odeint`` otherwise)
(entirely in torch, in the input's dtype and device), and returns ``log_prob =
prior_log_prob(z) + delta_log_prob`` with the SDE's prior :math:`\pi` standing in for
:math:`p_T`.  The model's density is therefore :math:`\log\pi(\Phi(x)) + \log|\det
\partial\Phi/\partial x|` with :math:`\Phi` the model's flow from ``t_end`` to ``T``
(Liouville: :math:`\log|\det\partial\Phi/\partial x| = \int\nabla\cdot v\,dt`); it equals the true
:math:`\log p_{t_{end}}` only up to the prior mismatch :math:`\log\pi(z) - \log p_T(z)`, which for
the linear VP schedule (:math:`\alpha(1) = 6.6\cdot10^{-3}`) is of order
:math:`\alpha(T)\,|\mu|\,|z|` -- about :math:`10^{-2}` nats for data with mean of norm one.

**Divergence.**  ``trace="exact"``: the full Jacobian trace
:math:`\sum_i e_i^\top J e_i`, d products per evaluation, batched over the basis vectors (and
over the samples: one basis vector serves the whole batch, the Jacobian of a network that
treats samples independently being block diagonal), chunked (``chunk_size`` basis vectors at
a time) to bound memory.  Above :data:`EXACT_TRACE_WARN_DIMS` dimensions it warns with the
cost unless ``allow_expensive=True``.  ``trace="hutchinson"``: :math:`\epsilon^\top J\epsilon`
with Rademacher (:math:`\pm1`) or Gaussian probes (Hutchinson 1990; Grathwohl et al. 2019,
FFJORD), ``probes=k`` of them evaluated in one batched pass and drawn *once per solve* from
``generator`` (per sample and per probe independent), so that the integrand is a fixed smooth
function and the adaptive solver converges (yang-song/score_sde_pytorch#10).  Each probe's
integral :math:`\int\epsilon_j^\top J\epsilon_j\,dt = \epsilon_j^\top(\int J\,dt)\,\epsilon_j`
is an unbiased estimate of the integrated trace; ``delta_log_prob`` is their *average*
(divided by k, never summed: bayesflow-org/bayesflow#772), and ``trace_std_err`` is the
per-sample standard error of that average, the sample standard deviation over the k probe
integrals divided by :math:`\sqrt k` (NaN for ``probes=1``, where it cannot be estimated).
Rademacher probes are exact on a diagonal Jacobian (:math:`\epsilon_i^2 = 1`).

**Forward or reverse mode** (``products``): ``"vjp"`` (default) runs the network once with a
local graph on a detached copy of the state and takes the d (or k) vector-Jacobian products
from that one forward pass in batched backward passes (``torch.autograd.grad(...,
is_grads_batched=True)``, ``chunk_size`` cotangents at a time; Hutchinson: all k at once); ``"jvp"`` maps forward-mode products over the basis (or the
probes) with ``torch.func.vmap(torch.func.jvp)``.  Measured on the CPU (one thread, a shared
2-core machine, ms per evaluation of the drift and its exact divergence through this module's
own code with its default chunking, median of 15 runs interleaved vjp/jvp; ``python
benchmarks/likelihood.py --only-products``):

=====================================  =======  =======  =======
net, dtype, d, batch                   vjp      jvp      jvp/vjp
=====================================  =======  =======  =======
MLP (256 x 3, SiLU), float32, 16, 512    54.7     87.6     1.60
MLP, float32, 64, 256                    92.1    155.6     1.69
MLP, float32, 256, 64                   133.4    191.7     1.44
MLP, float64, 16, 512                   101.2    148.1     1.46
MLP, float64, 64, 256                   245.4    361.0     1.47
MLP, float64, 256, 64                   366.9    506.3     1.38
exact GMM net (K=4), float64, 16, 512    10.7     39.8     3.73
=====================================  =======  =======  =======

With one chunk of all d basis vectors for both modes, jvp/vjp was 1.08-2.0 on the same cases.
Reverse mode is the faster and the default.  (On tiny problems forward mode also pays
torch.func's per-call overhead, measured ~4 ms per vmapped call on a 5-d MLP, and a one-time
~2 s load of its forward-AD decompositions.)

**NFE** is counted at the model (each call of ``net``).  With ``products="vjp"`` each
evaluation of the augmented right-hand side is exactly one network call: the products come
from the backward pass of that same forward, so they are not NFE (``stats["products_count"]``
counts them; ``stats["evaluations"]`` counts right-hand-side evaluations).  With
``products="jvp"`` the vmapped function -- and so the network, once, on a batch expanded by
the chunk of tangents -- runs once per chunk of basis vectors (once in all for Hutchinson):
one NFE per chunk, although each such call costs about ``chunk`` forward passes; plus, once
per call, one reverse-mode network call on one sample (the differentiability check below).

**Differentiability.**  The divergence needs :math:`\partial\,\text{net}/\partial x`.  A
network that breaks its autograd graph -- ``.detach()``, ``torch.no_grad()``,
``torch.inference_mode()``, a numpy round trip, an integer cast, features computed on a
detached copy of x -- would lose that term silently: the drift keeps its :math:`f(t)\,x` part and
its parametrisation's dependence on x, so the products exist and the result is finite but
wrong (measured: -12.14 nats for an exact -1.29 on a 2-d Gaussian under VP).  So the first
evaluation of a call checks that autograd reaches x from the network's raw output (the
``vjp`` mode on that evaluation's own forward pass, one extra backward; the ``jvp`` mode by a
reverse-mode call on one sample, whatever forward mode would have made of it), every later
``vjp`` evaluation checks that the output still requires grad, and a missing product is never
counted as zero: each raises ``ValueError`` naming the cause.  The check is structural: an
output that is constant in x (built without x, e.g. ``torch.zeros_like(x)``) has no path either
and is refused the same way, although its Jacobian is genuinely zero -- autograd cannot tell it
from a detached one; written ``0 * x + c`` it is accepted and exact.  A network that mixes a
detached branch with a differentiable one has a path and is not detected.

**Memory.**  Nothing of the graph survives an evaluation: the state is detached before the
local ``enable_grad``, the network's parameters are never differentiated (only the state is),
and every returned tensor is detached.  Peak memory is that of one evaluation, whatever the
number of steps.

**Batches.**  With dopri5 (the default) every sample has its own step size, error estimate
and accept/reject decision, in one batched solve (:func:`solvers.adaptive.solve_per_sample`,
evaluating only the samples still running), so a sample's result does not depend on its
batch-mates beyond the rounding of the batched network (measured 3.6e-15 nats on a 3-d MLP).
``per_sample=False`` lets the whole batch share torchdiffeq's adaptive step (the error norm
taken over the batch): a sample's result then depends on its batch-mates through the step
sizes, i.e. within the solver tolerance, and is 9-30x less accurate at the same tolerance
(``benchmarks/adaptive_engines.py``).  Every solve, in either mode, goes through
:mod:`solvers.adaptive_driver`.  A
solve that fails (``max_steps``, step-size underflow, a non-finite drift or divergence) is
reported per sample in ``res.status`` with NaN results for those samples -- never a truncated
integral -- and raises :class:`SolverError` unless ``on_failure="record"``.

**Encoding.**  :func:`encode` runs the ``pf_ode`` solver forward (data to latent) on the
same drift; decoding is ``solvers.sample(model, z, "pf_ode", t_end=...)``.

**Limits.**  On CUDA every evaluation synchronises once (the finiteness check), as the adaptive
step control already does.  A :class:`~scoresde.sde.DiscreteVPSDE` has piecewise-constant
:math:`f, g^2` (N knots in t); by default it is integrated in half-log-SNR time, where its flow
is smooth (``time_variable``; measured N = 1000, Gaussian d = 2, rtol = atol = 1e-8: within 1e-7
nats of the closed form at under 2x the continuous VP's NFE, against about 7000 NFE stepping
onto every knot in ``t``).
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from scoresde._checks import check_batch_tensor, check_float, check_floating, check_int, sample_list
from scoresde.model import ScoreModel
from scoresde.sde import SDE

from . import adaptive_driver
from .adaptive import PerSampleSolution, rms_norm
from .base import CheckedModel, NonFiniteError, Solution, SolverError, _check_model, _check_net_device
from .ode import PFODE, check_tolerances, knots_inside, pf_ode_drift
from .timesteps import TimeGrid

__all__ = ["LikelihoodResult", "log_likelihood", "encode", "bits_per_dim", "EXACT_TRACE_WARN_DIMS"]

#: Above this many dimensions ``trace="exact"`` warns (d products per evaluation).
EXACT_TRACE_WARN_DIMS = 256
#: Default chunking of the exact trace: at most this many elements in one batch of basis
#: cotangents (chunk x batch x dims); 2**23 float64 elements = 64 MiB.
_CHUNK_ELEMENTS = 2 ** 23
#: On the CPU also at most this many rows (chunk x batch) per batched backward: measured on
#: MLPs (d = 16..256, B = 64..512) and the exact mixture net, one batched backward over all d
#: basis vectors was up to 1.5x slower than chunks of 1024-4096 rows (cache-sized).
_CPU_CHUNK_ROWS = 2048

_TRACES = ("exact", "hutchinson")
_NOISES = ("rademacher", "gaussian")
_PRODUCTS = ("vjp", "jvp")
_FIXED = PFODE._FIXED
_ADAPTIVE = PFODE._ADAPTIVE_RK


@dataclass(frozen=True)
class LikelihoodResult:
    """Result of :func:`log_likelihood` (all tensors detached, in the input's dtype and device).

    - ``log_prob`` ``[B]``: :math:`\\log p_{t_{end}}(x)` under the model, in nats
      (= ``prior_log_prob + delta_log_prob``); NaN for a sample whose solve failed.
    - ``prior_log_prob`` ``[B]``: ``sde.prior_log_prob(z)``.
    - ``delta_log_prob`` ``[B]``: :math:`\\int_{t_{end}}^T\\nabla\\cdot v\\,dt` (Hutchinson: the
      average over the probes).
    - ``z`` ``[B, ...]``: the latent at ``T``.
    - ``nfe``: network calls made, counted at the model.
    - ``status``: one string per sample, ``"success"``, ``"max_steps"``,
      ``"step_size_underflow"`` or ``"nonfinite"`` (``"aborted"`` in the ``partial`` result of a
      raised :class:`SolverError` for samples the call did not finish).
    - ``trace_std_err`` ``[B]`` or None: Hutchinson only, the standard error of
      ``delta_log_prob`` over the probes (NaN for ``probes=1``).
    - ``stats``: method, tolerances, steps accepted/rejected, evaluations, products, ...
    """

    log_prob: Tensor
    prior_log_prob: Tensor
    delta_log_prob: Tensor
    z: Tensor
    nfe: int
    status: tuple = ()
    trace_std_err: Tensor | None = None
    stats: dict = field(default_factory=dict)

    @property
    def ok(self) -> Tensor:
        """Boolean mask ``[B]`` of the samples whose solve succeeded."""
        return torch.tensor([s == "success" for s in self.status], dtype=torch.bool, device=self.log_prob.device)


# ------------------------------------------------------------------ validation
def _check_x(x: Any) -> Tensor:
    check_floating(x, "x")
    if x.dtype in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"x is {x.dtype}: log_likelihood needs float32 or float64 (the log-density integral and the "
            "divergence lose too many digits in half precision); pass x.float()"
        )
    return check_batch_tensor(x, "x")


def _check_t_end(t_end: Any, sde: SDE) -> float:
    if t_end is None:
        t_end = sde.default_t_end
    t = check_float(t_end, "t_end")
    if not 0.0 < t < sde.T:
        raise ValueError(
            f"t_end must lie inside (0, T) of [0, T]=[0, {sde.T:.6g}] for {type(sde).__name__}, got {t} "
            "(the likelihood integrates from t_end up to T; at t = 0 the model is undefined)"
        )
    return t


def _check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def _check_method(method: Any, steps: Any) -> tuple[str, int | None]:
    if not isinstance(method, str) or method not in _FIXED + _ADAPTIVE:
        valid = ", ".join(repr(m) for m in _ADAPTIVE + _FIXED)
        raise ValueError(f"method must be one of the torchdiffeq methods {valid}; got {method!r}")
    if method in _FIXED:
        if steps is None:
            raise ValueError(f"method={method!r} is a fixed-step method: pass steps (number of uniform steps in t)")
        return method, check_int(steps, "steps", minimum=1)
    if steps is not None:
        raise ValueError(f"steps applies to fixed-step methods ({', '.join(_FIXED)}); method={method!r} is adaptive")
    return method, None


def _check_generator(generator: Any, batch: int, device: torch.device) -> Any:
    if generator is None:
        return None
    gens = [generator] if isinstance(generator, torch.Generator) else generator
    if not isinstance(gens, (list, tuple)):
        raise TypeError(f"generator must be a torch.Generator, a list of them (one per sample) or None; "
                        f"got {type(generator).__name__}")
    if not isinstance(generator, torch.Generator) and len(gens) != batch:
        raise ValueError(f"generator: got {len(gens)} generators for batch {batch} (one per sample)")
    for j, g in enumerate(gens):
        if not isinstance(g, torch.Generator):
            raise TypeError(f"generator[{j}] must be a torch.Generator, got {type(g).__name__}")
        if g.device.type != "cpu" and g.device != device:
            raise ValueError(f"generator is on {g.device} but x is on {device}; use a CPU generator "
                             "(reproducible across devices) or one on x's device")
    return generator


def _draw_probes(shape: torch.Size, k: int, noise: str, generator: Any, dtype: torch.dtype,
                 device: torch.device) -> Tensor:
    """Probes ``[k, B, *shape[1:]]`` drawn once: a single generator draws ``[B, k, ...]`` (sample
    major); a list draws ``[k, ...]`` per sample from its own generator (independent of the batch)."""
    def draw(size, g):
        dev = g.device if g is not None else device
        if noise == "rademacher":
            return (torch.randint(0, 2, size, generator=g, device=dev) * 2 - 1).to(dtype)
        return torch.randn(size, generator=g, dtype=torch.float64, device=dev).to(dtype)

    b, rest = shape[0], tuple(shape[1:])
    if isinstance(generator, (list, tuple)):
        v = torch.stack([draw((k, *rest), g) for g in generator], dim=1) if b else \
            torch.zeros((k, 0, *rest), dtype=dtype)
    else:
        v = draw((b, k, *rest), generator).transpose(0, 1)
    return v.to(device).contiguous()


# ------------------------------------------------------------------ the solve
class _RecordingModel(CheckedModel):
    """The solver's view of the model, keeping the raw network output of a call while
    ``record`` is set (for the differentiability check)."""

    record = False
    raw: Tensor | None = None

    def evaluate(self, x: Tensor, t64: Tensor):
        d = super().evaluate(x, t64)
        if self.record:
            self.raw = d.raw
        return d


def _not_differentiable(t64: Tensor, why: str) -> ValueError:
    return ValueError(
        f"log_likelihood: the network's output is not differentiable with respect to x ({why}, "
        f"t={float(t64.reshape(-1)[0]):.6g}), so the divergence of the probability-flow drift cannot be computed. "
        "The network must be built from torch operations with autograd enabled for its input: no "
        ".detach(), torch.no_grad() or torch.inference_mode() inside it, no round trip through numpy, "
        "no integer cast, no features computed on a detached copy of x. (An output that is constant "
        "in x is refused too, autograd cannot tell it from a detached one: write it as 0 * x + c.)"
    )


class _Problem:
    """Everything fixed for one call; :meth:`solve` integrates one batch."""

    def __init__(self, model: ScoreModel, *, t_end: float, trace: str, products: str, chunk: int,
                 method: str, steps: int | None, rtol: float, atol: float, max_steps: int, dtype: torch.dtype,
                 device: torch.device, time_variable: str = "auto"):
        self.model, self.sde = model, model.sde
        self.t_end, self.T = t_end, float(self.sde.T)
        self.trace, self.products, self.chunk = trace, products, chunk
        self.method, self.steps, self.rtol, self.atol, self.max_steps = method, steps, rtol, atol, max_steps
        self.tdtype = torch.float32 if device.type == "mps" else torch.float64
        self.device = device
        self.fixed = method in _FIXED
        self.change = None if self.fixed else adaptive_driver.time_change(self.sde, t_end, self.T, time_variable)
        self.grid = torch.linspace(t_end, self.T, steps + 1, dtype=self.tdtype, device=device) if self.fixed else None
        self.evaluations = 0       # over every solve of the call, failed ones included
        self.graph_checked = False  # the network's output was seen to depend on x

    # -- divergence ------------------------------------------------------------
    def _check_graph(self, ev: _RecordingModel, yg: Tensor, t64: Tensor) -> None:
        """Raise unless the network output just recorded by ``ev`` depends on ``yg`` through
        autograd (one backward pass of that output, once per call)."""
        raw, ev.raw, ev.record = ev.raw, None, False
        if not raw.requires_grad:
            raise _not_differentiable(t64, "the network output does not require grad")
        (g,) = torch.autograd.grad(raw, yg, torch.ones_like(raw), retain_graph=True, allow_unused=True)
        if g is None:
            raise _not_differentiable(t64, "autograd finds no path from x to the network output")
        self.graph_checked = True

    def _basis(self, i: int, j: int, like: Tensor) -> Tensor:
        """Basis vectors e_i .. e_{j-1}, shaped ``[j - i, B, *like.shape[1:]]`` (stride 0 over B)."""
        d = like[0].numel()
        e = torch.zeros(j - i, d, dtype=like.dtype, device=like.device)
        r = torch.arange(j - i, device=like.device)
        e[r, r + i] = 1.0
        return e.reshape(j - i, 1, *like.shape[1:]).expand(j - i, *like.shape)

    def _vjp(self, drift, ev: _RecordingModel, y: Tensor, t64: Tensor, V: Tensor | None) -> tuple[Tensor, Tensor]:
        b = y.shape[0]
        with torch.enable_grad():
            yg = y.detach().requires_grad_(True)
            ev.record = True
            v = drift(yg, t64)
            if not self.graph_checked:       # on the first evaluation's own forward pass
                self._check_graph(ev, yg, t64)
            else:                            # later: the O(1) part of the check
                raw, ev.raw, ev.record = ev.raw, None, False
                if not raw.requires_grad:
                    raise _not_differentiable(t64, "the network output does not require grad")

            def products(cot: Tensor, retain: bool) -> Tensor:   # cot [c, B, ...] -> [c, B, ...]
                if cot.shape[0] == 1:
                    (g,) = torch.autograd.grad(v, yg, cot[0], retain_graph=retain, allow_unused=True)
                    g = None if g is None else g.unsqueeze(0)
                else:
                    (g,) = torch.autograd.grad(v, yg, cot, retain_graph=retain, is_grads_batched=True,
                                               allow_unused=True)
                if g is None:                # no path from x to the drift: never counted as zero
                    raise _not_differentiable(t64, "autograd finds no path from x to the drift")
                return g

            if V is not None:                # Hutchinson: eps^T J eps per probe -> [B, k]
                g = products(V, False)
                div = (g * V).reshape(V.shape[0], b, -1).sum(-1).transpose(0, 1)
            else:
                d = y[0].numel()
                div = y.new_zeros(b)
                for i in range(0, d, self.chunk):
                    j = min(d, i + self.chunk)
                    g = products(self._basis(i, j, y), j < d)
                    div = div + torch.diagonal(g.reshape(j - i, b, d)[:, :, i:j], dim1=0, dim2=2).sum(-1)
        return v.detach(), div.detach()

    def _jvp(self, drift, ev: _RecordingModel, y: Tensor, t64: Tensor, V: Tensor | None) -> tuple[Tensor, Tensor]:
        b = y.shape[0]
        if not self.graph_checked:           # one reverse-mode call on one sample, before any vmap
            with torch.enable_grad():
                y1 = y[:1].detach().requires_grad_(True)
                ev.record = True
                t1 = t64[:1] if t64.ndim else t64      # per-sample times: the first sample's
                ev.evaluate(y1, t1)
                self._check_graph(ev, y1, t1)
        f = lambda u: drift(u, t64)  # noqa: E731
        mapped = torch.func.vmap(lambda w: torch.func.jvp(f, (y,), (w,)), out_dims=(None, 0))
        if V is not None:
            v, g = mapped(V)
            div = (g * V).reshape(V.shape[0], b, -1).sum(-1).transpose(0, 1)
            return v, div
        d = y[0].numel()
        div = y.new_zeros(b)
        v = None
        for i in range(0, d, self.chunk):
            j = min(d, i + self.chunk)
            v, g = mapped(self._basis(i, j, y))
            div = div + torch.diagonal(g.reshape(j - i, b, d)[:, :, i:j], dim1=0, dim2=2).sum(-1)
        return v, div

    # -- one solve ------------------------------------------------------------
    def solve(self, x: Tensor, V: Tensor | None, per_sample: bool) -> PerSampleSolution:
        """Integrate the flat augmented state ``[x, delta]`` of the samples ``x`` (probes ``V``)
        through :func:`solvers.adaptive_driver.integrate`: every sample its own dopri5 step
        control (``per_sample``) or one step for the batch (torchdiffeq; fixed methods on the
        uniform grid).  The error norm is torchdiffeq's mixed norm ``max(rms(err_x),
        rms(err_delta))``, per sample or over the batch.  Finiteness is checked on the drift
        and its divergence by the engine, per sample (a check inside the network call would be
        data-dependent control flow under vmap)."""
        ev = _RecordingModel(self.model, None, check_finite=False)
        drift = pf_ode_drift(self.model, ev, x)
        div_fn = self._vjp if self.products == "vjp" else self._jvp
        b, shape = x.shape[0], x.shape[1:]
        d = math.prod(shape)
        t_lo, t_hi = self.t_end, self.T

        def rhs(t: Tensor, state: Tensor, idx: Tensor) -> Tensor:
            ev.step_index = self.evaluations
            self.evaluations += 1
            t64 = t.detach().to(torch.float64).clamp(t_lo, t_hi)    # never outside [t_end, T]
            y = state[:, :d].reshape(-1, *shape)
            v, div = div_fn(drift, ev, y, t64, None if V is None else V[:, idx])
            return torch.cat([v.reshape(-1, d), div.reshape(-1, state.shape[1] - d)], dim=1)

        def norm_each(err: Tensor) -> Tensor:
            return torch.maximum(rms_norm(err[:, :d]), rms_norm(err[:, d:]))

        def norm_batch(err: Tensor) -> Tensor:
            return torch.maximum(err[:, :d].pow(2).mean().sqrt(), err[:, d:].pow(2).mean().sqrt())

        k = 1 if V is None else V.shape[0]
        state0 = torch.cat([x.reshape(b, d), x.new_zeros(b, k)], dim=1)
        jumps = None if self.fixed or self.change is not None else \
            knots_inside(self.sde, self.t_end, self.T, self.tdtype)
        with torch.no_grad():
            return adaptive_driver.integrate(
                rhs, state0, self.t_end, self.T, per_sample=per_sample, method=self.method, rtol=self.rtol,
                atol=self.atol, max_steps=self.max_steps, norm_each=norm_each, norm_batch=norm_batch,
                jump_t=jumps if jumps is not None and jumps.numel() else None, grid=self.grid,
                change=self.change)


def _default_chunk(d: int, b: int, device: torch.device) -> int:
    chunk = _CHUNK_ELEMENTS // max(1, b * d)
    if device.type == "cpu":
        chunk = min(chunk, _CPU_CHUNK_ROWS // max(1, b))
    return max(1, min(d, chunk))


# ------------------------------------------------------------------ public API
def log_likelihood(model: ScoreModel, x: Tensor, trace: str = "exact", *, method: str = "dopri5",
                   rtol: float | None = None, atol: float = 1e-5, t_end: float | None = None, probes: int = 1,
                   noise: str = "rademacher", generator: Any = None, per_sample: bool | None = None,
                   max_steps: int = 10_000, steps: int | None = None, chunk_size: int | None = None,
                   products: str = "vjp", allow_expensive: bool = False,
                   on_failure: str = "raise", time_variable: str = "auto") -> LikelihoodResult:
    r"""Log-density of ``x`` under ``model`` through the probability-flow ODE (module docstring:
    :math:`\log p_{t_{end}}(x) = \log\pi(z) + \int_{t_{end}}^T\nabla\cdot v\,dt`).

    **Arguments:**

    - ``model``: a :class:`scoresde.ScoreModel` (any SDE -- a LinearSDE or a user's general
      SDE through its PF-ODE drift -- and any prediction type).
    - ``x``: data ``[B, ...]`` in the model's data space, float32 or float64 (integer data:
      TypeError, scale it first; half precision: ValueError; never modified).
    - ``trace``: ``"exact"`` or ``"hutchinson"``.
    - ``method``: a torchdiffeq method; adaptive (``dopri5`` (default), ``dopri8``, ``bosh3``,
      ``fehlberg2``, ``adaptive_heun``) with ``rtol``/``atol``/``max_steps``, or fixed-step
      (``rk4``, ``euler``, ...) with ``steps`` uniform steps in t.
    - ``rtol``, ``atol``: tolerances on the augmented state (``rtol=None``: 1e-5, raised silently
      to 100 eps = 1.19e-5 in float32; an explicit value below 100 eps is clamped with a
      warning recorded in ``stats``).  Negative: ValueError.
    - ``t_end``: the data end of the integral, in (0, T); default ``model.sde.default_t_end``.
    - ``probes`` (Hutchinson): how many probes per sample, evaluated together; the estimate is
      their average.  ``noise``: ``"rademacher"`` or ``"gaussian"``.  ``generator``: a
      ``torch.Generator`` (probes drawn ``[B, probes, ...]`` sample-major), a list of them (one
      per sample: a sample's probes then do not depend on the batch), or None.
    - ``per_sample``: one adaptive step control per sample (dopri5: one batched solve with
      per-sample step sizes, :func:`solvers.adaptive.solve_per_sample`; other adaptive methods:
      B solves on batches of one).  The result is independent of the batch up to the batched
      network's rounding (~1e-15 relative), given the exact trace or one generator per sample;
      a failing sample stops alone.  Default (None): True for dopri5, False otherwise.
      ``False``: the batch shares the adaptive steps, the error norm being taken over all
      samples, so a sample's result depends on its batch-mates through the step sizes, i.e.
      within the tolerance (measured on a 3-d MLP model, rtol 1e-5: 2.4e-7 nats).
    - ``max_steps``: step attempts (accepted + rejected) per solve (``per_sample``: per sample).
    - ``time_variable``: ``"t"``, ``"log_snr"`` (integrate in half-log-SNR time,
      :math:`d\delta/d\lambda = \nabla\cdot(dx/d\lambda)`, :mod:`solvers.time_change`) or
      ``"auto"`` (default: log-SNR for a schedule with knots such as
      :class:`~scoresde.DiscreteVPSDE`, ``t`` otherwise; the ``pf_ode`` docstring gives the
      measured NFE and the caveat for networks that read ``t``).  Adaptive methods only.
    - ``chunk_size`` (exact trace): basis vectors per batched product (default: as many as keep a
      chunk's cotangents under 2**23 elements, and on the CPU a chunk under 2048 rows, chunk x B,
      which measured fastest).  ``allow_expensive``: silence the warning for
      ``trace="exact"`` above :data:`EXACT_TRACE_WARN_DIMS` dimensions.
    - ``products``: ``"vjp"`` (reverse mode, default, the faster measured) or ``"jvp"``.
    - ``on_failure``: ``"raise"`` (:class:`SolverError`, :class:`NonFiniteError` for a non-finite
      drift or divergence, whose ``status`` holds the per-sample
      statuses and ``partial`` the :class:`LikelihoodResult`) or ``"record"`` (return; failed
      samples have status != "success" and NaN values).  With a shared step a failing batch is
      retried without its non-finite samples, or split in halves after ``max_steps``/underflow,
      until the failing samples are isolated.

    **Returns:** a :class:`LikelihoodResult`.  An empty batch gives empty ``[0]`` results and
    ``nfe == 0``.

    **Raises:** ``TypeError``/``ValueError`` for bad input, before any network call;
    ``ValueError`` at the first network call if the network's output is not differentiable in x
    through autograd (module docstring, *Differentiability*);
    :class:`SolverError` for a failed solve (``on_failure="raise"``).
    """
    model = _check_model(model)
    x = _check_x(x)
    sde = model.sde
    trace = _check_choice(trace, "trace", _TRACES)
    noise = _check_choice(noise, "noise", _NOISES)
    products = _check_choice(products, "products", _PRODUCTS)
    on_failure = _check_choice(on_failure, "on_failure", ("raise", "record"))
    probes = check_int(probes, "probes", minimum=1)
    if trace == "exact" and probes != 1:
        raise ValueError(f"probes={probes} applies to trace='hutchinson'; trace='exact' uses no probes")
    for name, flag in (("per_sample", per_sample), ("allow_expensive", allow_expensive)):
        if not isinstance(flag, bool) and not (name == "per_sample" and flag is None):
            raise TypeError(f"{name} must be a bool" + (" or None" if name == "per_sample" else "") + f", got {flag!r}")
    max_steps = check_int(max_steps, "max_steps", minimum=1)
    if chunk_size is not None:
        chunk_size = check_int(chunk_size, "chunk_size", minimum=1)
    method, steps = _check_method(method, steps)
    if per_sample is None:
        per_sample = method in adaptive_driver.PER_SAMPLE_METHODS
    t_end = _check_t_end(t_end, sde)
    rtol_in = max(1e-5, 100.0 * torch.finfo(x.dtype).eps) if rtol is None else rtol
    rtol, atol, notes = check_tolerances(rtol_in, atol, x.dtype)
    b = x.shape[0]
    generator = _check_generator(generator, b, x.device)
    _check_net_device(model, x)
    d = x[0].numel() if b else math.prod(x.shape[1:])
    chunk = chunk_size if chunk_size is not None else _default_chunk(d, max(b, 1), x.device)
    chunk = min(chunk, max(d, 1))
    if trace == "exact" and d > EXACT_TRACE_WARN_DIMS and not allow_expensive:
        kind = "vector-Jacobian" if products == "vjp" else "Jacobian-vector"
        msg = (f"trace='exact' on d={d} dimensions computes {d} {kind} products per evaluation "
               f"(about {d} backward passes of the network, {math.ceil(d / chunk)} batched chunks of "
               f"{chunk}); use trace='hutchinson' or pass allow_expensive=True")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        notes.append(msg)
    stats: dict = {"method": method, "rtol": rtol, "atol": atol, "t_end": t_end, "T": float(sde.T),
                   "trace": trace, "products": products, "per_sample": per_sample, "max_steps": max_steps}
    if trace == "exact":
        stats["chunk_size"] = chunk
    else:
        stats.update(probes=probes, noise=noise)
    if steps is not None:
        stats["steps"] = steps
    if notes:
        stats["warnings"] = notes

    x = x.detach()
    V = _draw_probes(x.shape, probes, noise, generator, x.dtype, x.device) if trace == "hutchinson" else None
    problem = _Problem(model, t_end=t_end, trace=trace, products=products, chunk=chunk, method=method,
                       steps=steps, rtol=rtol, atol=atol, max_steps=max_steps, dtype=x.dtype, device=x.device,
                       time_variable=time_variable)
    stats["time_variable"] = "t" if problem.change is None else "log_snr"
    run = _Run(model, problem, x, V, stats, on_failure, max_steps)
    if per_sample and method in adaptive_driver.PER_SAMPLE_METHODS and b:
        run.each()
        return run.finish()
    pending = [[i] for i in range(b)] if per_sample else ([list(range(b))] if b else [])
    pending.reverse()                            # a stack: solve in sample order
    while pending:
        more = run.together(pending.pop())
        pending.extend(reversed(more))
    return run.finish()


class _Run:
    """The results of one :func:`log_likelihood` call as its solves come in: latents, log-density
    changes, per-sample status and counters; failures recorded (or raised) per sample."""

    def __init__(self, model: ScoreModel, problem: _Problem, x: Tensor, V: Tensor | None, stats: dict,
                 on_failure: str, max_steps: int):
        self.model, self.problem, self.x, self.V = model, problem, x, V
        self.stats, self.on_failure, self.max_steps = stats, on_failure, max_steps
        b = x.shape[0]
        self.k = None if V is None else V.shape[0]
        self.z = torch.full_like(x, float("nan"))
        self.delta = x.new_full((b,) if self.k is None else (b, self.k), float("nan"))
        self.status = ["aborted"] * b
        self.totals = {"solves": 0, "evaluations": 0, "accepted_steps": 0, "rejected_steps": 0}
        self.per_sample = {"accepted": [0] * b, "rejected": [0] * b, "evaluations_per_sample": [0] * b}
        self.nfe0 = model.nfe

    def finish(self) -> LikelihoodResult:
        k, delta, x = self.k, self.delta, self.x
        if k is None:
            dl, se = delta, None
        else:
            dl = delta.mean(dim=1)
            se = delta.std(dim=1, correction=1) / math.sqrt(k) if k > 1 else torch.full_like(dl, float("nan"))
        prior = self.model.sde.prior_log_prob(self.z).to(x.dtype) if x.shape[0] else x.new_zeros(0)
        self.totals["evaluations"] = self.problem.evaluations
        d = x[0].numel() if x.shape[0] else math.prod(x.shape[1:])
        n_products = self.problem.evaluations * (d if k is None else k)
        st = {**self.stats, **self.totals, **self.per_sample, "products_count": n_products,
              "status_counts": _counts(self.status)}
        return LikelihoodResult(prior + dl, prior, dl, self.z, self.model.nfe - self.nfe0, tuple(self.status),
                                se, st)

    def fail(self, kind: str, msg: str, idx: list[int], err: Exception | None) -> None:
        for i in idx:
            self.status[i] = kind
        if self.on_failure == "raise":
            res = self.finish()
            cls = NonFiniteError if kind == "nonfinite" else SolverError
            raise cls(f"log_likelihood failed for {sample_list(idx)} "
                      f"({kind}): {msg}; nfe={res.nfe}. Pass on_failure='record' to keep the other samples",
                      nfe=res.nfe, status=res.status, partial=res) from err

    def _count(self, idx: list[int], sol: PerSampleSolution) -> None:
        """Count a solve of the samples ``idx``: every sample's steps and network evaluations
        (``stats["accepted"]``, ``["rejected"]``, ``["evaluations_per_sample"]``: rows of network
        calls that held the sample, over all its solves) and each solve's most steps
        (``accepted_steps``, ``rejected_steps``: summed over the call's solves)."""
        self.totals["accepted_steps"] += int(sol.accepted.max()) if idx else 0
        self.totals["rejected_steps"] += int(sol.rejected.max()) if idx else 0
        for r, i in enumerate(idx):
            self.per_sample["accepted"][i] += int(sol.accepted[r])
            self.per_sample["rejected"][i] += int(sol.rejected[r])
            self.per_sample["evaluations_per_sample"][i] += int(sol.evaluations[r])

    def _store(self, idx: list[int], sol: PerSampleSolution) -> None:
        """Keep the successful samples of a solve of the samples ``idx``."""
        ok = sol.ok
        sel = torch.tensor(idx, dtype=torch.long, device=self.x.device)[ok]
        d = self.x[0].numel()
        self.z[sel] = sol.y[ok, :d].reshape(-1, *self.x.shape[1:])
        self.delta[sel] = sol.y[ok, d:].reshape(self.delta[sel].shape)
        for i in sel.tolist():
            self.status[i] = "success"

    def _report(self, idx: list[int], sol: PerSampleSolution) -> None:
        """Record (or raise) every failure of a solve of the samples ``idx``, most severe first."""
        while (found := adaptive_driver.failure(sol, what="log_likelihood", max_steps=self.max_steps,
                                                nfe=self.model.nfe - self.nfe0)) is not None:
            kind, rows, msg = found
            self.fail(kind, msg, [idx[r] for r in rows], None)
            sol = _without(sol, rows)
            idx = [i for r, i in enumerate(idx) if r not in set(rows)]

    def together(self, idx: list[int]) -> list[list[int]]:
        """Solve the samples ``idx`` with one step for all; returns the sub-batches still to
        solve: the others after a non-finite sample, halves after a shared failure (until the
        failing samples are isolated)."""
        sel = torch.tensor(idx, dtype=torch.long, device=self.x.device)
        self.totals["solves"] += 1
        sol = self.problem.solve(self.x[sel], None if self.V is None else self.V[:, sel], per_sample=False)
        self._count(idx, sol)
        names = sol.status_names
        if "nonfinite" in names:             # the failing samples are known: drop them, retry the rest
            bad = [r for r, n in enumerate(names) if n == "nonfinite"]
            self._report([idx[r] for r in bad], _only(sol, bad))
            rest = [i for r, i in enumerate(idx) if r not in set(bad)]
            return [rest] if rest else []
        if names[0] != "success":           # max_steps / underflow, shared by the batch
            if len(idx) == 1 or self.on_failure == "raise":
                self._report(idx, sol)
                return []
            half = len(idx) // 2
            return [idx[:half], idx[half:]]
        self._store(idx, sol)
        return []

    def each(self) -> None:
        """Every sample with its own step control, in one batched solve (dopri5)."""
        idx = list(range(self.x.shape[0]))
        self.totals["solves"] += len(idx)
        sol = self.problem.solve(self.x, self.V, per_sample=True)
        self._count(idx, sol)
        self._store(idx, sol)
        self._report(idx, sol)


def _only(sol: PerSampleSolution, rows: list[int]) -> PerSampleSolution:
    """The rows ``rows`` of a solution (for reporting them)."""
    r = torch.tensor(rows, dtype=torch.long, device=sol.status.device)
    return PerSampleSolution(sol.y[r], sol.t[r], sol.status[r], sol.accepted[r], sol.rejected[r],
                             sol.evaluations[r], sol.calls, None, None if sol.dt is None else sol.dt[r])


def _without(sol: PerSampleSolution, rows: list[int]) -> PerSampleSolution:
    gone = set(rows)
    return _only(sol, [r for r in range(sol.status.numel()) if r not in gone])


def _counts(status: Sequence[str]) -> dict:
    out: dict = {}
    for s in status:
        out[s] = out.get(s, 0) + 1
    return out


def encode(model: ScoreModel, x: Tensor, *, t_end: float | None = None, rtol: float | None = None,
           atol: float = 1e-5, method: str = "dopri5", steps: int | None = None,
           max_steps: int = 10_000) -> Solution:
    r"""Encode data ``x`` (at ``t_end``) to the latent ``z`` at ``T`` along the probability-flow
    ODE: the ``pf_ode`` solver run forward in time (same drift, same torchdiffeq ``method``,
    ``rtol``/``atol``, ``max_steps``; fixed-step methods take ``steps`` uniform steps).  The
    inverse is ``solvers.sample(model, z, "pf_ode", t_end=t_end, rtol=..., atol=...)``; a round
    trip returns ``x`` within the error the tolerances allow.

    **Returns:** a :class:`Solution` with ``x`` = the latent ``z``, ``nfe``, ``timesteps`` (the
    float64 grid from ``t_end`` up to ``T``) and ``stats``.
    """
    model = _check_model(model)
    x = _check_x(x)
    sde = model.sde
    method, steps = _check_method(method, steps)
    t_end = _check_t_end(t_end, sde)
    max_steps = check_int(max_steps, "max_steps", minimum=1)
    if rtol is not None:
        check_float(rtol, "rtol", low=0.0)
    _check_net_device(model, x)
    n = steps if steps is not None else 1
    grid = TimeGrid(torch.linspace(t_end, float(sde.T), n + 1, dtype=torch.float64), "encode")
    solver = PFODE(ode_method=method, rtol=rtol, atol=atol, max_steps=max_steps)
    return solver.run(model, x, grid)


# ------------------------------------------------------------------ bits per dim
def bits_per_dim(log_prob: Any, num_dims: int, *, data_range: Sequence[float] | None = None,
                 dequantization: str | None = None, bits: int | None = None) -> Any:
    r"""Negative log-likelihood in bits per dimension.

    **No keywords:** :math:`\text{bpd} = -\log p(x) / (D \ln 2)`, ``D = num_dims`` -- the
    density in whatever units ``x`` has (a continuous density: it can be negative).

    **Discrete data** (``data_range=(a, b)`` and ``dequantization``, both required together;
    ``bits`` defaults to 8): the data are integers :math:`n \in \{0, \dots, 2^{bits}-1\}^D`
    scaled affinely to the model's range :math:`[a, b]`, and ``log_prob`` is the model's
    log-density of the scaled data.  A density on the model's scale converts to one on the
    integer scale (unit bins: the *discrete-data offset*, bin width 1) by the Jacobian of the
    scaling, :math:`\log p_n = \log p_x + D\log(dx/dn)`:

    - ``dequantization="uniform"``: the model saw :math:`x = a + (b-a)(n + u)/2^{bits}`,
      :math:`u \sim U[0,1)^D` (one draw of u per sample; the user dequantizes).
      :math:`dx/dn = (b-a)/2^{bits}`, and :math:`\log P(n) \ge E_u[\log p_x(x)] + D\log((b-a)/2^{bits})`
      (Theis et al. 2016), so

      .. math:: \text{bpd} = \frac{-\log p_x(x)}{D\ln 2} - \log_2(b-a) + \text{bits},

      an upper bound on the discrete NLL in expectation over u.  For 8-bit data in [-1, 1] the
      offset is :math:`8 - \log_2 2 = 7` (score_sde's "+7"); in [0, 1] it is 8.
    - ``dequantization="none"``: the model saw the grid points
      :math:`x = a + (b-a)\,n/(2^{bits}-1)` (no noise; endpoints map to a and b).
      :math:`dx/dn = (b-a)/(2^{bits}-1)`, the Jacobian term is :math:`D\log((b-a)/(2^{bits}-1))`:

      .. math:: \text{bpd} = \frac{-\log p_x(x)}{D\ln 2} - \log_2\frac{b-a}{2^{bits}-1}.

      This reads the density as a probability per integer bin; it is *not* a bound (a
      continuous density on undequantized data can be arbitrarily large).

    ``log_prob``: a tensor (``[B]`` or any shape; returned as a tensor) or a number (returned
    as a float).  Combinations it cannot interpret -- ``data_range`` without
    ``dequantization`` or the reverse, ``bits`` without ``data_range``, ``a >= b``, an
    unknown dequantization, ``bits`` outside 1..32 -- raise ValueError naming the argument.
    """
    d = check_int(num_dims, "num_dims", minimum=1)
    if isinstance(log_prob, Tensor):
        if not log_prob.is_floating_point():
            raise TypeError(f"log_prob must be floating point, got {log_prob.dtype}")
        lp = log_prob
    elif isinstance(log_prob, numbers.Real) and not isinstance(log_prob, bool):
        lp = float(log_prob)
    else:
        raise TypeError(f"log_prob must be a tensor or a number, got {type(log_prob).__name__}")
    offset = 0.0
    if data_range is None:
        if dequantization is not None:
            raise ValueError("dequantization needs data_range=(a, b): the model's range the integer data "
                             "were scaled to")
        if bits is not None:
            raise ValueError("bits needs data_range=(a, b) and dequantization (the discrete-data conventions); "
                             "without them bits_per_dim is -log_prob/(num_dims ln 2)")
    else:
        if dequantization is None:
            raise ValueError("data_range needs dequantization='uniform' (x = a + (b-a)(n+u)/2^bits) or "
                             "'none' (x = a + (b-a) n/(2^bits - 1)); the two conventions differ")
        _check_choice(dequantization, "dequantization", ("uniform", "none"))
        if not isinstance(data_range, (tuple, list)) or len(data_range) != 2:
            raise ValueError(f"data_range must be a pair (a, b), got {data_range!r}")
        a = check_float(data_range[0], "data_range[0]")
        hi = check_float(data_range[1], "data_range[1]")
        if not hi > a:
            raise ValueError(f"data_range must have a < b, got ({a}, {hi})")
        nbits = check_int(8 if bits is None else bits, "bits", minimum=1)
        if nbits > 32:
            raise ValueError(f"bits must be in 1..32, got {nbits}")
        levels = 2.0 ** nbits if dequantization == "uniform" else 2.0 ** nbits - 1.0
        # log p_n = log p_x + D log(dx/dn), dx/dn = (b - a)/levels
        offset = d * math.log((hi - a) / levels)
    return -(lp + offset) / (d * math.log(2.0))
