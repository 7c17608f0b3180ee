"""The copy prior counted from data: which shifted copy of the previous frame each action gives.

With `copy_action_prior` the network adds a per-action bias to every pixel's copy-choice
logits (model.network.CausalVideoDiT.gated_copy). Learnt by gradient descent that bias moved
by ~0.01 in 250 steps (the crafter-cpu card): Adam moves a parameter by about one learning
rate per step, and only while the sign of its gradient agrees across batches, which it
rarely does because the network's own logits already decide the low-noise frames. But the
bias has a closed-form starting point in the data itself, so training starts from there.

For every training pair (frame t-1 -> frame t, with the action of frame t), each pixel
tells which choices would give it its value: the copies (`COPY_SHIFTS`, moved by whole
patches) that hold it, or "none" when no copy does (new content). Under a per-action
categorical p(choice | action) with uninformative network logits, a pixel's likelihood is
the summed probability of its set, and the maximum-likelihood p follows by EM over the sets
(flat ground, which every copy holds, cancels out). Its log is the bias the network starts
from: move_left puts its mass on the copy moved right and on the copy as it was (a blocked
step), noop on the copy as it was. The null action gets the pixels of all actions pooled.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from dfserve.model.data.shards import Episode
from dfserve.model.scroll import COPY_SHIFTS, shift_frames

MATCH_TOLERANCE = 2  # uint8 levels: a copy "has" a pixel's value within this (video codecs)
SMOOTHING = 1.0  # votes added to every choice of every action (no log 0)


def pixel_sets(before: Tensor, after: Tensor, patch: int) -> Tensor:
    """(B, H, W, C) uint8 pairs -> (B, 2^(K+1)) pixel counts per set of choices, the set as
    a bit mask (bit k: copy k holds the pixel; the last bit: none does)."""
    b = before.permute(0, 3, 1, 2).to(torch.int16)  # (B, C, H, W)
    a = after.permute(0, 3, 1, 2).to(torch.int16)
    code = torch.zeros(a.shape[0], *a.shape[2:], dtype=torch.int64)
    for k, (dy, dx) in enumerate(COPY_SHIFTS):
        holds = ((shift_frames(b, dy * patch, dx * patch) - a).abs() <= MATCH_TOLERANCE).all(1)
        code |= holds.long() << k
    code = torch.where(code == 0, 1 << len(COPY_SHIFTS), code)  # held by no copy: "none"
    sets = 1 << (len(COPY_SHIFTS) + 1)
    return torch.stack([torch.bincount(c.flatten(), minlength=sets) for c in code]).double()


def choice_distribution(set_counts: Tensor, iterations: int = 200) -> Tensor:
    """(S,) pixel counts per set mask -> the maximum-likelihood categorical over the K + 1
    choices (EM; the first iteration, from uniform, is the even split of each set)."""
    K1 = len(COPY_SHIFTS) + 1
    members = ((torch.arange(set_counts.shape[0])[:, None] >> torch.arange(K1)) & 1).double()
    p = torch.full((K1,), 1.0 / K1, dtype=torch.float64)
    for _ in range(iterations):
        share = members * p  # (S, K1): each set's pixels split by the current p
        share = share / share.sum(dim=1, keepdim=True).clamp_min(1e-300)
        p = (set_counts[:, None] * share).sum(0) + SMOOTHING
        p = p / p.sum()
    return p


def count_copy_prior(
    episodes: Sequence[Episode], n_actions: int, patch: int, pairs: int = 4000, seed: int = 0
) -> Tensor:
    """log p(choice | action) as a (n_actions + 1, K + 1) table, the last row the null
    action's, from up to `pairs` frame pairs drawn uniformly from the episodes."""
    rng = np.random.default_rng(seed)
    index = [(e, t) for e in range(len(episodes)) for t in range(1, len(episodes[e]))]
    chosen = rng.choice(len(index), size=min(pairs, len(index)), replace=False)
    counts = torch.zeros(n_actions + 1, 1 << (len(COPY_SHIFTS) + 1), dtype=torch.float64)
    for start in range(0, len(chosen), 256):
        batch = [index[i] for i in chosen[start : start + 256]]
        before = torch.from_numpy(np.stack([episodes[e].frames[t - 1] for e, t in batch]))
        after = torch.from_numpy(np.stack([episodes[e].frames[t] for e, t in batch]))
        actions = torch.tensor([int(episodes[e].actions[t]) for e, t in batch])
        sets = pixel_sets(before, after, patch)
        known = (actions >= 0) & (actions < n_actions)
        counts.index_add_(0, actions[known], sets[known])
        counts[n_actions] += sets.sum(dim=0)
    return torch.stack([choice_distribution(c) for c in counts]).log().float()
