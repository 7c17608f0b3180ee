"""`dfserve rollout --local` and `dfserve models` as a user runs them (real processes)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import av
import fakeredis
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from dfserve.model.config import SamplingConfig, sampling_types
from dfserve.server.app import create_app
from dfserve.server.cli import build_parser, main
from dfserve.server.queue import Queue
from dfserve.server.rollout_cli import sampling_overrides
from dfserve.server.settings import Settings
from dfserve.server.video import decode_video, probe_mp4


def dfserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dfserve.server.cli", *args], capture_output=True, text=True,
        timeout=300,
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
    with Image.open(out / "000.png") as first:
        assert first.size == (16, 16)


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
    settings = Settings(models_dir=[tiny_bundle_dir.parent])
    with TestClient(create_app(settings, Queue(fakeredis.FakeRedis()))) as api:
        served = api.get("/v1/models").json()
    assert json.loads(r.stdout) == served  # `default` keys and the enforced frame limit too
    assert {m["id"]: m["default"] for m in served["models"]}[served["default"]] is True
    assert all(m["max_rollout_frames"] == settings.max_frames for m in served["models"])
    r = dfserve("models", "--models-dir", str(tiny_bundle_dir.parent), "--model", "tiny")
    assert r.returncode == 0 and "tiny (default): 16x16" in r.stdout, r.stdout


# ------------------------------------------------------------------------------ user errors

USER_ERRORS = [
    (["rollout", "--local", "--context", "missing.png", "-o", "x.mp4"], "missing.png"),
    (["rollout", "--local", "--context-video", "missing.mp4", "-o", "x.mp4"], "missing.mp4"),
    (["rollout", "--local", "--context", "{junk}", "-o", "x.mp4"], "not a decodable image"),
    (["rollout", "--local", "--model", "{tiny}", "-o", "x.avi"], ".webm"),
    (["rollout", "--local", "--model", "nope", "-o", "x.mp4"], "nope"),
    (["rollout", "--local", "--schedule", "zigzag", "-o", "x.mp4"], "trapezoid"),
    (["rollout", "--local", "--context-noise-mode", "loud", "-o", "x.mp4"], "scaled"),
    (["rollout", "--local", "--model", "{tiny}", "--steps", "0", "-o", "x.mp4"], "steps"),
    (["rollout", "--local", "--model", "{tiny}", "-o", "{tmp}/no/such/dir/x.mp4"],
     "Not a directory"),
    (["rollout", "-o", "x.mp4"], "--url"),
    (["models", "--model", "nope"], "nope"),
    (["train", "--data", "missing-data", "--out", "b", "--steps", "1"], "missing-data"),
    (["train", "--config", "crafter-cpu", "--data", "d", "--out", "b", "--steps", "1"],
     "--edge-fill"),
    (["train", "--config", "crafter-cpu", "--edge-fill", "--data", "d", "--out", "b",
      "--minutes", "1"], "--init"),
    (["eval", "--model", "{tiny}", "--data", "missing-data"], "missing-data"),
    (["bench", "--model", "nope", "--quick"], "nope"),
    (["worker", "--model", "{tiny}"], "DFSERVE_REDIS_URL"),
    (["serve", "--model", "nope", "--port", "1"], "nope"),
    (["dataset", "crafter", "--episodes", "0", "--out", "d"], "episodes"),
    (["frobnicate"], "frobnicate"),
]


def _concrete(args: list[str], tiny_bundle_dir: Path, tmp_path: Path) -> list[str]:
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    (tmp_path / "no").write_text("a file where a folder should be")
    subst = {"{tiny}": str(tiny_bundle_dir), "{junk}": str(junk)}
    return [subst.get(a, a).replace("{tmp}", str(tmp_path)) for a in args]


def _assert_one_error_line(code: int | str | None, stderr: str, named: str) -> None:
    errors = [line for line in stderr.splitlines() if " error: " in line]
    assert code == 2, stderr
    assert "Traceback" not in stderr and len(errors) == 1, stderr
    assert errors[0].startswith("dfserve") and named in errors[0], errors[0]
    assert stderr.splitlines()[-1] == errors[0]  # the error is the last word, not buried


@pytest.fixture
def restore_threads() -> Iterator[None]:
    """`--threads` of a command run in-process must not outlive it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("args", "named"), USER_ERRORS,
                         ids=[" ".join(a[:2]) + f"-{i}" for i, (a, _) in enumerate(USER_ERRORS)])
