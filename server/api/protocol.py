"""OpenAI-compatible request models, plus cats-serve's extension fields (responses.py: what
comes back).

Requests ignore unknown fields, as OpenAI-compatible servers do, so that clients sending options
we do not implement (LangChain, older SDKs) keep working. Types are strict, as OpenAI's are
(`"max_tokens": "10"` or `"stream": "yes"` is a 400, not a guess), and every string must be
valid Unicode (a lone surrogate such as "\ud800" is a 400 naming the field). Each request
converts itself to the engine's SamplingParams with `to_sampling_params()`; nothing here knows
about the engine.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from cats_serve.server.engine.sampling import SamplingParams

MAX_LOGPROBS = 5
MAX_STOP_SEQUENCES = 4
MAX_N = 16

SPARSITY_DOC = (
    "cats-serve extension: the CATS sparsity level to decode at, one of the loaded levels "
    "(GET /v1/models lists them); 0 = dense; default: the server's default level"
)
IGNORE_EOS_DOC = "cats-serve extension: keep generating after the end-of-sequence token"


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


class SamplingFields(BaseModel):
    """The fields /v1/completions and /v1/chat/completions share."""

    model_config = ConfigDict(extra="ignore", strict=True)

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

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
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

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value):
        if isinstance(value, list) and (not value or any(v == [] for v in value)):
            raise ValueError("prompt must not be empty")
        return value

    def to_sampling_params(self, max_tokens: int, default_temperature: float) -> SamplingParams:
        return self.sampling_params(max_tokens, self.logprobs, default_temperature)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: str
    text: Text | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None

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
            return self.content or ""
        return "".join(p.text or "" for p in self.content)


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

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs is only allowed when logprobs is true")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def template_messages(self) -> list[dict[str, Any]]:
        """The messages as the chat template expects them (`role` and `content` strings)."""
        out = []
        for m in self.messages:
            entry: dict[str, Any] = {"role": m.role, "content": m.text()}
            if m.name:
                entry["name"] = m.name
            out.append(entry)
        return out

    def to_sampling_params(self, max_tokens: int, default_temperature: float) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(max_tokens, logprobs, default_temperature)
