"""server/jobs.py: the JobSpec a request becomes, as the queue stores it and the worker reads
it back."""

from __future__ import annotations

import json

import pytest
import torch

from dfserve.model.bundle import Bundle
from dfserve.model.errors import FieldError
from dfserve.model.request import prepare
from dfserve.server.inputs import decode_context
from dfserve.server.jobs import JobSpec, job_spec, shown_params
from dfserve.server.schemas import RolloutParams, SessionStart


def spec_of(bundle: Bundle, request: RolloutParams | SessionStart) -> JobSpec:
    context = decode_context(bundle.config, example="random", examples=bundle.examples)
    return job_spec(request, bundle.name, bundle.config, context, None)


def test_the_stored_spec_reads_back_as_it_was(tiny_bundle: Bundle) -> None:
    spec = spec_of(tiny_bundle, RolloutParams(example="random", frames=5, seed=9, steps=3,
                                              sampler="ddim", eta=0.5))
    stored = json.loads(json.dumps(spec.to_params()))  # what Redis holds
    assert set(stored) == {"model", "context", "context_actions", "actions", "frames",
                           "sampling", "seed", "fps", "notes"}  # fmt: skip
    assert JobSpec.from_params(stored) == spec
    assert JobSpec.from_params({**stored, "kind": "session"}).kind == "session"


def test_the_worker_runs_the_request_the_api_checked(tiny_bundle: Bundle) -> None:
    """The spec's request is prepare's for the same input: pixels through PNG unchanged,
    actions cycled, sampling filled in, the seed kept."""
    ex = tiny_bundle.examples()["random"]
    spec = spec_of(tiny_bundle, RolloutParams(example="random", frames=5, seed=9, steps=3))
    got = spec.request(tiny_bundle.config)
    want = prepare(tiny_bundle.config, ex.context, list(ex.actions), 5, {"steps": 3}, 9,
                   list(ex.context_actions)).request
    assert torch.equal(got.context, want.context)
    assert (got.actions, got.context_actions, got.sampling, got.seed) == (
        want.actions, want.context_actions, want.sampling, want.seed)


def test_a_session_spec_has_no_actions_and_answers_each_at_once(tiny_bundle: Bundle) -> None:
    spec = spec_of(tiny_bundle, SessionStart(example="random", seed=4))
    assert (spec.kind, spec.actions, spec.frames, spec.notes) == ("session", [], 0, [])
    assert spec.sampling.chunk_size == 1


def test_a_bad_stored_spec_names_its_field(tiny_bundle: Bundle) -> None:
    stored = spec_of(tiny_bundle, RolloutParams(example="random", frames=2)).to_params()
    with pytest.raises(FieldError, match=r"^sampler: ") as e:
        JobSpec.from_params({**stored, "sampling": {"sampler": "euler"}})
    assert e.value.field == "sampler"
    with pytest.raises(FieldError, match=r"^context: "):
        JobSpec.from_params({**stored, "context": ["%%%"]})


def test_shown_params_count_the_context_and_name_the_actions(tiny_bundle: Bundle) -> None:
    spec = spec_of(tiny_bundle, RolloutParams(example="random", frames=2, actions=[1, "up"]))
    shown = shown_params(spec.to_params(), tiny_bundle.config.data.action_names)
    assert shown["actions"] == ["left", "up"]
    assert shown["context_frames"] == len(spec.context)
    assert shown["steps"] == spec.sampling.steps
    assert not {"context", "sampling", "notes"} & set(shown)
