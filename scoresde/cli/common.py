"""Pieces shared by the verbs of the ``scoresde`` command: exit status, argument types,
error text, device and SDE choice, checkpoint loading, the ``resume with:`` line."""
from __future__ import annotations

import argparse
import errno
import json
import math
import shlex
from typing import Sequence

import torch

from .._runs import RunError

#: Exit status of an interrupted run (EX_TEMPFAIL): resume it.
EXIT_INTERRUPTED = 75
#: ``train --sde`` choices: the registry's short names (a discrete schedule comes from a checkpoint or diffusers)
_SDE_NAMES = ("vp", "subvp", "ve", "cosine", "edm", "rf")


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


def _error_text(err: BaseException) -> str:
    """One line for an error the command reports without a traceback: the message of a
    RunError, ValueError or TypeError; for a failed read or write the file and the reason."""
    if isinstance(err, FileNotFoundError):
        return f"{type(err).__name__}: {err}"
    if isinstance(err, OSError):
        where = f" ({err.filename})" if err.filename else ""
        hint = ("; free some space (or raise the file size limit) and run the same command with --resume"
                if err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else "")
        return f"{type(err).__name__}: {err.strerror or err}{where}{hint}"
    return str(err)


def _finite_float(text: str) -> float:
    """argparse type: a finite float (NaN and infinities are refused at parse time)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _parse_options(items: Sequence[str] | None) -> dict:
    """``key=value`` pairs; values parsed as JSON when they can be (numbers, true, null)."""
    out: dict = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RunError(f"--option expects key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _make_sde(args: argparse.Namespace):
    """The ``--sde`` of ``train`` from the SDE registry: VP/sub-VP take ``--beta-min/--beta-max``,
    VE/EDM the ``--sigma-min/--sigma-max`` that were given (else the class defaults)."""
    import scoresde
    if args.sde in ("vp", "subvp"):
        return scoresde.make_sde(args.sde, beta_min=args.beta_min, beta_max=args.beta_max)
    sigmas = {k: v for k, v in (("sigma_min", args.sigma_min), ("sigma_max", args.sigma_max)) if v is not None}
    return scoresde.make_sde(args.sde, **(sigmas if args.sde in ("ve", "edm") else {}))


def _device(name: str, local_rank: int = 0) -> torch.device:
    """The torch device of ``--device NAME`` (cpu, cuda, cuda:K or auto)."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise RunError(f"--device {name}: expected cpu, cuda, cuda:K or auto (a device that computes "
                       "numbers; 'meta' and other kinds are not supported)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError("--device cuda was asked for but CUDA is not available")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def _resume_command(prog: str, argv: Sequence[str], world: int, sim: bool, seed: int | None = None) -> str:
    tokens = [a for a in argv if a != "--overwrite"]
    if "--resume" not in tokens:
        tokens.append("--resume")
    if seed is not None and "--seed" not in tokens:
        tokens += ["--seed", str(seed)]
    cmd = f"{prog} {shlex.join(tokens)}"
    if world > 1 and not sim:
        cmd += f"   (under the same launcher, e.g. torchrun --nproc_per_node={world} -m scoresde ...)"
    return cmd


def _load_model(args: argparse.Namespace, dtype: torch.dtype, device: torch.device):
    from ..checkpoint import load_checkpoint
    from ..model import ScoreModel
    from ..nets import FixedBatch
    model, cfg = load_checkpoint(args.checkpoint, weights=args.weights, map_location=device, dtype=dtype)
    net = FixedBatch(model.net, args.micro_batch).eval()
    wrapped = ScoreModel(net, model.sde, model.prediction, sigma_data=model.sigma_data, time_input=model.time_input)
    return wrapped, cfg


def _data_shape(cfg: dict, override: Sequence[int] | None) -> list[int]:
    if override:
        return [int(v) for v in override]
    shape = (cfg.get("data") or {}).get("shape")
    if shape:
        return [int(v) for v in shape]
    net = cfg.get("net", {})
    if net.get("class") == "MLPScoreNet":
        return [int(net["dim"])]
    raise RunError("the checkpoint does not record the data shape; pass --shape C H W")
