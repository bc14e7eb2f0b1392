"""Progress of a sharded run: a tqdm bar on rank 0 and ``progress.json``."""
from __future__ import annotations

import os
import sys
import time
from typing import Sequence

from .. import _runs
from .._runs import eprint


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
