"""OpenAI-compatible request models, plus cats-serve's extension fields (responses.py: what
comes back).

Nothing is ignored in silence: a field we do not know is a 400 naming it ("Unrecognized request
argument supplied: ...", as OpenAI's own API answers), and an OpenAI field we do not implement
is a 400 saying so (UNSUPPORTED), so a client never takes a default for an answer to what it
asked. Types are strict, as OpenAI's are (`"max_tokens": "10"` or `"stream": "yes"` is a 400,
not a guess), and every string must be valid Unicode (a lone surrogate such as "\ud800" is a
400 naming the field). Each request converts itself to the engine's SamplingParams with
`to_sampling_params()`; nothing here knows about the engine.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from cats_serve.server.engine.sampling import SamplingParams

MAX_LOGPROBS = 5
MAX_STOP_SEQUENCES = 4
MAX_N = 16
MAX_LOGIT_BIAS = 1024  # entries of one request's logit_bias (ours: bounds the work per token)
MAX_TOOLS = 128  # ours: every tool's schema goes into the prompt and the grammar

# OpenAI request fields cats-serve does not implement, and what to use instead: a 400 names
# them, where an unknown field's 400 says it is unrecognized (errors.py).
UNSUPPORTED = {
    "functions": "it is deprecated; use tools",
    "function_call": "it is deprecated; use tool_choice",
    "audio": "this server generates text only",
    "modalities": "this server generates text only",
    "prediction": "predicted outputs are not implemented",
    "web_search_options": "this server has no web search",
    "reasoning_effort": "the served model is not a reasoning model",
    "metadata": "this server stores nothing",
    "service_tier": "this server has one tier",
}

SPARSITY_DOC = (
    "cats-serve extension: the CATS sparsity level to decode at, one of the loaded levels "
    "(GET /v1/models lists them); 0 = dense; default: the server's default level"
)
IGNORE_EOS_DOC = "cats-serve extension: keep generating after the end-of-sequence token"


def field_error(name: str, message: str) -> PydanticCustomError:
    """A validation error about field `name` raised where pydantic knows no field (a model
    validator): errors.py reports `name` as the error's param."""
    return PydanticCustomError(
        "field_error", "{name}: {message}", {"name": name, "message": message}
    )


def _valid_unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (it holds a lone surrogate)") from None
    return value


# A string that can be encoded: JSON allows "\ud800" on its own, which no tokenizer (nor our
# own error answers) can encode.
Text = Annotated[str, AfterValidator(_valid_unicode)]
# torch.Generator seeds are 64-bit
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = Field(
        False, description="Send a last chunk with the usage of the whole request"
    )


class Strict(BaseModel):
    """A request part: strict types, and a field nobody declared is a 400 naming it."""

    model_config = ConfigDict(extra="forbid", strict=True)


class JSONSchemaFormat(Strict):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: Text = Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: Text | None = None
    json_schema: dict[str, Any] | None = Field(
        None,
        alias="schema",
        description="The JSON schema the answer must validate against (omitted: any JSON value)",
    )
    strict: bool | None = Field(
        None, description="Accepted for compatibility: the schema always constrains decoding"
    )


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"] = Field(
        description="text: no constraint; json_object: the answer is a JSON object; "
        "json_schema: it validates against json_schema.schema (grammar-constrained decoding)"
    )
    json_schema: JSONSchemaFormat | None = Field(None, description="With type json_schema")

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise field_error("json_schema", "required with type json_schema, and only then")
        return self

    def answer_schema(self) -> dict[str, Any] | None:
        """The JSON schema the answer must follow (None: free text)."""
        if self.type == "json_object":
            return {"type": "object"}
        if self.type == "json_schema":
            return self.json_schema.json_schema or {}  # no schema given: any JSON value
        return None


