r"""Small reference score networks: an MLP for low-dimensional data and a U-Net for images.

Both are ``net(x, t) -> Tensor`` shaped like ``x``, with a continuous time input ``t`` of
shape ``[B]`` (a float or 0-d tensor is broadcast over the batch): whatever
:class:`~scoresde.model.ScoreModel` feeds them (``t``, ``log_snr``, EDM's ``c_noise``, ...).
They do not know what they predict; the prediction type (``eps``, ``x0``, ``v``, ``score``,
``edm``, ``flow``) is the :class:`ScoreModel`'s, so one network class serves every
parameterisation.

Time embeddings (:class:`TimeEmbedding`):

- ``"fourier"``: random Fourier features :math:`[\sin 2\pi W t, \cos 2\pi W t]`,
  :math:`W\sim\mathcal N(0, s^2)` fixed (a buffer, saved in the state dict; Tancik et al. 2020,
  used for time by Song et al. 2021);
- ``"sinusoidal"``: the Transformer / DDPM embedding :math:`[\sin(c\,t\,\omega_k), \cos(c\,t\,\omega_k)]`,
  :math:`\omega_k = 10000^{-k/(n/2)}` with a time scale ``c`` (1000 for t in [0, 1]).

Every network has ``config()`` (a JSON dict with ``"class"``) and :func:`build_net` rebuilds
it from that dict; only the classes in :data:`NETS` can be built (a checkpoint never names
code to import).

:class:`FixedBatch` wraps any network so that each call sees exactly ``size`` rows (split
and zero-padded): CPU matrix products are not bitwise batch-invariant (a row's result
depends on how many rows the GEMM had), so the command line uses it to make every sample's
result independent of the batch size and the number of processes.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_int, check_positive_float

__all__ = ["TimeEmbedding", "MLPScoreNet", "UNet", "FixedBatch", "NETS", "build_net"]

_EMBEDDINGS = ("fourier", "sinusoidal")


def _time_vector(t: Any, x: Tensor) -> Tensor:
    """``t`` as a ``[B]`` tensor in x's dtype and device (float/0-d broadcast)."""
    b = x.shape[0]
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t.expand(b)
    if t.shape != (b,):
        raise ValueError(f"t must be a float, a 0-d tensor or shape [B]=[{b}], got {list(t.shape)}")
    return t.to(dtype=x.dtype)


class TimeEmbedding(nn.Module):
    """Embed a continuous time ``t`` ``[B]`` into ``[B, dim]`` features (module docstring).

    **Arguments:** ``dim`` (even), ``kind`` (``"fourier"`` | ``"sinusoidal"``), ``scale``:
    the std of the Fourier frequencies (``fourier``; 16 suits t in [0, 1]) or the time
    multiplier ``c`` (``sinusoidal``; 1000 suits t in [0, 1]), ``seed`` for the fixed Fourier
    frequencies (so that building the same config twice gives the same buffer)."""

    def __init__(self, dim: int = 64, kind: str = "fourier", scale: float = 16.0, seed: int = 0):
        super().__init__()
        self.dim = check_int(dim, "dim", minimum=2)
        if self.dim % 2:
            raise ValueError(f"dim must be even, got {self.dim}")
        if kind not in _EMBEDDINGS:
            raise ValueError(f"kind must be one of {_EMBEDDINGS}, got {kind!r}")
        self.kind = kind
        self.scale = check_positive_float(scale, "scale")
        half = self.dim // 2
        if kind == "fourier":
            g = torch.Generator().manual_seed(int(seed))
            w = torch.randn(half, generator=g, dtype=torch.float64) * self.scale
            self.register_buffer("freqs", (2.0 * math.pi * w).to(torch.get_default_dtype()))
        else:
            k = torch.arange(half, dtype=torch.float64) / half
            self.register_buffer("freqs", (self.scale * torch.exp(-math.log(10000.0) * k)).to(torch.get_default_dtype()))

    def forward(self, t: Tensor) -> Tensor:
        arg = t[:, None] * self.freqs.to(t.dtype)[None]
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


