"""`cats-serve --quantize int8` serves the default model on a CPU: the README's curl example
(the same request body) answers "Paris", and /v1/models, /version and cats_model_info say
that the weights are int8."""

from __future__ import annotations

import httpx
import pytest

from cats_serve.server.settings import DEFAULT_MODEL, default_cache_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(launcher):
    return launcher(
        "--cache-dir", str(default_cache_dir()), "--device", "cpu", "--quantize", "int8"
    )


def test_readme_curl_example_answers_paris(server):
    body = {"model": DEFAULT_MODEL, "prompt": "The capital of France is", "max_tokens": 8}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert "Paris" in response.json()["choices"][0]["text"]


def test_dense_chat_answers_paris(server):
    chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
        "model": DEFAULT_MODEL, "max_tokens": 20, "sparsity": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    }).json()  # fmt: skip
    assert "Paris" in chat["choices"][0]["message"]["content"], chat


def test_the_weights_are_reported(server):
    [card] = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert card["weights"] == "int8"
    assert httpx.get(f"{server.url}/version").json()["weights"] == "int8"
    metrics = httpx.get(f"{server.url}/metrics").text
    [info] = [line for line in metrics.splitlines() if line.startswith("cats_model_info{")]
    assert 'weights="int8"' in info and 'dtype="float32"' in info
