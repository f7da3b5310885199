"""What a completion and a chat response have in common: id, timestamps, the requested level,
usage, realised sparsity, and the framing of stream chunks."""

from __future__ import annotations

import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from cats_serve.server.choices import Choice, collect, sparsity, usage
from cats_serve.server.disconnect import CLIENT_CLOSED_REQUEST, unless_disconnected
from cats_serve.server.generation import Generation
from cats_serve.server.logprobs import TokenTexts
from cats_serve.server.protocol import SparsityReport, Usage
from cats_serve.server.serving import ServingModel
from cats_serve.server.sse import EventStreamResponse, chunk_exclusions, sse_event


class ResponseBuilder:
    """Base of the per-endpoint builders. Subclasses set the id prefix and the chunk model and
    write `response()` (the JSON body) and `stream(generation)` (the SSE events)."""

    id_prefix: str
    chunk_model: type[BaseModel]

    def __init__(self, serving: ServingModel, body, choices: list[Choice], prompt_lens: list[int]):
        self.serving = serving
        self.body = body
        self.choices = choices
        self.prompt_lens = prompt_lens  # one entry per prompt (not per choice)
        self.texts = TokenTexts(serving.tokenizer)
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.level = serving.default_sparsity if body.sparsity is None else body.sparsity

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

    async def respond(self, request: Request, generation: Generation) -> Response:
        """Stream the chunks, or wait for every choice and answer with one JSON body; a client
        that goes away aborts the generation either way."""
        if self.body.stream:
            return EventStreamResponse(self.stream(generation), on_close=generation.abort)
        try:
            finished, _ = await unless_disconnected(request, collect(generation, self.choices))
        finally:
            generation.abort()
        if not finished:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse(self.response().model_dump())
