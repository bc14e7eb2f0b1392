r"""Image-scale likelihood cost: the Hutchinson trace with k probes at d = 3 x 32 x 32 = 3072.

**Setup.**  A small :class:`scoresde.nets.UNet` (float32) for 3x32x32 images under the
VPSDE, eps prediction, trained briefly (``--train-steps`` Adam steps of the eps-weighted
denoising loss, :mod:`scoresde.losses`) on image-like data made here with a fixed seed
(:func:`make_images`: a smooth colour gradient plus a few coloured Gaussian blobs, in
[-1, 1]; nothing is downloaded).  The net is trained, not left at its initialisation: the
U-Net's output convolution starts at zero, so at init eps = 0, the drift is
:math:`f(t)\,x`, its Jacobian is diagonal and a Rademacher probe is *exact* -- zero variance,
nothing to measure (and ``log_likelihood`` refuses an output built without x anyway).

**Measurement.**  For ``--n`` images and every k in ``--probes`` (default 1, 4, 16), ``--repeats``
= R independent probe draws (generator seeds differ per draw and per image)::

    solvers.log_likelihood(model, x, "hutchinson", probes=k, generator=[one per image],
                           per_sample=True, method="dopri5", rtol=..., atol=...)

- the standard error of one estimate of :math:`\log p(x)`, per image: the sample standard
  deviation (Bessel) over the R draws, averaged over the images; in nats and in bits/dim
  (:func:`solvers.bits_per_dim`; an affine map of log p, so SE_bpd = SE_nats / (D ln 2),
  whatever dequantization offset is added);
- ``within``: the estimator's own per-call standard error ``result.trace_std_err`` (the
  spread of the k probe integrals / sqrt(k); needs k >= 2), averaged -- available from one call;
- wall time per image (call time / n, median over the R calls) and NFE per image: network
  evaluations a sample took, 2 + 6 x (accepted + rejected steps) for the per-sample dopri5
  (the first stage and the starting-step trial, then 6 new stages per attempt; no knots in
  the continuous VPSDE); the batched call's ``result.nfe`` is printed too.

Expected: SE(k) ~ SE(1)/sqrt(k) (the k probe integrals are independent and unbiased), time
~ (forward + k backward passes) x NFE.  ``--exact-steps S`` adds, on the first image, the exact
trace (3072 products per evaluation) and the Hutchinson draws with the same fixed-step rk4
grid of S steps: the same x path, so their difference is probe noise only and must lie within
a few SE (the estimator is unbiased); slow (about S x 4 x 3072 backward passes).

Measured (``--n 2 --repeats 6``, shared loaded 2-core CPU, 1 thread; table in docs/likelihood.md):
SE of one estimate 98 / 69 / 24 nats (0.046 / 0.033 / 0.011 bits/dim) at k = 1 / 4 / 16, about
600 NFE per image for every k, 10.7 / 24.3 / 69.5 s per image.

Run (quick default: n = 1, R = 4; estimated from the measured run, about 9 minutes on the loaded
2-core CPU, training included):
    python benchmarks/hutchinson_image.py
Bigger:
    python benchmarks/hutchinson_image.py --n 8 --repeats 16 --train-steps 2000 --channels 32 --mults 1 2 2
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass

import torch
from torch import Tensor

import scoresde
import solvers
from scoresde.losses import DSMLoss
from scoresde.nets import UNet

DTYPE = torch.float32
LN2 = math.log(2.0)


# ----------------------------------------------------------------------------- data
def make_images(n: int, generator: torch.Generator, size: int = 32, channels: int = 3,
                blobs: int = 3) -> Tensor:
    """``n`` smooth image-like samples ``[n, channels, size, size]`` in [-1, 1] (float32): a
    random linear colour gradient plus ``blobs`` coloured Gaussian blobs (random centre,
    width 0.08-0.25 of the side, colour in [-1, 1]), clamped to [-1, 1]."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    g = generator
    u = torch.linspace(-1.0, 1.0, size)
    yy, xx = torch.meshgrid(u, u, indexing="ij")                       # [size, size]
    base = torch.rand(n, channels, 1, 1, generator=g) * 1.2 - 0.6
    slope = (torch.rand(n, channels, 2, generator=g) - 0.5) * 0.8
    img = base + slope[..., 0, None, None] * xx + slope[..., 1, None, None] * yy
    for _ in range(blobs):
        centre = torch.rand(n, 2, generator=g) * 1.6 - 0.8
        width = 0.16 + 0.34 * torch.rand(n, generator=g)               # 0.08-0.25 of the side (2 units)
        colour = torch.rand(n, channels, generator=g) * 2.0 - 1.0
        r2 = (xx - centre[:, 0, None, None]) ** 2 + (yy - centre[:, 1, None, None]) ** 2
        bump = torch.exp(-0.5 * r2 / width[:, None, None] ** 2)          # [n, size, size]
        img = img + (colour[:, :, None, None] - img) * bump[:, None]
    return img.clamp(-1.0, 1.0).to(DTYPE)


