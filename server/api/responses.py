"""OpenAI-compatible response, stream-chunk, model-card and error models, plus cats-serve's
extension fields (`sparsity`, the card's levels)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SparsityReport(BaseModel):
    """cats-serve extension: what CATS did for this request (or choice)."""

    level: float = Field(
        description="the requested sparsity level (0 = dense): the row sparsity its thresholds "
        "file was calibrated for"
    )
    mlp_sparsity: float | None = Field(
        description="activation sparsity: realised fraction of inactive MLP neurons (their "
        "W_up row not needed), mean over layers and decode steps (null when nothing was "
        "decoded)"
    )
    row_sparsity: float | None = Field(
        None,
        description="realised fraction of MLP W_up and W_down weight rows this request's "
        "tokens did not need, mean over layers and decode steps (equals mlp_sparsity for a "
        "single-threshold level; null when nothing was decoded)",
    )
    weight_bytes_skipped: float | None = Field(
        None,
        description="fraction of the MLP's weight bytes (W_gate, W_up, W_down) the decode "
        "steps really did not read, mean over this request's decode steps: 0 for a step that "
        "ran the dense path; a batched step reads the union of its rows' needs (null when "
        "nothing was decoded)",
    )


FinishReason = Literal["stop", "length"]


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    sparsity: SparsityReport = Field(description="cats-serve extension: realised sparsity")


class CompletionStreamChunk(BaseModel):
    """One `data:` event of a streamed completion; the usage chunk has no choices."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    sparsity: SparsityReport | None = Field(
        None,
        description="cats-serve extension: on a choice's last chunk, that choice's realised "
        "sparsity; on the usage chunk, the whole request's",
    )


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None = None


class CalledFunction(BaseModel):
    name: str
    arguments: str = Field(description="The arguments, a JSON object as a string")


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(description="The answer's text (null when it is tool calls)")
    tool_calls: list[ToolCallOut] | None = None


# "tool_calls": the answer is calls of the request's tools (message.tool_calls)
ChatFinishReason = Literal["stop", "length", "tool_calls"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: ChatFinishReason | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    sparsity: SparsityReport = Field(description="cats-serve extension: realised sparsity")


class CalledFunctionDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A streamed call; cats-serve sends each call whole, in one delta, once it is complete."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: CalledFunctionDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: ChatFinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed chat completion: a role delta first, then content."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None
    sparsity: SparsityReport | None = Field(
        None,
        description="cats-serve extension: on a choice's last chunk, that choice's realised "
        "sparsity; on the usage chunk, the whole request's",
    )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "cats-serve"
    max_model_len: int = Field(description="cats-serve extension: context length in tokens")
    sparsity_levels: list[float] = Field(
        description="cats-serve extension: the levels a request may name in `sparsity`"
    )
    default_sparsity: float = Field(
        description="cats-serve extension: the level used when a request names none"
    )
    weights: str = Field(
        description="cats-serve extension: the linear layers' weights, their dtype or 'int8' "
        "('int8 (lm_head <dtype>)' with a full-precision LM head)"
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok", "loading", "failed"]
    error: str | None = None


class VersionInfo(BaseModel):
    version: str
    weights: str | None = Field(
        None, description="The served model's weights, as in /v1/models (null while loading)"
    )
