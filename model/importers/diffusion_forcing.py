"""`dfserve import diffusion-forcing`: a research checkpoint (DF v1.5 `Unet3D`) as a bundle.

The checkpoint is what the reference's Lightning Trainer saves: a dict whose `state_dict` holds
the `DiffusionForcingVideo` module, the U-Net under `diffusion_model.model.module.` (the
EinopsWrapper around Unet3D), the diffusion buffers (recomputed by dfserve, not read) and the
data normalisation `data_mean` / `data_std`. It is read with torch.load(weights_only=True):
tensors and plain containers only, so a file that pickles Python objects (code) is refused
before anything in it runs.

The name map below is the whole of what ties the reference's module tree to model/unet3d.py;
the reference's Conv3d kernels (out, in, 1, k, k) become Conv2d kernels (out, in, k, k).
"""

from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dfserve.model.bundle import save_bundle
from dfserve.model.config import BundleConfig
from dfserve.model.frame_stack import frame_stack
from dfserve.model.importers.df_config import bundle_config, load_df_config
from dfserve.model.unet3d import UNet3D

UNET_PREFIX = "diffusion_model.model.module."
# EMA copies, preferred when present: ema-pytorch / torch-ema style prefixes in the
# state_dict, or a separate top-level `ema_state_dict` (the v1.5 trainer itself keeps none)
EMA_PREFIXES = ("ema_model.", "ema.", "model_ema.")

_RES = r"(in_layers\.0|in_layers\.2|out_layers\.0|out_layers\.2|emb_layers\.1|skip_conv)"
_RES_PARTS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "out_layers.0": "norm2",
              "out_layers.2": "conv2", "emb_layers.1": "emb", "skip_conv": "skip"}  # fmt: skip
_ATTN = {"norm": "norm", "attn.to_qkv": "qkv", "attn.to_out": "out"}
_TEMPORAL = r"wrapper\.module\.attn_block\.(norm|attn\.to_qkv|attn\.to_out)"
_SPATIAL = r"wrapper\.module\.(norm|attn\.to_qkv|attn\.to_out)"

# reference name (after UNET_PREFIX, without .weight/.bias) -> dfserve name, in order
NAME_MAP: list[tuple[str, Any]] = [
    (r"noise_level_pos_embedding\.1\.linear_1", "level_mlp.0"),
    (r"noise_level_pos_embedding\.1\.linear_2", "level_mlp.2"),
    (r"init_conv", "init_conv"),
    (rf"init_temporal_attn\.{_TEMPORAL}", lambda m: f"init_temporal.{_ATTN[m[1]]}"),
    (rf"down_blocks\.(\d+)\.0\.([01])\.{_RES}",
     lambda m: f"down.{m[1]}.res{int(m[2]) + 1}.{_RES_PARTS[m[3]]}"),
    (rf"down_blocks\.(\d+)\.0\.2\.{_SPATIAL}", lambda m: f"down.{m[1]}.spatial.{_ATTN[m[2]]}"),
    (rf"down_blocks\.(\d+)\.0\.3\.{_TEMPORAL}", lambda m: f"down.{m[1]}.temporal.{_ATTN[m[2]]}"),
    (r"down_blocks\.(\d+)\.1\.conv", lambda m: f"down.{m[1]}.conv"),
    (rf"mid_block\.([03])\.{_RES}", lambda m: f"mid{1 if m[1] == '0' else 2}.{_RES_PARTS[m[2]]}"),
    (rf"mid_block\.1\.{_SPATIAL}", lambda m: f"mid_spatial.{_ATTN[m[1]]}"),
    (rf"mid_block\.2\.{_TEMPORAL}", lambda m: f"mid_temporal.{_ATTN[m[1]]}"),
    (rf"up_blocks\.(\d+)\.([01])\.{_RES}",
     lambda m: f"up.{m[1]}.res{int(m[2]) + 1}.{_RES_PARTS[m[3]]}"),
    (rf"up_blocks\.(\d+)\.2\.{_SPATIAL}", lambda m: f"up.{m[1]}.spatial.{_ATTN[m[2]]}"),
    (rf"up_blocks\.(\d+)\.3\.{_TEMPORAL}", lambda m: f"up.{m[1]}.temporal.{_ATTN[m[2]]}"),
    (r"up_blocks\.(\d+)\.4\.conv", lambda m: f"up.{m[1]}.conv"),
    (rf"out\.0\.{_RES}", lambda m: f"out_res.{_RES_PARTS[m[1]]}"),
    (r"out\.1", "out_conv"),
]
ROTARY = re.compile(r"(.*\.)?rotary_(time_pos_embedding|emb)\.freqs")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load(weights_only=True), with every failure turned into one clear ValueError."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint: {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found is None:  # not a pickle at all, or a corrupt one
            raise ValueError(f"checkpoint: {path} is not a readable torch checkpoint") from e
        raise ValueError(
            f"checkpoint: {path} is refused: it holds pickled Python objects ({found[1]}), "
            "not only tensors, and only weights are read (torch.load weights_only=True); "
            "re-save its state_dict with tensors only"
        ) from e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise ValueError(f"checkpoint: {path} is not a readable torch checkpoint: {e}") from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint: {path} holds a {type(ckpt).__name__}, not a dict")
    return ckpt


