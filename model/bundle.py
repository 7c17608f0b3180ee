"""Model bundles (DESIGN §5): a folder with config.json, model.safetensors, README.md, examples/.

Only safetensors are read: a folder holding a pickle checkpoint (.pt/.pth/.bin/.ckpt) and no
safetensors file is refused with a clear error, because unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dfserve.model.config import SAMPLERS, SCHEDULES, BundleConfig
from dfserve.model.diffusion import NoiseSchedule
from dfserve.model.errors import FieldError
from dfserve.model.frame_stack import frame_stack, image_channels, max_context_frames
from dfserve.model.network import CausalVideoDiT
from dfserve.model.unet3d import UNet3D

# The denoisers a bundle can name (config.architecture); the engine drives both through the
# same call (see CausalVideoDiT.forward) and asks `causal` whether a KV cache may be used.
Network = CausalVideoDiT | UNet3D

PACKAGED_BUNDLES = Path(__file__).parent / "bundles"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")


@dataclass(frozen=True)
class Example:
    """A bundled starting point: context frames (uint8 (K, R, R, 3)) and suggested actions."""

    name: str
    context: np.ndarray
    context_actions: tuple[int, ...]
    actions: tuple[int, ...]


@dataclass
class Bundle:
    config: BundleConfig
    network: Network
    path: Path | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule(self.config.diffusion)

    def action_index(self, action: str | int) -> int:
        return action_index(self.config, action)

    def examples(self) -> dict[str, Example]:
        return load_examples(self.config, self.path)

    def describe(self) -> dict[str, Any]:
        return describe(self.config, self.path)


def unconditional(config: BundleConfig) -> bool:
    """A model without actions (DF v1.5's video models): requests give only a frame count."""
    return not config.data.action_names and config.network.n_actions == 0


def action_index(config: BundleConfig, action: str | int, field: str = "actions") -> int:
    """Action name or index -> index; a FieldError naming `field` and the accepted actions."""
    names, n = config.data.action_names, config.network.n_actions

    def refuse(message: str) -> FieldError:
        return FieldError(field, message, accepted_actions(config))

    if unconditional(config):
        if action == n and not isinstance(action, bool):  # the null id the API stores
            return n
        raise refuse(f"{config.name} is unconditional and takes no actions; give `frames` only")
    if isinstance(action, bool) or not isinstance(action, (int, str)):
        raise refuse(f"{action!r} is not an action name or index")
    if isinstance(action, int):
        if 0 <= action < n:
            return action
        raise refuse(f"{action} outside [0, {n - 1}]")
    if action in names:
        return names.index(action)
    raise refuse(f"{action!r} is not an accepted value")


def accepted_actions(config: BundleConfig) -> list[str] | str:
    """What a request may give as an action: the names, or the range of indices."""
    return list(config.data.action_names) or f"0..{config.network.n_actions - 1}"


def load_examples(config: BundleConfig, path: Path | None) -> dict[str, Example]:
    if path is None or not (path / "examples").is_dir():
        return {}
    folders = sorted(d for d in (path / "examples").iterdir() if d.is_dir())
    return {d.name: load_example(config, d) for d in folders}


def describe(config: BundleConfig, path: Path | None) -> dict[str, Any]:
    """The document of GET /v1/models/{id} and `dfserve models --json` (no weights needed)."""
    c = config
    k = frame_stack(c)  # users see single frames; the window and chunks count stacked ones
    doc = {
        "id": c.name,
        "resolution": c.network.resolution,
        "channels": image_channels(c),
        "fps": c.data.fps,
        "n_frames": c.network.max_frames * k,
        "context_length": c.data.context_length,
        "max_context_frames": max_context_frames(c, c.sampling.chunk_size),
        "max_rollout_frames": c.max_rollout_frames,
        "actions": list(c.data.action_names),
        "schedules": list(SCHEDULES),
        "samplers": list(SAMPLERS),
        "defaults": asdict(c.sampling),
        "examples": sorted(load_examples(c, path)),
        "architecture": c.architecture,
    }
    if unconditional(c):  # DESIGN §5: no `actions` at all, not an empty list
        del doc["actions"]
    return doc


def load_config(path: str | Path) -> BundleConfig:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"model bundle {path}: config.json not found")
    try:
        return BundleConfig.from_dict(json.loads((path / "config.json").read_text()))
    except (ValueError, TypeError, AttributeError, KeyError) as e:  # JSONDecodeError too
        why = str(e).removeprefix("config.json: ")
        raise ValueError(f"model bundle {path}: config.json is malformed: {why}") from e


