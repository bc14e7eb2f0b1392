r"""Machinery for long, sharded, resumable runs (see docs/long-runs.md and
the faults survived in docs/reliability.md).

- **Atomic files**: every file is written to ``.{name}.tmp-{pid}`` in the *same* directory,
  flushed and ``fsync``-ed, moved into place with ``os.replace`` and the directory is
  ``fsync``-ed; a reader (or a resumed run) sees the old file or the new one, never half of
  one.  :func:`clean_stale_tmp` removes temporaries a killed run left behind.
- **Deterministic npz**: :func:`npz_bytes` writes a zip whose entries carry a fixed date, so
  the same arrays give the same bytes (``numpy.savez`` stamps the current time).
- **Work units**: unit i gets its own seed :func:`unit_seed` (base seed, i); units are grouped
  in contiguous blocks, and rank r of S owns ``blocks[r::S]`` -- nothing padded or duplicated,
  so the result does not depend on S, on the batch size or on interruptions.
- **Manifest**: ``run.json`` holds the configuration and its hash (plus provenance);
  :func:`config_diff` lists the keys a resumed run changed.
- **Shard checks**: a finished block counts only if its file loads and has the expected
  indices, count, shape and finite values (or recorded statuses); see :func:`check_npz_shard`
  and :func:`check_jsonl_shard`.
- **One writer per run directory**: :class:`RunDirLock` holds an OS advisory lock
  (``flock``) on a file in the directory for the whole run; the kernel drops it when the
  process dies, even by SIGKILL, so a lock file left behind never blocks.

This module never imports ``solvers`` or ``torch.distributed`` at import time.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import warnings
import zipfile
from typing import Any, Iterable, Sequence

try:
    import fcntl
except ImportError:  # no flock (Windows): runs go on without the one-writer guarantee
    fcntl = None  # type: ignore[assignment]

import numpy as np

__all__ = [
    "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "fsync_dir", "clean_stale_tmp",
    "npz_bytes", "unit_seed", "make_blocks", "shard_name", "parse_shard_name", "config_hash",
    "config_diff", "sha256_file", "provenance", "check_npz_shard", "check_jsonl_shard",
    "quarantine", "preflight_dir", "RunError", "RunDirLock", "is_lock_file",
]

_TMP_RE = re.compile(r"^\..+\.tmp-\d+$")
_SHARD_RE = re.compile(r"^shard-(\d{8})-(\d{8})\.(npz|jsonl)$")
STATUSES = ("success", "nonfinite", "failed", "max_steps", "step_size_underflow")


class RunError(RuntimeError):
    """A run cannot start or finish (refused resume, incomplete shards, ...): the message
    says why and what to do; the command line prints it without a traceback."""


# --------------------------------------------------------------------- atomic files
def fsync_dir(path: str) -> None:
    """fsync a directory so that a rename in it is durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, replace,
    fsync the folder).  On any error the temp file is removed and the old file kept; an
    OSError (disk full, file size limit) names ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(err, OSError) and err.errno is not None and err.filename != path:
            raise type(err)(err.errno, err.strerror, path) from err
        raise
    fsync_dir(folder)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:      # exists, owned by someone else
        return True
    return True


def clean_stale_tmp(folder: str) -> list[str]:
    """Delete ``.*.tmp-<pid>`` files left by a killed writer in ``folder`` (not those of a
    live process on this machine, e.g. a concurrent ``--shard``); returns their names."""
    removed = []
    for name in os.listdir(folder):
        if _TMP_RE.match(name) and not _pid_alive(int(name.rsplit("-", 1)[1])):
            try:
                os.unlink(os.path.join(folder, name))
                removed.append(name)
            except OSError:
                pass
    return removed


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An uncompressed ``.npz`` of ``arrays`` (in key order) with fixed entry dates: the same
    arrays always give the same bytes.  Loads with ``numpy.load(allow_pickle=False)``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in arrays:
            arr = np.ascontiguousarray(arrays[name])
            if arr.dtype == object:
                raise TypeError(f"array {name!r} has dtype object (would need pickle)")
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, arr, allow_pickle=False)
    return buf.getvalue()


