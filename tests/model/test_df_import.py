"""`dfserve import diffusion-forcing`: parity with the research code, and refusals.

The fixture (tests/fixtures/diffusion_forcing/) was made by running the reference code once
(tools/make_df_fixture.py): a random-weight Unet3D saved by a real Lightning Trainer, fixed
inputs, and the reference's own outputs.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.bundle import load_bundle
from model.importers.diffusion_forcing import import_checkpoint, read_checkpoint
from model.rollout import RolloutEngine, RolloutRequest

FIXTURE = Path(__file__).parents[1] / "fixtures" / "diffusion_forcing"
CKPT = FIXTURE / "reference.ckpt"
CONFIG = FIXTURE / "config.yaml"


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    return import_checkpoint(CKPT, tmp_path_factory.mktemp("df") / "df-fixture", str(CONFIG))


def test_import_then_forward_matches_the_reference(imported: Path) -> None:
    bundle = load_bundle(imported)
    ref = load_file(str(FIXTURE / "forward.safetensors"))
    x, levels = ref["x"].transpose(0, 1), ref["levels"].transpose(0, 1)  # reference is (F, B)
    with torch.no_grad():
        out, _, _ = bundle.network(x, levels)
    expected = ref["out"].transpose(0, 1)
    assert expected.abs().max() > 0.5  # a real signal, not a degenerate zero output
    assert (out - expected).abs().max() < 1e-5


def test_imported_bundle_describes_the_run(imported: Path) -> None:
    bundle = load_bundle(imported)
    c = bundle.config
    assert c.architecture == "unet3d" and c.unet is not None
    assert (c.unet.dim, c.unet.dim_mults, c.unet.attn_dim_head) == (8, (1, 2, 4), 8)
    assert (c.network.resolution, c.network.max_frames, c.data.context_length) == (16, 8, 2)
    assert c.diffusion.objective == "v" and c.diffusion.beta_schedule == "sigmoid"
    assert c.sampling.context_noise == 14 and c.sampling.context_noise_mode == "scaled"
    assert c.data.action_names == ()
    card = (imported / "README.md").read_text()
    assert "buoyancy99/diffusion-forcing" in card and "reference.ckpt" in card


def test_ema_weights_are_preferred(tmp_path: Path, one_thread: None) -> None:
    ckpt = torch.load(CKPT, weights_only=True)
    prefix = "diffusion_model.model.module."
    state = ckpt["state_dict"]
    for k in [k for k in state if k.startswith(prefix) and k.endswith("init_conv.bias")]:
        state["ema_model." + k] = state[k] + 1.0
    for k in [k for k in state if k.startswith(prefix) and not k.endswith("init_conv.bias")]:
        state["ema_model." + k] = state[k]
    torch.save(ckpt, tmp_path / "ema.ckpt")
    bundle = load_bundle(import_checkpoint(tmp_path / "ema.ckpt", tmp_path / "b", str(CONFIG)))
    plain = load_bundle(import_checkpoint(CKPT, tmp_path / "p", str(CONFIG)))
    diff = bundle.network.init_conv.bias - plain.network.init_conv.bias
    assert torch.allclose(diff, torch.ones_like(diff))
    assert "EMA" in (tmp_path / "b" / "README.md").read_text()


class Payload:
    """Unpickling this would call print: code a weights-only load must never run."""

    def __reduce__(self) -> tuple:
        return (print, ("this ran",))


def test_pickled_code_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Payload()}, path)
    with pytest.raises(ValueError, match=r"pickled Python objects \(print\).*weights_only=True"):
        read_checkpoint(path)
    assert "this ran" not in capsys.readouterr().out


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04broken zip"])
def test_malformed_checkpoint_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="checkpoint: .* is not a readable torch checkpoint"):
        read_checkpoint(path)


def test_raw_pickle_and_truncated_zip_are_refused(tmp_path: Path) -> None:
    raw = tmp_path / "raw.ckpt"
    raw.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="checkpoint: "):
        read_checkpoint(raw)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(CKPT.read_bytes()[:5000])
    with pytest.raises(ValueError, match="checkpoint: "):
        read_checkpoint(cut)
    assert not zipfile.is_zipfile(cut)


def test_wrong_configuration_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is --config the run's"):
        import_checkpoint(CKPT, tmp_path / "b", "dmlab")
    assert not (tmp_path / "b").exists()


def test_not_a_df_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, path)
    with pytest.raises(ValueError, match="no weights under"):
        import_checkpoint(path, tmp_path / "b", str(CONFIG))


def test_fixture_metadata_matches_the_test_settings() -> None:
    doc = json.loads((FIXTURE / "rollout.json").read_text())
    assert (doc["context"], doc["steps"], doc["schedule"], doc["sampler"]) == (
        2, 4, "pyramid", "ddim")  # fmt: skip


def test_whole_rollout_matches_the_reference(imported: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The reference's validation loop on a batch of 2: context 2 frames, 14 generated in
    chunks of 3 (the last of 2) with a window of 8, so it slides 3 times; pyramid matrix, 4
    DDIM steps, eta 0, stabilization level 15. Both rollouts run batched in one engine, each
    starting every chunk from the noise the reference drew for it."""
    ref = load_file(str(FIXTURE / "rollout.safetensors"))
    doc = json.loads((FIXTURE / "rollout.json").read_text())
    bundle = load_bundle(imported)
    engine = RolloutEngine(bundle)
    assert not engine.use_cache
    noises = [ref[f"chunk_noise_{i}"] for i in range(doc["chunks"])]  # (h, B, C, R, R)
    video = (ref["video"] - 0.5) / 0.5  # the reference's normalisation, (B, T, C, R, R)
    sampling = replace(bundle.config.sampling, schedule="pyramid", steps=4, chunk_size=3)
    requests = [RolloutRequest(video[b, :2], (0,) * (doc["frames"] - 2), sampling, seed=b)
                for b in range(2)]  # fmt: skip
    states = [engine.start(r) for r in requests]
    owner = {id(st.generator): b for b, st in enumerate(states)}
    drawn = [0, 0]

    def reference_noise(shape: torch.Size, generator: torch.Generator, clip: float,
                        like: torch.Tensor) -> torch.Tensor:  # fmt: skip
        b = owner[id(generator)]
        noise = noises[drawn[b]][:, b]
        drawn[b] += 1
        assert noise.shape == shape
        return noise.clamp(-clip, clip).to(like)

    monkeypatch.setattr("model.rollout.draw_noise", reference_noise)
    frames: list[list[torch.Tensor]] = [[], []]
    while not all(st.done for st in states):
        for b, out in enumerate(engine.step(states)):
            frames[b].extend(f for _, f in out)
    assert drawn == [doc["chunks"]] * 2
    ours = torch.stack([torch.stack(f) for f in frames], dim=1) * 0.5 + 0.5  # (T, B, C, R, R)
    expected = ref["xs_pred"][2:]  # the reference's frames, unnormalised
    assert expected.std() > 0.1
    assert (ours - expected).abs().max() < 1e-4


