"""Shared fixtures: a small randomly initialised bundle (never shipped as "the model")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.bundle import build_network, load_bundle, save_bundle, save_example
from model.config import preset


def make_tiny_bundle(path: Path, seed: int = 0) -> Path:
    """The `tiny` preset with every weight random (adaLN-Zero layers too, so the output
    depends on levels, actions and history), plus one example."""
    torch.manual_seed(seed)
    config = preset("tiny")
    net = build_network(config)
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    save_bundle(path, config, net, card="# tiny\n\nRandom weights for tests.\n")
    rng = np.random.default_rng(seed)
    r = config.network.resolution
    context = rng.integers(0, 256, size=(2, r, r, 3), dtype=np.uint8)
    save_example(path, "random", context, ["noop", "left"], ["left", "right", "up", "noop"])
    return path


@pytest.fixture(scope="session")
def tiny_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_bundle_dir: Path):
    return load_bundle(tiny_bundle_dir)
