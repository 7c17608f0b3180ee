"""Training: the diffusion-forcing objective (and teacher forcing, for the comparison).

Dimensions: B windows in a batch, A frames of a window (= n_frames), C channels, R resolution.

Diffusion forcing (Chen et al. 2024): every frame of a window draws its own noise level
uniformly in [0, T-1], and the causal network denoises all of them at once; at sampling time
any per-frame schedule (pyramid, autoregressive, ...) is then in distribution. The loss is the
v-objective (or whatever `diffusion.objective` says) with DF's fused min-SNR-gamma weighting
(Hang et al. 2023, fused over the history as in DF v1, see `loss_weights`) expressed for that
objective: the x0-MSE weight min(SNR, gamma) becomes min(SNR, gamma) / (SNR + 1) for v and
min(SNR, gamma) / SNR for eps.

History guidance (DFoT) needs two kinds of dropout so one network also learns the
unconditional branch: action dropout (a whole window's actions become the null action) and
history dropout (the frames before a random split point go to level T-1 with null actions,
exactly what the rollout engine's unconditional branch feeds the network).

Teacher forcing (the baseline): frames before a random split point s in [1, A-1] are clean
(level -1, no loss); every frame from s on shares one level k ~ U[0, T-1]. With block-causal
attention this is next-frame(s) prediction from clean history, as in the DF paper's baseline;
its rollouts are in distribution with the autoregressive or full_sequence schedule and clean
(context_noise -1) history.

Checkpoints are `torch.save` of plain tensors, numbers and strings only, and are read back with
`weights_only=True` (never arbitrary pickle): model, EMA, optimizer, step, both RNG states.
Resuming from one is bit-exact (a test). The bundle stores the EMA weights.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor

from dfserve.model.bundle import build_network, save_bundle, save_example
from dfserve.model.config import BundleConfig, NetworkConfig, TrainConfig, preset, train_preset
from dfserve.model.data.shards import NO_ACTION, Episode, load_episodes, load_meta, random_windows
from dfserve.model.diffusion import NoiseSchedule
from dfserve.model.hardware import hardware
from dfserve.model.network import CausalVideoDiT
from dfserve.model.scroll import scroll_labels, scroll_loss

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
LOG_FILE = "log.csv"
EXAMPLE_CONTEXT, EXAMPLE_ACTIONS, EXAMPLE_START = 4, 32, 20


# --- the objective ----------------------------------------------------------------------------


def sample_levels(
    objective: str, batch: int, frames: int, timesteps: int, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Noise levels (B, A) and the loss mask (B, A) of one batch (module docstring)."""
    if objective == "diffusion_forcing":
        levels = torch.randint(0, timesteps, (batch, frames), generator=gen)
        return levels, torch.ones(batch, frames, dtype=torch.bool)
    if objective == "teacher_forcing":
        if frames < 2:
            raise ValueError("teacher_forcing needs windows of at least 2 frames")
        split = torch.randint(1, frames, (batch, 1), generator=gen)  # first noisy frame
        level = torch.randint(0, timesteps, (batch, 1), generator=gen)
        noisy = torch.arange(frames)[None, :] >= split  # (B, A)
        return torch.where(noisy, level, -1), noisy
    raise ValueError(f"objective: {objective!r} is not diffusion_forcing or teacher_forcing")


def apply_clean_history(
    levels: Tensor, probability: float, max_level: int, gen: torch.Generator
) -> Tensor:
    """With `probability` per window, the frames before a random split point get levels in
    [-1, max_level] (clean up to the context-noise level): the case the sampler meets at
    every chunk, next frames predicted from a visible history. Under uniform DF levels it
    is rare (a noisy frame, level >= 500, right after a frame at level <= 100 is 4.4% of
    frames), yet it is where the action decides the frame; mixing it in puts the training
    signal where the actions matter."""
    if probability <= 0:
        return levels  # draws nothing: runs without it keep their random streams
    B, A = levels.shape
    chosen = torch.rand(B, generator=gen) < probability
    split = torch.randint(1, max(A, 2), (B, 1), generator=gen)
    low = torch.randint(-1, max_level + 1, (B, A), generator=gen)
    history = (torch.arange(A)[None, :] < split) & chosen[:, None]  # (B, A)
    return torch.where(history, low, levels)


def apply_clean_frames(
    levels: Tensor, probability: float, max_level: int, gen: torch.Generator
) -> Tensor:
    """With `probability` per frame, independently, the frame gets a level in [-1, max_level]
    instead of its uniform one. A frame after a clean one is then common at every level of its
    own (probability x (1 - probability)), where a clean prefix gives only the frame at its
    split: that is the case in which the scroll head's copy is exact and the gate must learn
    to open (the sampler's last step of every frame sees a finished previous frame)."""
    if probability <= 0:
        return levels  # draws nothing: runs without it keep their random streams
    clean = torch.rand(levels.shape, generator=gen) < probability
    low = torch.randint(-1, max_level + 1, levels.shape, generator=gen)
    return torch.where(clean, low, levels)


