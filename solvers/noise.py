r"""Noise sources for stochastic samplers.

A noise source is called as ``noise(i, t0, t1, like)`` and returns a standard normal
tensor shaped like ``like`` for step ``i`` between times ``t0`` and ``t1`` (so that the
sampler's Brownian increment is :math:`\sqrt{|t_1-t_0|}\,\xi`).  Stochastic solvers draw
all their randomness through it; nothing in the package calls ``torch.randn`` without a
generator.

- :class:`GeneratorNoise`: one ``torch.Generator`` for the batch, or one per sample (then
  sample j's noise does not depend on the rest of the batch).  A CPU generator may feed a
  CUDA state: the noise is drawn on the CPU and moved (reproducible across devices).
- :class:`BrownianNoise`: one Brownian path :math:`W` (torchsde's ``BrownianInterval``),
  queried as :math:`(W(t_1) - W(t_0))/\sqrt{|t_1-t_0|}`; the same path at every step size,
  which is what strong-order tests need.
"""
from __future__ import annotations

import math
from typing import Any, Protocol, Sequence

import torch
from torch import Tensor

__all__ = ["NoiseSource", "GeneratorNoise", "BrownianNoise", "ZeroNoise", "make_noise"]


class NoiseSource(Protocol):
    def __call__(self, i: int, t0: float, t1: float, like: Tensor) -> Tensor: ...


#: dtype in which GeneratorNoise draws, whatever the state dtype (then cast): one seed gives
#: the same noise for float16/32/64 states (so a float32 run tracks its float64 twin) and
#: works on devices without float64.
NOISE_DTYPE = torch.float32


class GeneratorNoise:
    """Standard normal noise from a ``torch.Generator`` (or a list, one per sample), drawn in
    :data:`NOISE_DTYPE` and cast to the state's dtype."""

    def __init__(self, generator: torch.Generator | Sequence[torch.Generator] | None = None):
        self.generator = generator

    def __call__(self, i: int, t0: float, t1: float, like: Tensor) -> Tensor:
        g = self.generator
        if isinstance(g, (list, tuple)):
            if len(g) != like.shape[0]:
                raise ValueError(f"generator: got {len(g)} generators for batch {like.shape[0]}")
            dev = g[0].device if g else like.device
            parts = [torch.randn(like.shape[1:], generator=gj, dtype=NOISE_DTYPE, device=dev) for gj in g]
            z = torch.stack(parts) if parts else torch.empty(like.shape, dtype=NOISE_DTYPE, device=dev)
        elif g is None:
            z = torch.randn(like.shape, dtype=NOISE_DTYPE, device=like.device)
        else:
            z = torch.randn(like.shape, generator=g, dtype=NOISE_DTYPE, device=g.device)
        return z.to(dtype=like.dtype, device=like.device)


class ZeroNoise:
    """Always zero: turns a stochastic sampler into its mean path (for moment recursions)."""

    def __call__(self, i: int, t0: float, t1: float, like: Tensor) -> Tensor:
        return torch.zeros_like(like)


class BrownianNoise:
    r"""Increments of one Brownian path over ``[t_min, t_max]``, consistent across grids.

    Wraps ``torchsde.BrownianInterval`` (shape ``[B, ...]``; ``entropy`` seeds it).  The
    returned value is :math:`(W(\max) - W(\min))/\sqrt{|t_1 - t_0|}`, i.e. a standard
    normal whose sum over sub-steps reproduces the coarse increment exactly.

    **Which path.**  By default (torchsde's fast tree) the path is fixed by ``entropy``
    *and by the queries already made*: one object queried on several grids (e.g. N and 2N
    steps) is one consistent path -- reuse the same object across step sizes for a strong
    order test.  Two objects with the same entropy agree only if queried at the same times
    in the same order.  ``halfway_tree=True`` (torchsde's dyadic ``BrownianTree``) makes the
    path a function of ``entropy`` alone, whatever the queries, at roughly 30x the cost per
    query.
    """

    def __init__(self, shape: Sequence[int], t_min: float, t_max: float, entropy: int = 0,
                 dtype: torch.dtype = torch.float64, device: Any = "cpu", tol: float | None = None,
                 halfway_tree: bool = False):
        import torchsde

        if not t_min < t_max:
            raise ValueError(f"t_min must be < t_max, got {t_min}, {t_max}")
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.shape = tuple(shape)
        self._bm = torchsde.BrownianInterval(
            t0=self.t_min, t1=self.t_max, size=self.shape, dtype=dtype, device=device, entropy=entropy,
            tol=tol if tol is not None else 1e-12 * (self.t_max - self.t_min), levy_area_approximation="none",
            halfway_tree=bool(halfway_tree),
        )

    def increment(self, t0: float, t1: float) -> Tensor:
        r""":math:`W(\max(t_0,t_1)) - W(\min(t_0,t_1))`; times outside ``[t_min, t_max]`` (beyond
        round-off) are a ValueError, never a silent clamp."""
        lo, hi = min(t0, t1), max(t0, t1)
        slack = 1e-12 * max(1.0, abs(self.t_min), abs(self.t_max))
        if lo < self.t_min - slack or hi > self.t_max + slack:
            raise ValueError(
                f"BrownianNoise covers [t_min, t_max]=[{self.t_min:.6g}, {self.t_max:.6g}]; "
                f"asked for the increment over [{lo:.6g}, {hi:.6g}]"
            )
        lo, hi = max(lo, self.t_min), min(hi, self.t_max)
        return self._bm(lo, hi)

    def __call__(self, i: int, t0: float, t1: float, like: Tensor) -> Tensor:
        dw = self.increment(t0, t1)
        if dw.shape != like.shape:
            raise ValueError(f"BrownianNoise has shape {tuple(dw.shape)} but the state has shape {tuple(like.shape)}")
        return (dw / math.sqrt(abs(t1 - t0))).to(dtype=like.dtype, device=like.device)


def make_noise(generator: Any, batch: int, device: torch.device) -> NoiseSource:
    """The noise source for ``sample(generator=...)``: a Generator, a list of Generators
    (one per sample), an existing noise source, or None (non-deterministic)."""
    if generator is None:
        return GeneratorNoise(None)
    if isinstance(generator, torch.Generator):
        if generator.device.type != "cpu" and generator.device != device:
            raise ValueError(
                f"generator is on {generator.device} but x_T is on {device}; use a CPU generator "
                "(reproducible across devices) or one on x_T's device"
            )
        return GeneratorNoise(generator)
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"generator: got {len(generator)} generators for batch {batch} (one per sample)")
        for j, g in enumerate(generator):
            if not isinstance(g, torch.Generator):
                raise TypeError(f"generator[{j}] must be a torch.Generator, got {type(g).__name__}")
        devs = {g.device for g in generator}
        if len(devs) > 1:
            raise ValueError(f"all generators must be on one device, got {sorted(map(str, devs))}")
        dev = next(iter(devs), torch.device("cpu"))
        if dev.type != "cpu" and dev != torch.device(device):
            raise ValueError(
                f"generators are on {dev} but x_T is on {device}; use CPU generators "
                "(reproducible across devices) or ones on x_T's device"
            )
        return GeneratorNoise(list(generator))
    if callable(generator):
        return generator
    raise TypeError(
        f"generator must be a torch.Generator, a list of them, a noise source or None; got {type(generator).__name__}"
    )
