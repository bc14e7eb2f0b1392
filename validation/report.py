"""The report: console summary, report.md and PNG plots (matplotlib, Agg backend, dpi 80)."""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import torch

from .deterministic import GRID_METHODS
from .metrics import ROUNDOFF_FLOOR
from .peers import CALIBRATION_SAMPLES, CALIBRATION_SEED, SIGMA_ZERO
from .problems import END_NOISE, REF_TOL, SDES, end_time
from .stochastic import ADAPTIVE_TOLS

SDE_ORDER = list(SDES)
PROBLEM_LABEL = {
    "gaussian": "Gaussian d=4 (exact flow)",
    "mixture2d": "2-D mixture",
    "mixture64": "d=64 diagonal mixture",
    "mixture3072": "d=3072 diagonal mixture",
}
#: the problem with a closed-form flow (its orders are gated from below only)
EXACT_PROBLEM = "gaussian"
#: the peer targets: our best error this many times smaller than the best peer's at this NFE
TARGET_MARGIN, TARGET_MARGIN_NFE = 1.5, 10
DPI = 80


# --------------------------------------------------------------------------- tables
def fmt(v, spec=".2f", none="-"):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    if isinstance(v, str):
        return v
    return format(v, spec)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _sdes(results, rows) -> list[str]:
    present = {r["sde"] for r in rows}
    return [s for s in SDE_ORDER if s in present]


def _method_sde_table(results: dict, rows: list[dict], key: str, label, cell) -> tuple[list[str], list[list]]:
    """The method x SDE skeleton shared by the deterministic tables: one row per distinct
    ``r[key]`` (in order of appearance), ``label(m, r)`` (a list of leading cells, from the
    method's row under its first SDE), then ``cell(r)`` per SDE ("" where the method has no row)."""
    sdes = _sdes(results, rows)
    by = {(r[key], r["sde"]): r for r in rows}
    out = []
    for m in dict.fromkeys(r[key] for r in rows):
        first = next(by[(m, s)] for s in sdes if (m, s) in by)
        out.append(label(m, first) + [cell(by[(m, s)]) if (m, s) in by else "" for s in sdes])
    return sdes, out


def order_table(results: dict, problem: str) -> str | None:
    rows = [r for r in results["deterministic"] if r["problem"] == problem and "fitted" in r]
    if not rows:
        return None

    def label(m, r):
        return [m, fmt(r["theory"], "g") + (f" (<= {r['max_order']:g})" if r.get("max_order") else "")]

    def cell(r):
        return fmt(r["fitted"]) + ("" if r.get("ok") in (True, None) else " **FAIL**")

    sdes, out = _method_sde_table(results, rows, "method", label, cell)
    return md_table(["method", "theory"] + sdes, out)


def nfe_table(results: dict, problem: str, level: str = "1e-03") -> str | None:
    rows = [r for r in results["deterministic"] if r["problem"] == problem]
    if not rows:
        return None

    def cell(r):
        v = r["nfe_to"].get(level)
        first = r["sweep_nfe"][0] if r["sweep_nfe"] else None
        if v is None:
            return f"> {r['sweep_nfe'][-1]}" if r["sweep_nfe"] else "-"
        if first is not None and v <= first and r["sweep_errors"][0] <= float(level):
            return f"<= {first}"
        return f"{v:.0f}"

    sdes, out = _method_sde_table(results, rows, "name", lambda m, r: [f"{m} ({r['sweep_schedule']})"], cell)
    return md_table(["method (grid)"] + sdes, out)


def err_at_table(results: dict, problem: str, nfes=(10, 20)) -> str | None:
    rows = [r for r in results["deterministic"] if r["problem"] == problem]
    if not rows:
        return None

    def cell(r):
        d = dict(zip(r["sweep_nfe"], r["sweep_errors"]))
        vals = []
        for n in nfes:   # the nearest NFE actually made at or below n (heun: odd NFE)
            ks = [k for k in d if k <= n]
            vals.append(fmt(d[max(ks)], ".1e") if ks else "-")
        return " / ".join(vals)

    sdes, out = _method_sde_table(results, rows, "name", lambda m, r: [m], cell)
    return md_table(["method"] + [f"{s} (NFE {'/'.join(map(str, nfes))})" for s in sdes], out)


def grid_table(results: dict) -> str | None:
    rows = results["grids"]
    if not rows:
        return None
    sdes = _sdes(results, rows)
    by = defaultdict(dict)
    for r in rows:
        by[(r["method"], r["sde"])][r["schedule"]] = r
    out = []
    for m in dict.fromkeys(r["method"] for r in rows):
        for sch in dict.fromkeys(r["schedule"] for r in rows):
            cells = []
            for s in sdes:
                r = by[(m, s)].get(sch)
                if r is None:
                    cells.append("-")
                    continue
                d = dict(zip(r["nfe"], r["errors"]))
                ks = [k for k in d if k <= 20]
                e20 = d[max(ks)] if ks else None
                n3 = r["nfe_to"].get("1e-03")
                best = _best_schedule(by[(m, s)]) == sch
                cell = f"{fmt(e20, '.1e')} / {fmt(n3, '.0f', '>200')}"
                cells.append(f"**{cell}**" if best else cell)
            out.append([m, sch] + cells)
    return md_table(["method", "grid"] + [f"{s}: err@20 / NFE→1e-3" for s in sdes], out)


def _best_schedule(d: dict) -> str | None:
    def key(item):
        r = item[1]
        n3 = r["nfe_to"].get("1e-03")
        dd = dict(zip(r["nfe"], r["errors"]))
        ks = [k for k in dd if k <= 20]
        return (n3 if n3 is not None else 1e9, dd[max(ks)] if ks else 1e9)
    return min(d.items(), key=key)[0] if d else None


def weak_table(results: dict) -> str | None:
    rows = results["weak"]
    if not rows:
        return None
    out = []
    for r in rows:
        fitted = fmt(r["fitted"]) if r["affine"] else "MC"
        floor = "" if r["affine"] else f"floor {r['floor_mean']:.1e} / {r['floor_cov']:.1e} (n={r['samples']})"
        flag = "" if r.get("ok") in (True, None) else " **FAIL**"
        pts = ", ".join(f"{n}: {a:.1e}/{b:.1e}" for n, a, b in zip(r["nfe"], r["mean_errors"], r["cov_errors"]))
        out.append([r["sde"], r["method"], "exact" if r["affine"] else "Monte Carlo", fitted + flag, pts, floor])
    return md_table(["sde", "method", "moments", "weak order", "NFE: mean err / rel. cov err", "noise floor"], out)


def sw_table(results: dict) -> str | None:
    rows = results["sliced_wasserstein"]
    if not rows:
        return None
    out = []
    for r in rows:
        pts = ", ".join(f"{n}: {v:.3f}" for n, v in zip(r["nfe"], r["sw"]))
        fl = f"{r['floor']:.3f}" + (f" [{r['floor_min']:.3f}, {r['floor_max']:.3f}]" if "floor_min" in r else "")
        out.append([r["sde"], r["method"], pts, fl])
    return md_table(["sde", "method", "NFE: sliced W2",
                     f"floor: mean [range] of 2 exact sets of {rows[0]['samples']}"], out)


def lik_table(results: dict) -> str | None:
    rows = results["likelihood"]
    if not rows:
        return None
    out = []
    for r in rows:
        who = r["trace"] + (f" ({r['probes']} probe{'s' if r['probes'] > 1 else ''})" if r["probes"] else "")
        pts = ", ".join(f"{t:.0e}: {e:.1e} ({n})" for t, e, n in zip(r["tols"], r["mean_abs_error"], r["nfe"]))
        bias = f"{r['bias'][-1]:+.2e} ± {r['std_err'][-1]:.1e}"
        out.append([r["sde"], r["problem"], who, pts, bias, "ok" if r["ok"] else "**FAIL**"])
    return md_table(["sde", "problem", "trace", "tol: mean abs error (NFE)", "bias ± s.e. (tightest)", "check"], out)


