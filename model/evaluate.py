"""World-model metrics against the real environment (DESIGN §7).

Dimensions: N frames, C channels, H W height width, K context frames. Metric images are
float64 in [0, 1], channels first.

1. Horizons: from K held-out context frames and the true actions, roll out 32 frames and
   compare frame h with what the environment rendered, for h in 1, 4, 8, 16, 32, against
   copying the last context frame. PSNR is aggregated as 10·log10(1 / mean MSE) over every
   frame at that horizon (one identical frame would make a per-frame mean infinite); SSIM is
   the mean of per-frame SSIM (Wang et al. 2004: 11x11 gaussian window, sigma 1.5,
   K1 0.01, K2 0.03, 'valid' filtering, per channel then averaged).
2. Stability: one long rollout (default 1,000 frames); each frame's per-channel mean and std
   must stay within the range of the real held-out frames' statistics.
3. Action fidelity: the same context with move_left×n and move_right×n, against the
   environment's own continuations (replayed from the episode's seed and actions): the
   model's frames should be closer to the env frames of the same action than of the other.

Writes metrics.json, grid.png (ground truth row above rollout row per window) and MP4s
(ground truth | model side by side, through PyAV directly: model/ never imports server/).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor

from dfserve.model.bundle import Bundle, load_bundle, resolve_bundle, with_card_block
from dfserve.model.config import SamplingConfig
from dfserve.model.data.shards import NO_ACTION, Episode, load_episodes, load_meta
from dfserve.model.errors import FieldError
from dfserve.model.request import SAMPLING_FIELDS, sampling_from
from dfserve.model.rollout import RolloutEngine, RolloutRequest, RolloutState
from dfserve.model.scroll import overlap_mse

log = logging.getLogger(__name__)

HORIZONS = (1, 4, 8, 16, 32)
GRID_COLUMNS = (1, 2, 3, 4, 8, 16, 32)  # horizons shown in the picture
EVAL_START, EVAL_END = "<!-- eval:start -->", "<!-- eval:end -->"


# --- metrics ----------------------------------------------------------------------------------


def mse_per_frame(a: Tensor, b: Tensor) -> Tensor:
    """(N, C, H, W) in [0, 1] -> (N,) float64."""
    return (a.double() - b.double()).pow(2).flatten(1).mean(1)


def psnr_per_frame(a: Tensor, b: Tensor) -> Tensor:
    """(N,) PSNR in dB for [0, 1] images; +inf for identical frames."""
    mse = mse_per_frame(a, b)
    return torch.where(mse > 0, -10 * torch.log10(mse), torch.full_like(mse, math.inf))


def aggregate_psnr(mse: Tensor | list[float]) -> float:
    """10·log10(1 / mean MSE): finite unless every frame is identical (then +inf)."""
    mean = float(torch.as_tensor(mse, dtype=torch.float64).mean())
    return math.inf if mean == 0 else -10 * math.log10(mean)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]  # (size, size), sums to 1


def ssim_per_frame(a: Tensor, b: Tensor, data_range: float = 1.0) -> Tensor:
    """Standard SSIM (module docstring) of (N, C, H, W) images -> (N,) float64."""
    a, b = a.double(), b.double()
    N, C, H, W = a.shape
    win = gaussian_window().to(a.device)
    size = win.shape[0]
    if H < size or W < size:
        raise ValueError(f"ssim: images of {H}x{W} are smaller than the {size}x{size} window")
    kernel = win.expand(C, 1, size, size)  # depthwise: each channel on its own

    def filt(x: Tensor) -> Tensor:
        return F.conv2d(x, kernel, groups=C)  # 'valid': (N, C, H-10, W-10)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a**2
    var_b = filt(b * b) - mu_b**2
    cov = filt(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return (num / den).mean(dim=(2, 3)).mean(dim=1)  # per channel, then averaged


def frame_stats(frames: Tensor) -> Tensor:
    """(N, C, H, W) in [0, 1] -> (N, 2C): per-channel mean then per-channel std."""
    flat = frames.double().flatten(2)  # (N, C, H*W)
    return torch.cat([flat.mean(-1), flat.std(-1)], dim=1)


def stability(frames: Tensor, real_stats: Tensor, tail: float = 0.1) -> dict[str, Any]:
    """Fraction of frames whose statistics lie inside the real frames' [min, max] per stat;
    'collapsed' when fewer than half of the last `tail` of the rollout is inside."""
    stats = frame_stats(frames)
    lo, hi = real_stats.min(0).values, real_stats.max(0).values
    inside = ((stats >= lo) & (stats <= hi)).all(1)  # (N,)
    n_tail = max(1, int(len(frames) * tail))
    tail_inside = float(inside[-n_tail:].double().mean())
    return {
        "frames": len(frames),
        "fraction_inside": float(inside.double().mean()),
        "fraction_inside_last_10pct": tail_inside,
        "first_outside": int(torch.nonzero(~inside)[0]) if (~inside).any() else None,
        "collapsed": tail_inside < 0.5,
        "real_range": {
            "mean_rgb": [lo[:3].tolist(), hi[:3].tolist()],
            "std_rgb": [lo[3:].tolist(), hi[3:].tolist()],
        },  # fmt: skip
        "rollout_last_frame": {
            "mean_rgb": stats[-1, :3].tolist(),
            "std_rgb": stats[-1, 3:].tolist(),
        },  # fmt: skip
    }


def horizon_metrics(pred: Tensor, truth: Tensor, last_context: Tensor) -> dict[str, Any]:
    """pred/truth (W, 32, C, H, W) and last_context (W, C, H, W), all in [0, 1]."""
    out: dict[str, Any] = {}
    for h in HORIZONS:
        if h > pred.shape[1]:
            continue
        truth_h = truth[:, h - 1]
        row: dict[str, Any] = {}
        for name, guess in (("model", pred[:, h - 1]), ("copy_last", last_context)):
            mse = mse_per_frame(guess, truth_h)
            row[name] = {
                "psnr": aggregate_psnr(mse),
                "ssim": float(ssim_per_frame(guess, truth_h).mean()),
                "mse": float(mse.mean()),
            }
        row["model_beats_copy_last_psnr"] = row["model"]["psnr"] > row["copy_last"]["psnr"]
        out[str(h)] = row
    return out


def mean_psnr_gain(pred: Tensor, truth: Tensor, last_context: Tensor,
                   up_to: int = 16) -> dict[str, float]:  # fmt: skip
    """The quality bar of DESIGN §7: PSNR at every horizon 1..up_to (aggregated over windows as
    in horizon_metrics), averaged over the horizons, for the model and copy-last."""
    up_to = min(up_to, pred.shape[1])
    model = [aggregate_psnr(mse_per_frame(pred[:, h], truth[:, h])) for h in range(up_to)]
    copy = [aggregate_psnr(mse_per_frame(last_context, truth[:, h])) for h in range(up_to)]
    mean_model, mean_copy = float(np.mean(model)), float(np.mean(copy))
    return {"horizons": up_to, "model": mean_model, "copy_last": mean_copy,
            "gain_db": mean_model - mean_copy}  # fmt: skip


# --- rollouts -----------------------------------------------------------------------------------


def to_unit(x: Tensor) -> Tensor:
    """[-1, 1] model frames -> [0, 1], quantised to uint8 levels like a rendered frame."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 255.0


