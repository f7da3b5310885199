"""The defects of the attack run against the real `cats-serve` process, one test each: a
request's bad numbers or bytes only ever affect that request, and refusals come early, with
the right status, in OpenAI's error shape."""

from __future__ import annotations

import json
import socket
import subprocess
import threading

import httpx
import openai
import pytest
from api_support import TINY_HALF_THRESHOLD, cats_serve_command, write_thresholds

pytestmark = pytest.mark.slow

KEY = "hardening-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY_LIMIT = 1 << 20
ORIGIN = "http://app.example"


@pytest.fixture(scope="module")
def server(launcher, tiny_checkpoint, tmp_path_factory):
    half = tmp_path_factory.mktemp("thr") / "t50.json"
    write_thresholds(tiny_checkpoint, 0.5, TINY_HALF_THRESHOLD, half)
    return launcher(
        "--model", str(tiny_checkpoint),
        "--device", "cpu",
        "--thresholds", str(half),
        "--api-key", KEY,
        "--metrics-api-key",
        "--cors-origins", ORIGIN,
        "--max-queue-size", "16",
        "--max-request-bytes", str(BODY_LIMIT),
        "--header-timeout", "1",
    )  # fmt: skip


@pytest.fixture(scope="module")
def model(tiny_checkpoint) -> str:
    return tiny_checkpoint.name


