"""Job params as the API stores them, for tests that play the worker: built by the API's own
server.jobs.job_spec from a request for the bundle's "random" example."""

from __future__ import annotations

from typing import Any

from dfserve.model.bundle import Bundle
from dfserve.server.inputs import decode_context
from dfserve.server.jobs import job_spec
from dfserve.server.schemas import RolloutParams, SessionStart


def rollout_params(bundle: Bundle, frames: int, seed: int, **overrides: Any) -> dict[str, Any]:
    """A rollout of the example with 3 steps; `overrides` replace stored params as they are."""
    request = RolloutParams(example="random", frames=frames, seed=seed, steps=3, fps=8)
    return {**_spec(bundle, request), **overrides}


def session_params(bundle: Bundle, seed: int = 3) -> dict[str, Any]:
    """A session from the example with 3 steps, chunk_size 1."""
    return _spec(bundle, SessionStart(example="random", seed=seed, steps=3, chunk_size=1))


def _spec(bundle: Bundle, request: RolloutParams | SessionStart) -> dict[str, Any]:
    context = decode_context(bundle.config, example="random", examples=bundle.examples)
    return job_spec(request, bundle.name, bundle.config, context, None).to_params()
