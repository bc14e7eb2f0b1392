"""The sharded, resumable run loop shared by ``scoresde sample`` and ``scoresde likelihood``
(see ``docs/long-runs.md``): output-directory claim, ``run.json`` manifest, the block loop
with its interruption handling, and the final completeness check and merge."""
from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .. import _runs
from .._runs import RunError, eprint
from .common import EXIT_INTERRUPTED, _device, _error_text, _resume_command
from .dist import _Dist, _Stop
from .progress import _Progress


@dataclass(frozen=True)
class RunOptions:
    """What the run engine needs of a ``sample`` or ``likelihood`` command line."""

    out: str                   # the run directory
    device: str                # cpu, cuda, cuda:K or auto
    shard: str | None          # "i/S": a simulated shard
    dist_timeout: float        # seconds before a barrier gives up
    block_size: int            # units per shard file
    seed: int | None           # None: drawn at random (or the one recorded in run.json)
    quiet: bool
    resume: bool
    overwrite: bool
    finalize_only: bool        # only check completeness and merge

    @classmethod
    def from_args(cls, args) -> "RunOptions":
        """From the parsed ``sample``/``likelihood`` arguments."""
        return cls(out=args.out, device=args.device, shard=args.shard, dist_timeout=args.dist_timeout,
                   block_size=args.block_size, seed=args.seed, quiet=args.quiet, resume=args.resume,
                   overwrite=args.overwrite, finalize_only=bool(args.finalize))


def _resolve_seed(seed: int | None, out: str, announce: bool) -> tuple[int, bool]:
    """``(seed, drawn)``: no --seed means a random one, printed and recorded in run.json; a
    resumed run (or another --shard of it) reuses the recorded seed."""
    if seed is not None:
        return seed, False
    try:
        with open(os.path.join(out, "run.json"), "r", encoding="utf-8") as fh:
            recorded = json.load(fh)["config"]["seed"]
        if isinstance(recorded, int):
            return recorded, True
    except (OSError, ValueError, KeyError, TypeError):
        pass
    seed = secrets.randbits(31)
    if announce:
        eprint(f"seed {seed} (drawn at random, recorded in run.json; pass --seed {seed} to repeat the run)")
    return seed, True


class _Job:
    """What a sharded command computes; subclasses define units, shard format and merge.
    :func:`_execute` sets ``seed`` (the resolved base seed) and ``device`` before ``setup``."""

    kind = ""
    ext = ""
    outputs: tuple = ()

    def __init__(self) -> None:
        self.seed: int | None = None
        self.device: torch.device | None = None

    def compute(self, first: int, last: int) -> tuple[bytes, list[int], list[str]]:
        raise NotImplementedError

    def check(self, path: str, first: int, last: int) -> str | None:
        raise NotImplementedError

    def finalize(self, out: str, blocks: list) -> dict:
        raise NotImplementedError


