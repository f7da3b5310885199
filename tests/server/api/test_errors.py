"""Errors, auth, queue limits, health, models, metrics and the OpenAPI document, in-process."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import openai
import pytest
import torch
from api_support import metric, serve_app, wait_ready
from asgi_lifespan import LifespanManager

from cats_serve.server.api import app as app_module
from cats_serve.server.api.app import create_app
from cats_serve.server.api.serving import StartupError
from cats_serve.server.settings import Settings

pytestmark = pytest.mark.anyio

KEY = "test-key-123"


@pytest.fixture(scope="module")
async def app_and_client(tiny_checkpoint, half_thresholds):
    settings = Settings(
        model=str(tiny_checkpoint),
        device="cpu",
        thresholds=[half_thresholds],
        default_sparsity=0.5 + 1e-10,  # names the loaded 0.5 level, within rounding
        api_key=KEY,
        max_batch_size=1,
        max_queue_size=1,
    )
    app = create_app(settings)
    async with serve_app(app) as c:
        c.headers["Authorization"] = f"Bearer {KEY}"
        yield app, c


@pytest.fixture(scope="module")
def client(app_and_client):
    return app_and_client[1]


@pytest.fixture
async def fresh_client(app_and_client):
    """Another client of the same running app, without the API key."""
    transport = httpx.ASGITransport(app=app_and_client[0])
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


@pytest.fixture(scope="module")
def engine(app_and_client):
    return app_and_client[0].state.cats.serving.engine


def assert_openai_error(response: httpx.Response, status: int, type_: str, code=None, param=None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == type_
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


# ---- auth ------------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "Bearer wrong-key", f"Basic {KEY}", f"Bearer {KEY}x"])
async def test_api_key_required_on_v1(fresh_client, model, header):
    headers = {"Authorization": header} if header else {}
    for response in (
        await fresh_client.get("/v1/models", headers=headers),
        await fresh_client.post(
            "/v1/completions", json={"model": model, "prompt": "x"}, headers=headers
        ),
        # the key is checked before the body: no hint of what a valid request looks like
        await fresh_client.post("/v1/chat/completions", json={"nonsense": 1}, headers=headers),
    ):
        assert_openai_error(response, 401, "invalid_request_error", code="invalid_api_key")
        assert response.headers["WWW-Authenticate"] == "Bearer"
    for public in ("/health", "/version", "/metrics", "/openapi.json"):
        assert (await fresh_client.get(public)).status_code == 200


async def test_api_key_accepted(client):
    assert (await client.get("/v1/models")).status_code == 200


# ---- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": 6}, "logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"prompt": []}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"model": None}, "model"),
        ({"sparsity": 1.5}, "sparsity"),
        ({"stream_options": {"include_usage": True}}, None),
    ],
)
async def test_validation_errors_are_400(client, model, fields, param):
    body = {"model": model, "prompt": "the cat", **fields}
    response = await client.post("/v1/completions", json=body)
    assert_openai_error(response, 400, "invalid_request_error", code="invalid_value", param=param)


async def test_malformed_json_is_400(client):
    response = await client.post(
        "/v1/completions", content=b'{"model": ', headers={"Content-Type": "application/json"}
    )
    error = assert_openai_error(response, 400, "invalid_request_error")
    assert "JSON" in error["message"]


async def test_out_of_vocabulary_token_ids_are_400(client, model):
    response = await client.post("/v1/completions", json={"model": model, "prompt": [1, 99999]})
    error = assert_openai_error(response, 400, "invalid_request_error", param="prompt")
    assert "99999" in error["message"]


async def test_empty_prompt_is_400(client, model):
    response = await client.post("/v1/completions", json={"model": model, "prompt": ""})
    assert_openai_error(response, 400, "invalid_request_error")


async def test_echo_logprobs_stream_is_400(client, model):
    body = {"model": model, "prompt": "a", "echo": True, "logprobs": 1, "stream": True}
    response = await client.post("/v1/completions", json=body)
    assert_openai_error(response, 400, "invalid_request_error", param="echo")


async def test_context_length_wording(client, model):
    body = {"model": model, "prompt": "the cat sat on the mat", "max_tokens": 300}
    response = await client.post("/v1/completions", json=body)
    error = assert_openai_error(
        response, 400, "invalid_request_error", code="context_length_exceeded", param="max_tokens"
    )
    assert error["message"].startswith(
        "This model's maximum context length is 256 tokens. However, you requested "
    )
    assert "in the completion" in error["message"]


async def test_unknown_model_is_404(client):
    response = await client.post("/v1/completions", json={"model": "gpt-5", "prompt": "hi"})
    error = assert_openai_error(response, 404, "not_found_error", code="model_not_found")
    assert "gpt-5" in error["message"]
    response = await client.get("/v1/models/gpt-5")
    assert_openai_error(response, 404, "not_found_error", code="model_not_found")


async def test_unknown_sparsity_names_the_loaded_levels(client, model):
    body = {"model": model, "prompt": "hi", "sparsity": 0.7}
    response = await client.post("/v1/completions", json=body)
    error = assert_openai_error(
        response, 400, "invalid_request_error", code="unknown_sparsity", param="sparsity"
    )
    assert "0.7" in error["message"]
    assert "0, 0.5" in error["message"]


async def test_unknown_route_is_404_openai_shaped(client):
    assert_openai_error(await client.get("/v1/nothing-here"), 404, "not_found_error")


async def test_refusals_are_counted(client, model):
    def failures(text, reason):
        return metric(text, "cats_request_failure_total", reason=reason) or 0.0

    before = (await client.get("/metrics")).text
    await client.post("/v1/completions", json={"model": "nope", "prompt": "hi"})
    await client.post("/v1/completions", json={"model": model, "prompt": "hi", "n": 0})
    await client.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 999})
    after = (await client.get("/metrics")).text
    for reason in ("model_not_found", "invalid_request", "context_length"):
        assert failures(after, reason) == failures(before, reason) + 1, reason


# ---- models, health, version, metrics, openapi ----------------------------------------------


async def test_models(client, model):
    body = (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    [card] = body["data"]
    assert card["id"] == model
    assert card["object"] == "model"
    assert card["sparsity_levels"] == [0.0, 0.5]
    assert card["default_sparsity"] == 0.5
    assert card["max_model_len"] == 256
    assert (await client.get(f"/v1/models/{model}")).json() == card


async def test_default_sparsity_applies(client, model):
    body = {"model": model, "prompt": "the cat", "max_tokens": 4, "ignore_eos": True}
    response = (await client.post("/v1/completions", json=body)).json()
    assert response["sparsity"]["level"] == 0.5
    assert response["sparsity"]["mlp_sparsity"] > 0.3


async def test_health_version_metrics(client):
    assert (await client.get("/health")).json() == {"status": "ok", "error": None}
    assert (await client.get("/version")).json()["version"]
    response = await client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    assert metric(response.text, "cats_num_requests_running") == 0.0
    assert "cats_request_success_total" in response.text


async def test_openapi_documents_the_api(client):
    spec = (await client.get("/openapi.json")).json()
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"):
        assert path in spec["paths"], path
    schemas = spec["components"]["schemas"]
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        assert {"sparsity", "ignore_eos", "stream_options", "seed"} <= set(
            schemas[name]["properties"]
        )
        assert "extension" in schemas[name]["properties"]["sparsity"]["description"]
    for name in ("CompletionResponse", "ChatCompletionResponse", "CompletionStreamChunk"):
        assert "sparsity" in schemas[name]["properties"]
    assert "SparsityReport" in schemas
    assert {"sparsity_levels", "default_sparsity"} <= set(schemas["ModelCard"]["properties"])
    completions = spec["paths"]["/v1/completions"]["post"]
    assert {"200", "400", "401", "404", "429"} <= set(completions["responses"])
    assert "text/event-stream" in completions["responses"]["200"]["content"]
    assert completions["responses"]["429"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"
    }
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


# ---- engine-level outcomes -------------------------------------------------------------------


@pytest.fixture
def gated_engine(engine, monkeypatch):
    """Decode steps wait until the test opens the gate: requests stay running as long as
    the test needs, without relying on timing."""
    gate = threading.Event()
    step = engine.runner.step

    def gated_step(*args, **kwargs):
        gate.wait(timeout=60)
        return step(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "step", gated_step)
    yield engine, gate
    gate.set()


async def until(predicate, what: str) -> None:
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_full_queue_is_429_with_retry_after(client, fresh_client, model, gated_engine):
    engine, gate = gated_engine
    body = {"model": model, "prompt": "the cat", "max_tokens": 3, "ignore_eos": True}
    running = asyncio.ensure_future(client.post("/v1/completions", json=body))
    await until(lambda: engine.num_running == 1, "a running request")
    waiting = asyncio.ensure_future(client.post("/v1/completions", json=body))
    await until(lambda: engine.num_waiting == 1, "a waiting request")

    refused = await client.post("/v1/completions", json=body)
    assert_openai_error(refused, 429, "rate_limit_error", code="queue_full")
    assert int(refused.headers["Retry-After"]) >= 1
    streamed = await client.post("/v1/completions", json={**body, "stream": True})
    assert_openai_error(streamed, 429, "rate_limit_error")  # refused before the stream starts
    # n=2 needs two places in a queue of one: it can never be taken, so a retry would not
    # help (400, not 429), and nothing of it is left queued
    refused_n = await client.post("/v1/completions", json={**body, "n": 2})
    assert_openai_error(refused_n, 400, "invalid_request_error", code="too_many_sequences")
    assert "Retry-After" not in refused_n.headers
    assert engine.num_waiting == 1

    oai = openai.AsyncOpenAI(
        api_key=KEY, base_url="http://testserver/v1", max_retries=0, http_client=fresh_client
    )
    with pytest.raises(openai.RateLimitError):
        await oai.completions.create(model=model, prompt="the cat", max_tokens=3)

    gate.set()
    assert (await running).status_code == 200
    assert (await waiting).status_code == 200


async def test_cancelled_request_frees_its_slot(client, model, gated_engine):
    engine, gate = gated_engine
    body = {"model": model, "prompt": "the cat", "max_tokens": 200, "ignore_eos": True}
    pending = asyncio.ensure_future(client.post("/v1/completions", json=body))
    await until(lambda: engine.num_running == 1, "a running request")
    pending.cancel()  # what the server sees of a client that went away
    await asyncio.gather(pending, return_exceptions=True)
    gate.set()
    await until(lambda: engine.num_running == 0, "the slot to be freed")
    response = await client.post("/v1/completions", json={**body, "max_tokens": 2})
    assert response.status_code == 200


async def test_engine_failure_mid_stream_is_an_error_event(client, model, engine, monkeypatch):
    def broken_step(*args, **kwargs):
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(engine.runner, "step", broken_step)
    body = {"model": model, "prompt": "the cat", "max_tokens": 5, "ignore_eos": True}
    response = await client.post("/v1/completions", json={**body, "stream": True})
    assert response.status_code == 200  # the stream had started
    events = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e.strip()]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error"
    # the cause goes to the server's log, never to the client (no torch internals)
    assert "simulated device failure" not in error["message"]
    assert "log" in error["message"]

    response = await client.post("/v1/completions", json=body)
    assert_openai_error(response, 500, "server_error", code="generation_failed")
    chat = await client.post(
        "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True},
    )
    assert '"error"' in chat.text
    monkeypatch.undo()
    assert (await client.post("/v1/completions", json=body)).status_code == 200


# ---- startup ---------------------------------------------------------------------------------


async def test_health_is_503_while_loading_then_200(tiny_checkpoint, monkeypatch):
    release = threading.Event()
    load = app_module.load_serving

    def slow_load(settings):
        release.wait(timeout=60)
        return load(settings)

    monkeypatch.setattr(app_module, "load_serving", slow_load)
    app = create_app(Settings(model=str(tiny_checkpoint), device="cpu"))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            response = await c.get("/health")
            assert response.status_code == 503
            assert response.json()["status"] == "loading"
            assert int(response.headers["Retry-After"]) >= 1  # a load takes seconds
            models = await c.get("/v1/models")
            assert_openai_error(models, 503, "server_error", code="loading")
            assert int(models.headers["Retry-After"]) >= 1
            release.set()
            await wait_ready(c)
            assert (await c.get("/v1/models")).status_code == 200


async def test_load_failure_is_reported(tiny_checkpoint, monkeypatch):
    def failing_load(settings):
        raise StartupError("thresholds file x.json: field model.fingerprint does not match")

    monkeypatch.setattr(app_module, "load_serving", failing_load)
    fatal: list[str] = []
    app = create_app(Settings(model=str(tiny_checkpoint), device="cpu"), on_fatal=fatal.append)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            await until(lambda: fatal, "the fatal callback")
            response = await c.get("/health")
            assert response.status_code == 503
            assert response.json() == {"status": "failed", "error": fatal[0]}
            assert "model.fingerprint" in fatal[0]


async def test_a_cpu_server_runs_the_model_on_the_threads_set(tiny_checkpoint):
    app = create_app(Settings(model=str(tiny_checkpoint), device="cpu", cpu_threads=1))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            await wait_ready(c)
            engine = app.state.cats.serving.engine
            seen = []
            engine.step_observers.append(lambda stats: seen.append(torch.get_num_threads()))
            model = (await c.get("/v1/models")).json()["data"][0]["id"]
            body = {"model": model, "prompt": "hi", "max_tokens": 3, "temperature": 0}
            response = await c.post("/v1/completions", json=body)
            assert response.status_code == 200
            assert seen and set(seen) == {1}  # on the engine thread, where the model runs