def peer_order_table(results: dict) -> str | None:
    rows = results["peers"]["orders"]
    if not rows:
        return None
    out = [[r["peer"], fmt(r["theory"], "g"), fmt(r["fitted"]), "verified" if r["ok"] else "**dropped**",
            r.get("note", "")] for r in rows]
    return md_table(["peer", "expected order", "fitted (Gaussian)", "adapter", "note"], out)


def peer_verified(results: dict) -> set[str]:
    return {r["peer"] for r in results["peers"]["orders"] if r["ok"]}


def peer_compare_table(results: dict, problem: str, nfes=(10, 20)) -> str | None:
    comp = [c for c in results["peers"]["compare"] if c["problem"] == problem]
    if not comp:
        return None
    ok = peer_verified(results)
    out = []
    for c in comp:
        cells = []
        for n in nfes:
            row = next((r for r in c["rows"] if r["target_nfe"] == n), None)
            if row is None:
                cells += ["-", "-", "-"]
                continue
            ratio = row["peer_error"] / row["best_error"] if row["best_error"] else float("nan")
            cells += [f"{row['peer_error']:.2e} ({row['nfe']})",
                      f"{row['best_error']:.2e} {row['best']}", f"{ratio:.2f}"]
        end = c["rows"][0]["map"]["end"] if c["rows"] else ""
        out.append([c["peer"] + ("" if c["peer"] in ok else " (unverified)"), end] + cells)
    hdr = ["peer", "end"]
    for n in nfes:
        hdr += [f"peer err @{n} (NFE)", f"ours best @{n}", "peer/ours"]
    return md_table(hdr, out)


def peer_targets(results: dict, target_nfes=(5, 6, 8, 10, 15, 20, 50)) -> dict:
    """Per problem and NFE: the best verified peer (lowest error on its own map) and our best
    on that same map; plus the worst ratio over all verified peers."""
    ok = peer_verified(results)
    out = {}
    for c in results["peers"]["compare"]:
        if c["peer"] not in ok:
            continue
        for r in c["rows"]:
            key = (c["problem"], r["target_nfe"])
            d = out.setdefault(key, dict(best_peer=None, best_peer_error=math.inf, ours_on_it=None,
                                         worst_ratio=math.inf, worst_peer=None))
            if r["peer_error"] < d["best_peer_error"]:
                plain = {k: v for k, v in r["ours"].items() if not k.endswith("[calibrated]")}
                lab = min(plain, key=lambda k: plain[k]["error"]) if plain else None
                cal = r["ours"].get(r["best"], {}).get("calibration_nfe") if r["best"] else None
                d.update(best_peer=c["peer"], best_peer_error=r["peer_error"], ours_on_it=r["best_error"],
                         ours_method=r["best"] + (f", calibration {cal:,} NFE" if cal else ""),
                         ours_standard=plain[lab]["error"] if lab else math.nan, ours_standard_method=lab)
            ratio = r["peer_error"] / r["best_error"] if r["best_error"] > 0 else math.inf
            if ratio < d["worst_ratio"]:
                d.update(worst_ratio=ratio, worst_peer=c["peer"])
    return out


def best_fixed_config(results: dict) -> tuple[str | None, dict]:
    """The one configuration of ours (method + grid) with the best worst-case ratio (peer error /
    our error) over every verified peer, problem and NFE; and its ratios per (problem, NFE)."""
    ok = peer_verified(results)
    rows = [(c["problem"], c["peer"], r) for c in results["peers"]["compare"] if c["peer"] in ok for r in c["rows"]]
    if not rows:
        return None, {}
    labels = set.intersection(*[set(r["ours"]) for _, _, r in rows])
    def worst(lab):
        return min(r["peer_error"] / max(r["ours"][lab]["error"], 1e-300) for _, _, r in rows)
    best = max(sorted(labels), key=worst)
    per = {}
    for p, peer, r in rows:
        ratio = r["peer_error"] / max(r["ours"][best]["error"], 1e-300)
        key = (p, r["target_nfe"])
        if key not in per or ratio < per[key][0]:
            per[key] = (ratio, peer)
    return best, per


def default_config_table(results: dict) -> str | None:
    """Each of our methods on its default (log-SNR) grid, fixed over every point: its worst
    ratio (peer / ours) and on how many (peer, problem, NFE) points it is at least as good."""
    ok = peer_verified(results)
    rows = [(c["problem"], c["peer"], r) for c in results["peers"]["compare"] if c["peer"] in ok for r in c["rows"]]
    if not rows:
        return None
    labels = [lab for lab in dict.fromkeys(k for _, _, r in rows for k in r["ours"])
              if lab.endswith("[log_snr]") or lab.endswith("[calibrated]")]
    out = []
    for lab in labels:
        ratios = [(r["peer_error"] / max(r["ours"][lab]["error"], 1e-300), p, peer, r["target_nfe"])
                  for p, peer, r in rows if lab in r["ours"]]
        worst = min(ratios)
        ahead = sum(1 for v in ratios if v[0] >= 1.0)
        at10 = [v for v in ratios if v[3] == 10]
        out.append([lab, f"{ahead}/{len(ratios)}", f"{worst[0]:.2f} ({worst[1]} @{worst[3]}, {worst[2]})",
                    f"{min(at10)[0]:.2f}" if at10 else "-"])
    return md_table(["ours (fixed configuration)", "points with ratio >= 1", "worst ratio (where)",
                     "worst ratio at NFE 10"], out)


#: our method -> the peers' implementations of the same method (overhead comparison)
SAME_METHOD = {
    "dpmpp_2m": ("diffusers DPMSolverMultistep(2)", "k-diffusion dpmpp_2m"),
    "dpmpp_3m": ("diffusers DPMSolverMultistep(3)",),
    "unipc(order=3)": ("diffusers UniPCMultistep(2, bh2)",),
    "ddim": ("diffusers DDIM",),
    "euler": ("diffusers EulerDiscrete", "k-diffusion euler"),
    "heun": ("diffusers HeunDiscrete", "k-diffusion heun"),
    "dpm_solver_3": ("k-diffusion dpm_fast",),
}


def overhead_pairs(results: dict) -> str | None:
    rows = results["peers"].get("overhead") or []
    if not rows:
        return None
    cases = list(dict.fromkeys(r.get("case", "") for r in rows))
    by = {(r.get("case", ""), r["method"]): r["ratio"] for r in rows}
    out = []
    for ours, peers in SAME_METHOD.items():
        for peer in peers:
            if all((c, ours) in by and (c, peer) in by for c in cases):
                mine = " / ".join(f"{by[(c, ours)]:.3f}" for c in reversed(cases))
                theirs = " / ".join(f"{by[(c, peer)]:.3f}" for c in reversed(cases))
                ok = all(by[(c, ours)] <= by[(c, peer)] for c in cases)
                out.append([ours, mine, peer, theirs, "yes" if ok else "**no**"])
    return md_table(["ours", "ratio", "peer", "ratio", "ours <= peer"], out) if out else None


def overhead_table(results: dict) -> str | None:
    rows = results["peers"].get("overhead") or []
    if not rows:
        return None
    cases = list(dict.fromkeys(r.get("case", "") for r in rows))
    by = {(r.get("case", ""), r["method"]): r for r in rows}
    methods = list(dict.fromkeys((r["who"], r["method"]) for r in rows))
    out = []
    for who, m in methods:
        cells = []
        for c in cases:
            r = by.get((c, m))
            cells += [f"{r['total_ms']:.2f} ({r['nfe']})", f"{r['ratio']:.3f}"] if r else ["-", "-"]
        out.append([who, m] + cells)
    hdr = ["library", "method"]
    for c in cases:
        call = next(r["call_ms"] for r in rows if r.get("case", "") == c)
        hdr += [f"{c} ({call:.3f} ms/call): total ms (NFE)", "ratio"]
    worst = {}
    for c in cases:
        ours = [r["ratio"] for r in rows if r.get("case", "") == c and r["who"] == "ours"]
        peers = [r["ratio"] for r in rows if r.get("case", "") == c and r["who"] != "ours"]
        if ours and peers:
            worst[c] = (max(ours), min(peers))
    note = "; ".join(f"{c}: our worst {a:.3f} vs the best peer {b:.3f}" for c, (a, b) in worst.items())
    nfe = "/".join(str(n) for n in sorted({r["nfe"] for r in rows}))
    return md_table(hdr, out) + f"\n\nfloat32, single-threaded, NFE {nfe}, medians. {note}."


