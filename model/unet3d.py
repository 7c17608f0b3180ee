"""3-D U-Net of the diffusion-forcing research code (v1.5, `Unet3D`), as a dfserve denoiser.

Dimensions: B batch (rollouts), F frames in the forward pass, C channels, H x W a feature map,
E noise-level embedding width, Hd heads, d head dim, L = tokens of one attention sequence.

Written from reading buoyancy99/diffusion-forcing `algorithms/diffusion_forcing/models/`
(unet3d.py, resnet.py, attention.py, embeddings.py); no code is shared. The reference works on
(B, C, F, H, W) with Conv3d kernels (1, k, k); here tensors are (B, F, C, H, W) and the same
weights run as per-frame Conv2d (the importer drops the kernels' time axis of size 1).

Structure (lucidrains-style U-Net, per level: 2 ResNet blocks, spatial attention, temporal
attention, then down- or upsampling; skip connections after each down level):
- every ResNet block is modulated per frame by that frame's noise level (scale/shift);
- spatial attention is per frame over the H*W positions, "linear" (softmax kernels, Shen et
  al. 2021) except at the deepest level and in the middle block, where it is full attention;
- temporal attention is per pixel over the F frames, causal, with rotary embedding of the
  frame index (interleaved pairs, as rotary-embedding-torch rotates them).

It is NOT causal in time as a whole, and so no KV cache can be exact: GroupNorm normalises over
(channels of a group, F, H, W), i.e. over every frame of the window, so each frame's features
depend on the later (noisier) frames through the group statistics, even though the temporal
attention itself is masked. The rollout engine therefore recomputes the window at every row
for this network (`causal = False`), exactly as the reference does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfserve.model.config import NetworkConfig, UNet3DConfig


def level_embedding(levels: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of the raw level (DDPM; the reference's `Timesteps(dim, True, 0)`):
    angles t * 10000^(-i/half), cos first then sin ("flip_sin_to_cos")."""
    half = dim // 2
    exponent = -math.log(10_000) * torch.arange(half, dtype=torch.float32, device=levels.device)
    args = levels.to(torch.float32)[..., None] * torch.exp(exponent / half)  # (B, F, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class FrameGroupNorm(nn.Module):
    """nn.GroupNorm of a (B, C, F, H, W) tensor, applied to (B, F, C, H, W): the statistics of
    each group span all F frames (this is what makes the reference non-causal)."""

    def __init__(self, channels: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        B, Fr, C, H, W = x.shape
        g = x.view(B, Fr, self.groups, C // self.groups, H, W)
        var, mean = torch.var_mean(g, dim=(1, 3, 4, 5), unbiased=False, keepdim=True)
        g = (g - mean) * torch.rsqrt(var + self.eps)
        return g.view(B, Fr, C, H, W) * self.weight.view(C, 1, 1) + self.bias.view(C, 1, 1)


def per_frame(conv: nn.Module, x: Tensor) -> Tensor:
    """Apply a 2-D module to every frame of x (B, F, C, H, W)."""
    B, Fr = x.shape[:2]
    y: Tensor = conv(x.reshape(B * Fr, *x.shape[2:]))  # (B*F, C', H', W')
    return y.view(B, Fr, *y.shape[1:])


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, then GroupNorm modulated by the frame's level embedding
    (h * (1 + scale) + shift, scale first), SiLU-conv; plus a 1x1-conv skip when widths differ."""

    def __init__(self, dim_in: int, dim_out: int, groups: int, emb_dim: int | None):
        super().__init__()
        self.norm1 = FrameGroupNorm(dim_in, groups)
        self.conv1 = nn.Conv2d(dim_in, dim_out, 3, padding=1)
        self.norm2 = FrameGroupNorm(dim_out, groups)
        self.conv2 = nn.Conv2d(dim_out, dim_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * dim_out) if emb_dim is not None else None
        self.skip = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else None

    def forward(self, x: Tensor, emb: Tensor | None) -> Tensor:
        h = per_frame(self.conv1, F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.emb is not None:
            assert emb is not None
            scale, shift = self.emb(F.silu(emb))[..., None, None].chunk(2, dim=2)  # (B, F, C, 1, 1)
            h = h * (1 + scale) + shift
        h = per_frame(self.conv2, F.silu(h))
        return (per_frame(self.skip, x) if self.skip is not None else x) + h


def rope_interleaved(x: Tensor, base: float) -> Tensor:
    """Rotate x (L', Hd, F, d) by frame index 0..F-1, pairs (2i, 2i+1) at base^(-2i/d)."""
    Fr, d = x.shape[-2], x.shape[-1]
    # float32 and this exact expression, as rotary-embedding-torch computes its `freqs`
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, device=x.device).float() / d))
    angles = torch.arange(Fr, dtype=torch.float32, device=x.device)[:, None] * inv_freq  # (F, d/2)
    cos, sin = torch.cos(angles).to(x.dtype), torch.sin(angles).to(x.dtype)
    pairs = x.unflatten(-1, (d // 2, 2))  # (L', Hd, F, d/2, 2)
    x1, x2 = pairs[..., 0], pairs[..., 1]
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)


class Attention(nn.Module):
    """Pre-LayerNorm residual attention over sequences (N, L, C): full softmax attention
    (optionally causal with rotary positions), or linear attention."""

    def __init__(self, dim: int, heads: int, dim_head: int, kind: str, rope_base: float = 0.0):
        super().__init__()
        self.heads, self.dim_head, self.kind, self.rope_base = heads, dim_head, kind, rope_base
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.out = nn.Linear(heads * dim_head, dim)

    def forward(self, x: Tensor) -> Tensor:
        N, L, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).view(N, L, 3, self.heads, self.dim_head).unbind(2)
        if self.kind == "linear":
            out = self.linear_attention(q, k, v)
        else:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # each (N, Hd, L, d)
            causal = self.kind == "temporal"
            if causal:
                q, k = rope_interleaved(q, self.rope_base), rope_interleaved(k, self.rope_base)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2)
        projected: Tensor = self.out(out.reshape(N, L, self.heads * self.dim_head))
        return x + projected

    def linear_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Softmax of q over features and of k over positions; context = k^T v (d x d per
        head), out = context^T q (the reference's LinearAttention, scaled by d^-1/2)."""
        q = q.softmax(dim=-1) * self.dim_head**-0.5  # (N, L, Hd, d)
        k = k.softmax(dim=1)
        context = torch.einsum("nlhd,nlhe->nhde", k, v)
        return torch.einsum("nhde,nlhd->nlhe", context, q)  # (N, L, Hd, d)


def spatial(attn: Attention, x: Tensor) -> Tensor:
    """Attention over the H*W positions of each frame of x (B, F, C, H, W)."""
    B, Fr, C, H, W = x.shape
    seq = x.reshape(B * Fr, C, H * W).transpose(1, 2)  # (B*F, H*W, C)
    attended: Tensor = attn(seq)
    return attended.transpose(1, 2).reshape(B, Fr, C, H, W)


def temporal(attn: Attention, x: Tensor) -> Tensor:
    """Causal attention over the F frames at each pixel of x (B, F, C, H, W)."""
    B, Fr, C, H, W = x.shape
    seq = x.permute(0, 3, 4, 1, 2).reshape(B * H * W, Fr, C)  # (B*H*W, F, C)
    attended: Tensor = attn(seq)
    return attended.view(B, H, W, Fr, C).permute(0, 3, 4, 1, 2)


class Level(nn.Module):
    """One U-Net level: two ResNet blocks, optional spatial + temporal attention, then an
    optional resampling conv ("down": stride 2; "up": nearest x2 then conv)."""

    def __init__(self, dim_in: int, dim_out: int, cfg: UNet3DConfig, emb_dim: int,
                 attention: str | None, resample: str | None):  # fmt: skip
        super().__init__()
        self.res1 = ResBlock(dim_in, dim_out, cfg.groups, emb_dim)
        self.res2 = ResBlock(dim_out, dim_out, cfg.groups, emb_dim)
        heads, d = cfg.attn_heads, cfg.attn_dim_head
        self.spatial = Attention(dim_out, heads, d, attention) if attention else None
        self.temporal = (
            Attention(dim_out, heads, d, "temporal", cfg.rope_base) if attention else None
        )
        self.resample = resample
        stride = 2 if resample == "down" else 1
        self.conv = nn.Conv2d(dim_out, dim_out, 3, stride, padding=1) if resample else None

    def forward(self, x: Tensor, emb: Tensor) -> tuple[Tensor, Tensor]:
        """-> (output after resampling, features before it: the skip connection)."""
        x = self.res2(self.res1(x, emb), emb)
        if self.spatial is not None and self.temporal is not None:
            x = temporal(self.temporal, spatial(self.spatial, x))
        if self.conv is None:
            return x, x
        h = x
        if self.resample == "up":
            B, Fr = h.shape[:2]
            h = F.interpolate(h.flatten(0, 1), scale_factor=2.0, mode="nearest").unflatten(
                0, (B, Fr)
            )
        return per_frame(self.conv, h), x


class UNet3D(nn.Module):
    """Denoiser contract of the rollout engine (see CausalVideoDiT.forward); actions are
    ignored (DF v1.5's video models are unconditional) and no cache is ever used."""

    causal = False  # GroupNorm spans the window: see the module docstring

    def __init__(self, net: NetworkConfig, cfg: UNet3DConfig):
        super().__init__()
        self.net_cfg, self.cfg = net, cfg
        dim, C = cfg.dim, net.channels
        widths = [dim] + [dim * m for m in cfg.dim_mults]
        pairs = list(zip(widths[:-1], widths[1:], strict=True))
        emb_dim = 4 * dim
        self.level_mlp = nn.Sequential(nn.Linear(dim, emb_dim), nn.SiLU(),
                                       nn.Linear(emb_dim, emb_dim))  # fmt: skip
        self.init_conv = nn.Conv2d(C, dim, cfg.init_kernel_size, padding=cfg.init_kernel_size // 2)
        self.init_temporal = (
            Attention(dim, cfg.attn_heads, cfg.attn_dim_head, "temporal", cfg.rope_base)
            if cfg.use_init_temporal_attn
            else None
        )
        factors = {net.resolution // r for r in cfg.attn_resolutions}  # downsampling factors
        self.down = nn.ModuleList()
        factor = 1
        for i, (w_in, w_out) in enumerate(pairs):
            last = i == len(pairs) - 1
            kind = ("linear" if cfg.use_linear_attn and not last else "full")
            attention = kind if factor in factors else None
            self.down.append(Level(w_in, w_out, cfg, emb_dim, attention, None if last else "down"))
            factor *= 1 if last else 2
        mid = widths[-1]
        self.mid1 = ResBlock(mid, mid, cfg.groups, emb_dim)
        self.mid_spatial = Attention(mid, cfg.attn_heads, cfg.attn_dim_head, "full")
        self.mid_temporal = Attention(mid, cfg.attn_heads, cfg.attn_dim_head, "temporal",
                                      cfg.rope_base)  # fmt: skip
        self.mid2 = ResBlock(mid, mid, cfg.groups, emb_dim)
        self.up = nn.ModuleList()
        for i, (w_in, w_out) in enumerate(reversed(pairs)):
            last = i == len(pairs) - 1
            kind = "linear" if cfg.use_linear_attn and i > 0 else "full"
            attention = kind if factor in factors else None
            self.up.append(Level(2 * w_out, w_in, cfg, emb_dim, attention, None if last else "up"))
            factor //= 1 if last else 2
        self.out_res = ResBlock(2 * dim, dim, cfg.groups, None)
        self.out_conv = nn.Conv2d(dim, C, 1)

    @property
    def null_action(self) -> int:
        return self.net_cfg.n_actions

    def forward(
        self,
        x: Tensor,
        levels: Tensor,
        actions: Tensor | None = None,
        positions: Tensor | None = None,
        frame_valid: Tensor | None = None,
        cache: object = None,
        before: Tensor | None = None,
        before_level: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """x (B, F, C, R, R), levels (B, F) -> the objective's output (B, F, C, R, R).

        Frames are numbered from 0 at the window's first frame, as the reference does (rotary
        embedding is relative, so only float rounding would differ otherwise). Padding frames
        (frame_valid False) are refused: they would enter every frame's GroupNorm statistics.
        before/before_level are the DiT's stacked previous frame; this network has none."""
        if frame_valid is not None and not bool(frame_valid.all()):
            raise ValueError("UNet3D: padded frames would change GroupNorm statistics")
        if cache is not None:
            raise ValueError("UNet3D: no KV cache (the network is not causal in time)")
        emb = self.level_mlp(level_embedding(levels, self.cfg.dim).to(x.dtype))  # (B, F, E)
        x = per_frame(self.init_conv, x)
        if self.init_temporal is not None:
            x = temporal(self.init_temporal, x)
        h, skips = x, []
        for level in self.down:
            h, skip = level(h, emb)
            skips.append(skip)
        h = self.mid1(h, emb)
        h = temporal(self.mid_temporal, spatial(self.mid_spatial, h))
        h = self.mid2(h, emb)
        for level in self.up:
            h, _ = level(torch.cat([h, skips.pop()], dim=2), emb)
        h = self.out_res(torch.cat([h, x], dim=2), None)
        return per_frame(self.out_conv, h), [], []
