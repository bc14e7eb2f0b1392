r"""The ``scoresde`` command: ``train | sample | likelihood | validate``.

::

    scoresde train      --data gmm --out runs/gmm.pt --steps 4000
    scoresde sample     --checkpoint runs/gmm.pt --out runs/samples -n 10000
    scoresde likelihood --checkpoint runs/gmm.pt --data gmm --n 2000 --data-seed 1 --out runs/nll

(also ``python -m scoresde ...``; ``torchrun --nproc_per_node=K -m scoresde sample ...`` on
several processes or GPUs).

**Long runs** (``sample``, ``likelihood``; see ``docs/long-runs.md``).  Work unit i (sample
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

Modules: :mod:`.parser` (the arguments), :mod:`.app` (``main``: errors to exit status),
:mod:`.engine` (the sharded run loop, configured by :class:`.engine.RunOptions`), :mod:`.dist`
(ranks and signals), :mod:`.progress`, :mod:`.common` (shared helpers), and one module per
verb: :mod:`.train`, :mod:`.sample`, :mod:`.likelihood`, :mod:`.validate`.  The core library
never imports this package.
"""
from .app import main
from .common import EXIT_INTERRUPTED
from .parser import build_parser

__all__ = ["main", "EXIT_INTERRUPTED", "build_parser"]