def uint8_to_unit(frames: np.ndarray) -> Tensor:
    """uint8 (N, H, W, 3) -> float64 (N, 3, H, W) in [0, 1]."""
    # shards are memory-mapped read-only; torch warns about (and must not write to) those
    return torch.from_numpy(np.array(frames)).permute(0, 3, 1, 2).double() / 255.0


def to_uint8(x: Tensor) -> np.ndarray:
    """[0, 1] (..., C, H, W) -> uint8 (..., H, W, C)."""
    return (x.clamp(0, 1) * 255).round().byte().movedim(-3, -1).cpu().numpy()


def run_batch(
    engine: RolloutEngine, requests: list[RolloutRequest], max_batch: int, label: str = ""
) -> list[Tensor]:
    """Roll every request out, `max_batch` at a time in one engine.step; (F, C, H, W) each."""
    results: list[Tensor] = []
    total = sum(r.frames for r in requests)
    with _bar() as bar:
        task = bar.add_task(label, total=total)
        for lo in range(0, len(requests), max_batch):
            states: list[RolloutState] = [engine.start(r) for r in requests[lo : lo + max_batch]]
            frames: list[list[Tensor]] = [[] for _ in states]
            while not all(st.done for st in states):
                for i, emitted in enumerate(engine.step(states)):
                    frames[i].extend(f for _, f in emitted)
                    bar.advance(task, len(emitted))
            results.extend(torch.stack(f).cpu() for f in frames)
    return results


def _bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("frames"), TimeElapsedColumn())  # fmt: skip


@dataclass(frozen=True)
class Window:
    episode: Episode
    start: int  # first context frame
    context: int
    frames: int

    @property
    def first_generated(self) -> int:
        return self.start + self.context


