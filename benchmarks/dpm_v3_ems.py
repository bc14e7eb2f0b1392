"""DPM-Solver-v3 with empirical model statistics (EMS) against dpmpp_2m and UniPC-2 (bh2).

VP SDE, from t = 1 to ``validation.problems.end_time``, log-SNR grids, NFE 5, 6, 8, 10, on the
Gaussian d=4 and the 2-D mixture of :mod:`validation.problems`.  The statistics come from
(a) exact samples of the target itself, (b) a different target of the same dimension (the
d=4 diagonal mixture, resp. a two-mode anisotropic 2-D mixture), (none) l = 1, s = b = 0.
Prints RMS errors against the exact flow (Gaussian) or a tight pf_ode reference (mixture)
and the NFE cost of each EMS.  Run: ``python benchmarks/dpm_v3_ems.py [n_ems] [grid_steps]``.
"""
import math
import sys
import time

import torch

import scoresde
import solvers
from validation import problems as P

F64 = torch.float64


def other_mixture2d() -> scoresde.GaussianMixture:
    def rot(th, a, b):
        c, s = math.cos(th), math.sin(th)
        r = torch.tensor([[c, -s], [s, c]], dtype=F64)
        return r @ torch.diag(torch.tensor([a, b], dtype=F64)) @ r.T
    return scoresde.GaussianMixture(torch.tensor([0.35, 0.65], dtype=F64),
                                    torch.tensor([[-2.0, 1.0], [1.5, -0.5]], dtype=F64),
                                    torch.stack([rot(0.4, 0.3, 0.01), rot(-1.0, 0.15, 0.02)]))


def main(n_ems: int = 1024, grid_steps: int = 120) -> None:
    sde = scoresde.make_sde("vp")
    t_end = P.end_time(sde)
    probs = P.make_problems()
    others = {"gaussian": P.diagonal_mixture_problem(4), "mixture2d": other_mixture2d()}
    nfes = (5, 6, 8, 10)
    for name in ("gaussian", "mixture2d"):
        prob = probs[name]
        model = prob.target.as_model(sde)
        x_T = P.start_samples(prob, sde, 1.0)
        ref = P.reference_map(prob, model, x_T, 1.0, [t_end])[t_end]
        ems = {}
        for label, target in (("own", prob.target), ("other", others[name])):
            m = target.as_model(sde)
            t0 = time.time()
            ems[label] = solvers.ems_statistics(m, target.sample(n_ems, torch.Generator().manual_seed(11)),
                                                grid_steps=grid_steps, t_start=1.0, t_end=t_end,
                                                generator=torch.Generator().manual_seed(12))
            print(f"{name}: EMS({label}) n={n_ems} grid={grid_steps}: nfe={ems[label].nfe} "
                  f"({time.time() - t0:.0f} s)", flush=True)
        rows = [("dpmpp_2m", {}), ("unipc-2 bh2", dict(method="unipc", order=2, variant="bh2"))]
        for order in (2, 3):
            for label in ("none", "own", "other"):
                rows.append((f"v3-{order} ems={label}", dict(method="dpm_solver_v3", order=order,
                                                            ems=ems.get(label))))
        print(f"{prob.label}: RMS error, NFE {nfes}")
        for row, kw in rows:
            kw = dict(kw)
            method = kw.pop("method", row)
            errs = [P.rms(solvers.sample(model, x_T, method, n, t_end=t_end, schedule="log_snr", **kw).x, ref)
                    for n in nfes]
            print(f"  {row:22s} " + " ".join(f"{e:.3e}" for e in errs), flush=True)


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
