r"""diffusers networks and schedulers as scoresde models, grids and solver options.

A diffusers UNet trained with a discrete DDPM schedule of N steps predicts, at the integer
step :math:`n`, from :math:`x_n = \sqrt{\bar\alpha_n}\,x_0 + \sqrt{1-\bar\alpha_n}\,\epsilon`.
:class:`scoresde.DiscreteVPSDE` places step :math:`n` at the continuous time
:math:`t_n = (n+1)/N` (:math:`\alpha(t_n)^2 = \bar\alpha_n`, :math:`\log\alpha` piecewise
linear in between; Lu et al. 2022, "DPM-Solver", sec. 3.4), and the network receives
:math:`n = Nt - 1`: at the scheduler's own timesteps it is called exactly as diffusers calls it.

- :func:`from_diffusers` wraps ``unet`` and ``scheduler`` as a :class:`scoresde.ScoreModel`.
- :func:`timesteps_from` gives the float64 times of the scheduler's grid (after
  ``scheduler.set_timesteps(n)``).
- :func:`sample_options` gives the ``solvers.sample`` arguments (method, options, grid,
  ``final_denoise``) that reproduce the scheduler's own loop, or raises for an option no
  scoresde solver reproduces.

diffusers itself is imported only to check that it is installed (``pip install
'scoresde[diffusers]'``); schedulers and UNets are used through their attributes.
"""
from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor, nn

from scoresde.model import ScoreModel
from scoresde.sde import DiscreteVPSDE

__all__ = ["from_diffusers", "timesteps_from", "sample_options", "sde_from", "DiffusersNet"]

#: diffusers ``prediction_type`` -> scoresde prediction
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
#: schedulers whose loop :func:`sample_options` maps to a scoresde solver
SCHEDULERS = ("DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler")
# sigma spacings that step with sigmas other than the training schedule's at the called timesteps
_SIGMA_SPACINGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                   "use_flow_sigmas")
_RESERVED = ("sample", "timestep", "return_dict")
_COND_KEYS = ("encoder_hidden_states", "class_labels")


def _require_diffusers() -> None:
    try:
        import diffusers  # noqa: F401
    except ImportError as err:
        raise ImportError("scoresde.integrations.diffusers needs the diffusers package: "
                          "pip install 'scoresde[diffusers]'") from err


def _config(scheduler: Any) -> Any:
    cfg = getattr(scheduler, "config", None)
    if cfg is None or not hasattr(cfg, "get"):
        raise TypeError(f"scheduler must be a diffusers scheduler (with a .config), got {type(scheduler).__name__}")
    return cfg


def _kind(scheduler: Any) -> str | None:
    return next((c.__name__ for c in type(scheduler).__mro__ if c.__name__ in SCHEDULERS), None)


# ----------------------------------------------------------------------------- the model
def sde_from(scheduler: Any) -> DiscreteVPSDE:
    """The :class:`~scoresde.DiscreteVPSDE` of a variance-preserving diffusers scheduler, built
    from its ``alphas_cumprod`` (so any ``beta_schedule``, ``trained_betas`` or
    ``rescale_betas_zero_snr``).  Raises ``ValueError`` for a scheduler that is not VP-type
    (no ``alphas_cumprod``, e.g. ``ScoreSdeVeScheduler``; or flow sigmas)."""
    _require_diffusers()
    cfg = _config(scheduler)
    name = type(scheduler).__name__
    if cfg.get("use_flow_sigmas", False) or cfg.get("prediction_type") == "flow_prediction":
        raise ValueError(f"scheduler {name} is configured for flow matching (use_flow_sigmas / flow_prediction), "
                         "not a variance-preserving DDPM schedule; from_diffusers needs a VP scheduler")
    ac = getattr(scheduler, "alphas_cumprod", None)
    if ac is None:
        raise ValueError(f"scheduler {name} has no alphas_cumprod: it is not a variance-preserving (DDPM-type) "
                         f"schedule (variance-exploding and flow-matching schedulers are not supported); "
                         f"use one of {', '.join(SCHEDULERS)}")
    return DiscreteVPSDE(alphas_cumprod=torch.as_tensor(ac).detach().to("cpu", torch.float64))


def _prediction(cfg: Any, name: str) -> str:
    p = cfg.get("prediction_type", "epsilon")
    if p not in PREDICTIONS:
        raise ValueError(f"scheduler {name} has prediction_type={p!r}; expected one of "
                         f"{', '.join(map(repr, PREDICTIONS))}")
    return PREDICTIONS[p]