def pick_windows(
    episodes: list[Episode], per_episode: int, context: int, frames: int, seed: int
) -> list[Window]:
    """Deterministic, evenly spread windows that fit in each episode (skips short ones)."""
    rng = np.random.default_rng(seed)
    out = []
    for ep in episodes:
        last = len(ep) - context - frames  # latest valid start
        if last < 1:
            continue
        starts = np.linspace(1, last, per_episode + 2)[1:-1] if per_episode > 1 else [last / 2]
        jitter = rng.integers(-2, 3, size=len(starts))
        for s, j in zip(starts, jitter, strict=True):
            out.append(Window(ep, int(np.clip(round(s) + j, 1, last)), context, frames))
    return out


def window_request(
    bundle: Bundle, window: Window, sampling: SamplingConfig, seed: int,
    actions: tuple[int, ...] | None = None,
) -> RolloutRequest:  # fmt: skip
    ep, s, k = window.episode, window.start, window.first_generated
    null = bundle.config.network.n_actions
    ctx_actions = tuple(null if a == NO_ACTION else int(a) for a in ep.actions[s:k])
    if actions is None:
        actions = tuple(int(a) for a in ep.actions[k : k + window.frames])
    context = uint8_to_unit(ep.frames[s:k]).float() * 2 - 1  # (K, C, H, W) in [-1, 1]
    return RolloutRequest(context, actions, sampling, seed=seed, context_actions=ctx_actions)


# --- the evaluation -------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSettings:
    episodes: int = 16  # held-out episodes used for the horizon metrics
    windows_per_episode: int = 2
    context: int = 4  # K context frames
    frames: int = 32  # generated frames per window (the longest horizon)
    long_frames: int = 1000  # the stability rollout
    fidelity_episodes: int = 4
    fidelity_frames: int = 8
    persistence_contexts: int = 8  # rollouts of random moves for the persistence measure
    persistence_frames: int = 240
    seed: int = 0
    max_batch: int = 32
    grid_windows: int = 4
    videos: bool = True


def evaluate(
    bundle: Bundle, episodes: list[Episode], out: Path, sampling: SamplingConfig,
    settings: EvalSettings, device: str = "cpu",
) -> dict[str, Any]:  # fmt: skip
    """All metrics of the module docstring; writes metrics.json, grid.png and MP4s to out."""
    out.mkdir(parents=True, exist_ok=True)
    engine = RolloutEngine(bundle, device)
    st = settings
    windows = pick_windows(episodes[: st.episodes], st.windows_per_episode, st.context,
                           st.frames, st.seed)  # fmt: skip
    if not windows:
        raise ValueError(f"data: no held-out episode has {st.context + st.frames + 1} frames")
    requests = [window_request(bundle, w, sampling, st.seed + i) for i, w in enumerate(windows)]
    t0 = time.perf_counter()
    preds = run_batch(engine, requests, st.max_batch, "horizons")
    rollout_s = time.perf_counter() - t0
    pred = torch.stack([to_unit(p) for p in preds])  # (W, F, C, H, W)
    truth = torch.stack([uint8_to_unit(w.episode.frames[w.first_generated :
                                                         w.first_generated + st.frames])
                         for w in windows])  # fmt: skip
    last_ctx = torch.stack([uint8_to_unit(w.episode.frames[w.first_generated - 1][None])[0]
                            for w in windows])  # fmt: skip
    result: dict[str, Any] = {
        "model": bundle.name,
        "model_path": str(bundle.path),
        "sampling": asdict(sampling),
        "settings": asdict(st),
        "windows": len(windows),
        "heldout_seeds": sorted({w.episode.seed for w in windows}),
        "horizons": horizon_metrics(pred, truth, last_ctx),
        "mean_psnr_h1_16": mean_psnr_gain(pred, truth, last_ctx),
        "rollout_frames_per_s": round(pred.shape[0] * pred.shape[1] / rollout_s, 2),
    }
    write_grid(out / "grid.png", truth[: st.grid_windows], pred[: st.grid_windows],
               last_ctx[: st.grid_windows])  # fmt: skip
    if st.videos:
        for i in range(min(st.grid_windows, len(windows))):
            side = torch.cat([truth[i], pred[i]], dim=-1)  # (F, C, H, 2W)
            write_mp4(out / f"window_{i}.mp4", to_uint8(side), bundle.config.data.fps)
    if st.long_frames > 0:
        result["stability"] = long_rollout(engine, bundle, episodes, sampling, st, out)
    if st.fidelity_episodes > 0 and bundle.config.data.env == "crafter":
        result["action_fidelity"] = action_fidelity(engine, bundle, episodes, sampling, st)
        result["move_fidelity"] = move_fidelity(engine, bundle, episodes, sampling, st,
                                                out / "moves.png")  # fmt: skip
    if st.persistence_frames > 0 and bundle.config.data.env == "crafter":
        result["persistence"] = persistence(engine, bundle, episodes, sampling, st)
    (out / "metrics.json").write_text(json.dumps(_json_safe(result), indent=2) + "\n")
    return result


