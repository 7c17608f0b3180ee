"""Frozen configuration dataclasses and named presets (nanoGPT / DiT style).

A bundle's `config.json` is exactly `asdict(BundleConfig)`; `BundleConfig.from_dict` reads it
back and rejects unknown keys so a typo in a hand-edited config fails loudly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args, get_origin, get_type_hints

from dfserve.model.errors import in_range, one_of

# The accepted names of the sampling choices, as types: a request schema or a CLI flag built
# from SamplingConfig's fields (sampling_choices) offers exactly these. Each name has its
# function in a table: model/scheduling.py SCHEDULE_MATRICES, model/samplers.py SAMPLER_STEPS.
ScheduleName = Literal["pyramid", "autoregressive", "full_sequence", "trapezoid"]
SamplerName = Literal["ddim", "ddpm", "dpmpp_2m"]
# relabel: clean context labelled at context_noise; noised: really noised once; scaled: DF v1.5
# stabilization, labelled at context_noise and multiplied by sqrt(alpha_bar) with no noise added
# (df_base ddim_sample_step: q_sample(x, stabilization_level - 1, noise=0)).
ContextNoiseMode = Literal["relabel", "noised", "scaled"]

SCHEDULES: tuple[str, ...] = get_args(ScheduleName)
SAMPLERS: tuple[str, ...] = get_args(SamplerName)
CONTEXT_NOISE_MODES: tuple[str, ...] = get_args(ContextNoiseMode)
BETA_SCHEDULES = ("linear", "cosine", "sigmoid")
OBJECTIVES = ("eps", "v", "x0")
ARCHITECTURES = ("dit", "unet3d")
TRAIN_OBJECTIVES = ("diffusion_forcing", "teacher_forcing")


@dataclass(frozen=True)
class NetworkConfig:
    resolution: int = 64  # frames are resolution x resolution
    channels: int = 3
    patch_size: int = 8  # 64/8 -> 8x8 = 64 tokens per frame
    width: int = 192  # transformer width D
    depth: int = 4  # number of DiT blocks
    heads: int = 3  # head dim = width / heads
    mlp_ratio: float = 4.0
    n_actions: int = 17  # action id n_actions is the null (unconditional / unknown) action
    max_frames: int = 16  # training window; attention never spans more frames than this
    rope_base: float = 10_000.0  # RoPE over the global frame index (relative attention in time)
    # Concatenate the previous frame's input to each frame's patches (frame stacking, as in
    # DIAMOND): copying and shifting the last frame becomes a local, per-patch function
    # instead of something attention must learn. Still block-causal (t sees t-1).
    frame_skip: bool = False
    # With frame_skip and x0-prediction: the output is residual + gate * previous frame's
    # input, with a learned per-pixel gate in (0, 1). Static pixels (the inventory, a noop)
    # are copied exactly instead of squeezed through the width-D token bottleneck, so the
    # network spends its capacity on what changes.
    copy_gate: bool = False
    # With copy_gate: also offer the previous frame shifted by one patch up, down, left and
    # right, and let a per-pixel softmax choose among the five copies (or none), as CDNA
    # (Finn et al. 2016) advects the previous frame. A scrolling camera (a player step in a
    # top-down world) is then one choice per pixel, conditioned on the action through adaLN,
    # instead of a permutation of every token that attention must learn. The shifted copies
    # are also stacked into each token's input (its neighbours' previous content). Meant for
    # tile-aligned patches (Crafter at 72 px: one patch = one tile = one step).
    copy_shifts: bool = False
    # With copy_shifts: a learned bias per action on the copy choice, added at every pixel of
    # the action's frame. The action then picks the shift in one linear step (move_left ->
    # the copy moved right), while the network's own logits handle what the action alone
    # cannot know (a blocked step, tiles entering at the edge, the player's sprite). A fresh
    # run starts it at the training data's counts (model.copy_prior): learnt from zero it
    # barely moved in hundreds of steps.
    copy_action_prior: bool = False
    # With frame_skip: each frame is also conditioned on the noise level of the previous
    # frame, the one it sees stacked and may copy. Without it a frame cannot tell a clean
    # previous frame (copy it) from a noisy one (don't) except by its pixels, and under DF's
    # independent levels the copy gate learnt to copy little: at level T-1 after clean
    # history it gave "none" 85% of the weight (the crafter-tiles card).
    previous_level: bool = False
    # With copy_gate (not copy_shifts): the top scroll_rows patch rows are a view that scrolls
    # by whole patches (Crafter at 72 px: the 7 world rows above the 2 inventory rows). A small
    # classifier (model.scroll.ScrollHead) picks each frame's scroll among COPY_SHIFTS from the
    # previous frame, the action and that frame's level, trained by cross-entropy on the data's
    # own scrolls, and the gate copies the previous frame moved by it. 0: no scroll head.
    scroll_rows: int = 0
    # With copy_gate: the output is gate * copy + (1 - gate) * residual, a per-pixel choice
    # between the copy and the network's own drawing, instead of residual + gate * copy. A
    # gate at 1 then copies exactly whatever the residual is; with the sum, an exact copy also
    # needs a residual of exactly 0, and the crafter-cpu model of round 12 drew its world at
    # gate 0.45 plus a blurry residual at the sampler's last step (the world faded in 3 frames).
    convex_copy: bool = False
    # With scroll_rows: the tiles that enter at the edge of a scrolled view are drawn from a
    # codebook of the data's tiles (k-means, this many codes) by a small classifier over the
    # rest of the view, instead of left as the denoiser's average guess (flat grass).
    # model.edge_fill; trained on its own after the denoiser (model.train_edge_fill). 0: none.
    edge_fill_codes: int = 0
    # With convex_copy, at sampling time (no gradient taken): a pixel whose gate is above this
    # copies exactly (gate 1). Trained soft, the gate blends a little of the denoiser's drawing
    # into a copied tile every frame, and in the crafter-cpu model's rollouts trees, water and
    # stone faded into grass within 10-20 frames; decided at 0.5 the world detail after 240
    # random moves went from 17% to 47% of the real frames' (its card, row 16). The gate is
    # underconfident on whatever is not grass (trees, water, stone, drawn edge tiles), so the
    # default decides at 0.08: 84-86% on one seed, 71% on another (its card, row 19 and the
    # threshold sweep). 0: as trained.
    exact_copy_above: float = 0.0

    @property
    def tokens_per_frame(self) -> int:
        return (self.resolution // self.patch_size) ** 2


@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int = 1000  # T discrete noise levels 0..T-1; level -1 means clean
    beta_schedule: str = "cosine"
    objective: str = "v"  # what the network predicts: eps, v or x0
    clip_noise: float = 20.0  # every drawn noise is clamped to [-clip_noise, clip_noise] (DF)
    zero_terminal_snr: bool = False  # rescale betas so level T-1 is pure noise (Lin et al. 2023)


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings; a bundle stores its measured defaults, a request may override them."""

    schedule: ScheduleName = "pyramid"
    sampler: SamplerName = "dpmpp_2m"
    steps: int = 8  # S denoising steps per frame
    eta: float = 0.0  # DDIM stochasticity (ddpm forces 1)
    uncertainty_scale: float = 1.0  # u: pyramid / trapezoid slope
    chunk_size: int = 4  # frames generated per chunk when sliding
    guidance: float = 1.0  # history guidance weight w; 1 = off
    context_noise: int = 15  # level of context frames (DF stabilization level), -1 = clean
    context_noise_mode: ContextNoiseMode = "relabel"  # see ContextNoiseMode

    def validate(self, n_frames: int, timesteps: int) -> None:
        """Raise FieldError naming the field (and the accepted values, for the named ones)."""
        for name, choices in sampling_choices().items():
            one_of(name, getattr(self, name), choices)
        in_range("steps", self.steps, 1, timesteps)
        in_range("eta", self.eta, 0.0, 1.0)
        in_range("uncertainty_scale", self.uncertainty_scale, 0.0, 1000.0)
        in_range("chunk_size", self.chunk_size, 1, n_frames - 1)
        in_range("guidance", self.guidance, 0.0, 20.0)
        in_range("context_noise", self.context_noise, -1, timesteps - 1)


