"""The validation suite's gate, CI-sized: a tiny subset runs through the suite's own functions
(a few seconds), passes, and the gate really fails (exit status 1, the failure listed) when a
fitted order cannot meet theory."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # validation/ is not an installed package
    sys.path.insert(0, str(ROOT))

from validation import deterministic as det  # noqa: E402
from validation import suite  # noqa: E402
from validation.problems import SDES, make_problems  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _case(sde="ve", problem="gaussian"):
    return det.Case(sde, SDES[sde](), make_problems()[problem], samples=16)


def test_fitted_order_of_a_real_method_passes_the_gate():
    row = det.run_method(_case(), det.MethodSpec("dpmpp_2m", 2), tol=0.3, nfes=(5, 10, 20))
    assert row["ok"], row
    assert abs(row["fitted"] - 2.0) < 0.3
    res = dict(analytic=[], det=[row], weak=[], lik=[], sw=[])
    assert suite.gate(res, 0.3, bounds=None) == []


def test_the_gate_fails_on_an_impossible_theory_order():
    row = det.run_method(_case(), det.MethodSpec("dpmpp_2m", 5), tol=0.3, nfes=(10,))
    assert row["ok"] is False
    fails = suite.gate(dict(analytic=[], det=[row], weak=[], lik=[], sw=[]), 0.3, bounds=None)
    assert len(fails) == 1 and "dpmpp_2m" in fails[0] and "theory 5" in fails[0]


def test_the_gate_fails_on_an_error_above_its_recorded_bound():
    row = det.run_method(_case(), det.MethodSpec("ddim", 1), tol=0.3, nfes=(10, 20))
    res = dict(analytic=[], det=[row], weak=[], lik=[], sw=[])
    key = f"det/ve/gaussian/ddim/nfe10"
    assert suite.gate(res, 0.3, bounds={key: 10.0}) == []
    fails = suite.gate(res, 0.3, bounds={key: 1e-9})
    assert len(fails) == 1 and key in fails[0]


def test_main_exits_1_and_lists_the_failure(tmp_path, monkeypatch, capsys):
    """End to end through ``python -m validation``'s main: exit 0 on a real method, exit 1
    when the method's theoretical order is made impossible (results.json still written)."""
    args = ["--sections", "det", "--sdes", "ve", "--methods", "ddim", "--quiet"]
    monkeypatch.setattr(det, "METHODS", [det.MethodSpec("ddim", 1, ladder=(8, 16, 32))])
    monkeypatch.setattr(det, "SWEEP_NFE", (5, 10, 20))
    assert suite.main(args + ["--out", str(tmp_path / "ok")]) == 0
    monkeypatch.setattr(det, "METHODS", [det.MethodSpec("ddim", 4, ladder=(8, 16, 32))])
    assert suite.main(args + ["--out", str(tmp_path / "bad")]) == 1
    out = capsys.readouterr().out
    assert "VERDICT: FAIL" in out and "ddim: fitted order" in out
    res = json.loads((tmp_path / "bad" / "results.json").read_text())
    assert res["failures"] and (tmp_path / "bad" / "report.md").exists()


def test_ours_on_a_peer_map_respects_its_nfe_and_end():
    """Our candidates on a peer's map (validation/peers.py) never spend more NFE than the peer;
    on a `flow0` map (the flow to sigma = 0) they integrate to sigma/alpha = 1e-2 and denoise;
    the calibrated candidates fit their grid on other samples than the measured ones."""
    import math

    from validation import peers as pe

    prob = make_problems()["mixture2d"]
    lam0 = -10.0
    x = pe._start(prob, lam0, 16)
    run = pe.PeerRun(x, x, 8, lam0, 9.0, "flow0", math.inf)
    ts, te, den = pe.ours_map(run)
    assert den and pe.log_snr_of_t(te) == pytest.approx(-2.0 * math.log(1e-2), abs=1e-8)
    ref = pe.RefCache().get(prob, run)
    seen, errors = set(), []
    for name, opts, sch in pe.OURS:
        r = pe.ours_on_map(prob, run, name, opts, run.nfe, ref, sch)
        if r is not None:
            assert r[1] <= run.nfe and math.isfinite(r[0])
            errors.append(r[0])
            seen.add(sch)
            assert (r[2] > 0) == (sch == "calibrated")
    assert "calibrated" in seen and "log_snr" in seen
    assert min(errors) < 0.1
    assert pe.CALIBRATION_SEED != 41          # the start samples' seed (pe._start)