def post(server, body, path="/v1/completions", **kwargs) -> httpx.Response:
    """POST raw JSON text (json.dumps escapes a lone surrogate, as a client's JSON may)."""
    headers = {**AUTH, "Content-Type": "application/json", **kwargs.pop("headers", {})}
    content = json.dumps(body) if isinstance(body, dict) else body
    return httpx.post(server.url + path, content=content, headers=headers, timeout=60, **kwargs)


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_a_tiny_temperature_is_greedy_and_fails_no_neighbour(server, model):
    base = {"model": model, "prompt": "the cat sat on", "max_tokens": 6, "ignore_eos": True}
    greedy = post(server, {**base, "temperature": 0}).json()["choices"][0]["text"]
    results: list[httpx.Response] = []

    def send(body):
        results.append(post(server, body))

    bodies = [{**base, "temperature": 1e-40, "seed": i} for i in range(4)]
    bodies += [{**base, "temperature": 0.8, "seed": i} for i in range(8)]
    threads = [threading.Thread(target=send, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [r.status_code for r in results] == [200] * len(bodies)
    tiny = [r.json()["choices"][0]["text"] for r in results if b"1e-40" in r.request.content]
    assert tiny == [greedy] * 4


@pytest.mark.parametrize("seed", [2**64, 2**70, -(2**63) - 1])
def test_a_seed_outside_64_bits_is_a_400(server, model, seed):
    body = {"model": model, "prompt": "the", "max_tokens": 2, "temperature": 1, "seed": seed}
    assert error_of(post(server, body), 400)["param"] == "seed"


def test_the_largest_seed_works_with_n_choices(server, model):
    body = {"model": model, "prompt": "the", "max_tokens": 2, "temperature": 1}
    response = post(server, {**body, "seed": 2**63 - 1, "n": 3})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/completions", "prompt"),
        ("/v1/completions", "model"),
        ("/v1/chat/completions", "messages.0.content"),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_the_field(server, model, path, field):
    if path.endswith("chat/completions"):
        body = {"model": model, "messages": [{"role": "user", "content": "hi \ud800"}]}
    else:
        body = {"model": model, "prompt": "the cat", "max_tokens": 2}
        body[field] = "bad \ud800"
    error = error_of(post(server, body, path), 400)
    assert error["param"] == field
    assert "surrogate" in error["message"]


def test_more_sequences_than_the_queue_holds_is_a_400_not_a_429(server, model):
    for body in (
        {"model": model, "prompt": ["a"] * 9, "n": 2, "max_tokens": 1},
        {"model": model, "prompt": ["a"] * 17, "max_tokens": 1},
    ):
        response = post(server, body)
        assert "Retry-After" not in response.headers
        assert error_of(response, 400)["code"] == "too_many_sequences"


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_tokens", "10"), ("max_tokens", True), ("stream", "yes"), ("n", 2.0)],
)
def test_types_are_strict(server, model, field, value):
    body = {"model": model, "prompt": "the", "max_tokens": 2, field: value}
    assert error_of(post(server, body), 400)["param"] == field


def test_a_body_over_the_limit_is_a_413_and_the_server_stays_up(server, model):
    big = {"model": model, "prompt": "x" * (2 * BODY_LIMIT), "max_tokens": 1}
    assert error_of(post(server, big), 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is counted as the body arrives
        yield b'{"model": "' + model.encode() + b'", "prompt": "'
        for _ in range(3 * BODY_LIMIT // 65536):
            yield b"x" * 65536
        yield b'", "max_tokens": 1}'

    assert error_of(post(server, chunks()), 413)["code"] == "request_too_large"
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_a_prompt_too_long_for_the_context_is_refused_before_tokenizing(server, model):
    # under the body limit, but more characters than the context's tokens can hold
    body = {"model": model, "prompt": "the cat " * 60_000, "max_tokens": 1}
    assert error_of(post(server, body), 400)["code"] == "context_length_exceeded"


def test_the_api_key_is_checked_before_the_body(server, model):
    too_big = {"model": model, "prompt": "x" * (2 * BODY_LIMIT)}
    for content in (json.dumps(too_big), "{not json"):
        response = httpx.post(
            f"{server.url}/v1/completions",
            content=content,
            headers={"Content-Type": "application/json"},
            timeout=60,
        )
        assert error_of(response, 401)["code"] == "invalid_api_key"
    wrong = {"Authorization": "Bearer nope"}
    assert error_of(post(server, "{not json", headers=wrong), 401)["code"] == "invalid_api_key"


def test_metrics_can_need_the_key_while_health_stays_open(server):
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    assert httpx.get(f"{server.url}/metrics", headers=AUTH).status_code == 200
    for path in ("/health", "/version", "/openapi.json"):
        assert httpx.get(server.url + path).status_code == 200, path


def test_cors_preflight_for_an_allowed_origin(server):
    preflight = httpx.options(
        f"{server.url}/v1/completions",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.get(f"{server.url}/health", headers={"Origin": "http://elsewhere.example"})
    assert "access-control-allow-origin" not in other.headers


def test_a_connection_that_sends_no_request_is_closed(server):
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as idle:
        assert idle.recv(1) == b""  # closed by the server after --header-timeout


@pytest.mark.parametrize("asked", [0.1 + 0.4, 0.5000000001])
def test_a_level_within_rounding_is_the_loaded_level(server, model, asked):
    body = {"model": model, "prompt": "the", "max_tokens": 2, "sparsity": asked}
    response = post(server, body)
    assert response.status_code == 200, response.text
    assert response.json()["sparsity"]["level"] == 0.5


def test_an_unloaded_level_is_named_at_the_precision_of_the_loaded_ones(server, model):
    body = {"model": model, "prompt": "the", "max_tokens": 2, "sparsity": 0.5001}
    error = error_of(post(server, body), 400)
    assert error["message"] == "sparsity 0.5001 is not loaded; available levels: 0, 0.5"


def test_a_busy_port_fails_at_once_with_exit_2(server):
    port = server.url.rsplit(":", 1)[1]
    result = subprocess.run(
        [*cats_serve_command(), "--port", port, "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "cannot listen on 127.0.0.1:" in result.stderr and "already in use" in result.stderr
    assert "loading" not in result.stderr + result.stdout  # it never began loading the model


def test_the_openai_client_sees_a_clean_400_for_a_bad_seed(server, model):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt="the", max_tokens=2, seed=2**64)
