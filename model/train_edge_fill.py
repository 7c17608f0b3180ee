"""Training the edge fill (model.edge_fill) of a trained bundle: the denoiser stays as it is.

The head needs no noise and no rollout: any real frame with one edge row or column hidden is
a case of "what entered here", whether or not that frame scrolled (the rest of the view says
as much either way). So a run fits the codebook (k-means of the training frames' world
tiles), labels every tile with its nearest code, and trains the head by cross-entropy on
hidden edges of random frames, bounded by wall-clock minutes. Held-out frames report the
head's loss next to the codebook's plain frequencies' (what a head that ignores the view
would reach), so one sees that the view is used.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dfserve.model.bundle import build_network, load_bundle, save_bundle, with_card_block
from dfserve.model.config import BundleConfig
from dfserve.model.data.shards import Episode, load_episodes
from dfserve.model.edge_fill import (
    EdgeFill,
    entering_slots,
    fit_codebook,
    nearest_code,
    view_tiles,
)
from dfserve.model.scroll import COPY_SHIFTS

CODEBOOK_SAMPLE = 60_000  # world tiles the k-means sees (of ~1.5 M in 128 episodes)


def frames_tiles(episodes: list[Episode], patch: int, rows: int, scale: float, shift: float
                 ) -> Tensor:  # fmt: skip
    """Every frame's view tiles, (M, V, P*P*C) float16 in network units."""
    out = []
    for e in episodes:
        x = torch.from_numpy(np.array(e.frames)).permute(0, 3, 1, 2).float() / scale + shift
        out.append(view_tiles(x, patch, rows).half())
    return torch.cat(out)


