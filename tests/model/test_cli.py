"""`dfserve rollout --local` and `dfserve models` as a user runs them (real processes)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from model.bundle import describe, load_config
from server.video import decode_video, probe_mp4


def dfserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_rollout_local_writes_an_mp4_that_decodes(tiny_bundle_dir, tmp_path):
    out = tmp_path / "out.mp4"
    r = dfserve("rollout", "--local", "--model", str(tiny_bundle_dir), "--example", "random",
                "--actions", "left,right,up", "--frames", "11", "--schedule", "trapezoid",
                "--sampler", "ddim", "--steps", "3", "--eta", "0.5", "--seed", "7",
                "-o", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    info = probe_mp4(out.read_bytes())
    assert (info.codec, info.pix_fmt, info.frames) == ("h264", "yuv420p", 11)
    assert info.width % 2 == 0 and info.height % 2 == 0 and info.faststart
    assert len(decode_video(out.read_bytes())) == 11


def test_rollout_local_to_a_folder_writes_one_png_per_frame(tiny_bundle_dir, tmp_path):
    ctx = tmp_path / "ctx.png"
    Image.fromarray(np.full((40, 30, 3), 200, np.uint8)).save(ctx)  # any size: resized
    out = tmp_path / "frames"
    r = dfserve("rollout", "--local", "--model", str(tiny_bundle_dir), "--context", str(ctx),
                "--actions", "noop,1,up", "--guidance", "2", "-o", f"{out}/")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["000.png", "001.png", "002.png"]
    assert Image.open(out / "000.png").size == (16, 16)


def test_rollout_local_rejects_bad_values_by_name(tiny_bundle_dir, tmp_path):
    r = dfserve("rollout", "--local", "--model", str(tiny_bundle_dir), "--actions", "jump",
                "-o", str(tmp_path / "x.mp4"))  # fmt: skip
    assert r.returncode == 2 and "actions" in r.stderr and "noop" in r.stderr
    r = dfserve("rollout", "--local", "--model", str(tiny_bundle_dir), "--frames", "0",
                "-o", str(tmp_path / "x.mp4"))  # fmt: skip
    assert r.returncode == 2 and "frames" in r.stderr


def test_models_json_is_the_api_document(tiny_bundle_dir):
    r = dfserve("models", "--json", "--models-dir", str(tiny_bundle_dir.parent))
    assert r.returncode == 0, r.stderr
    docs = {d["id"]: d for d in json.loads(r.stdout)["models"]}
    assert docs["tiny"] == describe(load_config(tiny_bundle_dir), tiny_bundle_dir)
