"""scoresde.data: toy 2-D sets and user arrays.  Nothing is downloaded."""
from __future__ import annotations

import math
import os
import pickle

import numpy as np
import pytest
import torch

from scoresde.data import (TOY_DATASETS, gmm_target, is_toy, load_array, load_data, toy_density,
                           toy_sample)


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_toy_sets(name):
    x = toy_sample(name, 2000, torch.Generator().manual_seed(0))
    assert x.shape == (2000, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert float(x.abs().max()) < 8.0 and float(x.std()) > 0.3
    again = toy_sample(name, 2000, torch.Generator().manual_seed(0))
    assert torch.equal(x, again)
    other = toy_sample(name, 2000, torch.Generator().manual_seed(1))
    assert not torch.equal(x, other)
    assert toy_sample(name, 5, torch.Generator().manual_seed(0), dtype=torch.float64).dtype == torch.float64
    assert toy_sample(name, 0).shape == (0, 2)


def test_toy_shapes_are_what_they_claim():
    x = toy_sample("checkerboard", 5000, torch.Generator().manual_seed(0), dtype=torch.float64)
    cell = (torch.floor(x[:, 0] / 2) + torch.floor(x[:, 1] / 2)) % 2
    assert bool((cell == cell[0]).all()), "checkerboard points must all lie on squares of one colour"
    assert float(x.min()) >= -4.0 and float(x.max()) <= 4.0
    r = toy_sample("rings", 4000, torch.Generator().manual_seed(0), dtype=torch.float64).norm(dim=1)
    nearest = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=torch.float64)
    assert float((r[:, None] - nearest).abs().min(dim=1).values.max()) < 0.3
    g = toy_sample("8gaussians", 4000, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(float(g.norm(dim=1).mean()) - 2.0) < 0.05


@pytest.mark.parametrize("name", ["gmm", "8gaussians", "checkerboard"])
def test_exact_densities(name):
    """The exact density integrates to 1 and matches the samples (mean log-density vs a
    histogram-free check: E[log p] under samples equals the quadrature entropy)."""
    dens = toy_density(name)
    h = 10.0 / 800
    grid = torch.linspace(-5 + h / 2, 5 - h / 2, 800, dtype=torch.float64)     # cell centres (midpoint rule)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)
    p = torch.exp(dens.log_prob(pts))
    assert abs(float(p.sum()) * h * h - 1.0) < 1e-6
    entropy_quad = -float((p * torch.log(p.clamp_min(1e-300))).sum()) * h * h
    x = toy_sample(name, 20000, torch.Generator().manual_seed(2), dtype=torch.float64)
    lp = dens.log_prob(x)
    se = float(lp.std()) / math.sqrt(x.shape[0])
    assert abs(-float(lp.mean()) - entropy_quad) < 5 * se + 1e-6
    for other in ("moons", "swiss_roll", "rings"):
        assert toy_density(other) is None


def test_names():
    assert toy_sample("two_moons", 3, torch.Generator().manual_seed(0)).shape == (3, 2)
    assert toy_sample("eight_gaussians", 3, torch.Generator().manual_seed(0)).shape == (3, 2)
    with pytest.raises(ValueError, match="checkerboard"):
        toy_sample("mnist", 3)
    with pytest.raises(TypeError):
        toy_sample(3, 3)
    assert is_toy("gmm") and not is_toy("nope.npy")
    assert isinstance(gmm_target().log_prob(torch.zeros(1, 2, dtype=torch.float64)), torch.Tensor)


def test_load_arrays(tmp_path):
    a = np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    np.savez(tmp_path / "one.npz", data=a)
    np.savez(tmp_path / "two.npz", train=a, test=a[:4])
    torch.save(torch.from_numpy(a), tmp_path / "t.pt")
    torch.save({"x": torch.from_numpy(a).double(), "y": torch.zeros(3)}, tmp_path / "d.pt")
    assert torch.equal(load_array(tmp_path / "a.npy"), torch.from_numpy(a))
    assert torch.equal(load_array(tmp_path / "one.npz"), torch.from_numpy(a))
    assert load_array(tmp_path / "two.npz", key="test").shape == (4, 3)
    with pytest.raises(ValueError, match="several arrays"):
        load_array(tmp_path / "two.npz")
    with pytest.raises(KeyError, match="val"):
        load_array(tmp_path / "two.npz", key="val")
    assert torch.equal(load_array(tmp_path / "t.pt"), torch.from_numpy(a))
    assert load_array(tmp_path / "d.pt", key="x").dtype == torch.float64
    assert load_array(tmp_path / "d.pt", key="x", dtype=torch.float32).dtype == torch.float32
    # PATH:KEY specs and the first n rows
    assert load_data(f"{tmp_path / 'two.npz'}:test").shape == (4, 3)
    assert load_data(str(tmp_path / "a.npy"), n=5).shape == (5, 3)
    with pytest.raises(ValueError, match="exceeds"):
        load_data(str(tmp_path / "a.npy"), n=50)
    assert load_data("gmm", n=7, seed=3).shape == (7, 2)
    with pytest.raises(ValueError, match="needs a number"):
        load_data("gmm")
    with pytest.raises(ValueError, match="neither a toy"):
        load_data("no_such_thing")


def test_load_refusals(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        load_array(tmp_path / "missing.npy")
    np.save(tmp_path / "int.npy", np.arange(6).reshape(3, 2))
    with pytest.raises(TypeError, match="floating point"):
        load_array(tmp_path / "int.npy")
    bad = np.ones((4, 2))
    bad[2, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ValueError, match=r"samples \[2\]"):
        load_array(tmp_path / "nan.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="safely"):
        load_array(tmp_path / "obj.npy")
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match="suffix"):
        load_array(tmp_path / "x.csv")
    marker = tmp_path / "marker"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"x": Evil()}, fh)
    with pytest.raises(ValueError, match="safely"):
        load_array(tmp_path / "evil.pt")
    assert not marker.exists()
