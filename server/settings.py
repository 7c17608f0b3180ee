"""Server settings: one pydantic-settings class, read from DFSERVE_* environment variables.

`model/` never reads the environment; the CLI builds `Settings(**flags)` and hands it down.
List-valued settings (models_dir, api_keys, cors_origins) are comma separated in the
environment, e.g. DFSERVE_CORS_ORIGINS=http://localhost:3000,https://example.org.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from dfserve.model.bundle import find_bundles, load_config


def _split(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def default_dtype(device: str) -> str:
    """bfloat16 on a GPU (tensor cores), float32 on a CPU (no faster there, measured)."""
    return "bfloat16" if device.startswith("cuda") else "float32"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DFSERVE_", extra="ignore")

    # queue
    redis_url: str | None = None  # None: embedded in-process Redis (`dfserve serve` only)
    redis_prefix: str = "dfserve"  # every key lives under "{prefix}:"
    lease_ms: int = Field(default=30_000, ge=1_000)  # a silent worker's job is re-run after this
    max_deliveries: int = Field(default=3, ge=1)  # then it goes to the dead-letter stream
    job_ttl_s: int = Field(default=86_400, ge=1)  # finished jobs, frames, videos expire
    max_queued: int = Field(default=1_000, ge=1)  # POST answers 429 beyond this
    # Every Redis command's deadline: a hung Redis gives 503s and worker backoff, not stuck
    # threads. Above the longest blocking read (1 s, server/routes/rollouts.py).
    redis_timeout_s: float = Field(default=10.0, ge=2.0)
    # Redis connections per process: a thread that finds them all in use waits for one (up to
    # redis_timeout_s) instead of failing. Above the API's threads (server/app.py THREADS), so
    # the API never waits; open streams hold none (server/streams.py).
    redis_max_connections: int = Field(default=256, ge=2)

    # models
    models_dir: Annotated[list[Path], NoDecode] = []  # extra bundle folders (or parents of)
    model: str | None = None  # default model: bundle id or folder; None = first packaged one

    # worker
    device: str = "auto"  # auto (cuda when available), cuda, cuda:1, cpu
    # The network's weights and KV caches; the sampler state stays float32 (model/rollout.py).
    # auto: default_dtype(device).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_batch: int = Field(default=64, ge=1)  # most rollouts stepped together in one forward
    # Memory the batch may use (KV caches, frames, activations); the batch is the smaller of
    # max_batch and what fits. None: 80% of free GPU memory, or a quarter of RAM on the CPU.
    memory_budget_mb: int | None = Field(default=None, ge=1)
    torch_threads: int | None = Field(default=None, ge=1)  # CPU threads; None: torch's
    heartbeat_ttl_s: float = Field(default=15.0, gt=0)  # /readyz: a heartbeat this fresh
    worker_name: str | None = None  # default host:pid

    # API limits
    max_frames: int = Field(default=512, ge=1)  # frames per request (also capped by the bundle)
    max_body_bytes: int = Field(default=32 * 2**20, ge=1024)  # larger bodies get 413
    max_image_pixels: int = Field(default=4096 * 4096, ge=1)  # per context image/frame
    # frames x width x height that a request's context images and videos may decode to,
    # checked from their headers before anything is decoded (server/inputs.py)
    max_request_pixels: int = Field(default=2**28, ge=1)
    max_context_frames: int = Field(default=64, ge=1)  # context images/files per request
    max_steps: int = Field(default=1000, ge=1)  # denoising steps (also capped by the bundle's T)
    wait_timeout_s: float = Field(default=120.0, gt=0)  # bound of POST /v1/rollouts?wait=true
    session_idle_s: float = Field(default=120.0, gt=0)  # a silent WS /v1/sessions ends after this
    api_keys: Annotated[list[str], NoDecode] = []  # Bearer keys; empty: no auth (server/auth.py)
    rate_limit_per_min: int | None = Field(default=None, ge=1)  # per key, per API process
    cors_origins: Annotated[list[str], NoDecode] = []  # empty: no cross-origin access

    @field_validator("models_dir", "api_keys", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return _split(value)

    def redis_client(self, fake_server: Any = None) -> Any:
        """A Redis client for redis_url (or the embedded fake_server) with these settings."""
        from dfserve.server.queue import connect

        return connect(self.redis_url, fake_server, self.redis_timeout_s,
                       self.redis_max_connections)

    def queue_options(self) -> dict[str, Any]:
        """Keyword arguments of server.queue.Queue."""
        return {"prefix": self.redis_prefix, "lease_ms": self.lease_ms,
                "max_deliveries": self.max_deliveries, "job_ttl_s": self.job_ttl_s,
                "max_queued": self.max_queued}

    def resolved_worker_name(self) -> str:
        return self.worker_name or f"{socket.gethostname()}:{os.getpid()}"

    def resolved_memory_budget(self, device: str) -> int:
        """Bytes the worker's batch may use on `device`."""
        if self.memory_budget_mb is not None:
            return self.memory_budget_mb * 2**20
        if device.startswith("cuda"):
            import torch

            free, _ = torch.cuda.mem_get_info(torch.device(device))
            return int(0.8 * free)
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch  # only the worker asks, and it needs torch anyway

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return default_dtype(self.resolved_device())

    def bundles(self) -> dict[str, Path]:
        """Every servable bundle, id -> folder: `model` when it is a folder, the packaged
        bundles, then models_dir."""
        found = find_bundles(list(self.models_dir))
        if self.model and (Path(self.model) / "config.json").is_file():
            path = Path(self.model)
            found = {load_config(path).name: path, **found}
        return found

    def default_model(self, bundles: dict[str, Path] | None = None) -> tuple[str, Path]:
        """The id and folder of the model served by default; ValueError if there is none."""
        bundles = self.bundles() if bundles is None else bundles
        if self.model and (Path(self.model) / "config.json").is_file():
            path = Path(self.model)
            return load_config(path).name, path
        if self.model:
            if self.model not in bundles and Path(self.model).is_dir():
                raise ValueError(f"model bundle {self.model}: config.json not found")
            if self.model not in bundles:
                raise ValueError(f"model: {self.model!r} is neither a bundle folder nor one of "
                                 f"{sorted(bundles)}")  # fmt: skip
            return self.model, bundles[self.model]
        if not bundles:
            raise ValueError("model: no model bundle found; pass --model DIR "
                             "(or DFSERVE_MODEL / DFSERVE_MODELS_DIR)")  # fmt: skip
        first = next(iter(bundles))
        return first, bundles[first]
