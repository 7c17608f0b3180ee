"""Model bundles: safetensors round trip, pickle refused, malformed bundles rejected clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dfserve.model.bundle import describe, find_bundles, load_bundle, load_config, resolve_bundle


def test_round_trip_keeps_every_weight(tiny_bundle_dir, tiny_bundle):
    again = load_bundle(tiny_bundle_dir)
    for (name, a), (_, b) in zip(
        tiny_bundle.network.state_dict().items(), again.network.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert again.config == tiny_bundle.config


def test_load_in_reduced_precision(tiny_bundle_dir, tiny_bundle):
    half = load_bundle(tiny_bundle_dir, torch.bfloat16)
    for (name, a), (_, b) in zip(
        tiny_bundle.network.state_dict().items(), half.network.state_dict().items(), strict=True
    ):
        assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b), name


def test_pickle_checkpoints_are_refused(tiny_bundle_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle_dir, bad)
    (bad / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, bad / "model.pt")
    with pytest.raises(ValueError, match="pickle"):
        load_bundle(bad)


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: (d / "config.json").write_text("{not json"), "malformed"),
        (lambda d: (d / "config.json").write_text(json.dumps({"colour": 1})), "unknown key"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 20), "weights do not load"),
        (lambda d: (d / "config.json").unlink(), "config.json not found"),
    ],
)
def test_malformed_bundles_fail_with_a_clear_error(tiny_bundle_dir, tmp_path, breakage, message):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle_dir, bad)
    breakage(bad)
    with pytest.raises(ValueError, match=message):
        load_bundle(bad)


def test_wrong_shapes_are_rejected(tiny_bundle_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["network"]["width"] = 64
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="weights do not load"):
        load_bundle(bad)


def test_describe_and_examples(tiny_bundle_dir):
    doc = describe(load_config(tiny_bundle_dir), tiny_bundle_dir)
    assert doc["id"] == "tiny" and doc["actions"] == ["noop", "left", "right", "up"]
    assert doc["examples"] == ["random"] and doc["defaults"]["sampler"] == "dpmpp_2m"
    assert set(doc["schedules"]) == {"pyramid", "autoregressive", "full_sequence", "trapezoid"}


def test_resolve_by_folder_id_and_unknown(tiny_bundle_dir):
    assert resolve_bundle(str(tiny_bundle_dir)) == tiny_bundle_dir
    assert resolve_bundle("tiny", [tiny_bundle_dir.parent]) == tiny_bundle_dir
    assert "tiny" in find_bundles([Path(tiny_bundle_dir)])
    with pytest.raises(ValueError, match="model"):
        resolve_bundle("no-such-model", [tiny_bundle_dir.parent])