def _fit_batch(value: Any, batch: int, name: str) -> Any:
    """A call argument with leading dim B (as is), 1 (expanded) or B/2 (repeated: the doubled
    batch of classifier-free guidance)."""
    if not isinstance(value, Tensor) or value.ndim == 0 or value.shape[0] == batch:
        return value
    if value.shape[0] == 1:
        return value.expand(batch, *value.shape[1:])
    if 2 * value.shape[0] == batch:
        return torch.cat([value, value])
    raise ValueError(f"{name} has leading dimension {value.shape[0]}; expected the batch size {batch} or 1")


class DiffusersNet(nn.Module):
    """``net(x, t_in[, cond])`` -> ``unet(x, t_in, **call_kwargs).sample`` (the first ``C``
    channels where the scheduler's ``variance_type`` is learned).  ``cond`` (from
    :meth:`ScoreModel.guided`) goes to ``encoder_hidden_states`` or ``class_labels``, whichever
    the UNet takes, in place of a call argument of that name.  Input channels, device and dtype
    are checked before the UNet is called."""

    def __init__(self, unet: nn.Module, call_kwargs: dict, cond_key: str | None, in_channels: int | None,
                 learned_variance: bool):
        super().__init__()
        self.unet = unet
        self.call_kwargs = dict(call_kwargs)
        self.cond_key, self.in_channels, self.learned_variance = cond_key, in_channels, learned_variance

    @property
    def training(self) -> bool:  # type: ignore[override]
        """The UNet's mode (so that ScoreModel's train-mode warning follows ``unet.eval()``)."""
        unet = self.__dict__.get("_modules", {}).get("unet")
        return True if unet is None else unet.training

    @training.setter
    def training(self, mode: bool) -> None:
        pass                     # train()/eval() reach the UNet through the module tree

    def _check(self, x: Tensor) -> None:
        if self.in_channels is not None and (x.ndim < 2 or x.shape[1] != self.in_channels):
            raise ValueError(f"x has shape {tuple(x.shape)}; the UNet takes {self.in_channels} channels "
                             f"(shape [B, {self.in_channels}, H, W])")
        p = next(iter(self.unet.parameters()), None)
        if p is not None and p.device != x.device:
            raise ValueError(f"the UNet is on {p.device}, x on {x.device}; move one of them")
        if p is not None and p.dtype != x.dtype:
            raise ValueError(f"the UNet's parameters are {p.dtype}, x is {x.dtype}; use unet.to({x.dtype}) "
                             f"or an x_T of dtype {p.dtype}")

    def forward(self, x: Tensor, t_in: Tensor, cond: Any = None) -> Tensor:
        self._check(x)
        kwargs = {k: _fit_batch(v, x.shape[0], k) for k, v in self.call_kwargs.items()}
        if cond is not None:
            if self.cond_key is None:
                raise TypeError("this UNet takes no conditioning input (neither encoder_hidden_states nor "
                                "class_labels), so it cannot be guided")
            kwargs[self.cond_key] = cond
        out = self.unet(x, t_in, **kwargs)
        out = getattr(out, "sample", out)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out[:, : x.shape[1]] if self.learned_variance else out


