r"""The ``scoresde`` command: ``train | sample | likelihood | validate``.

::

    scoresde train      --data gmm --out runs/gmm.pt --steps 4000
    scoresde sample     --checkpoint runs/gmm.pt --out runs/samples -n 10000
    scoresde likelihood --checkpoint runs/gmm.pt --data gmm --n 2000 --data-seed 1 --out runs/nll

(also ``python -m scoresde ...``; ``torchrun --nproc_per_node=K -m scoresde sample ...`` on
several processes or GPUs).

**Long runs** (``sample``, ``likelihood``; RELIABILITY.md section 3b).  Work unit i (sample
i, or data point i) draws all its randomness from its own generator, seeded from
``(--seed, i)``, and every network call sees exactly ``--micro-batch`` rows
(:class:`scoresde.nets.FixedBatch`), so a unit's result is bitwise independent of the
batch size, the number of processes and of interruptions (CPU; adaptive solvers run one
unit at a time).  Units are grouped in blocks of ``--block-size``; rank r of S owns
``blocks[r::S]``; each finished block is written atomically as
``shard-{first:08d}-{last:08d}.npz`` (samples) or ``.jsonl`` (likelihood: index, log_prob,
bits_per_dim, nfe, status).  ``run.json`` records the configuration (and its hash) and
provenance.  Re-running with ``--resume`` rescans the shards: a shard counts only if it loads
with the expected indices, shape and finite values; a corrupt one is renamed ``*.corrupt``
and recomputed; nothing finished is recomputed; a changed configuration is refused with
the differing keys.  ``--resume`` on a new directory simply starts, so a preemptible job
can always pass it.  SIGINT/SIGTERM finish the current shard and exit with status 75 and a
``resume with: ...`` line.  At the end rank 0 (after a barrier) checks that every index is
present exactly once and merges the shards atomically into ``samples.npz`` /
``likelihood.jsonl`` plus ``summary.json`` (and ``samples.png`` for 2-D samples).
``progress.json`` (done, total, units/s, ETA, ...) is rewritten atomically after every
block; a tqdm bar with ETA runs on rank 0 unless ``--quiet``.  A run directory has one writer
at a time (:class:`scoresde._runs.RunDirLock`, an OS lock dropped when the process dies): a
second run on the same ``--out`` exits 1 naming the holder's pid; the ranks of one torchrun
job, and the ``--shard i/S`` processes of one run, share it (one process per shard).

``train`` stops at the first non-finite loss or gradient norm (exit 1, naming the step and
the loss) without saving, so a good checkpoint is never replaced by a diverged one.

Exit status: 0 done; 1 error (message, no traceback); 2 bad usage; 75 interrupted (resume).
"""
from __future__ import annotations

import argparse
import copy
import errno
import io
import json
import math
import os
import secrets
import shlex
import signal
import sys
import time
from datetime import timedelta
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import _runs
from ._runs import RunError, eprint

__all__ = ["main", "EXIT_INTERRUPTED"]

#: Exit status of an interrupted run (EX_TEMPFAIL): resume it.
EXIT_INTERRUPTED = 75
_SDE_NAMES = ("vp", "subvp", "ve", "cosine", "edm", "rf")


# ============================================================================ helpers
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
    import scoresde
    name = args.sde
    if name == "vp":
        return scoresde.VPSDE(args.beta_min, args.beta_max)
    if name == "subvp":
        return scoresde.SubVPSDE(args.beta_min, args.beta_max)
    if name == "cosine":
        return scoresde.CosineVPSDE()
    if name == "rf":
        return scoresde.RectifiedFlowSDE()
    if name == "ve":
        return scoresde.VESDE(args.sigma_min if args.sigma_min is not None else 0.01,
                              args.sigma_max if args.sigma_max is not None else 50.0)
    return scoresde.EDMSDE(args.sigma_min if args.sigma_min is not None else 0.002,
                           args.sigma_max if args.sigma_max is not None else 80.0)


