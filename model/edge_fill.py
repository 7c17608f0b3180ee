"""What enters at the edge of a scrolling tile view: a learnt tile sampler (the edge fill).

When the player steps, the view scrolls by one tile and a row or column of the world enters
at the far edge. The denoiser draws it from what it has seen, and nothing it has seen says
what lies beyond the edge, so its x0 estimate is the average of the possibilities: flat
grass. Frame after frame those averages scroll in, and after a few dozen steps the whole view
is grass (the crafter-cpu card: world detail 17-19% of the real frames' over the last 60
frames of a 240-frame walk). An average is not a sample. The edge fill draws one: when a frame
finishes, each tile slot that entered in it gets a tile drawn from a categorical over a
codebook of the data's tiles (k-means of the world tiles of the training frames), predicted
from the rest of the view by a small transformer (`EdgeFillHead`), trained by cross-entropy
on the data's own entering tiles. Water continues water, a forest continues, stone gets ore.

Which slots entered is read from the frame itself: the whole-tile shift that maps the
previous frame's view onto it (`model.scroll.scroll_labels`, the data's scrolls). A still
view has no entering slot and is left as the denoiser drew it. The draw takes the rollout's
generator, so a seed still fixes the rollout, and the filled frame is the finished frame: its
history input, its cache entry and what is handed out.

Dimensions: V the view's tiles (rows x columns), P patch (= tile) size, C channels, K codes,
D the head's width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dfserve.model.scroll import COPY_SHIFTS, scroll_labels


def view_tiles(frames: Tensor, patch: int, rows: int) -> Tensor:
    """(..., C, H, W) -> (..., V, P*P*C): the top `rows` tile rows, row-major, each tile's
    pixels in (y, x, channel) order."""
    *lead, C, _, W = frames.shape
    G = W // patch
    view = frames[..., : rows * patch, :].reshape(*lead, C, rows, patch, G, patch)
    n = len(lead)
    order = (*range(n), n + 1, n + 3, n + 2, n + 4, n)  # rows, cols, py, px, C
    return view.permute(order).reshape(*lead, rows * G, patch * patch * C)


def paste_tiles(frames: Tensor, tiles: Tensor, patch: int, rows: int) -> Tensor:
    """view_tiles' inverse: `frames` with its top `rows` tile rows taken from tiles."""
    *lead, C, _, W = frames.shape
    G = W // patch
    n = len(lead)
    grid = tiles.reshape(*lead, rows, G, patch, patch, C)
    order = (*range(n), n + 4, n, n + 2, n + 1, n + 3)  # C, rows, py, cols, px
    view = grid.permute(order).reshape(*lead, C, rows * patch, W)
    return torch.cat([view, frames[..., rows * patch :, :]], dim=-2)


def frame_scroll(previous: Tensor, frame: Tensor, patch: int, rows: int) -> int:
    """The index in COPY_SHIFTS of the whole-tile shift that best maps previous's view onto
    frame's, by the rule the scroll head's labels follow (a still or uniform view: 0)."""
    return int(scroll_labels(torch.stack([previous, frame])[None], patch, rows)[0, 1])


def entering_slots(scroll: int, rows: int, columns: int) -> Tensor:
    """(V,) bool: the view's tile slots that no tile of the previous view reaches when it moves
    by COPY_SHIFTS[scroll] (the view moved right: its left column entered)."""
    dy, dx = COPY_SHIFTS[scroll]
    slots = torch.zeros(rows, columns, dtype=torch.bool)
    if dy:
        slots[0 if dy > 0 else rows - 1, :] = True
    if dx:
        slots[:, 0 if dx > 0 else columns - 1] = True
    return slots.flatten()