def from_diffusers(unet: nn.Module, scheduler: Any, **call_kwargs: Any) -> ScoreModel:
    """A :class:`~scoresde.ScoreModel` of a diffusers UNet trained with ``scheduler``'s schedule.

    **Arguments:**

    - ``unet``: a diffusers UNet (``UNet2DModel``, ``UNet2DConditionModel``, ...) or any module
      called ``unet(x, timestep, **kwargs)`` returning an object with ``.sample`` (or a tensor).
    - ``scheduler``: the variance-preserving scheduler it was trained with; its
      ``alphas_cumprod`` define the :class:`~scoresde.DiscreteVPSDE` and its
      ``config.prediction_type`` the prediction (``epsilon`` -> eps, ``v_prediction`` -> v,
      ``sample`` -> x0).
    - ``call_kwargs``: extra UNet inputs passed on every call (``class_labels``,
      ``encoder_hidden_states``, ...), leading dimension the batch size or 1.

    Classifier-free guidance: ``model.guided(cond, uncond, scale)``; ``cond``/``uncond`` go to the
    UNet's ``encoder_hidden_states`` (or ``class_labels``), both branches in one doubled batch.

    **Raises:** ``ImportError`` without diffusers; ``TypeError``/``ValueError`` for a scheduler that
    is not VP-type, an unknown prediction type, UNet channels that do not fit the scheduler, or a
    call argument the UNet does not take, all before any network call.
    """
    _require_diffusers()
    if not isinstance(unet, nn.Module):
        raise TypeError(f"unet must be a torch.nn.Module (a diffusers UNet), got {type(unet).__name__}")
    cfg = _config(scheduler)
    name = type(scheduler).__name__
    sde = sde_from(scheduler)
    prediction = _prediction(cfg, name)
    learned = cfg.get("variance_type") in ("learned", "learned_range")
    ucfg = getattr(unet, "config", None)
    in_ch = ucfg.get("in_channels") if hasattr(ucfg, "get") else None
    out_ch = ucfg.get("out_channels") if hasattr(ucfg, "get") else None
    if in_ch is not None and out_ch is not None and out_ch != (2 * in_ch if learned else in_ch):
        what = "2 x in_channels (a learned variance)" if learned else "in_channels"
        raise ValueError(f"unet has in_channels={in_ch}, out_channels={out_ch}; scheduler {name} "
                         f"(variance_type={cfg.get('variance_type')!r}) needs out_channels = {what}")
    params = inspect.signature(unet.forward).parameters
    open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key in call_kwargs:
        if key in _RESERVED:
            raise TypeError(f"call_kwargs must not contain {key!r} (from_diffusers passes the sample and timestep)")
        if key not in params and not open_kwargs:
            raise TypeError(f"{type(unet).__name__}.forward takes no argument {key!r}")
    cond_key = next((k for k in _COND_KEYS if k in params), None)
    net = DiffusersNet(unet, call_kwargs, cond_key, in_ch, learned)
    return ScoreModel(net, sde, prediction, time_input="discrete")


# ------------------------------------------------------------------------------ the grid
def _grid(scheduler: Any) -> tuple[Tensor, bool, str, Any, DiscreteVPSDE]:
    """``(times, final_denoise, kind, config, sde)`` of the scheduler's current grid."""
    _require_diffusers()
    cfg = _config(scheduler)
    kind = _kind(scheduler)
    if kind is None:
        raise TypeError(f"scheduler must be one of {', '.join(SCHEDULERS)}; got {type(scheduler).__name__}")
    sde = sde_from(scheduler)
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("call scheduler.set_timesteps(num_inference_steps) before reading its grid")
    steps = torch.as_tensor(scheduler.timesteps).detach().cpu().to(torch.float64)
    if steps.ndim != 1 or steps.numel() < 1 or not bool((steps == steps.round()).all()):
        raise ValueError(f"scheduler.timesteps must be a 1-d sequence of integer steps; got {steps.tolist()[:8]}")
    tau = [int(v) for v in steps.tolist()]
    n = sde.num_steps
    if min(tau) < 0 or max(tau) >= n or any(a <= b for a, b in zip(tau, tau[1:])):
        raise ValueError(f"scheduler.timesteps must be strictly decreasing integers in [0, {n - 1}]; got {tau}")
    end, final_denoise = (_ddim_end(scheduler, tau, n) if kind == "DDIMScheduler"
                          else _sigma_end(scheduler, cfg, kind, tau, sde))
    times = [(v + 1) / n for v in tau] + ([] if end is None else [end])
    return torch.tensor(times, dtype=torch.float64), final_denoise, kind, cfg, sde


def _sigma_end(scheduler: Any, cfg: Any, kind: str, tau: list[int], sde: DiscreteVPSDE) -> tuple[float | None, bool]:
    """DPM-Solver / UniPC: ``(time after the last timestep, final_denoise)``; a zero final sigma
    is the final denoise."""
    for flag in _SIGMA_SPACINGS:
        if cfg.get(flag, False):
            raise ValueError(f"{kind} with {flag}=True is not reproduced: its sigmas are then not the training "
                             "schedule's at the timesteps the network is called with (rounded or interpolated); "
                             "use the scheduler without it, or scoresde's own schedule='karras'/'log_snr' grids")
    ac = sde.alphas_cumprod
    table = torch.sqrt((1.0 - ac) / ac)
    sig = torch.as_tensor(scheduler.sigmas).detach().cpu().to(torch.float64)
    if sig.numel() != len(tau) + 1 or not torch.allclose(sig[:-1], table[tau], rtol=1e-5, atol=0.0):
        raise ValueError(f"{kind}.sigmas do not match its alphas_cumprod at its timesteps; this sigma spacing "
                         "is not reproduced")
    last = float(sig[-1])
    if last == 0.0:
        return None, True
    if not math.isclose(last, float(table[0]), rel_tol=1e-5):
        raise ValueError(f"{kind} ends at sigma={last:.6g}, neither 0 nor the first training step's "
                         f"{float(table[0]):.6g} (final_sigmas_type); not reproduced")
    if tau[-1] == 0:
        raise ValueError(f"{kind} with final_sigmas_type='sigma_min' and a last timestep of 0 makes a "
                         "zero-length last step; use fewer steps or another timestep_spacing")
    return 1.0 / sde.num_steps, False