# -------------------------------------------------------------------------- console
def console(results: dict, stream) -> None:
    w = lambda s="": print(s, file=stream)  # noqa: E731
    w(f"\nvalidation ({results['tier']} tier), float64, t_end where sigma/alpha = 0.01")
    if results["analytic"]:
        w("\nAnalytic layer:")
        for r in results["analytic"]:
            w(f"  {r['sde']:7s} t_end {r['t_end']:.3g}  t_of_log_snr {r['t_of_log_snr_rel_err']:.1e}  "
              f"score vs autograd {r['score_vs_autograd']:.1e}  flow round trip {r['flow_roundtrip_rel']:.1e}")
    for p in _ladder_problems(results):
        w(f"\nFitted order, {_label(p)}:\n{order_table(results, p)}")
    for p in _problems(results["deterministic"], exclude=(EXACT_PROBLEM,)):
        w(f"\nNFE to reach RMS error 1e-3, {_label(p)}:\n{nfe_table(results, p)}")
    if results["grids"]:
        w(f"\nTime grids (2-D mixture), error at 20 NFE / NFE to 1e-3 (best in bold):\n{grid_table(results)}")
    if results["weak"]:
        w("\nStochastic samplers, weak errors on the Gaussian:")
        for r in results["weak"]:
            extra = f"weak order {r['fitted']:.2f}" if r["affine"] else \
                f"MC floor {r['floor_mean']:.1e}/{r['floor_cov']:.1e}"
            w(f"  {r['sde']:6s} {r['method']:38s} NFE {r['nfe'][-1]:4d}: mean {r['mean_errors'][-1]:.1e} "
              f"cov {r['cov_errors'][-1]:.1e}  {extra}")
    if results["sliced_wasserstein"]:
        w("\nSliced W2 on the 2-D mixture (largest NFE vs floor):")
        for r in results["sliced_wasserstein"]:
            w(f"  {r['sde']:6s} {r['method']:38s} NFE {r['nfe'][-1]:4d}: {r['sw'][-1]:.3f} (floor {r['floor']:.3f})")
    if results["likelihood"]:
        w(f"\nLikelihood:\n{lik_table(results)}")
    if results["peers"]["orders"]:
        w(f"\nPeer adapters:\n{peer_order_table(results)}")
        for p in _problems(results["peers"]["compare"]):
            w(f"\nPeers vs ours on each peer's own map, {_label(p)}:\n{peer_compare_table(results, p)}")
    for m in results["peers"].get("missing", []):
        w(f"peers not run: {m}")
    for n in results["notes"]:
        w(f"note: {n}")


# ---------------------------------------------------------------------------- plots
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    """PNG at dpi 80, quantised to a 256-colour palette (a third of the size) when Pillow is there."""
    import io

    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format="png")
    plt.close(fig)
    try:
        from PIL import Image

        buf.seek(0)
        Image.open(buf).convert("RGB").quantize(colors=256).save(path, optimize=True)
    except ImportError:
        path.write_bytes(buf.getvalue())


def _slopes(ax, xs, ys, orders=(1, 2, 3, 4)):
    """Reference slopes NFE^-p through the top-left of the data."""
    import numpy as np
    if not xs:
        return
    x0, x1 = min(xs), max(xs)
    y0 = max(ys)
    xx = np.array([x0, x1])
    for p in orders:
        ax.plot(xx, y0 * (xx / x0) ** (-p), color="0.6", lw=0.7, ls=":")
        ax.text(x1, y0 * (x1 / x0) ** (-p), f" {p}", color="0.5", fontsize=6, va="center")


