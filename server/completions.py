"""The `/v1/completions` handler: request -> engine requests -> JSON or SSE response."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from cats_serve.server.async_engine import stream_request
from cats_serve.server.engine_types import (
    EngineError,
    GenerationRequest,
    RequestResult,
    TokenEvent,
)
from cats_serve.server.errors import APIError, from_engine_error
from cats_serve.server.metrics import Metrics
from cats_serve.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    SparsityReport,
    Usage,
)
from cats_serve.server.serving import ServingModel

DISCONNECT_POLL_SECONDS = 0.1


def check_model(serving: ServingModel, name: str) -> None:
    if name != serving.name:
        raise APIError(
            404,
            f"The model `{name}` does not exist. Available: {serving.name}",
            type="not_found_error",
            param="model",
            code="model_not_found",
        )


def build_requests(
    serving: ServingModel, body: CompletionRequest, prompt_ids: list[list[int]]
) -> list[GenerationRequest]:
    """One engine request per (prompt, n); all are checked before any is submitted."""
    level = serving.default_sparsity if body.sparsity is None else body.sparsity
    requests = []
    for ids in prompt_ids:
        max_tokens = body.max_tokens or max(1, serving.max_seq_len - len(ids))
        for j in range(body.n):
            params = body.to_sampling_params(max_tokens)
            if params.seed is not None and j:
                params = type(params)(**{**params.__dict__, "seed": params.seed + j})
            req = GenerationRequest(
                request_id=uuid.uuid4().hex,
                prompt_ids=ids,
                params=params,
                sparsity=level,
                prompt_logprobs=body.echo and body.logprobs is not None,
            )
            try:
                serving.engine.check(req)
            except EngineError as exc:
                raise from_engine_error(exc) from exc
            requests.append(req)
    return requests


class _Choice:
    """Accumulates one choice's text, logprobs and result."""

    def __init__(
        self,
        serving: ServingModel,
        index: int,
        prompt: str,
        prompt_ids: list[int],
        body: CompletionRequest,
    ):
        self.index = index
        self.prompt_ids = prompt_ids
        self.tokenizer = serving.tokenizer
        self.text = ""
        self.want_logprobs = body.logprobs is not None
        self.logprobs = CompletionLogprobs() if self.want_logprobs else None
        self.result: RequestResult | None = None
        self.prefix = prompt if body.echo else ""

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def add_logprob(self, token_id: int, lp) -> None:
        if self.logprobs is None:
            return
        offset = len(self.prefix) + sum(len(t) for t in self.logprobs.tokens)
        self.logprobs.tokens.append(self.token_text(token_id))
        self.logprobs.text_offset.append(offset)
        self.logprobs.token_logprobs.append(None if lp is None else lp.logprob)
        self.logprobs.top_logprobs.append(
            None if lp is None else {self.token_text(t): v for t, v in lp.top}
        )

    def on_event(self, event: TokenEvent | RequestResult) -> str:
        if isinstance(event, RequestResult):
            self.result = event
            if event.prompt_logprobs and self.logprobs is not None:
                echoed = CompletionLogprobs()
                prompt_ids = self.prompt_ids
                for tok, lp in zip(prompt_ids, event.prompt_logprobs, strict=False):
                    echoed.tokens.append(self.token_text(tok))
                    echoed.token_logprobs.append(None if lp is None else lp.logprob)
                    echoed.top_logprobs.append(
                        None if lp is None else {self.token_text(t): v for t, v in lp.top}
                    )
                offset, offsets = 0, []
                for t in echoed.tokens:
                    offsets.append(offset)
                    offset += len(t)
                echoed.text_offset = offsets
                self.logprobs = CompletionLogprobs(
                    tokens=echoed.tokens + self.logprobs.tokens,
                    token_logprobs=echoed.token_logprobs + self.logprobs.token_logprobs,
                    top_logprobs=echoed.top_logprobs + self.logprobs.top_logprobs,
                    text_offset=echoed.text_offset + self.logprobs.text_offset,
                )
            return ""
        if event.token_id >= 0:
            self.add_logprob(event.token_id, event.logprob)
        self.text += event.text
        return event.text

    @property
    def finish_reason(self) -> str | None:
        if self.result is None:
            return None
        return (
            self.result.finish_reason if self.result.finish_reason in ("stop", "length") else None
        )


