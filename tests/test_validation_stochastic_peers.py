"""The stochastic-peer benchmark's machinery: its distances against closed forms, the floor
logic, the Brownian path behind dpmpp_sde's noise, the noise hooks into the peers (exact
moments by impulses vs Monte Carlo), and a tiny run that fills every table key."""
import math

import pytest
import torch

from validation import metrics, report
from validation import stochastic_peers as sp

F64 = torch.float64


def _normal(n, d, seed, shift=0.0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64) + shift


def test_energy_distance_is_zero_on_identical_sets_and_symmetric():
    a, b = _normal(300, 3, 0), _normal(200, 3, 1)
    assert metrics.energy_distance(a, a) == pytest.approx(0.0, abs=1e-7)
    assert metrics.energy_distance(a, b) == pytest.approx(metrics.energy_distance(b, a), rel=1e-12)
    # translation invariant, and chunking changes nothing
    assert metrics.energy_distance(a + 3.0, b + 3.0) == pytest.approx(metrics.energy_distance(a, b), rel=1e-9)
    assert metrics.energy_distance(a, b, chunk=7) == pytest.approx(metrics.energy_distance(a, b), rel=1e-12)
    with pytest.raises(ValueError, match="a, b"):
        metrics.energy_distance(a, b[:, :2])


def test_energy_distance_matches_scipy_in_1d():
    scipy_stats = pytest.importorskip("scipy.stats")
    a, b = _normal(500, 1, 2), _normal(400, 1, 3, shift=0.7)
    ref = scipy_stats.energy_distance(a[:, 0].numpy(), b[:, 0].numpy())
    assert metrics.energy_distance(a, b) == pytest.approx(ref, rel=1e-9)


def test_energy_distance_of_shifted_gaussians_against_the_closed_form():
    """N(0,1) vs N(mu,1): D^2 = 2 E|N(mu,2)| - 2 E|N(0,2)|,
    E|N(mu, s^2)| = s sqrt(2/pi) exp(-mu^2/2s^2) + mu (1 - 2 Phi(-mu/s))."""
    def mean_abs(mu, s):
        return s * math.sqrt(2 / math.pi) * math.exp(-mu * mu / (2 * s * s)) + mu * math.erf(mu / (s * math.sqrt(2)))

    for mu in (0.5, 2.0):
        exact = math.sqrt(2 * mean_abs(mu, math.sqrt(2)) - 2 * mean_abs(0.0, math.sqrt(2)))
        got = metrics.energy_distance(_normal(3000, 1, 4), _normal(3000, 1, 5, shift=mu))
        assert got == pytest.approx(exact, rel=0.06)


def test_gaussian_kl_against_known_values():
    z, one = torch.zeros(1, dtype=F64), torch.ones(1, 1, dtype=F64)
    assert metrics.gaussian_kl(z, one, z + 1.0, one) == pytest.approx(0.5, rel=1e-12)
    s2 = 2.5
    assert metrics.gaussian_kl(z, s2 * one, z, one) == pytest.approx(0.5 * (s2 - 1 - math.log(s2)), rel=1e-12)
    m, c = torch.tensor([1.0, -2.0], dtype=F64), torch.tensor([[2.0, 0.3], [0.3, 0.5]], dtype=F64)
    assert metrics.gaussian_kl(m, c, m, c) == pytest.approx(0.0, abs=1e-14)
    # against torch.distributions
    c2 = torch.tensor([[1.0, -0.2], [-0.2, 0.7]], dtype=F64)
    ref = torch.distributions.kl_divergence(torch.distributions.MultivariateNormal(m, c),
                                            torch.distributions.MultivariateNormal(m * 0.5, c2))
    assert metrics.gaussian_kl(m, c, m * 0.5, c2) == pytest.approx(float(ref), rel=1e-12)
    assert metrics.gaussian_kl(m, -c, m, c) == math.inf          # not a covariance


def test_the_floor_takes_independent_pairs_and_reports_mean_and_range():
    seen = []

    def dist(a, b):
        seen.append((a, b))
        return float(b - a) * a

    f = metrics.distance_floor(dist, lambda seed: seed, pairs=3)
    assert seen == [(1000, 1001), (1002, 1003), (1004, 1005)]
    assert (f["min"], f["max"], f["mean"]) == (1000, 1004, 1002)


