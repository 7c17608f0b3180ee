"""The diffusion-forcing research code's Hydra configurations as dfserve bundle configs.

A run of the reference (buoyancy99/diffusion-forcing, v1.5) is configured by Hydra: an
`algorithm` section (configurations/algorithm/df_base.yaml + df_video.yaml) and a `dataset`
section (configurations/dataset/base_video.yaml + video_dmlab.yaml / video_minecraft.yaml).
`--config PATH.yaml` reads a run's resolved config in that layout (its .hydra/config.yaml);
`dmlab` and `minecraft` are those files' values, merged here as presets.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, cast

from dfserve.model.config import (
    BundleConfig,
    DataConfig,
    DiffusionConfig,
    NetworkConfig,
    SamplingConfig,
    UNet3DConfig,
)

# df_base.yaml + df_video.yaml (the algorithm section every video run starts from)
_ALGORITHM: dict[str, Any] = {
    "frame_stack": 1,
    "context_frames": None,  # ${dataset.context_length}
    "chunk_size": 1,
    "scheduling_matrix": "autoregressive",
    "uncertainty_scale": 1,
    "data_mean": 0.5,
    "data_std": 0.5,
    "diffusion": {
        "objective": "pred_v", "beta_schedule": "sigmoid", "clip_noise": 6.0,
        "timesteps": 1000, "sampling_timesteps": 100, "ddim_sampling_eta": 0.0,
        "stabilization_level": 15,
        "architecture": {
            "network_size": 64, "attn_heads": 4, "attn_dim_head": 64, "dim_mults": [1, 2, 4, 8],
            "attn_resolutions": [16, 32, 64, 128], "use_init_temporal_attn": True,
            "use_linear_attn": True, "time_emb_type": "rotary",
        },
    },
}  # fmt: skip

# video_minecraft.yaml, and video_dmlab.yaml with the README's DMLab training overrides
# (network_size 48, attn_dim_head 32, attn_resolutions [8, 16, 32, 64], cosine betas)
PRESETS: dict[str, dict[str, Any]] = {
    "minecraft": {
        "dataset": {"name": "minecraft", "resolution": 128, "n_frames": 10,
                    "context_length": 2, "frame_skip": 2},
        "algorithm": _ALGORITHM,
    },
    "dmlab": {
        "dataset": {"name": "dmlab", "resolution": 64, "n_frames": 16, "context_length": 2,
                    "frame_skip": 2},
        "algorithm": {**_ALGORITHM, "diffusion": {
            **_ALGORITHM["diffusion"], "beta_schedule": "cosine",
            "architecture": {**_ALGORITHM["diffusion"]["architecture"], "network_size": 48,
                             "attn_dim_head": 32, "attn_resolutions": [8, 16, 32, 64]},
        }},
    },
}  # fmt: skip

_OBJECTIVES = {"pred_v": "v", "pred_noise": "eps", "pred_x0": "x0"}
# TECO's DMLab and Minecraft videos, sampled every frame_skip-th frame by the reference
_FPS = 8


def load_df_config(name_or_path: str) -> dict[str, Any]:
    """A preset name or a YAML file in Hydra's layout -> {"dataset": ..., "algorithm": ...}."""
    if name_or_path in PRESETS:
        return copy.deepcopy(PRESETS[name_or_path])
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"--config: {name_or_path!r} is neither one of {sorted(PRESETS)} "
                         "nor a YAML file")  # fmt: skip
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"--config: {path} is not valid YAML: {e}") from e
    if not isinstance(doc, dict) or not {"algorithm", "dataset"} <= set(doc):
        raise ValueError(f"--config: {path} needs `algorithm` and `dataset` sections "
                         "(a run's .hydra/config.yaml)")  # fmt: skip
    return cast(dict[str, Any], _resolve(doc, doc))  # a dict resolves to a dict


def _resolve(node: Any, root: dict[str, Any]) -> Any:
    """Resolve Hydra's `${a.b}` interpolations (the only ones the reference's configs use)."""
    if isinstance(node, dict):
        return {k: _resolve(v, root) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, root) for v in node]
    if isinstance(node, str) and (m := re.fullmatch(r"\$\{([\w.]+)\}", node)):
        value: Any = root
        for part in m.group(1).split("."):
            if not isinstance(value, dict) or part not in value:
                raise ValueError(f"--config: cannot resolve {node}")
            value = value[part]
        return _resolve(value, root)
    return node


