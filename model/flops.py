"""The causal video DiT's FLOPs, counted analytically from its configuration (model/network.py).

What model FLOP utilisation (`dfserve bench`'s `mfu`) divides by the machine's peak: the matmul
work of one forward. A multiply-add is 2 FLOPs, the convention of torch.utils.flop_counter, so
tests/model/test_flops.py checks these counts against FlopCounterMode on real forwards, exactly.

Only matrix products are counted: the linear layers (a bias add is part of addmm and free, as
FlopCounterMode has it) and the two products of attention. Elementwise work is left out:
LayerNorm, adaLN's modulate and gates, RoPE, GELU/SiLU, softmax, the sinusoidal level
embedding, the attention mask, embedding lookups (actions, the copy prior), patchify and the
copy path (the shifted and scrolled copies, the gate's sigmoid and the convex blend, a lerp).
They are memory-bound and do not use the matmul units that MFU measures against.

Dimensions as in model/network.py: B batch, A frames in the forward, N tokens per frame,
D width, K cached tokens, L = A*N active tokens, S = K + L keys, P patch, C channels.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from dfserve.model.config import NetworkConfig
from dfserve.model.network import BatchKV, CausalVideoDiT, dense_frames
from dfserve.model.scroll import COPY_SHIFTS, ScrollHead


def linear_flops(rows: int, in_features: int, out_features: int) -> int:
    """A linear layer applied to `rows` vectors: one multiply-add per weight per row."""
    return 2 * rows * in_features * out_features


def attention_flops(batch: int, queries: int, keys: int, width: int) -> int:
    """Scores Q K^T and their weighted sum of values, over all heads (heads x head dim = width).

    The whole queries x keys score matrix is counted, masked entries too: a masked
    F.scaled_dot_product_attention (the DiT's block-causal mask; the fused CPU kernel and the
    math fallback alike) computes every score and then discards the masked ones, so half of
    the active-frame block is real work that the causal structure does not save."""
    return 2 * (2 * batch * queries * keys * width)


def forward_flops(cfg: NetworkConfig, batch: int, frames: int, cached_frames: int = 0,
                  frame_by_frame: bool = False) -> int:  # fmt: skip
    """FLOPs of one CausalVideoDiT.forward of `frames` frames per rollout attending to
    `cached_frames` cached frames as well (block-causal: frame i sees the cache and frames
    <= i). With a mask the full L x (K + L) scores are computed (see attention_flops);
    frame_by_frame (the network's way without padding and gradients, see
    network.Attention.frame_by_frame) computes only the scores that are kept.

    Padded frames (frame_valid False) cost as much as real ones: pass the padded count to
    measure the work a forward does."""
    B, A, D, N = batch, frames, cfg.width, cfg.tokens_per_frame
    tokens, keys = B * A * N, (cached_frames + frames) * N
    hidden = int(D * cfg.mlp_ratio)
    total = linear_flops(tokens, _stacked_inputs(cfg) * _patch_dim(cfg), D)  # patch_embed
    total += 2 * linear_flops(B * A, D, D)  # level_mlp
    if cfg.previous_level:
        total += 2 * linear_flops(B * A, D, D)  # previous_level_mlp
    block = (
        linear_flops(B * A, D, 6 * D)  # adaLN, once per frame
        + linear_flops(tokens, D, 3 * D)  # qkv
        + (sum(attention_flops(B, N, (cached_frames + i) * N, D) for i in range(1, A + 1))
           if frame_by_frame else attention_flops(B, A * N, keys, D))
        + linear_flops(tokens, D, D)  # proj
        + linear_flops(tokens, D, hidden)
        + linear_flops(tokens, hidden, D)  # MLP
    )
    total += cfg.depth * block
    total += linear_flops(B * A, D, 2 * D)  # final adaLN
    total += linear_flops(tokens, D, _patch_dim(cfg) + _gate_logits(cfg))  # final layer
    if cfg.scroll_rows:
        total += scroll_head_flops(cfg, B * A)
    return total


def scroll_head_flops(cfg: NetworkConfig, frames: int) -> int:
    """model.scroll.ScrollHead on `frames` frames (it runs on every frame of a forward): a
    small pre-norm transformer over each frame's N patches, unmasked attention within a frame."""
    width, depth = _SCROLL_HEAD["width"], _SCROLL_HEAD["depth"]
    N = cfg.tokens_per_frame
    tokens = frames * N
    total = linear_flops(tokens, _patch_dim(cfg), width)  # embed
    total += 2 * linear_flops(frames, width, width)  # level MLP
    layer = (
        linear_flops(tokens, width, 3 * width)  # in_proj
        + attention_flops(frames, N, N, width)
        + linear_flops(tokens, width, width)  # out_proj
        + linear_flops(tokens, width, 2 * width)
        + linear_flops(tokens, 2 * width, width)  # feed-forward of 2 x width
    )
    total += depth * layer
    return total + linear_flops(frames, width, len(COPY_SHIFTS))  # logits of the pooled frame


