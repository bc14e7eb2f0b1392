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
- a state dict whose keys or shapes do not match the config's network: ``ValueError`` listing
  the missing and unexpected keys (strict loading).

Network and SDE classes are rebuilt only from the known registries (:data:`scoresde.nets.NETS`,
:data:`SDE_CLASSES`): a checkpoint never names code to import.
"""
from __future__ import annotations

import io
import json
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

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint", "sde_from_config", "SDE_CLASSES",
           "FORMAT", "CheckpointError"]

FORMAT = "scoresde-checkpoint"

#: SDE classes a config may name, with the constructor arguments their ``config()`` records.
SDE_CLASSES = {
    "VPSDE": _sde.VPSDE, "SubVPSDE": _sde.SubVPSDE, "VESDE": _sde.VESDE, "CosineVPSDE": _sde.CosineVPSDE,
    "EDMSDE": _sde.EDMSDE, "RectifiedFlowSDE": _sde.RectifiedFlowSDE, "DiscreteVPSDE": _sde.DiscreteVPSDE,
}


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
    except TypeError as err:
        raise ValueError(f"bad arguments for {config['class']}: {err}") from err


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
    try:
        net = build_net(config["net"])
        sde = sde_from_config(config["sde"])
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: bad config ({err})") from None
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    bad_shapes = [f"{k}: {list(v.shape)} vs {list(own[k].shape)}" for k, v in state.items()
                  if k in own and (not isinstance(v, torch.Tensor) or v.shape != own[k].shape)]
    if missing or unexpected or bad_shapes:
        raise CheckpointError(
            f"checkpoint {path} does not match its network {config['net'].get('class')}: "
            f"missing keys {missing[:20]}, unexpected keys {unexpected[:20]}"
            + (f", shape mismatches {bad_shapes[:20]}" if bad_shapes else ""))
    net.load_state_dict(state, strict=True)
    net = net.to(map_location)
    if dtype is not None:
        net = net.to(dtype)
    net.eval()
    model = ScoreModel(net, sde, config.get("prediction", "eps"), sigma_data=config.get("sigma_data", 0.5),
                       time_input=config.get("time_input", "t"))
    return model, {**config, "weights_used": used}