def long_rollout(
    engine: RolloutEngine, bundle: Bundle, episodes: list[Episode], sampling: SamplingConfig,
    st: EvalSettings, out: Path,
) -> dict[str, Any]:  # fmt: skip
    """One rollout of st.long_frames frames: the episode's own actions, then a random policy."""
    ep = max(episodes, key=len)
    window = Window(ep, 1, st.context, st.long_frames)
    k = window.first_generated
    rng = np.random.default_rng(st.seed)
    own = [int(a) for a in ep.actions[k:]]
    actions = (own + _policy_actions(bundle, rng, st.long_frames))[: st.long_frames]
    request = window_request(bundle, window, sampling, st.seed, tuple(actions))
    t0 = time.perf_counter()
    frames = to_unit(run_batch(engine, [request], 1, "long rollout")[0])
    seconds = time.perf_counter() - t0
    real = torch.cat([frame_stats(uint8_to_unit(e.frames)) for e in episodes])
    result = stability(frames, real)
    result["frames_per_s_one_stream"] = round(len(frames) / seconds, 2)
    result["heldout_seed"] = ep.seed
    if st.videos:
        write_mp4(out / "long_rollout.mp4", to_uint8(frames), bundle.config.data.fps)
    return result


# --- move fidelity and persistence (Crafter: a 9x9 grid of tiles, the top 7 rows are world) ---

MOVE_OFFSETS = {"move_left": (0, -1), "move_right": (0, 1), "move_up": (-1, 0),
                "move_down": (1, 0)}  # fmt: skip  # where the player goes, in tiles
WORLD_ROWS, VIEW_TILES, MAX_SHIFT = 7, 9, 3


def world_area(frames: Tensor) -> Tensor:
    """(..., C, H, W) -> the world part of Crafter's view (the inventory rows cut off)."""
    tile = frames.shape[-1] // VIEW_TILES
    return frames[..., : WORLD_ROWS * tile, : VIEW_TILES * tile]


def best_tile_shift(before: Tensor, after: Tensor) -> tuple[int, int]:
    """The whole-tile (dy, dx) that best maps the world area of `before` onto `after`:
    after[y, x] ~ before[y - dy*tile, x - dx*tile] with the least MSE over the overlap.

    A player step by (ty, tx) tiles scrolls the view by (-ty, -tx). (0, 0) wins ties, so a
    still world reads as no shift."""
    tile = before.shape[-1] // VIEW_TILES
    a, b = world_area(before), world_area(after)
    best, best_err = (0, 0), math.inf
    shifts = [(dy, dx) for dy in range(-MAX_SHIFT, MAX_SHIFT + 1)
              for dx in range(-MAX_SHIFT, MAX_SHIFT + 1)]  # fmt: skip
    for dy, dx in sorted(shifts, key=lambda s: abs(s[0]) + abs(s[1])):
        err = float(overlap_mse(a, b, dy * tile, dx * tile))
        if err < best_err - 1e-12:
            best, best_err = (dy, dx), err
    return best


def spatial_detail(frames: Tensor) -> Tensor:
    """(N, C, H, W) -> (N,): per-frame pixel std of the world area, averaged over channels."""
    return world_area(frames).double().flatten(2).std(-1).mean(-1)


def _replay(seed: int, actions: np.ndarray, size: int, frame: np.ndarray) -> Any | None:
    """The environment at the end of an episode prefix, or None if it does not replay."""
    from dfserve.model.data.crafter import make_env

    env = make_env(seed, size)
    obs = env.reset()
    for a in actions:
        obs, *_ = env.step(int(a))
    return env if np.array_equal(obs, frame) else None


def _branch(env: Any, action: int, n: int) -> list[np.ndarray]:
    """n frames of `action` held from a copy of env (a replay costs seconds, a copy ms; a
    deep copy steps exactly as the original would)."""
    branch = copy.deepcopy(env)
    return [branch.step(action)[0] for _ in range(n)]