def bundle_config(df: dict[str, Any], name: str) -> BundleConfig:
    """The bundle config of a reference run: the U-Net, its diffusion, and its sampling loop
    (DDIM, the run's scheduling matrix and chunk size, stabilization as the context level)."""
    data, algo = df["dataset"], df["algorithm"]
    diff, arch = algo["diffusion"], algo["diffusion"]["architecture"]
    if arch.get("time_emb_type", "rotary") != "rotary":
        raise ValueError("--config: only time_emb_type rotary is supported (the v1.5 default)")
    if algo.get("external_cond_dim") or data.get("external_cond_dim"):
        raise ValueError("--config: external_cond_dim > 0 (actions) is not implemented by the "
                         "reference's Unet3D either")  # fmt: skip
    if diff["objective"] not in _OBJECTIVES:
        raise ValueError(f"--config: objective {diff['objective']!r} is not one of "
                         f"{sorted(_OBJECTIVES)}")  # fmt: skip
    # frame_stack: the network and the sampling loop work on stacked frames of fs frames
    # (model/frame_stack.py); n_frames and the context are given in single frames, chunk_size
    # in stacked ones, as in the reference (df_video: n_tokens = n_frames // frame_stack)
    fs = int(algo.get("frame_stack", 1))
    n_frames = int(data["n_frames"])
    context_frames = int(algo.get("context_frames") or data["context_length"])
    if fs < 1:
        raise ValueError(f"--config: frame_stack {fs} must be >= 1")
    for field, value in (("n_frames", n_frames), ("context_frames", context_frames)):
        if value % fs:  # the reference's _preprocess_batch raises for either
            raise ValueError(f"--config: {field} {value} is not a multiple of frame_stack {fs}")
    window, context = n_frames // fs, context_frames // fs
    chunk = int(algo.get("chunk_size", 1))
    chunk = window - context if chunk <= 0 else chunk  # -1: the whole rest of the window
    mean, std = float(algo.get("data_mean", 0.5)), float(algo.get("data_std", 0.5))
    stabilization = int(diff["stabilization_level"])
    return BundleConfig(
        name=name,
        architecture="unet3d",
        network=NetworkConfig(resolution=int(data["resolution"]), channels=3 * fs,
                              max_frames=window, n_actions=0),  # fmt: skip
        diffusion=DiffusionConfig(
            timesteps=int(diff["timesteps"]), beta_schedule=diff["beta_schedule"],
            objective=_OBJECTIVES[diff["objective"]], clip_noise=float(diff["clip_noise"]),
        ),  # fmt: skip
        data=DataConfig(
            # the data's frames are single frames: the window and default context times fs
            env=str(data.get("name", "diffusion-forcing")), fps=_FPS, n_frames=window * fs,
            context_length=context * fs, action_names=(),
            # the reference feeds (x/255 - mean) / std: x / (255 std) - mean / std
            pixel_scale=255.0 * std, pixel_shift=-mean / std,
        ),  # fmt: skip
        sampling=SamplingConfig(
            schedule=algo.get("scheduling_matrix", "autoregressive"), sampler="ddim",
            steps=int(diff["sampling_timesteps"]), eta=float(diff.get("ddim_sampling_eta", 0)),
            uncertainty_scale=float(algo.get("uncertainty_scale", 1)), chunk_size=chunk,
            # ddim_sample_step: a clean frame is labelled stabilization_level - 1 and scaled
            # by sqrt(alpha_bar) of that level, with no noise added
            context_noise=stabilization - 1, context_noise_mode="scaled",
        ),  # fmt: skip
        unet=UNet3DConfig(
            dim=int(arch["network_size"]), dim_mults=tuple(arch["dim_mults"]),
            attn_resolutions=tuple(arch["attn_resolutions"]), attn_heads=int(arch["attn_heads"]),
            attn_dim_head=int(arch["attn_dim_head"]),
            use_linear_attn=bool(arch["use_linear_attn"]),
            use_init_temporal_attn=bool(arch["use_init_temporal_attn"]), frame_stack=fs,
        ),  # fmt: skip
    )
