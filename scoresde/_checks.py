"""Input validation and broadcasting helpers shared by the whole package.

Every public entry point validates its arguments once, at the boundary, with
``if ...: raise`` and a message that names the argument, the value received and
what was expected.  Inner loops never validate.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "append_dims",
    "check_finite_tensor",
    "check_floating",
    "check_positive_float",
    "check_int",
    "as_float64_time",
    "time_vector",
]


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dimensions so that ``v`` (shape ``[B]`` or ``[]``)
    broadcasts against a tensor of rank ``ndim`` along its first (batch) axis.

    Raises ``ValueError`` if ``v`` already has more dimensions than ``ndim``
    (k-diffusion's ``append_dims`` guard against silent mis-broadcasting).
    """
    extra = ndim - v.ndim
    if extra < 0:
        raise ValueError(f"append_dims: tensor of rank {v.ndim} cannot be broadcast to rank {ndim}")
    if v.ndim == 0:
        return v
    return v.reshape(v.shape + (1,) * extra)


def check_floating(x: Any, name: str = "x") -> Tensor:
    """TypeError unless ``x`` is a floating-point tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must be floating point, got {x.dtype} (scale data to the model's range first)"
        )
    return x


def sample_list(idx: list[int], limit: int = 10) -> str:
    """``"samples [i, j, ...]"`` for a message: the first ``limit`` indices, then the count."""
    more = "" if len(idx) <= limit else f", ... ({len(idx)} samples)"
    return f"samples {idx[:limit]}{more}"


def bad_samples(bad: Tensor) -> list[int]:
    """Indices of the samples (rows) with any True entry in ``bad`` (shaped ``[B, ...]``)."""
    per_sample = bad.reshape(bad.shape[0], -1).any(dim=1) if bad.ndim > 1 else bad
    return torch.nonzero(per_sample).flatten().tolist()


def _bad_sample_list(bad: Tensor) -> str:
    return "" if bad.ndim == 0 else f" ({sample_list(bad_samples(bad))})"


def check_finite_tensor(x: Tensor, name: str = "x") -> Tensor:
    """ValueError if ``x`` holds NaN or Inf, with the count and the offending samples."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        n = int(bad.sum())
        raise ValueError(f"{name} has {n} non-finite values{_bad_sample_list(bad)}")
    return x


def check_batch_tensor(x: Any, name: str = "x") -> Tensor:
    """A dense floating tensor with data (not on the ``meta`` device), a batch dimension, a
    dtype its device supports, and finite values: the common check on a solver's or
    likelihood's input state."""
    check_floating(x, name)
    if x.device.type == "meta":
        raise ValueError(f"{name} is on the meta device, which holds no values; pass a tensor on "
                         "cpu or an accelerator (e.g. torch.randn(shape, device='cuda'))")
    if x.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {x.layout}; "
                         f"use {name}.to_dense()")
    if x.ndim < 1:
        raise ValueError(f"{name} must have a batch dimension (shape [B, ...]), got a 0-d tensor")
    if x.dtype == torch.float64 and x.device.type == "mps":
        raise ValueError(f"{name} is float64 on mps, which does not support float64; use float32")
    return check_finite_tensor(x, name)


def check_int(value: Any, name: str, minimum: int | None = None) -> int:
    """TypeError unless ``value`` is an int (bool rejected); ValueError below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _as_python_float(value: Any, name: str) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise TypeError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
        if value.requires_grad:
            raise ValueError(f"{name} must not require grad")
        if value.device.type == "meta":
            raise ValueError(f"{name} is on the meta device, which holds no value; pass a number")
        return float(value.detach())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    return float(value)


def check_float(value: Any, name: str, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> float:
    """Convert ``value`` to a finite Python float inside the given range, or raise."""
    v = _as_python_float(value, name)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if low is not None and (v < low or (low_open and v == low)):
        op = ">" if low_open else ">="
        raise ValueError(f"{name} must be {op} {low}, got {v}")
    if high is not None and (v > high or (high_open and v == high)):
        op = "<" if high_open else "<="
        raise ValueError(f"{name} must be {op} {high}, got {v}")
    return v


def check_positive_float(value: Any, name: str) -> float:
    """A finite float > 0, or ValueError/TypeError naming ``name``."""
    return check_float(value, name, low=0.0, low_open=True)


def as_float64_time(t: Any, name: str = "t") -> Tensor:
    """A time argument (float, int, 0-d or 1-d tensor, list) as a float64 tensor,
    keeping its shape; TypeError for other types, ValueError if non-finite.

    A tensor time is not detached: schedules and exact flows evaluated at a time that
    requires grad are differentiable in that time (d alpha/dt, d flow/dt by autograd)."""
    if isinstance(t, bool):
        raise TypeError(f"{name} must be a float or a tensor, got a bool")
    if isinstance(t, Tensor):
        if t.is_complex():
            raise TypeError(f"{name} must be real, got {t.dtype}")
        t64 = t.to(torch.float64)
    elif isinstance(t, numbers.Real):
        t64 = torch.tensor(float(t), dtype=torch.float64)
    elif isinstance(t, (list, tuple)):
        try:
            t64 = torch.tensor([float(v) for v in t], dtype=torch.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must hold numbers, got {t!r}") from err
    else:
        raise TypeError(f"{name} must be a float or a tensor, got {type(t).__name__}")
    if not bool(torch.isfinite(t64).all()):
        bad = torch.nonzero(~torch.isfinite(t64.reshape(-1))).flatten().tolist()
        raise ValueError(f"{name} must be finite, got non-finite values at index {bad[:10]}")
    return t64


def time_vector(t: Any, batch: int, name: str = "t") -> Tensor:
    """A time argument as a float64 vector of shape ``[batch]``.

    Accepts a Python number, a 0-d tensor (broadcast to every sample) or a 1-d
    tensor of length ``batch``.  A ``[B, 1]`` tensor, or a 1-d tensor of another
    length, is a ValueError: times are never broadcast against a trailing axis.
    """
    t64 = as_float64_time(t, name)
    if t64.ndim == 0:
        return t64.expand(batch)
    if t64.ndim != 1 or t64.shape[0] != batch:
        raise ValueError(
            f"{name} must be a float, a 0-d tensor or shape [B]=[{batch}], got {list(t64.shape)}"
        )
    return t64
