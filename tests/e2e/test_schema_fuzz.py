"""Schema fuzzing of the real `cats-serve` process with schemathesis, from its /openapi.json.

Every operation gets a bounded number of generated requests, valid and invalid by the schema
(seeded, no deadline). No answer may be a 5xx, and every answer must conform to the schema:
a documented status code, content type and headers, and a body that validates. Half of the
valid requests that name a model name the served one, so generation itself is fuzzed too, not
only the 404 for an unknown model.
"""

from __future__ import annotations

import zlib

import httpx
import pytest
import schemathesis
from api_support import metric
from hypothesis import HealthCheck, Phase, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 30  # per operation
KEY = "fuzz-secret"
REASONS = ("stop", "length")
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def server(launcher, tiny_checkpoint):
    # A short context keeps every generated request cheap (max_tokens null = up to the context).
    return launcher(
        "--model", str(tiny_checkpoint),
        "--device", "cpu",
        "--max-seq-len", "48",
        "--api-key", KEY,
        "--log-level", "warning",
    )  # fmt: skip


@pytest.fixture(scope="module")
def served_model(server) -> str:
    models = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    return models.json()["data"][0]["id"]


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


def authorize(case) -> None:
    """Send the API key, except where the case is about a missing or wrong one (then the
    server must answer 401, which the negative-data check expects)."""
    if case.operation.schema.is_security_param_negated(case):
        return
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {KEY}"}


def name_the_served_model(case, model: str) -> None:
    """In about half of the valid requests with a body, ask for the served model (seeded)."""
    body = case.body
    if case.meta.generation.mode is not GenerationMode.POSITIVE or not isinstance(body, dict):
        return
    if "model" in body and zlib.crc32(repr(sorted(body)).encode() + repr(body).encode()) % 2:
        body["model"] = model


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_schema(case, server, served_model):
    authorize(case)
    name_the_served_model(case, served_model)
    case.call_and_validate(base_url=server.url, checks=CHECKS, timeout=120)


def test_fuzzing_reached_generation(server):
    """Runs after the fuzzing (same module, file order): it must have generated text, not only
    been refused; and no request the engine took may have failed inside it."""
    text = httpx.get(f"{server.url}/metrics").text
    done = sum(
        metric(text, "cats_request_success_total", finished_reason=r, sparsity_level="0")
        for r in REASONS
    )
    assert done > 0, "no fuzzed request reached the engine and finished"
    for reason in ("internal_error", "engine_error"):
        assert metric(text, "cats_request_failure_total", reason=reason) == 0, reason


STREAMED = {
    "/v1/completions": {"prompt": "the cat", "logprobs": 2, "n": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "logprobs": True},
}


@pytest.mark.parametrize("path", sorted(STREAMED))
def test_streamed_answers_conform_to_the_schema(api_schema, server, served_model, path):
    """Streams every time (random cases may or may not): each event against the schema."""
    body = {
        "model": served_model,
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
        **STREAMED[path],
    }
    case = api_schema[path]["POST"].Case(body=body)
    authorize(case)
    response = case.call_and_validate(base_url=server.url, checks=CHECKS, timeout=120)
    assert response.status_code == 200
    assert response.text.rstrip().endswith("data: [DONE]")