def _patch_dim(cfg: NetworkConfig) -> int:
    return cfg.patch_size**2 * cfg.channels


def _stacked_inputs(cfg: NetworkConfig) -> int:
    """Frames concatenated into each token's input, as CausalVideoDiT.__init__ stacks them:
    the frame, with frame_skip the previous one (or its shifted copies), with a scroll head
    its scrolled copy."""
    stacked = 1
    if cfg.frame_skip:
        stacked += len(COPY_SHIFTS) if cfg.copy_shifts else 1
    return stacked + (1 if cfg.scroll_rows else 0)


def _gate_logits(cfg: NetworkConfig) -> int:
    """The copy gate's logits per token (CausalVideoDiT.copy_choices per pixel)."""
    if not cfg.copy_gate:
        return 0
    return cfg.patch_size**2 * (len(COPY_SHIFTS) + 1 if cfg.copy_shifts else 1)


# The scroll head's size is not configurable: CausalVideoDiT builds it with ScrollHead's
# defaults, so they are read from there and stay one fact.
_SCROLL_HEAD: dict[str, int] = {
    name: p.default
    for name, p in inspect.signature(ScrollHead.__init__).parameters.items()
    if name in ("width", "depth")
}


class ForwardFlops:
    """Counts the FLOPs of every forward a CausalVideoDiT really runs, while entered: a
    forward pre-hook reads each call's batch, frames (padding included) and cached frames.
    The rollout engine stays as it is, and the count is of the work it chose to do (cache
    hits, window rebuilds, grouped and padded batches), not of a model of it."""

    def __init__(self, net: nn.Module):
        if not isinstance(net, CausalVideoDiT):  # the U-Net's forwards are not counted here
            raise TypeError(f"ForwardFlops counts CausalVideoDiT forwards, not {type(net)}")
        self.net = net
        self.flops = 0
        self.forwards = 0
        self._signature = inspect.signature(net.forward)
        self._handle: RemovableHandle | None = None

    def __enter__(self) -> ForwardFlops:
        self._handle = self.net.register_forward_pre_hook(self._count, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _count(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        bound = self._signature.bind(*args, **kwargs)
        B, A = bound.arguments["x"].shape[:2]
        cache: BatchKV | None = bound.arguments.get("cache")
        cached_tokens = cache.keys[0].shape[1] if cache is not None else 0
        valid = bound.arguments.get("frame_valid")
        # the test CausalVideoDiT.attention_mask makes: no mask, attention frame by frame
        by_frame = not torch.is_grad_enabled() and dense_frames(
            valid if valid is not None else torch.ones(B, A, dtype=torch.bool), cache)
        cfg = self.net.cfg
        self.flops += forward_flops(cfg, B, A, cached_tokens // cfg.tokens_per_frame, by_frame)
        self.forwards += 1
