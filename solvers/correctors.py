r"""Langevin correctors and the predictor--corrector sampler ``pc`` (Song et al. 2021, sec. 4.2,
Algorithms 2-3; score_sde's ``LangevinCorrector`` and ``AnnealedLangevinDynamics``).

A corrector makes ``corrector_steps`` Langevin MCMC steps targeting :math:`p_{t_i}` at the
current grid time, each one network evaluation,

.. math:: x \leftarrow x + \epsilon_i\,s(x, t_i) + \sqrt{2\epsilon_i}\,z,

before the predictor advances from :math:`t_i` to :math:`t_{i+1}` (score_sde's order:
corrector, then predictor, at every grid time but the last).  :math:`a_i =
(\alpha_i/\alpha_{i+1})^2` generalises score_sde's ``alpha`` factor (:math:`1-\beta_i` for
VP and sub-VP, 1 for VE).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from scoresde._checks import append_dims, check_float, check_int
from scoresde.sde import SDE, LinearSDE

from . import _registry
from ._registry import register
from .base import CheckedModel, Solver, StepTable
from .noise import BrownianNoise, NoiseSource
from .timesteps import TimeGrid

__all__ = ["Corrector", "LangevinCorrector", "AnnealedLangevin", "PredictorCorrector", "CORRECTORS"]


def _alpha_factor(sde: SDE, grid: TimeGrid) -> Tensor:
    """score_sde's ``alpha`` of the Langevin step at each grid time: :math:`(\\alpha_i/\\alpha_{i+1})^2`
    in float64 (1 for alpha = 1, i.e. VE/EDM; 1 for a general SDE)."""
    t64 = grid.t
    if not isinstance(sde, LinearSDE):
        return torch.ones(grid.steps, dtype=torch.float64)
    la = sde.log_alpha_unchecked(t64)
    return torch.exp(2.0 * (la[:-1] - la[1:]))


class Corrector:
    """Base of the correctors: ``prepare`` adds coefficients (prefixed ``corr_``) to the
    predictor's table once per call; ``correct`` makes one Langevin step (one NFE)."""

    name: ClassVar[str] = "corrector"

    def __init__(self, snr: float):
        self.snr = snr

    def prepare(self, sde: SDE, grid: TimeGrid, like: Tensor, tab: StepTable) -> None:
        raise NotImplementedError

    def correct(self, model: CheckedModel, i: int, x: Tensor, tab: StepTable, noise: NoiseSource) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(snr={self.snr})"


class LangevinCorrector(Corrector):
    r"""score_sde's ``LangevinCorrector`` with the step size set **per sample** from the target
    signal-to-noise ratio ``snr``:

    .. math:: \epsilon_{i,b} = 2a_i\Big(\text{snr}\,\frac{\|z_b\|_2}{\|s(x_b, t_i)\|_2}\Big)^2,

    norms over all non-batch dimensions of sample b.  score_sde uses the **batch means** of
    the two norms, which makes every sample depend on the rest of the batch; here sample b's
    step depends only on sample b (a deliberate deviation; for a batch of identical
    statistics the two agree).  The ratio is a good step-size estimate only when the norms
    concentrate, i.e. in high dimension: on a d = 64 Gaussian (VP, 20 reverse-diffusion
    steps, snr 0.16) the corrector lowers the variance error from 0.101 to 0.086, while on a
    d = 3 Gaussian it raises the covariance error from 0.19 to 0.84 (a sample near the mode
    has a small score and gets a huge step).  ``annealed_langevin`` has no such issue.
    1 NFE per corrector step."""

    name: ClassVar[str] = "langevin"

    def prepare(self, sde: SDE, grid: TimeGrid, like: Tensor, tab: StepTable) -> None:
        tab.corr_step_scale = (2.0 * self.snr ** 2 * _alpha_factor(sde, grid)).to(dtype=like.dtype,
                                                                                   device=like.device)

    def correct(self, model: CheckedModel, i: int, x: Tensor, tab: StepTable, noise: NoiseSource) -> Tensor:
        score = model.evaluate(x, tab.t64[i]).score
        z = noise(i, tab.t[i], tab.t[i + 1], x)
        b = x.shape[0]
        g_norm = score.reshape(b, -1).norm(dim=1).clamp_min(torch.finfo(x.dtype).tiny)
        z_norm = z.reshape(b, -1).norm(dim=1)
        step = append_dims(tab.corr_step_scale[i] * (z_norm / g_norm) ** 2, x.ndim)
        return x + step * score + torch.sqrt(2.0 * step) * z


