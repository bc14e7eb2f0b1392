"""The ``scoresde`` argument parser: one sub-command per verb."""
from __future__ import annotations

import argparse

from .common import _SDE_NAMES, _finite_float
from .likelihood import cmd_likelihood
from .sample import cmd_sample
from .train import cmd_train
from .validate import cmd_validate


def _add_run_args(p: argparse.ArgumentParser, block: int, batch: int) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by `scoresde train`")
    p.add_argument("--out", required=True, help="output directory (shards, run.json, progress.json, results)")
    p.add_argument("--seed", type=int, default=None,
                   help="base seed; unit i uses its own seed from (seed, i) (default: drawn at random, printed and "
                        "recorded in run.json; a resumed run reuses the recorded one)")
    p.add_argument("--block-size", type=int, default=block, help="units per shard file")
    p.add_argument("--batch-size", type=int, default=batch, help="units per solver call (does not change results)")
    p.add_argument("--micro-batch", type=int, default=64,
                   help="rows per network call (fixed, so results are batch-independent; part of the config)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:K or auto (default: cpu)")
    p.add_argument("--weights", choices=("default", "ema", "raw"), default="default",
                   help="EMA or raw weights (default: EMA when the checkpoint has them)")
    p.add_argument("--t-end", type=_finite_float, default=None,
                   help="data end of the time interval (default: the SDE's)")
    p.add_argument("--on-failure", choices=("raise", "record"), default="raise",
                   help="stop at a failed unit, or record its status and go on")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out (finished shards are kept; a new directory just starts)")
    g.add_argument("--overwrite", action="store_true", help="delete this run's files in --out and start over")
    p.add_argument("--finalize", action="store_true", help="only check completeness and merge the shards")
    p.add_argument("--shard", default=None, metavar="I/S",
                   help="run only shard I of S (blocks I::S), without torch.distributed; the last to finish merges")
    p.add_argument("--dist-timeout", type=float, default=1800.0, help="seconds before a barrier gives up")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages (errors still print)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")


_VALIDATE_HELP = """Without --checkpoint: the solver accuracy suite on analytic problems (python -m validation;
quick tier by default).  With --checkpoint: every deterministic solver on that network, against a
tight pf_ode reference of the network itself; writes report.md, results.json and a plot to --out,
with a recommended (method, schedule, options) per NFE budget.

  scoresde validate --quick
  scoresde validate --checkpoint runs/gmm.pt --out runs/gmm-validate [--quick]
"""


def _add_validate_parser(sub) -> None:
    """The validate verb: the suite's own options (when the suite is importable) plus the
    --checkpoint ones."""
    try:
        from validation.suite import parser as suite_parser
        parents = [suite_parser(add_help=False)]
    except ImportError:   # not a source checkout: cmd_validate says so
        parents = []
    v = sub.add_parser("validate", parents=parents, description=_VALIDATE_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="solver accuracy: the analytic suite, or --checkpoint: on your own network")
    if not parents:
        for opt in ("--quick", "--record-bounds", "--quiet"):
            v.add_argument(opt, action="store_true", default=None)
        for opt in ("--methods", "--sdes", "--sections"):
            v.add_argument(opt, nargs="*")
        v.add_argument("--out", default=None)
    m = v.add_argument_group("on your own network (--checkpoint)")
    m.add_argument("--checkpoint", default=None, help="a checkpoint written by `scoresde train`")
    m.add_argument("--n", type=int, default=None, help="start samples (default 256 for vectors, 16 for images)")
    m.add_argument("--seed", type=int, default=None, help="seed of the prior draw x_T (default 0)")
    m.add_argument("--shape", type=int, nargs="+", default=None, help="sample shape (default: the checkpoint's)")
    m.add_argument("--nfe", type=int, nargs="+", default=None,
                   help="target NFE values (default 5 6 8 10 15 20 30 50 100 200; --quick: 5 10 20 50)")
    m.add_argument("--schedules", nargs="+", default=None, choices=("uniform", "log_snr", "quadratic", "karras"),
                   help="time grids (default: all four; --quick: each method's default)")
    m.add_argument("--t-end", type=float, default=None, help="data end of the time interval (default: the SDE's)")
    m.add_argument("--ref-tol", type=float, default=None, help="rtol = atol of the pf_ode reference (default 1e-9)")
    m.add_argument("--weights", choices=("default", "ema", "raw"), default="default")
    m.add_argument("--no-plots", action="store_true", help="numbers only (report.md, results.json)")
    m.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    v.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    v.set_defaults(func=cmd_validate, quick=None, out=None, tol=None)   # per mode: see cmd_validate


