"""Ranks and signals of a ``scoresde`` run: :class:`_Dist` (torchrun's ranks, or a simulated
``--shard i/S``) and :class:`_Stop` (SIGINT/SIGTERM finish the current block)."""
from __future__ import annotations

import os
import signal
from datetime import timedelta
from typing import Any

from .._runs import RunError, eprint


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
