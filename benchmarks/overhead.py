"""Per-step overhead of the fixed-step samplers (issue 3, "Performance").

overhead ratio = total sampling time / (nfe x time of one model call)

measured side by side in one run, for
  (a) an MLP score network (width 256, 3 hidden layers, SiLU) on d=64 at batch 4096, float32;
  (b) a cheap analytic model (the exact Gaussian eps of a diagonal d=64 Gaussian) at batch 64.
A ratio of 1.00 means the solver adds nothing beyond the network calls.  Times are medians
of --repeats runs after a warm-up.  Run:  python benchmarks/overhead.py [--device cuda]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import scoresde
import solvers

FIXED = ["euler", "heun", "ddim", "dpm_solver_1", "dpm_solver_2", "dpm_solver_3", "dpmpp_2s", "dpmpp_2m",
         "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde", "unipc", "euler_maruyama", "reverse_diffusion",
         "ancestral", "pc"]


class MLP(nn.Module):
    def __init__(self, d: int, width: int = 256):
        super().__init__()
        self.inp = nn.Linear(d + 1, width)
        self.body = nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU())
        self.out = nn.Linear(width, d)

    def forward(self, x, t):
        return self.out(self.body(self.inp(torch.cat([x, t[:, None]], dim=1))))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device, repeats):
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_case(label, model, x_T, device, steps, repeats, methods):
    """Paired measurement: each repeat times one sampling call and, right after it, ``nfe``
    plain network calls on the same batch; the ratio is taken per pair and the median
    reported, so that drift in machine speed cancels."""
    t_vec = torch.full((x_T.shape[0],), 0.5, dtype=x_T.dtype, device=device)

    def calls(n):
        with torch.no_grad():
            for _ in range(n):
                model.net(x_T, t_vec)

    t_call = median_time(lambda: calls(1), device, repeats * 3)
    print(f"\n{label}: one model call = {t_call * 1e3:.3f} ms")
    print(f"{'method':18s} {'nfe':>5s} {'total ms':>10s} {'nfe calls ms':>13s} {'ratio':>7s}")
    avail = set(solvers.available_methods())
    ratios = {}
    for m in methods:
        if m not in avail:
            continue
        gen = torch.Generator(device="cpu").manual_seed(0)
        sol = solvers.sample(model, x_T, m, steps, generator=gen)  # warm-up, and the nfe
        nfe = sol.nfe
        pairs = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            solvers.sample(model, x_T, m, steps, generator=gen)
            sync(device)
            t1 = time.perf_counter()
            calls(nfe)
            sync(device)
            t2 = time.perf_counter()
            pairs.append((t1 - t0, t2 - t1))
        ratio = statistics.median(a / b for a, b in pairs)
        ratios[m] = ratio
        print(f"{m:18s} {nfe:5d} {statistics.median(p[0] for p in pairs) * 1e3:10.2f} "
              f"{statistics.median(p[1] for p in pairs) * 1e3:13.2f} {ratio:7.3f}")
    return ratios


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--methods", nargs="*", default=FIXED)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    sde = scoresde.VPSDE()
    d = 64
    net = MLP(d).to(device).eval()
    model = scoresde.ScoreModel(net, sde, "eps")
    x_big = torch.randn(4096, d, device=device)
    r_mlp = run_case("MLP width 256, d=64, batch 4096, float32", model, x_big, device, args.steps, args.repeats,
                     args.methods)
    target = scoresde.Gaussian(torch.zeros(d), torch.linspace(0.1, 2.0, d))
    cheap = target.as_model(sde, "eps")
    x_small = torch.randn(64, d, device=device)
    r_cheap = run_case("analytic Gaussian model, d=64, batch 64, float32", cheap, x_small, device, args.steps,
                       args.repeats, args.methods)
    worst = max(r_mlp.values()) if r_mlp else float("nan")
    print(f"\nworst ratio at batch 4096: {worst:.3f} (target <= 1.05)")
    return r_mlp, r_cheap


if __name__ == "__main__":
    main()
