"""An imported diffusion-forcing checkpoint, served: API (REST + MP4), CLI, /v1/models.

The bundle is imported from the reference's fixture checkpoint (tests/fixtures/diffusion_
forcing), exactly as a user would with `dfserve import diffusion-forcing`.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest

from dfserve.server import video
from dfserve.server.cli import main as dfserve
from tests.server.test_api import Service, make_service, png_b64

FIXTURE = Path(__file__).parents[1] / "fixtures" / "diffusion_forcing"


def import_fixture(fixture: Path, out: Path) -> Path:
    code = dfserve(["import", "diffusion-forcing", str(fixture / "reference.ckpt"),
                    "--out", str(out), "--config", str(fixture / "config.yaml")])  # fmt: skip
    assert code == 0
    return out


def serve(bundle: Path) -> Iterator[Service]:
    for svc in make_service("fakeredis", bundle, max_batch=2):
        svc.start_worker()
        svc.wait_ready(timeout=300)  # a shared, busy CPU: the warm-up rollout may be slow
        yield svc


@pytest.fixture(scope="module")
def df_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return import_fixture(FIXTURE, tmp_path_factory.mktemp("df") / "df-fixture")


@pytest.fixture
def df_service(df_bundle: Path) -> Iterator[Service]:
    yield from serve(df_bundle)


def test_imported_bundle_serves_an_mp4(df_service: Service) -> None:
    body = {"context": [png_b64(16, 0), png_b64(16, 1)], "frames": 5, "steps": 2}
    r = df_service.client.post("/v1/rollouts?wait=true", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "video/mp4"
    info = video.probe_mp4(r.content)
    assert info.frames == 5 and info.codec == "h264" and info.pix_fmt == "yuv420p"
    job = df_service.client.get(f"/v1/rollouts/{r.headers['x-rollout-id']}").json()
    assert job["status"] == "succeeded" and not job.get("notes")


def test_models_say_the_model_takes_no_actions(df_service: Service) -> None:
    doc = df_service.client.get("/v1/models/df-fixture").json()
    assert "actions" not in doc
    assert doc["architecture"] == "unet3d" and doc["n_frames"] == 8
    listed = df_service.client.get("/v1/models").json()["models"]
    assert all("actions" not in m for m in listed if m["id"] == "df-fixture")


def test_actions_for_an_unconditional_model_are_refused(df_service: Service) -> None:
    body = {"context": [png_b64(16, 0)], "actions": ["left"], "frames": 2}
    r = df_service.client.post("/v1/rollouts", json=body)
    assert r.status_code == 422
    assert "unconditional" in r.text


def test_cli_rollout_without_actions(df_bundle: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    frames = []
    for i in range(2):
        (tmp_path / f"{i}.png").write_bytes(base64.b64decode(png_b64(16, i)))
        frames.append(str(tmp_path / f"{i}.png"))
    out = tmp_path / "out.mp4"
    code = dfserve(["rollout", "--local", "--model", str(df_bundle), "--context", *frames,
                    "--frames", "4", "--steps", "2", "-o", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert video.probe_mp4(out.read_bytes()).frames == 4
    assert dfserve(["models", "--model", str(df_bundle)]) == 0
    assert "df-fixture" in capsys.readouterr().out


# --- frame_stack 2: the network works on pairs of frames, the API sees ordinary frames -----

FS2 = FIXTURE / "frame_stack_2"


@pytest.fixture(scope="module")
def fs2_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return import_fixture(FS2, tmp_path_factory.mktemp("df") / "df-fs2")


@pytest.fixture
def fs2_service(fs2_bundle: Path) -> Iterator[Service]:
    yield from serve(fs2_bundle)


def test_frame_stack_2_serves_single_frames(fs2_service: Service) -> None:
    doc = fs2_service.client.get("/v1/models/df-fs2").json()
    assert (doc["channels"], doc["n_frames"], doc["context_length"]) == (3, 16, 4)
    assert doc["max_context_frames"] == 10  # (window 8 - chunk 3) stacked frames of 2
    # 5 frames: three stacked frames generated, the surplus frame not handed out
    body = {"context": [png_b64(8, i) for i in range(4)], "frames": 5, "steps": 2}
    r = fs2_service.client.post("/v1/rollouts?wait=true", json=body)
    assert r.status_code == 200, r.text
    info = video.probe_mp4(r.content)
    assert info.frames == 5 and (info.width, info.height) == (8, 8)


def test_frame_stack_2_odd_context_is_refused_by_name(fs2_service: Service) -> None:
    body = {"context": [png_b64(8, i) for i in range(3)], "frames": 4}
    r = fs2_service.client.post("/v1/rollouts", json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail["field"] == "context" and "frame_stack = 2" in detail["message"]
    assert fs2_service.queue.queued_count() == 0
