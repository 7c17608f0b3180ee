"""Regenerate tests/fixtures/diffusion_forcing/ by running the diffusion-forcing research code once.

Not run by CI and not imported by dfserve. It needs a checkout of buoyancy99/diffusion-forcing
(`main`, v1.5) OUTSIDE this project and a separate virtual environment with what that code
imports (torch, lightning, omegaconf, einops, rotary-embedding-torch, diffusers):

    python3 -m venv /work/dfref/.venv
    /work/dfref/.venv/bin/pip install torch==2.13.0 lightning omegaconf einops \
        rotary_embedding_torch diffusers safetensors pyyaml
    /work/dfref/.venv/bin/python tools/make_df_fixture.py --reference /work/dfref \
        --out tests/fixtures/diffusion_forcing

(A venv whose site-packages also lists dfserve's own .venv in a .pth file reuses its torch.)

It makes two cases, each from its own seeds, so either regenerates bit for bit alone:
- frame_stack 1, in --out itself;
- frame_stack 2, in --out/frame_stack_2: the network sees pairs of frames stacked along
  channels (6 channels), the window, context and chunks count stacked frames, the output is
  unstacked (df_base._preprocess_batch / _unstack_and_unnormalize). 8x8 frames, a U-Net of
  two levels and a checkpoint saved without optimizer state keep it under 0.5 MB; only the
  context of its input video is stored (as `video`): the rest enters nothing but the loss.

What it writes for each (all produced by the reference's own code, nothing of it copied here):
- reference.ckpt: a small random-weight `DiffusionForcingVideo` saved by a real Lightning
  Trainer (one fit step at learning rate 0, so the weights are the random ones), i.e. exactly
  the format of the authors' checkpoints;
- config.yaml: the run's configuration in Hydra's layout (algorithm / dataset sections, as in a
  run's .hydra/config.yaml), for `dfserve import diffusion-forcing --config config.yaml`;
- forward.safetensors: fixed inputs x (F, B, C, R, R) and levels (F, B), and the Unet3D output
  (F, C in network frames: stacked ones with frame_stack 2);
- rollout.safetensors: a batch of 2 videos whose first frames are the context (2 frames; 4,
  i.e. 2 stacked, with frame_stack 2), the reference's `validation_step` output for it (pyramid
  matrix, 4 DDIM steps, eta 0, chunks of 3 in a window of 8, so the window slides several times
  and the last chunk is shorter), and the initial noise of every chunk the reference drew (so
  dfserve can start from the same noise);
- rollout.json: the sampling settings of that rollout.

Only things that are not part of the computation are stubbed: wandb, the metric networks and
the logging helpers (they are imported by the reference modules but unused here), and
torch.cuda.get_device_properties, which the reference's Attention calls even on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Case:
    """One fixture. window, context and frames count single frames (the reference's n_frames,
    context_frames and video length); chunk counts stacked frames (its chunk_size)."""

    folder: str  # under --out
    frame_stack: int = 1
    resolution: int = 16
    window: int = 8
    context: int = 2
    frames: int = 16
    chunk: int = 3
    steps: int = 4
    dim_mults: tuple[int, ...] = (1, 2, 4)
    attn_resolutions: tuple[int, ...] = (4, 16)
    full_video: bool = True  # store the whole input video as `video`, not only its context
    optimizer_state: bool = True  # the checkpoint as the authors' (with AdamW's moments)


CASES = (
    Case(folder=""),
    # window 8 and context 2 in stacked frames; 11 generated in chunks of 3, 3, 3, 2 (the window
    # slides at the third); 8x8 frames and a U-Net of two levels (linear spatial attention,
    # then full) keep it small
    Case(folder="frame_stack_2", frame_stack=2, resolution=8, window=16, context=4, frames=26,
         dim_mults=(1, 2), attn_resolutions=(4, 8), full_video=False, optimizer_state=False),
)  # fmt: skip


def stub_unused_modules() -> None:
    """Modules the reference imports for logging and metrics only."""
    import diffusers.models.embeddings  # noqa: F401  (before the wandb stub: it probes for wandb)

    wandb = types.ModuleType("wandb")
    sys.modules["wandb"] = wandb
    logging_utils = types.ModuleType("utils.logging_utils")
    for name in ("log_video", "get_validation_metrics_for_videos", "make_trajectory_images",
                 "get_random_start_goal"):  # fmt: skip
        setattr(logging_utils, name, lambda *a, **k: None)
    sys.modules["utils.logging_utils"] = logging_utils
    metrics = types.ModuleType("algorithms.common.metrics")
    for name in ("FrechetInceptionDistance", "LearnedPerceptualImagePatchSimilarity",
                 "FrechetVideoDistance"):  # fmt: skip
        setattr(metrics, name, type(name, (), {}))
    sys.modules["algorithms.common.metrics"] = metrics
    if not torch.cuda.is_available():
        torch.cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(major=0, minor=0)


def hydra_config(case: Case) -> dict:
    """A run configuration in Hydra's resolved layout; every U-Net branch is exercised (frame
    stack 1): linear spatial attention (level 0), a level without attention (1), full
    attention (2, mid)."""
    r = case.resolution
    return {
        "dataset": {"name": "fixture", "resolution": r, "n_frames": case.window,
                    "context_length": case.context, "frame_skip": 2, "data_mean": 0.5,
                    "data_std": 0.5, "external_cond_dim": 0},
        "algorithm": {
            "debug": False, "lr": 0.0, "x_shape": [3, r, r],
            "frame_stack": case.frame_stack, "frame_skip": 2, "data_mean": 0.5, "data_std": 0.5,
            "external_cond_dim": 0, "context_frames": case.context, "weight_decay": 2e-3,
            "warmup_steps": 10000, "optimizer_beta": [0.9, 0.99], "uncertainty_scale": 1,
            "guidance_scale": 0.0, "chunk_size": case.chunk, "scheduling_matrix": "pyramid",
            "noise_level": "random_all", "causal": True, "n_frames": case.window, "metrics": [],
            "diffusion": {
                "objective": "pred_v", "beta_schedule": "sigmoid", "schedule_fn_kwargs": {},
                "clip_noise": 6.0, "use_snr": False, "use_cum_snr": False,
                "use_fused_snr": True, "snr_clip": 5.0, "cum_snr_decay": 0.96,
                "timesteps": 1000, "sampling_timesteps": case.steps, "ddim_sampling_eta": 0.0,
                "stabilization_level": 15,
                "architecture": {
                    "network_size": 8, "attn_heads": 2, "attn_dim_head": 8,
                    "dim_mults": list(case.dim_mults), "resolution": r,
                    "attn_resolutions": list(case.attn_resolutions),
                    "use_init_temporal_attn": True, "use_linear_attn": True,
                    "time_emb_type": "rotary",
                },
            },
        },
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="diffusion-forcing checkout")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    sys.path.insert(0, str(args.reference.resolve()))
    stub_unused_modules()
    torch.set_num_threads(1)
    for case in CASES:
        make_case(case, args.out / case.folder)


def make_case(case: Case, out: Path) -> None:
    import lightning.pytorch as pl
    import yaml
    from algorithms.diffusion_forcing.df_video import DiffusionForcingVideo
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    config = hydra_config(case)
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cfg = OmegaConf.create(config["algorithm"])
    algo = DiffusionForcingVideo(cfg)
    with torch.no_grad():  # norms and biases random too (not 1 / 0), so a misplaced one shows
        for p in algo.parameters():
            if p.requires_grad and p.dim() == 1:  # not the rotary frequencies (fixed)
                p.add_(0.1 * torch.randn_like(p))

    # A real Lightning checkpoint: one optimizer step at lr 0 leaves the weights as they are.
    r = case.resolution
    videos = torch.rand(2, case.window, 3, r, r)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(videos), batch_size=2)
    run_dir = str(out / "_run")
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=run_dir,
                         callbacks=[pl.callbacks.ModelCheckpoint(dirpath=run_dir)])  # fmt: skip
    before = {k: v.clone() for k, v in algo.state_dict().items()}
    trainer.fit(algo, loader)
    ckpt_path = out / "reference.ckpt"
    trainer.save_checkpoint(str(ckpt_path), weights_only=not case.optimizer_state)
    for name, value in algo.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed in the lr-0 step"

    # The reference loads it back as its validation does (the Lightning state_dict).
    algo = DiffusionForcingVideo(cfg)
    algo.load_state_dict(torch.load(ckpt_path, weights_only=False)["state_dict"])
    algo.eval()

    gen = torch.Generator().manual_seed(1)
    n_stacked, channels = case.window // case.frame_stack, 3 * case.frame_stack
    x = torch.randn(n_stacked, 2, channels, r, r, generator=gen)
    levels = torch.randint(0, 1000, (n_stacked, 2), generator=gen)
    levels[0] = 14  # a stabilised context frame
    with torch.no_grad():
        y = algo.diffusion_model.model(x, levels, None, is_causal=True)
    save_file({"x": x, "levels": levels, "out": y.contiguous()},
              str(out / "forward.safetensors"))  # fmt: skip

    # One whole validation rollout: frames in [0, 1] (the reference normalises with 0.5 / 0.5).
    video = torch.rand(2, case.frames, 3, r, r, generator=gen)
    drawn: list[torch.Tensor] = []
    randn = torch.randn

    def recording_randn(*a, **k):  # the chunks' initial noise (the rows use randn_like)
        t = randn(*a, **k)
        drawn.append(t.clone())
        return t

    torch.manual_seed(2)
    torch.randn = recording_randn
    try:
        with torch.no_grad():
            algo.validation_step((video,), 0)
    finally:
        torch.randn = randn
    xs_pred, _ = algo.validation_step_outputs[-1]
    # (frames, B, C, R, R), unstacked and unnormalised
    given = {"video": video if case.full_video else video[:, : case.context].contiguous()}
    save_file({**given, "xs_pred": xs_pred.contiguous(),
               **{f"chunk_noise_{i}": t for i, t in enumerate(drawn)}},
              str(out / "rollout.safetensors"))  # fmt: skip
    doc = {"context": case.context, "frames": case.frames, "chunk_size": case.chunk,
           "steps": case.steps, "schedule": "pyramid", "uncertainty_scale": 1, "sampler": "ddim",
           "eta": 0.0, "stabilization_level": 15, "chunks": len(drawn),
           "torch": torch.__version__, "lightning": pl.__version__}  # fmt: skip
    if case.frame_stack != 1:  # the frame_stack 1 file stays as it was
        doc["frame_stack"] = case.frame_stack
    (out / "rollout.json").write_text(json.dumps(doc, indent=1) + "\n")
    for f in sorted((out / "_run").glob("*")):
        f.unlink()
    (out / "_run").rmdir()
    print("wrote", sorted(p.name for p in out.iterdir()))


if __name__ == "__main__":
    main()
