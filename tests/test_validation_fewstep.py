"""The few-step benchmark's machinery: the problem set and its split, the ratios against the
peers, the tuning rule's robustness constraint, and one real evaluation on a small problem."""
import math

import pytest
import torch

from validation import fewstep, heldout


def test_the_problem_set_is_split_in_two_alike_halves_with_fixed_seeds():
    assert len(heldout.TUNING) == len(heldout.HELDOUT) == 6
    assert not set(heldout.TUNING) & set(heldout.HELDOUT)
    dims = lambda names: sorted(int(n.split("mix")[1].split("-")[0]) for n in names if "-mix" in n)
    assert dims(heldout.TUNING) == dims(heldout.HELDOUT) == [2, 8, 64, 3072]
    a = heldout.random_mixture(8, "well", 7)
    b = heldout.random_mixture(8, "well", 7)
    assert torch.equal(a.means, b.means) and torch.equal(a.weights, b.weights)
    poor = heldout.random_mixture(8, "poor", 7)
    assert float(torch.cdist(poor.means, poor.means).max()) < float(torch.cdist(a.means, a.means).max())


def _result(peer_errors: dict, ours: dict) -> dict:
    """A synthetic evaluate() result at one NFE: peers on maps "A"/"B", ours per map."""
    peers = [dict(peer=p, target_nfe=5, nfe=5, error=e, map=[m]) for p, (m, e) in peer_errors.items()]
    maps = [dict(key=[m], nfe=5, ours={"c": e}, auto=dict(error=e, nfe=5)) for m, e in ours.items()]
    return dict(problem="x", peers=peers, maps=maps)


def test_ratios_take_the_best_peer_on_its_own_map_and_the_worst_over_all():
    res = _result({"p1": ("A", 0.2), "p2": ("B", 0.1), fewstep.CANONICAL: ("A", 0.3)}, {"A": 0.1, "B": 0.2})
    r = fewstep.ratios(res, fewstep.auto_error)[5]
    assert r["best_peer"] == "p2" and r["vs_best"] == pytest.approx(2.0)      # 0.2 on B / 0.1
    assert r["worst"] == pytest.approx(2.0) and r["worst_peer"] == "p2"
    # the canonical map: the best of the peers that share it (p1: 0.2)
    assert fewstep.canonical_ratios(res, fewstep.auto_error)[5] == pytest.approx(0.5)


def test_tuning_skips_a_candidate_that_loses_badly_on_one_problem():
    good_mean_bad_worst = {"A": 0.01}
    steady = {"A": 0.15}
    peers = {"p": ("A", 0.2), fewstep.CANONICAL: ("A", 0.2)}
    res = []
    for k in range(3):
        r = _result(peers, {"A": 0.0})
        r["maps"][0]["ours"] = {"sharp": good_mean_bad_worst["A"] if k else 0.2 * (fewstep.MAX_WORST_RATIO + 1),
                                "steady": steady["A"]}
        res.append(r)
    lab, g, worst = fewstep.tune_table(res, (5,))[5]
    assert lab == "steady" and worst <= fewstep.MAX_WORST_RATIO


def test_candidate_labels_are_unique_and_their_options_valid():
    cands = fewstep.candidates()
    assert len({c.label for c in cands}) == len(cands) > 100
    cands2 = fewstep.candidates(2)
    assert any(c.schedule == "vp_time" and c.rho == 2.5 for c in cands2)


@pytest.mark.slow
def test_evaluate_runs_every_peer_and_auto_on_a_small_problem(tmp_path):
    pytest.importorskip("diffusers")
    prob = heldout.make_heldout_problems(["held-gauss8"], samples=8)["held-gauss8"]
    res = fewstep.evaluate(prob, nfes=(5, 10), log=lambda *a: None)
    assert len({r["peer"] for r in res["peers"]}) >= 10
    assert all(m["auto"] is not None and m["auto"]["nfe"] <= m["nfe"] for m in res["maps"])
    assert all(math.isfinite(v["vs_best"]) for v in fewstep.ratios(res, fewstep.auto_error).values())
