"""``scoresde train``: fit a score network with denoising score matching; writes a checkpoint."""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .. import _runs
from .._runs import RunError, eprint
from .common import EXIT_INTERRUPTED, _device, _make_sde, _resume_command
from .dist import _Stop


def _lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    frac = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))


def _nonfinite_tensor(net: torch.nn.Module, ema: torch.nn.Module | None) -> str | None:
    """The name of the first parameter or buffer with a NaN or infinity (``ema.`` for the
    EMA copy), or None."""
    for prefix, module in (("", net), ("ema.", ema)):
        if module is None:
            continue
        for name, tensor in (*module.named_parameters(), *module.named_buffers()):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return f"{prefix}{name}"
    return None


@dataclass
class _Training:
    """What one training run works on (built by :func:`_setup`)."""

    out: str
    device: torch.device
    generator: torch.Generator
    toy: bool
    levels: torch.Tensor | None      # digits: integer levels, dequantized afresh on every batch
    data: torch.Tensor | None        # a data file's rows
    shape: list
    sde: Any
    net: torch.nn.Module
    model: Any
    loss_fn: Any
    opt: torch.optim.Optimizer
    ema: torch.nn.Module | None
    train_cfg: dict
    saved: int | None = None         # the step of the checkpoint now at --out (written or resumed)


def _check_out(args: argparse.Namespace) -> str:
    out = os.path.abspath(args.out)
    if os.path.isdir(out):
        raise RunError(f"--out {out} is a directory; give a checkpoint file path such as {out}/model.pt")
    if os.path.exists(out) and not (args.overwrite or args.resume):
        raise RunError(f"{out} already exists; pass --resume to continue training it or --overwrite to replace it")
    _runs.preflight_dir(os.path.dirname(out), 64 << 20)
    if args.steps < 1 or args.batch_size < 1:
        raise RunError("--steps and --batch-size must be >= 1")
    return out


def _load_training_data(args: argparse.Namespace):
    """``(toy, levels, data, shape)``: a toy set is drawn afresh every batch; digits are kept as
    integer levels; a data file is loaded once."""
    from ..data import digits_levels, digits_split, is_toy, load_data
    if is_toy(args.data):
        return True, None, None, [2]
    if digits_split(args.data) is not None:
        levels = digits_levels(digits_split(args.data))
        if args.n_data is not None:
            if not 1 <= args.n_data <= levels.shape[0]:
                raise RunError(f"--n-data must be in 1..{levels.shape[0]} for {args.data}, got {args.n_data}")
            levels = levels[:args.n_data]
        return False, levels, None, list(levels.shape[1:])
    data = load_data(args.data, n=args.n_data, dtype=torch.float32)
    return False, None, data, list(data.shape[1:])


def _build_net(args: argparse.Namespace, shape: list) -> torch.nn.Module:
    from ..nets import MLPScoreNet, UNet
    kind = args.net
    if kind == "auto":
        kind = "mlp" if len(shape) == 1 else "unet"
    if kind == "mlp":
        if len(shape) != 1:
            raise RunError(f"--net mlp needs flat data [N, D]; the data have shape [N, {', '.join(map(str, shape))}]")
        return MLPScoreNet(shape[0], hidden=args.hidden, depth=args.depth, embedding=args.embedding,
                           seed=args.seed)
    if len(shape) != 3:
        raise RunError(f"--net unet needs images [N, C, H, W]; the data have shape [N, {', '.join(map(str, shape))}]")
    return UNet(shape[0], channels=args.channels, embedding=args.embedding, seed=args.seed)