def sampling_types() -> dict[str, Any]:
    """SamplingConfig's fields and their types, in order: what request schemas and CLI flags
    are generated from, so a new setting is declared once, above."""
    hints = get_type_hints(SamplingConfig)
    return {f.name: hints[f.name] for f in fields(SamplingConfig)}


def sampling_choices() -> dict[str, tuple[str, ...]]:
    """The settings that take one of a fixed set of names, with those names."""
    return {name: get_args(kind) for name, kind in sampling_types().items()
            if get_origin(kind) is Literal}


@dataclass(frozen=True)
class DataConfig:
    env: str = "crafter"
    fps: int = 10
    n_frames: int = 16  # training window in frames: network.max_frames x unet.frame_stack
    context_length: int = 4  # default number of context frames a rollout starts from
    action_names: tuple[str, ...] = ()
    # pixels are stored as uint8 and mapped to [-1, 1] by x / 127.5 - 1
    pixel_scale: float = 127.5
    pixel_shift: float = -1.0


@dataclass(frozen=True)
class UNet3DConfig:
    """The diffusion-forcing research code's `Unet3D` (model/unet3d.py). Resolution, channels and
    the window (max_frames) stay in NetworkConfig, which every architecture shares."""

    dim: int = 64  # network_size: width of the first level; level i has dim * dim_mults[i]
    dim_mults: tuple[int, ...] = (1, 2, 4, 8)
    # feature-map sizes in pixels that get spatial + temporal attention (df_video.yaml's
    # attn_resolutions; the reference turns them into factors resolution // r)
    attn_resolutions: tuple[int, ...] = (16, 32, 64, 128)
    attn_heads: int = 4
    attn_dim_head: int = 64
    groups: int = 8  # GroupNorm groups (resnet_block_groups)
    use_linear_attn: bool = True  # linear spatial attention except at the deepest level
    use_init_temporal_attn: bool = True
    init_kernel_size: int = 7
    rope_base: float = 10_000.0  # rotary time embedding (rotary-embedding-torch's theta)
    frame_stack: int = 1  # frames stacked along channels per token (network channels = 3 * fs)


