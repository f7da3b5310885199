"""Token logprobs in the two shapes OpenAI uses: legacy completions and chat.

Tokens are shown as their own decoded text; a token that is only part of a UTF-8 character
shows as U+FFFD, as other servers do.
"""

from __future__ import annotations

from cats_serve.server.api.responses import (
    ChatLogprobs,
    CompletionLogprobs,
    TokenLogprobEntry,
    TopLogprob,
)
from cats_serve.server.engine.sampling import TokenLogprob


class TokenTexts:
    """Token id -> text, memoised (the same ids recur across a response)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id])
            self._cache[token_id] = text
        return text


def completion_logprobs(
    texts: TokenTexts,
    token_ids: list[int],
    logprobs: list[TokenLogprob | None],
    offset: int = 0,
) -> CompletionLogprobs:
    """Legacy shape; `offset` is where the first token's text starts in the choice's text."""
    out = CompletionLogprobs()
    for token_id, lp in zip(token_ids, logprobs, strict=True):
        text = texts(token_id)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if lp is None:  # the first prompt token has nothing before it to be scored on
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(lp.logprob)
        top: dict[str, float] = {}
        for t, v in lp.top:  # best first; tokens showing as the same text keep the best value
            top.setdefault(texts(t), v)
        top.setdefault(text, lp.logprob)  # the sampled token is always listed
        out.top_logprobs.append(top)
    return out


def merge(first: CompletionLogprobs, second: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=first.tokens + second.tokens,
        token_logprobs=first.token_logprobs + second.token_logprobs,
        top_logprobs=first.top_logprobs + second.top_logprobs,
        text_offset=first.text_offset + second.text_offset,
    )


def chat_logprobs(
    texts: TokenTexts, token_ids: list[int], logprobs: list[TokenLogprob | None]
) -> ChatLogprobs:
    content = []
    for token_id, lp in zip(token_ids, logprobs, strict=True):
        if lp is None:
            continue
        text = texts(token_id)
        content.append(
            TokenLogprobEntry(
                token=text,
                logprob=lp.logprob,
                bytes=list(text.encode()),
                top_logprobs=[
                    TopLogprob(token=texts(t), logprob=v, bytes=list(texts(t).encode()))
                    for t, v in lp.top
                ],
            )
        )
    return ChatLogprobs(content=content)
