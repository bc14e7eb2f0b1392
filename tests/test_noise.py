"""Noise sources, injected into the solvers: reproducible per sample, and statistically correct.

GeneratorNoise: determinism, per-sample generators (sample j does not depend on the rest of
the batch).  BrownianNoise: additivity of increments, standard normal output, Brownian
bridge conditionals, same entropy -> same path.  Normality is checked with a KS test at
alpha = 1e-5 on fixed seeds, so CI cannot flake.
"""
from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

import scoresde
import solvers
from solvers.noise import BrownianNoise, GeneratorNoise, ZeroNoise, make_noise

F64 = torch.float64
ALPHA = 1e-5
CPU = torch.device("cpu")


def _gens(n, base=0):
    return [torch.Generator().manual_seed(base + j) for j in range(n)]


def _ks_standard_normal(z: torch.Tensor) -> float:
    return stats.kstest(z.reshape(-1).double().numpy(), "norm").pvalue


# ------------------------------------------------------------------ GeneratorNoise
def test_generator_noise_deterministic():
    like = torch.empty(5, 3, 2, dtype=F64)
    a = [GeneratorNoise(torch.Generator().manual_seed(7))(i, 1.0, 0.5, like) for i in range(3)]
    b = [GeneratorNoise(torch.Generator().manual_seed(7))(i, 1.0, 0.5, like) for i in range(3)]
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    c = GeneratorNoise(torch.Generator().manual_seed(8))(0, 1.0, 0.5, like)
    assert not torch.equal(a[0], c)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_generator_noise_shape_dtype(dtype):
    like = torch.empty(4, 3, 2, dtype=dtype)
    for src in (GeneratorNoise(torch.Generator().manual_seed(0)), GeneratorNoise(_gens(4)), GeneratorNoise(None)):
        z = src(0, 1.0, 0.9, like)
        assert z.shape == like.shape and z.dtype == dtype and z.device == like.device


def test_generator_noise_empty_batch():
    like = torch.empty(0, 3, dtype=F64)
    assert GeneratorNoise([])(0, 1.0, 0.5, like).shape == (0, 3)


def test_per_sample_generators_sample_j_unchanged_when_batch_grows():
    """Sample j's noise depends only on generator j, whatever the batch size."""
    small, big = GeneratorNoise(_gens(3)), GeneratorNoise(_gens(9))
    z_small = [small(i, 1.0, 0.5, torch.empty(3, 4, dtype=F64)) for i in range(4)]
    z_big = [big(i, 1.0, 0.5, torch.empty(9, 4, dtype=F64)) for i in range(4)]
    for a, b in zip(z_small, z_big):
        assert torch.equal(a, b[:3])
    alone = GeneratorNoise([torch.Generator().manual_seed(5)])
    z_alone = [alone(i, 1.0, 0.5, torch.empty(1, 4, dtype=F64)) for i in range(4)]
    for a, b in zip(z_alone, z_big):
        assert torch.equal(a[0], b[5])


@pytest.mark.parametrize("method,options", [("ddim", {"eta": 1.0}), ("dpmpp_2m_sde", {}), ("dpmpp_3m_sde", {})])
def test_per_sample_generators_through_sample(method, options):
    """End to end: with one generator per sample, sample j is bitwise the same alone, in a
    small batch and in a larger one."""
    sde = scoresde.VPSDE()
    target = scoresde.Gaussian(torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([0.2, 0.05], dtype=F64))
    model = target.as_model(sde)
    x = sde.prior_sample((7, 2), generator=torch.Generator().manual_seed(3), dtype=F64)
    big = solvers.sample(model, x, method, 6, generator=_gens(7), **options).x
    small = solvers.sample(model, x[:3], method, 6, generator=_gens(3), **options).x
    one = solvers.sample(model, x[4:5], method, 6, generator=[torch.Generator().manual_seed(4)], **options).x
    assert torch.equal(small, big[:3])
    assert torch.equal(one[0], big[4])


def test_generator_noise_is_standard_normal():
    z = GeneratorNoise(torch.Generator().manual_seed(11))(0, 1.0, 0.5, torch.empty(20000, dtype=F64))
    assert _ks_standard_normal(z) > ALPHA
    zs = GeneratorNoise(_gens(2000))(0, 1.0, 0.5, torch.empty(2000, 10, dtype=F64))
    assert _ks_standard_normal(zs) > ALPHA


