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
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

from dfserve.model.bundle import load_bundle
from dfserve.model.importers.diffusion_forcing import import_checkpoint, read_checkpoint
from dfserve.model.rollout import RolloutEngine, RolloutRequest, RolloutState

FIXTURE = Path(__file__).parents[1] / "fixtures" / "diffusion_forcing"
CKPT = FIXTURE / "reference.ckpt"
CONFIG = FIXTURE / "config.yaml"



def reference_noise(noises: list[torch.Tensor], owner: dict[int, int], drawn: list[int]) -> Any:
    """A stand-in for model.rollout.draw_noise that hands each rollout (by its generator, in
    `owner`) the reference's recorded chunk noises in order, counting them in `drawn`."""

    def draw(shape: torch.Size, generator: torch.Generator, clip: float,
             like: torch.Tensor) -> torch.Tensor:  # fmt: skip
        b = owner[id(generator)]
        noise = noises[drawn[b]][:, b]
        drawn[b] += 1
        assert noise.shape == shape
        return noise.clamp(-clip, clip).to(like)

    return draw

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
    monkeypatch.setattr("dfserve.model.rollout.draw_noise", reference_noise(noises, owner, drawn))
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
    from dfserve.model.importers.df_config import bundle_config, load_df_config
    from dfserve.model.unet3d import UNet3D

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


# --- frame_stack 2 (tests/fixtures/diffusion_forcing/frame_stack_2) ------------------------

FS2 = FIXTURE / "frame_stack_2"