# ---------------------------------------------------------------------------- model
def build_model(channels: int = 16, mults: tuple = (1, 2), seed: int = 0) -> scoresde.ScoreModel:
    """An eps-predicting :class:`ScoreModel` on a 3-channel :class:`UNet` under the VPSDE."""
    torch.manual_seed(seed)                      # the U-Net's weight initialisation
    net = UNet(in_channels=3, channels=channels, channel_mults=tuple(mults), num_res_blocks=1, seed=seed)
    return scoresde.ScoreModel(net.to(DTYPE), scoresde.VPSDE(), prediction="eps")


def train(model: scoresde.ScoreModel, steps: int, *, batch: int = 32, lr: float = 2e-3, seed: int = 0,
          size: int = 32) -> list[float]:
    """``steps`` Adam steps of the eps-weighted DSM loss on fresh :func:`make_images` batches;
    returns the losses.  Leaves the net in eval mode."""
    net = model.net
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = DSMLoss(weighting="eps")
    g_data, g_loss = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    losses = []
    for _ in range(steps):
        x0 = make_images(batch, g_data, size=size)
        loss = loss_fn(model, x0, g_loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    net.eval()
    return losses


# ----------------------------------------------------------------------- statistics
def std_over_draws(log_probs: Tensor) -> Tensor:
    """Per-image standard error of one estimate: the sample standard deviation (Bessel,
    R - 1) over the draws of ``log_probs`` ``[R, n]`` (R >= 2) -> ``[n]``."""
    if not isinstance(log_probs, Tensor) or log_probs.ndim != 2:
        raise ValueError(f"log_probs must be a tensor [R, n], got {getattr(log_probs, 'shape', log_probs)!r}")
    if log_probs.shape[0] < 2:
        raise ValueError(f"log_probs needs R >= 2 draws to estimate a spread, got R={log_probs.shape[0]}")
    return log_probs.std(dim=0, correction=1)


def nfe_per_image(stats: dict, n: int) -> float:
    """Network evaluations per sample of a per-sample dopri5 call: the mean of the library's
    per-sample counts (``stats["evaluations_per_sample"]``: 2 + 6 per step attempt)."""
    return sum(stats["evaluations_per_sample"]) / n


@dataclass
class Draws:
    """R Hutchinson estimates of n images with k probes each."""

    k: int
    log_prob: Tensor          # [R, n] nats
    within_se: Tensor         # [R, n] result.trace_std_err (NaN for k = 1)
    seconds: list             # per call (batch of n)
    nfe_image: list           # per call, per image
    nfe_calls: list           # per call, result.nfe (batched network calls)

    @property
    def se(self) -> Tensor:
        return std_over_draws(self.log_prob)


def hutchinson_draws(model: scoresde.ScoreModel, x: Tensor, k: int, repeats: int, *, seed: int = 0,
                     rtol: float | None = 1e-5, atol: float = 1e-5, method: str = "dopri5",
                     steps: int | None = None) -> Draws:
    """``repeats`` independent Hutchinson estimates of ``log p(x)`` with ``k`` Rademacher
    probes each; the probes of image i in draw r come from the generator seeded
    ``seed + 1000 r + i`` (independent across draws and images)."""
    n = x.shape[0]
    lp, within, secs, nfe_img, nfe_calls = [], [], [], [], []
    for r in range(repeats):
        gens = [torch.Generator().manual_seed(seed + 1000 * r + i) for i in range(n)]
        t0 = time.perf_counter()
        res = solvers.log_likelihood(model, x, "hutchinson", probes=k, generator=gens, per_sample=True,
                                     method=method, steps=steps, rtol=rtol, atol=atol)
        secs.append(time.perf_counter() - t0)
        lp.append(res.log_prob.double())
        within.append(res.trace_std_err.double())
        nfe_calls.append(res.nfe)
        nfe_img.append(nfe_per_image(res.stats, n) if method == "dopri5" else res.nfe / n)
    return Draws(k, torch.stack(lp), torch.stack(within), secs, nfe_img, nfe_calls)


# ---------------------------------------------------------------------------- report
def summary_rows(draws: list[Draws], n: int, num_dims: int) -> list[dict]:
    """One row per k: SE in nats and bits/dim (mean over images), the ratios to the first
    row's SE and time, time and NFE per image."""
    rows = []
    for dr in draws:
        se = dr.se.mean().item()
        bpd = solvers.bits_per_dim(dr.log_prob, num_dims)              # [R, n]
        rows.append({"k": dr.k, "se_nats": se, "se_bpd": std_over_draws(bpd).mean().item(),
                     "within_nats": dr.within_se.nanmean().item() if dr.k > 1 else float("nan"),
                     "sec_image": statistics.median(dr.seconds) / n,
                     "nfe_image": statistics.mean(dr.nfe_image), "nfe_calls": statistics.mean(dr.nfe_calls),
                     "mean_bpd": bpd.mean().item()})
    first = rows[0]
    for row in rows:
        row["se_ratio"] = row["se_nats"] / first["se_nats"]
        row["time_ratio"] = row["sec_image"] / first["sec_image"]
        row["expect"] = math.sqrt(first["k"] / row["k"])
    return rows


def format_table(rows: list[dict]) -> str:
    head = ("|  k | SE nats | SE bits/dim | within-call SE | SE/SE(k=1) | 1/sqrt(k) | s/image | time ratio "
            "| NFE/image | mean bits/dim |")
    sep = "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"
    lines = [head, sep]
    for r in rows:
        lines.append(f"| {r['k']:2d} | {r['se_nats']:7.3f} | {r['se_bpd']:11.2e} | {r['within_nats']:14.3f} "
                     f"| {r['se_ratio']:10.3f} | {r['expect']:9.3f} | {r['sec_image']:7.2f} "
                     f"| {r['time_ratio']:10.2f} | {r['nfe_image']:9.1f} | {r['mean_bpd']:13.4f} |")
    return "\n".join(lines)


def exact_check(model: scoresde.ScoreModel, x: Tensor, steps: int, repeats: int, k: int, seed: int) -> str:
    """Exact trace vs Hutchinson (k probes, R draws) on ONE image with rk4 on ``steps`` uniform
    steps: same x path, so the gap is probe noise; returns a one-line report."""
    t0 = time.perf_counter()
    ex = solvers.log_likelihood(model, x[:1], "exact", method="rk4", steps=steps, allow_expensive=True,
                                chunk_size=256)
    t_exact = time.perf_counter() - t0
    dr = hutchinson_draws(model, x[:1], k, repeats, seed=seed, rtol=None, method="rk4", steps=steps)
    mean = dr.log_prob[:, 0].mean().item()
    se_mean = dr.se[0].item() / math.sqrt(repeats)
    gap = mean - ex.log_prob[0].item()
    return (f"exact trace (rk4, {steps} steps, {t_exact:.1f} s): {ex.log_prob[0].item():.3f} nats; "
            f"Hutchinson k={k} mean of {repeats}: {mean:.3f} +- {se_mean:.3f} (SE of the mean); "
            f"gap {gap:+.3f} = {gap / se_mean:+.2f} SE")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=1, help="images (default 1)")
    p.add_argument("--repeats", type=int, default=4, help="independent probe draws R per image and k (default 4)")
    p.add_argument("--probes", type=int, nargs="+", default=[1, 4, 16], help="k values (default 1 4 16)")
    p.add_argument("--train-steps", type=int, default=300, help="Adam steps (default 300)")
    p.add_argument("--batch", type=int, default=32, help="training batch (default 32)")
    p.add_argument("--channels", type=int, default=16, help="U-Net base width (default 16)")
    p.add_argument("--mults", type=int, nargs="+", default=[1, 2], help="U-Net channel_mults (default 1 2)")
    p.add_argument("--rtol", type=float, default=1e-5, help="dopri5 rtol (float32: raised to 1.19e-5)")
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--exact-steps", type=int, default=0, help="rk4 steps for the exact-trace check (0: skip)")
    p.add_argument("--exact-only", action="store_true", help="run only the exact-trace check (needs --exact-steps)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.repeats < 2 or a.n < 1 or min(a.probes) < 1:
        p.error("--repeats must be >= 2 (a spread needs two draws), --n and --probes >= 1")
    if a.exact_only and not a.exact_steps:
        p.error("--exact-only needs --exact-steps S")
    torch.set_num_threads(a.threads)

    model = build_model(a.channels, tuple(a.mults), a.seed)
    params = sum(q.numel() for q in model.net.parameters())
    t0 = time.perf_counter()
    losses = train(model, a.train_steps, batch=a.batch, seed=a.seed)
    tail = statistics.mean(losses[-20:]) if losses else float("nan")
    print(f"UNet channels={a.channels} mults={tuple(a.mults)} ({params} params, float32), VPSDE, eps; "
          f"trained {a.train_steps} steps in {time.perf_counter() - t0:.0f} s, loss {losses[0] if losses else 0:.3f}"
          f" -> {tail:.3f} (mean of last 20)")
    x = make_images(a.n, torch.Generator().manual_seed(a.seed + 12345))
    d = x[0].numel()
    rtol = max(a.rtol, 100 * torch.finfo(DTYPE).eps)
    print(f"d = {d}, n = {a.n} images, R = {a.repeats} draws, dopri5 per_sample rtol={rtol:.3g} atol={a.atol:g}, "
          f"{a.threads} thread(s)")
    draws = []
    for k in ([] if a.exact_only else a.probes):
        draws.append(hutchinson_draws(model, x, k, a.repeats, seed=a.seed + 7 * k, rtol=rtol, atol=a.atol))
        print(f"  k={k:2d} done: {sum(draws[-1].seconds):.0f} s, batched result.nfe {draws[-1].nfe_calls}",
              flush=True)
    if draws:
        print(format_table(summary_rows(draws, a.n, d)))
    if a.exact_steps:
        print(exact_check(model, x, a.exact_steps, a.repeats, max(a.probes), a.seed + 99))


if __name__ == "__main__":
    main()