def move_fidelity(
    engine: RolloutEngine, bundle: Bundle, episodes: list[Episode], sampling: SamplingConfig,
    st: EvalSettings, picture: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Hold each move for 3 frames from held-out contexts (DESIGN §7). A case counts where the
    environment's world scrolls; it passes when the model's world scrolls by the same whole
    tiles (best_tile_shift from the last context frame to the 3rd generated frame). Also the
    mean MSE between the model's move_left and move_right rollouts against the env's.
    `picture`: the context where most moves scroll, env rows above model rows per move."""
    names = bundle.config.data.action_names
    size = bundle.config.network.resolution
    windows = pick_windows(episodes[: st.episodes], st.windows_per_episode, st.context, 3,
                           st.seed)  # fmt: skip
    cases, requests = [], []
    for w in windows:
        k, ep = w.first_generated, w.episode
        env = _replay(ep.seed, ep.actions[1:k], size, ep.frames[k - 1])
        if env is None:
            log.warning("episode %d does not replay exactly; skipped", ep.seed)
            continue
        env_frames = {move: uint8_to_unit(np.stack(_branch(env, names.index(move), 3)))
                      for move in MOVE_OFFSETS}  # fmt: skip
        cases.append((w, env_frames))
        requests += [window_request(bundle, w, sampling, st.seed, (names.index(m),) * 3)
                     for m in MOVE_OFFSETS]  # fmt: skip
    preds = [to_unit(p) for p in run_batch(engine, requests, st.max_batch, "move fidelity")]
    scrolled = same = 0
    most_scrolls, shown = -1, None
    left_right: dict[str, list[float]] = {"model": [], "env": []}
    per_move = {m: [0, 0] for m in MOVE_OFFSETS}  # passed, scrolled
    for i, (w, env_frames) in enumerate(cases):
        last = uint8_to_unit(w.episode.frames[w.first_generated - 1][None])[0]
        model = dict(zip(MOVE_OFFSETS, preds[4 * i : 4 * i + 4], strict=True))
        scrolls = sum(best_tile_shift(last, env_frames[m][2]) != (0, 0) for m in MOVE_OFFSETS)
        if scrolls > most_scrolls:
            most_scrolls, shown = scrolls, (last, env_frames, model)
        for move in MOVE_OFFSETS:
            env_shift = best_tile_shift(last, env_frames[move][2])
            if env_shift == (0, 0):
                continue
            ok = best_tile_shift(last, model[move][2]) == env_shift
            scrolled += 1
            same += ok
            per_move[move][0] += ok
            per_move[move][1] += 1
        left_right["model"].append(float(mse_per_frame(model["move_left"],
                                                       model["move_right"]).mean()))
        left_right["env"].append(float(mse_per_frame(env_frames["move_left"],
                                                     env_frames["move_right"]).mean()))
    if picture is not None and shown is not None:
        write_moves_grid(picture, *shown)
    model_lr, env_lr = float(np.mean(left_right["model"])), float(np.mean(left_right["env"]))
    return {
        "contexts": len(cases),
        "scrolling_cases": scrolled,
        "same_tile_shift": same,
        "same_tile_shift_fraction": same / max(scrolled, 1),
        "per_move": {m: f"{a}/{b}" for m, (a, b) in per_move.items()},
        "left_vs_right_mse": {"model": model_lr, "env": env_lr,
                              "ratio": model_lr / max(env_lr, 1e-12)},
    }  # fmt: skip


def persistence(
    engine: RolloutEngine, bundle: Bundle, episodes: list[Episode], sampling: SamplingConfig,
    st: EvalSettings,
) -> dict[str, Any]:  # fmt: skip
    """Rollouts of st.persistence_frames random moves (runs of one move, as the data's policy
    walks) from several held-out contexts: the world area's spatial detail over the last 60
    frames against the real held-out frames' (DESIGN §7: no dissolving into one texture)."""
    names = bundle.config.data.action_names
    moves = [names.index(m) for m in MOVE_OFFSETS]
    rng = np.random.default_rng(st.seed)
    windows = pick_windows(episodes[: st.persistence_contexts], 1, st.context,
                           1, st.seed)  # fmt: skip
    requests = []
    for i, w in enumerate(windows):
        actions: list[int] = []
        while len(actions) < st.persistence_frames:
            actions += [int(rng.choice(moves))] * int(rng.geometric(1 / 3.5))
        requests.append(window_request(bundle, w, sampling, st.seed + i,
                                       tuple(actions[: st.persistence_frames])))  # fmt: skip
    preds = [to_unit(p) for p in run_batch(engine, requests, st.max_batch, "persistence")]
    tail = min(60, st.persistence_frames)
    model = float(torch.cat([spatial_detail(p[-tail:]) for p in preds]).mean())
    real = float(torch.cat([spatial_detail(uint8_to_unit(e.frames)) for e in episodes]).mean())
    return {"rollouts": len(preds), "frames": st.persistence_frames, "last_frames": tail,
            "model_detail": model, "real_detail": real, "ratio": model / real}  # fmt: skip


def _policy_actions(bundle: Bundle, rng: np.random.Generator, n: int) -> list[int]:
    if bundle.config.data.env == "crafter":
        from dfserve.model.data.crafter import RandomRunPolicy

        return [int(a) for a in RandomRunPolicy().actions(rng, n)]
    return [int(a) for a in rng.integers(0, bundle.config.network.n_actions, n)]


def action_fidelity(
    engine: RolloutEngine, bundle: Bundle, episodes: list[Episode], sampling: SamplingConfig,
    st: EvalSettings,
) -> dict[str, Any]:  # fmt: skip
    """move_left vs move_right from one context, model against the env's own branches."""
    names = bundle.config.data.action_names
    moves = {"left": names.index("move_left"), "right": names.index("move_right")}
    n = st.fidelity_frames
    cases, requests = [], []
    for ep in episodes[: st.fidelity_episodes]:
        window = Window(ep, min(20, len(ep) // 4), st.context, n)
        if len(ep) <= window.first_generated:
            continue
        k = window.first_generated  # replay the episode, then branch
        env = _replay(ep.seed, ep.actions[1:k], bundle.config.network.resolution,
                      ep.frames[k - 1])  # fmt: skip
        if env is None:
            log.warning("episode %d does not replay exactly; skipped", ep.seed)
            continue
        env_frames = {name: uint8_to_unit(np.stack(_branch(env, action, n)))
                      for name, action in moves.items()}  # fmt: skip
        cases.append((ep, env_frames))
        for name in moves:
            requests.append(window_request(bundle, window, sampling, st.seed,
                                           (moves[name],) * n))  # fmt: skip
    preds = [to_unit(p) for p in run_batch(engine, requests, st.max_batch, "action fidelity")]
    per_episode, correct, informative = [], 0, 0
    for i, (ep, env_frames) in enumerate(cases):
        model = {"left": preds[2 * i], "right": preds[2 * i + 1]}
        d = {f"model_{m}_vs_env_{e}": float(mse_per_frame(model[m], env_frames[e]).mean())
             for m in moves for e in moves}  # fmt: skip
        d["env_left_vs_env_right"] = float(
            mse_per_frame(env_frames["left"], env_frames["right"]).mean()
        )
        d["model_left_vs_model_right"] = float(mse_per_frame(model["left"], model["right"]).mean())
        ok = (d["model_left_vs_env_left"] < d["model_left_vs_env_right"]
              and d["model_right_vs_env_right"] < d["model_right_vs_env_left"])  # fmt: skip
        if d["env_left_vs_env_right"] > 0:  # blocked both ways: nothing to tell apart
            informative += 1
            correct += ok
        per_episode.append({"seed": ep.seed, "same_action_closer": ok, **d})
    mean = {
        k: float(np.mean([c[k] for c in per_episode]))
        for k in (per_episode[0] if per_episode else {})
        if k.startswith(("model_", "env_"))
    }
    return {"frames": n, "episodes": per_episode, "mean_mse": mean,
            "same_action_closer": f"{correct}/{informative}"}  # fmt: skip


# --- pictures and videos ----------------------------------------------------------------------


def write_grid(path: Path, truth: Tensor, pred: Tensor, last_ctx: Tensor, scale: int = 2) -> None:
    """Per window: ground-truth row above rollout row; columns: last context frame, then the
    horizons of GRID_COLUMNS (the first column repeats the context frame in both rows)."""
    cols = [h for h in GRID_COLUMNS if h <= truth.shape[1]]
    rows = []
    for w in range(len(truth)):
        for seq in (truth[w], pred[w]):
            row = [last_ctx[w]] + [seq[h - 1] for h in cols]
            rows.append(np.concatenate([_pad(to_uint8(f)) for f in row], axis=1))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))  # gap between windows
    grid = np.concatenate(rows[:-1], axis=0)
    img = Image.fromarray(grid)
    img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST).save(path)


