"""The real `cats-serve` process driven by the official `openai` client and plain httpx.

One server for the module: the tiny random model with a long context, a 0.5 thresholds file, an
API key, one sequence at a time and a queue of two (so a full queue is easy to reach; n=2 fits).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import openai
import pytest
from api_support import LONG_CONTEXT, metric

KEY = "e2e-secret"
PROMPT = "the cat sat on"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}
LONG = 12000  # tokens: tens of seconds on a CPU; only ever ended by a disconnect here
POLL_S = 30  # bound on waiting for the server to reach a state
QUEUE = 2


@pytest.fixture(scope="module")
def server(launcher, long_checkpoint):
    return launcher(
        "--model", str(long_checkpoint),
        "--thresholds", str(long_checkpoint / "thresholds-0.5.json"),
        "--api-key", KEY,
        "--device", "cpu",
        "--max-batch-size", "1",
        "--max-queue-size", str(QUEUE),
        "--max-seq-len", str(LONG_CONTEXT),
        "--log-level", "warning",
    )  # fmt: skip


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(api_key=KEY, base_url=f"{server.url}/v1", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def model(long_checkpoint) -> str:
    return long_checkpoint.name


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as c:
        yield c


def gauge(http, name: str) -> float:
    return metric(http.get("/metrics").text, name)


def wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + POLL_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def idle(http) -> bool:
    return (
        gauge(http, "cats_num_requests_running") == 0
        and gauge(http, "cats_num_requests_waiting") == 0
    )


def test_models(client, model):
    assert [m.id for m in client.models.list()] == [model]
    card = client.models.retrieve(model)
    assert card.model_extra["sparsity_levels"] == [0.0, 0.5]


def test_completion(client, model):
    response = client.completions.create(model=model, prompt=PROMPT, max_tokens=5, **GREEDY)
    choice = response.choices[0]
    assert choice.text
    assert choice.finish_reason == "length"
    assert response.usage.completion_tokens == 5
    assert response.usage.total_tokens == response.usage.prompt_tokens + 5
    assert response.model_extra["sparsity"]["level"] == 0.0


def test_streaming_with_usage(client, model):
    full = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, **GREEDY)
    chunks = list(
        client.completions.create(
            model=model,
            prompt=PROMPT,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat(client, model):
    messages = [{"role": "user", "content": "the capital of France is"}]
    response = client.chat.completions.create(
        model=model, messages=messages, max_tokens=6, **GREEDY
    )
    message = response.choices[0].message
    assert message.role == "assistant"
    assert message.content
    assert response.usage.completion_tokens == 6
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=6, stream=True, **GREEDY
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_two(client, model):
    response = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=6, n=2, temperature=1.0, seed=3
    )
    assert [c.index for c in response.choices] == [0, 1]
    assert response.choices[0].text != response.choices[1].text


def test_stop(client, model):
    full = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, **GREEDY)
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=12, stop=[stop], **GREEDY
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_logprobs(client, model):
    response = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=4, logprobs=2, **GREEDY
    )
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 4
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(
        token in top for token, top in zip(logprobs.tokens, logprobs.top_logprobs, strict=True)
    )
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
        **GREEDY,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 3
    assert all(len(entry.top_logprobs) == 2 for entry in content)


def test_seed_reproducibility(client, model):
    def sample(seed):
        return (
            client.completions.create(
                model=model, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=seed
            )
            .choices[0]
            .text
        )

    assert sample(42) == sample(42)
    assert sample(42) != sample(43)


def test_sparsity_extension(client, model):
    response = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=4, extra_body={"sparsity": 0.5, "ignore_eos": True}
    )
    assert response.model_extra["sparsity"]["level"] == 0.5
    assert response.model_extra["sparsity"]["mlp_sparsity"] > 0.3


def test_curl_like_request(http, model):
    response = http.post(
        "/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 3}
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json()["usage"]["completion_tokens"] <= 3


# ---- errors, as the client's exceptions ------------------------------------------------------


def test_bad_request(client, model):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt=PROMPT, temperature=5)
    assert err.value.body["param"] == "temperature"


def test_context_length(client, model):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=LONG_CONTEXT)
    assert err.value.code == "context_length_exceeded"
    assert f"maximum context length is {LONG_CONTEXT} tokens" in err.value.message


def test_unknown_sparsity(client, model):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt=PROMPT, extra_body={"sparsity": 0.7})
    assert "0, 0.5" in err.value.message


def test_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4o", prompt=PROMPT)
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])


def test_authentication(server, model):
    for key in ("wrong-key", KEY + "x"):
        with openai.OpenAI(api_key=key, base_url=f"{server.url}/v1", max_retries=0) as c:
            with pytest.raises(openai.AuthenticationError):
                c.completions.create(model=model, prompt=PROMPT, max_tokens=2)
            with pytest.raises(openai.AuthenticationError):
                c.models.list()
    assert httpx.get(f"{server.url}/health").status_code == 200  # health stays public


def test_full_queue_then_disconnects_free_everything(client, http, model):
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": LONG,
        "ignore_eos": True,
        "stream": True,
    }
    with contextlib.ExitStack() as streams:
        running = streams.enter_context(http.stream("POST", "/v1/completions", json=body))
        assert running.status_code == 200
        # keep the iterator: dropping it mid-stream makes httpx close the connection
        lines = running.iter_lines()
        first = next(lines)  # a token arrived: the request holds the only slot
        assert first.startswith("data: {") and '"error"' not in first, first
        wait_for(lambda: gauge(http, "cats_num_requests_running") == 1, "a running request")
        for n in range(1, QUEUE + 1):
            queued = streams.enter_context(http.stream("POST", "/v1/completions", json=body))
            assert queued.status_code == 200
            wait_for(lambda n=n: gauge(http, "cats_num_requests_waiting") == n, "queued requests")
        with pytest.raises(openai.RateLimitError) as err:
            client.completions.create(model=model, prompt=PROMPT, max_tokens=2)
        assert int(err.value.response.headers["retry-after"]) >= 1
        assert err.value.code == "queue_full"
    # every client hung up: the running request and the queued ones are aborted
    wait_for(lambda: idle(http), "the slot and the queue to be freed")
    assert client.completions.create(model=model, prompt=PROMPT, max_tokens=2).usage


def test_non_streaming_disconnect_frees_the_slot(server, http, model):
    body = {"model": model, "prompt": PROMPT, "max_tokens": LONG, "ignore_eos": True}

    async def hang_up_while_running() -> None:
        async with httpx.AsyncClient(
            base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120
        ) as c:
            pending = asyncio.ensure_future(c.post("/v1/completions", json=body))
            deadline = time.monotonic() + POLL_S
            while gauge(http, "cats_num_requests_running") != 1:
                assert time.monotonic() < deadline, "the request never started running"
                assert not pending.done(), pending.result().text
                await asyncio.sleep(0.05)
            pending.cancel()  # closes the connection mid-request
            await asyncio.gather(pending, return_exceptions=True)

    asyncio.run(hang_up_while_running())
    wait_for(lambda: idle(http), "the slot to be freed")


def test_chat_stream_disconnect_frees_the_slot(http, model):
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": LONG,
        "ignore_eos": True,
        "stream": True,
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        assert '"role": "assistant"' in next(lines)
        wait_for(lambda: gauge(http, "cats_num_requests_running") == 1, "a running request")
    wait_for(lambda: idle(http), "the slot to be freed")