def unet_weights(ckpt: dict[str, Any]) -> tuple[dict[str, Tensor], str]:
    """The Unet3D's reference-named weights, EMA ones when present; and which were taken."""
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, dict):
        raise ValueError("checkpoint: `state_dict` is not a dict of tensors")
    sources: list[tuple[dict[str, Any], str, str]] = []
    if isinstance(ckpt.get("ema_state_dict"), dict):
        sources.append((ckpt["ema_state_dict"], "", "EMA weights (ema_state_dict)"))
    sources += [(state, p, f"EMA weights ({p}*)") for p in EMA_PREFIXES]
    sources.append((state, "", "network weights (no EMA in the checkpoint)"))
    for source, prefix, what in sources:
        full = prefix + UNET_PREFIX
        found = {k[len(full) :]: v for k, v in source.items() if k.startswith(full)}
        if found:
            bad = [k for k, v in found.items() if not isinstance(v, Tensor)]
            if bad:
                raise ValueError(f"checkpoint: {bad[:3]} are not tensors")
            return found, what
    raise ValueError(f"checkpoint: no weights under {UNET_PREFIX!r}; is this a diffusion-"
                     "forcing v1.5 video checkpoint (a DiffusionForcingVideo's Unet3D)?")


def rename(ref_name: str) -> str | None:
    """Reference parameter name -> dfserve name; None for the rotary frequencies."""
    stem, _, leaf = ref_name.rpartition(".")
    if ROTARY.fullmatch(ref_name):
        return None
    for pattern, target in NAME_MAP:
        m = re.fullmatch(pattern, stem)
        if m:
            return f"{target(m) if callable(target) else target}.{leaf}"
    raise ValueError(f"checkpoint: parameter {ref_name!r} is not part of the v1.5 Unet3D")


def convert(weights: dict[str, Tensor], config: BundleConfig) -> dict[str, Tensor]:
    """Reference-named weights -> the state_dict of UNet3D(config), checked name by name and
    shape by shape; the rotary frequencies must be the ones config's rope_base gives."""
    assert config.unet is not None
    expected = UNet3D(config.network, config.unet).state_dict()
    out: dict[str, Tensor] = {}
    for name, value in weights.items():
        target = rename(name)
        if target is None:
            check_rotary(name, value, config.unet.rope_base)
            continue
        if value.dim() == 5:  # Conv3d (out, in, 1, k, k): one frame at a time
            if value.shape[2] != 1:
                raise ValueError(f"checkpoint: {name} has a temporal kernel {value.shape[2]}")
            value = value[:, :, 0]
        if target not in expected:
            raise ValueError(f"checkpoint: {name} ({target}) does not exist in a U-Net of "
                             "this configuration; is --config the run's?")  # fmt: skip
        if tuple(value.shape) != tuple(expected[target].shape):
            raise ValueError(f"checkpoint: {name} has shape {tuple(value.shape)}, the "
                             f"configuration gives {tuple(expected[target].shape)}; is "
                             "--config the run's?")  # fmt: skip
        out[target] = value.to(torch.float32).contiguous()
    missing = sorted(set(expected) - set(out))
    if missing:
        raise ValueError(f"checkpoint: {len(missing)} weights of this configuration are "
                         f"missing, e.g. {missing[:3]}; is --config the run's?")  # fmt: skip
    return out