class _ResidualMLPBlock(nn.Module):
    def __init__(self, width: int, emb_width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.emb = nn.Linear(emb_width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        y = self.fc1(F.silu(self.norm(h))) + self.emb(emb)
        return h + self.fc2(F.silu(y))


class MLPScoreNet(nn.Module):
    r"""A residual MLP for data of shape ``[B, dim]`` (or ``[B, *shape]``, flattened).

    ``x -> Linear -> depth x (h + W2 silu(W1 silu(LN h) + E emb(t))) -> LN, silu -> Linear``;
    the output layer starts at zero (the net outputs 0 at initialisation).

    **Arguments:** ``dim`` (input features), ``hidden`` (width), ``depth`` (residual
    blocks), ``emb_dim``, ``embedding`` (``"fourier"`` | ``"sinusoidal"``), ``time_scale``
    (see :class:`TimeEmbedding`; default 16 for Fourier, 1000 for sinusoidal), ``seed``
    (Fourier frequencies)."""

    def __init__(self, dim: int, hidden: int = 256, depth: int = 3, emb_dim: int = 64,
                 embedding: str = "fourier", time_scale: float | None = None, seed: int = 0):
        super().__init__()
        self.dim = check_int(dim, "dim", minimum=1)
        self.hidden = check_int(hidden, "hidden", minimum=1)
        self.depth = check_int(depth, "depth", minimum=0)
        self.emb_dim = check_int(emb_dim, "emb_dim", minimum=2)
        if time_scale is None:
            time_scale = 16.0 if embedding == "fourier" else 1000.0
        self.embedding, self.time_scale, self.seed = embedding, float(time_scale), int(seed)
        self.embed = TimeEmbedding(self.emb_dim, embedding, self.time_scale, self.seed)
        self.t_mlp = nn.Sequential(nn.Linear(self.emb_dim, self.hidden), nn.SiLU(), nn.Linear(self.hidden, self.hidden))
        self.inp = nn.Linear(self.dim, self.hidden)
        self.blocks = nn.ModuleList(_ResidualMLPBlock(self.hidden, self.hidden) for _ in range(self.depth))
        self.out_norm = nn.LayerNorm(self.hidden)
        self.out = nn.Linear(self.hidden, self.dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Any) -> Tensor:
        shape = x.shape
        h = x.reshape(shape[0], -1)
        if h.shape[1] != self.dim:
            raise ValueError(f"x has {h.shape[1]} features per sample, the net was built for dim={self.dim}")
        emb = F.silu(self.t_mlp(self.embed(_time_vector(t, x))))
        h = self.inp(h)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.out_norm(h))).reshape(shape)

    def config(self) -> dict:
        return {"class": "MLPScoreNet", "dim": self.dim, "hidden": self.hidden, "depth": self.depth,
                "emb_dim": self.emb_dim, "embedding": self.embedding, "time_scale": self.time_scale,
                "seed": self.seed}


