"""Causal video DiT: per-frame adaLN (noise level + action), block-causal attention, KV cache.

Dimensions: B batch (rollouts), A frames in the forward pass ("active"), N tokens per frame,
D width, Hd heads, d head dim, K cached tokens, C channels, P patch size, R resolution.

Time enters attention only through RoPE over the *global* frame index, so attention scores
depend on frame offsets alone: keys cached at frame 37 stay valid when the window slides, and
a window of n_frames at any point of a long rollout looks like the training window.
Attention is block-causal: every token of frame i sees all tokens of frames <= i.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfserve.model.config import NetworkConfig
from dfserve.model.edge_fill import EdgeFill
from dfserve.model.scroll import COPY_SHIFTS, ScrollHead, scroll_view, shift_frames

Rotation = tuple[Tensor, Tensor]  # RoPE cos, sin: (B, L, 1, d/2)


@dataclass
class BatchKV:
    """Cached keys/values for a batch: per layer (B, K, Hd, d), and which of the K are real."""

    keys: list[Tensor]
    values: list[Tensor]
    valid: Tensor  # (B, K) bool


def dense_frames(frame_valid: Tensor, cache: BatchKV | None) -> bool:
    """Every frame of the forward and every cached token is real (no padding in the batch)."""
    return bool(frame_valid.all()) and (cache is None or bool(cache.valid.all()))


def level_embedding(levels: Tensor, dim: int, timesteps: int) -> Tensor:
    """Sinusoidal embedding of level + 1 in [0, T] (0 = clean), as DiT embeds timesteps."""
    half = dim // 2
    t = (levels.to(torch.float32) + 1) * (1000.0 / timesteps)
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=levels.device) / half)
    args = t[..., None] * freqs  # (..., half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_tables(positions: Tensor, head_dim: int, base: float, dtype: torch.dtype) -> Rotation:
    """cos/sin (B, L, 1, d/2) for positions (B, L), once per forward for every layer.

    Angles are computed in float64 so that frame 10^4 rotates as exactly as frame 1."""
    inv_freq = base ** (
        -torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim
    )
    angles = positions.to(torch.float64)[..., None] * inv_freq  # (B, L, d/2)
    return torch.cos(angles).to(dtype)[:, :, None, :], torch.sin(angles).to(dtype)[:, :, None, :]


def rope(x: Tensor, rotation: Rotation) -> Tensor:
    """Rotate x (B, L, Hd, d) pairwise (first half, second half) by the given angles."""
    cos, sin = rotation
    d = x.shape[-1]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


# The scroll head's gate logit at initialisation: sigmoid 0.98, the copy starts open. Started
# at 0 (an even blend) the network learnt to redraw the scrolled copy through its token
# bottleneck and closed the gate (0.2 after 750 steps), and that redrawing blurs a little
# at every frame, so the world dissolved (52% of the real detail after 240 moves).
COPY_OPEN_LOGIT = 4.0


class Attention(nn.Module):
    def __init__(self, cfg: NetworkConfig):
        super().__init__()
        self.heads = cfg.heads
        self.tokens_per_frame = cfg.tokens_per_frame
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(
        self,
        x: Tensor,
        rotation: Rotation,
        mask: Tensor | None,
        cached: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """mask: (B, 1, L, K + L) bool, or None when every frame and cached token is real:
        then block-causal attention is made by slicing (frame_by_frame)."""
        B, L, D = x.shape  # L = A * N
        qkv = self.qkv(x).view(B, L, 3, self.heads, D // self.heads)
        q, k, v = qkv.unbind(dim=2)  # each (B, L, Hd, d)
        q, k = rope(q, rotation), rope(k, rotation)
        if cached is not None:
            keys, values = torch.cat([cached[0], k], 1), torch.cat([cached[1], v], 1)
        else:
            keys, values = k, v
        q, keys, values = q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        if mask is None:
            out = self.frame_by_frame(q, keys, values)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        out = out.transpose(1, 2).reshape(B, L, D)  # from (B, Hd, L, d)
        return self.proj(out), k, v

    def frame_by_frame(self, q: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        """Block-causal attention without a mask: each frame's queries attend to the keys up
        to the frame's own. A masked kernel computes every score and discards the masked ones
        (half of the active block of a window rebuild); these calls compute only those kept,
        and need no mask: 11-13% more frames/s on the 2-core CPU (the same frames up to
        float rounding)."""
        N = self.tokens_per_frame
        cached = keys.shape[2] - q.shape[2]
        return torch.cat([F.scaled_dot_product_attention(q[:, :, s : s + N],
                                                         keys[:, :, : cached + s + N],
                                                         values[:, :, : cached + s + N])
                          for s in range(0, q.shape[2], N)], dim=2)  # fmt: skip


class Block(nn.Module):
    """DiT block with adaLN-Zero, modulated per frame (each frame has its own level/action)."""

    def __init__(self, cfg: NetworkConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6)
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, cfg.width)
        )
        ada = nn.Linear(cfg.width, 6 * cfg.width)
        nn.init.zeros_(ada.weight)  # adaLN-Zero: every block starts as the identity
        nn.init.zeros_(ada.bias)
        self.ada = nn.Sequential(nn.SiLU(), ada)

    def forward(
        self,
        x: Tensor,
        cond: Tensor,
        rotation: Rotation,
        mask: Tensor | None,
        cached: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        B, A, N, D = x.shape
        mods = self.ada(cond)[:, :, None, :].chunk(6, dim=-1)  # each (B, A, 1, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = mods
        h = modulate(self.norm1(x), shift1, scale1).view(B, A * N, D)
        attn, k, v = self.attn(h, rotation, mask, cached)
        x = x + gate1 * attn.view(B, A, N, D)
        x = x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x, k, v


class CausalVideoDiT(nn.Module):
    def __init__(self, cfg: NetworkConfig, timesteps: int):
        super().__init__()
        if cfg.resolution % cfg.patch_size or cfg.width % cfg.heads:
            raise ValueError("network: resolution % patch_size and width % heads must be 0")
        self.cfg = cfg
        self.timesteps = timesteps
        D, P, C = cfg.width, cfg.patch_size, cfg.channels
        # the frame, the previous frame's input, and with copy_shifts its shifted copies too:
        # a token then sees its neighbours' previous content, so whether (and which way) the
        # world moved is a local comparison, and the centre token (the player) can tell a
        # step from a blocked one without first attending to the tile in front of it
        stacked = 1 + (len(COPY_SHIFTS) if cfg.copy_shifts else 1) if cfg.frame_skip else 1
        self.scroll_head = None
        if cfg.scroll_rows:  # the scrolled copy is stacked too: what the gate will copy
            if not cfg.copy_gate or cfg.copy_shifts:
                raise ValueError("network: scroll_rows needs copy_gate without copy_shifts")
            stacked += 1
            self.scroll_head = ScrollHead(P * P * C, cfg.tokens_per_frame, cfg.n_actions)
        self.patch_embed = nn.Linear(stacked * P * P * C, D)
        self.spatial_pos = nn.Parameter(torch.randn(cfg.tokens_per_frame, D) * 0.02)
        self.level_mlp = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        self.action_embed = nn.Embedding(cfg.n_actions + 1, D)  # last id = null action
        self.previous_level_mlp = None
        if cfg.previous_level:
            if not cfg.frame_skip:
                raise ValueError("network: previous_level needs frame_skip (the stacked frame)")
            out = nn.Linear(D, D)
            nn.init.zeros_(out.weight)  # starts as the network without it
            nn.init.zeros_(out.bias)
            self.previous_level_mlp = nn.Sequential(nn.Linear(D, D), nn.SiLU(), out)
        nn.init.normal_(self.action_embed.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        final_ada = nn.Linear(D, 2 * D)
        if cfg.copy_gate and not cfg.frame_skip:
            raise ValueError("network: copy_gate needs frame_skip (it gates the previous frame)")
        if cfg.copy_shifts and not cfg.copy_gate:
            raise ValueError("network: copy_shifts needs copy_gate")
        if cfg.convex_copy and (not cfg.copy_gate or cfg.copy_shifts):
            raise ValueError("network: convex_copy needs copy_gate without copy_shifts")
        if cfg.copy_action_prior and not cfg.copy_shifts:
            raise ValueError("network: copy_action_prior needs copy_shifts")
        self.copy_prior = None
        if cfg.copy_action_prior:  # zero: no preference until the data shows one
            self.copy_prior = nn.Embedding(cfg.n_actions + 1, len(COPY_SHIFTS) + 1)
            nn.init.zeros_(self.copy_prior.weight)
        # one gate logit per pixel, or per pixel one logit per shifted copy plus "none"
        gate = P * P * self.copy_choices if cfg.copy_gate else 0
        self.final = nn.Linear(D, P * P * C + gate)
        for layer in (final_ada, self.final):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if cfg.scroll_rows:  # the scrolled copy starts open (module docstring of model.scroll)
            nn.init.constant_(self.final.bias[P * P * C :], COPY_OPEN_LOGIT)
        self.final_ada = nn.Sequential(nn.SiLU(), final_ada)
        self.edge_fill = None  # used by the rollout engine when a frame finishes
        if cfg.edge_fill_codes:
            if not cfg.scroll_rows:
                raise ValueError("network: edge_fill_codes needs scroll_rows (a scrolling view)")
            self.edge_fill = EdgeFill(P, C, cfg.scroll_rows, cfg.resolution // P,
                                      cfg.edge_fill_codes)  # fmt: skip

    @property
    def null_action(self) -> int:
        return self.cfg.n_actions

    @property
    def copy_choices(self) -> int:
        """Gate logits per pixel: 1 (sigmoid gate), or the shifted copies + "none" (softmax)."""
        return len(COPY_SHIFTS) + 1 if self.cfg.copy_shifts else 1

    def patchify(self, x: Tensor) -> Tensor:
        B, A, C, R, _ = x.shape
        P, G = self.cfg.patch_size, R // self.cfg.patch_size
        x = x.view(B, A, C, G, P, G, P).permute(0, 1, 3, 5, 4, 6, 2)  # (B, A, G, G, P, P, C)
        return x.reshape(B, A, G * G, P * P * C)

    def unpatchify(self, x: Tensor) -> Tensor:
        B, A, _, _ = x.shape
        P, C, R = self.cfg.patch_size, self.cfg.channels, self.cfg.resolution
        G = R // P
        x = x.view(B, A, G, G, P, P, C).permute(0, 1, 6, 2, 4, 3, 5)  # (B, A, C, G, P, G, P)
        return x.reshape(B, A, C, R, R)

    def forward(
        self,
        x: Tensor,
        levels: Tensor,
        actions: Tensor,
        positions: Tensor,
        frame_valid: Tensor | None = None,
        cache: BatchKV | None = None,
        before: Tensor | None = None,
        before_level: Tensor | None = None,
        scrolls: Tensor | None = None,
        gates: list[Tensor] | None = None,
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """x (B, A, C, R, R), levels/actions/positions (B, A) -> output in the objective's
        parameterisation (B, A, C, R, R), plus the new keys/values per layer (B, A*N, Hd, d)
        so the caller can commit finished frames to its cache.

        before (B, C, R, R): with frame_skip, the input of the frame preceding x[:, 0] when it
        is inside the attention window (in the cache); zeros (the default) at a window start.
        before_level (B,): its level, T-1 (nothing to copy, the default) where it is zeros.
        scrolls (B, A): with scroll_rows, each frame's scroll (an index in COPY_SHIFTS), the
        data's during training; by default the scroll head's most likely one.
        gates: with copy_gate, a list that gets the gate's logits and the copy it gates, each
        (B, A, C, R, R), for the training loss that supervises the gate (model.train)."""
        B, A = levels.shape
        N = self.cfg.tokens_per_frame
        if frame_valid is None:
            frame_valid = torch.ones(B, A, dtype=torch.bool, device=x.device)
        patches = self.patchify(x)  # (B, A, N, P*P*C)
        copies: list[Tensor] = []  # the previous frame's input, as it was [and moved]
        if self.cfg.frame_skip:
            previous = self.previous_frames(x, before)
            copied_levels = self.previous_levels(levels, before_level)
            offsets = COPY_SHIFTS if self.cfg.copy_shifts else ((0, 0),)
            P = self.cfg.patch_size
            copies = [shift_frames(previous, dy * P, dx * P) for dy, dx in offsets]
            stacked = [patches] + [self.patchify(c) for c in copies]
            if self.scroll_head is not None:
                if scrolls is None:  # stacked[1]: the previous frame as it was (no copy_shifts)
                    scrolls = self.head_logits(stacked[1], actions, copied_levels).argmax(-1)
                copies = [scroll_view(previous, scrolls, P, self.cfg.scroll_rows)]
                stacked.append(self.patchify(copies[0]))
            patches = torch.cat(stacked, dim=-1)
        h = self.patch_embed(patches) + self.spatial_pos  # (B, A, N, D)
        embedding = level_embedding(levels, self.cfg.width, self.timesteps).to(h.dtype)
        cond = self.level_mlp(embedding)
        cond = cond + self.action_embed(actions)  # (B, A, D)
        if self.previous_level_mlp is not None:
            embedded = level_embedding(copied_levels, self.cfg.width, self.timesteps).to(h.dtype)
            cond = cond + self.previous_level_mlp(embedded)
        token_pos = positions.repeat_interleave(N, dim=1)  # (B, A*N)
        rotation = rope_tables(token_pos, self.cfg.width // self.cfg.heads, self.cfg.rope_base,
                               h.dtype)  # fmt: skip
        mask = self.attention_mask(frame_valid, cache)
        new_keys, new_values = [], []
        for i, block in enumerate(self.blocks):
            cached = (cache.keys[i], cache.values[i]) if cache is not None else None
            h, k, v = block(h, cond, rotation, mask, cached)
            new_keys.append(k)
            new_values.append(v)
        shift, scale = self.final_ada(cond)[:, :, None, :].chunk(2, dim=-1)
        out = self.final(modulate(self.final_norm(h), shift, scale))  # (B, A, N, P*P*C[+P*P])
        if copies and self.cfg.copy_gate:
            return self.gated_copy(out, copies, actions, gates), new_keys, new_values
        return self.unpatchify(out), new_keys, new_values

    def previous_frames(self, x: Tensor, before: Tensor | None) -> Tensor:
        """(B, A, C, R, R): the input of the frame before each frame (zeros at a window start)."""
        first = torch.zeros_like(x[:, 0]) if before is None else before
        return torch.cat([first[:, None], x[:, :-1]], dim=1)

    def scroll_logits(self, x: Tensor, levels: Tensor, actions: Tensor,
                      before: Tensor | None = None,
                      before_level: Tensor | None = None) -> Tensor:  # fmt: skip
        """(B, A, len(COPY_SHIFTS)): the scroll head's logits for each frame of x, from the
        frame before it, its action and that frame's level (arguments as in forward)."""
        previous = self.patchify(self.previous_frames(x, before))
        return self.head_logits(previous, actions, self.previous_levels(levels, before_level))

    def head_logits(self, previous: Tensor, actions: Tensor, copied_levels: Tensor) -> Tensor:
        """scroll_logits from what forward has at hand: the previous frames' patches
        (B, A, N, P*P*C), the actions and the previous frames' levels (B, A)."""
        assert self.scroll_head is not None, "the network has no scroll head (scroll_rows 0)"
        embedded = level_embedding(copied_levels, self.scroll_head.width, self.timesteps)
        logits: Tensor = self.scroll_head(previous, actions, embedded.to(previous.dtype))
        return logits

    def previous_levels(self, levels: Tensor, before_level: Tensor | None) -> Tensor:
        """(B, A): the level of the frame each frame sees stacked (and may copy)."""
        first = before_level
        if first is None:
            first = levels.new_full((levels.shape[0],), self.timesteps - 1)
        return torch.cat([first[:, None].to(levels.dtype), levels[:, :-1]], dim=1)

    def gated_copy(self, out: Tensor, copies: list[Tensor], actions: Tensor,
                   gates_out: list[Tensor] | None = None) -> Tensor:  # fmt: skip
        """residual + sigmoid(gate) * previous, per pixel (the gate is shared by channels),
        or with convex_copy the blend sigmoid(gate) * previous + (1 - sigmoid(gate)) * residual;
        with copy_shifts, residual + sum_k softmax(gates)_k * copies[k] (the previous frame
        moved by COPY_SHIFTS[k]), where the softmax also has a "none" choice so a pixel can
        take the residual alone, and with copy_action_prior each frame's action adds its
        learned bias to every pixel's gates."""
        P, C = self.cfg.patch_size, self.cfg.channels
        K = self.copy_choices
        residual, gate_logits = out.split([P * P * C, P * P * K], dim=-1)
        B, A, N, _ = gate_logits.shape
        gates = gate_logits.view(B, A, N, P * P, K, 1).expand(B, A, N, P * P, K, C)
        gates = gates.permute(0, 4, 1, 2, 3, 5).reshape(B * K, A, N, P * P * C)
        gates = self.unpatchify(gates).view(B, K, A, C, *copies[0].shape[-2:])  # per pixel
        residual = self.unpatchify(residual)
        if not self.cfg.copy_shifts:
            if gates_out is not None:
                gates_out += [gates[:, 0], copies[0]]
            gate = torch.sigmoid(gates[:, 0])
            if self.cfg.convex_copy:
                if self.cfg.exact_copy_above and not torch.is_grad_enabled():
                    gate = torch.where(gate > self.cfg.exact_copy_above, 1.0, gate)
                return torch.lerp(residual, copies[0], gate)
            return residual + gate * copies[0]
        if self.copy_prior is not None:
            gates = gates + self.copy_prior(actions).permute(0, 2, 1)[..., None, None, None]
        weights = torch.softmax(gates, dim=1)  # (B, K, A, C, R, R); the last choice is "none"
        for k, copy in enumerate(copies):
            residual = residual + weights[:, k] * copy
        return residual

    def attention_mask(self, frame_valid: Tensor, cache: BatchKV | None) -> Tensor | None:
        """(B, 1, A*N, K + A*N) bool: cached tokens (all earlier) + block-causal active ones.

        None when every frame and cached token is real and no gradient is taken: Attention
        then attends frame by frame, which computes only the kept scores. Training keeps the
        one masked call (its backward through one kernel, as it was trained)."""
        if not torch.is_grad_enabled() and dense_frames(frame_valid, cache):
            return None
        B, A = frame_valid.shape
        N = self.cfg.tokens_per_frame
        frame_idx = torch.arange(A, device=frame_valid.device)
        causal = frame_idx[None, :, None] >= frame_idx[None, None, :]  # (1, A, A)
        active = causal & frame_valid[:, None, :]  # (B, A, A): query frame x key frame
        active = active.repeat_interleave(N, 1).repeat_interleave(N, 2)  # (B, A*N, A*N)
        if cache is not None:
            cached = cache.valid[:, None, :].expand(B, A * N, cache.valid.shape[1])
            active = torch.cat([cached, active], dim=2)
        return active[:, None]