def _add_train_parser(sub) -> None:
    t = sub.add_parser("train", help="train a score network on a data set; writes a checkpoint")
    t.add_argument("--data", required=True,
                   help="a toy set (checkerboard, moons, swiss_roll, 8gaussians, rings, gmm), digits (the 1497 "
                        "training images of scikit-learn's 8x8 digits, extra scoresde[data]; levels 0..16 -> "
                        "[-1, 1], dequantized afresh every batch) or a .npy/.npz/.pt file")
    t.add_argument("--n-data", type=int, default=None, help="use the first N rows of a data file")
    t.add_argument("--out", required=True, help="checkpoint path, e.g. runs/model.pt")
    t.add_argument("--sde", choices=_SDE_NAMES, default="vp")
    t.add_argument("--beta-min", type=float, default=0.1)
    t.add_argument("--beta-max", type=float, default=20.0)
    t.add_argument("--sigma-min", type=float, default=None)
    t.add_argument("--sigma-max", type=float, default=None)
    t.add_argument("--prediction", choices=("eps", "x0", "v", "score", "edm", "flow"), default="eps")
    t.add_argument("--time-input", choices=("t", "log_snr", "c_noise", "sigma"), default="t",
                   help="what the network receives as its time input")
    t.add_argument("--net", choices=("auto", "mlp", "unet"), default="auto")
    t.add_argument("--hidden", type=int, default=128, help="MLP width")
    t.add_argument("--depth", type=int, default=3)
    t.add_argument("--channels", type=int, default=32)
    t.add_argument("--embedding", choices=("fourier", "sinusoidal"), default="fourier")
    t.add_argument("--weighting", choices=("eps", "sigma2", "likelihood", "snr", "min_snr", "v", "edm"), default="eps")
    t.add_argument("--time-sampling", choices=("uniform", "log_snr", "lognormal"), default=None)
    t.add_argument("--t-min", type=float, default=None)
    t.add_argument("--steps", type=int, default=4000)
    t.add_argument("--batch-size", type=int, default=512)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine")
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--ema", type=float, default=0.999, help="EMA decay (0: no EMA)")
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--save-every", type=int, default=0, help="also save every K steps (0: only at the end)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue training the checkpoint at --out")
    g.add_argument("--overwrite", action="store_true")
    t.add_argument("--quiet", action="store_true")
    t.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    t.set_defaults(func=cmd_train)


def _add_sample_parser(sub) -> None:
    s = sub.add_parser("sample", help="draw samples (sharded, resumable)")
    _add_run_args(s, block=1000, batch=256)
    s.add_argument("-n", "--n", type=int, required=True, help="number of samples")
    s.add_argument("--method", default="dpmpp_2m", help="a solvers method name (solvers.available_methods())")
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--schedule", default=None, choices=("uniform", "log_snr", "quadratic", "karras"))
    s.add_argument("--final-denoise", action="store_true")
    s.add_argument("--option", action="append", metavar="KEY=VALUE", help="a method option (repeatable)")
    s.add_argument("--shape", type=int, nargs="+", default=None, help="sample shape (default: the checkpoint's)")
    s.set_defaults(func=cmd_sample)


def _add_likelihood_parser(sub) -> None:
    lk = sub.add_parser("likelihood", help="log-likelihood / bits per dim over a data set (sharded, resumable)")
    _add_run_args(lk, block=100, batch=100)
    lk.add_argument("--data", required=True,
                    help="a toy set name, digits:test (the 300 test digits, dequantized with --data-seed; bits/dim "
                         "per level bin, 17 levels) or digits:train, or a .npy/.npz/.pt file (PATH:KEY)")
    lk.add_argument("-n", "--n", type=int, default=None, help="number of data points (required for toy sets)")
    lk.add_argument("--data-seed", type=int, default=1,
                    help="seed of a toy set or of the digits' dequantization (training draws from another stream)")
    lk.add_argument("--trace", choices=("exact", "hutchinson"), default=None,
                    help="divergence estimator (default: exact up to 256 dimensions)")
    lk.add_argument("--probes", type=int, default=1)
    lk.add_argument("--method", default="dopri5",
                    help="a torchdiffeq method: dopri5 (default: every point its own adaptive steps, --batch-size "
                         "points per solve), another adaptive one (one point per solve), or a fixed-step one "
                         "(rk4, euler, ...) with --ode-steps")
    lk.add_argument("--rtol", type=float, default=None, help="default 1e-5 (float32: 100 eps)")
    lk.add_argument("--atol", type=float, default=1e-5)
    lk.add_argument("--ode-steps", type=int, default=None,
                    help="steps of a fixed-step --method (rk4, ...): one uniform grid for every point")
    lk.add_argument("--max-steps", type=int, default=10_000)
    lk.add_argument("--data-range", type=float, nargs=2, default=None, metavar=("A", "B"))
    lk.add_argument("--dequantization", choices=("uniform", "none"), default=None)
    lk.add_argument("--bits", type=int, default=None)
    lk.add_argument("--exclude-failed", action="store_true", help="average over the successful points only")
    lk.set_defaults(func=cmd_likelihood)


def build_parser(prog: str = "scoresde") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Train, sample and evaluate score-based diffusion models.",
                                 epilog="Long runs resume: re-run the same command with --resume.")
    sub = ap.add_subparsers(dest="command", required=True)
    _add_train_parser(sub)
    _add_sample_parser(sub)
    _add_likelihood_parser(sub)
    _add_validate_parser(sub)
    return ap
