"""OpenAPI for what FastAPI cannot see: the error answers of the /v1 routes and the SSE
chunk models of streamed answers."""

from __future__ import annotations

from cats_serve.server.api.responses import (
    ChatCompletionChunk,
    CompletionStreamChunk,
    ErrorResponse,
)

ERRORS = {
    400: {"model": ErrorResponse, "description": "Invalid request (also: context length)"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "Unknown model"},
    429: {"model": ErrorResponse, "description": "Queue full; see the Retry-After header"},
    503: {"model": ErrorResponse, "description": "Model still loading, or shutting down"},
}


STREAM_CHUNKS = (CompletionStreamChunk, ChatCompletionChunk)


def add_stream_schemas(schema: dict) -> dict:
    """Put the SSE chunk models into the OpenAPI components (FastAPI only adds JSON bodies)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in STREAM_CHUNKS:
        chunk = model.model_json_schema(
            ref_template="#/components/schemas/{model}", mode="serialization"
        )
        for name, definition in chunk.pop("$defs", {}).items():
            components.setdefault(name, definition)
        components[model.__name__] = chunk
    return schema


def streamed(chunk_model: type) -> dict:
    """OpenAPI for a 200 that is JSON, or Server-Sent Events with `stream: true`."""
    return {
        200: {
            "description": "The response; with `stream: true`, Server-Sent Events: `data: "
            f"{{{chunk_model.__name__}}}` events, a usage chunk if asked for, then "
            "`data: [DONE]`; an error after the stream started comes as `data: {error}`",
            "content": {"text/event-stream": {"schema": _sse_event(chunk_model)}},
        },
        **ERRORS,
    }


def _sse_event(chunk_model: type) -> dict:
    """One event of the stream. Before OpenAPI 3.2's `itemSchema`, an event-stream `schema`
    describes each event object (`data`, `event`, `id`, `retry`), so the chunk is the JSON
    inside `data`, which may also be an error or the final `[DONE]`."""
    json_payload = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [{"$ref": _ref(chunk_model)}, {"$ref": _ref(ErrorResponse)}]},
    }
    return {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_payload]}},
    }


def _ref(model: type) -> str:
    return f"#/components/schemas/{model.__name__}"