class AnnealedLangevin(Corrector):
    r"""score_sde's ``AnnealedLangevinDynamics`` (Song & Ermon 2019): the step size follows the
    noise level, :math:`\epsilon_i = 2a_i(\text{snr}\,\sigma_i)^2`, the same for every sample
    (precomputed).  1 NFE per corrector step."""

    name: ClassVar[str] = "annealed_langevin"

    def prepare(self, sde: SDE, grid: TimeGrid, like: Tensor, tab: StepTable) -> None:
        if isinstance(sde, LinearSDE):
            sigma = sde.coefficients(grid.t[:-1])["sigma"]
        else:  # pragma: no cover - pc declares requires_linear_sde for this corrector
            raise TypeError(f"annealed_langevin needs a LinearSDE (sigma(t)); got {type(sde).__name__}")
        eps = 2.0 * _alpha_factor(sde, grid) * (self.snr * sigma) ** 2
        tab.corr_step = eps.to(dtype=like.dtype, device=like.device)
        tab.corr_noise = torch.sqrt(2.0 * eps).to(dtype=like.dtype, device=like.device)

    def correct(self, model: CheckedModel, i: int, x: Tensor, tab: StepTable, noise: NoiseSource) -> Tensor:
        score = model.evaluate(x, tab.t64[i]).score
        z = noise(i, tab.t[i], tab.t[i + 1], x)
        return x + tab.corr_step[i] * score + tab.corr_noise[i] * z


#: corrector names accepted by ``pc``
CORRECTORS: dict[str, type[Corrector] | None] = {
    "langevin": LangevinCorrector,
    "annealed_langevin": AnnealedLangevin,
    "none": None,
}