def _usage(choices: list[_Choice], prompt_lens: list[int]) -> Usage:
    completion = sum(c.result.generation_tokens for c in choices if c.result)
    prompt = sum(prompt_lens)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _sparsity(serving: ServingModel, body: CompletionRequest, choices: list[_Choice]):
    level = serving.default_sparsity if body.sparsity is None else body.sparsity
    values = [
        c.result.mlp_sparsity for c in choices if c.result and c.result.mlp_sparsity is not None
    ]
    return SparsityReport(level=level, mlp_sparsity=sum(values) / len(values) if values else None)


async def _drive(serving: ServingModel, req: GenerationRequest, choice: _Choice, out=None):
    """Run one choice; with `out`, forward (choice, delta, event-or-exception) to a queue."""
    try:
        async for event in stream_request(serving.engine, req):
            delta = choice.on_event(event)
            if out is not None:
                await out.put((choice, delta, event))
        if choice.result is not None and choice.result.finish_reason == "error":
            raise APIError(500, f"generation failed: {choice.result.error}", type="server_error")
    except (EngineError, APIError) as exc:
        if out is None:
            raise
        await out.put((choice, "", exc))


async def _until_disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)


async def create_completion(
    body: CompletionRequest, request: Request, serving: ServingModel, metrics: Metrics
):
    check_model(serving, body.model)
    prompts = body.prompts()
    prompt_ids = [serving.tokenizer(p)["input_ids"] for p in prompts]
    gen_requests = build_requests(serving, body, prompt_ids)
    choices = []
    for i, req in enumerate(gen_requests):
        choices.append(_Choice(serving, i, prompts[i // body.n], req.prompt_ids, body))
    prompt_lens = [len(ids) for ids in prompt_ids]
    response_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        events = _stream(serving, body, gen_requests, choices, prompt_lens, response_id, created)
        return StreamingResponse(events, media_type="text/event-stream")
    tasks = [
        asyncio.ensure_future(_drive(serving, r, c))
        for r, c in zip(gen_requests, choices, strict=True)
    ]
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        done = asyncio.ensure_future(asyncio.gather(*tasks))
        await asyncio.wait([done, watcher], return_when=asyncio.FIRST_COMPLETED)
        if not done.done():  # the client went away: abort every choice, free their slots
            done.cancel()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return JSONResponse({}, status_code=499)
        done.result()
    except EngineError as exc:
        for t in tasks:
            t.cancel()
        metrics.observe_refusal(exc.reason)
        raise from_engine_error(exc) from exc
    finally:
        watcher.cancel()
    response = CompletionResponse(
        id=response_id,
        created=created,
        model=serving.name,
        choices=[
            CompletionChoice(
                index=c.index,
                text=c.prefix + c.text,
                logprobs=c.logprobs,
                finish_reason=c.finish_reason,
            )
            for c in choices
        ],
        usage=_usage(choices, [prompt_lens[i // body.n] for i in range(len(choices))]),
        sparsity=_sparsity(serving, body, choices),
    )
    return JSONResponse(response.model_dump())


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _stream(
    serving, body, gen_requests, choices, prompt_lens, response_id, created
) -> AsyncIterator[str]:
    queue: asyncio.Queue = asyncio.Queue()
    tasks = [
        asyncio.ensure_future(_drive(serving, r, c, queue))
        for r, c in zip(gen_requests, choices, strict=True)
    ]
    base = {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": serving.name,
    }

    def chunk(choice, text, finish_reason=None):
        return _sse(
            {
                **base,
                "choices": [
                    {
                        "index": choice.index,
                        "text": text,
                        "logprobs": None,
                        "finish_reason": finish_reason,
                    }
                ],
            }
        )

    try:
        for c in choices:
            if c.prefix:
                yield chunk(c, c.prefix)
        remaining = len(tasks)
        while remaining:
            choice, delta, event = await queue.get()
            if isinstance(event, Exception):
                err = from_engine_error(event) if isinstance(event, EngineError) else event
                yield _sse(
                    {
                        "error": {
                            "message": err.message,
                            "type": err.type,
                            "param": err.param,
                            "code": err.code,
                        }
                    }
                )
                break
            if isinstance(event, RequestResult):
                remaining -= 1
                if event.finish_reason != "error":
                    yield chunk(choice, "", choice.finish_reason)
            elif delta:
                yield chunk(choice, delta)
        else:
            if body.stream_options and body.stream_options.include_usage:
                usage = _usage(choices, [prompt_lens[i // body.n] for i in range(len(choices))])
                yield _sse(
                    {
                        **base,
                        "choices": [],
                        "usage": usage.model_dump(),
                        "sparsity": _sparsity(serving, body, choices).model_dump(),
                    }
                )
        yield "data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()