def test_mixture_floor_brackets_a_fresh_exact_set():
    ctx = sp.Context(samples=400, mc_samples=400)
    prob = sp.make_problems()["mixture2d"]
    mp = sp.Map(-10.05, 9.1154, True)
    fl = sp.floors(ctx, prob, mp)
    x = sp.target_samples(prob, mp, 400, 77)
    d = sp._mixture_metrics(ctx, prob, mp, x)
    assert 0.0 < fl["sw"]["min"] <= fl["sw"]["mean"] <= fl["sw"]["max"]
    assert d["sw"] < 3 * fl["sw"]["max"] and d["energy"] < 3 * fl["energy"]["max"]
    # a biased sampler is far above the floor
    assert sp._mixture_metrics(ctx, prob, mp, x + 0.5)["energy"] > 3 * fl["energy"]["max"]


def test_brownian_path_gives_unit_normals_with_the_overlap_correlation():
    """dpmpp_sde's queries (s0, s_mid) then (s0, s1): each a unit normal, correlated
    sqrt(|s_mid - s0| / |s1 - s0|); every value linear in the normals drawn."""
    k = [0]

    def source(like):                     # the k-th call returns e_k: values are coefficient vectors
        z = torch.zeros(8, dtype=F64)
        z[k[0]] = 1.0
        k[0] += 1
        return z

    path = sp.BrownianPath(source, torch.zeros(8, dtype=F64))
    s0, s_mid, s1 = 10.0, 3.0, 1.0
    n1, n2 = path(s0, s_mid), path(s0, s1)
    assert float(n1.norm()) == pytest.approx(1.0, rel=1e-12) and float(n2.norm()) == pytest.approx(1.0, rel=1e-12)
    assert float(n1 @ n2) == pytest.approx(math.sqrt((s0 - s_mid) / (s0 - s1)), rel=1e-12)
    n3 = path(s1, 0.5)                    # the next step: independent of the last
    assert float(n3 @ n1) == pytest.approx(0.0, abs=1e-12) and float(n3 @ n2) == pytest.approx(0.0, abs=1e-12)
    n4 = path(s0, 2.0)                    # a point inside: a bridge, still unit variance
    assert float(n4.norm()) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("name", ["k-diffusion dpmpp_sde", "diffusers EulerAncestralDiscrete"])
def test_impulse_moments_of_a_peer_agree_with_monte_carlo(name):
    """The noise hooks: exact moments (one impulse run) vs 20000 sampled runs of the same peer."""
    import importlib

    peers, missing = sp.available_peers()
    peer = next((p for p in peers if p.name == name), None)
    if peer is None:
        pytest.skip(f"{name} not available: {missing}")
    prob = sp.make_problems()["gaussian"]
    mean, cov, _ = sp.peer_moments(peer, 4, prob)
    n = 20000
    pr = prob.as_problem(n)
    mc = peer.runner(4, pr, lambda ls: sp.start_samples(pr, sp.REF_SDE, t_start=sp.t_of_log_snr(ls), seed=3),
                     sp.Normals(4)).x
    m_mc, c_mc = mc.mean(0), torch.cov(mc.T)
    assert float((m_mc - mean).norm()) < 5 * math.sqrt(float(torch.trace(cov)) / n)
    assert float((c_mc - cov).norm() / cov.norm()) < 0.05
    if "diffusers" in name:                # randn_tensor put back
        mod = importlib.import_module("diffusers.schedulers.scheduling_euler_ancestral_discrete")
        from diffusers.utils.torch_utils import randn_tensor
        assert mod.randn_tensor is randn_tensor


def test_affinity_check_tells_the_batch_mean_corrector_apart():
    prob = sp.make_problems()["gaussian"]
    assert sp.is_affine(sp.StochSpec("euler_maruyama"), prob)
    spec, _ = sp.score_sde_pc()
    assert not sp.is_affine(spec, prob)