def _device(args: argparse.Namespace, local_rank: int = 0) -> torch.device:
    if args.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(args.device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise RunError(f"--device {args.device}: expected cpu, cuda, cuda:K or auto (a device that computes "
                       "numbers; 'meta' and other kinds are not supported)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError("--device cuda was asked for but CUDA is not available")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


class _Stop:
    """SIGINT/SIGTERM set a flag (the loop finishes its block); a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.flag = False
        self.signame = ""
        self._old: dict = {}

    def install(self, announce: bool) -> None:
        self.announce = announce
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass

    def _handler(self, signum, frame) -> None:
        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag = True
        self.signame = signal.Signals(signum).name
        if self.announce:
            eprint(f"\nscoresde: {self.signame} received: finishing the current shard, then exiting "
                   "(press Ctrl-C again to stop at once; finished shards are kept)")

    def restore(self) -> None:
        for sig, old in self._old.items():
            try:
                signal.signal(sig, old)
            except (ValueError, TypeError):
                pass
        self._old.clear()


class _Dist:
    """Rank/world from torchrun's environment (``torch.distributed`` only when WORLD_SIZE>1),
    or a simulated shard ``--shard i/S`` (no communication)."""

    def __init__(self, shard: str | None, device_type: str, timeout_s: float):
        self.pg = False
        self.sim = False
        self.timeout = timedelta(seconds=timeout_s)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, self.world = int(os.environ.get("RANK", "0")), world
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if shard:
            if world > 1:
                raise RunError("--shard simulates the ranks of one run; do not combine it with torchrun (WORLD_SIZE>1)")
            try:
                i, s = (int(v) for v in shard.split("/"))
            except ValueError:
                raise RunError(f"--shard must be i/S (e.g. 0/3), got {shard!r}") from None
            if not (s >= 1 and 0 <= i < s):
                raise RunError(f"--shard {shard}: need 0 <= i < S")
            self.rank, self.world, self.sim = i, s, s > 1
        elif world > 1:
            import torch.distributed as dist
            self.backend = "nccl" if device_type == "cuda" else "gloo"
            dist.init_process_group(self.backend, timeout=self.timeout)
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            self.pg = True

    @property
    def rank0(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if not self.pg:
            return
        import torch.distributed as dist
        if self.backend == "gloo":
            dist.monitored_barrier(timeout=self.timeout)   # names a rank that never arrives
        else:
            dist.barrier()

    def share(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.pg:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.pg:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
            self.pg = False


class _Progress:
    """tqdm bar (rank 0, not --quiet) over the units done across all ranks (a scan of the
    shard names), and ``progress.json`` rewritten atomically after every block."""

    def __init__(self, out: str, total: int, blocks: list, ext: str, show: bool, write: bool, desc: str):
        self.out, self.total, self.blocks, self.ext = out, total, blocks, ext
        self.write_file, self.t0 = write, time.time()
        self.nfe_sum = self.units = self.nonfinite = self.failed = 0
        self.done0 = self.scan()
        self.bar = None
        self.show = show
        if show:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=self.done0, desc=desc, unit="unit", dynamic_ncols=True,
                                file=sys.stderr, smoothing=0.1)
            except ImportError:  # the progress extra is optional: plain lines instead
                self.bar = None

    def scan(self) -> int:
        names = set(os.listdir(self.out))
        return sum(last - first + 1 for first, last in self.blocks
                   if _runs.shard_name(first, last, self.ext) in names)

    def update(self, nfe: Sequence[int], status: Sequence[str], status_word: str = "running") -> None:
        self.units += len(nfe)
        self.nfe_sum += int(sum(nfe))
        self.nonfinite += sum(s == "nonfinite" for s in status)
        self.failed += sum(s not in ("success", "nonfinite") for s in status)
        self.write(status_word)

    def write(self, status_word: str) -> None:
        done = self.scan()
        elapsed = max(time.time() - self.t0, 1e-9)
        rate = (done - self.done0) / elapsed
        eta = (self.total - done) / rate if rate > 0 else None
        if self.bar is not None:
            self.bar.n = done
            self.bar.refresh()
        elif self.show:
            eprint(f"{done}/{self.total} units, {rate:.3g} units/s, ETA {eta:.0f} s" if eta is not None
                   else f"{done}/{self.total} units")
        if self.write_file:
            _runs.atomic_write_json(os.path.join(self.out, "progress.json"), {
                "status": status_word, "done": done, "total": self.total, "elapsed_s": round(elapsed, 3),
                "units_per_s": round(rate, 6), "eta_s": None if eta is None else round(eta, 3),
                "mean_nfe": (self.nfe_sum / self.units) if self.units else None,
                "nonfinite": self.nonfinite, "failed": self.failed,
                "note": "mean_nfe, nonfinite, failed: units computed by rank 0 in this session",
            })

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _resolve_seed(args: argparse.Namespace, out: str, announce: bool) -> None:
    """RELIABILITY row 52: no --seed means a random one, printed and recorded in run.json; a
    resumed run (or another --shard of it) reuses the recorded seed."""
    if args.seed is not None:
        return
    args.seed_drawn = True
    try:
        with open(os.path.join(out, "run.json"), "r", encoding="utf-8") as fh:
            recorded = json.load(fh)["config"]["seed"]
        if isinstance(recorded, int):
            args.seed = recorded
            return
    except (OSError, ValueError, KeyError, TypeError):
        pass
    args.seed = secrets.randbits(31)
    if announce:
        eprint(f"seed {args.seed} (drawn at random, recorded in run.json; pass --seed {args.seed} to repeat the run)")


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


def _drawn(args: argparse.Namespace) -> int | None:
    return args.seed if getattr(args, "seed_drawn", False) else None


# ======================================================================= run engine
class _Job:
    """What a sharded command computes; subclasses define units, shard format and merge."""

    kind = ""
    ext = ""
    outputs: tuple = ()

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def compute(self, first: int, last: int) -> tuple[bytes, list[int], list[str]]:
        raise NotImplementedError

    def check(self, path: str, first: int, last: int) -> str | None:
        raise NotImplementedError

    def finalize(self, out: str, blocks: list) -> dict:
        raise NotImplementedError


def _claim_out(out: str, args: argparse.Namespace, job_outputs: Sequence[str], dist: "_Dist",
               need: int) -> _runs.RunDirLock:
    """Output directory policy, before any model is loaded: refuse a non-empty directory
    without --resume/--overwrite, then take the directory's writer lock (a simulated shard
    shares it with the other shards of its run), and only then delete for --overwrite."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunError(f"--out {out} exists and is not a directory")
    existing = _runs.existing_files(out)
    if existing and args.overwrite and dist.sim:
        raise RunError("--overwrite with --shard would let the shards delete each other's work; "
                       "clear the directory once, then run the shards")
    if existing and not (args.overwrite or args.resume or dist.sim or getattr(args, "finalize_only", False)):
        raise RunError(f"output directory {out} already exists and is not empty ({len(existing)} files); "
                       f"pass --resume to continue the run in it, or --overwrite to start over")
    _runs.preflight_dir(out)
    lock = _runs.RunDirLock(out, (dist.rank, dist.world) if dist.sim else None).acquire()
    try:
        if existing and args.overwrite:
            _runs.remove_run_files(out, ("run.json", "progress.json", "summary.json", *job_outputs))
        _runs.preflight_dir(out, need)
    except BaseException:
        lock.release()
        raise
    return lock


def _manifest(out: str, config: dict, argv: Sequence[str], extra: dict) -> None:
    path = os.path.join(out, "run.json")
    if os.path.exists(path):
        try:
            with open(path, "r", encoding="utf-8") as fh:
                old = json.load(fh)
            old_cfg = old["config"]
        except (OSError, ValueError, KeyError) as err:
            raise RunError(f"{path} is unreadable ({err}); move it away or pass --overwrite") from None
        if _runs.config_hash(old_cfg) != _runs.config_hash(config):
            diff = _runs.config_diff(old_cfg, config)
            raise RunError(f"refusing to resume in {out}: the configuration differs from run.json:\n  "
                           + "\n  ".join(diff) + "\nrun the original command, or choose a new --out "
                           "(or --overwrite to discard the finished shards)")
        return
    _runs.atomic_write_json(path, {"command": list(argv), "config": config,
                                   "config_hash": _runs.config_hash(config), **extra,
                                   "provenance": _runs.provenance()})


def _execute(job: _Job, args: argparse.Namespace, argv: Sequence[str], prog: str,
             setup: Callable[[bool], dict], n: int, need_bytes: int) -> int:
    """The sharded loop shared by ``sample`` and ``likelihood``.

    ``setup(rank0)`` loads the checkpoint/data and returns ``{"config": ..., "extra": ...}``;
    it runs on rank 0 first (checkpoint validated and hashed while the others wait), then
    on the other ranks."""
    out = os.path.abspath(args.out)
    device = _device(args)
    dist = _Dist(args.shard, device.type, args.dist_timeout)
    stop = _Stop()
    progress = None
    lock = None          # rank 0 (or each simulated shard) holds the directory for the whole run
    try:
        if dist.pg and device.type == "cuda":
            device = _device(args, dist.local_rank)
            torch.cuda.set_device(device)
        args._device = device
        quiet = args.quiet or not dist.rank0
        error, info = None, None
        if dist.rank0 or dist.sim:
            try:
                lock = _claim_out(out, args, job.outputs, dist, need_bytes)
                with lock.section(args.dist_timeout):     # simulated shards: one at a time
                    _resolve_seed(args, out, announce=not quiet)
                    info = setup(True)
                    _manifest(out, info["config"], argv, info["extra"])
                    removed = _runs.clean_stale_tmp(out)
                if removed and not quiet:
                    eprint(f"removed {len(removed)} stale temporary files: {removed[:5]}")
            except (RunError, OSError, ValueError, TypeError) as err:
                error = _error_text(err)
        error, args.seed = dist.share((error, args.seed))
        if error:
            raise RunError(error)
        if not (dist.rank0 or dist.sim):
            info = setup(False)
        blocks = _runs.make_blocks(n, args.block_size)
        mine = blocks[dist.rank::dist.world]
        pending = []
        if not getattr(args, "finalize_only", False):
            for first, last in mine:
                path = os.path.join(out, _runs.shard_name(first, last, job.ext))
                if os.path.exists(path):
                    why = job.check(path, first, last)
                    if why is None:
                        continue
                    moved = _runs.quarantine(path)
                    eprint(f"shard {os.path.basename(path)} is invalid ({why}); renamed to "
                           f"{os.path.basename(moved)} and recomputing it")
                pending.append((first, last))
        if not quiet:
            done_units = n - sum(l - f + 1 for f, l in pending) if dist.world == 1 else None
            msg = f"{job.kind}: {n} units in {len(blocks)} blocks of {args.block_size}"
            if dist.world > 1:
                msg += f"; rank {dist.rank} of {dist.world} owns {len(mine)} blocks, {len(pending)} to compute"
            elif done_units:
                msg += f"; resuming: {done_units} units already done, {len(pending)} blocks to compute"
            eprint(msg)
        if pending:
            # pre-flight: one unit through the whole pipeline (model, solver, serialisation)
            f0 = pending[0][0]
            job.compute(f0, f0)
        stop.install(announce=not quiet)
        progress = _Progress(out, n, blocks, job.ext, show=not quiet, write=dist.rank0, desc=job.kind)
        for first, last in pending:
            data, nfe, status = job.compute(first, last)
            _runs.atomic_write_bytes(os.path.join(out, _runs.shard_name(first, last, job.ext)), data)
            if dist.rank0:
                progress.update(nfe, status)
            if stop.flag:
                break
        if stop.flag:
            if dist.rank0:
                progress.write("interrupted")
            progress.close()
            done = progress.scan()
            eprint(f"scoresde {job.kind}: interrupted by {stop.signame} with {done} of {n} units done "
                   f"(finished shards are kept).")
            eprint(f"resume with: {_resume_command(prog, argv, dist.world, dist.sim, _drawn(args))}")
            return EXIT_INTERRUPTED
        progress.close()
        dist.barrier()
        if not (dist.rank0 or dist.sim):
            return 0
        with lock.section(args.dist_timeout):          # simulated shards: one merges at a time
            if dist.sim:
                names = set(os.listdir(out))
                missing = [b for b in blocks if _runs.shard_name(*b, job.ext) not in names]
                if missing:
                    if not quiet:
                        eprint(f"shard {dist.rank}/{dist.world} finished; {len(missing)} blocks of other shards "
                               f"are still missing; the last shard to finish merges (or run with --finalize)")
                    return 0
            summary = job.finalize(out, blocks)
            progress.write_file = True            # (with --shard, whichever shard merges)
            progress.write("done")
        if not args.quiet:
            print(json.dumps(summary, indent=2, sort_keys=True))
        return 0
    except KeyboardInterrupt:
        eprint(f"\nscoresde {job.kind}: stopped at once (finished shards are kept); "
               f"resume with: {_resume_command(prog, argv, dist.world, dist.sim, _drawn(args))}")
        return EXIT_INTERRUPTED
    finally:
        stop.restore()
        dist.close()
        if lock is not None:
            lock.release()


def _finalize_blocks(out: str, blocks: list, ext: str, check: Callable[[str, int, int], str | None], n: int) -> None:
    """Every index in [0, n) exactly once: each expected shard valid, no stray shard files."""
    names = os.listdir(out)
    expected = {_runs.shard_name(f, l, ext) for f, l in blocks}
    stray = sorted(nm for nm in names if _runs.parse_shard_name(nm) and nm not in expected)
    if stray:
        raise RunError(f"{out} holds shard files that do not belong to this run's blocks (overlapping or "
                       f"duplicate indices): {stray[:10]}; remove them, then run with --resume")
    missing, found = [], 0
    for f, l in blocks:
        path = os.path.join(out, _runs.shard_name(f, l, ext))
        why = check(path, f, l) if os.path.exists(path) else "missing"
        if why is None:
            found += l - f + 1
            continue
        if why != "missing":
            _runs.quarantine(path)
        missing.append(f"{f}-{l}" + ("" if why == "missing" else f" ({why})"))
    if missing:
        raise RunError(f"found {found:,} of {n:,} units; missing blocks: {', '.join(missing[:20])}"
                       f"{' ...' if len(missing) > 20 else ''}; run the same command with --resume")


# =========================================================================== sample
class _SampleJob(_Job):
    kind, ext = "sample", "npz"
    outputs = ("samples.npz", "samples.png")

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
        gens = [torch.Generator().manual_seed(_runs.unit_seed(a.seed, i)) for i in ids]
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
            if _scatter(merged["x"][status == "success"], png, self.args.plot_data, not self.args.quiet):
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


def _load_model(args: argparse.Namespace, dtype: torch.dtype, device: torch.device):
    from .checkpoint import load_checkpoint
    from .model import ScoreModel
    from .nets import FixedBatch
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


def cmd_sample(args: argparse.Namespace, argv: Sequence[str], prog: str) -> int:
    job = _SampleJob(args)
    dtype = _dtype(args.dtype)
    if args.n < 1:
        raise RunError(f"-n must be >= 1, got {args.n}")
    if args.block_size < 1 or args.batch_size < 1 or args.micro_batch < 1:
        raise RunError("--block-size, --batch-size and --micro-batch must be >= 1")
    args.plot_data = None

    def setup(first: bool) -> dict:
        model, cfg = _load_model(args, dtype, args._device)
        shape = _data_shape(cfg, args.shape)
        job.setup(model, shape, dtype, args._device)
        if shape == [2] and (cfg.get("data") or {}).get("spec"):
            try:
                from .data import load_data
                args.plot_data = load_data(cfg["data"]["spec"], n=min(args.n, 5000), seed=12345).numpy()
            except Exception:
                args.plot_data = None
        if not first:
            return {}
        sha = _runs.sha256_file(args.checkpoint)
        config = {"command": "sample", "checkpoint_sha256": sha, "weights": cfg["weights_used"],
                  "method": args.method, "options": job.options, "steps": args.steps, "schedule": args.schedule,
                  "t_end": args.t_end, "final_denoise": args.final_denoise, "seed": args.seed, "n": args.n,
                  "block_size": args.block_size, "micro_batch": args.micro_batch, "dtype": args.dtype,
                  "device": args._device.type, "shape": shape, "on_failure": args.on_failure}
        if not args.quiet:
            eprint(f"loaded {args.checkpoint} ({cfg['weights_used']} weights, sha256 {sha[:12]}...)")
        return {"config": config, "extra": {"checkpoint": os.path.abspath(args.checkpoint)}}

    # size estimate for the pre-flight free-space check (shards + merged file), before loading anything
    shape_guess = args.shape or [2]
    need = int(args.n * max(1, math.prod(shape_guess)) * 8 * 2.5) + (1 << 20)
    if args.finalize:
        args.finalize_only = True
    return _execute(job, args, argv, prog, setup, args.n, need)


# ======================================================================= likelihood
class _LikelihoodJob(_Job):
    kind, ext = "likelihood", "jsonl"
    outputs = ("likelihood.jsonl",)
    digits = False                   # --data digits[:split]: bits/dim per level bin (17 levels)

    def setup(self, model, x: torch.Tensor, exact) -> None:
        import solvers
        self.model, self.x, self.exact, self.solvers = model, x, exact, solvers
        self.dims = int(math.prod(x.shape[1:]))
        a = self.args
        self.trace = a.trace or ("exact" if self.dims <= 256 else "hutchinson")
        self.per_unit = a.ode_steps is None          # adaptive: each unit solved alone (batch-independent)

    def _bpd(self, lp: float) -> float:
        a = self.args
        kw = {}
        if a.data_range is not None:
            kw = {"data_range": tuple(a.data_range), "dequantization": a.dequantization, "bits": a.bits}
        elif self.digits:            # 17 levels: the density per unit bin, log p_v = log p_x + D log(2/17)
            from .data import digits_log_jacobian
            lp = lp + digits_log_jacobian(self.dims)
        return float(self.solvers.bits_per_dim(lp, self.dims, **kw))

    def _solve(self, ids: list[int]):
        a = self.args
        gens = [torch.Generator(device="cpu").manual_seed(_runs.unit_seed(a.seed, i)) for i in ids]
        xb = self.x[ids[0]:ids[-1] + 1].to(self.args._device)
        kw = dict(method=a.method, rtol=a.rtol, atol=a.atol, t_end=a.t_end, on_failure="record",
                  max_steps=a.max_steps)
        if self.trace == "hutchinson":
            kw.update(probes=a.probes, generator=gens)
        if a.ode_steps is not None:
            kw["steps"] = a.ode_steps
        if self.trace == "exact" and self.dims > 256:
            kw["allow_expensive"] = True
        res = self.solvers.log_likelihood(self.model, xb, self.trace, **kw)
        return res.log_prob.detach().cpu().double().tolist(), res.nfe, list(res.status)

    def compute(self, first: int, last: int):
        a = self.args
        ids = list(range(first, last + 1))
        step = 1 if self.per_unit else a.batch_size
        lines, nfe, status = [], [], []
        for s in range(0, len(ids), step):
            chunk = ids[s:s + step]
            lps, k, st = self._solve(chunk)
            for i, lp, stt in zip(chunk, lps, st):
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
    from .data import digits_split, is_toy, load_data, toy_density
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
        model, cfg = _load_model(args, dtype, args._device)
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
                  "t_end": args.t_end, "max_steps": args.max_steps, "seed": args.seed, "block_size": args.block_size,
                  "micro_batch": args.micro_batch, "dtype": args.dtype, "device": args._device.type,
                  "data_range": args.data_range, "dequantization": args.dequantization, "bits": args.bits,
                  "on_failure": args.on_failure}
        if not args.quiet:
            eprint(f"loaded {args.checkpoint} ({cfg['weights_used']} weights, sha256 {sha[:12]}...); "
                   f"{n} data points of dimension {job.dims}; trace={job.trace}")
        return {"config": config, "extra": {"checkpoint": os.path.abspath(args.checkpoint)}}

    need = n * 400 + (1 << 20)
    if args.finalize:
        args.finalize_only = True
    return _execute(job, args, argv, prog, setup, n, need)


