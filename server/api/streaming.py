"""What a completion and a chat response have in common: id, timestamps, the requested level,
usage, realised sparsity, the framing of stream chunks and the one streaming skeleton."""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from cats_serve.server.api.admission import requested_level
from cats_serve.server.api.choices import Choice, collect, sparsity, usage
from cats_serve.server.api.disconnect import CLIENT_CLOSED_REQUEST, unless_disconnected
from cats_serve.server.api.logprob_shapes import TokenTexts
from cats_serve.server.api.responses import SparsityReport, Usage
from cats_serve.server.api.serving import ServingModel
from cats_serve.server.api.sse import DONE, EventStreamResponse, chunk_exclusions, sse_event
from cats_serve.server.engine.generation import Generation
from cats_serve.server.engine.types import GenerationRequest, RequestResult, TokenEvent


class ResponseBuilder(ABC):
    """Base of the per-endpoint builders. Subclasses set the id prefix and the chunk model and
    write `response()` (the JSON body) and the three pieces of a stream: `opening(choice)`
    (the first chunk of a choice, or None), `delta(choice, event)` (the chunk of one token
    event, or None when there is nothing to send) and `closing(choice)` (its last chunk)."""

    id_prefix: str
    chunk_model: type[BaseModel]

    def __init__(self, serving: ServingModel, body, prompt_lens: list[int]):
        self.serving = serving
        self.body = body
        self.prompt_lens = prompt_lens  # one entry per prompt (not per choice)
        # body.n choices per prompt, prompt-major (the order build_requests makes them in)
        n = len(prompt_lens) * body.n
        self.choices = [Choice(index=i, prompt_index=i // body.n) for i in range(n)]
        self.texts = TokenTexts(serving.tokenizer)
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.level = requested_level(serving, body)

    @abstractmethod
    def opening(self, choice: Choice) -> BaseModel | None:
        """See the class docstring."""

    @abstractmethod
    def delta(self, choice: Choice, event: TokenEvent) -> BaseModel | None:
        """See the class docstring."""

    @abstractmethod
    def closing(self, choice: Choice) -> BaseModel:
        """See the class docstring."""

    @abstractmethod
    def response(self) -> BaseModel:
        """See the class docstring."""

    async def stream(self, generation: Generation) -> AsyncIterator[str]:
        """Every choice's opening chunk, then the token chunks as they come (each choice's
        closing chunk carries its sparsity), the usage chunk if asked for, then [DONE]."""
        for choice in self.choices:
            first = self.opening(choice)
            if first is not None:
                yield self.chunk(first)
        async for index, event in generation.events():
            choice = self.choices[index]
            if isinstance(event, RequestResult):
                choice.finish(event)  # raises APIError on a failed request: an error event
                yield self.chunk(self.closing(choice), sparsity=choice.sparsity())
                continue
            choice.add(event)
            delta = self.delta(choice, event)
            if delta is not None:
                yield self.chunk(delta)
        if self.body.include_usage:
            yield self.usage_chunk()
        yield DONE

    def usage(self) -> Usage:
        return usage(self.choices, self.prompt_lens)

    def sparsity(self) -> SparsityReport:
        return sparsity(self.level, self.choices)

    def chunk(self, choice: BaseModel, sparsity: SparsityReport | None = None) -> str:
        """One SSE event holding one choice's delta (and, on its last chunk, its sparsity)."""
        chunk = self.chunk_model(
            id=self.id,
            created=self.created,
            model=self.serving.name,
            choices=[choice],
            sparsity=sparsity,
        )
        return sse_event(chunk.model_dump(exclude=chunk_exclusions(self.body, sparsity)))

    def usage_chunk(self) -> str:
        """The last event when the client asked for usage: no choices, the whole request's."""
        return sse_event(
            self.chunk_model(
                id=self.id,
                created=self.created,
                model=self.serving.name,
                choices=[],
                usage=self.usage(),
                sparsity=self.sparsity(),
            )
        )

    async def respond(self, request: Request, requests: list[GenerationRequest]) -> Response:
        """Submit the engine requests (one per choice; a refusal is an error answer, before
        anything is sent), then stream the chunks, or wait for every choice and answer with
        one JSON body; a client that goes away aborts the generation either way."""
        generation = Generation(self.serving.engine, requests)
        generation.submit()
        if self.body.stream:
            return EventStreamResponse(self.stream(generation), on_close=generation.abort)
        try:
            finished, _ = await unless_disconnected(request, collect(generation, self.choices))
        finally:
            generation.abort()
        if not finished:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse(self.response().model_dump())