def test_a_tiny_run_fills_the_tables_and_the_report_section():
    res = sp.run(["gaussian", "mixture2d"], budgets=(10,), samples=200, mc_samples=400,
                 ours=["euler_maruyama", "dpmpp_2m_sde"],
                 peer_names=["k-diffusion euler_ancestral", "diffusers SASolver"])
    assert [p["problem"] for p in res["problems"]] == ["gaussian", "mixture2d"]
    g, m = res["problems"]
    assert g["metric"] == "kl" and m["metric"] == "sw"
    who = {(r["who"], r["sampler"]) for r in g["rows"]}
    assert ("ours", "euler_maruyama") in who and ("k-diffusion", "k-diffusion euler_ancestral") in who
    assert any(w == "score_sde" for w, _ in who)
    for r in g["rows"]:
        assert r["nfe"] <= 10 and math.isfinite(r["kl"]) and r["mode"] in ("exact", "mc")
    for r in m["rows"]:
        assert {"sw", "energy"} <= set(r) and r["nfe"] <= 10
    for p in res["problems"]:
        c = p["compare"][10]
        assert {"peer", "peer_value", "ours", "ours_value", "ratio", "map"} <= set(c)
        assert c["ratio"] == pytest.approx(c["on_map_effective"][c["ours"]] / c["peer_effective"])
        assert c["on_map"][c["ours"]] == c["ours_value"] and c["floor"]["mean"] <= c["floor"]["max"]
        assert p["canonical_map"] in p["floors"]
    fl = m["floors"][m["canonical_map"]]
    assert {"sw", "energy"} <= set(fl) and fl["sw"]["min"] <= fl["sw"]["max"]
    assert "kl_mc" in g["floors"][g["canonical_map"]]
    rec = res["recommended"]["10"]
    assert rec["rule"] in ("euler_maruyama", "dpmpp_2m_sde") and rec["tuning_worst"] >= rec["tuning_ratio"]
    md = report.stochastic_peers_section(dict(stochpeers=res), {})
    assert "Stochastic samplers vs" in md and "best peer" in md and "recommended" in md


def test_comparisons_clip_monte_carlo_distances_at_the_floor_maximum():
    ctx = sp.Context(samples=300, mc_samples=300)
    prob = sp.make_problems()["mixture2d"]
    mp = sp.Map(-10.05, 9.1154, True)
    top = sp.floors(ctx, prob, mp)["sw"]["max"]
    row = dict(mode="samples", map=mp, sw=0.5 * top)
    assert sp.effective(ctx, prob, row, "sw") == top                        # inside the floor: noise
    assert sp.effective(ctx, prob, dict(row, sw=3 * top), "sw") == 3 * top
    assert sp.effective(ctx, prob, dict(row, mode="exact", sw=1e-9), "sw") == 1e-9   # exact: as is


def test_the_recommended_sampler_is_the_minimax_one_and_the_floor_excuses_a_held_out_ratio():
    def comp(a, b, peer=1.0, floor_max=0.0):
        return dict(on_map={"A": a, "B": b}, on_map_effective={"A": a, "B": b}, peer="p", peer_value=peer,
                    peer_effective=peer, floor=dict(mean=floor_max / 2, max=floor_max))

    results = [dict(problem="t1", role="tuning", metric="kl", compare={10: comp(0.1, 0.9)}),
               dict(problem="t2", role="tuning", metric="sw", compare={10: comp(1.3, 0.9)}),
               dict(problem="h1", role="held-out", metric="sw", compare={10: comp(0.1, 1.5, floor_max=2.0)}),
               dict(problem="h2", role="held-out", metric="kl", compare={10: comp(0.1, 1.5)})]
    rec = sp.recommend(results, (10,))[10]
    assert rec["rule"] == "B"                       # A is ahead on average (0.36) but loses 1.3x on t2
    assert rec["tuning_worst"] == pytest.approx(0.9) and rec["tuning_ratio"] == pytest.approx(0.9)
    h1, h2 = rec["heldout"]
    assert h1["at_floor"] and h1["within"]          # 1.5x, but inside the range of two exact sets
    assert not h2["at_floor"] and not h2["within"]
