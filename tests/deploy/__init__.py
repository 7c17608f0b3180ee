"""Reading the deployment files as Docker Compose does, for the deploy and e2e tests.

`load_compose(*files, env=...)` loads docker-compose.yml (and overrides such as
docker/compose.cpu.yml) with the parts of the Compose Specification these files use:
YAML anchors and `<<` merge keys, the `!reset` / `!override` merge tags, the merge rules
for several files (mappings merge, `command`/`entrypoint`/`healthcheck.test` are replaced,
other sequences append), and `${VAR}` interpolation (`:-`, `-`, `:?`, `?`, `:+`, `+`, `$$`).
There is no Docker engine or `docker compose` on the test machines, so this is how the tests
see exactly what compose would run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
CPU_OVERRIDE = ROOT / "docker" / "compose.cpu.yml"
DOCKERFILE = ROOT / "Dockerfile"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"
IMAGE_HEALTHCHECK = "/opt/dfserve/healthcheck.py"  # where the Dockerfile puts it

REPLACED_SEQUENCES = {"command", "entrypoint", "test"}  # the merge spec: override, not append


@dataclass
class Reset:
    """`!reset VALUE`: the key is reset (removed when VALUE is null) instead of merged."""

    value: Any


@dataclass
class Override:
    """`!override VALUE`: VALUE replaces the base value as a whole."""

    value: Any


class ComposeLoader(yaml.SafeLoader):
    pass


def _tag(cls: type) -> Any:
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        if isinstance(node, yaml.MappingNode):
            return cls(loader.construct_mapping(node, deep=True))
        if isinstance(node, yaml.SequenceNode):
            return cls(loader.construct_sequence(node, deep=True))
        value = loader.construct_scalar(node)  # type: ignore[arg-type]
        return cls(None if value in ("", "null", "~") else value)

    return construct


ComposeLoader.add_constructor("!reset", _tag(Reset))
ComposeLoader.add_constructor("!override", _tag(Override))


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=ComposeLoader)  # noqa: S506 - SafeLoader subclass


def strip_tags(doc: Any) -> Any:
    """The document with the merge tags replaced by their values (for schema validation of
    an override file on its own: the JSON schema knows nothing of YAML tags)."""
    if isinstance(doc, Reset | Override):
        return strip_tags(doc.value)
    if isinstance(doc, dict):
        return {k: strip_tags(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [strip_tags(v) for v in doc]
    return doc


def merge(base: Any, override: Any, key: str | None = None) -> Any:
    if isinstance(override, Reset):
        return override.value
    if isinstance(override, Override):
        return strip_tags(override.value)
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            if isinstance(v, Reset) and v.value is None:
                out.pop(k, None)
            else:
                out[k] = merge(base.get(k), v, k) if k in base else strip_tags(v)
        return out
    if isinstance(base, list) and isinstance(override, list) and key not in REPLACED_SEQUENCES:
        return base + [v for v in strip_tags(override) if v not in base]
    return strip_tags(override)


_VAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?", re.S)


class InterpolationError(ValueError):
    pass


def interpolate(doc: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable substitution over every string of the document."""
    if isinstance(doc, dict):
        return {k: interpolate(v, env) for k, v in doc.items()}
    if isinstance(doc, list):
        return [interpolate(v, env) for v in doc]
    if not isinstance(doc, str):
        return doc

    def sub(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        if m["named"]:
            return env.get(m["named"], "")
        spec = _BRACED.fullmatch(m["braced"])
        if spec is None:
            raise InterpolationError(f"invalid interpolation format: ${{{m['braced']}}}")
        name, op, arg = spec["name"], spec["op"], interpolate(spec["arg"] or "", env)
        value = env.get(name)
        unset_or_empty = value is None or (op is not None and op.startswith(":") and not value)
        if op in (":-", "-"):
            return arg if unset_or_empty else str(value)
        if op in (":?", "?"):
            if unset_or_empty:
                raise InterpolationError(f"required variable {name} is missing a value: {arg}")
            return str(value)
        if op in (":+", "+"):
            return "" if unset_or_empty else arg
        return value or ""

    return _VAR.sub(sub, doc)


def load_compose(*files: Path, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml merged with `files` (defaults: the main file alone), interpolated
    with `env` when given."""
    doc: Any = None
    for path in files or (COMPOSE,):
        part = load_yaml(path)
        doc = strip_tags(part) if doc is None else merge(doc, part)
    doc = {k: v for k, v in doc.items() if not k.startswith("x-")}  # extension fields
    return doc if env is None else interpolate(doc, env)


def dump_json(doc: Any, path: Path) -> Path:
    path.write_text(json.dumps(doc, indent=2))
    return path