def check_rotary(name: str, freqs: Tensor, base: float) -> None:
    d = 2 * freqs.numel()
    want = 1.0 / (base ** (torch.arange(0, d, 2).float() / d))
    if not torch.equal(freqs.float(), want):
        raise ValueError(f"checkpoint: {name} are not rotary-embedding-torch's defaults "
                         f"(theta {base}); learned or rescaled frequencies are unsupported")


def check_head_dim(config: BundleConfig, weights: dict[str, Tensor]) -> None:
    """The rotary frequencies give the attention head dim exactly: compare with the config."""
    assert config.unet is not None
    freqs = [v for k, v in weights.items() if ROTARY.fullmatch(k)]
    if freqs and 2 * freqs[0].numel() != config.unet.attn_dim_head:
        raise ValueError(f"checkpoint: attention head dim {2 * freqs[0].numel()}, the "
                         f"configuration says {config.unet.attn_dim_head}; is --config the "
                         "run's?")  # fmt: skip


def normalisation(ckpt: dict[str, Any], config: BundleConfig) -> BundleConfig:
    """The checkpoint's own data_mean / data_std buffers win over the configuration."""
    state = ckpt.get("state_dict", {})
    mean, std = state.get("data_mean"), state.get("data_std")
    if not isinstance(mean, Tensor) or not isinstance(std, Tensor):
        return config
    if mean.numel() != 1 or std.numel() != 1:
        raise ValueError("checkpoint: per-channel data_mean/data_std are not supported")
    m, s = float(mean), float(std)
    data = replace(config.data, pixel_scale=255.0 * s, pixel_shift=-m / s)
    return replace(config, data=data)


def import_checkpoint(ckpt_path: str | Path, out: str | Path, df_config: str = "dmlab",
                      name: str | None = None) -> Path:  # fmt: skip
    """Read, map and check a DF v1.5 checkpoint; write a bundle; return its folder."""
    ckpt_path, out = Path(ckpt_path), Path(out)
    ckpt = read_checkpoint(ckpt_path)
    weights, which = unet_weights(ckpt)
    config = bundle_config(load_df_config(df_config), name or out.name)
    check_head_dim(config, weights)
    config = normalisation(ckpt, config)
    state = convert(weights, config)
    assert config.unet is not None
    network = UNet3D(config.network, config.unet)
    network.load_state_dict(state)
    card = model_card(config, ckpt_path, ckpt, which, df_config)
    return save_bundle(out, config, network, card)


def model_card(config: BundleConfig, path: Path, ckpt: dict[str, Any], which: str,
               df_config: str) -> str:  # fmt: skip
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    s, n = config.sampling, config.network
    step = ckpt.get("global_step", "unknown")
    frames = f"{n.resolution}x{n.resolution}, window {config.data.n_frames}, context " \
        f"{config.data.context_length}"
    chunks = f"{s.chunk_size}"
    if (fs := frame_stack(config)) > 1:  # the loop's counts are in stacked frames
        frames += f", frame_stack {fs} (the network sees {n.max_frames} frames of {fs} stacked)"
        chunks += " stacked frames"
    sampling = f"{s.sampler} eta {s.eta}, {s.steps} steps, {s.schedule}, chunks of " \
        f"{chunks}, stabilization level {s.context_noise + 1}"
    return f"""# {config.name}

Imported with `dfserve import diffusion-forcing` from a checkpoint of the Diffusion Forcing
research code (github.com/buoyancy99/diffusion-forcing, `main` = v1.5, `Unet3D`).

| | |
| --- | --- |
| source | `{path.name}` (sha256 `{digest}`) |
| training step | {step} |
| weights | {which} |
| configuration | `{df_config}` |
| frames | {frames} |
| sampling (the reference's) | {sampling} |

The model is unconditional: it takes context frames and a frame count, no actions.
Metrics, data and compute are those of the original run; dfserve has not re-evaluated it.

Known limits: the U-Net's GroupNorm spans the whole window, so the network is not causal in
time and every denoising row recomputes the window (no KV cache, as in the reference).
"""