# ------------------------------------------------------------------------ units
def unit_seed(base_seed: int, index: int) -> int:
    """The seed of work unit ``index`` of a run with ``base_seed``: 63 bits of
    sha256("scoresde-unit:{base}:{index}"), independent of batch, rank and world size."""
    h = hashlib.sha256(f"scoresde-unit:{int(base_seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def make_blocks(n: int, block_size: int) -> list[tuple[int, int]]:
    """Contiguous blocks ``(first, last)`` (inclusive) covering ``[0, n)``."""
    return [(i, min(i + block_size, n) - 1) for i in range(0, n, block_size)]


def shard_name(first: int, last: int, ext: str) -> str:
    return f"shard-{first:08d}-{last:08d}.{ext}"


def parse_shard_name(name: str) -> tuple[int, int, str] | None:
    m = _SHARD_RE.match(name)
    return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else None


# --------------------------------------------------------------------- manifest
def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def config_hash(config: dict) -> str:
    """sha256 of the canonical JSON of ``config``."""
    return hashlib.sha256(_canonical(config).encode()).hexdigest()


def config_diff(old: dict, new: dict, prefix: str = "", old_label: str = "run.json") -> list[str]:
    """Human-readable differences between two configs: ``"steps: 20 (run.json) -> 10 (now)"``."""
    out = []
    for k in sorted(set(old) | set(new)):
        key = f"{prefix}{k}"
        if k not in new:
            out.append(f"{key}: {old[k]!r} ({old_label}) -> absent (now)")
        elif k not in old:
            out.append(f"{key}: absent ({old_label}) -> {new[k]!r} (now)")
        elif isinstance(old[k], dict) and isinstance(new[k], dict):
            out.extend(config_diff(old[k], new[k], key + ".", old_label))
        elif _canonical(old[k]) != _canonical(new[k]):
            out.append(f"{key}: {old[k]!r} ({old_label}) -> {new[k]!r} (now)")
    return out


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _git_sha() -> str | None:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(os.path.join(here, ".git")):
        return None
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def provenance() -> dict:
    """Versions, platform and git sha (recorded in run.json, not part of the config hash)."""
    import torch
    from . import __version__
    return {
        "scoresde": __version__, "torch": torch.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "platform": platform.platform(), "git_sha": _git_sha(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "num_threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ----------------------------------------------------------------- shard checks
def quarantine(path: str) -> str:
    """Rename a corrupt file to ``*.corrupt`` (``*.corrupt.1``, ... if taken); returns the new path."""
    target = path + ".corrupt"
    k = 0
    while os.path.exists(target):
        k += 1
        target = f"{path}.corrupt.{k}"
    os.replace(path, target)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return target


def check_npz_shard(path: str, first: int, last: int, shape: Sequence[int], dtype: str) -> str | None:
    """None if ``path`` is a complete sample shard for units ``first..last``, else the reason.

    Expected keys: ``index`` (int64, exactly ``first..last``), ``x`` (``[n, *shape]`` of
    ``dtype``), ``nfe`` (int64 ``[n]``), ``status`` (strings); ``x`` finite wherever status is
    ``success``."""
    n = last - first + 1
    try:
        with np.load(path, allow_pickle=False) as z:
            files = set(z.files)
            if not {"index", "x", "nfe", "status"} <= files:
                return f"missing arrays (has {sorted(files)})"
            index, x, nfe, status = z["index"], z["x"], z["nfe"], z["status"]
    except Exception as err:  # zip/format errors of a truncated or corrupt file
        return f"unreadable ({type(err).__name__}: {err})"
    if index.shape != (n,) or not np.array_equal(index, np.arange(first, last + 1)):
        return f"index is not {first}..{last}"
    if x.shape != (n, *shape):
        return f"x has shape {x.shape}, expected {(n, *shape)}"
    if str(x.dtype) != dtype:
        return f"x has dtype {x.dtype}, expected {dtype}"
    if nfe.shape != (n,) or status.shape != (n,):
        return "nfe/status have the wrong length"
    if not set(status.tolist()) <= set(STATUSES):
        return f"unknown status values {sorted(set(status.tolist()) - set(STATUSES))}"
    ok = status == "success"
    if not np.isfinite(x.reshape(n, -1)[ok]).all():
        return "non-finite values in samples recorded as successful"
    return None


def read_jsonl(path: str) -> list[dict]:
    with open(path, "r", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def check_jsonl_shard(path: str, first: int, last: int) -> str | None:
    """None if ``path`` is a complete likelihood shard for units ``first..last``: one JSON
    line per index in order, each with a known status and, when successful, a finite
    ``log_prob``."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        if not raw.endswith(b"\n"):
            return "truncated (no final newline)"
        rows = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
    except Exception as err:
        return f"unreadable ({type(err).__name__}: {err})"
    if [r.get("index") for r in rows] != list(range(first, last + 1)):
        return f"indices are not {first}..{last}"
    for r in rows:
        if r.get("status") not in STATUSES:
            return f"unknown status {r.get('status')!r} at index {r.get('index')}"
        lp = r.get("log_prob")
        if r["status"] == "success" and not (isinstance(lp, (int, float)) and math.isfinite(lp)):
            return f"index {r['index']} is 'success' without a finite log_prob"
    return None


# ------------------------------------------------------------ one writer per directory
LOCK_FILE = ".scoresde.lock"
_SETUP_LOCK = ".scoresde-setup.lock"
_SHARD_LOCK_RE = re.compile(r"^\.scoresde-shard-(\d+)-of-(\d+)\.lock$")
_warned_unlocked = False


def is_lock_file(name: str) -> bool:
    """Whether ``name`` is one of the lock files :class:`RunDirLock` keeps in a run directory."""
    return name.startswith(".scoresde") and name.endswith(".lock")


def _shard_lock_name(index: int, count: int) -> str:
    return f".scoresde-shard-{index}-of-{count}.lock"


def _unlocked(reason: str) -> None:
    global _warned_unlocked
    if not _warned_unlocked:
        _warned_unlocked = True
        warnings.warn(f"run directories are not protected against a second writer here ({reason}); "
                      "do not start two runs on one --out", RuntimeWarning, stacklevel=3)


class _FileLock:
    """``flock`` on one file (exclusive, or shared), without waiting or waiting ``wait_s``.

    Locks belong to the open file, so a second open of the same file conflicts even in the
    same process, and the kernel drops the lock when the process exits or is killed."""

    def __init__(self, path: str, shared: bool = False):
        self.path, self.shared, self.fd = path, shared, None

    def acquire(self, wait_s: float = 0.0) -> bool:
        """True once held; False if another holder keeps it for ``wait_s`` seconds.  Where the
        file system has no locks, warns once and returns True (unprotected)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        mode = (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, mode)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.05)
            except OSError as err:       # ENOLCK, EOPNOTSUPP: a file system without locks
                os.close(fd)
                _unlocked(f"{self.path}: {err.strerror or err}")
                return True
        self.fd = fd
        if not self.shared:              # the refusal of a second writer names this pid
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return True

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if not self.shared:
                os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None


def _held_by(path: str) -> int | None:
    """``-1`` if nobody holds ``path`` exclusively, else the pid its holder recorded in it
    (``None`` if unreadable)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return -1
    try:                                 # a shared probe conflicts only with an exclusive holder
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return -1
    except OSError:
        pass
    finally:
        os.close(fd)
    try:
        with open(path, "r", encoding="ascii") as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def _describe_holders(folder: str) -> str:
    shards = []
    for name in sorted(os.listdir(folder)):
        m = _SHARD_LOCK_RE.match(name)
        if m:
            pid = _held_by(os.path.join(folder, name))
            if pid != -1:
                shards.append(f"shard {m.group(1)}/{m.group(2)} ({_pid_text(pid)})")
    if shards:
        return "simulated " + ", ".join(shards)
    return _pid_text(_held_by(os.path.join(folder, LOCK_FILE)))


def _pid_text(pid: int | None) -> str:
    return f"pid {pid}" if pid not in (None, -1) else "pid unknown"


class RunDirLock:
    """The writer's claim on a run directory, held for the whole run.

    A whole run (one process, or rank 0 of a ``torchrun`` job, whose other ranks only write
    the shards of the blocks they own) holds ``.scoresde.lock`` exclusively.  A simulated
    shard ``--shard i/S`` (``shard=(i, S)``) holds it *shared*, so the shards of one run may
    run side by side while a whole-run writer is refused, and holds
    ``.scoresde-shard-i-of-S.lock`` exclusively, so one shard never runs twice.
    :meth:`section` is a short exclusive section, waited for, in which simulated shards create
    or check ``run.json`` one at a time and merge.

    A refused writer gets a :class:`RunError` naming the directory and the holder's pid.  The
    lock files stay in the directory; an unheld one (its writer died) blocks nothing.  Without
    ``fcntl`` (Windows) or on a file system without locks: a RuntimeWarning, and no lock."""

    def __init__(self, folder: str | os.PathLike, shard: tuple[int, int] | None = None):
        self.folder = os.path.abspath(os.fspath(folder))
        self.shard = shard
        self._held: list[_FileLock] = []

    def _path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def acquire(self) -> "RunDirLock":
        if fcntl is None:
            _unlocked("no fcntl module on this platform")
            return self
        main = _FileLock(self._path(LOCK_FILE), shared=self.shard is not None)
        if not main.acquire():
            raise RunError(f"output directory {self.folder} is in use by another writer "
                           f"({_describe_holders(self.folder)}); two writers would mix their results. Wait "
                           "for it to finish (or stop it) and run again with --resume, or choose another --out")
        self._held.append(main)
        if self.shard is not None:
            own = _FileLock(self._path(_shard_lock_name(*self.shard)))
            if not own.acquire():
                pid = _held_by(own.path)
                self.release()
                raise RunError(f"shard {self.shard[0]}/{self.shard[1]} of the run in {self.folder} is already "
                               f"running ({_pid_text(pid)}); run each shard once")
            self._held.append(own)
        return self

    @contextlib.contextmanager
    def section(self, wait_s: float):
        """Exclusive among the simulated shards of this directory (no-op for a whole run,
        which already holds the directory alone); waits up to ``wait_s`` seconds."""
        if self.shard is None or fcntl is None:
            yield
            return
        lock = _FileLock(self._path(_SETUP_LOCK))
        if not lock.acquire(wait_s):
            raise RunError(f"waited {wait_s:g} s for another shard in {self.folder} "
                           f"({_pid_text(_held_by(lock.path))}) to finish setting up or merging; see --dist-timeout")
        try:
            yield
        finally:
            lock.release()

    def release(self) -> None:
        while self._held:
            self._held.pop().release()

    def __enter__(self) -> "RunDirLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ------------------------------------------------------------------- pre-flight
def preflight_dir(folder: str, need_bytes: int = 0) -> None:
    """Create ``folder`` if needed and prove it writable (create, fsync and delete a file)
    and roomy enough (``need_bytes`` free); RunError otherwise, within milliseconds."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".preflight.tmp-{os.getpid()}")
        with open(probe, "wb") as fh:
            fh.write(b"scoresde")
            fh.flush()
            os.fsync(fh.fileno())
        os.unlink(probe)
    except OSError as err:
        raise RunError(f"output directory {folder} is not writable: {err.strerror or err} "
                       f"({type(err).__name__}); choose another --out") from err
    free = shutil.disk_usage(folder).free
    if need_bytes and free < need_bytes:
        raise RunError(f"not enough disk space in {folder}: {free / 2**20:.1f} MiB free, "
                       f"the run needs about {need_bytes / 2**20:.1f} MiB")


def existing_files(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if not is_lock_file(n)) if os.path.isdir(folder) else []


def remove_run_files(folder: str, names: Iterable[str]) -> None:
    """Delete the run's own files (``--overwrite``): shards, temporaries, quarantined files and
    the listed outputs; anything else in the folder is left alone."""
    names = set(names)
    for name in os.listdir(folder):
        if name in names or parse_shard_name(name) or _TMP_RE.match(name) or ".corrupt" in name:
            p = os.path.join(folder, name)
            if os.path.isfile(p):
                os.unlink(p)
    fsync_dir(folder)


def eprint(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)
