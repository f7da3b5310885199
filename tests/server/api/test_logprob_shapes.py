"""Token logprobs in OpenAI's two shapes: legacy completions (text offsets, top dicts) and
chat (bytes, top lists)."""

from __future__ import annotations

from cats_serve.server.api.logprob_shapes import (
    TokenTexts,
    chat_logprobs,
    completion_logprobs,
    merge,
)
from cats_serve.server.engine.sampling import TokenLogprob

PIECES = {0: "Hel", 1: "lo", 2: " wor", 3: "ld", 4: "lo", 5: "é"}


class Pieces:
    """A tokenizer stand-in: each id decodes to a fixed piece; counts its decode calls."""

    def __init__(self):
        self.calls = 0

    def decode(self, ids: list[int]) -> str:
        self.calls += 1
        return "".join(PIECES[i] for i in ids)


def lp(token: int, value: float, *top: tuple[int, float]) -> TokenLogprob:
    return TokenLogprob(token, value, list(top))


def test_token_texts_decode_each_id_once():
    tok = Pieces()
    texts = TokenTexts(tok)
    assert [texts(i) for i in (0, 1, 0, 1)] == ["Hel", "lo", "Hel", "lo"]
    assert tok.calls == 2


def test_completion_shape_offsets_and_tops():
    texts = TokenTexts(Pieces())
    out = completion_logprobs(
        texts, [0, 1, 2], [None, lp(1, -0.5, (1, -0.5), (4, -0.7)), lp(2, -2.0, (3, -0.1))], 10
    )
    assert out.tokens == ["Hel", "lo", " wor"]
    assert out.text_offset == [10, 13, 15]  # where each token starts in the choice's text
    assert out.token_logprobs == [None, -0.5, -2.0]
    # ids 1 and 4 both show as "lo": the better value stays; the sampled token is always listed
    assert out.top_logprobs == [None, {"lo": -0.5}, {"ld": -0.1, " wor": -2.0}]


def test_merge_puts_the_echoed_prompt_first():
    texts = TokenTexts(Pieces())
    prompt = completion_logprobs(texts, [0], [None])
    generated = completion_logprobs(texts, [1], [lp(1, -1.0, (1, -1.0))], offset=3)
    both = merge(prompt, generated)
    assert both.tokens == ["Hel", "lo"]
    assert both.text_offset == [0, 3]
    assert both.token_logprobs == [None, -1.0]


def test_chat_shape_has_bytes_and_skips_unscored_tokens():
    texts = TokenTexts(Pieces())
    out = chat_logprobs(texts, [0, 5], [None, lp(5, -0.25, (5, -0.25), (3, -1.5))])
    [entry] = out.content
    assert entry.token == "é" and entry.bytes == list("é".encode())
    assert entry.logprob == -0.25
    assert [(t.token, t.logprob, t.bytes) for t in entry.top_logprobs] == [
        ("é", -0.25, [0xC3, 0xA9]),
        ("ld", -1.5, [0x6C, 0x64]),
    ]