def test_every_user_error_is_one_line_and_exit_code_2(args, named, tiny_bundle_dir, tmp_path,
                                                      monkeypatch, capsys, restore_threads):
    """`main()` in this process (one interpreter start per case cost a minute of the suite);
    the test below runs the cases that log before they fail as real processes."""
    args = _concrete(args, tiny_bundle_dir, tmp_path)
    monkeypatch.delenv("DFSERVE_REDIS_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    try:
        code: int | str | None = main(args)
    except SystemExit as e:  # argparse's refusals
        code = e.code
    _assert_one_error_line(code, capsys.readouterr().err, named)


# Real processes, with the CLI's own logging: the cases that load a model (and log it) on their
# way to the error must still end with the one error line.
LOGGING_USER_ERRORS = [case for case in USER_ERRORS if "{tiny}" in case[0]]


@pytest.mark.parametrize(("args", "named"), LOGGING_USER_ERRORS,
                         ids=[" ".join(a[:2]) for a, _ in LOGGING_USER_ERRORS])
def test_a_user_error_is_the_last_line_of_a_real_process(args, named, tiny_bundle_dir, tmp_path,
                                                          monkeypatch):
    monkeypatch.delenv("DFSERVE_REDIS_URL", raising=False)
    r = subprocess.run([sys.executable, "-m", "dfserve.server.cli",
                        *_concrete(args, tiny_bundle_dir, tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    _assert_one_error_line(r.returncode, r.stderr, named)


def test_a_closed_pipe_is_one_error_line_not_a_traceback(tiny_bundle_dir):
    """`dfserve models --json | head -c 1`: the reader is gone before dfserve writes."""
    proc = subprocess.Popen([sys.executable, "-m", "dfserve.server.cli", "models", "--json",
                             "--models-dir", str(tiny_bundle_dir.parent)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the interpreter has even started: every write fails
    with proc.stderr:
        stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 2, stderr
    assert stderr.splitlines() == ["dfserve models: error: the output was closed before the "
                                   "end (broken pipe)"], stderr


@pytest.mark.parametrize(("suffix", "codec"), [(".gif", "gif"), (".webm", "vp9"),
                                               (".MP4", "h264")])
def test_rollout_output_format_follows_the_suffix(suffix, codec, tiny_bundle_dir, tmp_path):
    out = tmp_path / f"out{suffix}"
    r = dfserve("rollout", "--local", "--model", str(tiny_bundle_dir), "--frames", "5",
                "--steps", "2", "-o", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    data = out.read_bytes()
    with av.open(io.BytesIO(data)) as container:
        assert container.streams.video[0].codec_context.name == codec
    frames = decode_video(data)
    assert len(frames) == 5 and frames[0].shape[:2] in ((16, 16),)


def test_verbose_logs_dfserve_debug_lines_without_library_noise(tiny_bundle_dir, tmp_path):
    ctx = tmp_path / "ctx.png"
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(ctx)
    r = dfserve("-v", "rollout", "--local", "--model", str(tiny_bundle_dir), "--context",
                str(ctx), "--frames", "2", "--steps", "2", "-o", str(tmp_path / "o.gif"))
    assert r.returncode == 0, r.stderr
    assert "DEBUG dfserve.server.rollout_cli" in r.stderr, r.stderr  # -v turns on our debug
    debug = [line for line in r.stderr.splitlines() if " DEBUG " in line]
    assert all(" DEBUG dfserve." in line for line in debug), debug


def test_rollout_local_takes_the_context_noise_mode(tiny_bundle_dir, tmp_path):
    """--context-noise-mode reaches the engine's request (its debug line shows the settings):
    the flag comes from SamplingConfig's field, as every sampling flag does."""
    r = dfserve("-v", "rollout", "--local", "--model", str(tiny_bundle_dir), "--example",
                "random", "--frames", "2", "--steps", "2", "--context-noise", "500",
                "--context-noise-mode", "noised", "-o", str(tmp_path / "o.gif"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    (line,) = [x for x in r.stderr.splitlines() if "DEBUG dfserve.server.rollout_cli" in x]
    assert "context_noise=500" in line and "context_noise_mode='noised'" in line, line


# One value per sampling setting, none of them a default, to see each flag arrive.
GIVEN = {"schedule": "trapezoid", "sampler": "ddim", "steps": 3, "eta": 0.5,
         "uncertainty_scale": 2.0, "chunk_size": 2, "guidance": 1.5, "context_noise": 7,
         "context_noise_mode": "scaled"}  # fmt: skip


@pytest.mark.parametrize("command", [["rollout", "--local", "-o", "x.mp4"],
                                     ["eval", "--model", "m", "--data", "d"]])
def test_every_sampling_setting_is_a_flag_of_rollout_and_eval(command):
    assert set(GIVEN) == set(sampling_types())  # a new setting: give it a value above
    assert all(GIVEN[k] != getattr(SamplingConfig(), k) for k in GIVEN)
    flags = [x for k, v in GIVEN.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    args = build_parser().parse_args([*command, *flags])
    assert sampling_overrides(args) == GIVEN
    assert sampling_overrides(build_parser().parse_args(command)) == {}  # unset: the model's