def _setup(args: argparse.Namespace, out: str) -> _Training:
    from ..losses import DSMLoss
    from ..model import ScoreModel
    device = _device(args.device)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    toy, levels, data, shape = _load_training_data(args)
    sde = _make_sde(args)
    net = _build_net(args, shape).to(device)
    model = ScoreModel(net, sde, args.prediction, time_input=args.time_input)
    loss_fn = DSMLoss(weighting=args.weighting, time_sampling=args.time_sampling, t_min=args.t_min)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    ema = copy.deepcopy(net).eval() if args.ema > 0 else None
    if ema is not None:
        for p in ema.parameters():
            p.requires_grad_(False)
    train_cfg = {"data": args.data, "n_data": args.n_data, "seed": args.seed, "batch_size": args.batch_size,
                 "lr": args.lr, "lr_schedule": args.lr_schedule, "warmup": args.warmup, "ema": args.ema,
                 "weighting": args.weighting, "time_sampling": loss_fn.sampling, "t_min": args.t_min,
                 "grad_clip": args.grad_clip}
    return _Training(out, device, g, toy, levels, data, shape, sde, net, model, loss_fn, opt, ema, train_cfg)


def _resume(args: argparse.Namespace, tr: _Training) -> int:
    """Restore weights, EMA, optimizer and random states from the checkpoint at --out (after
    checking that the configuration is the same); the step to continue from."""
    from ..checkpoint import load_checkpoint, read_checkpoint
    out = tr.out
    payload, cfg = read_checkpoint(out)
    old = {k: v for k, v in cfg.get("train", {}).items() if k not in ("steps", "step")}
    diff = _runs.config_diff(old, tr.train_cfg, "train.", "checkpoint") + _runs.config_diff(
        {"net": cfg.get("net"), "sde": cfg.get("sde"), "prediction": cfg.get("prediction"),
         "time_input": cfg.get("time_input")},
        {"net": tr.net.config(), "sde": tr.sde.config(), "prediction": tr.model.prediction.value,
         "time_input": args.time_input}, "", "checkpoint")
    if diff:
        raise RunError(f"refusing to resume training {out}: the configuration differs:\n  " + "\n  ".join(diff))
    state = payload.get("train_state")
    if not isinstance(state, dict):
        raise RunError(f"{out} holds no training state (saved without it); cannot resume training")
    loaded, _ = load_checkpoint(out, weights="raw", map_location=tr.device)
    tr.net.load_state_dict(loaded.net.state_dict())
    if tr.ema is not None:
        tr.ema.load_state_dict(payload["state_dict"])
    tr.opt.load_state_dict(state["optimizer"])
    tr.generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    start = int(state["step"])
    if not args.quiet:
        eprint(f"resuming training of {out} at step {start}")
    return start


def _diverged(args: argparse.Namespace, tr: _Training, step: int, what: str) -> RunError:
    out = tr.out
    kept = (f"{out} keeps the checkpoint of step {tr.saved}" if tr.saved is not None else
            f"{out} was left as it was" if os.path.exists(out) else f"nothing was written to {out}")
    return RunError(f"training diverged at step {step} of {args.steps}: {what}; stopped without saving ({kept}). "
                    f"Lower --lr (now {args.lr:g}) or --grad-clip (now {args.grad_clip:g})")


def _save(args: argparse.Namespace, tr: _Training, step: int) -> None:
    """Write the checkpoint of ``step`` (with the training state), unless a weight is not finite."""
    from ..checkpoint import save_checkpoint
    bad = _nonfinite_tensor(tr.net, tr.ema)
    if bad:
        raise _diverged(args, tr, step, f"non-finite values in {bad}")
    extra = {"data": {"spec": args.data, "shape": tr.shape, "toy": tr.toy},
             "train": {**tr.train_cfg, "steps": args.steps, "step": step}}
    state = {"step": step, "optimizer": tr.opt.state_dict(), "generator": tr.generator.get_state(),
             "torch_rng": torch.get_rng_state()}
    save_checkpoint(tr.out, tr.net, tr.sde, args.prediction, time_input=args.time_input, ema=tr.ema, extra=extra,
                    train_state=state)
    tr.saved = step