# ============================================================================ train
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


def cmd_train(args: argparse.Namespace, argv: Sequence[str], prog: str) -> int:
    from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
    from .data import digits_dequantize, digits_levels, digits_split, is_toy, load_data, toy_sample
    from .losses import DSMLoss
    from .model import ScoreModel
    from .nets import MLPScoreNet, UNet

    out = os.path.abspath(args.out)
    if os.path.isdir(out):
        raise RunError(f"--out {out} is a directory; give a checkpoint file path such as {out}/model.pt")
    if os.path.exists(out) and not (args.overwrite or args.resume):
        raise RunError(f"{out} already exists; pass --resume to continue training it or --overwrite to replace it")
    _runs.preflight_dir(os.path.dirname(out), 64 << 20)
    if args.steps < 1 or args.batch_size < 1:
        raise RunError("--steps and --batch-size must be >= 1")
    device = _device(args)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    toy = is_toy(args.data)
    levels = None                    # digits: integer levels, dequantized afresh on every batch
    if toy:
        shape = [2]
        data = None
    elif digits_split(args.data) is not None:
        levels = digits_levels(digits_split(args.data))
        if args.n_data is not None:
            if not 1 <= args.n_data <= levels.shape[0]:
                raise RunError(f"--n-data must be in 1..{levels.shape[0]} for {args.data}, got {args.n_data}")
            levels = levels[:args.n_data]
        data, shape = None, list(levels.shape[1:])
    else:
        data = load_data(args.data, n=args.n_data, dtype=torch.float32)
        shape = list(data.shape[1:])
    sde = _make_sde(args)
    if args.net == "auto":
        args.net = "mlp" if len(shape) == 1 else "unet"
    if args.net == "mlp":
        if len(shape) != 1:
            raise RunError(f"--net mlp needs flat data [N, D]; the data have shape [N, {', '.join(map(str, shape))}]")
        net = MLPScoreNet(shape[0], hidden=args.hidden, depth=args.depth, embedding=args.embedding,
                          seed=args.seed)
    else:
        if len(shape) != 3:
            raise RunError(f"--net unet needs images [N, C, H, W]; the data have shape [N, {', '.join(map(str, shape))}]")
        net = UNet(shape[0], channels=args.channels, embedding=args.embedding, seed=args.seed)
    net = net.to(device)
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
    start = 0
    if args.resume and os.path.exists(out):
        payload, cfg = read_checkpoint(out)
        old = {k: v for k, v in cfg.get("train", {}).items() if k not in ("steps", "step")}
        diff = _runs.config_diff(old, train_cfg, "train.", "checkpoint") + _runs.config_diff(
            {"net": cfg.get("net"), "sde": cfg.get("sde"), "prediction": cfg.get("prediction"),
             "time_input": cfg.get("time_input")},
            {"net": net.config(), "sde": sde.config(), "prediction": model.prediction.value,
             "time_input": args.time_input}, "", "checkpoint")
        if diff:
            raise RunError(f"refusing to resume training {out}: the configuration differs:\n  " + "\n  ".join(diff))
        state = payload.get("train_state")
        if not isinstance(state, dict):
            raise RunError(f"{out} holds no training state (saved without it); cannot resume training")
        loaded, _ = load_checkpoint(out, weights="raw", map_location=device)
        net.load_state_dict(loaded.net.state_dict())
        if ema is not None:
            ema.load_state_dict(payload["state_dict"])
        opt.load_state_dict(state["optimizer"])
        g.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start = int(state["step"])
        if not args.quiet:
            eprint(f"resuming training of {out} at step {start}")

    saved = [start if start else None]     # the step of the checkpoint now at --out (written or resumed)

    def diverged(step: int, what: str) -> RunError:
        kept = (f"{out} keeps the checkpoint of step {saved[0]}" if saved[0] is not None else
                f"{out} was left as it was" if os.path.exists(out) else f"nothing was written to {out}")
        return RunError(f"training diverged at step {step} of {args.steps}: {what}; stopped without saving ({kept}). "
                        f"Lower --lr (now {args.lr:g}) or --grad-clip (now {args.grad_clip:g})")

    def save(step: int) -> None:
        bad = _nonfinite_tensor(net, ema)
        if bad:
            raise diverged(step, f"non-finite values in {bad}")
        extra = {"data": {"spec": args.data, "shape": shape, "toy": toy},
                 "train": {**train_cfg, "steps": args.steps, "step": step}}
        state = {"step": step, "optimizer": opt.state_dict(), "generator": g.get_state(),
                 "torch_rng": torch.get_rng_state()}
        save_checkpoint(out, net, sde, args.prediction, time_input=args.time_input, ema=ema, extra=extra,
                        train_state=state)
        saved[0] = step

    stop = _Stop()
    stop.install(announce=not args.quiet)
    bar = None
    if not args.quiet:
        try:
            from tqdm import tqdm
            bar = tqdm(total=args.steps, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
        except ImportError:
            bar = None
    t0 = time.time()
    avg = None
    step = start
    net.train()
    try:
        for step in range(start, args.steps):
            if toy:
                x0 = toy_sample(args.data, args.batch_size, g).to(device)
            elif levels is not None:
                x0 = digits_dequantize(levels[torch.randint(levels.shape[0], (args.batch_size,), generator=g)],
                                       g).to(device)
            else:
                idx = torch.randint(data.shape[0], (args.batch_size,), generator=g)
                x0 = data[idx].to(device)
            for group in opt.param_groups:
                group["lr"] = args.lr * _lr_factor(step, args.steps, args.warmup, args.lr_schedule)
            loss = loss_fn(model, x0, g)
            val = float(loss.detach())
            if not math.isfinite(val):      # stop before the step spreads it into the weights
                raise diverged(step + 1, f"loss = {val}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip))
                if not math.isfinite(grad_norm):
                    raise diverged(step + 1, f"gradient norm = {grad_norm} (loss {val:.6g})")
            opt.step()
            if ema is not None:
                decay = min(args.ema, (1.0 + step) / (10.0 + step))   # warm-up: early weights fade fast
                with torch.no_grad():
                    for pe, p in zip(ema.parameters(), net.parameters()):
                        pe.lerp_(p, 1.0 - decay)
                    for be, b in zip(ema.buffers(), net.buffers()):
                        be.copy_(b)
            avg = val if avg is None else 0.98 * avg + 0.02 * val
            if bar is not None:
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{avg:.4g}")
            if args.save_every and (step + 1) % args.save_every == 0:
                save(step + 1)
            if stop.flag:
                step += 1
                break
        else:
            step = args.steps
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
    save(step)
    wall = time.time() - t0
    if stop.flag and step < args.steps:
        eprint(f"scoresde train: interrupted by {stop.signame} at step {step} of {args.steps}; checkpoint saved "
               f"to {out}")
        eprint(f"resume with: {_resume_command(prog, argv, 1, False)}")
        return EXIT_INTERRUPTED
    if not args.quiet:
        print(json.dumps({"command": "train", "checkpoint": out, "steps": step, "wall_s": round(wall, 2),
                          "loss_ema": avg, "weighting": args.weighting, "prediction": args.prediction,
                          "sde": sde.config()}, indent=2, sort_keys=True))
    return 0


# ========================================================================= validate
def cmd_validate(args: argparse.Namespace, argv: Sequence[str], prog: str) -> int:
    try:
        from validation.suite import parser as suite_parser, run as suite_run  # a sibling top-level package
    except ImportError as err:
        eprint(f"scoresde validate: the validation suite is not importable here ({err}). It ships with the "
               "source tree, not the wheel: run `python -m validation` from a checkout of the repository "
               "(or add its root to PYTHONPATH).")
        return 2
    if args.rest:   # the old spelling `scoresde validate -- --quick`: parse what follows the "--"
        return main(["validate", *args.rest], prog)
    if args.checkpoint is not None:
        return _validate_checkpoint(args)
    given = [f"--{k.replace('_', '-')}" for k in _VALIDATE_MODEL_ONLY if getattr(args, k) is not None]
    given += ["--weights"] * (args.weights != "default") + ["--no-plots"] * bool(args.no_plots)
    if given:
        raise RunError(f"{', '.join(given)}: only with --checkpoint (the analytic suite has its own problems)")
    args.quick = True if args.quick is None else args.quick
    defaults = suite_parser()
    args.out = args.out or defaults.get_default("out")
    args.tol = defaults.get_default("tol") if args.tol is None else args.tol
    return int(suite_run(args) or 0)


#: options of ``scoresde validate --checkpoint`` that the analytic suite does not take
_VALIDATE_MODEL_ONLY = ("n", "seed", "shape", "nfe", "schedules", "t_end", "ref_tol")


def _validate_checkpoint(args: argparse.Namespace) -> int:
    """``scoresde validate --checkpoint``: every deterministic solver on the checkpoint's own
    network against its pf_ode reference (:mod:`validation.model_check`), float64."""
    from .checkpoint import load_checkpoint
    import validation.model_check as om
    bad = [o for o, v in (("--sdes", args.sdes), ("--sections", args.sections), ("--record-bounds", args.record_bounds),
                          ("--tol", args.tol is not None)) if v]
    if bad:
        raise RunError(f"{', '.join(bad)} apply to the analytic suite, not to --checkpoint")
    if args.out is None:
        raise RunError("--out DIR is required with --checkpoint")
    if args.n is not None and args.n < 1:
        raise RunError(f"--n must be >= 1, got {args.n}")
    model, cfg = load_checkpoint(args.checkpoint, weights=args.weights, dtype=torch.float64)
    shape = _data_shape(cfg, args.shape)
    n = args.n or (256 if len(shape) == 1 else 16)          # vectors: 256; images: 16
    seed = 0 if args.seed is None else args.seed
    x_T = model.sde.prior_sample([n, *shape], torch.Generator().manual_seed(seed), dtype=torch.float64)
    quick = bool(args.quick)
    nfes = args.nfe or (om.QUICK_NFE if quick else om.FULL_NFE)
    schedules = args.schedules or ([None] if quick else None)
    configs = om.configurations(args.methods or None, schedules)   # bad names: ValueError before any solve
    bar = None
    if not args.quiet:
        from tqdm import tqdm
        bar = tqdm(total=len(configs), desc="validate", leave=False, file=sys.stderr)
        eprint(f"reference: pf_ode of {args.checkpoint} on {n} x {shape} samples (float64), then "
               f"{len(configs)} configurations x {len(nfes)} NFE values")
    res = om.on_model(model, x_T, t_end=args.t_end, nfes=nfes, methods=args.methods or None, schedules=schedules,
                      ref_tol=args.ref_tol, progress=(lambda name: (bar.set_postfix_str(name), bar.update(1)))
                      if bar is not None else None)
    if bar is not None:
        bar.close()
    res["setup"].update(checkpoint=os.path.abspath(args.checkpoint), seed=seed, weights=cfg["weights_used"],
                        tier="quick" if quick else "full")
    out = om.write_report(res, args.out, title=f"Solvers on {os.path.basename(args.checkpoint)}",
                          plots=not args.no_plots)
    if not args.quiet:
        ref = res["reference"]
        print(f"reference: pf_ode dopri8 rtol=atol={ref['rtol']:g}, {ref['nfe']} NFE; its error vs a 10x tighter "
              f"solve: {ref['error']:.2e} RMS")
        for b, c in res["recommended"].items():
            if c is not None:
                print(f"NFE <= {b:>4}: {c['name']:<40} RMS error {c['error']:.2e} (NFE {c['nfe']})")
        print(f"wrote {out}/report.md and results.json")
    return 0


# =========================================================================== parser
def _add_run_args(p: argparse.ArgumentParser, block: int, batch: int) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by `scoresde train`")
    p.add_argument("--out", required=True, help="output directory (shards, run.json, progress.json, results)")
    p.add_argument("--seed", type=int, default=None,
                   help="base seed; unit i uses its own seed from (seed, i) (default: drawn at random, printed and "
                        "recorded in run.json; a resumed run reuses the recorded one)")
    p.add_argument("--block-size", type=int, default=block, help="units per shard file")
    p.add_argument("--batch-size", type=int, default=batch, help="units per solver call (does not change results)")
    p.add_argument("--micro-batch", type=int, default=64,
                   help="rows per network call (fixed, so results are batch-independent; part of the config)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:K or auto (default: cpu)")
    p.add_argument("--weights", choices=("default", "ema", "raw"), default="default",
                   help="EMA or raw weights (default: EMA when the checkpoint has them)")
    p.add_argument("--t-end", type=_finite_float, default=None,
                   help="data end of the time interval (default: the SDE's)")
    p.add_argument("--on-failure", choices=("raise", "record"), default="raise",
                   help="stop at a failed unit, or record its status and go on")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out (finished shards are kept; a new directory just starts)")
    g.add_argument("--overwrite", action="store_true", help="delete this run's files in --out and start over")
    p.add_argument("--finalize", action="store_true", help="only check completeness and merge the shards")
    p.add_argument("--shard", default=None, metavar="I/S",
                   help="run only shard I of S (blocks I::S), without torch.distributed; the last to finish merges")
    p.add_argument("--dist-timeout", type=float, default=1800.0, help="seconds before a barrier gives up")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages (errors still print)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")


_VALIDATE_HELP = """Without --checkpoint: the solver accuracy suite on analytic problems (python -m validation;
quick tier by default).  With --checkpoint: every deterministic solver on that network, against a
tight pf_ode reference of the network itself; writes report.md, results.json and a plot to --out,
with a recommended (method, schedule, options) per NFE budget.

  scoresde validate --quick
  scoresde validate --checkpoint runs/gmm.pt --out runs/gmm-validate [--quick]
"""


def _add_validate_parser(sub) -> None:
    """The validate verb: the suite's own options (when the suite is importable) plus the
    --checkpoint ones."""
    try:
        from validation.suite import parser as suite_parser
        parents = [suite_parser(add_help=False)]
    except ImportError:   # not a source checkout: cmd_validate says so
        parents = []
    v = sub.add_parser("validate", parents=parents, description=_VALIDATE_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="solver accuracy: the analytic suite, or --checkpoint: on your own network")
    if not parents:
        for opt in ("--quick", "--record-bounds", "--quiet"):
            v.add_argument(opt, action="store_true", default=None)
        for opt in ("--methods", "--sdes", "--sections"):
            v.add_argument(opt, nargs="*")
        v.add_argument("--out", default=None)
    m = v.add_argument_group("on your own network (--checkpoint)")
    m.add_argument("--checkpoint", default=None, help="a checkpoint written by `scoresde train`")
    m.add_argument("--n", type=int, default=None, help="start samples (default 256 for vectors, 16 for images)")
    m.add_argument("--seed", type=int, default=None, help="seed of the prior draw x_T (default 0)")
    m.add_argument("--shape", type=int, nargs="+", default=None, help="sample shape (default: the checkpoint's)")
    m.add_argument("--nfe", type=int, nargs="+", default=None,
                   help="target NFE values (default 5 6 8 10 15 20 30 50 100 200; --quick: 5 10 20 50)")
    m.add_argument("--schedules", nargs="+", default=None, choices=("uniform", "log_snr", "quadratic", "karras"),
                   help="time grids (default: all four; --quick: each method's default)")
    m.add_argument("--t-end", type=float, default=None, help="data end of the time interval (default: the SDE's)")
    m.add_argument("--ref-tol", type=float, default=None, help="rtol = atol of the pf_ode reference (default 1e-9)")
    m.add_argument("--weights", choices=("default", "ema", "raw"), default="default")
    m.add_argument("--no-plots", action="store_true", help="numbers only (report.md, results.json)")
    m.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    v.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    v.set_defaults(func=cmd_validate, quick=None, out=None, tol=None)   # per mode: see cmd_validate


def build_parser(prog: str = "scoresde") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Train, sample and evaluate score-based diffusion models.",
                                 epilog="Long runs resume: re-run the same command with --resume.")
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a score network on a data set; writes a checkpoint")
    t.add_argument("--data", required=True,
                   help="a toy set (checkerboard, moons, swiss_roll, 8gaussians, rings, gmm), digits (the 1497 "
                        "training images of scikit-learn's 8x8 digits, extra scoresde[data]; levels 0..16 -> "
                        "[-1, 1], dequantized afresh every batch) or a .npy/.npz/.pt file")
    t.add_argument("--n-data", type=int, default=None, help="use the first N rows of a data file")
    t.add_argument("--out", required=True, help="checkpoint path, e.g. runs/model.pt")
    t.add_argument("--sde", choices=_SDE_NAMES, default="vp")
    t.add_argument("--beta-min", type=float, default=0.1)
    t.add_argument("--beta-max", type=float, default=20.0)
    t.add_argument("--sigma-min", type=float, default=None)
    t.add_argument("--sigma-max", type=float, default=None)
    t.add_argument("--prediction", choices=("eps", "x0", "v", "score", "edm", "flow"), default="eps")
    t.add_argument("--time-input", choices=("t", "log_snr", "c_noise", "sigma"), default="t",
                   help="what the network receives as its time input")
    t.add_argument("--net", choices=("auto", "mlp", "unet"), default="auto")
    t.add_argument("--hidden", type=int, default=128, help="MLP width")
    t.add_argument("--depth", type=int, default=3)
    t.add_argument("--channels", type=int, default=32)
    t.add_argument("--embedding", choices=("fourier", "sinusoidal"), default="fourier")
    t.add_argument("--weighting", choices=("eps", "sigma2", "likelihood", "snr", "min_snr", "v", "edm"), default="eps")
    t.add_argument("--time-sampling", choices=("uniform", "log_snr", "lognormal"), default=None)
    t.add_argument("--t-min", type=float, default=None)
    t.add_argument("--steps", type=int, default=4000)
    t.add_argument("--batch-size", type=int, default=512)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine")
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--ema", type=float, default=0.999, help="EMA decay (0: no EMA)")
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--save-every", type=int, default=0, help="also save every K steps (0: only at the end)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue training the checkpoint at --out")
    g.add_argument("--overwrite", action="store_true")
    t.add_argument("--quiet", action="store_true")
    t.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="draw samples (sharded, resumable)")
    _add_run_args(s, block=1000, batch=256)
    s.add_argument("-n", "--n", type=int, required=True, help="number of samples")
    s.add_argument("--method", default="dpmpp_2m", help="a solvers method name (solvers.available_methods())")
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--schedule", default=None, choices=("uniform", "log_snr", "quadratic", "karras"))
    s.add_argument("--final-denoise", action="store_true")
    s.add_argument("--option", action="append", metavar="KEY=VALUE", help="a method option (repeatable)")
    s.add_argument("--shape", type=int, nargs="+", default=None, help="sample shape (default: the checkpoint's)")
    s.set_defaults(func=cmd_sample)

    lk = sub.add_parser("likelihood", help="log-likelihood / bits per dim over a data set (sharded, resumable)")
    _add_run_args(lk, block=100, batch=100)
    lk.add_argument("--data", required=True,
                    help="a toy set name, digits:test (the 300 test digits, dequantized with --data-seed; bits/dim "
                         "per level bin, 17 levels) or digits:train, or a .npy/.npz/.pt file (PATH:KEY)")
    lk.add_argument("-n", "--n", type=int, default=None, help="number of data points (required for toy sets)")
    lk.add_argument("--data-seed", type=int, default=1,
                    help="seed of a toy set or of the digits' dequantization (training draws from another stream)")
    lk.add_argument("--trace", choices=("exact", "hutchinson"), default=None,
                    help="divergence estimator (default: exact up to 256 dimensions)")
    lk.add_argument("--probes", type=int, default=1)
    lk.add_argument("--method", default="dopri5")
    lk.add_argument("--rtol", type=float, default=None, help="default 1e-5 (float32: 100 eps)")
    lk.add_argument("--atol", type=float, default=1e-5)
    lk.add_argument("--ode-steps", type=int, default=None,
                    help="fixed-step methods (rk4, ...): steps; then units are batched")
    lk.add_argument("--max-steps", type=int, default=10_000)
    lk.add_argument("--data-range", type=float, nargs=2, default=None, metavar=("A", "B"))
    lk.add_argument("--dequantization", choices=("uniform", "none"), default=None)
    lk.add_argument("--bits", type=int, default=None)
    lk.add_argument("--exclude-failed", action="store_true", help="average over the successful points only")
    lk.set_defaults(func=cmd_likelihood)

    _add_validate_parser(sub)
    return ap


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Entry point of the ``scoresde`` console script and ``python -m scoresde``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or "scoresde"
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.command == "likelihood" and args.bits is not None and args.data_range is None:
        parser.error("--bits needs --data-range A B (and --dequantization): bits/dim of discrete data are "
                     "measured on the data's range")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return args.func(args, argv, prog)
    except (RunError, FileNotFoundError) as err:
        msg = f"{type(err).__name__}: {err}" if isinstance(err, FileNotFoundError) else str(err)
        eprint(f"{prog} {args.command}: error: {msg}")
        return 1
    except OSError as err:      # a failed write (disk full, file size limit) or read
        eprint(f"{prog} {args.command}: error: {_error_text(err)}")
        return 1
    except ImportError as err:  # an optional extra is missing (scoresde.data.MissingExtraError); others propagate
        if not getattr(err, "extra", None):
            raise
        eprint(f"{prog} {args.command}: error: {err}")
        return 1
    except (ValueError, TypeError) as err:  # bad input caught by the library (checkpoint, data, options)
        eprint(f"{prog} {args.command}: error: {type(err).__name__}: {err}")
        return 1
