"""Per-step overhead of the fixed-step samplers.

overhead ratio = total sampling time / (nfe x time of one model call)

measured side by side in one run, for
  (a) an MLP score network (width 256, 3 hidden layers, SiLU) on d=64 at batch 4096, float32;
  (b) a cheap analytic model (the exact Gaussian eps of a diagonal d=64 Gaussian) at batch 64.
A ratio of 1.00 means the solver adds nothing beyond the network calls.  Each repeat times
one sampling call and then nfe bare network calls, and the ratio is the median over those
pairs.  A third, noise-free view runs every method with a *free* network (it returns a
precomputed tensor): the solver's own cost per NFE, and the ratio it implies for the MLP.

On a shared machine use ``--threads 1 --clock process``.  glibc returns large freed blocks
to the OS, so every fresh 1 MB tensor page-faults; ``MALLOC_MMAP_THRESHOLD_=1000000000
MALLOC_TRIM_THRESHOLD_=1000000000`` in the environment removes that cost (for the network
and the solver alike).  Stochastic samplers also draw 4096 x 64 normals per step (~0.9 ms on
one core), a floor no loop design removes.
Run:  python benchmarks/overhead.py [--device cuda] [--threads 1 --clock process]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import scoresde
import solvers
from validation.peers import MLP  # the one benchmark network (also timed in the validation report)

FIXED = ["euler", "heun", "ddim", "dpm_solver_1", "dpm_solver_2", "dpm_solver_3", "dpmpp_2s", "dpmpp_2m",
         "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde", "unipc", "euler_maruyama", "reverse_diffusion",
         "ancestral", "pc"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


CLOCK = time.perf_counter


def median_time(fn, device, repeats):
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = CLOCK()
        fn()
        sync(device)
        times.append(CLOCK() - t0)
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
            t0 = CLOCK()
            solvers.sample(model, x_T, m, steps, generator=gen)
            sync(device)
            t1 = CLOCK()
            calls(nfe)
            sync(device)
            t2 = CLOCK()
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
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--clock", choices=["wall", "process"], default="wall",
                    help="wall time, or this process's CPU time (robust on a shared machine; use with --threads 1)")
    args = ap.parse_args(argv)
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"clock={args.clock}, threads={torch.get_num_threads()}, device={args.device}, steps={args.steps}")
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
    print("\nsolver cost per NFE with a free network (batch 4096, d=64):")
    free_out = torch.randn(4096, d, device=device) * 0.1
    free = scoresde.ScoreModel(lambda x, t: free_out, sde, "eps")
    with torch.no_grad():
        t_mlp = median_time(lambda: net(x_big, torch.full((4096,), 0.5, device=device)), device, args.repeats * 3)
    for m in args.methods:
        if m not in solvers.available_methods():
            continue
        gen = torch.Generator(device="cpu").manual_seed(0)
        res = {}

        def go():
            res["sol"] = solvers.sample(free, x_big, m, args.steps, generator=gen)

        t = median_time(go, device, args.repeats)
        per = t / res["sol"].nfe
        print(f"{m:18s} {per * 1e3:8.3f} ms/NFE   implied MLP ratio {1 + per / t_mlp:6.3f}")
    worst = max(r_mlp.values()) if r_mlp else float("nan")
    print(f"\nworst ratio at batch 4096: {worst:.3f} (target <= 1.05)")
    return r_mlp, r_cheap


if __name__ == "__main__":
    main()
