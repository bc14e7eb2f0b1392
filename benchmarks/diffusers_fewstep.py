"""Few-step sampling of a diffusers UNet: scoresde's solvers vs diffusers' own schedulers at equal NFE.

One small ``UNet2DModel`` (1 x 8 x 8, block channels (16, 32); built and seeded here, nothing is
downloaded) for diffusers' default linear-beta DDPM schedule of 1000 steps, eps prediction.  By
default it is first trained briefly (``--train-steps``, eps loss, ~30 s on a CPU core) on
scikit-learn's 8x8 digits, so that it behaves like a score network (its ODE contracts); the
numbers measure the samplers' numerical error on that network, not sample quality.
``--train-steps 0`` keeps the random weights (whose ODE map is far less well conditioned).
Sampling runs in float64, with the UNet's timestep embedding computed in float64 too
(:class:`Float64TimeEmbedding`; both sides use the same network).  Every sampler maps the same x_T; its error is
``|x - x_ref| / |x_ref|`` (Euclidean norms over the batch) against the probability-flow ODE
solved tightly by ``pf_ode`` (dopri5) from t = 1 down to the first training step t = 1/N, then
denoised there (``final_denoise``).  The reference's own error, against a solve with 10x tighter
tolerances, is printed first; it must sit far below every sampler's error.

- diffusers: its own loop (``scheduler.step``) with DPMSolverMultistepScheduler (DPM-Solver++(2M),
  default and with Karras sigmas), UniPCMultistepScheduler (orders 2 and 3), DDIMScheduler;
  n steps = n NFE, the last one a denoise (final sigma zero).
- scoresde: ``solvers.sample`` on ``from_diffusers(unet, scheduler)`` with n - 1 steps plus
  ``final_denoise=True`` (n NFE, checked), on a grid uniform in log-SNR or in t, ending at 1/N or
  where DPM++2M's grid ends, or fitted by ``solvers.calibrate_timesteps`` once per NFE on
  separate prior draws (its one-off cost is printed).

The "best" rows take the smallest error of each side at that NFE (a selection on this one
batch among a few configurations).

Run:  python benchmarks/diffusers_fewstep.py [--nfe 5 8 10 20] [--batch 16] [--train-steps 300]
"""
from __future__ import annotations

import argparse
import math
import os
import time
import warnings

import torch
from torch import nn

import solvers
from scoresde.integrations import diffusers as sd_diffusers

F64 = torch.float64


def make_unet(size: int = 8, channels: int = 1):
    from diffusers import UNet2DModel
    from diffusers.utils import logging
    logging.set_verbosity_error()        # (its note on casting a model to float64)
    torch.manual_seed(0)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(16, 32),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)


class Float64TimeEmbedding(nn.Module):
    """diffusers' sinusoidal timestep embedding (``Timesteps``) computed in float64.  diffusers
    computes it in float32, which makes the network a step function of a fractional timestep
    (steps of ~3e-5 at k ~ 500): harmless at the schedulers' integer steps, but an adaptive ODE
    solver at tight tolerance then resolves the steps and never converges."""

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.dim, self.flip, self.shift, self.scale = (proj.num_channels, proj.flip_sin_to_cos,
                                                       proj.downscale_freq_shift, proj.scale)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        exponent = -math.log(10000.0) * torch.arange(half, dtype=F64, device=timesteps.device) / (half - self.shift)
        emb = self.scale * timesteps[:, None].to(F64) * torch.exp(exponent)[None, :]
        emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
        if self.flip:
            emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
        return torch.nn.functional.pad(emb, (0, 1)) if self.dim % 2 else emb


