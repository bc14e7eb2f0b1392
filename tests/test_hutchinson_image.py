"""The pieces of benchmarks/hutchinson_image.py: the image generator, the spread estimator
(standard error over independent probe draws) and its 1/sqrt(k) law and unbiasedness on an
analytic Gaussian (float64, exact closed-form model), plus a tiny U-Net smoke run.

On the Gaussian the integrated Jacobian A of the probability-flow drift has off-diagonal
entries (correlated covariance), so a Rademacher probe has variance 2 sum_{i != j} A_ij^2 > 0
and k averaged probes 1/k of it: SE(k)/SE(1) = 1/sqrt(k).
"""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

import scoresde
import solvers

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "hutchinson_image.py"
_spec = importlib.util.spec_from_file_location("hutchinson_image", _PATH)
hi = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("hutchinson_image", hi)     # dataclasses look their module up
_spec.loader.exec_module(hi)

F64 = torch.float64


def _gaussian_problem(d: int = 6, n: int = 4):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(d, d, generator=g, dtype=F64)
    cov = a @ a.T / d + 0.2 * torch.eye(d, dtype=F64)          # strongly correlated: large off-diagonals
    target = scoresde.Gaussian(torch.zeros(d, dtype=F64), cov)
    sde = scoresde.VPSDE()
    x = target.sample(n, generator=torch.Generator().manual_seed(4)).to(F64)
    return target.as_model(sde), x


def test_make_images_shape_range_and_seed():
    x = hi.make_images(5, torch.Generator().manual_seed(0))
    y = hi.make_images(5, torch.Generator().manual_seed(0))
    z = hi.make_images(5, torch.Generator().manual_seed(1))
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x, y) and not torch.equal(x, z)
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.std() > 0.2
    # smooth: neighbouring pixels differ far less than the image's spread
    assert (x[..., 1:] - x[..., :-1]).abs().mean() < 0.1 * x.std()
    with pytest.raises(TypeError, match="generator"):
        hi.make_images(2, 0)


def test_std_over_draws_matches_formula_and_rejects_one_draw():
    lp = torch.tensor([[1.0, 10.0], [3.0, 10.0], [5.0, 16.0]], dtype=F64)
    se = hi.std_over_draws(lp)
    assert torch.allclose(se, torch.tensor([2.0, math.sqrt(12.0)], dtype=F64))   # Bessel: R - 1
    with pytest.raises(ValueError, match="R >= 2"):
        hi.std_over_draws(lp[:1])
    with pytest.raises(ValueError, match=r"\[R, n\]"):
        hi.std_over_draws(lp[0])


def test_se_shrinks_like_one_over_sqrt_k_and_estimate_is_unbiased():
    model, x = _gaussian_problem()
    R, tol = 30, 1e-4                                          # solver error << the probes' SE (~1 nat)
    one = hi.hutchinson_draws(model, x, 1, R, seed=10, rtol=tol, atol=tol)
    four = hi.hutchinson_draws(model, x, 4, R, seed=20, rtol=tol, atol=tol)
    se1, se4 = one.se, four.se
    assert (se1 > 0.3).all()                                    # a real, measurable spread
    ratio = (se4 / se1).mean().item()                           # 4 images; SD of an SD ~ 13% at R = 30
    assert 0.5 * 0.8 < ratio < 0.5 * 1.25, ratio                # expected 1/sqrt(4)
    # the probes' own standard error (one call) agrees with the spread over calls
    assert torch.allclose(four.within_se.mean(0), se4, rtol=0.3)
    exact = solvers.log_likelihood(model, x, "exact", per_sample=True, rtol=1e-8, atol=1e-8).log_prob
    for dr in (one, four):
        mean = dr.log_prob.mean(0)
        se_mean = dr.se / math.sqrt(R)
        assert ((mean - exact).abs() < 4.0 * se_mean).all(), (mean - exact) / se_mean
        assert ((mean - exact).abs() > 1e-3).any()             # the noise is there, not a disguised exact trace


def test_nfe_per_image_counts_one_samples_network_calls():
    """On a batch of one the per-sample solve's batched calls are that sample's evaluations."""
    model, x = _gaussian_problem(n=1)
    dr = hi.hutchinson_draws(model, x, 3, 2, rtol=1e-5, atol=1e-5)
    assert dr.nfe_image == [float(c) for c in dr.nfe_calls] and dr.nfe_calls[0] > 8


def test_summary_rows_ratios():
    def draws(k, scale):
        lp = torch.tensor([[0.0, 0.0], [scale, 2 * scale]], dtype=F64)
        return hi.Draws(k, lp, torch.full_like(lp, float("nan")), [2.0 * k, 2.0 * k], [14.0, 14.0], [14, 14])
    rows = hi.summary_rows([draws(1, 2.0), draws(4, 1.0)], n=2, num_dims=10)
    assert rows[0]["se_ratio"] == 1.0 and abs(rows[1]["se_ratio"] - 0.5) < 1e-12
    assert abs(rows[1]["time_ratio"] - 4.0) < 1e-12 and abs(rows[1]["expect"] - 0.5) < 1e-12
    assert abs(rows[0]["se_bpd"] - rows[0]["se_nats"] / (10 * math.log(2.0))) < 1e-12
    assert "SE bits/dim" in hi.format_table(rows)


def test_tiny_unet_smoke():
    """Two training steps, then two Hutchinson draws with k = 2 on 3x8x8 images: finite
    log-densities that differ between draws (a trained, non-diagonal Jacobian)."""
    model = hi.build_model(channels=4, mults=(1,), seed=0)
    losses = hi.train(model, 2, batch=4, size=8)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    x = hi.make_images(2, torch.Generator().manual_seed(1), size=8)
    dr = hi.hutchinson_draws(model, x, 2, 2, rtol=1e-3, atol=1e-3)
    assert torch.isfinite(dr.log_prob).all() and (dr.se > 0).all()
    assert torch.isfinite(dr.within_se).all() and all(n >= 8 for n in dr.nfe_image)
