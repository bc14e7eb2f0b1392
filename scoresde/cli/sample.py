"""``scoresde sample``: draw samples from a checkpoint, sharded and resumable."""
from __future__ import annotations

import argparse
import io
import math
import os
from typing import Sequence

import numpy as np
import torch

from .. import _runs
from .._runs import RunError, eprint
from .common import _data_shape, _dtype, _load_model, _parse_options
from .engine import RunOptions, _execute, _finalize_blocks, _Job


class _SampleJob(_Job):
    kind, ext = "sample", "npz"
    outputs = ("samples.npz", "samples.png")

    def __init__(self, args: argparse.Namespace):
        super().__init__()
        self.args = args
        self.plot_data: np.ndarray | None = None      # the training data, next to 2-D samples

    def setup(self, model, shape: list[int], dtype: torch.dtype, device: torch.device) -> None:
        import solvers
        a = self.args
        self.model, self.shape, self.dtype, self.device = model, list(shape), dtype, device
        self.options = _parse_options(a.option)
        solver = solvers.get(a.method, **self.options)
        self.per_unit = bool(getattr(solver, "adaptive", False))   # adaptive: one unit per solve
        self.solvers = solvers

    def _x_T(self, gens: list) -> torch.Tensor:
        prior_std = float(self.model.sde.prior_std)
        z = torch.stack([torch.randn(self.shape, generator=g, dtype=torch.float32) for g in gens])
        return (z.to(self.dtype) * prior_std).to(self.device)

    def _solve(self, ids: list[int]) -> tuple[np.ndarray, int]:
        a = self.args
        gens = [torch.Generator().manual_seed(_runs.unit_seed(self.seed, i)) for i in ids]
        x_T = self._x_T(gens)
        sol = self.solvers.sample(self.model, x_T, a.method, a.steps, schedule=a.schedule, t_end=a.t_end,
                                  generator=gens, final_denoise=a.final_denoise, **self.options)
        return sol.x.detach().cpu().numpy(), sol.nfe

    def compute(self, first: int, last: int):
        a = self.args
        ids = list(range(first, last + 1))
        step = 1 if self.per_unit else a.batch_size
        xs, nfe, status = [], [], []
        for s in range(0, len(ids), step):
            chunk = ids[s:s + step]
            try:
                x, k = self._solve(chunk)
                xs.append(x)
                nfe += [k] * len(chunk)
                status += ["success"] * len(chunk)
            except self.solvers.NonFiniteError as err:
                if a.on_failure == "raise":
                    raise RunError(f"samples {chunk[0]}..{chunk[-1]}: {err} (pass --on-failure record to "
                                   "record such samples and go on)") from None
                for i in chunk:  # isolate the failing samples, each alone (same result as in a batch)
                    try:
                        x, k = self._solve([i])
                        xs.append(x)
                        nfe.append(k)
                        status.append("success")
                    except self.solvers.NonFiniteError:
                        xs.append(np.full((1, *self.shape), np.nan, dtype=np.dtype(str(self.dtype).split(".")[1])))
                        nfe.append(0)
                        status.append("nonfinite")
        x = np.concatenate(xs)
        data = _runs.npz_bytes({"index": np.arange(first, last + 1, dtype=np.int64), "x": x,
                                "nfe": np.asarray(nfe, dtype=np.int64), "status": np.asarray(status, dtype="<U24")})
        return data, nfe, status

    def check(self, path: str, first: int, last: int) -> str | None:
        return _runs.check_npz_shard(path, first, last, self.shape, str(self.dtype).split(".")[1])

    def finalize(self, out: str, blocks: list) -> dict:
        n = self.args.n
        _finalize_blocks(out, blocks, self.ext, self.check, n)
        parts = {"index": [], "x": [], "nfe": [], "status": []}
        for f, l in blocks:
            with np.load(os.path.join(out, _runs.shard_name(f, l, self.ext)), allow_pickle=False) as z:
                for k in parts:
                    parts[k].append(z[k])
        merged = {k: np.concatenate(v) for k, v in parts.items()}
        if not np.array_equal(merged["index"], np.arange(n)):
            raise RunError("merged indices are not 0..N-1 exactly once")
        _runs.atomic_write_bytes(os.path.join(out, "samples.npz"), _runs.npz_bytes(merged))
        status = merged["status"]
        summary = {"command": "sample", "n": n, "shape": self.shape, "dtype": str(self.dtype).split(".")[1],
                   "nfe_mean": float(merged["nfe"].mean()), "nfe_max": int(merged["nfe"].max()),
                   "nonfinite": int((status == "nonfinite").sum()),
                   "failed": int((~np.isin(status, ["success", "nonfinite"])).sum()),
                   "samples": os.path.join(out, "samples.npz")}
        if self.shape == [2]:
            png = os.path.join(out, "samples.png")
            if _scatter(merged["x"][status == "success"], png, self.plot_data, not self.args.quiet):
                summary["plot"] = png
        _runs.atomic_write_json(os.path.join(out, "summary.json"), summary)
        return summary


