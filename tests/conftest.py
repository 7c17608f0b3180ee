"""Shared fixtures: a small randomly initialised bundle (never shipped as "the model"), and
one torch thread for the modules that run it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from dfserve.model.bundle import build_network, load_bundle, save_bundle, save_example
from dfserve.model.config import preset

# The modules that take longest, started first: `make test` deals modules out to two processes
# (pytest-xdist --dist loadfile) in collection order, and a long module dealt out last makes
# one process run alone at the end.
SLOW_FIRST = ("tests/reliability/test_fuzz.py", "tests/reliability/test_soak.py",
              "tests/server/test_bench.py", "tests/e2e/test_serve.py",
              "tests/reliability/test_crash.py", "tests/clients/test_client.py")  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        module = item.nodeid.split("::")[0]
        return SLOW_FIRST.index(module) if module in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: the order within a module and among the rest is kept


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


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`).

    Small models on a shared 2-core machine: intra-op threads spin against each other and
    other jobs (20-50x slower here), and one thread keeps every reduction order fixed for the
    bit-exact comparisons."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