def test_zero_noise():
    like = torch.ones(3, 2, dtype=F64)
    assert torch.equal(ZeroNoise()(0, 1.0, 0.5, like), torch.zeros_like(like))


# ------------------------------------------------------------------ BrownianNoise
def test_brownian_additivity():
    """Increments over sub-steps sum to the coarse increment (the same path at every step size)."""
    bm = BrownianNoise((6, 3), 0.0, 1.0, entropy=3)
    coarse = bm.increment(0.9, 0.1)
    grid = torch.linspace(0.9, 0.1, 17, dtype=F64).tolist()
    fine = sum(bm.increment(a, b) for a, b in zip(grid[:-1], grid[1:]))
    assert torch.allclose(fine, coarse, rtol=0, atol=1e-12)
    # through the noise-source interface: xi * sqrt(|dt|) are the increments
    like = torch.empty(6, 3, dtype=F64)
    fine2 = sum(bm(i, a, b, like) * math.sqrt(abs(b - a)) for i, (a, b) in enumerate(zip(grid[:-1], grid[1:])))
    assert torch.allclose(fine2, coarse, rtol=0, atol=1e-12)
    # and a dyadic refinement of an irregular grid
    pts = [1.0, 0.73, 0.41, 0.4, 0.05, 0.0]
    for a, b in zip(pts[:-1], pts[1:]):
        mid = 0.5 * (a + b)
        assert torch.allclose(bm.increment(a, mid) + bm.increment(mid, b), bm.increment(a, b), atol=1e-12, rtol=0)


_PTS = [1.0, 0.8, 0.55, 0.3, 0.01]


def test_brownian_same_entropy_same_path():
    """Same entropy and the same queries -> bitwise the same increments; another entropy differs."""
    a = BrownianNoise((4,), 0.0, 1.0, entropy=42)
    b = BrownianNoise((4,), 0.0, 1.0, entropy=42)
    c = BrownianNoise((4,), 0.0, 1.0, entropy=43)
    for s, t in zip(_PTS[:-1], _PTS[1:]):
        assert torch.equal(a.increment(s, t), b.increment(s, t))
    assert not torch.allclose(a.increment(1.0, 0.8), c.increment(1.0, 0.8))


def test_brownian_one_object_is_one_path_across_step_sizes():
    """Queried on a coarse grid, then on a refinement of it: the fine increments sum to the
    coarse ones already returned (what a strong-order ladder needs)."""
    bm = BrownianNoise((5,), 1e-3, 1.0, entropy=4)
    coarse = torch.linspace(1.0, 1e-3, 5, dtype=F64).tolist()
    first = [bm.increment(s, t) for s, t in zip(coarse[:-1], coarse[1:])]
    fine = torch.linspace(1.0, 1e-3, 17, dtype=F64).tolist()
    inc = [bm.increment(s, t) for s, t in zip(fine[:-1], fine[1:])]
    for k, w in enumerate(first):
        assert torch.allclose(sum(inc[4 * k:4 * k + 4]), w, rtol=0, atol=1e-12)


def test_brownian_halfway_tree_path_independent_of_query_order():
    """With ``halfway_tree=True`` the path is a function of the entropy alone."""
    a = BrownianNoise((4,), 0.0, 1.0, entropy=42, halfway_tree=True)
    b = BrownianNoise((4,), 0.0, 1.0, entropy=42, halfway_tree=True)
    pairs = list(zip(_PTS[:-1], _PTS[1:]))
    inc_a = [a.increment(s, t) for s, t in pairs]
    inc_b = [b.increment(s, t) for s, t in reversed(pairs)][::-1]
    for u, v in zip(inc_a, inc_b):
        assert torch.allclose(u, v, rtol=0, atol=1e-12)


