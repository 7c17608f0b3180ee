"""The bundle `make serve` starts with: packaged, loadable, the trained preset, and a world model
(it continues the scene it is given), with a model card whose numbers are its metrics."""

from __future__ import annotations

import json

import pytest
import torch

from dfserve.model.bundle import DEFAULT_BUNDLE, PACKAGED_BUNDLES, load_bundle, resolve_bundle
from dfserve.model.config import preset
from dfserve.model.request import prepare
from dfserve.model.rollout import RolloutEngine

SHIPPED = PACKAGED_BUNDLES / DEFAULT_BUNDLE


def test_the_default_bundle_is_packaged_and_is_the_trained_preset() -> None:
    assert resolve_bundle(None) == SHIPPED
    assert {p.name for p in SHIPPED.iterdir()} >= {"config.json", "model.safetensors",
                                                    "README.md", "metrics.json", "eval_grid.png",
                                                    "training.json", "examples"}  # fmt: skip
    assert not list(SHIPPED.rglob("*.pt")) and not list(SHIPPED.rglob("*.bin"))
    bundle = load_bundle(SHIPPED)
    trained = preset(DEFAULT_BUNDLE)
    assert bundle.config.network == trained.network
    assert bundle.config.diffusion == trained.diffusion
    assert bundle.config.sampling == trained.sampling  # the preset records the measured defaults
    assert len(bundle.examples()) >= 3


def test_the_model_card_reports_the_bundles_own_eval() -> None:
    metrics = json.loads((SHIPPED / "metrics.json").read_text())
    card = (SHIPPED / "README.md").read_text()
    for h in ("1", "4", "8", "16", "32"):
        row = metrics["horizons"][h]
        line = f"| {h} | {row['model']['psnr']:.2f} | {row['copy_last']['psnr']:.2f} |"
        assert line in card, line
    # The CPU configuration's bar (the training issue): PSNR above copy-the-last-frame at 1-4.
    for h in ("1", "4"):
        assert metrics["horizons"][h]["model_beats_copy_last_psnr"]
    assert not metrics["stability"]["collapsed"]
    assert metrics["sampling"] == json.loads((SHIPPED / "config.json").read_text())["sampling"]


@pytest.fixture(scope="module")
def engine() -> RolloutEngine:
    return RolloutEngine(load_bundle(SHIPPED), torch.device("cpu"))


def test_a_rollout_continues_the_scene_of_each_example(engine: RolloutEngine) -> None:
    """A trained model keeps the scene: its first frames stay close to the last context frame
    (an untrained one outputs noise or grey, far below this)."""
    config = engine.bundle.config
    for example in engine.bundle.examples().values():
        req = prepare(config, example.context, list(example.actions), frames=4, seed=0).request
        frames = torch.stack([f for _, f in engine.rollout(req)])
        size = config.network.resolution
        assert frames.shape == (4, 3, size, size) and torch.isfinite(frames).all()
        last = req.context[-1]
        mse = float((((frames[0] - last) / 2) ** 2).mean())
        assert mse < 10 ** (-15 / 10), example.name  # PSNR above 15 dB (a copied scene: inf)
