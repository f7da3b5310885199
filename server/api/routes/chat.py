"""`POST /v1/chat/completions`: messages (and tools) -> the tokenizer's chat template -> the
engine; the answer's text, or its tool calls (tool_calls.py), back."""

from __future__ import annotations

import asyncio

from fastapi import Request
from fastapi.responses import Response

from cats_serve.server.api.admission import build_requests, check_model, check_prompt_chars
from cats_serve.server.api.choices import Choice
from cats_serve.server.api.constraints import compile_constraint
from cats_serve.server.api.errors import APIError
from cats_serve.server.api.logprob_shapes import chat_logprobs
from cats_serve.server.api.openapi import streamed
from cats_serve.server.api.protocol import ChatCompletionRequest
from cats_serve.server.api.responses import (
    AssistantMessage,
    CalledFunction,
    CalledFunctionDelta,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatStreamChoice,
    ToolCallDelta,
    ToolCallOut,
)
from cats_serve.server.api.serving import ServingModel
from cats_serve.server.api.state import ServingDep, v1_router
from cats_serve.server.api.streaming import ResponseBuilder
from cats_serve.server.api.tool_calls import (
    CallSplitter,
    ParsedCall,
    render_messages,
    template_renders_tools,
    template_tools,
)
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
    native = template_renders_tools(tokenizer)
    tools = template_tools(body) if native else None
    try:
        text = tokenizer.apply_chat_template(
            render_messages(body, native),
            tools=tools,
            tokenize=False,
            add_generation_prompt=True,
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
    constraint = await compile_constraint(serving, body)
    requests = build_requests(
        serving, body, [prompt_ids], body.max_new_tokens, constraint=constraint
    )
    return await _Output(serving, body, [len(prompt_ids)]).respond(request, requests)


class _Output(ResponseBuilder):
    """Builds the response, or the stream of chunks, of one chat request. With tools, each
    choice's text goes through a CallSplitter: its calls become `tool_calls`."""

    id_prefix = "chatcmpl"
    chunk_model = ChatCompletionChunk

    def __init__(self, serving: ServingModel, body: ChatCompletionRequest, prompt_lens):
        super().__init__(serving, body, prompt_lens)
        self.splitters = {c.index: CallSplitter() for c in self.choices} if body.calls_tools else {}

    def finish_reason(self, choice: Choice) -> str | None:
        splitter = self.splitters.get(choice.index)
        if splitter is not None and splitter.calls and choice.finish_reason == "stop":
            return "tool_calls"
        return choice.finish_reason

    def message(self, choice: Choice) -> AssistantMessage:
        splitter = self.splitters.get(choice.index)
        if splitter is None:
            return AssistantMessage(content=choice.text)
        text, _ = splitter.feed(choice.text)
        text += splitter.flush()
        calls = [_call_out(c) for c in splitter.calls] or None
        return AssistantMessage(content=text or (None if calls else ""), tool_calls=calls)

    def response(self) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=self.id,
            created=self.created,
            model=self.serving.name,
            choices=[
                ChatChoice(
                    index=c.index,
                    message=self.message(c),
                    logprobs=(
                        chat_logprobs(self.texts, c.token_ids, c.logprobs)
                        if self.body.logprobs
                        else None
                    ),
                    finish_reason=self.finish_reason(c),
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
        text, calls = event.text, []
        splitter = self.splitters.get(choice.index)
        if splitter is not None:
            before = len(splitter.calls)
            text, calls = splitter.feed(text)
            calls = [_call_delta(before + i, c) for i, c in enumerate(calls)]
        if not text and not calls and logprobs is None:
            return None
        delta = ChatDelta(content=text if text or not calls else None, tool_calls=calls or None)
        return ChatStreamChoice(index=choice.index, delta=delta, logprobs=logprobs)

    def closing(self, choice: Choice) -> ChatStreamChoice:
        splitter = self.splitters.get(choice.index)
        rest = splitter.flush() if splitter is not None else ""
        return ChatStreamChoice(
            index=choice.index,
            delta=ChatDelta(content=rest or None),
            finish_reason=self.finish_reason(choice),
        )


def _call_out(call: ParsedCall) -> ToolCallOut:
    return ToolCallOut(
        id=call.id, function=CalledFunction(name=call.name, arguments=call.arguments)
    )


def _call_delta(index: int, call: ParsedCall) -> ToolCallDelta:
    return ToolCallDelta(
        index=index,
        id=call.id,
        type="function",
        function=CalledFunctionDelta(name=call.name, arguments=call.arguments),
    )