def test_brownian_output_standard_normal():
    bm = BrownianNoise((4000,), 0.0, 1.0, entropy=1)
    like = torch.empty(4000, dtype=F64)
    grid = [1.0, 0.9, 0.62, 0.5, 0.1, 1e-3]
    zs = torch.stack([bm(i, a, b, like) for i, (a, b) in enumerate(zip(grid[:-1], grid[1:]))])
    assert _ks_standard_normal(zs) > ALPHA
    # increments of disjoint intervals are independent: their correlation is O(1/sqrt(n))
    c = torch.corrcoef(zs)
    assert float((c - torch.eye(len(grid) - 1, dtype=F64)).abs().max()) < 5.0 / math.sqrt(4000)


def test_brownian_bridge_conditional_normal():
    """Given W(a, c), the increment W(a, b) is N(r W(a,c), r(1-r)(c-a)), r = (b-a)/(c-a)."""
    bm = BrownianNoise((20000,), 0.0, 1.0, entropy=9)
    a, b, c = 0.2, 0.45, 0.9
    w_ac, w_ab = bm.increment(a, c), bm.increment(a, b)
    r = (b - a) / (c - a)
    z = (w_ab - r * w_ac) / math.sqrt(r * (1 - r) * (c - a))
    assert _ks_standard_normal(z) > ALPHA


def test_brownian_dtype_follows_state():
    bm = BrownianNoise((3,), 0.0, 1.0)
    z = bm(0, 1.0, 0.5, torch.empty(3, dtype=torch.float32))
    assert z.dtype == torch.float32 and z.shape == (3,)


def test_brownian_errors():
    with pytest.raises(ValueError, match="t_min must be < t_max"):
        BrownianNoise((3,), 1.0, 1.0)
    bm = BrownianNoise((3,), 0.1, 1.0)
    with pytest.raises(ValueError, match=r"\[t_min, t_max\]"):
        bm.increment(0.5, 0.05)
    with pytest.raises(ValueError, match=r"shape \(3,\).*state has shape \(4,\)"):
        bm(0, 1.0, 0.5, torch.empty(4, dtype=F64))


def test_brownian_noise_through_sample():
    """A BrownianNoise passed as ``generator`` drives a stochastic method; the same entropy
    gives the same sample, at any step count the path is the same."""
    sde = scoresde.VPSDE()
    target = scoresde.Gaussian(torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([0.2, 0.05], dtype=F64))
    model = target.as_model(sde)
    x = sde.prior_sample((5, 2), generator=torch.Generator().manual_seed(3), dtype=F64)
    run = lambda e: solvers.sample(model, x, "ddim", 8, eta=1.0,  # noqa: E731
                                   generator=BrownianNoise((5, 2), sde.default_t_end, sde.T, entropy=e)).x
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


# ------------------------------------------------------------------ make_noise
def test_make_noise_accepts():
    assert isinstance(make_noise(None, 4, CPU), GeneratorNoise)
    assert isinstance(make_noise(torch.Generator(), 4, CPU), GeneratorNoise)
    assert isinstance(make_noise(_gens(4), 4, CPU), GeneratorNoise)
    src = ZeroNoise()
    assert make_noise(src, 4, CPU) is src


def test_make_noise_wrong_list_length():
    with pytest.raises(ValueError, match="got 3 generators for batch 4"):
        make_noise(_gens(3), 4, CPU)


def test_make_noise_bad_types():
    with pytest.raises(TypeError, match=r"generator\[1\] must be a torch.Generator"):
        make_noise([torch.Generator(), 3], 2, CPU)
    with pytest.raises(TypeError, match="generator must be"):
        make_noise(42, 2, CPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA generator needs a GPU")
def test_make_noise_cuda_generator_with_cpu_x():
    with pytest.raises(ValueError, match="generator is on cuda"):
        make_noise(torch.Generator(device="cuda"), 2, CPU)
    with pytest.raises(ValueError, match="generators are on cuda"):
        make_noise([torch.Generator(device="cuda")] * 2, 2, CPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cpu_generator_feeds_cuda_state_reproducibly():
    like = torch.empty(3, 2, device="cuda")
    a = GeneratorNoise(torch.Generator().manual_seed(1))(0, 1.0, 0.5, like)
    b = GeneratorNoise(torch.Generator().manual_seed(1))(0, 1.0, 0.5, torch.empty(3, 2))
    assert a.device.type == "cuda" and torch.equal(a.cpu(), b)
