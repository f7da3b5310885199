"""/v1/chat/completions through httpx against the ASGI app, tiny model (its chat template)."""

from __future__ import annotations

import pytest
from api_support import post_ok, sse_payloads
from transformers import AutoTokenizer

pytestmark = pytest.mark.anyio

MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "the capital of France is"},
]


async def chat(client, model, **fields) -> dict:
    body = {"model": model, "messages": MESSAGES, "temperature": 0, "ignore_eos": True, **fields}
    return await post_ok(client, "/v1/chat/completions", body)


async def test_chat_uses_the_chat_template(client, model, tiny_checkpoint):
    body = await chat(client, model, max_tokens=5)
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "length"
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    rendered = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|assistant|>")
    prompt_ids = tok(rendered, add_special_tokens=False)["input_ids"]
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)
    assert body["usage"]["completion_tokens"] == 5
    # the same tokens through /v1/completions give the same greedy answer
    completion = await client.post(
        "/v1/completions",
        json={"model": model, "prompt": prompt_ids, "max_tokens": 5, "temperature": 0,
              "ignore_eos": True},
    )  # fmt: skip
    assert completion.json()["choices"][0]["text"] == choice["message"]["content"]


async def test_content_parts_equal_plain_content(client, model):
    parts = [
        MESSAGES[0],
        {"role": "user", "content": [{"type": "text", "text": "the capital of "},
                                     {"type": "text", "text": "France is"}]},
    ]  # fmt: skip
    plain = await chat(client, model, max_tokens=4)
    with_parts = await chat(client, model, max_tokens=4, messages=parts)
    assert with_parts["choices"][0]["message"] == plain["choices"][0]["message"]


async def test_max_completion_tokens(client, model):
    body = await chat(client, model, max_completion_tokens=3)
    assert body["usage"]["completion_tokens"] == 3


async def test_n_seed_and_sparsity_field(client, model):
    fields = dict(max_tokens=8, temperature=1.0, n=2, seed=5)
    first, second = await chat(client, model, **fields), await chat(client, model, **fields)
    texts = [c["message"]["content"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1]
    assert texts == [c["message"]["content"] for c in second["choices"]]
    assert texts[0] != texts[1]
    assert first["sparsity"]["level"] == 0.0


async def test_logprobs(client, model):
    body = await chat(client, model, max_tokens=4, logprobs=True, top_logprobs=2)
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert entry["logprob"] <= 0.0
        assert entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 2
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])  # greedy
    without = await chat(client, model, max_tokens=2)
    assert without["choices"][0]["logprobs"] is None


async def test_stream_role_then_content_then_finish(client, model):
    full = await chat(client, model, max_tokens=6)
    response = await client.post(
        "/v1/chat/completions",
        json={"model": model, "messages": MESSAGES, "max_tokens": 6, "temperature": 0,
              "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}},
    )  # fmt: skip
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = sse_payloads(response.text)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    first = chunks[0]["choices"][0]
    assert first["delta"]["role"] == "assistant"
    assert first["finish_reason"] is None
    content = chunks[1:-2]
    assert all(c["choices"][0]["delta"]["role"] is None for c in content)
    text = "".join(c["choices"][0]["delta"]["content"] for c in content)
    assert text == full["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-2]["sparsity"]["level"] == 0.0
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == full["usage"]


async def test_stream_logprobs(client, model):
    response = await client.post(
        "/v1/chat/completions",
        json={"model": model, "messages": MESSAGES, "max_tokens": 3, "temperature": 0,
              "ignore_eos": True, "stream": True, "logprobs": True},
    )  # fmt: skip
    chunks = sse_payloads(response.text)
    entries = [e for c in chunks if c["choices"][0]["logprobs"]
               for e in c["choices"][0]["logprobs"]["content"]]  # fmt: skip
    assert len(entries) == 3
    assert all(e["top_logprobs"] == [] for e in entries)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages.0.content",
        ),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"top_logprobs": 6, "logprobs": True}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
async def test_bad_chat_requests_are_400(client, model, fields, param):
    body = {"model": model, "messages": MESSAGES, **fields}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


async def test_chat_context_length(client, model):
    long = [{"role": "user", "content": "the cat sat " * 200}]
    response = await client.post(
        "/v1/chat/completions", json={"model": model, "messages": long, "max_tokens": 10}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["message"].startswith("This model's maximum context length is 256 tokens.")