def _claim_out(out: str, opts: RunOptions, job_outputs: Sequence[str], dist: "_Dist",
               need: int) -> _runs.RunDirLock:
    """Output directory policy, before any model is loaded: refuse a non-empty directory
    without --resume/--overwrite, then take the directory's writer lock (a simulated shard
    shares it with the other shards of its run), and only then delete for --overwrite."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunError(f"--out {out} exists and is not a directory")
    existing = _runs.existing_files(out)
    if existing and opts.overwrite and dist.sim:
        raise RunError("--overwrite with --shard would let the shards delete each other's work; "
                       "clear the directory once, then run the shards")
    if existing and not (opts.overwrite or opts.resume or dist.sim or opts.finalize_only):
        raise RunError(f"output directory {out} already exists and is not empty ({len(existing)} files); "
                       f"pass --resume to continue the run in it, or --overwrite to start over")
    _runs.preflight_dir(out)
    lock = _runs.RunDirLock(out, (dist.rank, dist.world) if dist.sim else None).acquire()
    try:
        if existing and opts.overwrite:
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


def _pending_blocks(job: _Job, out: str, mine: list) -> list:
    """This rank's blocks still to compute: a shard that loads and checks is kept, an invalid
    one is renamed ``*.corrupt`` and recomputed."""
    pending = []
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
    return pending


def _plan_message(job: _Job, opts: RunOptions, dist: _Dist, n: int, blocks: list, mine: list,
                  pending: list) -> str:
    done_units = n - sum(l - f + 1 for f, l in pending) if dist.world == 1 else None
    msg = f"{job.kind}: {n} units in {len(blocks)} blocks of {opts.block_size}"
    if dist.world > 1:
        msg += f"; rank {dist.rank} of {dist.world} owns {len(mine)} blocks, {len(pending)} to compute"
    elif done_units:
        msg += f"; resuming: {done_units} units already done, {len(pending)} blocks to compute"
    return msg


def _run_blocks(job: _Job, out: str, pending: list, dist: _Dist, stop: _Stop, progress: _Progress) -> None:
    """Compute and write each pending block atomically; stop after the block in which a
    signal arrived."""
    for first, last in pending:
        data, nfe, status = job.compute(first, last)
        _runs.atomic_write_bytes(os.path.join(out, _runs.shard_name(first, last, job.ext)), data)
        if dist.rank0:
            progress.update(nfe, status)
        if stop.flag:
            break


def _interrupted(job: _Job, drawn: int | None, argv: Sequence[str], prog: str, dist: _Dist,
                 stop: _Stop, progress: _Progress, n: int) -> int:
    if dist.rank0:
        progress.write("interrupted")
    progress.close()
    done = progress.scan()
    eprint(f"scoresde {job.kind}: interrupted by {stop.signame} with {done} of {n} units done "
           f"(finished shards are kept).")
    eprint(f"resume with: {_resume_command(prog, argv, dist.world, dist.sim, drawn)}")
    return EXIT_INTERRUPTED


def _merge(job: _Job, out: str, blocks: list, dist: _Dist, progress: _Progress, quiet: bool) -> dict | None:
    """Rank 0 (or the last simulated shard to finish) checks completeness and merges; None
    when other simulated shards are still missing."""
    if dist.sim:
        names = set(os.listdir(out))
        missing = [b for b in blocks if _runs.shard_name(*b, job.ext) not in names]
        if missing:
            if not quiet:
                eprint(f"shard {dist.rank}/{dist.world} finished; {len(missing)} blocks of other shards "
                       f"are still missing; the last shard to finish merges (or run with --finalize)")
            return None
    summary = job.finalize(out, blocks)
    progress.write_file = True            # (with --shard, whichever shard merges)
    progress.write("done")
    return summary


def _execute(job: _Job, opts: RunOptions, argv: Sequence[str], prog: str,
             setup: Callable[[bool], dict], n: int, need_bytes: int) -> int:
    """The sharded loop shared by ``sample`` and ``likelihood``.

    ``setup(rank0)`` loads the checkpoint/data and returns ``{"config": ..., "extra": ...}``;
    it runs on rank 0 first (checkpoint validated and hashed while the others wait), then
    on the other ranks.  Before it runs, ``job.seed`` and ``job.device`` are set."""
    out = os.path.abspath(opts.out)
    device = _device(opts.device)
    dist = _Dist(opts.shard, device.type, opts.dist_timeout)
    stop = _Stop()
    progress = None
    lock = None          # rank 0 (or each simulated shard) holds the directory for the whole run
    seed, drawn = opts.seed, False
    try:
        if dist.pg and device.type == "cuda":
            device = _device(opts.device, dist.local_rank)
            torch.cuda.set_device(device)
        job.device = device
        quiet = opts.quiet or not dist.rank0
        error, info = None, None
        if dist.rank0 or dist.sim:
            try:
                lock = _claim_out(out, opts, job.outputs, dist, need_bytes)
                with lock.section(opts.dist_timeout):     # simulated shards: one at a time
                    seed, drawn = _resolve_seed(seed, out, announce=not quiet)
                    job.seed = seed
                    info = setup(True)
                    _manifest(out, info["config"], argv, info["extra"])
                    removed = _runs.clean_stale_tmp(out)
                if removed and not quiet:
                    eprint(f"removed {len(removed)} stale temporary files: {removed[:5]}")
            except (RunError, OSError, ValueError, TypeError) as err:
                error = _error_text(err)
        error, seed = dist.share((error, seed))
        job.seed = seed
        if error:
            raise RunError(error)
        if not (dist.rank0 or dist.sim):
            info = setup(False)
        blocks = _runs.make_blocks(n, opts.block_size)
        mine = blocks[dist.rank::dist.world]
        pending = [] if opts.finalize_only else _pending_blocks(job, out, mine)
        if not quiet:
            eprint(_plan_message(job, opts, dist, n, blocks, mine, pending))
        if pending:
            # pre-flight: one unit through the whole pipeline (model, solver, serialisation)
            f0 = pending[0][0]
            job.compute(f0, f0)
        stop.install(announce=not quiet)
        progress = _Progress(out, n, blocks, job.ext, show=not quiet, write=dist.rank0, desc=job.kind)
        _run_blocks(job, out, pending, dist, stop, progress)
        if stop.flag:
            return _interrupted(job, seed if drawn else None, argv, prog, dist, stop, progress, n)
        progress.close()
        dist.barrier()
        if not (dist.rank0 or dist.sim):
            return 0
        with lock.section(opts.dist_timeout):          # simulated shards: one merges at a time
            summary = _merge(job, out, blocks, dist, progress, quiet)
        if summary is None:
            return 0
        if not opts.quiet:
            print(json.dumps(summary, indent=2, sort_keys=True))
        return 0
    except KeyboardInterrupt:
        eprint(f"\nscoresde {job.kind}: stopped at once (finished shards are kept); "
               f"resume with: {_resume_command(prog, argv, dist.world, dist.sim, seed if drawn else None)}")
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