@register("pc")
@dataclass
class PredictorCorrector(Solver):
    r"""Predictor--corrector sampling (Song et al. 2021, Algorithm 1): at every grid time
    :math:`t_i` (i < steps), ``corrector_steps`` Langevin steps at :math:`t_i`, then one
    predictor step :math:`t_i \to t_{i+1}`.

    **Options:** ``predictor``: any registered fixed-step method name (default
    ``"reverse_diffusion"``; an ODE step such as ``"ddim"``, ``"euler"`` or ``"dpmpp_2m"``
    works too) with ``predictor_options={...}`` passed to it; ``corrector``:
    ``"langevin"`` (:class:`LangevinCorrector`, per-sample step sizes), ``"annealed_langevin"``
    (:class:`AnnealedLangevin`) or ``"none"``; ``snr`` (> 0, default 0.16, score_sde's CIFAR-10
    VE value); ``corrector_steps`` (int >= 0, default 1).

    With ``corrector="none"`` or ``corrector_steps=0`` the output is exactly the predictor's.
    NFE: ``predictor.expected_nfe(steps) + corrector_steps * intervals``, i.e.
    ``steps * (predictor NFE per step + corrector_steps)`` for a one-NFE predictor.  The order
    is the predictor's when the corrector is off; the corrector does not raise it."""

    order: ClassVar[int] = 1
    predictor: Any = "reverse_diffusion"
    corrector: str = "langevin"
    snr: float = 0.16
    corrector_steps: int = 1
    predictor_options: dict | None = None

    def _resolve_predictor(self) -> Solver:
        """The predictor instance named by ``predictor`` / ``predictor_options`` (raises for a bad
        one; no side effect)."""
        opts = self.predictor_options
        if opts is not None and not isinstance(opts, dict):
            raise TypeError(f"predictor_options must be a dict, got {type(opts).__name__}")
        opts = dict(opts or {})
        pred = self.predictor
        if isinstance(pred, str):
            if pred == self.name:
                raise ValueError("predictor='pc' is not allowed (a predictor must be a fixed-step method)")
            try:
                pred = _registry.get(pred, **opts)
            except ValueError as err:
                raise ValueError(f"predictor={self.predictor!r}: {err}") from None
            except TypeError as err:
                raise TypeError(f"predictor_options for predictor {self.predictor!r}: {err}") from None
        elif isinstance(pred, Solver):
            if opts:
                raise TypeError("predictor_options given with a predictor instance; set them on the instance")
            if isinstance(pred, PredictorCorrector):
                raise ValueError("predictor must be a fixed-step method, not another pc sampler")
        else:
            raise TypeError(f"predictor must be a method name or a Solver instance, got {type(pred).__name__}")
        if hasattr(pred, "run") or getattr(pred, "adaptive", False):
            raise ValueError(f"predictor must be a fixed-step method; {pred.name!r} is adaptive")
        return pred

    def validate_options(self) -> None:
        self._resolve_predictor()
        if not isinstance(self.corrector, str) or self.corrector not in CORRECTORS:
            raise ValueError(f"corrector must be one of {sorted(CORRECTORS)}; got {self.corrector!r}")
        check_float(self.snr, "snr", low=0.0, low_open=True)
        check_int(self.corrector_steps, "corrector_steps", minimum=0)

    def __post_init__(self) -> None:
        """Validate the options, then derive from them: ``snr`` as a float and
        ``corrector_steps`` as an int, the predictor and corrector instances, and the instance
        values that override the class defaults (read by :func:`solvers.sample` before any NFE):
        ``stochastic``, ``requires_linear_sde``, ``default_schedule`` and ``order``, which are
        the predictor's (an instance value: the order is not an option of pc but follows from
        its ``predictor`` option)."""
        super().__post_init__()
        pred = self._resolve_predictor()
        self.snr = check_float(self.snr, "snr", low=0.0, low_open=True)
        self.corrector_steps = check_int(self.corrector_steps, "corrector_steps", minimum=0)
        cls = CORRECTORS[self.corrector]
        self._pred = pred
        self._corr = cls(self.snr) if cls is not None and self.corrector_steps > 0 else None
        self.stochastic = bool(pred.stochastic) or self._corr is not None
        self.requires_linear_sde = bool(pred.requires_linear_sde) or self.corrector == "annealed_langevin"
        self.default_schedule = pred.default_schedule
        self.order = pred.order

    # ----------------------------------------------------------------- contract
    def grid_intervals(self, steps: int) -> int:
        return self._pred.grid_intervals(steps)

    def expected_nfe(self, steps: int) -> int:
        n = self._pred.expected_nfe(steps)
        if self._corr is not None:
            n += self.corrector_steps * self._pred.grid_intervals(steps)
        return n

    def prepare(self, sde: SDE, grid: TimeGrid, like: Tensor) -> StepTable:
        tab = self._pred.prepare(sde, grid, like)
        if self._corr is not None:
            self._corr.prepare(sde, grid, like, tab)
        return tab

    def init(self, x: Tensor) -> Any:
        return self._pred.init(x)

    def step(self, model: CheckedModel, i: int, x: Tensor, state: Any, tab: StepTable,
             noise: NoiseSource) -> tuple[Tensor, Any]:
        if self._corr is not None:
            if i == 0 and isinstance(noise, BrownianNoise):
                raise ValueError("pc with a Langevin corrector needs independent noise for the corrector; a "
                                 "BrownianNoise path would hand it the predictor's increments: pass a "
                                 "torch.Generator as generator, or corrector='none'")
            for _ in range(self.corrector_steps):
                x = self._corr.correct(model, i, x, tab, noise)
        return self._pred.step(model, i, x, state, tab, noise)

    def stats(self, table: StepTable) -> dict:
        out = self._pred.stats(table)
        out.update(predictor=self._pred.name, corrector=self.corrector if self._corr is not None else "none",
                   corrector_steps=self.corrector_steps if self._corr is not None else 0)
        return out
