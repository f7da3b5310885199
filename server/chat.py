"""The `/v1/chat/completions` handler: messages -> the tokenizer's chat template -> the engine."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from cats_serve.server.admission import build_requests, check_model
from cats_serve.server.choices import Choice
from cats_serve.server.engine_types import RequestResult
from cats_serve.server.errors import APIError
from cats_serve.server.generation import Generation
from cats_serve.server.logprobs import chat_logprobs
from cats_serve.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatStreamChoice,
)
from cats_serve.server.response_builder import ResponseBuilder
from cats_serve.server.serving import ServingModel
from cats_serve.server.sse import DONE


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


async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, serving: ServingModel
) -> Response:
    check_model(serving, body.model)
    prompt_ids = render_prompt(serving, body)
    requests = build_requests(serving, body, [prompt_ids], body.max_new_tokens)
    generation = Generation(serving.engine, requests)
    generation.submit()
    choices = [Choice(index=i, prompt_index=0) for i in range(len(requests))]
    out = _Output(serving, body, choices, [len(prompt_ids)])
    return await out.respond(request, generation)


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

    # ---- streaming ----------------------------------------------------------------------------

    async def stream(self, generation: Generation) -> AsyncIterator[str]:
        for c in self.choices:
            first = ChatDelta(role="assistant", content="")
            yield self.chunk(ChatStreamChoice(index=c.index, delta=first))
        async for index, event in generation.events():
            c = self.choices[index]
            if isinstance(event, RequestResult):
                c.finish(event)  # raises APIError on a failed request: an error event
                last = ChatStreamChoice(
                    index=index, delta=ChatDelta(), finish_reason=c.finish_reason
                )
                yield self.chunk(last, sparsity=c.sparsity())
                continue
            c.add(event)
            logprobs = None
            if self.body.logprobs and event.token_id >= 0:
                logprobs = chat_logprobs(self.texts, [event.token_id], [event.logprob])
            if not event.text and logprobs is None:
                continue
            delta = ChatDelta(content=event.text)
            yield self.chunk(ChatStreamChoice(index=index, delta=delta, logprobs=logprobs))
        if self.body.include_usage:
            yield self.usage_chunk()
        yield DONE
