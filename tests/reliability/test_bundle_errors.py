"""Model loading at start-up (real processes): only safetensors are loaded, and a malformed
bundle makes `dfserve worker` / `dfserve serve` exit non-zero at once with one line naming
the bundle and the problem (no traceback, no half-started server)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import REDIS_URL, Proc, dfserve_cmd, free_port

BREAKAGES = {
    "config_not_json": ("config.json", "{not json", "config.json is malformed"),
    "config_wrong_shape": ("config.json", "[1, 2]", "config.json is malformed"),
    "config_unknown_key": (None, None, "unknown keys in network"),
    "weights_truncated": ("model.safetensors", "\x10\x00", "weights do not load"),
    "pickle_only": ("model.pt", "not really a pickle", "only safetensors are loaded"),
    "no_config": (None, None, "config.json not found"),
}


def broken_bundle(src: Path, dst: Path, kind: str) -> Path:
    shutil.copytree(src, dst)
    name, text, _ = BREAKAGES[kind]
    if kind == "config_unknown_key":
        doc = json.loads((dst / "config.json").read_text())
        doc["network"]["bogus"] = 1
        (dst / "config.json").write_text(json.dumps(doc))
    elif kind == "no_config":
        (dst / "config.json").unlink()
    elif kind == "pickle_only":
        (dst / "model.safetensors").unlink()
    if name:
        (dst / name).write_text(text)
    return dst


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = Proc(args, env)  # DFSERVE_* of the host dropped, one torch thread
    try:
        proc.p.wait(timeout=120)
    finally:
        if proc.alive():
            proc.p.kill()
    return subprocess.CompletedProcess(args, proc.p.returncode, proc.output(), "")


@pytest.mark.parametrize("kind", sorted(BREAKAGES))
def test_malformed_bundle_fails_at_startup_with_one_line(tiny_bundle_dir: Path, tmp_path: Path,
                                                         kind: str) -> None:
    bundle = broken_bundle(tiny_bundle_dir, tmp_path / f"broken-{kind}", kind)
    says = BREAKAGES[kind][2]
    commands = [dfserve_cmd("worker", "--model", str(bundle))]
    if kind in ("weights_truncated", "pickle_only"):  # the API alone reads only config.json
        commands.append(dfserve_cmd("serve", "--port", str(free_port()), "--model", str(bundle)))
    for args in commands:
        env = {"DFSERVE_REDIS_URL": REDIS_URL, "DFSERVE_REDIS_PREFIX": "dfserve-bundle-test"}
        done = run(args, env if args[1] == "worker" or "worker" in args else {})
        lines = [ln for ln in done.stdout.splitlines() if "error" in ln.lower()]
        assert done.returncode != 0, done.stdout
        assert "Traceback" not in done.stdout, done.stdout
        assert len(lines) == 1, done.stdout
        assert str(bundle) in lines[0] and says in lines[0], lines
