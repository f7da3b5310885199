"""/v1/completions through httpx against the ASGI app (lifespan running), tiny model on CPU."""

from __future__ import annotations

import pytest
from api_support import post_ok, sse_payloads

pytestmark = pytest.mark.anyio

PROMPT = "the cat sat on"


async def complete(client, model, **fields) -> dict:
    body = {"model": model, "prompt": PROMPT, "temperature": 0, "ignore_eos": True, **fields}
    return await post_ok(client, "/v1/completions", body)


async def test_response_shape_and_usage(client, model, tokenizer):
    body = await complete(client, model, max_tokens=5)
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["model"] == model
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "length"
    assert choice["logprobs"] is None
    prompt_tokens = len(tokenizer(PROMPT)["input_ids"])
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 5,
        "total_tokens": prompt_tokens + 5,
    }


async def test_default_max_tokens_is_16(client, model):
    body = await complete(client, model)
    assert body["usage"]["completion_tokens"] == 16


async def test_greedy_is_deterministic(client, model):
    first = await complete(client, model, max_tokens=8)
    second = await complete(client, model, max_tokens=8)
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    assert first["choices"][0]["text"]


async def test_seed_reproduces_sampling(client, model):
    def sampled(seed):
        return complete(client, model, max_tokens=12, temperature=1.0, top_p=0.95, seed=seed)

    a, b, c = await sampled(7), await sampled(7), await sampled(8)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["choices"][0]["text"] != c["choices"][0]["text"]


async def test_top_k_one_is_greedy(client, model):
    greedy = await complete(client, model, max_tokens=8)
    top1 = await complete(client, model, max_tokens=8, temperature=1.5, top_k=1, seed=3)
    assert top1["choices"][0]["text"] == greedy["choices"][0]["text"]


async def test_list_of_prompts_times_n(client, model, tokenizer):
    prompts = [PROMPT, "hello world"]
    body = await complete(client, model, prompt=prompts, n=2, max_tokens=4)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    single = [(await complete(client, model, prompt=p, max_tokens=4)) for p in prompts]
    texts = [c["text"] for c in body["choices"]]
    # greedy: both choices of a prompt equal that prompt's own completion, in prompt order
    assert texts == [single[0]["choices"][0]["text"]] * 2 + [single[1]["choices"][0]["text"]] * 2
    prompt_tokens = sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    assert body["usage"]["prompt_tokens"] == prompt_tokens  # each prompt counted once
    assert body["usage"]["completion_tokens"] == 4 * 4


async def test_n_with_seed_gives_different_reproducible_choices(client, model):
    fields = dict(max_tokens=10, temperature=1.0, n=2, seed=11)
    first, second = await complete(client, model, **fields), await complete(client, model, **fields)
    texts = [c["text"] for c in first["choices"]]
    assert texts == [c["text"] for c in second["choices"]]
    assert texts[0] != texts[1]


async def test_token_id_prompt_equals_string_prompt(client, model, tokenizer):
    ids = tokenizer(PROMPT)["input_ids"]
    by_text = await complete(client, model, max_tokens=6)
    by_ids = await complete(client, model, prompt=ids, max_tokens=6)
    by_ids_list = await complete(client, model, prompt=[ids], max_tokens=6)
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert by_ids_list["choices"][0]["text"] == by_text["choices"][0]["text"]


async def test_echo_prepends_the_prompt(client, model):
    plain = await complete(client, model, max_tokens=4)
    echoed = await complete(client, model, max_tokens=4, echo=True)
    assert echoed["choices"][0]["text"] == PROMPT + plain["choices"][0]["text"]


async def test_logprobs(client, model):
    body = await complete(client, model, max_tokens=6, logprobs=3)
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    assert "".join(lp["tokens"]) == body["choices"][0]["text"]
    for token, logprob, top in zip(
        lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True
    ):
        assert logprob <= 0.0
        assert token in top
        # the 3 best, plus the sampled token if it is not among them; fewer when two
        # tokens show as the same text (partial UTF-8 bytes all show as U+FFFD)
        assert 1 <= len(top) <= 4
        assert logprob == pytest.approx(max(top.values()))  # greedy picks the best
    offsets = lp["text_offset"]
    assert offsets[0] == 0
    assert all(
        b - a == len(t)
        for a, b, t in zip(offsets[:-1], offsets[1:], lp["tokens"][:-1], strict=True)
    )