def plot_det(results: dict, problem: str, path: Path) -> bool:
    plt = _plt()
    rows = [r for r in results["deterministic"] if r["problem"] == problem]
    if not rows:
        return False
    sdes = _sdes(results, rows)
    n = len(sdes)
    cols = min(3, n)
    nr = (n + cols - 1) // cols
    fig, axes = plt.subplots(nr, cols, figsize=(4.2 * cols, 3.3 * nr), squeeze=False)
    for ax, s in zip(axes.flat, sdes):
        xs, ys = [], []
        for r in [r for r in rows if r["sde"] == s]:
            if not r["sweep_nfe"]:
                continue
            lab = r["name"] + (f" ({r['fitted']:.2f})" if r.get("fitted") is not None and
                               math.isfinite(r.get("fitted", float('nan'))) else "")
            e = [max(v, 1e-16) for v in r["sweep_errors"]]
            ax.loglog(r["sweep_nfe"], e, marker=".", ms=3, lw=1, label=lab)
            xs += r["sweep_nfe"]
            ys += [v for v in e if math.isfinite(v)]
        _slopes(ax, xs, ys)
        for lv in (1e-2, 1e-3, 1e-4):
            ax.axhline(lv, color="0.85", lw=0.6)
        ax.set_title(f"{s} (t_end {end_time(SDES[s]()):.3g})", fontsize=9)
        ax.set_xlabel("NFE", fontsize=8)
        ax.set_ylabel("RMS error", fontsize=8)
        ax.set_ylim(max(min(ys, default=1e-12) / 3, 1e-13), max(ys, default=1) * 3)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=5.5, ncol=2, loc="lower left")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"{_label(problem)}: error vs NFE (legend: fitted order on the ladder; dotted: slopes 1-4)",
                 fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_grids(results: dict, method: str, path: Path) -> bool:
    plt = _plt()
    rows = [r for r in results["grids"] if r["method"] == method]
    if not rows:
        return False
    sdes = _sdes(results, rows)
    cols = min(3, len(sdes))
    nr = (len(sdes) + cols - 1) // cols
    fig, axes = plt.subplots(nr, cols, figsize=(3.8 * cols, 3.0 * nr), squeeze=False)
    for ax, s in zip(axes.flat, sdes):
        for r in [r for r in rows if r["sde"] == s]:
            if r["nfe"]:
                ax.loglog(r["nfe"], [max(v, 1e-16) for v in r["errors"]], marker=".", ms=3, lw=1, label=r["schedule"])
        ax.set_title(s, fontsize=9)
        ax.set_xlabel("NFE", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(sdes):]:
        ax.axis("off")
    fig.suptitle(f"{method} on the 2-D mixture under each time grid", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_stoch(results: dict, path: Path) -> bool:
    plt = _plt()
    weak, sw = results["weak"], results["sliced_wasserstein"]
    if not weak:
        return False
    sdes = _sdes(results, weak)
    fig, axes = plt.subplots(2, len(sdes), figsize=(4.0 * len(sdes), 6.0), squeeze=False)
    for j, s in enumerate(sdes):
        ax = axes[0, j]
        xs, ys = [], []
        for r in [r for r in weak if r["sde"] == s]:
            tot = [a + b for a, b in zip(r["mean_errors"], r["cov_errors"])]
            ax.loglog(r["nfe"], tot, marker=".", ms=3, lw=1, ls="-" if r["affine"] else "--",
                      label=r["method"] + (f" ({r['fitted']:.2f})" if r["affine"] else " (MC)"))
            xs += r["nfe"]
            ys += tot
        _slopes(ax, xs, ys, (1, 2))
        ax.set_title(f"{s}: weak error (mean + rel. cov), Gaussian", fontsize=8)
        ax.set_xlabel("NFE", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=5, loc="lower left")
        ax = axes[1, j]
        floor = None
        for r in [r for r in sw if r["sde"] == s]:
            ax.loglog(r["nfe"], r["sw"], marker=".", ms=3, lw=1, label=r["method"])
            floor = r["floor"]
        if floor is not None:
            ax.axhline(floor, color="k", lw=0.8, ls="--", label="noise floor (mean, range)")
            rr = [r for r in sw if r["sde"] == s and "floor_min" in r]
            if rr:
                ax.axhspan(rr[0]["floor_min"], rr[0]["floor_max"], color="0.85", alpha=0.6)
        ax.set_title(f"{s}: sliced W2, 2-D mixture", fontsize=8)
        ax.set_xlabel("NFE", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=5, loc="lower left")
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_scatter(store: dict, problems, path: Path) -> bool:
    plt = _plt()
    sc = store.get("scatter") or {}
    if not sc:
        return False
    sde = SDES["vp"]()
    t_end = end_time(sde)
    marg = problems["mixture2d"].target.marginal(sde, t_end)
    g = torch.linspace(-3.0, 4.5, 160, dtype=torch.float64)
    gx, gy = torch.meshgrid(g, g, indexing="xy")
    lp = marg.log_prob(torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)).reshape(gx.shape)
    panels = [("exact samples", marg.sample(1000, torch.Generator().manual_seed(9)))] + list(sc.items())
    cols = 4
    nr = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nr, cols, figsize=(3.0 * cols, 3.0 * nr), squeeze=False)
    for ax, (lab, x) in zip(axes.flat, panels):
        ax.contour(gx.numpy(), gy.numpy(), lp.exp().numpy(), levels=8, linewidths=0.6, cmap="Greys")
        x = x[:1000].double().numpy()
        ax.scatter(x[:, 0], x[:, 1], s=1.5, alpha=0.5, color="C3")
        ax.set_title(lab, fontsize=7)
        ax.set_xlim(-3, 4.5)
        ax.set_ylim(-3, 4.5)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("2-D mixture under VP at t_end: samples over the exact density", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_lik(results: dict, path: Path) -> bool:
    plt = _plt()
    rows = results["likelihood"]
    if not rows:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for r in rows:
        lab = f"{r['sde']} {r['problem']} {r['trace']}" + (f"x{r['probes']}" if r["probes"] else "")
        ls = "-" if r["trace"] == "exact" else "--"
        axes[0].loglog(r["tols"], r["mean_abs_error"], marker=".", ls=ls, lw=1, label=lab)
        axes[1].loglog(r["nfe"], r["mean_abs_error"], marker=".", ls=ls, lw=1, label=lab)
    tl = sorted({t for r in rows for t in r["tols"]})
    axes[0].loglog(tl, tl, color="0.6", lw=0.7, ls=":", label="error = tol")
    axes[0].set_xlabel("rtol = atol", fontsize=8)
    axes[1].set_xlabel("NFE", fontsize=8)
    for ax in axes:
        ax.set_ylabel("mean |log p error| (nats)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=5.5)
    fig.suptitle("log_likelihood vs exact (Hutchinson: its Monte-Carlo noise)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_peers(results: dict, problem: str, path: Path) -> bool:
    plt = _plt()
    comp = [c for c in results["peers"]["compare"] if c["problem"] == problem]
    if not comp or not any(len(c["rows"]) > 1 for c in comp):
        return False
    ok = peer_verified(results)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for k, c in enumerate(comp):
        if not c["rows"]:
            continue
        col = f"C{k % 10}"
        n = [r["nfe"] for r in c["rows"]]
        lab = c["peer"] + ("" if c["peer"] in ok else " (unverified)")
        axes[0].loglog(n, [r["peer_error"] for r in c["rows"]], ls="--", marker="x", ms=3, lw=0.8, color=col,
                       label=lab)
        axes[0].loglog(n, [r["best_error"] for r in c["rows"]], ls="-", marker=".", ms=3, lw=0.8, color=col)
        axes[1].semilogx(n, [r["peer_error"] / r["best_error"] for r in c["rows"]], marker=".", lw=0.8, color=col,
                         label=lab)
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].axhline(1.5, color="k", lw=0.6, ls=":")
    axes[1].set_yscale("log")
    axes[0].set_title("dashed: peer; solid: our best on the same map", fontsize=8)
    axes[1].set_title("peer error / our best error (> 1: we are ahead)", fontsize=8)
    for ax in axes:
        ax.set_xlabel("NFE", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=5, ncol=2)
    fig.suptitle(f"Peers on the {_label(problem)}", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return True


# ---------------------------------------------------------------------------- write
def write(results: dict, store: dict, problems, out: Path) -> None:
    """report.md with every plot the results allow (``problems``: the suite's, for the 2-D scatter)."""
    plots = {}

    def add(key: str, draw, *args) -> None:
        if draw(*args, out / f"{key}.png"):
            plots[key] = f"{key}.png"

    for p in _problems(results["deterministic"]):
        add(f"det_{p}", plot_det, results, p)
    for m in GRID_METHODS:
        add(f"grids_{m}", plot_grids, results, m)
    add("stochastic", plot_stoch, results)
    add("samples_2d", plot_scatter, store, problems)
    add("likelihood", plot_lik, results)
    add("stochpeers", plot_stochastic_peers, results)
    for p in _problems(results["peers"]["compare"]):
        add(f"peers_{p}", plot_peers, results, p)
    write_markdown(results, out, plots=plots)


def write_markdown(results: dict, out: Path, plots: dict | bool = False) -> None:
    (out / "report.md").write_text(render_markdown(results, plots or {}))


def render_markdown(results: dict, plots: dict) -> str:
    """The report: each of ``SECTIONS`` in turn (a section with nothing to say returns "")."""
    parts = [section(results, plots) for section in SECTIONS]
    return "\n".join(p for p in parts if p) + "\n"


def _problems(rows, *, exclude=()) -> list[str]:
    """The problems of ``rows``, in the order of ``PROBLEM_LABEL`` (others after, as they appear)."""
    present = dict.fromkeys(r["problem"] for r in rows)
    known = [p for p in PROBLEM_LABEL if p in present]
    return [p for p in known + [p for p in present if p not in PROBLEM_LABEL] if p not in exclude]


def _label(problem: str) -> str:
    return PROBLEM_LABEL.get(problem, problem)


def _tables(results: dict, problems, table) -> list[str]:
    """``**problem label**`` and ``table(results, p)`` for each problem that has one."""
    out = []
    for p in problems:
        t = table(results, p)
        if t:
            out.append(f"**{_label(p)}**\n\n{t}\n")
    return out


def _span(values, spec=".2f") -> str:
    lo, hi = min(values), max(values)
    return format(lo, spec) if format(lo, spec) == format(hi, spec) else f"{lo:{spec}} to {hi:{spec}}"


def _ladder_problems(results: dict) -> list[str]:
    return _problems([r for r in results["deterministic"] if "fitted" in r])


def _at_nfe(nfes, errors, n):
    """The error at the largest NFE made at or below ``n`` (None if none)."""
    d = dict(zip(nfes, errors))
    ks = [k for k in d if k <= n]
    return d[max(ks)] if ks else None


# ---------------------------------------------------------------------- sections
def header_section(results: dict, plots: dict) -> str:
    fails = results["failures"]
    full = "--full " if results["tier"] == "full" else ""
    L = ["# scoresde validation report\n",
         f"Tier: **{results['tier']}** ({results['seconds']:.0f} s, torch {results['torch']}); "
         f"regenerate with `python -m validation {full}--out <folder>`.\n",
         f"**Verdict: {'FAIL' if fails else 'PASS'}**" + (f" ({len(fails)} failures)" if fails else "") + "\n"]
    L += [f"- {f}" for f in fails] + ([""] if fails else [])
    L += [f"> Note: {n}\n" for n in results["notes"]]
    return "\n".join(L)


def setup_section(results: dict, plots: dict) -> str:
    t_end = results["t_end"]
    sweep = sorted({n for r in results["deterministic"] for n in r["sweep_nfe"]})
    ve = f" (VE: its default t_end {t_end['ve']:g})" if "ve" in t_end else ""
    L = ["## Setup\n",
         f"Every solver starts from exact samples of the marginal at T and stops at `t_end`, where "
         f"sigma/alpha = {END_NOISE:g}{ve}, in float64. Error = RMS per "
         f"coordinate against the exact probability-flow map (Gaussian: closed form) or a tight "
         f"pf_ode reference (mixtures: dopri8, rtol = atol = {REF_TOL:g}; its own accuracy, against a 10x "
         f"looser solve, is listed below). Orders are fitted on a doubling ladder of steps (last three "
         f"points above {ROUNDOFF_FLOOR:g})"
         + (f"; NFE-to-reach values interpolate the error-vs-NFE sweep on the log-log curve (NFE {sweep[0]} "
            f"to {sweep[-1]}, each method with its default grid and options)" if sweep else "") + ".\n",
         md_table(["sde", "T", "t_end"], [[k, fmt(SDES[k]().T, ".4g"), fmt(v, ".4g")] for k, v in t_end.items()])
         + "\n"]
    if results.get("reference_checks"):
        worst = max(r["rms_vs_10x_looser"] for r in results["reference_checks"])
        L.append(f"Reference accuracy: the tight pf_ode references differ from 10x looser solves by at most "
                 f"{worst:.1e} (RMS), far below the errors fitted.\n")
    if results["analytic"]:
        L.append("Analytic layer: " + "; ".join(
            f"{r['sde']}: t_of_log_snr {r['t_of_log_snr_rel_err']:.0e}, score vs autograd "
            f"{r['score_vs_autograd']:.0e}, flow round trip {r['flow_roundtrip_rel']:.0e}"
            for r in results["analytic"]) + ".\n")
    return "\n".join(L)


def _superconverging(results: dict) -> dict[str, list[float]]:
    """Methods whose fitted order on the exact Gaussian exceeds theory + tol: their fitted orders."""
    out = defaultdict(list)
    for r in results["deterministic"]:
        if r["problem"] == EXACT_PROBLEM and "fitted" in r and r["fitted"] > r["theory"] + results["tol"]:
            out[r["name"]].append(r["fitted"])
    return dict(out)


def _order_gate(results: dict) -> str:
    rows = [r for r in results["deterministic"] if "fitted" in r]
    tol = results["tol"]
    sup = _superconverging(results)
    gated = [p for p in _ladder_problems(results) if any(r.get("gated") for r in rows if r["problem"] == p)]
    text = f"Gate: {_label(EXACT_PROBLEM)}, fitted >= theory - {tol:g}" if EXACT_PROBLEM in gated else "Gate:"
    if sup:
        text += (" (superconvergence is allowed: the Gaussian's x0-prediction is smooth in log-SNR; "
                 + ", ".join(f"{m} measures {_span(v)}" for m, v in sup.items()) + ")")
    capped = {r["name"]: r["max_order"] for r in rows if r.get("max_order")}
    others = [_label(p) for p in gated if p != EXACT_PROBLEM]
    if others:
        text += (f"; {', '.join(others)}, |fitted - theory| <= {tol:g}"
                 + "".join(f" ({m} up to {v:g}, the order of its corrected steps)" for m, v in capped.items()))
    ungated = [_label(p) for p in _ladder_problems(results) if p not in gated]
    return text + "." + (f" Reported, not gated: {', '.join(ungated)}." if ungated else "")


def det_orders_section(results: dict, plots: dict) -> str:
    if not results["deterministic"]:
        return ""
    L = ["## Deterministic methods\n", "### Fitted order vs theory\n", _order_gate(results) + "\n"]
    return "\n".join(L + _tables(results, _ladder_problems(results), order_table))


def det_nfe_section(results: dict, plots: dict) -> str:
    if not results["deterministic"]:
        return ""
    L = ["### NFE to reach an RMS error of 1e-3\n"]
    L += _tables(results, _problems(results["deterministic"]), nfe_table)
    return "\n".join(L + ["1e-2 and 1e-4: `nfe_to` in results.json.\n"])


def det_err_at_section(results: dict, plots: dict) -> str:
    if not results["deterministic"]:
        return ""
    L = ["### Error at NFE 10 / 20\n"]
    L += _tables(results, _problems([r for r in results["deterministic"] if "fitted" in r],
                                    exclude=(EXACT_PROBLEM,)), err_at_table)
    L += [f"![{p}]({plots[f'det_{p}']})\n" for p in _problems(results["deterministic"]) if f"det_{p}" in plots]
    return "\n".join(L)


def grids_section(results: dict, plots: dict) -> str:
    if not results["grids"]:
        return ""
    where = " and ".join(_label(p) for p in _problems(results["grids"]))
    L = ["## Time grids\n",
         f"The same method under each schedule on the {where}; cell: error at 20 NFE / NFE to "
         "reach 1e-3 (bold: the best grid for that SDE).\n",
         grid_table(results) + "\n"]
    L += [f"![grids {m}]({plots[f'grids_{m}']})\n" for m in GRID_METHODS if f"grids_{m}" in plots]
    return "\n".join(L)


def stochastic_section(results: dict, plots: dict) -> str:
    weak, sw = results["weak"], results["sliced_wasserstein"]
    L = []
    if weak:
        theory = min(r["theory"] for r in weak if r["affine"]) if any(r["affine"] for r in weak) else None
        gate = f" (gate: >= {theory:g} - {results['tol']:g})" if theory is not None else ""
        mc = [r["method"] for r in dict((r["method"], r) for r in weak if not r["affine"]).values()]
        L += ["## Stochastic methods\n",
              "Weak errors on the Gaussian: |mean - exact mean| and |cov - exact cov|_F / |exact cov|_F at "
              "t_end. Affine samplers: exact output moments by linearity (one impulse run), no Monte-Carlo "
              f"noise, so the weak order is fitted{gate}."
              + (f" {_and(mc)} use Monte Carlo (adaptive_sde: points = tolerances "
                 f"{ADAPTIVE_TOLS[0]:g}..{ADAPTIVE_TOLS[-1]:g}); their noise floor is the same error for exact "
                 "samples of the same size." if mc else "") + "\n",
              weak_table(results) + "\n"]
    if sw:
        L += [f"Sliced 2-Wasserstein (fixed random directions) between sampler outputs and exact samples of the "
              f"{_label(sw[0]['problem'])} at t_end; the floor is the distance between two independent exact sets "
              "of the same size, itself random (how many samples fall in each component): its mean and range over "
              "independent pairs are given, and a distance inside the range is indistinguishable from exact "
              "sampling." + _diverging_note(results) + "\n",
              sw_table(results) + "\n"]
    L += [f"![{alt}]({plots[k]})\n" for k, alt in (("stochastic", "stochastic"), ("samples_2d", "samples"))
          if k in plots]
    return "\n".join(L)


# ------------------------------------------------------------- stochastic samplers vs peers
def _sp_cell(r: dict, metric: str) -> str:
    """A distance (mixtures: sliced W2 / energy), with the actual NFE where below the budget."""
    v = fmt(r[metric], ".3g") + (f" / {fmt(r['energy'], '.3g')}" if metric == "sw" else "")
    v += " (MC)" if r["mode"] == "mc" else ""
    return v + (f" [{r['nfe']}]" if r["nfe"] != r["budget"] else "")


def _sp_problem_tables(p: dict, budgets) -> list[str]:
    metric = p["metric"]
    by = defaultdict(dict)
    for r in p["rows"]:
        by[(r["who"], r["sampler"])][r["budget"]] = r
    rows = [[s if who in ("ours", s.split(" ")[0]) else f"{s} ({who})"] +
            [_sp_cell(c[b], metric) if b in c else "-" for b in budgets] for (who, s), c in by.items()]
    fl = p["floors"].get(p["canonical_map"], {})
    if "kl_mc" in fl:
        f = fl["kl_mc"]
        rows.append([f"floor of MC rows ({f['samples']} exact samples)"] + [f"{f['mean']:.2g} ({f['min']:.2g}-"
                                                                           f"{f['max']:.2g})"] * len(budgets))
    elif "sw" in fl:
        rows.append([f"floor ({fl['samples']} vs {fl['samples']} exact)"] +
                    [f"{fl['sw']['mean']:.3g} / {fl['energy']['mean']:.3g}"] * len(budgets))
    what = "KL(sampler ‖ target), exact moments unless MC" if metric == "kl" else "sliced W2 / energy distance"
    L = [f"**{p['label']}** ({p['role']}; {what}; ours and score_sde's PC on the map {p['canonical_map']}, "
         "each peer on its own; [n]: the NFE used where below the budget)\n",
         md_table(["sampler"] + [f"NFE {b}" for b in budgets], rows) + "\n"]
    comp = [[str(b), c["peer"], f"{c['peer_value']:.3g}", c["ours"], f"{c['ours_value']:.3g}", f"{c['ratio']:.2f}",
             f"{c['floor']['mean']:.2g} (max {c['floor']['max']:.2g})", c["map"]]
            for b, c in sorted(p["compare"].items(), key=lambda kv: int(kv[0]))]
    if comp:
        L += ["Best vs best, on the best peer's own map (ratio < 1: ours ahead; in the ratio a Monte-Carlo "
              "distance inside the floor's range counts as the floor's maximum: sampling noise alone reaches it):\n",
              md_table(["NFE", "best peer", metric, "our best there", metric, "ours / peer",
                        "floor" + (" of MC rows" if metric == "kl" else ""), "map"], comp) + "\n"]
    return L


def stochastic_peers_section(results: dict, plots: dict) -> str:
    sp = results.get("stochpeers")
    if not sp or not sp.get("problems"):
        return ""
    budgets = sp["budgets"]
    L = ["## Stochastic samplers vs the peers' stochastic samplers\n",
         "Every sampler starts from exact samples of the marginal at its first noise level and is judged by the "
         "law of its output against the exact law of its map's end (the Tweedie estimate at the last evaluated "
         "level where the map denoises). Gaussian: the exact KL divergence, from exact output moments by "
         "linearity (impulse runs through each library's noise hook) for every affine sampler, Monte Carlo "
         f"({sp['mc_samples']} samples, floor stated) otherwise. Mixtures: sliced W2 and energy distance between "
         f"{sp['samples']} outputs and as many exact samples; the floor is the same distance between two "
         "independent exact sets. NFE counted at the model; a map that denoises costs us one NFE of the budget. "
         f"The row \"{sp['score_sde_pc']}\" is score_sde's predictor-corrector sampler (our `pc` with that "
         "option). Peer grids: k-diffusion, Karras (rho 7) from VP at T to sigma/alpha 0.01, then 0; diffusers, "
         "the DDPM table (linear betas 1e-4..0.02) with each scheduler's default spacing. Notes: "
         + "; ".join(f"{k}: {v}" for k, v in sp.get("peer_notes", {}).items()) + ". The maps are explained in "
         "`validation/stochastic_peers.py`.\n"]
    if sp.get("skipped"):
        L.append(f"Not registered here, skipped: {', '.join(sp['skipped'])}.\n")
    L += [f"Peers not run: {m}\n" for m in sp.get("missing", [])]
    for p in sp["problems"]:
        L += _sp_problem_tables(p, budgets)
    rec = sp.get("recommended") or {}
    if rec:
        rows = []
        for b, r in sorted(rec.items(), key=lambda kv: int(kv[0])):
            held = "; ".join(f"{h['problem']}: {h['ratio']:.2f}" + ("" if h["within"] else " (loses)")
                             + (" (inside the floor range)" if h.get("at_floor") else "") for h in r["heldout"]) or "-"
            rows.append([b, r["rule"], f"{r.get('tuning_worst', r['tuning_ratio']):.2f} / {r['tuning_ratio']:.2f}",
                         held])
        L += ["Our recommended stochastic sampler per budget: one sampler per NFE, chosen on the tuning problems "
              "(the smallest worst-case ratio to the best peer there, ties by the geometric mean), then reported "
              "on the held-out problems (ratio to the best peer on its map; within 1.2, or inside the floor's "
              "range where a mixture distance cannot tell samplers apart, or marked *loses*):\n",
              md_table(["NFE", "recommended", "tuning: worst / geometric mean of ours / best peer",
                        "held-out: ours / best peer"], rows) + "\n"]
    if "stochpeers" in plots:
        L.append(f"![stochastic peers]({plots['stochpeers']})\n")
    return "\n".join(L)


def plot_stochastic_peers(results: dict, path: Path) -> bool:
    """Distance vs NFE per problem, log-log: our best and the best peer on the same map, the floor."""
    sp = results.get("stochpeers")
    probs = [p for p in (sp or {}).get("problems", []) if len(p["compare"]) > 1]
    if not probs:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(probs), figsize=(3.6 * len(probs), 3.2), squeeze=False)
    for ax, p in zip(axes[0], probs):
        cs = sorted(p["compare"].items(), key=lambda kv: int(kv[0]))
        n = [c["peer_nfe"] for _, c in cs]
        ax.loglog(n, [c["peer_value"] for _, c in cs], "x--", lw=0.8, ms=4, label="best peer")
        ax.loglog([c["ours_nfe"] for _, c in cs], [c["ours_value"] for _, c in cs], "o-", lw=0.8, ms=3,
                  label="our best")
        fl = p["floors"].get(p["canonical_map"], {})
        f = fl.get("kl_mc") if p["metric"] == "kl" else fl.get("sw")
        if f:
            ax.axhline(f["mean"], color="k", lw=0.6, ls=":", label="floor (MC)" if p["metric"] == "kl" else "floor")
        ax.set_title(f"{p['label']}: {'KL' if p['metric'] == 'kl' else 'sliced W2'}", fontsize=8)
        ax.set_xlabel("NFE", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    fig.tight_layout()
    _save(fig, path)
    return True


def _diverging_note(results: dict) -> str:
    """pc with the per-sample Langevin corrector, where its distance ends above the floor's range."""
    bad = [r for r in results["sliced_wasserstein"] if r["method"] == "pc(corrector=langevin)"
           and r["sw"] and r["sw"][-1] > r.get("floor_max", r["floor"])]
    if not bad:
        return ""
    where = ", ".join(f"{r['sde']} {r['sw'][-1]:.3f}" for r in bad)
    return (f" pc with the per-sample Langevin corrector ends above the floor here ({where}): its step size (snr |z| / |score|)^2 "
            "blows up for samples near a mode, where the score is small (a low-dimension effect documented "
            "in solvers/correctors.py).")


def likelihood_section(results: dict, plots: dict) -> str:
    rows = results["likelihood"]
    if not rows:
        return ""
    exact = [r for r in rows if r["trace"] == "exact" and r.get("bound")]
    bound = f" Exact trace: gate mean |error| <= {exact[0]['bound'][0] / exact[0]['tols'][0]:g} x tol." if exact else ""
    L = ["## Likelihood\n",
         "`solvers.log_likelihood` (dopri5, rtol = atol = tol) against the exact value of what it "
         "computes (log prior of the flowed point plus the integrated divergence; closed form for the "
         f"Gaussian, exact densities and a tight solve for the mixture).{bound} Hutchinson (Rademacher "
         "probes): unbiased, its error is the estimator's noise; gated on its bias against its standard "
         "error (`ok` in results.json).\n",
         lik_table(results) + "\n"]
    if "likelihood" in plots:
        L.append(f"![likelihood]({plots['likelihood']})\n")
    return "\n".join(L)


def _ours_candidates(results: dict) -> tuple[list[str], list[str], list[str], int | None]:
    """From the peer comparison's candidate labels ``"method [schedule]"``: our methods and grids,
    the methods run on calibrated grids, and the largest NFE with a calibrated candidate."""
    rows = [r for c in results["peers"]["compare"] for r in c["rows"]]
    labels = [tuple(k.rsplit(" [", 1)) for k in dict.fromkeys(k for r in rows for k in r["ours"])]
    plain = [(m, s.rstrip("]")) for m, s in labels if s != "calibrated]"]
    calibrated = [m for m, s in labels if s == "calibrated]"]
    cal_nfe = max((r["target_nfe"] for r in rows if any(k.endswith("[calibrated]") for k in r["ours"])), default=None)
    return (list(dict.fromkeys(m for m, _ in plain)), list(dict.fromkeys(s for _, s in plain)),
            calibrated, cal_nfe)


def _and(items) -> str:
    items = list(items)
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else "".join(items)


def _peers_intro(results: dict) -> str:
    methods, schedules, calibrated, cal_nfe = _ours_candidates(results)
    cal = (f", and, up to {cal_nfe} NFE, {_and(calibrated)} on a grid from `solvers.calibrate_timesteps` for "
           f"that method, map and NFE (fitted on {CALIBRATION_SAMPLES} separate calibration samples, seed "
           f"{CALIBRATION_SEED}, never the measured ones; its cost, `calibration_nfe` in results.json, is a "
           "one-time cost per model and NFE and is not counted in the NFE columns)" if calibrated else "")
    return ("Each peer runs on the same exact problem with its conventions converted exactly (see "
            "`validation/peers.py`); the map it computes (its start noise level, and its end: "
            "`denoise` = a final jump to sigma = 0 returning x0-hat at its last noise level, `flow0` "
            "= a higher-order step to sigma = 0, `sigma` = it stops at a noise level) is read from "
            "its own arrays, and the reference is the exact map for that run. Our methods run on "
            "the same map, from the same samples, at the same NFE (a `denoise` map costs us one NFE "
            f"for final_denoise; on a `flow0` map we integrate to sigma/alpha = {END_NOISE:g} and take the "
            "first-order denoising step to sigma = 0, one NFE, at every NFE alike, where the reference "
            f"is still the flow to sigma/alpha = {SIGMA_ZERO:g}); \"ours best\" is the best of "
            f"{_and(methods)}, each under the {_and(schedules)} grids{cal}, at that point (every candidate's "
            "error is in results.json); the best *single* configuration over all points, and the ratio "
            "without calibrated grids, are reported as well.\n")


def _auto_grid(grid: str, param: float) -> str:
    if grid == "karras":
        return f"the Karras grid (rho {param:g})"
    if grid == "vp_time":
        return {1.0: "a grid uniform in VP time", 2.0: "a grid quadratic in VP time"}.get(
            param, f"a power-{param:g} grid in VP time")
    return "a grid uniform in log-SNR"


def fewstep_section(results: dict, plots: dict) -> str:
    """``method="auto"`` on the held-out problems, against every peer configuration."""
    fs = results.get("fewstep")
    if not fs or not fs.get("problems"):
        return ""
    from .fewstep import auto_error, canonical_ratios, ratios, summarize
    L = ["## Few steps on held-out problems: `method=\"auto\"` against the peers\n",
         "The rule (`solvers/auto.py`, one fixed table; budget = NFE at the model) was chosen on the "
         "*tuning* problems of `validation/heldout.py`; these are the *held-out* ones, which it never saw. "
         "Every peer configuration (diffusers schedulers with their default and Karras grids, k-diffusion "
         "samplers with their Karras and exponential grids) runs on the same exact problem from the same "
         "start samples; `auto` runs on each peer's own map at that peer's NFE. Ratio = auto's error / the "
         "peer's: **vs best** = against the lowest-error peer configuration at that point (an oracle over "
         "the peers, chosen per point), **worst** = the largest ratio over all peer configurations. "
         "No calibration: auto uses a calibrated grid only when the caller passes one.\n"]
    rule = ", ".join(f"NFE >= {r['from_nfe']}: `{r['method']}`"
                     + (f"({', '.join(f'{k}={v}' for k, v in r['options'].items())})" if r["options"] else "")
                     + f" on {_auto_grid(r['grid'], r['grid_param'])}"
                     + (" + analytic first step" if r["analytic_first_step"] else "") for r in fs["rule"])
    L.append(f"**The rule:** {rule}.\n")
    nfes = sorted({n for res in fs["problems"] for n in ratios(res, auto_error)})
    rows = []
    for res in fs["problems"]:
        rr = ratios(res, auto_error)
        rows.append([res["label"]] + [f"{rr[n]['vs_best']:.2f} / {rr[n]['worst']:.2f}" if n in rr else "-"
                                      for n in nfes])
    summ = summarize(fs["problems"])
    rows.append(["**geometric mean / max of vs best**"] + [
        f"{summ[n]['geomean_vs_best']:.2f} / {summ[n]['max_vs_best']:.2f}" if n in summ else "-" for n in nfes])
    L += ["Each cell: ratio vs best / worst ratio (< 1: auto is more accurate).\n",
          md_table(["held-out problem"] + [f"NFE {n}" for n in nfes], rows) + "\n"]
    crow = []
    for res in fs["problems"]:
        cr = canonical_ratios(res, auto_error)
        crow.append([res["label"]] + [f"{cr[n]:.2f}" if n in cr else "-" for n in nfes])
    L += ["**On the plain map** (VP from t = 1 to the data end, sigma/alpha = 0.01, then the denoising "
          "step: the map every k-diffusion sampler runs here): auto / the best k-diffusion configuration.\n",
          md_table(["held-out problem"] + [f"NFE {n}" for n in nfes], crow) + "\n"]
    best = []
    for res in fs["problems"]:
        rr = ratios(res, auto_error)
        best.append(f"{res['label']}: " + ", ".join(f"{n} {rr[n]['best_peer']}" for n in nfes if n in rr))
    L.append("Best peer configuration per point: " + "; ".join(best) + ".\n")
    if fs.get("missing"):
        L.append("Peers not run: " + ", ".join(fs["missing"]) + ".\n")
    return "\n".join(L)


def peers_section(results: dict, plots: dict) -> str:
    pe = results["peers"]
    if not (pe["orders"] or pe.get("missing")):
        return ""
    L = ["## Peers\n"] + [f"- not run: {m}" for m in pe.get("missing", [])]
    if pe["orders"]:
        nfe = sorted({n for r in pe["orders"] for n in r["nfe"]})
        L += [_peers_intro(results),
              f"**Adapter check** (Gaussian, NFE {nfe[0]}..{nfe[-1]}; diffusers in its Karras-sigma "
              "configuration, whose map does not move with the step count):\n",
              peer_order_table(results) + "\n"]
        for p in _problems(pe["compare"]):
            t = peer_compare_table(results, p)
            if t:
                L.append(f"**Peers vs ours, {_label(p)}** (defaults of each peer; rows of dropped "
                         f"adapters are marked unverified and left out of the targets)\n\n{t}\n")
            if f"peers_{p}" in plots:
                L.append(f"![peers {p}]({plots[f'peers_{p}']})\n")
    return "\n".join(L)


def _targets_table(tg: dict) -> str:
    rows = [[p, n, f"{d['best_peer']}: {d['best_peer_error']:.2e}", f"{d['ours_on_it']:.2e} ({d['ours_method']})",
             f"{d['best_peer_error'] / d['ours_on_it']:.2f}", f"{d['worst_ratio']:.2f} ({d['worst_peer']})",
             f"{d['best_peer_error'] / d['ours_standard']:.2f} ({d['ours_standard_method']})"]
            for (p, n), d in sorted(tg.items())]
    return md_table(["problem", "NFE", "best verified peer", "ours on its map", "ratio",
                     "worst ratio over all peers", "ratio without calibrated grids"], rows)


def targets_section(results: dict, plots: dict) -> str:
    tg = peer_targets(results) if results["peers"]["orders"] else {}
    if not tg:
        return ""
    nfes = ", ".join(str(n) for n in sorted({n for _, n in tg}))
    L = [f"**Our best configuration per point, on the suite's own problems** (targets: <= the best peer at "
         f"every NFE in {{{nfes}}}, and {TARGET_MARGIN:g}x smaller at NFE {TARGET_MARGIN_NFE}). \"Ours\" is an "
         "oracle: the best of all our configurations at each point, calibrated grids included, on problems "
         "we chose; it is not what one fixed configuration achieves on new problems (that is the held-out "
         "section above). Ratio = peer error / our best error on the peer's own map; < 1 means we are "
         "behind.\n", _targets_table(tg) + "\n"]
    behind = [(p, n, d) for (p, n), d in sorted(tg.items()) if d["worst_ratio"] < 1.0]
    if behind:
        L.append("**Where we are behind:** " + "; ".join(
            f"{p} NFE {n}: {d['worst_peer']} (ratio {d['worst_ratio']:.2f})" for p, n, d in behind) + ".\n")
    t = default_config_table(results)
    if t:
        L += ["**Fixed configurations:** each of our methods on the log-SNR grid, and the calibrated "
              "configurations (at the points where they were run), the same configuration at every point "
              "(no per-point choice):\n", t + "\n"]
    fixed, per = best_fixed_config(results)
    if fixed:
        L.append(f"The single configuration (present at every point, so without calibration) with "
                 f"the best worst-case ratio is `{fixed}` (worst {min(v[0] for v in per.values()):.2f}).\n")
    short = [(p, d) for (p, n), d in sorted(tg.items()) if n == TARGET_MARGIN_NFE and d["worst_ratio"] < TARGET_MARGIN]
    if short:
        L.append(f"**Short of {TARGET_MARGIN:g}x at NFE {TARGET_MARGIN_NFE}:** " + "; ".join(
            f"{p}: {d['worst_peer']} (ratio {d['worst_ratio']:.2f})" for p, d in short) + ".\n")
    return "\n".join(L)


def overhead_section(results: dict, plots: dict) -> str:
    t = overhead_table(results) if results["peers"]["orders"] else None
    if not t:
        return ""
    L = ["**Per-step overhead** (ratio = total time / (NFE x one network call); 1.00 = no overhead):\n", t + "\n"]
    t = overhead_pairs(results)
    if t:
        L += ["**The same method side by side** (ratio, cheap network / realistic network; "
              "ours <= the peer's where the last column says yes):\n", t + "\n"]
    return "\n".join(L)


def _local_slopes(r: dict) -> list[float]:
    n, e = r["ladder_nfe"], r["ladder_errors"]
    return [math.log(e[i] / e[i + 1]) / math.log(n[i + 1] / n[i]) for i in range(len(e) - 1)
            if e[i] > 0 and e[i + 1] > 0]


def _note_superconvergence(results: dict) -> str | None:
    sup = _superconverging(results)
    if not sup:
        return None
    rows = [r for r in results["deterministic"] if "fitted" in r and r["name"] in sup]
    on = "; ".join(", ".join(
        f"{m} {_span([r['fitted'] for r in rows if r['problem'] == p and r['name'] == m])}" for m in sup)
        + f" on the {_label(p)}" for p in _ladder_problems(results) if p != EXACT_PROBLEM)
    return (f"- {_and(sup)} exceed their theoretical order on the Gaussian ("
            + ", ".join(f"{m} {_span(v)}" for m, v in sup.items()) + "): the exact x0-prediction of a Gaussian "
            "is a smooth function of log-SNR whose derivatives vanish at both ends, which removes the leading "
            "error term" + (f"; they measure {on}." if on else "."))


def _note_not_asymptotic(results: dict) -> str | None:
    """Ungated problems' methods fitted below theory - tol: their local slopes along the ladder."""
    tol = results["tol"]
    low = [r for r in results["deterministic"] if "fitted" in r and not r.get("gated")
           and r["fitted"] < r["theory"] - tol]
    if not low:
        return None
    where = "; ".join(f"{r['name']} under {r['sde']} " + ", ".join(f"{s:.2f}" for s in _local_slopes(r))
                      for r in low)
    probs = _and(_label(p) for p in _problems(low))
    return (f"- The {probs} ladders are not asymptotic for every method: local slopes along the ladder of the "
            f"fits below theory - {tol:g} are {where} (`ladder_errors` in results.json). Posterior "
            "responsibilities switch sharply in many dimensions, so the x0-prediction has large higher "
            "derivatives in log-SNR; it is reported, not gated.")


def _note_uniform_default(results: dict) -> str | None:
    rows = [r for r in results["deterministic"] if r["sweep_schedule"] == "uniform" and r["sweep_nfe"]]
    problem = next(iter(_problems(results["grids"]) or _problems(rows, exclude=(EXACT_PROBLEM,))), None)
    worst = {}
    for r in rows:
        e = _at_nfe(r["sweep_nfe"], r["sweep_errors"], 20) if r["problem"] == problem else None
        if e is not None and e > worst.get(r["name"], (-1.0,))[0]:
            worst[r["name"]] = (e, r["sde"])
    if not worst:
        return None
    see = "; see the time-grid table for the grid that suits each SDE" if results["grids"] else ""
    return (f"- Default grids matter: {_and(worst)} default{'s' if len(worst) == 1 else ''} to a uniform grid in t; "
            f"worst error at 20 NFE on the {_label(problem)}: "
            + ", ".join(f"{e:.2g} ({m}, {s})" for m, (e, s) in worst.items()) + f"{see}.")


def _note_ladders(results: dict) -> str | None:
    euler = next((r for r in results["deterministic"] if r["name"] == "euler" and "ladder_steps" in r), None)
    if euler is None:
        return None
    steps = euler["ladder_steps"]
    return (f"- Euler is fitted on a {euler['ladder_schedule']}-t grid with {steps[0]}..{steps[-1]} steps (its "
            "asymptotic range); DDIM and DPM-Solver-1 are the same method (checked equal to rounding in "
            "`tests/test_ode_solvers.py`).")


def notes_section(results: dict, plots: dict) -> str:
    _, _, calibrated, cal_nfe = _ours_candidates(results)
    calib = (f"- Calibrated grids (`solvers.calibrate_timesteps`, in the peer comparison up to {cal_nfe} NFE) are a "
             "fit to one model and one NFE on separate calibration samples. On these mixtures the fitted error and "
             "the error on the measured samples agree; on low-dimensional mixtures where a few trajectories near a "
             "mode boundary carry most of the error, a fit on a few dozen samples can lose to a standard grid "
             "(`tests/test_calibrate.py`; use a hundred or more).") if calibrated else None
    notes = [_note_superconvergence(results), _note_not_asymptotic(results), _note_uniform_default(results),
             calib, _note_ladders(results),
             "- All numbers are in results.json (`deterministic[].sweep_*`, `ladder_*`, `nfe_to`, `grids`, "
             "`weak`, `sliced_wasserstein`, `likelihood`, `peers`)."]
    return "\n".join(["## Notes\n"] + [n for n in notes if n])


#: the report, section by section (each takes the results and the plots, returns markdown or "")
SECTIONS = [header_section, setup_section, det_orders_section, det_nfe_section, det_err_at_section,
            grids_section, stochastic_section, stochastic_peers_section, likelihood_section, fewstep_section,
            peers_section, targets_section, overhead_section, notes_section]