def train_on_digits(unet, steps: int, alphas_cumprod, seed: int = 0):
    """A short DDPM training (eps loss, Adam, float32) on scikit-learn's 8x8 digits scaled to
    [-1, 1]: enough for a score-like network whose ODE contracts, not for good samples."""
    from sklearn.datasets import load_digits
    data = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    g = torch.Generator().manual_seed(seed)
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float32)
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    unet.train()
    for _ in range(steps):
        x0 = data[torch.randint(len(data), (128,), generator=g)]
        k = torch.randint(len(ac), (128,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = ac[k].view(-1, 1, 1, 1)
        loss = (unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, k).sample - eps).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return unet.eval(), float(loss.detach())


def diffusers_runs():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
    return {
        "DPM++2M": lambda: DPMSolverMultistepScheduler(),
        "DPM++2M Karras": lambda: DPMSolverMultistepScheduler(use_karras_sigmas=True),
        "UniPC-2 (bh2)": lambda: UniPCMultistepScheduler(),
        "UniPC-3 (bh2)": lambda: UniPCMultistepScheduler(solver_order=3),
        "DDIM": lambda: DDIMScheduler(clip_sample=False, timestep_spacing="trailing"),
    }


OURS = {  # name -> (method, options, grid, end); end "first" = t = 1/N, "match" = where DPM++2M's grid ends
    "unipc-3, log-SNR grid": ("unipc", {"order": 3, "variant": "bh2"}, "log_snr", "first"),
    "unipc-3, log-SNR, DPM's end": ("unipc", {"order": 3, "variant": "bh2"}, "log_snr", "match"),
    "unipc-3, uniform t, DPM's end": ("unipc", {"order": 3, "variant": "bh2"}, "uniform", "match"),
    "unipc-2, log-SNR, DPM's end": ("unipc", {"order": 2, "variant": "bh2"}, "log_snr", "match"),
    "dpmpp_3m, log-SNR, DPM's end": ("dpmpp_3m", {}, "log_snr", "match"),
    "unipc-3, calibrated grid": ("unipc", {"order": 3, "variant": "bh2"}, "calibrated", "match"),
}


def diffusers_loop(unet, scheduler, x_T, nfe):
    scheduler.set_timesteps(nfe)
    x = x_T.clone()
    with torch.no_grad():
        for k in scheduler.timesteps:
            x = scheduler.step(unet(x, k).sample, k, x).prev_sample
    return x


def rel(x, ref):
    return float((x - ref).norm() / ref.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nfe", type=int, nargs="+", default=[5, 8, 10, 20])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--train-steps", type=int, default=300, help="DDPM training steps on 8x8 digits (0: random)")
    ap.add_argument("--cache", default=None, help="file to save the trained weights to / load them from")
    ap.add_argument("--calib-batch", type=int, default=64, help="calibration states for the calibrated grid (0: skip)")
    ap.add_argument("--calib-trials", type=int, default=60, help="calibrate_timesteps max_trials")
    ap.add_argument("--rtol", type=float, default=1e-6, help="reference tolerance (rtol = atol); check at 10x tighter")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from diffusers import DPMSolverMultistepScheduler

    base = DPMSolverMultistepScheduler()
    unet, loss = make_unet(), float("nan")
    t0 = time.perf_counter()
    if args.cache and os.path.exists(args.cache):
        unet.load_state_dict(torch.load(args.cache))
    elif args.train_steps > 0:
        unet, loss = train_on_digits(unet, args.train_steps, base.alphas_cumprod)
        if args.cache:
            torch.save(unet.state_dict(), args.cache)
    unet = unet.to(F64).eval()
    unet.time_proj = Float64TimeEmbedding(unet.time_proj)   # a smooth function of t (see the class)
    model = sd_diffusers.from_diffusers(unet, base)
    n_train = model.sde.num_steps
    x_T = torch.randn(args.batch, 1, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
    how = ("random weights" if args.train_steps == 0 and not (args.cache and os.path.exists(args.cache)) else
           f"trained on 8x8 digits (final eps loss {loss:.3f}) [{time.perf_counter() - t0:.0f} s]"
           if loss == loss else f"trained weights from {args.cache}")
    print(f"UNet2DModel 1x8x8, {sum(p.numel() for p in unet.parameters())} parameters, {how}")

    t0 = time.perf_counter()
    refs = [solvers.sample(model, x_T, "pf_ode", t_end=1.0 / n_train, rtol=tol, atol=tol, final_denoise=True)
            for tol in (args.rtol, args.rtol / 10)]
    ref = refs[0].x
    print(f"reference: pf_ode (dopri5) rtol=atol={args.rtol:g}, {refs[0].nfe} NFE; vs rtol=atol={args.rtol / 10:g} "
          f"({refs[1].nfe} NFE): relative error {rel(ref, refs[1].x):.1e}  [{time.perf_counter() - t0:.0f} s]")
    print(f"x_T: {args.batch} x 1 x 8 x 8, float64\n")

    theirs = {name: {} for name in diffusers_runs()}
    ours = {name: {} for name in OURS if args.calib_batch > 0 or OURS[name][2] != "calibrated"}
    calib_cost = {}
    # calibration states: fresh draws from the prior (not the sampled batch)
    x_cal = torch.randn(max(args.calib_batch, 1), 1, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(2))
    for nfe in args.nfe:
        for name, make in diffusers_runs().items():
            theirs[name][nfe] = rel(diffusers_loop(unet, make(), x_T, nfe), ref)
        sched = DPMSolverMultistepScheduler()
        sched.set_timesteps(nfe)
        match_end = float(sd_diffusers.timesteps_from(sched)[-1])
        for name, (method, options, grid, end) in OURS.items():
            t_end = 1.0 / n_train if end == "first" else match_end
            if grid == "calibrated":
                if args.calib_batch == 0:
                    continue
                t0 = time.perf_counter()
                fit = solvers.calibrate_timesteps(model, x_cal, nfe - 1, method=method, method_options=options,
                                                  t_end=t_end, final_denoise=True, max_trials=args.calib_trials)
                calib_cost[nfe] = (fit.nfe, time.perf_counter() - t0)
                grid_kw = {"timesteps": fit.timesteps}
            else:
                grid_kw = {"steps": nfe - 1, "schedule": grid, "t_end": t_end}
            sol = solvers.sample(model, x_T, method, final_denoise=True, **grid_kw, **options)
            assert sol.nfe == nfe, (name, sol.nfe, nfe)
            ours[name][nfe] = rel(sol.x, ref)

    cols = "".join(f"{'NFE ' + str(n):>10s}" for n in args.nfe)
    print(f"{'relative error vs reference':42s}{cols}")
    for label, table in (("diffusers", theirs), ("scoresde", ours)):
        for name, errs in table.items():
            print(f"{label + ': ' + name:42s}" + "".join(f"{errs[n]:10.2e}" for n in args.nfe))
    best_t = {n: min(theirs, key=lambda k: theirs[k][n]) for n in args.nfe}
    best_o = {n: min(ours, key=lambda k: ours[k][n]) for n in args.nfe}
    print()
    print(f"{'best diffusers':42s}" + "".join(f"{theirs[best_t[n]][n]:10.2e}" for n in args.nfe))
    print(f"{'best scoresde':42s}" + "".join(f"{ours[best_o[n]][n]:10.2e}" for n in args.nfe))
    print(f"{'ratio diffusers / scoresde':42s}" + "".join(f"{theirs[best_t[n]][n] / ours[best_o[n]][n]:10.1f}"
                                                          for n in args.nfe))
    for n in args.nfe:
        print(f"  NFE {n}: best diffusers = {best_t[n]}, best scoresde = {best_o[n]}")
    for n, (cost, secs) in calib_cost.items():
        print(f"  calibrated grid for NFE {n}: fitted once on {args.calib_batch} prior draws, {cost} NFE of that "
              f"batch [{secs:.0f} s]")


if __name__ == "__main__":
    main()