@dataclass(frozen=True)
class BundleConfig:
    name: str = "untitled"
    # which network file builds the denoiser (model/bundle.py): the causal DiT of network.py, or
    # the research code's 3-D U-Net (unet3d.py, then `unet` holds its settings)
    architecture: str = "dit"
    network: NetworkConfig = field(default_factory=NetworkConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # Longest rollout the bundle allows per request (the server may lower it).
    max_rollout_frames: int = 2048
    unet: UNet3DConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BundleConfig:
        parts = {
            "network": NetworkConfig,
            "diffusion": DiffusionConfig,
            "data": DataConfig,
            "sampling": SamplingConfig,
            "unet": UNet3DConfig,
        }
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key == "unet" and value is None:
                kwargs[key] = None
            elif key in parts:
                kwargs[key] = _build(parts[key], value, key)
            elif key in {f.name for f in fields(cls)}:
                kwargs[key] = value
            else:
                raise ValueError(f"config.json: unknown key {key!r}")
        config = cls(**kwargs)
        one_of("architecture", config.architecture, ARCHITECTURES)
        if (config.architecture == "unet3d") != (config.unet is not None):
            raise ValueError("config.json: `unet` is required with architecture unet3d only")
        return config


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    names = {f.name for f in fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"config.json: unknown keys in {where}: {sorted(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**values)


# --- named presets --------------------------------------------------------------------------

CRAFTER_ACTIONS: tuple[str, ...] = (
    "noop", "move_left", "move_right", "move_up", "move_down", "do", "sleep", "place_stone",
    "place_table", "place_furnace", "place_plant", "make_wood_pickaxe", "make_stone_pickaxe",
    "make_iron_pickaxe", "make_wood_sword", "make_stone_sword", "make_iron_sword",
)  # fmt: skip


def preset(name: str) -> BundleConfig:
    """Named configurations. `tiny` is for tests; `crafter-cpu` trains on 2 CPU cores."""
    if name not in PRESETS:
        raise ValueError(f"preset: {name!r} is not one of {sorted(PRESETS)}")
    return PRESETS[name]


_CRAFTER_DATA = DataConfig(env="crafter", fps=10, n_frames=16, action_names=CRAFTER_ACTIONS)

# The tile-aligned recipe of the default-world issue, and the base of the default crafter-cpu.
# 72x72 frames, so an 8-px patch is one Crafter tile (81 tokens per frame, 63 of them world)
# and a player step moves the world by exactly one patch; copy_shifts makes that step one
# choice per pixel and copy_action_prior lets the action pick it (see NetworkConfig).
_CRAFTER_TILES = BundleConfig(
    name="crafter-tiles",
    network=NetworkConfig(resolution=72, width=128, depth=4, heads=4, max_frames=8,
                          frame_skip=True, copy_gate=True, copy_shifts=True,
                          copy_action_prior=True),
    diffusion=DiffusionConfig(objective="x0"),
    data=dataclasses.replace(_CRAFTER_DATA, n_frames=8),
    sampling=SamplingConfig(steps=2, chunk_size=4),
)  # fmt: skip

# The tile-aligned network with a scroll head (model.scroll). A player step is one classified
# choice per frame, not a per-pixel blend, and the gate copies the previous frame scrolled by
# it, so the world follows the player and keeps its tiles while they stay in view. 72-px
# frames (`dfserve dataset crafter --size 72`), 81 tokens per frame; x0-prediction, as for
# crafter-cpu-v1 below. The first stage of the default's weights.
_CRAFTER_SCROLL = dataclasses.replace(
    _CRAFTER_TILES, name="crafter-cpu-scroll",
    network=dataclasses.replace(_CRAFTER_TILES.network, copy_shifts=False,
                                copy_action_prior=False, previous_level=True, scroll_rows=7),
)  # fmt: skip

_CRAFTER_GATED = dataclasses.replace(
    _CRAFTER_SCROLL, name="crafter-cpu-gated",
    network=dataclasses.replace(_CRAFTER_SCROLL.network, convex_copy=True),
)  # fmt: skip

PRESETS: dict[str, BundleConfig] = {
    "tiny": BundleConfig(
        name="tiny",
        network=NetworkConfig(
            resolution=16, patch_size=4, width=32, depth=2, heads=2, n_actions=4, max_frames=8,
            frame_skip=True, copy_gate=True, copy_shifts=True, copy_action_prior=True,
        ),
        data=DataConfig(env="synthetic", fps=8, n_frames=8, context_length=2,
                        action_names=("noop", "left", "right", "up")),
        sampling=SamplingConfig(steps=4, chunk_size=3),
    ),  # fmt: skip
    "crafter-cpu-scroll": _CRAFTER_SCROLL,
    # The default's denoiser: crafter-cpu-scroll with a convex copy whose gate is taught where
    # the copy is exact (TrainConfig.gate_loss), so the world in view is copied exactly instead
    # of half redrawn every frame. Warm-started from crafter-cpu-scroll (DEVELOPERS.md).
    "crafter-cpu-gated": _CRAFTER_GATED,
    # The default (model/bundles/crafter-cpu): crafter-cpu-gated's weights, its copy decided
    # at sampling time (exact_copy_above) and an edge fill (model.edge_fill) that draws the
    # tiles entering the view, trained after the denoiser (`dfserve train --edge-fill`).
    "crafter-cpu": dataclasses.replace(
        _CRAFTER_GATED, name="crafter-cpu",
        network=dataclasses.replace(_CRAFTER_GATED.network, edge_fill_codes=512,
                                    exact_copy_above=0.08),
    ),
    # The default of the previous rounds, for the record (its card is in the git history of
    # model/bundles/crafter-cpu): 64 tokens per frame, an 8-frame window (4 context + a chunk
    # of 4), 1.3 M parameters. x0-prediction, not v: a token carries a patch of 8*8*3 = 192
    # values but the width is 128, so the network cannot represent per-pixel noise; v/eps
    # targets need exactly that (x0 = a*x - s*v leaves the unrepresented noise in every
    # sample: 11.8 dB at h=1 with v), while x0 lives in the patches' low-rank image subspace
    # (rank 128 keeps all but 2e-4 of Crafter's patch variance). 64-px renders, whose 7-px
    # tiles straddle the patches. It ignored actions (2 of 97 moves followed).
    "crafter-cpu-v1": BundleConfig(
        name="crafter-cpu-v1",
        network=NetworkConfig(width=128, depth=4, heads=4, max_frames=8, frame_skip=True,
                              copy_gate=True),
        diffusion=DiffusionConfig(objective="x0"),
        data=dataclasses.replace(_CRAFTER_DATA, n_frames=8),
        sampling=SamplingConfig(steps=2, chunk_size=4),
    ),
    "crafter-tiles": _CRAFTER_TILES,
    # Ablations of crafter-tiles at equal compute (the model card compares them): the plain
    # copy gate instead of the shifted copies (the action reaches the output through adaLN
    # alone), and the same network at 64 px, where 7-px tiles straddle the 8-px patches.
    "crafter-tiles-no-shifts": dataclasses.replace(
        _CRAFTER_TILES, name="crafter-tiles-no-shifts",
        network=dataclasses.replace(_CRAFTER_TILES.network, copy_shifts=False,
                                    copy_action_prior=False),
    ),
    "crafter-tiles-previous-level": dataclasses.replace(
        _CRAFTER_TILES, name="crafter-tiles-previous-level",
        network=dataclasses.replace(_CRAFTER_TILES.network, previous_level=True),
    ),
    "crafter-tiles-64px": dataclasses.replace(
        _CRAFTER_TILES, name="crafter-tiles-64px",
        network=dataclasses.replace(_CRAFTER_TILES.network, resolution=64),
    ),
    "crafter-gpu": BundleConfig(
        name="crafter-gpu",
        network=NetworkConfig(
            patch_size=4, width=512, depth=12, heads=8, max_frames=16, frame_skip=True
        ),
        data=_CRAFTER_DATA,
    ),
}


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of `dfserve train` (the network/diffusion come from a preset)."""

    # diffusion_forcing: every frame draws its own level uniformly in [0, T-1] (Chen et al.
    # 2024). teacher_forcing: frames before a random split point are clean (level -1, no
    # loss), every frame from it on shares one level (model.train.sample_levels).
    objective: str = "diffusion_forcing"
    batch_size: int = 32  # windows of n_frames per optimizer step
    lr: float = 1e-3  # AdamW peak learning rate
    min_lr_ratio: float = 0.1  # cosine floor, used when the step budget is known
    warmup_steps: int = 200  # linear warmup from 0
    weight_decay: float = 0.01  # on matrices and embeddings only (nanoGPT), not biases
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0  # global grad-norm clip
    ema_decay: float = 0.999  # EMA weights are what the bundle ships
    min_snr_gamma: float = 5.0  # min-SNR-gamma loss weighting (Hang et al. 2023)
    cum_snr_decay: float = 0.9  # DF's fused SNR: decay of the history's SNR (0 = plain min-SNR)
    action_dropout: float = 0.1  # P(a window's actions are all null): unconditional branch
    history_dropout: float = 0.1  # P(frames before a split go to level T-1 with null actions)
    # P(frames before a split are nearly clean, levels -1..clean_history_level): next-frame
    # prediction from a visible history, where actions matter (model.train.apply_clean_history)
    clean_history: float = 0.0
    clean_history_level: int = 15  # the default context-noise level of sampling
    # P(a frame, independently, is nearly clean, levels -1..clean_history_level): a noisy
    # frame after a clean one at every level (model.train.apply_clean_frames)
    clean_frames: float = 0.0
    # With a scroll head: frame pairs per step on which the head alone also learns (the
    # windows give it only batch_size x (n_frames - 1) frames a step, and it needed ~50 k
    # examples before it read blocked tiles; model.train.scroll_head_loss)
    scroll_batch: int = 0
    # With copy_gate: weight of a per-pixel cross-entropy that teaches the gate where the copy
    # it is offered is exact (model.train.gate_targets). The x0 loss alone left the gate half
    # open where the copy was exact, the residual making up the rest with its mean.
    gate_loss: float = 0.0
    log_every: int = 20  # steps between CSV rows / progress updates
    ckpt_every: int = 250  # steps between checkpoints (also one at the end)
    seed: int = 0

    def validate(self) -> None:
        one_of("objective", self.objective, TRAIN_OBJECTIVES)
        in_range("batch_size", self.batch_size, 1, 1 << 16)
        in_range("lr", self.lr, 0.0, 1.0)
        in_range("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        in_range("ema_decay", self.ema_decay, 0.0, 1.0)
        in_range("cum_snr_decay", self.cum_snr_decay, 0.0, 1.0)
        in_range("action_dropout", self.action_dropout, 0.0, 1.0)
        in_range("history_dropout", self.history_dropout, 0.0, 1.0)
        in_range("clean_history", self.clean_history, 0.0, 1.0)
        in_range("clean_history_level", self.clean_history_level, -1, 1 << 20)
        in_range("clean_frames", self.clean_frames, 0.0, 1.0)
        in_range("scroll_batch", self.scroll_batch, 0, 1 << 16)
        in_range("gate_loss", self.gate_loss, 0.0, 1e3)
        in_range("grad_clip", self.grad_clip, 0.0, 1e9)


# the tile-aligned recipe and its ablations train alike, with clean-history windows mixed in
_CRAFTER_TILES_TRAIN = TrainConfig(batch_size=8, lr=2e-3, warmup_steps=100, ema_decay=0.995,
                                   clean_history=0.5)
# the scroll network: extra pairs for its head, near-clean frames so the copy is often exact
_CRAFTER_SCROLL_TRAIN = dataclasses.replace(_CRAFTER_TILES_TRAIN, scroll_batch=128,
                                            clean_frames=0.5)

TRAIN_PRESETS: dict[str, TrainConfig] = {
    "tiny": TrainConfig(batch_size=4, lr=3e-3, warmup_steps=2, ema_decay=0.9, log_every=1,
                        ckpt_every=2),  # fmt: skip
    "crafter-cpu-scroll": _CRAFTER_SCROLL_TRAIN,
    "crafter-cpu-gated": dataclasses.replace(_CRAFTER_SCROLL_TRAIN, gate_loss=0.1),
    "crafter-cpu-v1": TrainConfig(batch_size=8, lr=2e-3, warmup_steps=100, ema_decay=0.995),
    "crafter-tiles": _CRAFTER_TILES_TRAIN,
    "crafter-tiles-no-shifts": _CRAFTER_TILES_TRAIN,
    "crafter-tiles-64px": _CRAFTER_TILES_TRAIN,
    "crafter-tiles-previous-level": _CRAFTER_TILES_TRAIN,
    "crafter-gpu": TrainConfig(batch_size=64, lr=3e-4, warmup_steps=2000, ema_decay=0.9999,
                               ckpt_every=2000, log_every=50),  # fmt: skip
}


def train_preset(name: str) -> TrainConfig:
    if name not in TRAIN_PRESETS:
        raise ValueError(f"config: {name!r} is not one of {sorted(TRAIN_PRESETS)}")
    return TRAIN_PRESETS[name]


def with_overrides(cfg: Any, **changes: Any) -> Any:
    """dataclasses.replace that ignores None values (CLI / API 'not given')."""
    return dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})