@pytest.fixture(scope="module")
def imported_fs2(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    out = tmp_path_factory.mktemp("df") / "df-fs2"
    return import_checkpoint(FS2 / "reference.ckpt", out, str(FS2 / "config.yaml"))


def test_frame_stack_2_forward_matches_the_reference(imported_fs2: Path) -> None:
    """The network's frames are stacked ones: 6 channels, a window of 8."""
    bundle = load_bundle(imported_fs2)
    ref = load_file(str(FS2 / "forward.safetensors"))
    x, levels = ref["x"].transpose(0, 1), ref["levels"].transpose(0, 1)
    assert x.shape[1:3] == (8, 6)
    with torch.no_grad():
        out, _, _ = bundle.network(x, levels)
    expected = ref["out"].transpose(0, 1)
    assert expected.abs().max() > 0.5
    assert (out - expected).abs().max() < 1e-5


def test_frame_stack_2_bundle_counts_stacked_frames_inside_single_ones_outside(
    imported_fs2: Path,
) -> None:
    from dfserve.model.bundle import describe

    c = load_bundle(imported_fs2).config
    assert c.unet is not None and c.unet.frame_stack == 2
    assert (c.network.channels, c.network.max_frames, c.sampling.chunk_size) == (6, 8, 3)
    assert (c.data.n_frames, c.data.context_length) == (16, 4)  # the dataset's single frames
    doc = describe(c, imported_fs2)  # what /v1/models says: ordinary frames
    assert (doc["channels"], doc["n_frames"], doc["context_length"]) == (3, 16, 4)
    assert doc["max_context_frames"] == (8 - 3) * 2
    assert "frame_stack 2" in (imported_fs2 / "README.md").read_text()


def _rollout_fs2(engine: RolloutEngine, requests: list[RolloutRequest]) -> list[list[Tensor]]:
    states = [engine.start(r) for r in requests]
    frames: list[list[Tensor]] = [[] for _ in requests]
    while not all(st.done for st in states):
        for b, out in enumerate(engine.step(states)):
            assert [i for i, _ in out] == list(range(len(frames[b]), len(frames[b]) + len(out)))
            frames[b].extend(f for _, f in out)
    return frames


def test_frame_stack_2_whole_rollout_matches_the_reference(
    imported_fs2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reference's validation loop with frame_stack 2 on a batch of 2: 4 context frames
    (2 stacked), 22 generated (11 stacked) in chunks of 3, 3, 3, 2 stacked frames with a
    window of 8 stacked frames; pyramid, 4 DDIM steps, stabilization 15. The engine takes and
    hands out single frames; every chunk starts from the (stacked) noise the reference drew."""
    ref = load_file(str(FS2 / "rollout.safetensors"))
    doc = json.loads((FS2 / "rollout.json").read_text())
    assert (doc["frame_stack"], doc["context"], doc["frames"], doc["chunks"]) == (2, 4, 26, 4)
    bundle = load_bundle(imported_fs2)
    engine = RolloutEngine(bundle)
    noises = [ref[f"chunk_noise_{i}"] for i in range(doc["chunks"])]  # (h, B, 6, R, R)
    context = (ref["video"] - 0.5) / 0.5  # (B, 4, 3, R, R): only the context is stored
    sampling = replace(bundle.config.sampling, schedule="pyramid", steps=4, chunk_size=3)
    generated = doc["frames"] - doc["context"]
    requests = [RolloutRequest(context[b], (0,) * generated, sampling, seed=b) for b in range(2)]
    owner = {}
    drawn = [0, 0]
    # stacked: the noise has 6 channels
    monkeypatch.setattr("dfserve.model.rollout.draw_noise", reference_noise(noises, owner, drawn))
    start = engine.start

    def start_and_own(request: RolloutRequest) -> RolloutState:
        st = start(request)
        owner[id(st.generator)] = len(owner)
        return st

    monkeypatch.setattr(engine, "start", start_and_own)
    frames = _rollout_fs2(engine, requests)
    assert drawn == [doc["chunks"]] * 2
    ours = torch.stack([torch.stack(f) for f in frames], dim=1) * 0.5 + 0.5  # (T, B, 3, R, R)
    expected = ref["xs_pred"][doc["context"] :]  # the reference's single frames, unnormalised
    assert ours.shape == expected.shape == (22, 2, 3, 8, 8)
    assert expected.std() > 0.1
    assert (ours - expected).abs().max() < 1e-4


def test_frame_stack_2_context_must_fill_stacked_frames(imported_fs2: Path) -> None:
    """As the reference (df_base._preprocess_batch), a context that is not a multiple of
    frame_stack is refused, by the engine and by the request preparation the API uses."""
    import numpy as np

    from dfserve.model.request import prepare

    bundle = load_bundle(imported_fs2)
    engine = RolloutEngine(bundle)
    odd = RolloutRequest(torch.zeros(3, 3, 8, 8), (0,) * 4, bundle.config.sampling)
    with pytest.raises(ValueError, match=r"^context: 3 frames; .*frame_stack = 2.*multiple of 2"):
        engine.validate(odd)
    with pytest.raises(ValueError, match=r"^context: 3 frames; .*multiple of 2"):
        prepare(bundle.config, np.zeros((3, 8, 8, 3), np.uint8), frames=4)
    with pytest.raises(ValueError, match=r"^context: frames must be \(3, 8, 8\)"):
        engine.validate(replace(odd, context=torch.zeros(2, 6, 8, 8)))  # stacked: refused
    too_long = replace(odd, context=torch.zeros(12, 3, 8, 8))  # 6 stacked, the window has 5
    with pytest.raises(ValueError, match=r"between 2 and .* frame_stack = 10 are accepted"):
        engine.validate(too_long)
    # too much context is trimmed by whole stacked frames, with a note
    prepared = prepare(bundle.config, np.zeros((12, 8, 8, 3), np.uint8), frames=4)
    assert len(prepared.request.context) == 10 and "trimmed" in prepared.notes[0]


def test_frame_stack_2_any_frame_count_and_extension(imported_fs2: Path) -> None:
    """A frame count that is not a multiple of frame_stack generates whole stacked frames and
    hands out those asked for; extending by one frame then hands out the surplus frame of
    the last stacked frame without a forward. With chunks of 1, growing a rollout one frame
    at a time gives the frames of the whole rollout asked at once."""
    bundle = load_bundle(imported_fs2)
    engine = RolloutEngine(bundle)
    s = replace(bundle.config.sampling, steps=2, chunk_size=1)
    context = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    whole = _rollout_fs2(engine, [RolloutRequest(context, (0,) * 6, s, seed=3)])[0]
    five = _rollout_fs2(engine, [RolloutRequest(context, (0,) * 5, s, seed=3)])[0]
    assert len(whole) == 6 and len(five) == 5
    assert all(torch.equal(a, b) for a, b in zip(five, whole[:5], strict=False))

    st = engine.start(RolloutRequest(context, (0,), s, seed=3))
    grown: list[Tensor] = []
    while not st.done:
        grown += [f for _, f in engine.step([st])[0]]
    assert len(grown) == 1
    for _ in range(5):
        engine.extend(st, [0])
        rows = st.rows_done
        out = engine.step([st])[0]
        if len(grown) % 2:  # the second frame of a stacked frame: already there
            assert st.rows_done == rows and len(out) == 1
        while not st.done:
            out += engine.step([st])[0]
        assert [i for i, _ in out] == [len(grown)]
        grown += [f for _, f in out]
    assert all(torch.equal(a, b) for a, b in zip(grown, whole, strict=True))


def _fs2_config(tmp_path: Path, **changes: Any) -> str:
    import yaml

    doc = yaml.safe_load((FS2 / "config.yaml").read_text())
    for key, value in changes.items():
        section, name = key.split("__")
        doc[section][name] = value
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(doc))
    return str(tmp_path / "c.yaml")


@pytest.mark.parametrize(("changes", "message"), [
    ({"dataset__n_frames": 15}, "n_frames 15 is not a multiple of frame_stack 2"),
    ({"algorithm__context_frames": 3}, "context_frames 3 is not a multiple of frame_stack 2"),
    ({"algorithm__frame_stack": 0}, "frame_stack 0 must be >= 1"),
])  # fmt: skip
def test_frame_stack_config_refusals(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^--config: {message}"):
        import_checkpoint(FS2 / "reference.ckpt", tmp_path / "b", _fs2_config(tmp_path, **changes))
    assert not (tmp_path / "b").exists()


def test_frame_stack_mismatch_is_named(tmp_path: Path) -> None:
    """The frame_stack 2 checkpoint read with frame_stack 1: its 6-channel convolutions do not
    fit the configuration, and the error says so."""
    path = _fs2_config(tmp_path, algorithm__frame_stack=1)
    with pytest.raises(ValueError, match="init_conv.weight has shape .* is --config the run's"):
        import_checkpoint(FS2 / "reference.ckpt", tmp_path / "b", path)


@pytest.mark.parametrize("which", ["imported", "imported_fs2"])
def test_bench_research_loop_agrees_with_the_engine(
    which: str, request: pytest.FixtureRequest
) -> None:
    """`dfserve bench`'s re-expression of the research loop (stacking too) gives the engine's
    frames, in single frames, so its speed figure compares like with like."""
    from dfserve.server.bench_df import requests, research_loop, unet_figures

    bundle = load_bundle(request.getfixturevalue(which))
    one = requests(bundle, 1, 4)[0]
    frames = research_loop(bundle, one, torch.device("cpu"))
    assert frames.shape == (4, 3, *one.context.shape[2:])
    figures = unet_figures(bundle, torch.device("cpu"), quick=True)
    assert figures["engine_vs_research_loop_max_abs_diff"] == 0.0