class SamplingFields(Strict):
    """The fields /v1/completions and /v1/chat/completions share."""

    model: Text = Field(description="The served model's id (GET /v1/models)")
    temperature: float | None = Field(
        None,
        ge=0.0,
        le=2.0,
        description="0 = greedy; when omitted, the server's --default-temperature (0 unless set)",
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, description="Keep the k most likely tokens (-1 or 0: off)")
    n: int = Field(1, ge=1, le=MAX_N, description="Choices to generate for each prompt")
    stop: Text | list[Text] | None = Field(
        None, description=f"Up to {MAX_STOP_SEQUENCES} strings that end the generation"
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(
        None, ge=SEED_MIN, le=SEED_MAX, description="Makes sampling reproducible (64-bit)"
    )
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: Text | None = None
    sparsity: float | None = Field(None, ge=0.0, lt=1.0, description=SPARSITY_DOC)
    ignore_eos: bool = Field(False, description=IGNORE_EOS_DOC)
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, float] | None = Field(
        None,
        description="Token id (as a string) -> bias in [-100, 100] added to its logit before "
        f"sampling (at most {MAX_LOGIT_BIAS} entries)",
    )

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data):
        if isinstance(data, dict):
            for name, why in UNSUPPORTED.items():
                if name in data:
                    raise field_error(name, f"not supported by this server: {why}")
        return data

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value):
        if value is None:
            return value
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries are allowed")
        for key, bias in value.items():
            if not key.isdigit():
                raise ValueError(f"keys must be token ids, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"biases must lie in [-100, 100], got {bias} for token {key}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise field_error("stream_options", "only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def sampling_params(
        self, max_tokens: int, logprobs: int | None, default_temperature: float
    ) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        temperature = default_temperature if self.temperature is None else self.temperature
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            seed=self.seed,
            stop=tuple(stop),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logprobs=logprobs,
            ignore_eos=self.ignore_eos,
            logit_bias=tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items()),
        )


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] | list[int] | list[list[int]] = Field(
        description="A string, a list of strings, or token ids (one list or a list of lists)"
    )
    max_tokens: int | None = Field(
        16, ge=1, description="Tokens to generate at most (null: up to the context length)"
    )
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description="Return the chosen tokens' logprobs and this many most likely alternatives",
    )
    echo: bool = Field(False, description="Prepend the prompt to the returned text")
    suffix: Text | None = Field(
        None, description="Not supported (the served models do not fill in the middle): a 400"
    )
    best_of: int | None = Field(
        None, ge=1, le=MAX_N, description="Candidates per prompt; must equal n (or be omitted)"
    )

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value):
        if value:
            raise ValueError("is not supported: the served models do not fill in the middle")
        return value

    @model_validator(mode="after")
    def _best_of_is_n(self):
        if self.best_of is not None and self.best_of != self.n:
            raise field_error("best_of", "values other than n are not supported")
        return self

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value):
        if isinstance(value, list) and (not value or any(v == [] for v in value)):
            raise ValueError("prompt must not be empty")
        return value

    def to_sampling_params(self, max_tokens: int, default_temperature: float) -> SamplingParams:
        return self.sampling_params(max_tokens, self.logprobs, default_temperature)


class ContentPart(BaseModel):
    # other part types (image_url, input_audio, ...) carry fields of their own: refused by
    # type below, not as unknown fields
    model_config = ConfigDict(extra="allow", strict=True)

    type: str
    text: Text | None = None


FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class FunctionCall(Strict):
    name: FunctionName
    arguments: Text = Field(description="The arguments, a JSON object as a string")


class ToolCall(Strict):
    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="An assistant's calls")
    tool_call_id: Text | None = Field(None, description="The call a tool message answers")
    refusal: Text | None = Field(None, description="An assistant's refusal, used as its text")

    @field_validator("content")
    @classmethod
    def _text_only(cls, value):
        if isinstance(value, list):
            kinds = {p.type for p in value} - {"text"}
            if kinds:
                raise ValueError(f"only text content is supported, got {', '.join(sorted(kinds))}")
        return value

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or self.refusal or ""
        return "".join(p.text or "" for p in self.content)


class FunctionDefinition(Strict):
    name: FunctionName
    description: Text | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="JSON schema of the arguments (omitted: no arguments)"
    )
    strict: bool | None = Field(
        None, description="Accepted for compatibility: a required call always follows the schema"
    )


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Strict):
    name: FunctionName


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(
        None, ge=1, description="Tokens to generate at most (null: up to the context length)"
    )
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens")
    logprobs: bool = Field(False, description="Return the chosen tokens' logprobs")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="Alternatives per token (needs logprobs)"
    )
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None,
        description="none: answer in text; auto (the default with tools): the model chooses; "
        "required: at least one call; a named function: one call of it. A call's arguments "
        "follow the function's JSON schema (grammar-constrained decoding)",
    )
    parallel_tool_calls: bool | None = Field(
        None,
        description="true: the answer may hold several calls; false or omitted: one call "
        "(small models tend to repeat a call until max_tokens when allowed more)",
    )
    store: bool | None = Field(None, description="Only false: this server stores nothing")

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise field_error("top_logprobs", "only allowed when logprobs is true")
        return self

    @field_validator("store")
    @classmethod
    def _nothing_stored(cls, value):
        if value:
            raise ValueError("is not supported: this server stores nothing")
        return value

    @field_validator("tools")
    @classmethod
    def _unique_tools(cls, value):
        names = [t.function.name for t in value or []]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"function names must be unique; repeated: {', '.join(twice)}")
        return value

    @model_validator(mode="after")
    def _tool_choice_needs_tools(self):
        choice = self.tool_choice
        if choice is not None and choice != "none" and not self.tools:
            raise field_error("tool_choice", "only allowed when tools are specified")
        if isinstance(choice, NamedToolChoice):
            names = {t.function.name for t in self.tools or []}
            if choice.function.name not in names:
                raise field_error(
                    "tool_choice", f"names {choice.function.name!r}, not one of the tools"
                )
        return self

    @property
    def calls_tools(self) -> bool:
        """Tools are offered and the model may (or must) call them."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def to_sampling_params(self, max_tokens: int, default_temperature: float) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(max_tokens, logprobs, default_temperature)
