"""Whole-tile scrolling of a top-down view: how well a shift maps one frame onto the next, the
data's own scroll per frame, and the head that predicts it from the action.

In a tile world seen from above (Crafter) a player step moves the whole view by one tile, or
not at all when the tile in front is blocked. With tile-aligned patches that step is a
permutation of patches, one discrete choice per frame. Learnt through the x0 loss, as a soft
per-pixel blend of shifted copies, it stayed near the average of the choices (the crafter-cpu
card: 1 correct scroll in 91); as a classification it is the easy problem it looks like: read
the tile in front of the player and the action. So `ScrollHead` predicts the scroll with a
cross-entropy on the data's own scrolls (`scroll_labels`), the network copies the previous frame
moved by it (`scroll_view`), and the denoiser only draws what the copy lacks: the row or column
entering at the edge, the player's sprite, animals. The copy's gate starts open
(model.network.COPY_OPEN_LOGIT): a world that is copied exactly keeps its detail for as long
as it stays in view, where one redrawn through the network's tokens blurs a little every frame.

Dimensions: B batch, A frames, C channels, R resolution, P patch (= tile) size, N patches per
frame, K = len(COPY_SHIFTS), D the head's width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# Whole-patch moves of the previous frame, (rows down, columns right): as it was, and one patch
# in each of the four directions. A step left moves the view right: (0, 1).
COPY_SHIFTS: tuple[tuple[int, int], ...] = ((0, 0), (0, 1), (0, -1), (1, 0), (-1, 0))


def shift_frames(x: Tensor, dy: int, dx: int) -> Tensor:
    """x (..., H, W) moved dy pixels down and dx right; what enters from the edge is 0."""
    if dy == 0 and dx == 0:
        return x
    H, W = x.shape[-2:]
    out = torch.zeros_like(x)
    out[..., max(dy, 0) : H + min(dy, 0), max(dx, 0) : W + min(dx, 0)] = x[
        ..., max(-dy, 0) : H + min(-dy, 0), max(-dx, 0) : W + min(-dx, 0)
    ]
    return out


def overlap_mse(before: Tensor, after: Tensor, dy: int, dx: int) -> Tensor:
    """Mean squared error, over the pixels both cover, between `before` moved (dy, dx) pixels
    and `after`: (..., C, H, W) -> (...). What enters from the edge is not compared."""
    H, W = before.shape[-2:]
    moved = before[..., max(-dy, 0) : H - max(dy, 0), max(-dx, 0) : W - max(dx, 0)]
    target = after[..., max(dy, 0) : H + min(dy, 0), max(dx, 0) : W + min(dx, 0)]
    return (moved - target).pow(2).flatten(-3).mean(-1)


def scroll_labels(x0: Tensor, patch: int, rows: int) -> Tensor:
    """x0 (B, A, C, R, R) -> (B, A) the index in COPY_SHIFTS that best maps the view (the top
    `rows` patch rows) of frame t-1 onto frame t; frame 0 has no previous frame and gets 0.
    A shift must beat "as it was" strictly, so a still or uniform view reads as no scroll
    (as the evaluation's best_tile_shift does)."""
    view_before, view_after = x0[:, :-1, ..., : rows * patch, :], x0[:, 1:, ..., : rows * patch, :]
    errors = torch.stack([overlap_mse(view_before, view_after, dy * patch, dx * patch)
                          for dy, dx in COPY_SHIFTS], dim=-1)  # fmt: skip  # (B, A-1, K)
    best = errors.argmin(-1)
    still = errors.gather(-1, best[..., None])[..., 0] >= errors[..., 0] - 1e-12
    best = torch.where(still, 0, best)
    return torch.cat([torch.zeros_like(best[:, :1]), best], dim=1)


def scroll_view(previous: Tensor, scrolls: Tensor, patch: int, rows: int) -> Tensor:
    """previous (B, A, C, R, R) with its top `rows` patch rows moved by COPY_SHIFTS[scrolls]
    (B, A); the rows below (Crafter's inventory) stay, and nothing crosses between the two."""
    top = rows * patch
    view = previous[..., :top, :]
    moved = torch.stack([shift_frames(view, dy * patch, dx * patch) for dy, dx in COPY_SHIFTS],
                        dim=2)  # fmt: skip  # (B, A, K, C, top, R)
    index = scrolls[:, :, None, None, None, None].expand(-1, -1, 1, *moved.shape[3:])
    chosen = moved.gather(2, index)[:, :, 0]
    return torch.cat([chosen, previous[..., top:, :]], dim=-2)


class ScrollHead(nn.Module):
    """Logits over COPY_SHIFTS for each frame, from the previous frame's input, the frame's
    action and the previous frame's noise level (a noisy previous frame cannot tell a free
    tile from a blocked one, so the head falls back to what the action alone says).

    A small transformer over the previous frame's patches, mean-pooled: the step is decided by
    the tile next to the player, which attention finds from the learnt patch positions. It
    never sees the frame being denoised, so it cannot copy the answer from a half-drawn frame
    at sampling time."""

    def __init__(self, patch_dim: int, tokens: int, n_actions: int, width: int = 64,
                 depth: int = 2, heads: int = 4):  # fmt: skip
        super().__init__()
        self.width = width
        self.embed = nn.Linear(patch_dim, width)
        self.position = nn.Parameter(torch.randn(tokens, width) * 0.02)
        self.action = nn.Embedding(n_actions + 1, width)  # last id = the null action
        self.level = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0,
                                           activation="gelu", batch_first=True,
                                           norm_first=True)  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, len(COPY_SHIFTS)))

    def forward(self, patches: Tensor, actions: Tensor, level_embedding: Tensor) -> Tensor:
        """patches (B, A, N, P*P*C) of the previous frames, actions (B, A), level_embedding
        (B, A, D) of their levels -> logits (B, A, K)."""
        B, A, N, _ = patches.shape
        cond = self.action(actions) + self.level(level_embedding)  # (B, A, D)
        h = self.embed(patches) + self.position + cond[:, :, None, :]
        h = self.encoder(h.view(B * A, N, self.width))
        logits: Tensor = self.out(h.mean(dim=1)).view(B, A, len(COPY_SHIFTS))
        return logits


def scroll_loss(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Cross-entropy of the head's logits (B, A, K) against the data's scrolls (B, A), over the
    frames of `mask` (B, A) that have a previous frame in the window (t >= 1)."""
    keep = mask.clone()
    keep[:, 0] = False
    if not keep.any():
        return logits.sum() * 0.0
    return nn.functional.cross_entropy(logits[keep], labels[keep])
