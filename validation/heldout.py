r"""The few-step problem set, split into a *tuning* half and a *held-out* half.

Every choice of ``method="auto"`` (:mod:`solvers.auto`) is made on the tuning half; every claim
about it is measured on the held-out half, which the rule never saw.  Twelve problems, all with
fixed seeds, the two halves built alike but with different seeds and the opposite separation:

==============  ==========================================  ==============================================
half            analytic mixtures (exact eps, tight ref)    other
==============  ==========================================  ==============================================
tuning          d = 2 well, d = 8 poorly, d = 64 well,       Gaussian d = 16 (closed-form flow);
                d = 3072 poorly separated                    MLP score net (Fourier time features) on digits
held-out        d = 2 poorly, d = 8 well, d = 64 poorly,     Gaussian d = 8 (closed-form flow);
                d = 3072 well separated                      a deeper, narrower MLP (sinusoidal time
                                                             features) on the digits
==============  ==========================================  ==============================================

**Mixtures.**  K components (3 in d = 2, 4 in d = 8, 5 beyond), weights :math:`w \propto 0.3 + E`
with :math:`E` exponential; means :math:`\mu_k = s\,z_k/\sqrt d`, :math:`z_k \sim N(0, I)`, so that
:math:`|\mu_k - \mu_l| \approx s\sqrt 2` -- ``s`` = 3 (well separated) or 0.7 (poorly; the
component standard deviations lie in [0.22, 1]); covariances :math:`Q_k\,\mathrm{diag}(v_k)Q_k^T`
with a random rotation :math:`Q_k` (full) for d <= 64 and diagonal at d = 3072, the variances
:math:`v_k` log-uniform on :math:`[e^{-3}, 1]`.  The reference map is a chain of tight adaptive
solves (:func:`validation.problems.reference_map`, dopri8 at 1e-11).

**Networks.**  Two residual-MLP score networks of different shapes (width 256, depth 3,
Fourier time features; width 128, depth 5, sinusoidal) trained here (nothing is
downloaded), eps prediction on :data:`validation.peers.REF_SDE` (the VP SDE of every peer map),
on scikit-learn's 8x8 digits scaled to [-1, 1] (uniformly dequantized), Adam, fixed seeds: the
reference is the network's own probability-flow map solved tightly (what is measured is the
sampler's error on that network, not sample quality).  Start samples are the noised test
images.  The networks are cached in ``cache_dir`` (1,500 Adam steps each). A U-Net was
left out: its tight reference solves cost too much on a CPU.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

import scoresde

from .peers import REF_SDE
from .problems import F64, Problem

#: problem names of each half (every auto-rule choice is made on TUNING only)
TUNING = ("tune-mix2-well", "tune-mix8-poor", "tune-mix64-well", "tune-mix3072-poor", "tune-gauss16",
          "tune-digits-mlp")
HELDOUT = ("held-mix2-poor", "held-mix8-well", "held-mix64-poor", "held-mix3072-well", "held-gauss8",
           "held-digits-mlp2")
SEPARATION = {"well": 3.0, "poor": 0.7}


def random_mixture(d: int, separation: str, seed: int) -> scoresde.GaussianMixture:
    """The random mixture of the module docstring (``separation`` "well" | "poor")."""
    g = torch.Generator().manual_seed(seed)
    k = 3 if d <= 2 else 4 if d <= 8 else 5
    w = 0.3 - torch.log(torch.rand(k, generator=g, dtype=F64))
    means = SEPARATION[separation] * torch.randn(k, d, generator=g, dtype=F64) / math.sqrt(d)
    var = torch.exp(torch.empty(k, d, dtype=F64).uniform_(-3.0, 0.0, generator=g))
    if d > 64:
        covs = var
    else:
        q = torch.linalg.qr(torch.randn(k, d, d, generator=g, dtype=F64))[0]
        covs = (q * var[:, None, :]) @ q.transpose(1, 2)
        covs = 0.5 * (covs + covs.transpose(1, 2))
    return scoresde.GaussianMixture(w / w.sum(), means, covs)


def random_gaussian(d: int, seed: int) -> scoresde.Gaussian:
    """Mean :math:`N(0, I)`, covariance with eigenvalues log-uniform on [0.02, 2], random axes."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))[0]
    lam = torch.exp(torch.empty(d, dtype=F64).uniform_(math.log(0.02), math.log(2.0), generator=g))
    cov = (q * lam) @ q.T
    return scoresde.Gaussian(torch.randn(d, generator=g, dtype=F64), 0.5 * (cov + cov.T))