async def test_logprobs_zero_reports_only_the_sampled_token(client, model):
    body = await complete(client, model, max_tokens=3, logprobs=0)
    lp = body["choices"][0]["logprobs"]
    assert [list(top) for top in lp["top_logprobs"]] == [[t] for t in lp["tokens"]]


async def test_echo_with_logprobs_scores_the_prompt(client, model, tokenizer):
    body = await complete(client, model, max_tokens=3, logprobs=1, echo=True)
    lp = body["choices"][0]["logprobs"]
    prompt_len = len(tokenizer(PROMPT)["input_ids"])
    assert len(lp["tokens"]) == prompt_len + 3
    assert lp["token_logprobs"][0] is None  # nothing comes before the first prompt token
    assert all(v <= 0.0 for v in lp["token_logprobs"][1:])
    assert "".join(lp["tokens"][:prompt_len]) == PROMPT


async def test_stop_string_cuts_the_text(client, model):
    full = (await complete(client, model, max_tokens=12))["choices"][0]["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), f"pick another cut of {full!r}"
    body = await complete(client, model, max_tokens=12, stop=[stop, "never-produced"])
    choice = body["choices"][0]
    assert choice["text"] == full[: full.index(stop)]
    assert choice["finish_reason"] == "stop"
    single = await complete(client, model, max_tokens=12, stop=stop)
    assert single["choices"][0]["text"] == choice["text"]


async def test_penalties_change_a_repetitive_greedy_text(client, model, tokenizer):
    plain = await complete(client, model, max_tokens=24, logprobs=0)
    tokens = plain["choices"][0]["logprobs"]["tokens"]
    assert len(set(tokens)) < len(tokens), "the tiny model should repeat itself"
    for penalty in ("frequency_penalty", "presence_penalty"):
        body = await complete(client, model, max_tokens=24, logprobs=0, **{penalty: 2.0})
        penalised = body["choices"][0]["logprobs"]["tokens"]
        assert penalised != tokens
        assert len(set(penalised)) > len(set(tokens))


async def test_sparsity_extension(client, model):
    dense = await complete(client, model, max_tokens=6)
    assert dense["sparsity"]["level"] == 0.0
    assert dense["sparsity"]["mlp_sparsity"] == pytest.approx(0.0, abs=0.05)
    sparse = await complete(client, model, max_tokens=6, sparsity=0.5)
    assert sparse["sparsity"]["level"] == 0.5
    assert 0.3 < sparse["sparsity"]["mlp_sparsity"] < 1.0
    explicit_dense = await complete(client, model, max_tokens=6, sparsity=0)
    assert explicit_dense["choices"][0]["text"] == dense["choices"][0]["text"]


async def test_stream_matches_non_streaming(client, model):
    full = await complete(client, model, max_tokens=10)
    response = await client.post(
        "/v1/completions",
        json={"model": model, "prompt": PROMPT, "max_tokens": 10, "temperature": 0,
              "ignore_eos": True, "stream": True},
    )  # fmt: skip
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = sse_payloads(response.text)
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert all("usage" not in c for c in chunks)  # not asked for
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["sparsity"]["level"] == 0.0


async def test_stream_with_usage_logprobs_and_n(client, model):
    response = await client.post(
        "/v1/completions",
        json={"model": model, "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "n": 2,
              "ignore_eos": True, "logprobs": 2, "stream": True,
              "stream_options": {"include_usage": True}},
    )  # fmt: skip
    chunks = sse_payloads(response.text)
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 10
    assert usage_chunk["sparsity"]["level"] == 0.0
    assert all(c["usage"] is None for c in chunks[:-1])
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == index]
        assert mine[-1]["finish_reason"] == "length"
        tokens = [t for c in mine if c["logprobs"] for t in c["logprobs"]["tokens"]]
        assert len(tokens) == 5
        for c in mine[:-1]:
            assert all(len(top) <= 3 for top in c["logprobs"]["top_logprobs"])


async def test_stream_echo(client, model):
    response = await client.post(
        "/v1/completions",
        json={"model": model, "prompt": PROMPT, "max_tokens": 3, "echo": True, "stream": True},
    )
    chunks = sse_payloads(response.text)
    assert chunks[0]["choices"][0]["text"] == PROMPT