def _scatter(x: np.ndarray, path: str, reference: np.ndarray | None, announce: bool = True) -> bool:
    """Scatter plot of 2-D samples (next to the data when known), written atomically.  Uses a
    bare ``Figure`` (no pyplot), so the caller's matplotlib backend is left alone."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        if announce:
            eprint("matplotlib is not installed (pip install 'scoresde[plot]'): no scatter plot written")
        return False
    panels = [("samples", x)] + ([("data", reference)] if reference is not None else [])
    fig = Figure(figsize=(5 * len(panels), 5))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    finite = np.concatenate([p[1] for p in panels])
    lim = float(np.quantile(np.abs(finite), 0.995)) * 1.1 if finite.size else 1.0
    for ax, (title, pts) in zip(axes, panels):
        ax.scatter(pts[:, 0], pts[:, 1], s=1.0, alpha=0.4, rasterized=True)
        ax.set_title(f"{title} (n={len(pts)})")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _runs.atomic_write_bytes(path, buf.getvalue())
    return True


def cmd_sample(args: argparse.Namespace, argv: Sequence[str], prog: str) -> int:
    job = _SampleJob(args)
    dtype = _dtype(args.dtype)
    if args.n < 1:
        raise RunError(f"-n must be >= 1, got {args.n}")
    if args.block_size < 1 or args.batch_size < 1 or args.micro_batch < 1:
        raise RunError("--block-size, --batch-size and --micro-batch must be >= 1")

    def setup(first: bool) -> dict:
        model, cfg = _load_model(args, dtype, job.device)
        shape = _data_shape(cfg, args.shape)
        job.setup(model, shape, dtype, job.device)
        if shape == [2] and (cfg.get("data") or {}).get("spec"):
            try:
                from ..data import load_data
                job.plot_data = load_data(cfg["data"]["spec"], n=min(args.n, 5000), seed=12345).numpy()
            except Exception:
                job.plot_data = None
        if not first:
            return {}
        sha = _runs.sha256_file(args.checkpoint)
        config = {"command": "sample", "checkpoint_sha256": sha, "weights": cfg["weights_used"],
                  "method": args.method, "options": job.options, "steps": args.steps, "schedule": args.schedule,
                  "t_end": args.t_end, "final_denoise": args.final_denoise, "seed": job.seed, "n": args.n,
                  "block_size": args.block_size, "micro_batch": args.micro_batch, "dtype": args.dtype,
                  "device": job.device.type, "shape": shape, "on_failure": args.on_failure}
        if not args.quiet:
            eprint(f"loaded {args.checkpoint} ({cfg['weights_used']} weights, sha256 {sha[:12]}...)")
        return {"config": config, "extra": {"checkpoint": os.path.abspath(args.checkpoint)}}

    # size estimate for the pre-flight free-space check (shards + merged file), before loading anything
    shape_guess = args.shape or [2]
    need = int(args.n * max(1, math.prod(shape_guess)) * 8 * 2.5) + (1 << 20)
    return _execute(job, RunOptions.from_args(args), argv, prog, setup, args.n, need)