def _ddim_end(scheduler: Any, tau: list[int], n: int) -> tuple[float | None, bool]:
    """DDIM steps from timestep k to k - N // num_inference_steps (not to the next entry of its
    timesteps); below 0 to ``final_alpha_cumprod`` (1: the data, i.e. the final denoise;
    ac[0]: the first training step, where a last timestep of 0 makes that step the identity,
    dropped here)."""
    ratio = n // int(scheduler.num_inference_steps)
    for a, b in zip(tau, tau[1:]):
        if a - ratio != b:
            raise ValueError(
                f"DDIMScheduler steps from timestep {a} to {a - ratio} (timestep - num_train_timesteps // "
                f"num_inference_steps) but then calls the network at {b}: with timestep_spacing="
                f"{scheduler.config.get('timestep_spacing')!r} and {len(tau)} steps its loop is not a sampler on one "
                "time grid and is not reproduced; use timestep_spacing='leading' or 'trailing' with a step count "
                "that divides num_train_timesteps")
    prev = tau[-1] - ratio
    if prev >= 0:
        return (prev + 1) / n, False
    final = float(torch.as_tensor(scheduler.final_alpha_cumprod))
    if final == 1.0:
        return None, True                             # the last step returns the predicted x0
    if not math.isclose(final, float(scheduler.alphas_cumprod[0]), rel_tol=1e-6):
        raise ValueError(f"DDIMScheduler.final_alpha_cumprod={final} is neither 1 nor alphas_cumprod[0]; not reproduced")
    return (None if tau[-1] == 0 else 1.0 / n), False


def timesteps_from(scheduler: Any) -> Tensor:
    """The float64 times of the scheduler's grid, after ``scheduler.set_timesteps(n)``.

    Timestep :math:`k` maps to :math:`t = (k+1)/N`; after the last timestep comes the final
    time: none where the scheduler ends at sigma = 0 (DPM-Solver/UniPC
    ``final_sigmas_type="zero"``, DDIM ``set_alpha_to_one=True``; then sample with
    ``final_denoise=True``), else :math:`1/N` (the first training step: ``"sigma_min"``,
    ``set_alpha_to_one=False``).  Timestep spacing (leading/trailing/linspace,
    ``steps_offset``, ``lambda_min_clipped``) is read off ``scheduler.timesteps`` itself.
    :func:`sample_options` gives this grid together with the matching method.

    **Raises:** ``ValueError`` before ``set_timesteps``, for Karras/exponential/beta/Lu/flow
    sigma spacings (the scheduler then steps with sigmas that are not the training schedule's
    at the timesteps the network sees), and for a DDIM spacing whose steps do not land on its
    own timesteps; ``TypeError`` for an unsupported scheduler class.
    """
    return _grid(scheduler)[0]