def edge_batch(tiles: Tensor, labels: Tensor, size: int, rows: int, columns: int,
               gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """`size` random frames, each with one random edge hidden (the slots that enter on one of
    the four scrolls): tiles (B, V, E), hidden (B, V), labels (B, V)."""
    pick = torch.randint(len(tiles), (size,), generator=gen)
    scrolls = torch.randint(1, len(COPY_SHIFTS), (size,), generator=gen)
    hidden = torch.stack([entering_slots(int(s), rows, columns) for s in scrolls])
    return tiles[pick].float(), hidden, labels[pick]


def edge_loss(fill: EdgeFill, tiles: Tensor, hidden: Tensor, labels: Tensor) -> Tensor:
    logits = fill.head(tiles, hidden)
    return nn.functional.cross_entropy(logits[hidden], labels[hidden])


def heldout_report(fill: EdgeFill, tiles: Tensor, labels: Tensor, frequencies: Tensor
                   ) -> dict[str, float]:  # fmt: skip
    """Mean cross-entropy (nats) and top-1 accuracy over every edge of the held-out frames,
    and the cross-entropy of the codebook's training frequencies alone."""
    losses, hits, count = [], 0, 0
    with torch.no_grad():
        for s in range(1, len(COPY_SHIFTS)):
            hidden = entering_slots(s, fill.rows, fill.columns)
            for i in range(0, len(tiles), 256):
                t, y = tiles[i : i + 256].float(), labels[i : i + 256]
                h = hidden.expand(len(t), -1)
                logits = fill.head(t, h)[h]
                losses.append(nn.functional.cross_entropy(logits, y[h], reduction="sum"))
                hits += int((logits.argmax(-1) == y[h]).sum())
                count += int(h.sum())
    edge_labels = torch.cat([labels[:, entering_slots(s, fill.rows, fill.columns)].flatten()
                             for s in range(1, len(COPY_SHIFTS))])  # fmt: skip
    unigram = float(-frequencies[edge_labels].log().mean())
    return {"cross_entropy": float(sum(losses)) / count, "accuracy": hits / count,
            "frequencies_cross_entropy": unigram}  # fmt: skip


EDGE_FILL_START, EDGE_FILL_END = "<!-- edge-fill:start -->", "<!-- edge-fill:end -->"


def card_section(summary: dict[str, Any]) -> str:
    """The model card's lines on the edge fill, from a run's summary."""
    lines = [f"Edge fill (`model/edge_fill.py`): the tiles entering a scrolled view are drawn "
             f"from a codebook of {summary['codes']} of the data's tiles; its head trained "
             f"{summary['total_steps']} steps in all (this run: {summary['steps']} steps of "
             f"{summary['batch']} frames, {summary['elapsed_s'] / 60:.1f} min, on "
             f"{summary['train_frames']} frames of {summary['data']})."]  # fmt: skip
    if "heldout" in summary:
        h = summary["heldout"]
        lines.append(f"On held-out frames it names the entering tile's code in "
                     f"{h['accuracy']:.1%} of cases, {h['bits_saved_per_tile']:.1f} bits a tile "
                     f"better than the codes' frequencies.")  # fmt: skip
    return "\n\n".join(lines)


def _previous_run(bundle_dir: Path) -> dict[str, Any]:
    """The edge_fill.json of a bundle whose edge fill is trained further (without it: {})."""
    path = bundle_dir / "edge_fill.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def train_edge_fill(config: BundleConfig, init: Path, data: Path, out: Path,
                    heldout: Path | None = None, minutes: float = 10.0,
                    steps_limit: int | None = None, batch: int = 64, lr: float = 1e-3,
                    seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """`config`'s edge fill trained on `data` (for `minutes`, or `steps_limit` steps if
    that comes first) for the denoiser of the bundle at `init` (whose
    network must be config's but for the edge fill and the copy decision), written to `out`:
    a copy of init's folder (card, examples, pictures) with config's network, the weights
    and an edge_fill.json of this run."""
    bundle = load_bundle(init)
    net_cfg = config.network
    codes = net_cfg.edge_fill_codes
    if not codes:
        raise ValueError(f"--edge-fill: {config.name} has no edge fill (edge_fill_codes 0)")
    theirs = replace(bundle.config.network, edge_fill_codes=codes,
                     exact_copy_above=net_cfg.exact_copy_above)  # fmt: skip
    if theirs != net_cfg:
        raise ValueError(f"--init {init}: its network differs from {config.name}'s in more "
                         "than the edge fill; the edge fill trains on that exact denoiser")
    config = replace(bundle.config, name=config.name, network=net_cfg)
    network = build_network(config)
    missing, unexpected = network.load_state_dict(bundle.network.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("edge_fill.") for k in missing), missing
    fill = network.edge_fill
    assert fill is not None
    P, rows, d = net_cfg.patch_size, net_cfg.scroll_rows, bundle.config.data
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    start = time.monotonic()
    tiles = frames_tiles(load_episodes(data), P, rows, d.pixel_scale, d.pixel_shift)
    flat = tiles.flatten(0, 1)
    before = _previous_run(Path(init)) if not missing else None
    if before is None:  # a new edge fill; an init that has one continues with its codebook
        sample = flat[torch.randperm(len(flat), generator=gen)[:CODEBOOK_SAMPLE]]
        fill.head.codebook.copy_(fit_codebook(sample, codes, seed=seed))
    labels = nearest_code(flat.float(), fill.head.codebook).view(tiles.shape[:2])
    frequencies = (torch.bincount(labels.flatten(), minlength=codes).double() + 1) / (
        labels.numel() + codes)
    opt = torch.optim.AdamW(fill.head.parameters(), lr=lr, weight_decay=0.01)
    steps, losses = 0, []
    while time.monotonic() - start < minutes * 60 and steps != steps_limit:
        for g in opt.param_groups:  # warmup, then constant
            g["lr"] = lr * min(1.0, (steps + 1) / 100)
        loss = edge_loss(fill, *edge_batch(tiles, labels, batch, rows, fill.columns, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        steps += 1
    earlier_steps = 0 if before is None else int(before.get("total_steps", 0))
    summary: dict[str, Any] = {
        "init": str(init), "data": str(data), "codes": codes, "steps": steps,
        "batch": batch, "lr": lr, "seed": seed, "elapsed_s": round(time.monotonic() - start, 1),
        "train_frames": len(tiles), "final_loss": float(np.mean(losses[-50:])),
        "total_steps": steps + earlier_steps,
        "warm_start": None if before is None else {"from": str(init), "steps": earlier_steps},
    }  # fmt: skip
    if heldout is not None:
        h_tiles = frames_tiles(load_episodes(heldout), P, rows, d.pixel_scale, d.pixel_shift)
        h_labels = nearest_code(h_tiles.flatten(0, 1).float(), fill.head.codebook)
        summary["heldout"] = heldout_report(fill, h_tiles, h_labels.view(h_tiles.shape[:2]),
                                            frequencies)  # fmt: skip
        summary["heldout"]["bits_saved_per_tile"] = (
            summary["heldout"]["frequencies_cross_entropy"]
            - summary["heldout"]["cross_entropy"]) / math.log(2)  # fmt: skip
    if out.resolve() != Path(init).resolve():
        shutil.copytree(init, out, dirs_exist_ok=True)
    card = (Path(init) / "README.md").read_text() if (Path(init) / "README.md").is_file() else ""
    card = with_card_block(card, EDGE_FILL_START, EDGE_FILL_END, card_section(summary),
                           "Edge fill")  # fmt: skip
    save_bundle(out, config, network.eval(), card)
    (out / "edge_fill.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
