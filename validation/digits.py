r"""Test-set bits/dim of a score model trained on the 8x8 digits, against two baselines, in
one run (``python -m validation.digits --checkpoint digits.pt``; writes a JSON and a sample grid).

Convention (17 grey levels).  A test image has integer levels :math:`v\in\{0..16\}^{64}`; it
is dequantized once, :math:`w = v + u`, :math:`u\sim U[0,1)^{64}` (seed ``--data-seed``), and
scaled to the model's range, :math:`x = -1 + 2w/17` (``scoresde.data.digits_scale``).  A
density on x becomes one on w by the Jacobian of the scaling,
:math:`\log p_w(w) = \log p_x(x) + D\log(2/17)`, :math:`D = 64`, and

.. math:: \text{bpd} = \frac{-\log p_w(w)}{D\ln 2} = \frac{-\log p_x(x)}{D\ln 2} + \log_2\frac{17}{2}.

For any density p on w, :math:`P(v) = \int_{[0,1)^D} p(v + u)\,du` is a (sub-)probability on
the levels and by Jensen :math:`-\log P(v) \le E_u[-\log p(v+u)]` (Theis et al. 2016): the
dequantized bits/dim upper-bounds the discrete bits/dim of the model's own discrete
distribution.  So it is comparable with an exact discrete NLL: a discrete model P read as the
piecewise-constant density :math:`p(w) = P(\lfloor w\rfloor)` has exactly its discrete NLL as
its dequantized NLL.

Rows:

- score model, exact trace (``solvers.log_likelihood(..., "exact")``, dopri5);
- score model, Hutchinson (one Rademacher probe per image), with the standard error of the mean
  over images (data and probe noise together) and, on the images of the exact row, the paired
  difference to the exact trace;
- full-covariance Gaussian fitted to the dequantized training set: mean of v + 1/2 and covariance
  Cov(v) + I/12 (the maximum-likelihood fit in expectation over u), evaluated on the same
  dequantized test data, same convention;
- independent per-pixel categoricals over the 17 levels, add-one (Laplace) smoothed,
  :math:`P_j(k) = (n_{jk} + 1)/(N + 17)`; bits/dim = exact discrete NLL / (64 ln 2).

Every mean comes with its standard error over the test images.  NFE: ODE right-hand-side
evaluations per solve (one network forward each; the exact trace adds 64 vector-Jacobian products
per evaluation, Hutchinson one per probe).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

import solvers
from scoresde.checkpoint import load_checkpoint
from scoresde.data import (DIGITS_LEVELS, digits_levels, digits_log_jacobian,
                           digits_to_levels, load_digits)

D = 64
LN2 = math.log(2.0)


def mean_se(v: torch.Tensor) -> tuple[float, float]:
    v = v.to(torch.float64)
    return float(v.mean()), float(v.std(correction=1) / math.sqrt(v.numel()))


def bpd_from_x(log_px: torch.Tensor) -> torch.Tensor:
    """Per-image bits/dim from log-densities of the scaled data (module docstring)."""
    return solvers.bits_per_dim(log_px.to(torch.float64) + digits_log_jacobian(D), D)


def categorical_bpd(train: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """Per-image exact discrete bits/dim of add-one-smoothed per-pixel categoricals."""
    tr, te = train.reshape(train.shape[0], D), test.reshape(test.shape[0], D)
    counts = torch.zeros(D, DIGITS_LEVELS, dtype=torch.float64)
    counts.scatter_add_(1, tr.T, torch.ones(D, tr.shape[0], dtype=torch.float64))
    log_p = torch.log((counts + 1.0) / (tr.shape[0] + DIGITS_LEVELS))        # [D, 17]
    nll = -log_p.gather(1, te.T).sum(0)                                        # [N_test]
    return nll / (D * LN2)


def gaussian_bpd(train: torch.Tensor, x_test: torch.Tensor) -> torch.Tensor:
    """Per-image bits/dim of the full-covariance Gaussian fitted to the dequantized training set."""
    w = train.reshape(train.shape[0], D).to(torch.float64)
    mean_w = w.mean(0) + 0.5
    cov_w = torch.cov(w.T, correction=0) + torch.eye(D, dtype=torch.float64) / 12.0
    scale = 2.0 / DIGITS_LEVELS                                                # dx/dw
    dist = torch.distributions.MultivariateNormal(-1.0 + scale * mean_w, scale * scale * cov_w)
    return bpd_from_x(dist.log_prob(x_test.reshape(x_test.shape[0], D).to(torch.float64)))


def model_bpd(model, x: torch.Tensor, trace: str, args, seed: int) -> dict:
    """Bits/dim of ``x`` under the model by the probability-flow ODE, in batches of ``args.batch``."""
    out, nfe, evals, t0, c0 = [], [], [], time.time(), time.process_time()
    for s in range(0, x.shape[0], args.batch):
        xb = x[s:s + args.batch]
        kw = {"rtol": args.rtol, "atol": args.atol}
        if trace == "hutchinson":
            kw["generator"] = [torch.Generator().manual_seed(seed * 1_000_003 + s + i) for i in range(xb.shape[0])]
        res = solvers.log_likelihood(model, xb, trace, **kw)
        out.append(bpd_from_x(res.log_prob))
        nfe.append(res.nfe)
        evals.append(res.stats["evaluations"])
    bpd = torch.cat(out)
    m, se = mean_se(bpd)
    return {"bpd": bpd, "mean": m, "stderr": se, "n": x.shape[0], "wall_s": time.time() - t0,
            "cpu_s": time.process_time() - c0, "nfe_per_solve": nfe, "ode_evaluations": evals}


def sample_grid(model, n: int, steps: int, seed: int, path: str, test: torch.Tensor) -> dict:
    """``n`` samples (DPM-Solver++(2M), ``steps`` steps), shown as levels next to test images."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t0 = time.time()
    x_T = model.sde.prior_sample([n, 1, 8, 8], torch.Generator().manual_seed(seed))
    sol = solvers.sample(model, x_T, "dpmpp_2m", steps=steps)
    wall = time.time() - t0
    levels = digits_to_levels(sol.x.to(torch.float64))

    def tile(v: torch.Tensor) -> torch.Tensor:
        k = int(math.isqrt(v.shape[0]))
        img = torch.full((k * 9 + 1, k * 9 + 1), 3.0)            # light grey frames
        for i in range(k * k):
            r, c = divmod(i, k)
            img[1 + 9 * r:9 + 9 * r, 1 + 9 * c:9 + 9 * c] = v[i, 0].float()
        return img
    fig, axes = plt.subplots(1, 2, figsize=(6.0, 3.2), dpi=80)
    for ax, v, title in ((axes[0], levels, f"samples ({steps} steps)"), (axes[1], test[:n], "test images")):
        ax.imshow(tile(v), cmap="gray_r", vmin=0, vmax=DIGITS_LEVELS - 1, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return {"n": n, "method": "dpmpp_2m", "steps": steps, "nfe": int(sol.nfe), "wall_s": wall,
            "outside_range": float((sol.x.abs() > 1).float().mean())}


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    train, test = digits_levels("train"), digits_levels("test")
    x_test = load_digits("test", torch.Generator().manual_seed(args.data_seed), torch.float32)
    assert torch.equal(digits_to_levels(x_test.double()), test)
    rows = {}
    t0 = time.time()
    cat = categorical_bpd(train, test)
    rows["categorical"] = {"bpd": cat, "wall_s": time.time() - t0}
    t0 = time.time()
    gau = gaussian_bpd(train, x_test)
    rows["gaussian"] = {"bpd": gau, "wall_s": time.time() - t0}
    for r in rows.values():
        r["mean"], r["stderr"] = mean_se(r["bpd"])
        r["n"] = int(r["bpd"].numel())
    model, cfg = load_checkpoint(args.checkpoint, dtype=torch.float32)
    if args.n_exact > 0:
        rows["exact"] = model_bpd(model, x_test[:args.n_exact], "exact", args, args.seed)
    rows["hutchinson"] = model_bpd(model, x_test[:args.n_hutchinson], "hutchinson", args, args.seed)
    k = min(args.n_exact, args.n_hutchinson)
    paired = {"mean": None, "stderr": None}
    if k > 1:
        paired = dict(zip(("mean", "stderr"), mean_se(rows["hutchinson"]["bpd"][:k] - rows["exact"]["bpd"][:k])))
    samples = sample_grid(model, args.n_samples, args.sample_steps, args.seed, args.png, test) if args.png else None
    result = {"checkpoint": os.path.abspath(args.checkpoint), "weights": cfg.get("weights_used"),
              "sde": cfg.get("sde"), "prediction": cfg.get("prediction"), "train": cfg.get("train"),
              "data_seed": args.data_seed, "rtol": args.rtol, "atol": args.atol, "batch": args.batch,
              "threads": args.threads, "load_average_1min_start_end": [args.load0, os.getloadavg()[0]],
              "rows": {name: {kk: vv for kk, vv in r.items() if kk != "bpd"} for name, r in rows.items()},
              "hutchinson_minus_exact": {**paired, "n": k}, "samples": samples,
              "bpd_formula": "-log p_x(x)/(64 ln 2) + log2(17/2), x = -1 + 2(v+u)/17"}
    return result


LABELS = {"exact": "score model, exact trace", "hutchinson": "score model, Hutchinson (1 probe)",
          "gaussian": "full-covariance Gaussian", "categorical": "per-pixel categoricals (add-one)"}


def print_table(result: dict) -> None:
    print(f"{'model':36s} {'bits/dim':>9s} {'± s.e.':>7s} {'N':>4s} {'wall s':>8s} {'NFE/solve':>10s}")
    for name in ("exact", "hutchinson", "gaussian", "categorical"):
        r = result["rows"].get(name)
        if r is None:
            continue
        nfe = r.get("nfe_per_solve")
        nfe_s = "-" if nfe is None else "/".join(str(v) for v in nfe)
        print(f"{LABELS[name]:36s} {r['mean']:9.4f} {r['stderr']:7.4f} {r['n']:4d} {r['wall_s']:8.1f} {nfe_s:>10s}")
    p = result["hutchinson_minus_exact"]
    if p["mean"] is not None:
        print(f"Hutchinson - exact on the same {p['n']} images: {p['mean']:+.4f} ± {p['stderr']:.4f} bits/dim")
    if result["samples"]:
        s = result["samples"]
        print(f"{s['n']} samples: {s['method']} {s['steps']} steps, NFE {s['nfe']}, {s['wall_s']:.1f} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m validation.digits", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="digits.pt")
    ap.add_argument("--n-exact", type=int, default=300, help="test images for the exact trace (first N; 0: skip)")
    ap.add_argument("--n-hutchinson", type=int, default=300, help="test images for Hutchinson (first N, >= 2)")
    ap.add_argument("--batch", type=int, default=100, help="images per ODE solve (they share adaptive steps)")
    ap.add_argument("--rtol", type=float, default=1e-4, help="dopri5 tolerances (1e-5 moved the mean by <1e-3 bits/dim)")
    ap.add_argument("--atol", type=float, default=1e-4)
    ap.add_argument("--data-seed", type=int, default=1, help="dequantization seed (as `likelihood --data-seed`)")
    ap.add_argument("--seed", type=int, default=0, help="probes and sampling noise")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--png", default="docs/img/digits-samples.png", help="sample grid ('' to skip)")
    ap.add_argument("--n-samples", type=int, default=64)
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--json", default="docs/img/digits-results.json")
    args = ap.parse_args(argv)
    args.load0 = os.getloadavg()[0]
    result = run(args)
    print_table(result)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1, sort_keys=True)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
