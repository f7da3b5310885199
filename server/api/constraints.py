"""A request's constraint: its response_format and tools as one grammar, compiled off the
event loop (the engine caches compiled grammars per grammar text, so a repeated schema is a
lookup)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from cats_serve.server.api.errors import APIError
from cats_serve.server.api.protocol import ChatCompletionRequest, SamplingFields
from cats_serve.server.api.serving import ServingModel
from cats_serve.server.api.tool_calls import FREE_TEXT, tool_grammar
from cats_serve.server.engine.grammar import (
    CompiledGrammar,
    json_schema_grammar,
    lark_grammar,
    lark_json,
)


@dataclass(frozen=True)
class Constraint:
    grammar: CompiledGrammar
    label: str  # json_object | json_schema | tool_calls (a bounded metrics label)


def _calls_tools(body: SamplingFields) -> bool:
    return isinstance(body, ChatCompletionRequest) and body.calls_tools


def grammar_source(body: SamplingFields) -> tuple[str, str] | None:
    """(llguidance grammar, label), or None."""
    schema = body.response_format.answer_schema() if body.response_format else None
    if _calls_tools(body):
        content = FREE_TEXT if schema is None else lark_json(schema)
        return lark_grammar(tool_grammar(body, content)), "tool_calls"
    if schema is None:
        return None
    return json_schema_grammar(schema), body.response_format.type


async def compile_constraint(serving: ServingModel, body: SamplingFields) -> Constraint | None:
    """The request's compiled constraint; a schema llguidance cannot use is a 400 naming the
    field and the reason."""
    param = "tools" if _calls_tools(body) else "response_format"  # the field a bad schema is in
    try:
        source = grammar_source(body)
        if source is None:
            return None
        text, label = source
        compiled = await asyncio.to_thread(serving.engine.grammars.compile, text)
    except ValueError as exc:  # GrammarError, or a schema llguidance cannot read at all
        raise APIError(
            400,
            f"{param}: the JSON schema cannot constrain decoding: {exc}",
            param=param,
            code="invalid_schema",
            reason="invalid_request",
        ) from exc
    return Constraint(compiled, label)