# ----------------------------------------------------------------------------- U-Net
def _groups(channels: int, groups: int) -> int:
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin, groups), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm2 = nn.GroupNorm(_groups(cout, groups), cout)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class _Attention(nn.Module):
    """Single-head self-attention over the pixels of a feature map (DDPM's AttnBlock)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels, groups), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        a = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)
        out = torch.einsum("bij,bcj->bci", a, v).reshape(b, c, h, w)
        return x + self.proj(out)


class UNet(nn.Module):
    r"""A small U-Net (DDPM-style) for images ``[B, C, H, W]`` such as 28x28 or 32x32.

    Levels ``channel_mults`` (one 2x downsampling between consecutive levels), each with
    ``num_res_blocks`` residual blocks (GroupNorm, SiLU, 3x3 convolutions, the time
    embedding added per channel), self-attention at the coarsest level when ``attention``,
    skip connections by concatenation, and a zero-initialised output convolution.  Odd sizes
    (28 -> 14 -> 7) work: upsampling restores each skip's exact size.

    **Arguments:** ``in_channels``, ``channels`` (base width), ``channel_mults``,
    ``num_res_blocks``, ``embedding``/``time_scale`` (:class:`TimeEmbedding`; default
    sinusoidal with scale 1000 for t in [0, 1]), ``groups`` (GroupNorm), ``dropout``,
    ``attention``, ``seed``."""

    def __init__(self, in_channels: int = 1, channels: int = 32, channel_mults: Sequence[int] = (1, 2, 2),
                 num_res_blocks: int = 1, embedding: str = "sinusoidal", time_scale: float | None = None,
                 groups: int = 8, dropout: float = 0.0, attention: bool = True, seed: int = 0):
        super().__init__()
        self.in_channels = check_int(in_channels, "in_channels", minimum=1)
        self.channels = check_int(channels, "channels", minimum=1)
        self.channel_mults = tuple(check_int(m, "channel_mults[i]", minimum=1) for m in channel_mults)
        if not self.channel_mults:
            raise ValueError("channel_mults must not be empty")
        self.num_res_blocks = check_int(num_res_blocks, "num_res_blocks", minimum=1)
        if time_scale is None:
            time_scale = 16.0 if embedding == "fourier" else 1000.0
        self.embedding, self.time_scale = embedding, float(time_scale)
        self.groups, self.dropout, self.attention, self.seed = int(groups), float(dropout), bool(attention), int(seed)
        ch = self.channels
        emb = 4 * ch
        self.embed = TimeEmbedding(ch, embedding, self.time_scale, self.seed) if ch % 2 == 0 else \
            TimeEmbedding(ch + 1, embedding, self.time_scale, self.seed)
        self.t_mlp = nn.Sequential(nn.Linear(self.embed.dim, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.conv_in = nn.Conv2d(self.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips = [ch]
        cur = ch
        for level, mult in enumerate(self.channel_mults):
            blocks = nn.ModuleList()
            for _ in range(self.num_res_blocks):
                blocks.append(_ResBlock(cur, ch * mult, emb, self.groups, self.dropout))
                cur = ch * mult
                skips.append(cur)
            self.down.append(blocks)
            if level < len(self.channel_mults) - 1:
                self.downsample.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                skips.append(cur)
        self.mid1 = _ResBlock(cur, cur, emb, self.groups, self.dropout)
        self.mid_attn = _Attention(cur, self.groups) if self.attention else nn.Identity()
        self.mid2 = _ResBlock(cur, cur, emb, self.groups, self.dropout)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level, mult in reversed(list(enumerate(self.channel_mults))):
            blocks = nn.ModuleList()
            for _ in range(self.num_res_blocks + 1):
                blocks.append(_ResBlock(cur + skips.pop(), ch * mult, emb, self.groups, self.dropout))
                cur = ch * mult
            self.up.append(blocks)
            if level > 0:
                self.upsample.append(nn.Conv2d(cur, cur, 3, padding=1))
        self.norm_out = nn.GroupNorm(_groups(cur, self.groups), cur)
        self.conv_out = nn.Conv2d(cur, self.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, t: Any) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape [B, {self.in_channels}, H, W], got {list(x.shape)}")
        emb = self.t_mlp(self.embed(_time_vector(t, x)))
        h = self.conv_in(x)
        hs = [h]
        for level, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb)
                hs.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for i, blocks in enumerate(self.up):
            for block in blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            if i < len(self.upsample):
                h = F.interpolate(h, size=hs[-1].shape[-2:], mode="nearest")
                h = self.upsample[i](h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def config(self) -> dict:
        return {"class": "UNet", "in_channels": self.in_channels, "channels": self.channels,
                "channel_mults": list(self.channel_mults), "num_res_blocks": self.num_res_blocks,
                "embedding": self.embedding, "time_scale": self.time_scale, "groups": self.groups,
                "dropout": self.dropout, "attention": self.attention, "seed": self.seed}


# ----------------------------------------------------------------------- utilities
class FixedBatch(nn.Module):
    """Call ``net`` on chunks of exactly ``size`` rows (the last one zero-padded), so that a
    sample's output does not depend on how many samples share the call.

    CPU GEMM kernels choose their blocking from the number of rows, so ``net(x)[i]`` is not
    bitwise equal to ``net(x[i:i+1])[0]`` (measured here for float32 and float64 linear
    layers); with every call ``size`` rows the shapes, and therefore the bits, are fixed.
    Costs at most one padded chunk per call; differentiable (the likelihood's Jacobian
    products pass through it)."""

    def __init__(self, net: nn.Module, size: int = 64):
        super().__init__()
        self.net = net
        self.size = check_int(size, "size", minimum=1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        b, c = x.shape[0], self.size
        t = _time_vector(t, x)
        if b == c:
            return self.net(x, t)
        outs = []
        for i in range(0, max(b, 1), c):
            xi, ti = x[i:i + c], t[i:i + c]
            n = xi.shape[0]
            if n < c:
                xi = torch.cat([xi, xi.new_zeros((c - n,) + tuple(xi.shape[1:]))])
                ti = torch.cat([ti, ti[-1:].expand(c - n) if n else ti.new_zeros(c)])
            outs.append(self.net(xi, ti)[:n])
        return torch.cat(outs) if len(outs) > 1 else outs[0]


#: The network classes a config (and so a checkpoint) may name.
NETS = {"MLPScoreNet": MLPScoreNet, "UNet": UNet}


def build_net(config: dict) -> nn.Module:
    """Rebuild a network from its ``config()`` dict; ValueError for an unknown class or
    argument (only :data:`NETS` can be built)."""
    if not isinstance(config, dict) or "class" not in config:
        raise ValueError(f"net config must be a dict with a 'class' key, got {config!r}")
    name = config["class"]
    if name not in NETS:
        raise ValueError(f"unknown net class {name!r}; known: {sorted(NETS)}")
    kwargs = {k: v for k, v in config.items() if k != "class"}
    try:
        return NETS[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments for {name}: {err}") from err
