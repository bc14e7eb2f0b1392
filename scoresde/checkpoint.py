r"""Checkpoints: a state dict plus a JSON config, written atomically, loaded without pickle.

A checkpoint is one torch file holding only ``weights_only``-safe values::

    {"format": "scoresde-checkpoint", "version": 1,
     "config": "<JSON text>",              # net, sde, prediction, time_input, sigma_data, data, train
     "state_dict": {...tensors...},        # the weights used for sampling (EMA when trained with EMA)
     "raw_state_dict": {...} (optional),   # the raw (non-EMA) weights
     "train_state": {...} (optional)}      # optimizer state, step, RNG state, to resume training

:func:`save_checkpoint` writes it atomically (temp file in the same folder, fsync, rename).
:func:`load_checkpoint` refuses, with a clear error and without executing anything:

- a missing file: ``FileNotFoundError`` naming the path (never random weights);
- a truncated, corrupt or non-torch file: ``ValueError`` naming the path, its size and sha256;
- a pickle that would run code: ``torch.load(weights_only=True)`` refuses its globals before
  anything is called (``ValueError``);
- a config value out of bounds (a size, the depth, the channels, the data shape, a
  non-finite number): :class:`CheckpointError` naming the key, before anything is built;
- a state dict whose keys or shapes do not match the config's network: ``ValueError`` listing
  the missing and unexpected keys (strict loading).  The comparison uses the network built
  on the ``meta`` device (shapes only, no memory), so a config that lies about the network's
  size costs nothing; the real network is built only once the shapes agree;
- an SDE config that cannot be sampled (e.g. ``alpha(t_end) = 0``): :class:`CheckpointError`.

Network and SDE classes are rebuilt only from the known registries (:data:`scoresde.nets.NETS`,
:data:`SDE_CLASSES`): a checkpoint never names code to import.
"""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import warnings
from typing import Any

import torch
from torch import nn

from . import sde as _sde
from ._runs import atomic_write_bytes, sha256_file
from .model import Prediction, ScoreModel
from .nets import build_net

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint", "sde_from_config", "check_config",
           "SDE_CLASSES", "NET_LIMITS", "FORMAT", "CheckpointError"]

FORMAT = "scoresde-checkpoint"

