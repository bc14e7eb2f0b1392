"""``scoresde validate``: the solver accuracy suite on analytic problems, or (``--checkpoint``)
every deterministic solver on the user's own network against a tight pf_ode reference."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import torch

from .._runs import RunError, eprint
from .common import _data_shape


def cmd_validate(args: argparse.Namespace, argv: Sequence[str], prog: str) -> int:
    try:
        from validation.suite import parser as suite_parser, run as suite_run  # a sibling top-level package
    except ImportError as err:
        eprint(f"scoresde validate: the validation suite is not importable here ({err}); it is installed "
               "with the scoresde package (reinstall it, or run `python -m validation` from a checkout).")
        return 2
    if args.rest:   # the old spelling `scoresde validate -- --quick`: parse what follows the "--"
        from .app import main
        return main(["validate", *args.rest], prog)
    if args.checkpoint is not None:
        return _validate_checkpoint(args)
    given = [f"--{k.replace('_', '-')}" for k in _VALIDATE_MODEL_ONLY if getattr(args, k) is not None]
    given += ["--weights"] * (args.weights != "default") + ["--no-plots"] * bool(args.no_plots)
    if given:
        raise RunError(f"{', '.join(given)}: only with --checkpoint (the analytic suite has its own problems)")
    args.quick = True if args.quick is None else args.quick
    defaults = suite_parser()
    args.out = args.out or defaults.get_default("out")
    args.tol = defaults.get_default("tol") if args.tol is None else args.tol
    return int(suite_run(args) or 0)


#: options of ``scoresde validate --checkpoint`` that the analytic suite does not take
_VALIDATE_MODEL_ONLY = ("n", "seed", "shape", "nfe", "schedules", "t_end", "ref_tol")


def _validate_checkpoint(args: argparse.Namespace) -> int:
    """``scoresde validate --checkpoint``: every deterministic solver on the checkpoint's own
    network against its pf_ode reference (:mod:`validation.model_check`), float64."""
    from ..checkpoint import load_checkpoint
    import validation.model_check as om
    bad = [o for o, v in (("--sdes", args.sdes), ("--sections", args.sections), ("--record-bounds", args.record_bounds),
                          ("--tol", args.tol is not None)) if v]
    if bad:
        raise RunError(f"{', '.join(bad)} apply to the analytic suite, not to --checkpoint")
    if args.out is None:
        raise RunError("--out DIR is required with --checkpoint")
    if args.n is not None and args.n < 1:
        raise RunError(f"--n must be >= 1, got {args.n}")
    model, cfg = load_checkpoint(args.checkpoint, weights=args.weights, dtype=torch.float64)
    shape = _data_shape(cfg, args.shape)
    n = args.n or (256 if len(shape) == 1 else 16)          # vectors: 256; images: 16
    seed = 0 if args.seed is None else args.seed
    x_T = model.sde.prior_sample([n, *shape], torch.Generator().manual_seed(seed), dtype=torch.float64)
    quick = bool(args.quick)
    nfes = args.nfe or (om.QUICK_NFE if quick else om.FULL_NFE)
    schedules = args.schedules or ([None] if quick else None)
    configs = om.configurations(args.methods or None, schedules)   # bad names: ValueError before any solve
    bar = None
    if not args.quiet:
        from tqdm import tqdm
        bar = tqdm(total=len(configs), desc="validate", leave=False, file=sys.stderr)
        eprint(f"reference: pf_ode of {args.checkpoint} on {n} x {shape} samples (float64), then "
               f"{len(configs)} configurations x {len(nfes)} NFE values")
    res = om.on_model(model, x_T, t_end=args.t_end, nfes=nfes, methods=args.methods or None, schedules=schedules,
                      ref_tol=args.ref_tol, progress=(lambda name: (bar.set_postfix_str(name), bar.update(1)))
                      if bar is not None else None)
    if bar is not None:
        bar.close()
    res["setup"].update(checkpoint=os.path.abspath(args.checkpoint), seed=seed, weights=cfg["weights_used"],
                        tier="quick" if quick else "full")
    out = om.write_report(res, args.out, title=f"Solvers on {os.path.basename(args.checkpoint)}",
                          plots=not args.no_plots)
    if not args.quiet:
        ref = res["reference"]
        print(f"reference: pf_ode dopri8 rtol=atol={ref['rtol']:g}, {ref['nfe']} NFE; its error vs a 10x tighter "
              f"solve: {ref['error']:.2e} RMS")
        for b, c in res["recommended"].items():
            if c is not None:
                print(f"NFE <= {b:>4}: {c['name']:<40} RMS error {c['error']:.2e} (NFE {c['nfe']})")
        print(f"wrote {out}/report.md and results.json")
    return 0