@pytest.mark.parametrize(("preset", "resolution", "window", "beta"),
                         [("dmlab", 64, 16, "cosine"), ("minecraft", 128, 10, "sigmoid")])
def test_presets_are_the_reference_configs(preset: str, resolution: int, window: int,
                                           beta: str) -> None:  # fmt: skip
    from model.importers.df_config import bundle_config, load_df_config
    from model.unet3d import UNet3D

    config = bundle_config(load_df_config(preset), preset)
    assert (config.network.resolution, config.network.max_frames) == (resolution, window)
    assert config.diffusion.beta_schedule == beta and config.diffusion.objective == "v"
    assert config.diffusion.clip_noise == 6.0 and config.sampling.steps == 100
    assert (config.sampling.sampler, config.sampling.eta) == ("ddim", 0.0)
    assert (config.sampling.schedule, config.sampling.chunk_size) == ("autoregressive", 1)
    assert config.sampling.context_noise == 14  # stabilization_level 15, minus one
    assert config.unet is not None
    net = UNet3D(config.network, config.unet)  # every level has attention at these sizes
    assert all(level.temporal is not None for level in [*net.down, *net.up])


def test_frame_stack_is_refused_clearly(tmp_path: Path) -> None:
    import yaml

    doc = yaml.safe_load(CONFIG.read_text())
    doc["algorithm"]["frame_stack"] = 2
    (tmp_path / "fs.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match="frame_stack 2 is not supported"):
        import_checkpoint(CKPT, tmp_path / "b", str(tmp_path / "fs.yaml"))