def fit_codebook(tiles: Tensor, codes: int, iterations: int = 25, seed: int = 0) -> Tensor:
    """k-means (k-means++ seeding) of tiles (M, P*P*C) -> (codes, P*P*C) centroids."""
    gen = torch.Generator().manual_seed(seed)
    tiles = tiles.float()
    norms = tiles.pow(2).sum(-1)
    picks = [int(torch.randint(len(tiles), (1,), generator=gen))]
    nearest = (tiles - tiles[picks[0]]).pow(2).sum(-1)
    for _ in range(codes - 1):  # k-means++: far tiles are likelier next centres
        picks.append(int(torch.multinomial(nearest.clamp_min(1e-12), 1, generator=gen)))
        c = tiles[picks[-1]]  # |x - c|^2 as a matrix-vector product: no (M, E) temporary
        nearest = torch.minimum(nearest, norms - 2 * tiles @ c + c.pow(2).sum())
    centres = tiles[picks]
    for _ in range(iterations):
        assign = nearest_code(tiles, centres)
        sums = torch.zeros_like(centres).index_add_(0, assign, tiles)
        counts = torch.bincount(assign, minlength=codes)[:, None]
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
    return centres


def nearest_code(tiles: Tensor, centres: Tensor, block: int = 65536) -> Tensor:
    """(M, E) tiles -> (M,) index of the nearest centre (blocks keep the distances small)."""
    return torch.cat([torch.cdist(tiles[i : i + block], centres).argmin(-1)
                      for i in range(0, len(tiles), block)])  # fmt: skip


class EdgeFillHead(nn.Module):
    """Logits over the codebook for every tile slot of the view, from the view's tiles with
    the entering slots hidden behind a learnt mask token: a small transformer over the V
    slots with learnt positions (the edge, the neighbouring tiles and the rest of the view
    are all in reach of one attention)."""

    codebook: Tensor  # (K, P*P*C) the tiles the codes stand for, in network units

    def __init__(self, tile_dim: int, slots: int, codes: int, width: int = 96, depth: int = 3,
                 heads: int = 4):  # fmt: skip
        super().__init__()
        self.embed = nn.Linear(tile_dim, width)
        self.mask = nn.Parameter(torch.zeros(width))
        self.position = nn.Parameter(torch.randn(slots, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0,
                                           activation="gelu", batch_first=True,
                                           norm_first=True)  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, codes))
        self.register_buffer("codebook", torch.zeros(codes, tile_dim))

    def forward(self, tiles: Tensor, hidden: Tensor) -> Tensor:
        """tiles (B, V, P*P*C), hidden (B, V) bool -> logits (B, V, K)."""
        h = torch.where(hidden[..., None], self.mask, self.embed(tiles)) + self.position
        logits: Tensor = self.out(self.encoder(h))
        return logits


class EdgeFill(nn.Module):
    """The head with the view's geometry: fills the entering slots of a finished frame."""

    def __init__(self, patch: int, channels: int, rows: int, columns: int, codes: int):
        super().__init__()
        self.patch, self.rows, self.columns = patch, rows, columns
        self.head = EdgeFillHead(patch * patch * channels, rows * columns, codes)

    def fill(self, previous: Tensor, frame: Tensor, generator: torch.Generator) -> Tensor:
        """frame (C, R, R) with the tiles that entered since `previous` drawn from the head,
        or frame itself when its view did not scroll."""
        scroll = frame_scroll(previous, frame, self.patch, self.rows)
        if scroll == 0:
            return frame
        hidden = entering_slots(scroll, self.rows, self.columns).to(frame.device)
        tiles = view_tiles(frame, self.patch, self.rows)
        with torch.no_grad():  # the frame is the sampler's float32, the head the net's dtype
            logits = self.head(tiles[None].to(self.head.codebook.dtype), hidden[None])[0, hidden]
        probs = logits.double().softmax(-1)
        drawn = torch.multinomial(probs, 1, generator=generator)[:, 0]
        tiles = tiles.clone()
        tiles[hidden] = self.head.codebook[drawn].to(tiles.dtype)
        return paste_tiles(frame, tiles, self.patch, self.rows)