def _batch(args: argparse.Namespace, tr: _Training) -> torch.Tensor:
    from ..data import digits_dequantize, toy_sample
    g = tr.generator
    if tr.toy:
        return toy_sample(args.data, args.batch_size, g).to(tr.device)
    if tr.levels is not None:
        return digits_dequantize(tr.levels[torch.randint(tr.levels.shape[0], (args.batch_size,), generator=g)],
                                 g).to(tr.device)
    idx = torch.randint(tr.data.shape[0], (args.batch_size,), generator=g)
    return tr.data[idx].to(tr.device)


def _train_step(args: argparse.Namespace, tr: _Training, step: int) -> float:
    """One optimizer step (and EMA update) at 0-based ``step``; the loss before it."""
    x0 = _batch(args, tr)
    for group in tr.opt.param_groups:
        group["lr"] = args.lr * _lr_factor(step, args.steps, args.warmup, args.lr_schedule)
    loss = tr.loss_fn(tr.model, x0, tr.generator)
    val = float(loss.detach())
    if not math.isfinite(val):      # stop before the step spreads it into the weights
        raise _diverged(args, tr, step + 1, f"loss = {val}")
    tr.opt.zero_grad(set_to_none=True)
    loss.backward()
    if args.grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(tr.net.parameters(), args.grad_clip))
        if not math.isfinite(grad_norm):
            raise _diverged(args, tr, step + 1, f"gradient norm = {grad_norm} (loss {val:.6g})")
    tr.opt.step()
    if tr.ema is not None:
        decay = min(args.ema, (1.0 + step) / (10.0 + step))   # warm-up: early weights fade fast
        with torch.no_grad():
            for pe, p in zip(tr.ema.parameters(), tr.net.parameters()):
                pe.lerp_(p, 1.0 - decay)
            for be, b in zip(tr.ema.buffers(), tr.net.buffers()):
                be.copy_(b)
    return val


def _progress_bar(args: argparse.Namespace, start: int):
    if args.quiet:
        return None
    try:
        from tqdm import tqdm
        return tqdm(total=args.steps, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
    except ImportError:
        return None


def _loop(args: argparse.Namespace, tr: _Training, start: int, stop: _Stop) -> tuple[int, float | None]:
    """Steps ``start .. --steps`` (saving every --save-every), or up to the step in which a
    signal arrived; the number of steps done and the loss's moving average."""
    bar = _progress_bar(args, start)
    avg = None
    step = start
    tr.net.train()
    try:
        for step in range(start, args.steps):
            val = _train_step(args, tr, step)
            avg = val if avg is None else 0.98 * avg + 0.02 * val
            if bar is not None:
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{avg:.4g}")
            if args.save_every and (step + 1) % args.save_every == 0:
                _save(args, tr, step + 1)
            if stop.flag:
                step += 1
                break
        else:
            step = args.steps
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
    return step, avg


def cmd_train(args: argparse.Namespace, argv: Sequence[str], prog: str) -> int:
    out = _check_out(args)
    tr = _setup(args, out)
    start = 0
    if args.resume and os.path.exists(out):
        start = _resume(args, tr)
    tr.saved = start if start else None
    stop = _Stop()
    stop.install(announce=not args.quiet)
    t0 = time.time()
    step, avg = _loop(args, tr, start, stop)
    _save(args, tr, step)
    wall = time.time() - t0
    if stop.flag and step < args.steps:
        eprint(f"scoresde train: interrupted by {stop.signame} at step {step} of {args.steps}; checkpoint saved "
               f"to {out}")
        eprint(f"resume with: {_resume_command(prog, argv, 1, False)}")
        return EXIT_INTERRUPTED
    if not args.quiet:
        print(json.dumps({"command": "train", "checkpoint": out, "steps": step, "wall_s": round(wall, 2),
                          "loss_ema": avg, "weighting": args.weighting, "prediction": args.prediction,
                          "sde": tr.sde.config()}, indent=2, sort_keys=True))
    return 0