#: SDE classes a config may name (by class name), with the constructor arguments their
#: ``config()`` records: the registry of :mod:`scoresde.sde`.
SDE_CLASSES = _sde.SDE_CLASSES


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely (corrupt, malicious, mismatched)."""


def sde_from_config(config: dict) -> _sde.LinearSDE:
    """Rebuild a built-in SDE from its ``config()`` dict (ValueError for anything else)."""
    if not isinstance(config, dict) or config.get("class") not in SDE_CLASSES:
        known = ", ".join(SDE_CLASSES)
        raise ValueError(f"sde config must name one of {known}; got {config!r}")
    kwargs = {k: v for k, v in config.items() if k != "class"}
    try:
        return SDE_CLASSES[config["class"]](**kwargs)
    except (TypeError, ArithmeticError) as err:
        raise ValueError(f"bad arguments for {config['class']}: {err}") from err


def _check_sde_usable(sde: _sde.SDE) -> None:
    """ValueError unless the sampling interval ``[default_t_end, T]`` has finite, positive
    ``sigma`` and ``alpha(t_end) > 0`` (e.g. VPSDE(T=1e9) has alpha(t_end) = 0: pure noise)."""
    t_end, T = float(sde.default_t_end), float(sde.T)
    if not (math.isfinite(t_end) and math.isfinite(T) and 0 <= t_end < T):
        raise ValueError(f"its time interval [t_end={t_end:g}, T={T:g}] is not a finite interval")
    if isinstance(sde, _sde.LinearSDE):
        alpha, sigma_end, sigma_T = (float(v) for v in (sde.alpha(t_end), sde.sigma(t_end), sde.sigma(T)))
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha(t_end={t_end:g}) = {alpha:g}: the data end of the interval is pure noise")
        if not all(math.isfinite(v) and v > 0 for v in (sigma_end, sigma_T)):
            raise ValueError(f"sigma is not finite and positive on [t_end, T] (sigma(t_end) = {sigma_end:g}, "
                             f"sigma(T) = {sigma_T:g})")
    prior = float(sde.prior_std)
    if not (math.isfinite(prior) and prior > 0):
        raise ValueError(f"prior_std = {prior:g} is not finite and positive")


#: Bounds on the sizes a checkpoint's network config may ask for: far above any network this
#: package trains, low enough that building the network on the meta device is instant.
NET_LIMITS = {"dim": 1 << 24, "hidden": 1 << 16, "depth": 1024, "emb_dim": 1 << 16, "in_channels": 1 << 12,
              "channels": 1 << 14, "num_res_blocks": 64, "groups": 1 << 12}
_MAX_LEVELS, _MAX_MULT = 16, 64
#: Largest data shape (elements per sample) a config may record.
MAX_SAMPLE_NUMEL = 1 << 26


def _bad(path: str, key: str, value: Any, expected: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path}: config value {key}={value!r} is out of bounds (expected {expected})")


def _check_int(path: str, key: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _bad(path, key, value, f"an integer in [{low}, {high}]")


def _check_number(path: str, key: str, value: Any, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (positive and value <= 0):
        raise _bad(path, key, value, "a finite positive number" if positive else "a finite number")


def check_config(config: dict, path: str = "<config>") -> None:
    """Bounds on every config value that sizes an allocation or enters the arithmetic (net
    sizes and depth, channel multipliers, data shape, sigma_data, SDE numbers), before
    anything is built; :class:`CheckpointError` naming the key."""
    net = config.get("net")
    if not isinstance(net, dict):
        raise CheckpointError(f"checkpoint {path}: config has no net section (got {net!r})")
    for key, high in NET_LIMITS.items():
        if key in net:
            _check_int(path, f"net.{key}", net[key], 1, high)
    if "channel_mults" in net:
        mults = net["channel_mults"]
        if not isinstance(mults, list) or not 1 <= len(mults) <= _MAX_LEVELS:
            raise _bad(path, "net.channel_mults", mults, f"a list of 1 to {_MAX_LEVELS} integers")
        for i, m in enumerate(mults):
            _check_int(path, f"net.channel_mults[{i}]", m, 1, _MAX_MULT)
    for key in ("time_scale", "dropout"):
        if key in net and net[key] is not None:
            _check_number(path, f"net.{key}", net[key])
    if "seed" in net:
        _check_int(path, "net.seed", net["seed"], 0, (1 << 63) - 1)
    shape = (config.get("data") or {}).get("shape") if isinstance(config.get("data"), dict) else None
    if shape is not None:
        if not isinstance(shape, list) or not 1 <= len(shape) <= 4:
            raise _bad(path, "data.shape", shape, "a list of 1 to 4 sizes")
        for v in shape:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise _bad(path, "data.shape", shape, "positive integer sizes")
        if math.prod(shape) > MAX_SAMPLE_NUMEL:
            raise _bad(path, "data.shape", shape, f"at most {MAX_SAMPLE_NUMEL} elements per sample")
        if net.get("class") == "MLPScoreNet" and shape != [net.get("dim")]:
            raise _bad(path, "data.shape", shape, f"[net.dim] = [{net.get('dim')}]")
        if net.get("class") == "UNet" and (len(shape) != 3 or shape[0] != net.get("in_channels")):
            raise _bad(path, "data.shape", shape, f"[net.in_channels={net.get('in_channels')}, H, W]")
    if "sigma_data" in config:
        _check_number(path, "sigma_data", config["sigma_data"], positive=True)
    sde = config.get("sde")
    if isinstance(sde, dict):
        for key, value in sde.items():
            if key == "class":
                continue
            values = value if isinstance(value, list) else [value]
            if isinstance(value, list) and len(value) > 1_000_000:
                raise _bad(path, f"sde.{key}", f"<{len(value)} values>", "at most 1000000 values")
            for v in values:
                if v is not None:
                    _check_number(path, f"sde.{key}", v)


def _plain_state(module: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def save_checkpoint(path: str | os.PathLike, net: nn.Module, sde: _sde.SDE, prediction: str = "eps", *,
                    time_input: str = "t", sigma_data: float = 0.5, ema: nn.Module | None = None,
                    extra: dict | None = None, train_state: dict | None = None) -> None:
    """Write a checkpoint of ``net`` (needs ``config()``, e.g. :mod:`scoresde.nets`) for ``sde``
    and ``prediction`` atomically to ``path``.  With ``ema`` the EMA weights become
    ``state_dict`` and the raw ones ``raw_state_dict``.  ``extra``: JSON-serialisable
    information (data, training settings) stored in the config."""
    if not hasattr(net, "config"):
        raise TypeError(f"net must have a config() method (a scoresde.nets network), got {type(net).__name__}")
    if callable(time_input):
        raise TypeError("time_input must be a name for a checkpoint (a function cannot be saved)")
    config = {"net": net.config(), "sde": sde.config(), "prediction": Prediction.parse(prediction).value,
              "time_input": time_input, "sigma_data": float(sigma_data), **(extra or {})}
    text = json.dumps(config, sort_keys=True, allow_nan=False)
    payload: dict[str, Any] = {"format": FORMAT, "version": 1, "config": text,
                               "state_dict": _plain_state(ema if ema is not None else net)}
    if ema is not None:
        payload["raw_state_dict"] = _plain_state(net)
    if train_state is not None:
        payload["train_state"] = train_state
    buf = io.BytesIO()
    torch.save(payload, buf)
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    atomic_write_bytes(os.fspath(path), buf.getvalue())


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(payload, config)`` of a checkpoint, loaded with ``weights_only=True`` and checked
    for the format; raises FileNotFoundError / :class:`CheckpointError`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} is not a regular file")

    def describe() -> str:
        try:
            return f"{os.path.getsize(path)} bytes, sha256={sha256_file(path)}"
        except OSError:
            return "unreadable"

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # e.g. "Detected pickle protocol 4" for foreign files
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError (forbidden global), RuntimeError (zip), EOFError, ...
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        detail = [ln for ln in lines if "Unsupported" in ln or "unsupported" in ln]
        msg = (detail or lines or [type(err).__name__])[0]
        if "global" in str(err).lower():
            why = ("it holds pickled code or objects that weights_only=True refuses (nothing was executed); "
                   "only load checkpoints you trust, and re-save them as a state dict")
        elif isinstance(err, pickle.UnpicklingError):
            why = ("it is truncated, corrupt, not a torch file, or a pickle that weights_only=True refuses "
                   "(nothing was executed)")
        else:
            why = "it is truncated, corrupt or not a torch file"
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {why} ({type(err).__name__}: {msg}); "
                              f"{describe()}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a scoresde checkpoint (no format={FORMAT!r} entry); "
                              f"{describe()}")
    try:
        config = json.loads(payload["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} has no readable JSON config ({err})") from None
    if not isinstance(payload.get("state_dict"), dict):
        raise CheckpointError(f"checkpoint {path} has no state_dict")
    return payload, config


def load_checkpoint(path: str | os.PathLike, *, weights: str = "default", map_location: Any = "cpu",
                    dtype: torch.dtype | None = None) -> tuple[ScoreModel, dict]:
    """``(model, config)`` from a checkpoint: the network rebuilt from its config, weights
    loaded strictly, in eval mode, wrapped in a :class:`ScoreModel` with the stored SDE,
    prediction, time input and sigma_data.

    ``weights``: ``"default"`` (``state_dict``: the EMA weights when trained with EMA),
    ``"ema"`` (requires EMA) or ``"raw"`` (the non-EMA weights; ``state_dict`` if there is no
    EMA).  ``config["weights_used"]`` records the choice."""
    payload, config = read_checkpoint(path)
    path = os.fspath(path)
    has_raw = isinstance(payload.get("raw_state_dict"), dict)
    if weights not in ("default", "ema", "raw"):
        raise ValueError(f"weights must be 'default', 'ema' or 'raw', got {weights!r}")
    if weights == "ema" and not has_raw:
        raise CheckpointError(f"checkpoint {path} has no EMA weights (trained without EMA); use weights='raw'")
    if weights == "raw" and has_raw:
        state, used = payload["raw_state_dict"], "raw"
    else:
        state, used = payload["state_dict"], ("ema" if has_raw else "raw")
    check_config(config, path)
    try:
        with torch.device("meta"):             # shapes only: a lying config allocates nothing
            skeleton = build_net(config["net"])
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path}: bad net config ({err})") from None
    try:
        sde = sde_from_config(config.get("sde"))
        _check_sde_usable(sde)
    except (ValueError, TypeError, ArithmeticError) as err:
        raise CheckpointError(f"checkpoint {path}: bad sde config {config.get('sde')!r}: {err}") from None
    own = skeleton.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    bad_shapes = [f"{k}: {list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__} stored, "
                  f"{list(own[k].shape)} in the config's network" for k, v in state.items()
                  if k in own and (not isinstance(v, torch.Tensor) or v.shape != own[k].shape)]
    if missing or unexpected or bad_shapes:
        raise CheckpointError(
            f"checkpoint {path}: its config does not match the stored tensors: "
            f"missing keys {missing[:20]}, unexpected keys {unexpected[:20]}"
            + (f", shape mismatches {bad_shapes[:20]}" if bad_shapes else "")
            + f" (config net: {json.dumps(config['net'], sort_keys=True)})")
    del skeleton
    try:
        net = build_net(config["net"])
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path}: bad net config ({err})") from None
    net.load_state_dict(state, strict=True)
    net = net.to(map_location)
    if dtype is not None:
        net = net.to(dtype)
    net.eval()
    try:
        model = ScoreModel(net, sde, config.get("prediction", "eps"), sigma_data=config.get("sigma_data", 0.5),
                           time_input=config.get("time_input", "t"))
    except (ValueError, TypeError) as err:   # prediction or time_input not a known name
        raise CheckpointError(f"checkpoint {path}: bad config ({err})") from None
    return model, {**config, "weights_used": used}
