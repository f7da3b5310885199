"""The OpenAI-compatible routes under /v1: thin, the handlers do the work."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from cats_serve.server.auth import require_api_key
from cats_serve.server.chat import create_chat_completion
from cats_serve.server.completions import create_completion
from cats_serve.server.errors import model_not_found
from cats_serve.server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChunk,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from cats_serve.server.state import ServingDep, StateDep

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

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


def _streamed(chunk_model: type) -> dict:
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


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses=_streamed(CompletionStreamChunk),
    summary="Complete a prompt",
)
async def completions(body: CompletionRequest, request: Request, serving: ServingDep):
    return await create_completion(body, request, serving)


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses=_streamed(ChatCompletionChunk),
    summary="Answer a conversation (the model's chat template)",
)
async def chat_completions(body: ChatCompletionRequest, request: Request, serving: ServingDep):
    return await create_chat_completion(body, request, serving)


def _card(serving, state) -> ModelCard:
    return ModelCard(
        id=serving.name,
        created=state.started,
        max_model_len=serving.max_seq_len,
        sparsity_levels=serving.levels,
        default_sparsity=serving.default_sparsity,
    )


@router.get("/models", response_model=ModelList, responses=ERRORS, summary="The served model")
async def models(serving: ServingDep, state: StateDep):
    return ModelList(data=[_card(serving, state)])


@router.get("/models/{model_id}", response_model=ModelCard, responses=ERRORS, summary="One model")
async def model(model_id: str, serving: ServingDep, state: StateDep):
    if model_id != serving.name:
        raise model_not_found(model_id, serving.name)
    return _card(serving, state)
