"""response_format, logit_bias and the refusal of every field we do not honour, through the
in-process API (the tiny random model: its answers are noise, so only a grammar makes them
parse)."""

from __future__ import annotations

import json

import jsonschema
import pytest
from api_support import metric, post_ok, sse_payloads

from cats_serve.server.api.protocol import UNSUPPORTED
from cats_serve.server.metrics import CONSTRAINTS

pytestmark = pytest.mark.anyio

SCHEMAS = [
    {
        "type": "object",
        "properties": {"pet": {"enum": ["cat", "dog"]}, "count": {"enum": [1, 2, 3]}},
        "required": ["pet", "count"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 3},
    {
        "type": "object",
        "properties": {
            "a": {
                "type": "object",
                "properties": {"b": {"type": "boolean"}},
                "required": ["b"],
                "additionalProperties": False,
            },
            "c": {"type": "null"},
        },
        "required": ["a", "c"],
        "additionalProperties": False,
    },
]


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


@pytest.mark.parametrize("schema", SCHEMAS, ids=["enums", "array", "nested"])
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
async def test_answers_validate_against_the_schema(client, model, schema, endpoint):
    body = {"model": model, "max_tokens": 60, "temperature": 0.8, "seed": 5, "n": 2}
    body["response_format"] = json_schema_format(schema)
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": "the cat"}]
        answer = await post_ok(client, "/v1/chat/completions", body)
        texts = [c["message"]["content"] for c in answer["choices"]]
    else:
        body["prompt"] = "the cat"
        answer = await post_ok(client, "/v1/completions", body)
        texts = [c["text"] for c in answer["choices"]]
    assert [c["finish_reason"] for c in answer["choices"]] == ["stop", "stop"]
    for text in texts:
        jsonschema.validate(json.loads(text), schema)


async def test_a_streamed_answer_validates_too(client, model):
    schema = SCHEMAS[0]
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "the dog"}],
        "response_format": json_schema_format(schema),
        "stream": True,
        "temperature": 0,
    }
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    chunks = [c for c in sse_payloads(response.text) if c.get("choices")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    jsonschema.validate(json.loads(text), schema)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_json_object_and_logit_bias_compose(client, model, tokenizer):
    """json_object makes the answer an object; a large bias on `}` then closes it at once."""
    close = tokenizer.convert_tokens_to_ids("}")
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_object"},
        "logit_bias": {str(close): 100},
        "temperature": 0,
    }
    answer = await post_ok(client, "/v1/chat/completions", body)
    assert answer["choices"][0]["message"]["content"] == "{}"


async def test_a_bias_forces_and_a_ban_removes_a_token(client, model, tokenizer):
    body = {"model": model, "prompt": "the cat", "max_tokens": 1, "temperature": 0}
    plain = (await post_ok(client, "/v1/completions", body))["choices"][0]["text"]
    [greedy] = tokenizer.encode(plain)
    other = (greedy + 7) % len(tokenizer)
    forced = await post_ok(client, "/v1/completions", {**body, "logit_bias": {str(other): 100}})
    assert tokenizer.encode(forced["choices"][0]["text"]) == [other]
    banned = await post_ok(client, "/v1/completions", {**body, "logit_bias": {str(greedy): -100}})
    assert banned["choices"][0]["text"] != plain


@pytest.mark.parametrize(
    "response_format", [json_schema_format(SCHEMAS[0]), {"type": "json_object"}]
)
async def test_constrained_requests_are_counted(client, model, response_format):
    label = response_format["type"]
    assert label in CONSTRAINTS

    def count(text, name):
        return metric(text, name, constraint=label)

    before = (await client.get("/metrics")).text
    body = {"model": model, "prompt": "the", "response_format": response_format, "max_tokens": 4}
    await post_ok(client, "/v1/completions", body)
    after = (await client.get("/metrics")).text
    for name in ("cats_constrained_requests_total", "cats_grammar_mask_seconds_count"):
        assert count(after, name) == count(before, name) + 1


BAD = [
    ({"foo": 1}, "foo", "Unrecognized request argument supplied: foo"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "required"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "'json_object'"),
    (
        {"response_format": json_schema_format({"type": "wizard"})},
        "response_format",
        "cannot constrain decoding",
    ),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {"3": 101}}, "logit_bias", "[-100, 100]"),
    ({"logit_bias": {"400000": 1}}, "logit_bias", "out of range"),
    *[({name: None}, name, "not supported") for name in UNSUPPORTED],
]


@pytest.mark.parametrize(
    ("fields", "param", "words"), BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)]
)
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
async def test_fields_not_honoured_are_400_naming_them(
    client, model, fields, param, words, endpoint
):
    body = {"model": model, **fields}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "hi"
    response = await client.post(
        f"/v1/{'chat/' if endpoint == 'chat' else ''}completions", json=body
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert words in error["message"], error


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"suffix": "the end"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"echo": True, "extra": 1}, "extra"),
    ],
)
async def test_completion_only_fields(client, model, fields, param):
    response = await client.post("/v1/completions", json={"model": model, "prompt": "hi", **fields})
    assert response.status_code == 400 and response.json()["error"]["param"] == param


async def test_best_of_equal_to_n_and_an_empty_suffix_are_honoured(client, model):
    body = {"model": model, "prompt": "hi", "n": 2, "best_of": 2, "suffix": "", "max_tokens": 2}
    assert len((await post_ok(client, "/v1/completions", body))["choices"]) == 2


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"store": True}, "store"),
        ({"messages": [{"role": "user", "content": "hi", "audio": {}}]}, "messages.0.audio"),
    ],
)
async def test_chat_only_fields(client, model, fields, param):
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


async def test_openapi_shows_the_fields_and_refuses_others(client):
    schemas = (await client.get("/openapi.json")).json()["components"]["schemas"]
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        assert schemas[name]["additionalProperties"] is False
        assert {"response_format", "logit_bias"} <= set(schemas[name]["properties"])
    assert {"tools", "tool_choice", "parallel_tool_calls"} <= set(
        schemas["ChatCompletionRequest"]["properties"]
    )