def write_moves_grid(
    path: Path, last: Tensor, env: dict[str, Tensor], model: dict[str, Tensor], scale: int = 3
) -> None:
    """Per move: the environment's row above the model's, each the last context frame and
    then the frames of the held move."""
    rows = []
    for move in env:
        for seq in (env[move], model[move]):
            frames = [last] + list(seq)
            rows.append(np.concatenate([_pad(to_uint8(f)) for f in frames], axis=1))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
    img = Image.fromarray(np.concatenate(rows[:-1], axis=0))
    img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST).save(path)


def _pad(frame: np.ndarray, width: int = 1) -> np.ndarray:
    return np.pad(frame, ((width, width), (width, width), (0, 0)), constant_values=255)


def write_mp4(path: Path, frames: np.ndarray, fps: int, scale: int = 4) -> bool:
    """The service's MP4 (model/media.py) of uint8 (N, H, W, 3) frames, upscaled (nearest)
    for viewing."""
    try:
        from dfserve.model.media import encode_mp4
    except ImportError:  # PyAV is a dependency of the service; be lenient in model/
        log.warning("PyAV not installed: %s not written", path)
        return False
    path.write_bytes(encode_mp4(list(frames), fps, scale))
    return True


# --- the command and the model card -----------------------------------------------------------


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def metrics_table(result: dict[str, Any]) -> str:
    """Markdown: PSNR/SSIM per horizon, model against copy-last."""
    lines = ["| horizon | PSNR model | PSNR copy-last | SSIM model | SSIM copy-last |",
             "| ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for h, row in result["horizons"].items():
        m, c = row["model"], row["copy_last"]
        lines.append(f"| {h} | {m['psnr']:.2f} | {c['psnr']:.2f} | {m['ssim']:.3f} | "
                     f"{c['ssim']:.3f} |")  # fmt: skip
    return "\n".join(lines)


def card_section(result: dict[str, Any]) -> str:
    s = result["sampling"]
    parts = [
        f"Held-out episodes (seeds {min(result['heldout_seeds'])}–"
        f"{max(result['heldout_seeds'])}), {result['windows']} windows of "
        f"{result['settings']['context']} context frames + {result['settings']['frames']} "
        f"frames with the true actions; sampling: {s['schedule']}, {s['sampler']}, "
        f"{s['steps']} steps, chunk {s['chunk_size']}, context noise {s['context_noise']}. "
        "PSNR = 10·log10(1/mean MSE) over all windows (dB); SSIM = mean per-frame SSIM.",
        "",
        metrics_table(result),
    ]
    if "mean_psnr_h1_16" in result:
        g = result["mean_psnr_h1_16"]
        parts += ["", f"Mean PSNR over every horizon 1–{g['horizons']}: {g['model']:.2f} dB "
                  f"against copy-last's {g['copy_last']:.2f} ({g['gain_db']:+.2f} dB)."]
    if "stability" in result:
        stab = result["stability"]
        parts += ["", f"Long rollout: {stab['frames']} frames, "
                  f"{stab['fraction_inside']:.1%} of frames with colour statistics inside the "
                  f"real frames' range ({stab['fraction_inside_last_10pct']:.1%} of the last "
                  f"10%), collapsed: {'yes' if stab['collapsed'] else 'no'}; "
                  f"{stab['frames_per_s_one_stream']} frames/s for one stream."]  # fmt: skip
    if "action_fidelity" in result:
        af = result["action_fidelity"]
        mm = af["mean_mse"]
        parts += ["", f"Action fidelity ({af['frames']} frames of move_left / move_right "
                  f"from the same context): the model's frames are closer to the env's "
                  f"frames of the same action in {af['same_action_closer']} episodes; mean "
                  f"MSE model-left↔env-left {mm.get('model_left_vs_env_left', 0):.4f}, "
                  f"↔env-right {mm.get('model_left_vs_env_right', 0):.4f}; model-right↔env-"
                  f"right {mm.get('model_right_vs_env_right', 0):.4f}, ↔env-left "
                  f"{mm.get('model_right_vs_env_left', 0):.4f}."]  # fmt: skip
    if "move_fidelity" in result:
        mf = result["move_fidelity"]
        lr = mf["left_vs_right_mse"]
        parts += ["", f"Move fidelity (each move held 3 frames from {mf['contexts']} held-out "
                  f"contexts): where the environment's world scrolls, the model's world "
                  f"scrolls by the same whole tiles in {mf['same_tile_shift']}/"
                  f"{mf['scrolling_cases']} cases ({mf['same_tile_shift_fraction']:.0%}; per "
                  f"move {', '.join(f'{m} {v}' for m, v in mf['per_move'].items())}). "
                  f"move_left vs move_right rollouts differ by MSE {lr['model']:.4f} "
                  f"(the environment's: {lr['env']:.4f}, ratio {lr['ratio']:.2f}).", "",
                  "![each move held from one context: environment (upper) and model (lower) "
                  "rows for left, right, up, down](eval_moves.png)"]  # fmt: skip
    if "persistence" in result:
        pe = result["persistence"]
        parts += ["", f"Persistence ({pe['rollouts']} rollouts of {pe['frames']} random moves): "
                  f"the world area's spatial detail over the last {pe['last_frames']} frames is "
                  f"{pe['ratio']:.0%} of the real frames' (pixel std {pe['model_detail']:.4f} "
                  f"vs {pe['real_detail']:.4f})."]  # fmt: skip
    parts += ["", "![ground truth (upper) and rollout (lower) rows](eval_grid.png)"]
    return "\n".join(parts)


def update_card(bundle_dir: Path, result: dict[str, Any], grid: Path) -> None:
    """Replace the card's evaluation block and copy the grid picture into the bundle."""
    card_path = bundle_dir / "README.md"
    card = card_path.read_text() if card_path.is_file() else f"# {result['model']}\n"
    card_path.write_text(with_card_block(card, EVAL_START, EVAL_END, card_section(result),
                                         "Evaluation"))  # fmt: skip
    shutil.copyfile(grid, bundle_dir / "eval_grid.png")
    moves = grid.with_name("moves.png")
    if moves.is_file():
        shutil.copyfile(moves, bundle_dir / "eval_moves.png")
    (bundle_dir / "metrics.json").write_text(json.dumps(_json_safe(result), indent=2) + "\n")


def evaluate_from_cli(args: argparse.Namespace) -> int:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    path = resolve_bundle(args.model)
    bundle = load_bundle(path)
    overrides = {k: getattr(args, k, None) for k in SAMPLING_FIELDS}
    sampling = sampling_from(bundle.config, overrides)
    defaults = EvalSettings()
    settings = EvalSettings(**{
        f: getattr(args, f) if getattr(args, f, None) is not None else getattr(defaults, f)
        for f in ("episodes", "context", "long_frames", "windows_per_episode",
                  "fidelity_episodes", "fidelity_frames", "persistence_contexts",
                  "persistence_frames", "seed", "max_batch")
    }, videos=not getattr(args, "no_video", False))  # fmt: skip
    if not 1 <= settings.context <= bundle.config.network.max_frames - sampling.chunk_size:
        raise FieldError("context", f"{settings.context} frames; the model takes 1 to "
                         f"{bundle.config.network.max_frames - sampling.chunk_size}")  # fmt: skip
    size = load_meta(args.data).get("resolution", [None])[0]
    if size != bundle.config.network.resolution:
        raise FieldError("data", f"{args.data} holds {size}-px frames, the model takes "
                         f"{bundle.config.network.resolution}; make held-out data with "
                         f"`dfserve dataset crafter --size {bundle.config.network.resolution}`")
    torch.set_grad_enabled(False)
    result = evaluate(bundle, load_episodes(args.data), args.out, sampling, settings,
                      args.device)  # fmt: skip
    lines = [metrics_table(result), *summary_lines(result)]
    if getattr(args, "update_card", False):
        update_card(path, result, args.out / "grid.png")
        lines.append(f"model card updated: {path / 'README.md'}")
    print("\n".join([*lines, f"metrics written to {args.out / 'metrics.json'}"]))  # noqa: T201
    return 0


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The headline figures of an evaluation, one line each, for the command's report."""
    g = result["mean_psnr_h1_16"]
    lines = [f"mean PSNR h1-{g['horizons']}: {g['model']:.2f} dB, copy-last "
             f"{g['copy_last']:.2f} ({g['gain_db']:+.2f} dB)"]  # fmt: skip
    if "stability" in result:
        s = result["stability"]
        lines.append(f"stability: {s['fraction_inside']:.1%} inside, collapsed="
                     f"{s['collapsed']}, {s['frames_per_s_one_stream']} frames/s")  # fmt: skip
    if "action_fidelity" in result:
        lines.append(f"action fidelity: same action closer in "
                     f"{result['action_fidelity']['same_action_closer']}")  # fmt: skip
    if "move_fidelity" in result:
        mf = result["move_fidelity"]
        lines.append(f"move fidelity: same tile shift in {mf['same_tile_shift']}/"
                     f"{mf['scrolling_cases']}, left-vs-right MSE ratio "
                     f"{mf['left_vs_right_mse']['ratio']:.2f}")  # fmt: skip
    if "persistence" in result:
        lines.append(f"persistence: world detail {result['persistence']['ratio']:.0%} of real")
    return lines
