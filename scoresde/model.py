r"""ScoreModel: one interface to a network, whatever it predicts.

A network ``net(x_in, t_in)`` (or ``net(x_in, t_in, cond)``) trained for an SDE predicts one
of the quantities below at :math:`x_t = \alpha_t x_0 + \sigma_t \epsilon`; :class:`ScoreModel`
converts that output, in one place, to every other:

=============  =================================================================================
prediction     the network output
=============  =================================================================================
``"eps"``      :math:`\epsilon`
``"x0"``       :math:`x_0` (the denoised data)
``"score"``    :math:`\nabla\log p_t(x) = -\epsilon/\sigma_t`
``"v"``        :math:`v = (\alpha_t\epsilon - \sigma_t x_0)/r_t`, :math:`r_t = \sqrt{\alpha_t^2+\sigma_t^2}`
               (Salimans & Ho 2022; :math:`r_t = 1` for the VP family)
``"flow"``     the velocity :math:`\dot\alpha_t x_0 + \dot\sigma_t\epsilon` (flow matching;
               :math:`\epsilon - x_0` for rectified flow)
``"edm"``      EDM's preconditioned :math:`F` (Karras et al. 2022, Table 1) on the scaled state
               :math:`\hat x = x/\alpha_t`, :math:`\hat\sigma = \sigma_t/\alpha_t`:
               :math:`x_0 = c_{skip}\hat x + c_{out} F(c_{in}\hat x;\ c_{noise})`, with
               :math:`c_{skip} = \sigma_d^2/(\hat\sigma^2+\sigma_d^2)`,
               :math:`c_{out} = \hat\sigma\sigma_d/\sqrt{\hat\sigma^2+\sigma_d^2}`,
               :math:`c_{in} = 1/\sqrt{\hat\sigma^2+\sigma_d^2}`, :math:`c_{noise} = \tfrac14\log\hat\sigma`
=============  =================================================================================

Each call of ``net`` increments :attr:`ScoreModel.nfe` by one, also when classifier-free
guidance evaluates the conditional and unconditional branches in one doubled batch.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ._checks import append_dims, check_finite_tensor, check_float, check_floating, check_positive_float, time_vector
from .sde import SDE, DiscreteVPSDE, LinearSDE

__all__ = ["Prediction", "ScoreModel", "Denoised", "from_prediction", "to_prediction"]


class Prediction(str, Enum):
    """What a network predicts."""

    EPS = "eps"
    X0 = "x0"
    V = "v"
    SCORE = "score"
    EDM = "edm"
    FLOW = "flow"

    @classmethod
    def parse(cls, value: Any) -> "Prediction":
        if isinstance(value, cls):
            return value
        if not isinstance(value, str):
            raise TypeError(f"prediction must be a string, got {type(value).__name__}")
        try:
            return cls(value)
        except ValueError:
            valid = ", ".join(repr(p.value) for p in cls)
            raise ValueError(f"prediction must be one of {valid}; got {value!r}") from None


@dataclass(frozen=True)
class Coefficients:
    """Schedule values at the evaluation time(s), broadcastable against ``x``."""

    alpha: Tensor | float
    sigma: Tensor | float
    dalpha: Tensor | float | None = None   # d alpha / dt   (flow)
    dsigma: Tensor | float | None = None   # d sigma / dt   (flow)


def _coefficients(sde: LinearSDE, t64: Tensor, x: Tensor, need_derivatives: bool) -> Coefficients:
    la, ls = sde._log_alpha(t64), sde._log_sigma(t64)
    a, s = torch.exp(la), torch.exp(ls)
    cast = lambda v: append_dims(v.to(dtype=x.dtype, device=x.device), x.ndim)  # noqa: E731
    if not need_derivatives:
        return Coefficients(cast(a), cast(s))
    f, g2 = sde._f(t64), sde._g2(t64)
    return Coefficients(cast(a), cast(s), cast(f * a), cast((g2 + 2.0 * f * s * s) / (2.0 * s)))


def from_prediction(prediction: Prediction | str, x: Tensor, out: Tensor, c: Coefficients,
                    sigma_data: float = 0.5) -> tuple[Tensor, Tensor]:
    """``(x0, eps)`` from a network output of type ``prediction`` at ``x`` (EDM: ``out`` is F)."""
    p = Prediction.parse(prediction)
    a, s = c.alpha, c.sigma
    if p is Prediction.EPS:
        return (x - s * out) / a, out
    if p is Prediction.X0:
        return out, (x - a * out) / s
    if p is Prediction.SCORE:
        eps = -s * out
        return (x - s * eps) / a, eps
    if p is Prediction.V:
        r2 = a * a + s * s
        r = r2 ** 0.5
        return (a * x - s * r * out) / r2, (s * x + a * r * out) / r2
    if p is Prediction.FLOW:
        det = a * c.dsigma - s * c.dalpha
        return (c.dsigma * x - s * out) / det, (a * out - c.dalpha * x) / det
    # EDM
    sh = s / a
    d2 = sh * sh + sigma_data ** 2
    x0 = (sigma_data ** 2 / d2) * (x / a) + (sh * sigma_data / d2 ** 0.5) * out
    return x0, (x - a * x0) / s


def to_prediction(prediction: Prediction | str, x: Tensor, x0: Tensor, eps: Tensor, c: Coefficients,
                  sigma_data: float = 0.5) -> Tensor:
    """The network output of type ``prediction`` that corresponds to ``(x0, eps)`` at ``x``."""
    p = Prediction.parse(prediction)
    a, s = c.alpha, c.sigma
    if p is Prediction.EPS:
        return eps
    if p is Prediction.X0:
        return x0
    if p is Prediction.SCORE:
        return -eps / s
    if p is Prediction.V:
        return (a * eps - s * x0) / (a * a + s * s) ** 0.5
    if p is Prediction.FLOW:
        return c.dalpha * x0 + c.dsigma * eps
    sh = s / a
    d2 = sh * sh + sigma_data ** 2
    return (x0 - (sigma_data ** 2 / d2) * (x / a)) / (sh * sigma_data / d2 ** 0.5)


class Denoised:
    """One evaluation of the model.  ``x0``, ``eps`` and ``score`` are converted from the raw
    network output ``raw`` on first access (so a solver that needs only eps pays nothing for
    x0); ``alpha`` and ``sigma`` are the schedule values used (tensors broadcastable against
    ``x``, or Python floats when one time was shared by the whole batch).  For a general SDE
    only ``score`` exists."""

    __slots__ = ("x", "raw", "prediction", "coefficients", "sigma_data", "_x0", "_eps", "score_value")

    def __init__(self, x: Tensor, raw: Tensor, prediction: "Prediction | None", coefficients: "Coefficients | None",
                 sigma_data: float = 0.5, score_value: Tensor | None = None):
        self.x, self.raw, self.prediction, self.coefficients = x, raw, prediction, coefficients
        self.sigma_data, self.score_value = sigma_data, score_value
        self._x0 = self._eps = None

    def _convert(self) -> None:
        self._x0, self._eps = from_prediction(self.prediction, self.x, self.raw, self.coefficients, self.sigma_data)

    @property
    def x0(self) -> Tensor | None:
        if self.coefficients is None:
            return None
        if self._x0 is None:
            p = self.prediction
            if p is Prediction.X0:
                self._x0 = self.raw
            elif p is Prediction.EPS and isinstance(self.coefficients.alpha, float):
                c = self.coefficients  # fused: (x - sigma eps)/alpha in two passes
                self._x0 = torch.add(self.x, self.raw, alpha=-c.sigma).mul_(1.0 / c.alpha)
            else:
                self._convert()
        return self._x0

    @property
    def eps(self) -> Tensor | None:
        if self.coefficients is None:
            return None
        if self._eps is None:
            p = self.prediction
            if p is Prediction.EPS:
                self._eps = self.raw
            elif p is Prediction.X0 and isinstance(self.coefficients.alpha, float):
                c = self.coefficients
                self._eps = torch.add(self.x, self.raw, alpha=-c.alpha).mul_(1.0 / c.sigma)
            else:
                self._convert()
        return self._eps

    @property
    def alpha(self):
        return None if self.coefficients is None else self.coefficients.alpha

    @property
    def sigma(self):
        return None if self.coefficients is None else self.coefficients.sigma

    @property
    def score(self) -> Tensor:
        if self.score_value is not None:
            return self.score_value
        if self.prediction is Prediction.SCORE:
            return self.raw
        return -self.eps / self.sigma


class _Counter:
    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


_TIME_INPUTS = ("t", "discrete", "c_noise", "log_snr", "sigma")


class ScoreModel:
    r"""Wrap ``net`` (trained for ``sde``, predicting ``prediction``) behind
    :meth:`eps`, :meth:`x0`, :meth:`score`, :meth:`v`.

    **Arguments:**

    - ``net``: a callable ``net(x_in, t_in) -> Tensor`` shaped like ``x_in`` (a
      ``torch.nn.Module`` or any function); with ``cond`` it is called
      ``net(x_in, t_in, cond)``.
    - ``sde``: the :class:`~scoresde.sde.LinearSDE` it was trained for; a general
      :class:`~scoresde.sde.SDE` is accepted with ``prediction="score"`` (then only
      :meth:`score` exists, for Euler--Maruyama, predictor--corrector and ``pf_ode``).
    - ``prediction``: ``"eps" | "x0" | "v" | "score" | "edm" | "flow"``.
    - ``sigma_data``: EDM's data standard deviation (only for ``"edm"``).
    - ``time_input``: what the network receives as ``t_in`` (shape ``[B]``, in x's dtype):
      ``"t"`` (continuous time, the default), ``"discrete"`` (the training-step index
      ``N t - 1`` of a :class:`DiscreteVPSDE`), ``"c_noise"`` (EDM's
      :math:`\tfrac14\log(\sigma/\alpha)`; the default for ``"edm"``), ``"log_snr"``,
      ``"sigma"`` (:math:`\sigma/\alpha`), or a function of the float64 time vector.
    - ``cond``: conditioning passed to ``net`` as a third argument (leading dim B or 1).

    **Raises:** ``TypeError`` if ``sde`` is not a LinearSDE or ``net`` is not callable;
    ``ValueError`` for an unknown prediction or time input.
    """

    def __init__(self, net: Callable[..., Tensor], sde: LinearSDE, prediction: Prediction | str = "eps",
                 *, sigma_data: float = 0.5, time_input: str | Callable[[Tensor], Tensor] | None = None,
                 cond: Any = None):
        if not callable(net):
            raise TypeError(f"net must be callable, got {type(net).__name__}")
        if not isinstance(sde, SDE):
            raise TypeError(f"sde must be a scoresde SDE, got {type(sde).__name__}")
        self.prediction = Prediction.parse(prediction)
        self.linear = isinstance(sde, LinearSDE)
        if not self.linear:
            if self.prediction is not Prediction.SCORE:
                raise TypeError(
                    f"sde must be a LinearSDE for prediction={self.prediction.value!r} (the parameterisations "
                    f"need alpha(t), sigma(t)); got {type(sde).__name__}. A general SDE takes prediction='score'"
                )
            if time_input is not None and not callable(time_input) and time_input != "t":
                raise TypeError(f"time_input={time_input!r} needs a LinearSDE; got {type(sde).__name__}")
        self.net = net
        self.sde = sde
        self.sigma_data = check_positive_float(sigma_data, "sigma_data")
        if time_input is None:
            time_input = "c_noise" if self.prediction is Prediction.EDM else "t"
        if not callable(time_input):
            if time_input not in _TIME_INPUTS:
                raise ValueError(f"time_input must be one of {_TIME_INPUTS} or a function; got {time_input!r}")
            if time_input == "discrete" and not isinstance(sde, DiscreteVPSDE):
                raise TypeError(f"time_input='discrete' needs a DiscreteVPSDE; got {type(sde).__name__}")
        self.time_input = time_input
        self.cond = cond
        self._guidance: tuple[Any, float] | None = None
        self._counter = _Counter()
        self._scalar_cache: dict = {}
        self._warned_train = False
        self._need_derivs = self.prediction is Prediction.FLOW

    # ----------------------------------------------------------------- NFE
    @property
    def nfe(self) -> int:
        """Number of ``net`` calls made so far (shared with :meth:`guided` copies)."""
        return self._counter.n

    def reset_nfe(self) -> None:
        self._counter.n = 0

    # ------------------------------------------------------------- guidance
    def guided(self, cond: Any, uncond: Any, scale: float) -> "ScoreModel":
        r"""A copy applying classifier-free guidance (Ho & Salimans 2022):
        :math:`\text{out} = \text{out}_u + w(\text{out}_c - \text{out}_u)` in the network's
        prediction space, both branches evaluated in one doubled batch (one NFE).  The copy
        shares this model's NFE counter."""
        w = check_float(scale, "scale")
        if cond is None or uncond is None:
            raise ValueError("guided() needs both cond and uncond")
        other = ScoreModel.__new__(ScoreModel)
        other.__dict__.update(self.__dict__)
        other.cond = cond
        other._guidance = (uncond, w)
        return other

    # --------------------------------------------------------- time inputs
    def _time_input(self, t64: Tensor, batch: int, like: Tensor) -> Tensor:
        ti = self.time_input
        if callable(ti):
            out = ti(t64)
        elif ti == "t":
            out = t64
        elif ti == "discrete":
            out = t64 * self.sde.num_steps - 1.0
        else:
            lam = self.sde._log_snr(t64)
            if ti == "log_snr":
                out = lam
            elif ti == "sigma":
                out = torch.exp(-0.5 * lam)
            else:  # c_noise = log(sigma_hat)/4 = -lam/8
                out = -0.125 * lam
        out = torch.as_tensor(out).to(dtype=like.dtype, device=like.device)
        return out.expand(batch) if out.ndim == 0 else out

    @staticmethod
    def _expand_cond(c: Any, batch: int) -> Any:
        if isinstance(c, Tensor) and c.ndim > 0 and c.shape[0] == 1 and batch != 1:
            return c.expand(batch, *c.shape[1:])
        return c

    # ----------------------------------------------------------- core call
    def _call_net(self, x_in: Tensor, t_in: Tensor) -> Tensor:
        if not self._warned_train and isinstance(self.net, nn.Module) and self.net.training:
            stochastic = any(isinstance(m, (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm))
                             for m in self.net.modules())
            if stochastic:
                warnings.warn("net is in training mode (dropout/batch norm active); sampling is not "
                              "deterministic: call net.eval()", RuntimeWarning, stacklevel=4)
            self._warned_train = True
        batch = x_in.shape[0]
        if self._guidance is not None:
            uncond, w = self._guidance
            c = torch.cat([self._expand_cond(self.cond, batch), self._expand_cond(uncond, batch)])
            out = self.net(torch.cat([x_in, x_in]), torch.cat([t_in, t_in]), c)
            self._counter.n += 1
            out = self._check_output(out, torch.cat([x_in, x_in]))
            out_c, out_u = out[:batch], out[batch:]
            return out_u + w * (out_c - out_u)
        if self.cond is not None:
            out = self.net(x_in, t_in, self._expand_cond(self.cond, batch))
        else:
            out = self.net(x_in, t_in)
        self._counter.n += 1
        return self._check_output(out, x_in)

    @staticmethod
    def _check_output(out: Any, x: Tensor) -> Tensor:
        if not isinstance(out, Tensor):
            raise TypeError(f"net must return a tensor, got {type(out).__name__}")
        if out.shape != x.shape:
            raise ValueError(f"net output shape {tuple(out.shape)} != x shape {tuple(x.shape)}")
        if out.device != x.device:
            raise ValueError(f"net returned a tensor on {out.device}, x is on {x.device}")
        if out.dtype != x.dtype:
            out = out.to(x.dtype)  # documented: the output is cast to the state dtype
        return out

    def evaluate(self, x: Tensor, t: Any, *, validate: bool = True) -> Denoised:
        """Call ``net`` once at ``(x, t)`` and return :class:`Denoised` (x0, eps, alpha, sigma).

        ``t``: a float, a 0-d tensor (one time for the batch) or shape ``[B]``.  With
        ``validate=False`` (solvers, after checking their grid once) ``t`` must already be
        a float64 tensor of shape ``[]`` or ``[B]`` inside ``[0, T]``; nothing is checked
        and no host synchronisation happens."""
        if validate:
            check_floating(x, "x")
            if x.ndim == 0:
                raise ValueError("x must have a batch dimension, got a 0-d tensor")
            check_finite_tensor(x, "x")
            t64 = self.sde.check_time(t, batch=x.shape[0]).to(x.device)
        else:
            t64 = t
        if not self.linear:  # general SDE: the network is the score itself
            out = self._call_net(x, self._time_input(t64, x.shape[0], x))
            return Denoised(x, out, None, None, score_value=out)
        if not validate and t64.ndim == 0 and t64.device.type == "cpu" and not callable(self.time_input):
            # one time for the whole batch (the solvers' case): schedule values as Python floats,
            # cached per time, so the loop runs no schedule kernels and never synchronises
            c, t_in_value = self._scalar_coefficients(t64)
            t_in = torch.full((x.shape[0],), t_in_value, dtype=x.dtype, device=x.device)
        else:
            c = _coefficients(self.sde, t64.to(x.device), x, self._need_derivs)
            t_in = self._time_input(t64.to(x.device), x.shape[0], x)
        if self.prediction is Prediction.EDM:
            sh = c.sigma / c.alpha
            x_in = x * (1.0 / (c.alpha * (sh * sh + self.sigma_data ** 2) ** 0.5))
        else:
            x_in = x
        out = self._call_net(x_in, t_in)
        return Denoised(x, out, self.prediction, c, self.sigma_data)

    def _scalar_coefficients(self, t64: Tensor) -> tuple[Coefficients, float]:
        key = float(t64)
        hit = self._scalar_cache.get(key)
        if hit is not None:
            return hit
        sde = self.sde
        a, s = math.exp(float(sde._log_alpha(t64))), math.exp(float(sde._log_sigma(t64)))
        if self._need_derivs:
            f, g2 = float(sde._f(t64)), float(sde._g2(t64))
            c = Coefficients(a, s, f * a, (g2 + 2.0 * f * s * s) / (2.0 * s))
        else:
            c = Coefficients(a, s)
        t_in = float(self._time_input(t64, 1, torch.empty(0, dtype=torch.float64))[0])
        if len(self._scalar_cache) > 4096:
            self._scalar_cache.clear()
        self._scalar_cache[key] = (c, t_in)
        return c, t_in

    # ------------------------------------------------------- public views
    def _need_linear(self, what: str) -> None:
        if not self.linear:
            raise TypeError(f"model.{what} needs a LinearSDE (alpha, sigma); {type(self.sde).__name__} "
                            "only has the score")

    def eps(self, x: Tensor, t: Any) -> Tensor:
        r"""Predicted noise :math:`\epsilon` at ``(x, t)``."""
        self._need_linear("eps")
        return self.evaluate(x, t).eps

    def x0(self, x: Tensor, t: Any) -> Tensor:
        r"""Predicted data :math:`x_0 = E[x_0 \mid x_t = x]`."""
        self._need_linear("x0")
        return self.evaluate(x, t).x0

    def score(self, x: Tensor, t: Any) -> Tensor:
        r"""Score :math:`\nabla\log p_t(x) = -\epsilon/\sigma_t`."""
        return self.evaluate(x, t).score

    def v(self, x: Tensor, t: Any) -> Tensor:
        r""":math:`v = (\alpha_t\epsilon - \sigma_t x_0)/\sqrt{\alpha_t^2+\sigma_t^2}`."""
        self._need_linear("v")
        d = self.evaluate(x, t)
        return (d.alpha * d.eps - d.sigma * d.x0) / (d.alpha ** 2 + d.sigma ** 2) ** 0.5

    def __repr__(self) -> str:
        return f"ScoreModel(net={type(self.net).__name__}, sde={self.sde!r}, prediction={self.prediction.value!r})"