def apply_dropout(
    levels: Tensor,
    actions: Tensor,
    mask: Tensor,
    cfg: TrainConfig,
    timesteps: int,
    null_action: int,
    gen: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    """Action dropout (whole window) and history dropout (frames before a split -> T-1)."""
    B, A = levels.shape
    drop_actions = torch.rand(B, generator=gen) < cfg.action_dropout
    drop_history = torch.rand(B, generator=gen) < cfg.history_dropout
    split = torch.randint(1, max(A, 2), (B, 1), generator=gen)
    history = (torch.arange(A)[None, :] < split) & drop_history[:, None]  # (B, A)
    levels = torch.where(history, timesteps - 1, levels)
    nulled = drop_actions[:, None] | history
    actions = torch.where(nulled, null_action, actions)
    # a dropped history frame is pure noise: nothing to learn from it, keep it out of the loss
    return levels, actions, mask & ~history


def loss_weights(ns: NoiseSchedule, levels: Tensor, gamma: float, decay: float) -> Tensor:
    """Fused min-SNR-gamma weight per frame (B, A), in the configured objective's terms.

    Diffusion forcing v1's "fused" min-SNR (as in the DF / DFoT references): a frame's SNR is
    fused with a decayed running mean of the (clipped, normalised) SNR of the frames before it,
    because a causal model also learns about frame t from how clean its history is. A pure
    noise frame after clean history thus keeps a real weight (next-frame prediction), where
    plain min-SNR would give it ~0. decay = 0 gives plain min-SNR-gamma.
    """
    ab = ns.alpha_bar(levels)  # float64 (B, A)
    snr = (ab / (1 - ab).clamp_min(1e-20)).clamp(max=1e12)  # clean frames: huge, not inf
    norm_clipped, norm = snr.clamp(max=gamma) / gamma, snr / gamma
    cum = torch.zeros_like(snr)  # running mean over the frames *before* t
    running = norm_clipped[:, 0]
    for t in range(1, levels.shape[1]):
        cum[:, t] = running
        running = decay * running + (1 - decay) * norm_clipped[:, t]
    keep = 1 - cum * decay
    clipped_fused = (1 - keep * (1 - norm_clipped)) * gamma
    fused = (1 - keep * (1 - norm)) * gamma
    eps_weight = clipped_fused / fused.clamp_min(1e-8)
    objective = ns.cfg.objective
    if objective == "v":
        w = eps_weight * fused / (fused + 1)
    elif objective == "x0":
        w = eps_weight * fused
    else:
        w = eps_weight
    return torch.where(levels < 0, 0.0, w).float()  # clean frames carry no loss


# The scroll head's cross-entropy beside the denoising loss. The head shares no weights with
# the denoiser, so under Adam the weight only matters through the global gradient-norm clip;
# small, so the head's early gradients do not clip the denoiser's.
SCROLL_LOSS_WEIGHT = 0.1


# How close (in [-1, 1] pixel units, every channel) the offered copy must be to the frame for
# the gate to be taught to take it: 3 standard deviations of the noise at the context level 15
# of the cosine schedule (0.036), so a near-clean previous frame counts as exact and a noisy
# one does not.
GATE_EXACT = 0.1


def gate_targets(copy: Tensor, x0: Tensor) -> Tensor:
    """(B, A, C, R, R) copy and frames -> (B, A, R, R) 1.0 where the copy is exact."""
    return ((copy - x0).abs().amax(dim=2) < GATE_EXACT).float()


def gate_loss(gate_logits: Tensor, copy: Tensor, x0: Tensor, mask: Tensor) -> Tensor:
    """Per-pixel cross-entropy of the copy gate (logits (B, A, C, R, R), shared by channels)
    against where its copy is exact, over the frames of `mask` (B, A) that have a previous
    frame in the window (t >= 1)."""
    keep = mask.clone()
    keep[:, 0] = False
    if not keep.any():
        return gate_logits.sum() * 0.0
    logits = gate_logits[:, :, 0][keep].float()
    return torch.nn.functional.binary_cross_entropy_with_logits(
        logits, gate_targets(copy, x0)[keep])


def diffusion_loss(
    net: CausalVideoDiT,
    ns: NoiseSchedule,
    x0: Tensor,
    actions: Tensor,
    cfg: TrainConfig,
    gen: torch.Generator,
    autocast: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """x0 (B, A, C, R, R) in [-1, 1], actions (B, A) -> weighted loss and what was drawn."""
    B, A = actions.shape
    T = ns.timesteps
    levels, mask = sample_levels(cfg.objective, B, A, T, gen)
    levels = apply_clean_history(levels, cfg.clean_history, cfg.clean_history_level, gen)
    if cfg.objective == "diffusion_forcing":  # TF's levels are its own (one per window)
        levels = apply_clean_frames(levels, cfg.clean_frames, cfg.clean_history_level, gen)
    levels, actions_in, mask = apply_dropout(
        levels, actions.cpu(), mask, cfg, T, net.null_action, gen
    )
    clip = ns.cfg.clip_noise
    noise = torch.randn(x0.shape, generator=gen).clamp_(-clip, clip).to(x0.device)
    levels, mask, actions_in = levels.to(x0.device), mask.to(x0.device), actions_in.to(x0.device)
    x = ns.q_sample(x0, levels, noise)
    target = ns.target(x0, noise, levels)
    positions = torch.arange(A, device=x0.device).expand(B, A)
    rows = net.cfg.scroll_rows
    # the denoiser copies the data's own scroll; the head learns to predict it (model.scroll)
    scrolls = scroll_labels(x0, net.cfg.patch_size, rows) if rows else None
    gates: list[Tensor] | None = [] if cfg.gate_loss else None
    with torch.autocast(x0.device.type, torch.bfloat16, enabled=autocast):
        out, _, _ = net(x, levels, actions_in, positions, scrolls=scrolls, gates=gates)
    per_frame = (out.float() - target).pow(2).mean(dim=(2, 3, 4))  # (B, A)
    weights = loss_weights(ns, levels, cfg.min_snr_gamma, cfg.cum_snr_decay) * mask
    loss = (per_frame * weights).sum() / mask.sum().clamp_min(1)
    drawn = {"levels": levels, "mask": mask, "actions": actions_in}
    if gates:  # with copy_gate and gate_loss: [logits, copy]
        loss = loss + cfg.gate_loss * gate_loss(gates[0], gates[1], x0, mask)
    if scrolls is not None:
        logits = net.scroll_logits(x, levels, actions_in).float()
        loss = loss + SCROLL_LOSS_WEIGHT * scroll_loss(logits, scrolls, mask)
        drawn["scrolls"] = scrolls
    return loss, drawn


def scroll_head_loss(
    net: CausalVideoDiT, ns: NoiseSchedule, x0: Tensor, actions: Tensor, cfg: TrainConfig,
    gen: torch.Generator,
) -> Tensor:  # fmt: skip
    """The scroll head's cross-entropy on extra frame pairs x0 (B, 2, C, R, R): the previous
    frame noised as diffusion_loss noises a window's frames (DF levels, clean history mixed
    in), the scroll of the second frame as the label. The head shares no weights with the
    denoiser, so these pairs cost only the head's small forward pass, for the second frame
    alone (the first has no previous frame)."""
    B, A = actions.shape
    levels, _ = sample_levels("diffusion_forcing", B, A, ns.timesteps, gen)
    levels = apply_clean_history(levels, cfg.clean_history, cfg.clean_history_level, gen)
    levels = apply_clean_frames(levels, cfg.clean_frames, cfg.clean_history_level, gen)
    noise = torch.randn(x0.shape, generator=gen).clamp_(-ns.cfg.clip_noise, ns.cfg.clip_noise)
    levels = levels.to(x0.device)
    x = ns.q_sample(x0, levels, noise.to(x0.device))
    labels = scroll_labels(x0, net.cfg.patch_size, net.cfg.scroll_rows)[:, 1]
    logits = net.scroll_logits(x[:, 1:], levels[:, 1:], actions[:, 1:], before=x[:, 0],
                               before_level=levels[:, 0]).float()  # fmt: skip
    return torch.nn.functional.cross_entropy(logits[:, 0], labels)


# --- how much the loss depends on the action -------------------------------------------------

OPPOSITE_MOVES = {"move_left": "move_right", "move_right": "move_left",
                  "move_up": "move_down", "move_down": "move_up"}  # fmt: skip


@dataclass(frozen=True)
class ActionProbe:
    """Fixed held-out windows whose last frame follows a move, with that move reversed.

    The diagnostic of the default-world issue: if the network used the action, predicting the
    last frame from clean history with the opposite move must cost more than with the true
    one. `action_gain` = loss(reversed) / loss(true) - 1; 0 means the action is ignored."""

    x0: Tensor  # (B, A, C, R, R)
    actions: Tensor  # (B, A) true
    reversed_actions: Tensor  # (B, A) the last one replaced by the opposite move

    def to(self, device: torch.device) -> ActionProbe:
        return ActionProbe(*(t.to(device) for t in (self.x0, self.actions, self.reversed_actions)))


def action_probe(
    config: BundleConfig, episodes: list[Episode], windows: int = 48, seed: int = 0
) -> ActionProbe | None:
    names = config.data.action_names
    opposite = {names.index(a): names.index(b) for a, b in OPPOSITE_MOVES.items() if a in names}
    if not opposite:
        return None
    A, rng = config.data.n_frames, np.random.default_rng(seed)
    frames: list[np.ndarray] = []
    actions: list[np.ndarray] = []
    for _ in range(windows * 50):
        if len(frames) == windows:
            break
        ep = episodes[int(rng.integers(len(episodes)))]
        if len(ep) < A + 1:
            continue
        s = int(rng.integers(1, len(ep) - A + 1))
        last = int(ep.actions[s + A - 1])
        changed = not np.array_equal(ep.frames[s + A - 2], ep.frames[s + A - 1])
        if last in opposite and changed:
            frames.append(ep.frames[s : s + A])
            actions.append(ep.actions[s : s + A])
    if not frames:
        return None
    x0 = torch.from_numpy(np.stack(frames)).permute(0, 1, 4, 2, 3).float()  # (B, A, C, R, R)
    x0 = x0 / config.data.pixel_scale + config.data.pixel_shift
    true = torch.from_numpy(np.stack(actions))
    reversed_ = true.clone()
    reversed_[:, -1] = torch.tensor([opposite[int(a)] for a in true[:, -1]])
    return ActionProbe(x0, true, reversed_)


@torch.no_grad()
def action_gain(
    net: CausalVideoDiT, ns: NoiseSchedule, probe: ActionProbe, history_level: int = 15
) -> float:
    """loss(reversed last action) / loss(true) - 1, for the last frame predicted from pure
    noise (level T-1) after history at the context level."""
    B, A = probe.actions.shape
    levels = torch.full((B, A), history_level)
    levels[:, -1] = ns.timesteps - 1
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(probe.x0.shape, generator=gen)
    x = ns.q_sample(probe.x0, levels, noise)
    positions = torch.arange(A).expand(B, A)
    losses = []
    for actions in (probe.actions, probe.reversed_actions):
        out, _, _ = net(x, levels, actions, positions)
        x0_hat = ns.to_x0(out[:, -1], x[:, -1], levels[:, -1])
        losses.append(float((x0_hat - probe.x0[:, -1]).pow(2).mean()))
    return losses[1] / max(losses[0], 1e-12) - 1


# --- the trainer ------------------------------------------------------------------------------


@dataclass
class TrainProgress:
    step: int = 0
    samples: int = 0
    elapsed: float = 0.0  # seconds of training, summed over resumes


class Trainer:
    """Model, EMA, optimizer and RNGs; `step()` is one optimizer step on a batch."""

    def __init__(
        self,
        config: BundleConfig,
        train: TrainConfig,
        episodes: list[Episode] | None = None,
        device: str | torch.device = "cpu",
        total_steps: int | None = None,
    ):
        train.validate()
        if config.data.n_frames != config.network.max_frames:
            raise ValueError("data.n_frames must equal network.max_frames")
        self.config, self.train, self.episodes = config, train, episodes or []
        self.device = torch.device(device)
        self.total_steps = total_steps
        torch.manual_seed(train.seed)  # weight init
        self.net = build_network(config).to(self.device)
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.ns = NoiseSchedule(config.diffusion)
        decay = [p for p in self.net.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.net.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": train.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=train.lr, betas=train.betas,
        )  # fmt: skip
        self.gen = torch.Generator().manual_seed(train.seed + 1)  # levels, noise, dropout
        self.rng = np.random.default_rng(train.seed + 2)  # which windows
        self.progress = TrainProgress()
        cuda = self.device.type == "cuda"
        self.autocast = cuda  # bf16 only pays off on GPUs; CPU stays fp32
        self.forward_net: Any = torch.compile(self.net) if cuda else self.net

    @property
    def null_action(self) -> int:
        return self.net.null_action

    def lr_at(self, step: int) -> float:
        """Linear warmup, then cosine to min_lr_ratio when the step budget is known."""
        t = self.train
        lr = t.lr * min(1.0, (step + 1) / max(1, t.warmup_steps))
        if self.total_steps and step >= t.warmup_steps:
            span = max(1, self.total_steps - t.warmup_steps)
            frac = min(1.0, (step - t.warmup_steps) / span)
            lr *= t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
        return lr

    def next_batch(self, n_frames: int | None = None, batch: int | None = None
                   ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """A random batch of windows: x0 (B, A, C, R, R) in [-1, 1], actions (B, A); by
        default batch_size windows of n_frames."""
        frames, actions = random_windows(
            self.episodes, n_frames or self.config.data.n_frames, batch or self.train.batch_size,
            self.rng, null_action=self.null_action,
        )  # fmt: skip
        x0 = torch.from_numpy(frames).to(self.device).permute(0, 1, 4, 2, 3)  # (B, A, C, R, R)
        x0 = x0.float() / self.config.data.pixel_scale + self.config.data.pixel_shift
        return x0.contiguous(), torch.from_numpy(actions).to(self.device)

    def step(self, x0: Tensor | None = None, actions: Tensor | None = None) -> float:
        """One optimizer step (on a fresh batch unless one is given); returns the loss."""
        if x0 is None or actions is None:
            x0, actions = self.next_batch()
        lr = self.lr_at(self.progress.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.net.train()
        loss, _ = diffusion_loss(
            self.forward_net, self.ns, x0, actions, self.train, self.gen, self.autocast
        )
        if self.train.scroll_batch and self.net.scroll_head is not None:
            pairs, pair_actions = self.next_batch(n_frames=2, batch=self.train.scroll_batch)
            loss = loss + SCROLL_LOSS_WEIGHT * scroll_head_loss(
                self.net, self.ns, pairs, pair_actions, self.train, self.gen
            )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.train.grad_clip)
        self.opt.step()
        self._update_ema()
        self.progress.step += 1
        self.progress.samples += len(x0)
        return float(loss.detach())

    @torch.no_grad()
    def _update_ema(self) -> None:
        # warm EMA (as in many DiT codebases): short runs must not ship the initial weights
        step = self.progress.step
        decay = min(self.train.ema_decay, (1 + step) / (10 + step))
        for e, p in zip(self.ema.parameters(), self.net.parameters(), strict=True):
            e.lerp_(p.detach(), 1 - decay)

    # --- checkpoints ----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Plain tensors, numbers and strings only: loadable with weights_only=True."""
        return {
            "model": self.net.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.opt.state_dict(),
            "torch_rng": self.gen.get_state(),
            "numpy_rng": json.dumps(self.rng.bit_generator.state),
            "progress": json.dumps(asdict(self.progress)),
            "bundle_config": json.dumps(self.config.to_dict()),
            "train_config": json.dumps(asdict(self.train)),
        }

    def save_checkpoint(self, run_dir: Path) -> Path:
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / CHECKPOINT
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(self.state(), tmp)
        os.replace(tmp, path)  # a crash never leaves a half-written checkpoint
        return path

    def warm_start(self, bundle_dir: Path) -> None:
        """Start from a shipped bundle's weights (model and EMA); the optimizer starts fresh."""
        from dfserve.model.bundle import load_bundle

        bundle = load_bundle(bundle_dir)
        # convex_copy changes how the output is formed, not the weights: a warm start may
        # switch it on from a bundle trained without it. The denoiser of a bundle with an edge
        # fill (the shipped default) is a denoiser like any other: the edge fill, trained on
        # its own (model.train_edge_fill), and the sampling-time copy decision are left out.
        ours = self.config.network
        theirs = replace(bundle.config.network, convex_copy=ours.convex_copy,
                         edge_fill_codes=ours.edge_fill_codes,
                         exact_copy_above=ours.exact_copy_above)  # fmt: skip
        if theirs != ours:
            raise ValueError(f"--init {bundle_dir}: its network config differs from "
                             f"{self.config.name}'s; warm starts need the same architecture")
        state = {k: v for k, v in bundle.network.state_dict().items()
                 if not k.startswith("edge_fill.")}  # fmt: skip
        self.net.load_state_dict(state)
        self.ema.load_state_dict(state)

    @torch.no_grad()
    def count_copy_prior(self) -> None:
        """A fresh run's copy prior starts from the training data's counts (model.copy_prior)."""
        from dfserve.model.copy_prior import count_copy_prior

        cfg = self.config.network
        prior = count_copy_prior(self.episodes, cfg.n_actions, cfg.patch_size, seed=self.train.seed)
        for net in (self.net, self.ema):
            assert net.copy_prior is not None
            net.copy_prior.weight.copy_(prior.to(self.device))
        moves = {a: prior[i].exp().numpy().round(2).tolist()
                 for i, a in enumerate(self.config.data.action_names) if a.startswith("move_")}
        log.info("copy prior counted from the data, p(choice | move): %s", moves)

    def load_checkpoint(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=True)
        saved = BundleConfig.from_dict(json.loads(state["bundle_config"]))
        if saved != self.config:
            raise ValueError(f"checkpoint {path}: written for another model config; "
                             "use a new --run-dir or the same --config")  # fmt: skip
        saved_train = json.loads(state["train_config"])
        if saved_train["objective"] != self.train.objective:
            raise ValueError(f"checkpoint {path}: objective {saved_train['objective']!r}, "
                             f"not {self.train.objective!r}; use a new --run-dir")  # fmt: skip
        self.net.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.gen.set_state(state["torch_rng"])
        self.rng.bit_generator.state = json.loads(state["numpy_rng"])
        self.progress = TrainProgress(**json.loads(state["progress"]))


# --- the command --------------------------------------------------------------------------


def train_from_cli(args: argparse.Namespace) -> int:
    bundle_config = preset(args.config)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if getattr(args, "edge_fill", False):
        return _train_edge_fill_from_cli(bundle_config, args)
    if bundle_config.network.edge_fill_codes:
        raise ValueError(f"--config {args.config}: its edge fill is trained after its denoiser, "
                         "on its own: train the denoiser (crafter-cpu-gated for crafter-cpu), "
                         f"then --config {args.config} --edge-fill --init THAT_BUNDLE")
    train = train_preset(args.config) if args.config in _train_presets() else TrainConfig()
    train = replace(train, objective=args.objective)
    if args.batch_size:
        train = replace(train, batch_size=args.batch_size)
    if getattr(args, "lr", None):
        train = replace(train, lr=args.lr)
    if getattr(args, "seed", None) is not None:
        train = replace(train, seed=args.seed)
    if getattr(args, "clean_history", None) is not None:
        train = replace(train, clean_history=args.clean_history)
    if getattr(args, "min_lr_ratio", None) is not None:
        train = replace(train, min_lr_ratio=args.min_lr_ratio)
    if getattr(args, "gate_loss", None) is not None:
        train = replace(train, gate_loss=args.gate_loss)
    if args.minutes is None and args.steps is None:
        raise ValueError("give a budget: --minutes and/or --steps")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    run_dir = args.run_dir or args.out.with_name(args.out.name + ".run")
    result = run_training(
        bundle_config, train, args.data, args.out, run_dir, args.heldout, device,
        steps=args.steps, minutes=args.minutes, init=args.init,
    )  # fmt: skip
    print(f"bundle written to {result['bundle']} after {result['steps']} steps "  # noqa: T201
          f"({result['elapsed_s'] / 60:.1f} min, {result['samples']} samples)")  # fmt: skip
    return 0


def _train_edge_fill_from_cli(config: BundleConfig, args: argparse.Namespace) -> int:
    from dfserve.model.train_edge_fill import train_edge_fill

    if args.init is None:
        raise ValueError("--edge-fill: give the trained denoiser to add it to with --init")
    if args.minutes is None:
        raise ValueError("--edge-fill: give its budget with --minutes")
    summary = train_edge_fill(config, args.init, args.data, args.out, args.heldout,
                              args.minutes, args.steps, seed=args.seed or 0)  # fmt: skip
    print(f"bundle written to {args.out}: an edge fill of {summary['codes']} codes after "  # noqa: T201
          f"{summary['steps']} steps; held-out {summary.get('heldout')}")  # fmt: skip
    return 0


def _train_presets() -> set[str]:
    from dfserve.model.config import TRAIN_PRESETS

    return set(TRAIN_PRESETS)


def run_training(
    config: BundleConfig,
    train: TrainConfig,
    data: Path,
    out: Path,
    run_dir: Path,
    heldout: Path | None = None,
    device: str = "cpu",
    steps: int | None = None,
    minutes: float | None = None,
    progress_bar: bool = True,
    init: Path | None = None,
) -> dict[str, Any]:
    """Train until the step or wall-clock budget (both cumulative over resumes), checkpoint
    along the way, then write the bundle. Returns a summary (also saved as summary.json).

    A run resumes from run_dir's checkpoint when there is one; otherwise `init` (a bundle)
    gives the starting weights. With held-out data, the action gain (`action_gain`) of the
    EMA weights is logged every 5 log rows, so one sees whether the actions are being used."""
    _check_dataset_actions(config, load_meta(data))
    episodes = [e for e in load_episodes(data) if len(e) >= config.data.n_frames]
    if not episodes:
        raise ValueError(f"data: {data} has no episode of {config.data.n_frames} frames")
    trainer = Trainer(config, train, episodes, device, total_steps=steps)
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / CHECKPOINT).is_file():
        trainer.load_checkpoint(run_dir / CHECKPOINT)
        log.info("resumed from %s at step %d", run_dir / CHECKPOINT, trainer.progress.step)
    elif init is not None:
        trainer.warm_start(init)
        log.info("warm start from the bundle %s", init)
    elif config.network.copy_action_prior:
        trainer.count_copy_prior()
    probe = action_probe(config, load_episodes(heldout)) if heldout is not None else None
    (run_dir / "train_config.json").write_text(json.dumps(asdict(train), indent=2) + "\n")
    budget_s = minutes * 60 if minutes is not None else math.inf
    max_steps = steps if steps is not None else 1 << 62
    p = trainer.progress
    new_log = not (run_dir / LOG_FILE).is_file()
    with open(run_dir / LOG_FILE, "a", newline="") as fh, _bar(progress_bar) as bar:
        writer = csv.writer(fh)
        if new_log:
            writer.writerow(["step", "loss", "lr", "samples_per_s", "elapsed_s", "action_gain"])
        task = bar.add_task("train", total=1.0, loss=float("nan"), rate=0.0, step=p.step)
        losses: list[float] = []
        t_last, samples_last = time.perf_counter(), p.samples
        t_prev = t_last
        while p.step < max_steps and p.elapsed < budget_s:
            losses.append(trainer.step())
            now = time.perf_counter()
            p.elapsed += now - t_prev
            t_prev = now
            if p.step % train.log_every == 0 or p.step >= max_steps or p.elapsed >= budget_s:
                rate = (p.samples - samples_last) / max(now - t_last, 1e-9)
                loss = float(np.mean(losses))
                gain = ""
                if probe is not None and p.step % (5 * train.log_every) == 0:
                    gain = f"{action_gain(trainer.ema, trainer.ns, probe.to(trainer.device)):.4f}"
                writer.writerow([p.step, f"{loss:.6f}", f"{trainer.lr_at(p.step - 1):.3e}",
                                 f"{rate:.2f}", f"{p.elapsed:.1f}", gain])  # fmt: skip
                fh.flush()
                done = max(p.step / max_steps, p.elapsed / budget_s)
                bar.update(task, completed=min(done, 1.0), loss=loss, rate=rate, step=p.step)
                losses, t_last, samples_last = [], now, p.samples
            if p.step % train.ckpt_every == 0:
                trainer.save_checkpoint(run_dir)
                t_prev = time.perf_counter()  # checkpoint I/O is not training time
    trainer.save_checkpoint(run_dir)
    summary = {
        "bundle": str(out),
        "objective": train.objective,
        "steps": p.step,
        "samples": p.samples,
        "elapsed_s": round(p.elapsed, 1),
        "final_loss": _last_logged_loss(run_dir / LOG_FILE),
        "hardware": hardware(trainer.device),
        "train_config": asdict(train),
        "data": _data_summary(data, heldout),
        "parameters": sum(x.numel() for x in trainer.net.parameters()),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    save_bundle(out, config, trainer.ema, card=model_card(config, summary))
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    if heldout is not None:
        write_examples(out, config, load_episodes(heldout))
    else:
        log.warning("no --heldout data: the bundle gets no examples")
    return summary


def _bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("train step {task.fields[step]}"), BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.1f} samples/s"),
        TimeElapsedColumn(), disable=not enabled,
    )  # fmt: skip


def _check_dataset_actions(config: BundleConfig, meta: dict[str, Any]) -> None:
    """The dataset's action names and frame size must be the bundle's: refuse a mismatch."""
    size = meta.get("resolution", [config.network.resolution])[0]
    if size != config.network.resolution:
        raise ValueError(f"data: {size}-px frames, {config.name} takes "
                         f"{config.network.resolution}-px ones (`dfserve dataset crafter "
                         f"--size {config.network.resolution}`)")  # fmt: skip
    names = tuple(meta.get("action_names", ()))
    if names and names != config.data.action_names:
        raise ValueError(f"data: action names {names} differ from the config's "
                         f"{config.data.action_names}")  # fmt: skip
    if len(names) and len(names) != config.network.n_actions:
        raise ValueError(f"data: {len(names)} actions, the network has {config.network.n_actions}")


def _last_logged_loss(path: Path) -> float | None:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    return float(rows[-1]["loss"]) if rows else None


def _data_summary(data: Path, heldout: Path | None) -> dict[str, Any]:
    keys = ("env", "env_version", "episodes", "frames", "deaths", "seed_start", "seed_end",
            "steps", "policy")  # fmt: skip
    out = {"train": {k: v for k, v in load_meta(data).items() if k in keys}}
    if heldout is not None:
        out["heldout"] = {k: v for k, v in load_meta(heldout).items() if k in keys}
    return out


def write_examples(out: Path, config: BundleConfig, episodes: list[Episode], n: int = 3) -> None:
    """A few named starting points from held-out episodes: 4 context frames + 32 true actions."""
    names = config.data.action_names
    need = EXAMPLE_START + EXAMPLE_CONTEXT + EXAMPLE_ACTIONS
    written = 0
    for ep in episodes:
        if len(ep) < need or written >= n:
            continue
        s, k = EXAMPLE_START, EXAMPLE_START + EXAMPLE_CONTEXT
        acts = ep.actions
        assert (acts[s:need] != NO_ACTION).all()
        save_example(
            out, f"heldout-{ep.seed}", ep.frames[s:k],
            [names[int(a)] for a in acts[s:k]], [names[int(a)] for a in acts[k:need]],
        )  # fmt: skip
        written += 1


# --- the model card -------------------------------------------------------------------------


def _copy_description(n: NetworkConfig) -> str:
    level = "; each frame is also told the noise level of the previous frame"
    level = level if n.previous_level else ""
    if n.copy_shifts:
        prior = (", plus a learned bias per action on that choice, started at the training "
                 "data's counts") if n.copy_action_prior else ""
        return ("a residual plus, per pixel, a softmax choice among the previous frame and "
                f"its copies moved one {n.patch_size}-px patch each way (CDNA-style){prior}; "
                f"the shifted copies are also stacked into each token's input{level}")
    if n.scroll_rows:
        return ("a residual plus a per-pixel gated copy of the previous frame with its top "
                f"{n.scroll_rows} patch rows scrolled by whole {n.patch_size}-px patches, the "
                "scroll picked per frame by a small classifier (model.scroll.ScrollHead) from "
                "the previous frame, the action and that frame's level, trained by "
                "cross-entropy on the data's own scrolls; the previous frame and its scrolled "
                f"copy are both stacked into each token's input{level}")
    if n.copy_gate:
        return "a residual plus a per-pixel gated copy of the previous frame"
    return "the frame in the objective's parameterisation"

EVAL_START, EVAL_END = "<!-- eval:start -->", "<!-- eval:end -->"


def model_card(config: BundleConfig, summary: dict[str, Any]) -> str:
    n, d, s = config.network, config.diffusion, config.sampling
    t = summary["train_config"]
    data = summary["data"]
    tr = data["train"]
    held = data.get("heldout", {})
    policy = tr.get("policy", {})
    return f"""# {config.name}

A {summary["objective"].replace("_", "-")} video world model of
[Crafter](https://github.com/danijar/crafter) ({n.resolution}x{n.resolution} RGB,
{n.n_actions} actions, {config.data.fps} fps), served by dfserve.

## Model

- Causal video DiT: width {n.width}, depth {n.depth}, {n.heads} heads, patch {n.patch_size}
  ({n.tokens_per_frame} tokens per frame), window {n.max_frames} frames,
  {summary["parameters"] / 1e6:.2f} M parameters, fp32 EMA weights.
- Output: {_copy_description(n)}.
- Diffusion: T = {d.timesteps}, {d.beta_schedule} betas, {d.objective}-prediction.
- Default sampling: {s.schedule} schedule, {s.sampler}, {s.steps} steps, chunk {s.chunk_size},
  context noise {s.context_noise} ({s.context_noise_mode}), {config.data.context_length}
  context frames.

## Data

- Training: {tr.get("episodes")} episodes, {tr.get("frames")} frames of crafter
  {tr.get("env_version", "")}, seeds [{tr.get("seed_start")}, {tr.get("seed_end")}),
  up to {tr.get("steps")} steps per episode ({tr.get("deaths")} ended in death), random-run
  policy ({policy.get("move_fraction", "?")} of steps move, geometric runs of mean
  {policy.get("mean_run", "?")}).
- Held-out (evaluation and the bundled examples): {held.get("episodes", "none")} episodes,
  seeds [{held.get("seed_start")}, {held.get("seed_end")}) — never seen in training.

## Training

- Objective: {summary["objective"]}; fused min-SNR-γ weighting (γ = {t["min_snr_gamma"]},
  history decay {t["cum_snr_decay"]}),
  action dropout {t["action_dropout"]}, history dropout {t["history_dropout"]}, clean
  history {t.get("clean_history", 0.0)} (windows whose prefix sits at levels -1 to
  {t.get("clean_history_level", 15)}), clean frames {t.get("clean_frames", 0.0)} (single
  frames at those levels), {t.get("scroll_batch", 0)} extra frame pairs a step for the scroll
  head.
- AdamW lr {t["lr"]} (warmup {t["warmup_steps"]} steps, cosine to
  {t["min_lr_ratio"]}× when the step budget is set), weight decay {t["weight_decay"]},
  grad clip {t["grad_clip"]}, EMA {t["ema_decay"]}, batch {t["batch_size"]} windows.
- Compute: {summary["hardware"]}; {summary["elapsed_s"] / 60:.1f} min wall time,
  {summary["steps"]} steps, {summary["samples"]} windows
  ({summary["samples"] * n.max_frames} frames); final training loss {summary["final_loss"]}.

## Evaluation

{EVAL_START}
Not evaluated yet: run `dfserve eval --model BUNDLE --data HELDOUT --update-card`.
{EVAL_END}

## Known limits

- Small model, short training: predictions are blurry, fine detail (inventory digits,
  creatures) is lost within a few frames, and the world beyond the view is invented.
- Trained on a random policy: long purposeful behaviour (crafting chains) is rare in the data.
- Hidden state beyond the {n.max_frames}-frame window (inventory counts, health, daylight)
  is not tracked.
"""
