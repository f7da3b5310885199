"""`POST /v1/chat/completions`: messages -> the tokenizer's chat template -> the engine."""

from __future__ import annotations

import asyncio

from fastapi import Request
from fastapi.responses import Response

from cats_serve.server.api.admission import build_requests, check_model, check_prompt_chars
from cats_serve.server.api.choices import Choice
from cats_serve.server.api.errors import APIError
from cats_serve.server.api.logprob_shapes import chat_logprobs
from cats_serve.server.api.openapi import streamed
from cats_serve.server.api.protocol import ChatCompletionRequest
from cats_serve.server.api.responses import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatStreamChoice,
)
from cats_serve.server.api.serving import ServingModel
from cats_serve.server.api.state import ServingDep, v1_router
from cats_serve.server.api.streaming import ResponseBuilder
from cats_serve.server.engine.types import TokenEvent


def render_prompt(serving: ServingModel, body: ChatCompletionRequest) -> list[int]:
    """The prompt's token ids: the messages through the tokenizer's chat template."""
    tokenizer = serving.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(
            400,
            f"the model `{serving.name}` has no chat template; use /v1/completions",
            param="messages",
            reason="invalid_request",
        )
    try:
        text = tokenizer.apply_chat_template(
            body.template_messages(), tokenize=False, add_generation_prompt=True
        )
    except Exception as exc:  # templates raise on conversations they do not support
        raise APIError(
            400,
            f"the chat template rejected the messages: {exc}",
            param="messages",
            reason="invalid_request",
        ) from exc
    # The template writes any special tokens (BOS) itself.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


router = v1_router()


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses=streamed(ChatCompletionChunk),
    summary="Answer a conversation (the model's chat template)",
)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, serving: ServingDep
) -> Response:
    check_model(serving, body.model)
    check_prompt_chars(serving, sum(len(m.text()) for m in body.messages), "messages")
    # off the event loop: a long conversation must not hold up /health and every stream
    prompt_ids = await asyncio.to_thread(render_prompt, serving, body)
    requests = build_requests(serving, body, [prompt_ids], body.max_new_tokens)
    return await _Output(serving, body, [len(prompt_ids)]).respond(request, requests)


class _Output(ResponseBuilder):
    """Builds the response, or the stream of chunks, of one chat request."""

    id_prefix = "chatcmpl"
    chunk_model = ChatCompletionChunk

    def response(self) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=self.id,
            created=self.created,
            model=self.serving.name,
            choices=[
                ChatChoice(
                    index=c.index,
                    message=AssistantMessage(content=c.text),
                    logprobs=(
                        chat_logprobs(self.texts, c.token_ids, c.logprobs)
                        if self.body.logprobs
                        else None
                    ),
                    finish_reason=c.finish_reason,
                )
                for c in self.choices
            ],
            usage=self.usage(),
            sparsity=self.sparsity(),
        )

    # ---- streaming pieces ---------------------------------------------------------------------

    def opening(self, choice: Choice) -> ChatStreamChoice:
        return ChatStreamChoice(index=choice.index, delta=ChatDelta(role="assistant", content=""))

    def delta(self, choice: Choice, event: TokenEvent) -> ChatStreamChoice | None:
        logprobs = None
        if self.body.logprobs and event.token_id >= 0:
            logprobs = chat_logprobs(self.texts, [event.token_id], [event.logprob])
        if not event.text and logprobs is None:
            return None
        delta = ChatDelta(content=event.text)
        return ChatStreamChoice(index=choice.index, delta=delta, logprobs=logprobs)

    def closing(self, choice: Choice) -> ChatStreamChoice:
        return ChatStreamChoice(
            index=choice.index, delta=ChatDelta(), finish_reason=choice.finish_reason
        )
