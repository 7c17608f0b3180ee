"""The model catalog: the bundles this API serves, by id, read from their configs only (the API
never loads weights), with the limits this server adds to theirs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dfserve.model.bundle import Example, describe, load_config, load_examples
from dfserve.model.config import BundleConfig
from dfserve.server.errors import ApiError, clip
from dfserve.server.settings import Settings


@dataclass
class Catalog:
    paths: dict[str, Path]
    default: str
    configs: dict[str, BundleConfig] = field(default_factory=dict)
    max_frames: int | None = None  # the server's own frames-per-request limit (Settings)
    _examples: dict[str, dict[str, Example]] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> Catalog:
        paths = settings.bundles()
        default, path = settings.default_model(paths)
        paths.setdefault(default, path)
        return cls(paths, default, {k: load_config(p) for k, p in paths.items()},
                   settings.max_frames)

    def config(self, model_id: str | None) -> tuple[str, BundleConfig]:
        model_id = model_id or self.default
        if model_id not in self.configs:
            raise ApiError(422, "model", f"{clip(model_id)!r} is not a model this server serves",
                           sorted(self.configs))
        return model_id, self.configs[model_id]

    def action_names(self, model_id: str) -> tuple[str, ...]:
        """The model's action names; none for a model this server no longer serves."""
        config = self.configs.get(model_id)
        return config.data.action_names if config is not None else ()

    def describe(self, model_id: str) -> dict[str, Any]:
        doc = describe(self.configs[model_id], self.paths[model_id])
        # The limit this server enforces (model.request.resolve takes the smaller of the two).
        limit = min(doc["max_rollout_frames"], self.max_frames or doc["max_rollout_frames"])
        return {**doc, "id": model_id, "default": model_id == self.default,
                "max_rollout_frames": limit}

    def examples(self, model_id: str) -> dict[str, Example]:
        if model_id not in self._examples:
            self._examples[model_id] = load_examples(self.configs[model_id], self.paths[model_id])
        return self._examples[model_id]