# --------------------------------------------------------------------------- networks
def _digits_net(arch: str) -> torch.nn.Module:
    from scoresde.nets import MLPScoreNet
    if arch == "mlp":
        return MLPScoreNet(64, hidden=256, depth=3, embedding="fourier", seed=0)
    if arch == "mlp2":
        return MLPScoreNet(64, hidden=128, depth=5, embedding="sinusoidal", seed=1)
    raise ValueError(f"unknown architecture {arch!r}")


def train_digits_net(arch: str, steps: int, seed: int, cache_dir: Path | None) -> torch.nn.Module:
    """A digits score network (float64 after training), cached by (arch, steps, seed)."""
    net = _digits_net(arch)
    path = cache_dir / f"digits-{arch}-{steps}-{seed}.pt" if cache_dir is not None else None
    if path is not None and path.exists():
        net.load_state_dict(torch.load(path, weights_only=True))
        return net.double().eval()
    from scoresde.data import digits_levels, digits_scale
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    lv = digits_levels("train").reshape(-1, 64).float()
    model = scoresde.ScoreModel(net, scoresde.VPSDE(T=REF_SDE.T), "eps")
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(steps):
        idx = torch.randint(0, lv.shape[0], (128,), generator=g)
        x0 = digits_scale(lv[idx], torch.rand(128, 64, generator=g)).float()
        loss = scoresde.dsm_loss(model, x0, "eps", generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(net.state_dict(), tmp)
        tmp.replace(path)
    return net.double().eval()


class _DataMarginal:
    """The marginal at t of the empirical test images: alpha x0 + sigma eps."""

    def __init__(self, data: torch.Tensor, sde, t: float):
        c = sde.coefficients(torch.tensor([t], dtype=F64))
        self.data, self.alpha, self.sigma = data, float(c["alpha"][0]), float(c["sigma"][0])

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        idx = torch.randint(0, self.data.shape[0], (n,), generator=generator)
        return self.alpha * self.data[idx] + self.sigma * torch.randn(n, self.data.shape[1], generator=generator,
                                                                        dtype=F64)


class NetTarget:
    """A trained network behind the analytic targets' interface (``eps``/``x0``/``as_model``/
    ``marginal``/``dim``), valid on :data:`REF_SDE` only."""

    def __init__(self, net: torch.nn.Module, data: torch.Tensor, label: str):
        self.net, self.data, self.label = net, data, label
        self._model = scoresde.ScoreModel(net, REF_SDE, "eps")

    @property
    def dim(self) -> int:
        return self.data.shape[1]

    def _check(self, sde) -> None:
        if sde is not REF_SDE:
            raise ValueError("a network target is defined on validation.peers.REF_SDE only")

    def as_model(self, sde, prediction: str = "eps") -> scoresde.ScoreModel:
        self._check(sde)
        return self._model

    def eps(self, x, t, sde):
        self._check(sde)
        with torch.no_grad():
            return self._model.eps(x, t)

    def x0(self, x, t, sde):
        self._check(sde)
        with torch.no_grad():
            return self._model.x0(x, t)

    def marginal(self, sde, t) -> _DataMarginal:
        return _DataMarginal(self.data, sde, float(t))


def make_heldout_problems(names=TUNING + HELDOUT, samples: int = 64, net_steps: int = 1500,
                          cache_dir: Path | None = None) -> dict[str, Problem]:
    """The problems by name (``samples`` trajectories each, 16 at d = 3072 and 32 for nets)."""
    out = {}
    for name in names:
        half, kind = name.split("-", 1)
        seed = (100 if half == "tune" else 200) + (TUNING + HELDOUT).index(name)
        if kind.startswith("mix"):
            d_str, sep = kind[3:].split("-")
            d = int(d_str)
            out[name] = Problem(name, f"{half}: mixture d={d}, {dict(well='well', poor='poorly')[sep]} separated", random_mixture(d, sep, seed),
                                False, 16 if d > 64 else samples, False)
        elif kind.startswith("gauss"):
            d = int(kind[5:])
            out[name] = Problem(name, f"{half}: Gaussian d={d}", random_gaussian(d, seed), True, samples, False)
        elif kind.startswith("digits"):
            arch = kind.split("-")[1]
            from scoresde.data import digits_levels, digits_scale
            net = train_digits_net(arch, net_steps, seed, cache_dir)
            test = digits_scale(digits_levels("test").reshape(-1, 64), 0.5).to(F64)
            out[name] = Problem(name, f"{half}: digits {arch.upper()} net", NetTarget(net, test, arch), False,
                                min(samples, 32), False)
        else:
            raise ValueError(f"unknown problem {name!r}")
    return out