# ---------------------------------------------------------------------- the solver options
def sample_options(scheduler: Any) -> dict:
    """``solvers.sample`` keyword arguments that reproduce ``scheduler``'s own loop on its
    current grid (call ``scheduler.set_timesteps(n)`` first)::

        sol = solvers.sample(model, x_T, **sample_options(scheduler))

    The mapping (``docs/integrations.md`` has the table): ``DDIMScheduler`` (eta = 0) ->
    ``ddim``; ``DPMSolverMultistepScheduler`` (``dpmsolver++``) -> ``dpmpp_2m`` (``solver_order=2``,
    ``solver_type``) or ``ddim`` (``solver_order=1``); ``UniPCMultistepScheduler`` ->
    ``unipc`` (``order=solver_order``, ``variant=solver_type``).  The scheduler's lower-order
    final steps (``lower_order_final``, ``euler_at_final``, a zero final sigma) become our
    ``lower_order_final`` and ``final_denoise``.  diffusers has no step-ratio rule, so the
    multistep methods get ``min_gap_ratio=0`` (scoresde's default lowers the order where a
    history gap is short against the step, e.g. at the long last steps of a time-uniform grid).

    **Raises:** ``ValueError`` for an option no scoresde solver reproduces (thresholding, DDIM
    ``clip_sample``, DPM-Solver ``solver_order=3`` or a non-``dpmsolver++`` algorithm, UniPC
    ``predict_x0=False``, ``disable_corrector``, ``solver_p``, ...), plus those of
    :func:`timesteps_from`.
    """
    times, final_denoise, kind, cfg, _ = _grid(scheduler)
    if cfg.get("thresholding", False):
        raise ValueError(f"{kind} with thresholding=True clips the predicted x0 at every step; not reproduced")
    if kind == "DDIMScheduler":
        method, opts = _ddim_options(cfg)
    elif kind == "DPMSolverMultistepScheduler":
        method, opts = _dpm_options(cfg, final_denoise, times.numel() - 1)
    else:
        method, opts = _unipc_options(scheduler, cfg, final_denoise)
    return {"method": method, "timesteps": times, "final_denoise": final_denoise, **opts}


def _ddim_options(cfg: Any) -> tuple[str, dict]:
    if cfg.get("clip_sample", False):
        raise ValueError("DDIMScheduler with clip_sample=True clamps the predicted x0 to "
                         "[-clip_sample_range, clip_sample_range] at every step; not reproduced: create it with "
                         "clip_sample=False")
    return "ddim", {}


def _dpm_options(cfg: Any, final_denoise: bool, intervals: int) -> tuple[str, dict]:
    algorithm = cfg.get("algorithm_type", "dpmsolver++")
    if algorithm != "dpmsolver++":
        raise ValueError(f"DPMSolverMultistepScheduler with algorithm_type={algorithm!r} is not reproduced; "
                         "use algorithm_type='dpmsolver++'")
    order = int(cfg.get("solver_order", 2))
    if order == 1:
        return "ddim", {}
    if order != 2:
        raise ValueError(f"DPMSolverMultistepScheduler with solver_order={order} is not reproduced (its third-order "
                         "update weights the second difference differently from scoresde's dpmpp_3m, which "
                         "integrates the quadratic interpolant exactly); use solver_order=2")
    if final_denoise:            # its last step (to sigma = 0) is the final denoise; the one before has order 2
        lower = False
    else:                        # its last step is first order with euler_at_final, or lower_order_final below 15 steps
        lower = bool(cfg.get("euler_at_final", False)) or (bool(cfg.get("lower_order_final", True)) and intervals < 15)
    return "dpmpp_2m", {"solver_type": cfg.get("solver_type", "midpoint"), "lower_order_final": lower,
                        "min_gap_ratio": 0.0}


def _unipc_options(scheduler: Any, cfg: Any, final_denoise: bool) -> tuple[str, dict]:
    if not cfg.get("predict_x0", True):
        raise ValueError("UniPCMultistepScheduler with predict_x0=False (noise prediction) is not reproduced; "
                         "scoresde's unipc works in data prediction")
    if getattr(scheduler, "solver_p", None) is not None or cfg.get("solver_p") is not None:
        raise ValueError("UniPCMultistepScheduler with solver_p (another predictor) is not reproduced")
    if list(cfg.get("disable_corrector", []) or []):
        raise ValueError("UniPCMultistepScheduler with disable_corrector is not reproduced (scoresde's "
                         "use_corrector applies to every step)")
    order = int(cfg.get("solver_order", 2))
    lower = bool(cfg.get("lower_order_final", True))
    if final_denoise and order > 1:
        if not lower:
            raise ValueError("UniPCMultistepScheduler with final_sigmas_type='zero' needs lower_order_final=True "
                             "(its last step to sigma = 0 is otherwise undefined)")
        if order > 2:
            raise ValueError("UniPCMultistepScheduler with solver_order=3 and final_sigmas_type='zero' is not "
                             "reproduced (its second-to-last step has order 2); use final_sigmas_type='sigma_min'")
        lower = False            # its last step (to sigma = 0) is the final denoise
    return "unipc", {"order": order, "variant": cfg.get("solver_type", "bh2"), "lower_order_final": lower,
                     "min_gap_ratio": 0.0}