def build_network(config: BundleConfig) -> CausalVideoDiT:
    return CausalVideoDiT(config.network, config.diffusion.timesteps)


def build_denoiser(config: BundleConfig) -> Network:
    """The network of the bundle's architecture (one file per architecture in model/)."""
    if config.architecture == "unet3d":
        assert config.unet is not None  # BundleConfig.from_dict checks it
        return UNet3D(config.network, config.unet)
    return build_network(config)


def load_bundle(path: str | Path, dtype: torch.dtype = torch.float32) -> Bundle:
    path = Path(path)
    config = load_config(path)
    weights = path / "model.safetensors"
    if not weights.is_file():
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        why = f"only safetensors are loaded, pickle files {pickles} are refused" if pickles else ""
        raise ValueError(f"model bundle {path}: model.safetensors not found {why}".strip())
    network = build_denoiser(config)
    try:
        state = load_file(str(weights))
        network.load_state_dict(state)  # copied into float32 parameters, whatever was stored
    except (RuntimeError, OSError, SafetensorError) as e:  # bad header, shape mismatch
        raise ValueError(f"model bundle {path}: weights do not load: {e}") from e
    return Bundle(config=config, network=network.to(dtype).eval(), path=path)


def save_bundle(
    bundle_dir: str | Path,
    config: BundleConfig,
    network: torch.nn.Module,
    card: str = "",
    dtype: torch.dtype = torch.float32,
) -> Path:
    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    (bundle_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in network.state_dict().items()}
    save_file(state, str(bundle_dir / "model.safetensors"))
    (bundle_dir / "README.md").write_text(card or f"# {config.name}\n\nNo model card yet.\n")
    return bundle_dir


def with_card_block(card: str, start: str, end: str, body: str, heading: str) -> str:
    """The model card with the block between the markers `start` and `end` replaced by body,
    or, without the markers, appended under `heading`: a generated section that a rerun
    rewrites while the hand-written rest of the card stays."""
    block = f"{start}\n{body}\n{end}"
    if start in card and end in card:
        head, rest = card.split(start, 1)
        return head + block + rest.split(end, 1)[1]
    return card + f"\n## {heading}\n\n{block}\n"


def save_example(
    bundle_dir: str | Path,
    name: str,
    context: np.ndarray,
    context_actions: list[str],
    actions: list[str],
) -> None:
    """context: uint8 (K, R, R, 3). Actions are stored by name, readable and reorder-proof."""
    out = Path(bundle_dir) / "examples" / name
    out.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(context):
        Image.fromarray(frame).save(out / f"{i:03d}.png")
    doc = {"context_actions": context_actions, "actions": actions}
    (out / "actions.json").write_text(json.dumps(doc, indent=1) + "\n")


def load_example(config: BundleConfig, folder: Path) -> Example:
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))]
    doc = json.loads((folder / "actions.json").read_text())
    return Example(
        name=folder.name,
        context=np.stack(frames),
        context_actions=tuple(action_index(config, a) for a in doc.get("context_actions", [])),
        actions=tuple(action_index(config, a) for a in doc.get("actions", [])),
    )


def find_bundles(extra_dirs: list[Path] | None = None) -> dict[str, Path]:
    """Bundle id -> folder: the packaged bundles, then every folder in extra_dirs."""
    found: dict[str, Path] = {}
    for root in [PACKAGED_BUNDLES, *(extra_dirs or [])]:
        if not root.is_dir():
            continue
        candidates = [root] if (root / "config.json").is_file() else sorted(root.iterdir())
        for d in candidates:
            if (d / "config.json").is_file():
                try:
                    name = json.loads((d / "config.json").read_text()).get("name", d.name)
                except json.JSONDecodeError:
                    name = d.name
                found.setdefault(name, d)
    return found


def resolve_bundle(name_or_dir: str | None, extra_dirs: list[Path] | None = None) -> Path:
    """A bundle id (packaged or in extra_dirs) or a folder -> its folder.

    With no name: the packaged default (the only packaged bundle, or `DEFAULT_BUNDLE`).
    """
    if name_or_dir and Path(name_or_dir).is_dir():
        return Path(name_or_dir)
    found = find_bundles(extra_dirs)
    if name_or_dir is None:
        if DEFAULT_BUNDLE in found:
            return found[DEFAULT_BUNDLE]
        if found:
            return next(iter(found.values()))
        raise ValueError("model: no bundle found; pass --model DIR or set DFSERVE_MODELS_DIR")
    if name_or_dir in found:
        return found[name_or_dir]
    raise ValueError(f"model: {name_or_dir!r} is not one of {sorted(found)} nor a folder")


DEFAULT_BUNDLE = "crafter-cpu"
