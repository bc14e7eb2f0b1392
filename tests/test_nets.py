"""scoresde.nets: the reference MLP and U-Net, time embeddings, FixedBatch."""
from __future__ import annotations

import pytest
import torch

import scoresde
from scoresde.nets import NETS, FixedBatch, MLPScoreNet, TimeEmbedding, UNet, build_net

PREDICTIONS = ("eps", "x0", "v", "score", "edm", "flow")


@pytest.mark.parametrize("embedding", ["fourier", "sinusoidal"])
def test_mlp_shapes_and_time_forms(embedding):
    torch.manual_seed(0)
    net = MLPScoreNet(3, hidden=16, depth=2, embedding=embedding)
    x = torch.randn(5, 3)
    for t in (0.3, torch.tensor(0.3), torch.full((5,), 0.3)):
        assert net(x, t).shape == (5, 3)
    assert torch.equal(net(x, 0.3), net(x, torch.full((5,), 0.3)))
    with pytest.raises(ValueError, match=r"t must be .*\[5\]"):
        net(x, torch.zeros(5, 1))
    with pytest.raises(ValueError, match="dim=3"):
        net(torch.randn(5, 4), 0.3)
    # the output layer starts at zero; any change of the output layer makes it time dependent
    assert torch.count_nonzero(net(x, 0.3)) == 0
    with torch.no_grad():
        net.out.weight.normal_()
    assert not torch.allclose(net(x, 0.1), net(x, 0.9))
    # flattened multi-dimensional samples
    img = MLPScoreNet(12, hidden=8, depth=1)
    assert img(torch.randn(2, 3, 2, 2), torch.rand(2)).shape == (2, 3, 2, 2)


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3)])
def test_unet_shapes(size, channels):
    torch.manual_seed(0)
    net = UNet(channels, channels=16, channel_mults=(1, 2, 2))
    assert torch.count_nonzero(net(torch.randn(1, channels, size, size), 0.5)) == 0   # zero-initialised output
    with torch.no_grad():                       # give the zero-initialised layers some weight
        for p in net.parameters():
            if torch.count_nonzero(p) == 0 and p.ndim > 1:
                p.normal_(std=0.05)
    x = torch.randn(2, channels, size, size)
    out = net(x, torch.tensor([0.1, 0.9]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(out[0], net(x, torch.tensor([0.9, 0.9]))[0])   # t matters
    with pytest.raises(ValueError, match="shape"):
        net(torch.randn(2, channels + 1, size, size), 0.5)
    assert sum(p.numel() for p in net.parameters()) < 2_000_000


def test_config_round_trip():
    for net in (MLPScoreNet(2, hidden=8, depth=1, embedding="sinusoidal", time_scale=10.0, seed=3),
                UNet(1, channels=8, channel_mults=(1, 2), attention=False)):
        cfg = net.config()
        assert cfg["class"] in NETS
        again = build_net(cfg)
        assert again.config() == cfg
        assert again.state_dict().keys() == net.state_dict().keys()
        # the fixed Fourier frequencies are rebuilt identically from the seed
        torch.testing.assert_close(again.embed.freqs, net.embed.freqs)
    with pytest.raises(ValueError, match="unknown net class"):
        build_net({"class": "os.system"})
    with pytest.raises(ValueError, match="bad arguments"):
        build_net({"class": "MLPScoreNet", "dim": 2, "width": 3})


def test_time_embedding():
    e = TimeEmbedding(8, "fourier", 16.0, seed=1)
    out = e(torch.tensor([0.0, 0.5]))
    assert out.shape == (2, 8)
    torch.testing.assert_close(out[0], torch.cat([torch.zeros(4), torch.ones(4)]))   # sin 0, cos 0
    s = TimeEmbedding(8, "sinusoidal", 1000.0)
    assert s(torch.tensor([0.25])).shape == (1, 8)
    with pytest.raises(ValueError, match="even"):
        TimeEmbedding(7)
    with pytest.raises(ValueError, match="kind"):
        TimeEmbedding(8, "learned")


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_any_prediction_type(prediction):
    """The nets only output x's shape: every ScoreModel parameterisation works (float64 too)."""
    torch.manual_seed(0)
    net = MLPScoreNet(2, hidden=16, depth=1).double()
    with torch.no_grad():
        net.out.weight.normal_(std=0.1)
    model = scoresde.ScoreModel(net, scoresde.VPSDE(), prediction)
    x = torch.randn(4, 2, dtype=torch.float64)
    d = model.evaluate(x, torch.tensor([0.01, 0.1, 0.5, 0.9], dtype=torch.float64))
    for v in (d.eps, d.x0, d.score):
        assert v.shape == x.shape and v.dtype == torch.float64 and torch.isfinite(v).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fixed_batch_is_batch_invariant(dtype):
    """A row's output through FixedBatch is bitwise the same alone, in any batch, at any
    position, and across more than one chunk; gradients pass through it."""
    torch.manual_seed(0)
    net = MLPScoreNet(2, hidden=64, depth=2).to(dtype)
    with torch.no_grad():
        net.out.weight.normal_(std=0.1)
    fb = FixedBatch(net, 16)
    x = torch.randn(37, 2, dtype=dtype)
    t = torch.rand(37, dtype=dtype)
    with torch.no_grad():
        full = fb(x, t)
        for b in (1, 5, 16, 37):
            parts = torch.cat([fb(x[i:i + b], t[i:i + b]) for i in range(0, 37, b)])
            assert torch.equal(parts, full), b
        perm = torch.randperm(37)
        assert torch.equal(fb(x[perm], t[perm]), full[perm])
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fb(xg, t).sum(), xg)
    assert g.shape == x.shape and torch.isfinite(g).all()
    assert fb(x[:0], t[:0]).shape == (0, 2)
