"""``scoresde likelihood``: log-likelihood and bits per dimension over a data set, sharded and
resumable.  Adaptive (``dopri5``, the default): ``--batch-size`` points per
``solvers.log_likelihood(..., per_sample=True)`` call, every point with its own step control, so
a point's value does not depend on its batch-mates; fixed grid (``--ode-steps``): one grid for
the batch."""
from __future__ import annotations

import argparse
import json
import math
import os
from typing import Sequence

import numpy as np
import torch

from .. import _runs
from .._runs import RunError, eprint
from .common import _dtype, _load_model
from .engine import RunOptions, _execute, _finalize_blocks, _Job


def exact_trace_chunk(dims: int, micro_batch: int) -> int:
    """Basis vectors per batched vector-Jacobian product of the exact trace, fixed by ``dims``
    and ``--micro-batch`` alone: with every network call ``micro_batch`` rows and this chunk, the
    backward passes have the same shapes whatever the batch, so a unit's bits do not depend on
    it (the library's default chunk depends on the batch size).  At most 2048 rows and 2**23
    elements per micro-batch of cotangents."""
    return max(1, min(dims, 2048 // micro_batch, 2 ** 23 // (micro_batch * dims)))


def _point_nfe(res, n: int) -> list[int]:
    """Network evaluations per data point: the library's per-sample count where it reports one
    (``stats["evaluations_per_sample"]``), else the solve's network calls (with batched
    per-sample step control an upper bound on each point's own; a fixed grid: exactly each
    point's; one unit per solve: exactly its own)."""
    per = res.stats.get("evaluations_per_sample")
    if per is not None:
        return [int(k) for k in per]
    return [int(res.nfe)] * n


class _LikelihoodJob(_Job):
    kind, ext = "likelihood", "jsonl"
    outputs = ("likelihood.jsonl",)
    digits = False                   # --data digits[:split]: bits/dim per level bin (17 levels)

    def __init__(self, args: argparse.Namespace):
        super().__init__()
        self.args = args

    def setup(self, model, x: torch.Tensor, exact) -> None:
        import solvers
        self.model, self.x, self.exact, self.solvers = model, x, exact, solvers
        self.dims = int(math.prod(x.shape[1:]))
        a = self.args
        self.trace = a.trace or ("exact" if self.dims <= 256 else "hutchinson")
        self.per_sample = a.ode_steps is None        # adaptive: every unit its own step control
        # per_sample with another method than dopri5 is one solve per unit inside the library
        self.units_per_call = 1 if self.per_sample and a.method != "dopri5" else a.batch_size
        self.chunk = exact_trace_chunk(self.dims, a.micro_batch) if self.trace == "exact" else None

    def _bpd(self, lp: float) -> float:
        a = self.args
        kw = {}
        if a.data_range is not None:
            kw = {"data_range": tuple(a.data_range), "dequantization": a.dequantization, "bits": a.bits}
        elif self.digits:            # 17 levels: the density per unit bin, log p_v = log p_x + D log(2/17)
            from ..data import digits_log_jacobian
            lp = lp + digits_log_jacobian(self.dims)
        return float(self.solvers.bits_per_dim(lp, self.dims, **kw))

    def _solve(self, ids: list[int]):
        a = self.args
        gens = [torch.Generator(device="cpu").manual_seed(_runs.unit_seed(self.seed, i)) for i in ids]
        xb = self.x[ids[0]:ids[-1] + 1].to(self.device)
        kw = dict(method=a.method, rtol=a.rtol, atol=a.atol, t_end=a.t_end, on_failure="record",
                  max_steps=a.max_steps, per_sample=self.per_sample)
        if self.trace == "hutchinson":
            kw.update(probes=a.probes, generator=gens)
        else:
            kw.update(chunk_size=self.chunk, allow_expensive=self.dims > 256)
        if a.ode_steps is not None:
            kw["steps"] = a.ode_steps
        res = self.solvers.log_likelihood(self.model, xb, self.trace, **kw)
        return res.log_prob.detach().cpu().double().tolist(), _point_nfe(res, len(ids)), list(res.status)

    def compute(self, first: int, last: int):
        a = self.args
        ids = list(range(first, last + 1))
        step = self.units_per_call
        lines, nfe, status = [], [], []
        for s in range(0, len(ids), step):
            chunk = ids[s:s + step]
            lps, ks, st = self._solve(chunk)
            for i, lp, k, stt in zip(chunk, lps, ks, st):
                ok = stt == "success" and math.isfinite(lp)
                if stt == "success" and not ok:
                    stt = "nonfinite"
                elif stt not in _runs.STATUSES:
                    stt = "failed"
                if not ok and a.on_failure == "raise":
                    raise RunError(f"likelihood of data point {i} failed ({stt}); pass --on-failure record "
                                   "to record failures and go on")
                row = {"index": i, "log_prob": lp if ok else None, "bits_per_dim": self._bpd(lp) if ok else None,
                       "nfe": k, "status": stt}
                lines.append(json.dumps(row, sort_keys=True, allow_nan=False))
                nfe.append(k)
                status.append(stt)
        return ("\n".join(lines) + "\n").encode("utf-8"), nfe, status

    def check(self, path: str, first: int, last: int) -> str | None:
        return _runs.check_jsonl_shard(path, first, last)

    def finalize(self, out: str, blocks: list) -> dict:
        n = self.x.shape[0]
        _finalize_blocks(out, blocks, self.ext, self.check, n)
        chunks = []
        for f, l in blocks:
            with open(os.path.join(out, _runs.shard_name(f, l, self.ext)), "rb") as fh:
                chunks.append(fh.read())
        _runs.atomic_write_bytes(os.path.join(out, "likelihood.jsonl"), b"".join(chunks))
        rows = [json.loads(line) for c in chunks for line in c.decode("utf-8").splitlines() if line.strip()]
        if [r["index"] for r in rows] != list(range(n)):
            raise RunError("merged indices are not 0..N-1 exactly once")
        ok = [r for r in rows if r["status"] == "success"]
        n_fail = n - len(ok)
        lp = np.array([r["log_prob"] for r in ok], dtype=np.float64)
        bpd = np.array([r["bits_per_dim"] for r in ok], dtype=np.float64)
        nfe = np.array([r["nfe"] for r in rows], dtype=np.float64)

        def mean_se(v: np.ndarray) -> tuple[float | None, float | None]:
            if v.size == 0:
                return None, None
            se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else None
            return float(v.mean()), se

        use = n_fail == 0 or self.args.exclude_failed
        nll, nll_se = mean_se(-lp) if use else (None, None)
        b, b_se = mean_se(bpd) if use else (None, None)
        summary = {"command": "likelihood", "n": n, "succeeded": len(ok), "failed": n_fail,
                   "dims": self.dims, "trace": self.trace, "method": self.args.method,
                   "nll_mean": nll, "nll_stderr": nll_se, "bits_per_dim_mean": b, "bits_per_dim_stderr": b_se,
                   "nfe_mean": float(nfe.mean()), "nfe_max": int(nfe.max()),
                   "results": os.path.join(out, "likelihood.jsonl")}
        if n_fail and not self.args.exclude_failed:
            summary["note"] = (f"{n_fail} data points failed (status in likelihood.jsonl); the means are withheld: "
                               "pass --exclude-failed to average the others")
        if self.exact is not None and use and ok:
            idx = torch.tensor([r["index"] for r in ok])
            exact = -self.exact.log_prob(self.x[idx].to(torch.float64)).numpy()
            diff = -lp - exact
            summary["exact_nll_mean"], summary["exact_nll_stderr"] = mean_se(exact)
            summary["nll_minus_exact_mean"], summary["nll_minus_exact_stderr"] = mean_se(diff)
        _runs.atomic_write_json(os.path.join(out, "summary.json"), summary)
        if not self.args.quiet and b is not None:
            eprint(f"mean bits/dim = {b:.6f} ± {b_se if b_se is not None else float('nan'):.6f} (standard error), "
                   f"mean NLL = {nll:.6f} ± {nll_se if nll_se is not None else float('nan'):.6f} nats over "
                   f"{len(ok)} points")
        return summary


def cmd_likelihood(args: argparse.Namespace, argv: Sequence[str], prog: str) -> int:
    from ..data import digits_split, is_toy, load_data, toy_density
    job = _LikelihoodJob(args)
    job.digits = digits_split(args.data) is not None
    if job.digits and args.data_range is not None:
        raise RunError("--data digits has its own bits/dim convention (17 levels, uniform dequantization into "
                       "[-1, 1]); drop --data-range/--dequantization/--bits")
    dtype = _dtype(args.dtype)
    if args.block_size < 1 or args.batch_size < 1 or args.micro_batch < 1:
        raise RunError("--block-size, --batch-size and --micro-batch must be >= 1")
    if (args.data_range is None) != (args.dequantization is None):
        raise RunError("--data-range and --dequantization go together (the discrete-data bits/dim convention)")
    # the data decide N; load them first (cheap, and the same on every rank)
    x = load_data(args.data, n=args.n, seed=args.data_seed, dtype=dtype)
    exact = toy_density(args.data) if is_toy(args.data) else None
    n = int(x.shape[0])

    def setup(first: bool) -> dict:
        model, cfg = _load_model(args, dtype, job.device)
        job.setup(model, x, exact)
        if not first:
            return {}
        sha = _runs.sha256_file(args.checkpoint)
        data_sha = __import__("hashlib").sha256(x.contiguous().numpy().tobytes()).hexdigest()
        config = {"command": "likelihood", "checkpoint_sha256": sha, "weights": cfg["weights_used"],
                  "data": args.data, "data_n": n,
                  "data_seed": args.data_seed if is_toy(args.data) or job.digits else None,
                  "data_sha256": data_sha, "trace": job.trace, "probes": args.probes if job.trace == "hutchinson" else None,
                  "method": args.method, "rtol": args.rtol, "atol": args.atol, "ode_steps": args.ode_steps,
                  "per_sample": job.per_sample, "chunk_size": job.chunk,
                  "t_end": args.t_end, "max_steps": args.max_steps, "seed": job.seed, "block_size": args.block_size,
                  "micro_batch": args.micro_batch, "dtype": args.dtype, "device": job.device.type,
                  "data_range": args.data_range, "dequantization": args.dequantization, "bits": args.bits,
                  "on_failure": args.on_failure}
        if not args.quiet:
            eprint(f"loaded {args.checkpoint} ({cfg['weights_used']} weights, sha256 {sha[:12]}...); "
                   f"{n} data points of dimension {job.dims}; trace={job.trace}")
        return {"config": config, "extra": {"checkpoint": os.path.abspath(args.checkpoint)}}

    need = n * 400 + (1 << 20)
    return _execute(job, RunOptions.from_args(args), argv, prog, setup, n, need)
