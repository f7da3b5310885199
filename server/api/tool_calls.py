"""Tool calls on /v1/chat/completions: the tools into the prompt, the grammar of a call, and
the generated text back into `tool_calls`.

The model writes each call as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the
Hermes/Qwen convention, which many open chat models were trained on). The grammar makes every
call follow it: the name is one of the tools and the arguments validate against that tool's
JSON schema; with `tool_choice` `auto` the answer is either text (which must not start with
`<` or whitespace) or calls, so a call once begun is always well formed.

A chat template that renders tools itself (its source mentions `tools`) gets the tools and the
conversation's calls in the shape transformers documents; any other template gets a system
message of ours describing the tools and the format, assistant calls written out as above and
tool results as user messages in `<tool_response>` tags.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from cats_serve.server.api.protocol import ChatCompletionRequest, ChatMessage, NamedToolChoice, Tool
from cats_serve.server.engine.grammar import lark_json

OPEN, CLOSE = "<tool_call>", "</tool_call>"
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str  # JSON text of the arguments object


def template_renders_tools(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def render_messages(body: ChatCompletionRequest, native: bool) -> list[dict[str, Any]]:
    """The conversation as the chat template takes it (see the module docstring)."""
    out: list[dict[str, Any]] = []
    for m in body.messages:
        out.append(_native(m) if native else _written_out(m))
    if body.calls_tools and not native:
        prompt = tools_prompt(body.tools or [], body.tool_choice)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def template_tools(body: ChatCompletionRequest) -> list[dict] | None:
    """The tools argument of apply_chat_template (None when the model may not call any)."""
    if not body.calls_tools:
        return None
    return [{"type": "function", "function": _function_spec(t)} for t in body.tools or []]


def _native(m: ChatMessage) -> dict[str, Any]:
    entry: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.name:
        entry["name"] = m.name
    if m.tool_calls:
        entry["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.function.name, "arguments": _loads(c.function.arguments)},
            }
            for c in m.tool_calls
        ]
    if m.tool_call_id:
        entry["tool_call_id"] = m.tool_call_id
    return entry


def _written_out(m: ChatMessage) -> dict[str, Any]:
    if m.role == "tool":
        return {"role": "user", "content": f"<tool_response>\n{m.text()}\n</tool_response>"}
    entry: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.name:
        entry["name"] = m.name
    if m.tool_calls:
        calls = [format_call(c.function.name, _loads(c.function.arguments)) for c in m.tool_calls]
        entry["content"] = "\n".join([entry["content"], *calls]).strip()
    return entry


def _loads(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments  # shown to the model as the client sent it


def format_call(name: str, arguments: Any) -> str:
    return f"{OPEN}{json.dumps({'name': name, 'arguments': arguments})}{CLOSE}"


def _function_spec(tool: Tool) -> dict[str, Any]:
    f = tool.function
    spec: dict[str, Any] = {"name": f.name}
    if f.description:
        spec["description"] = f.description
    spec["parameters"] = f.parameters if f.parameters is not None else NO_ARGUMENTS
    return spec


def tools_prompt(tools: list[Tool], tool_choice) -> str:
    """Our system text for templates that do not render tools."""
    lines = ["You can call these functions (JSON schemas of their arguments):"]
    lines += [json.dumps(_function_spec(t)) for t in tools]
    lines.append(
        f'To call a function, answer with {OPEN}{{"name": <function name>, "arguments": '
        f"<arguments as a JSON object>}}{CLOSE}, one line per call."
    )
    if tool_choice in (None, "auto"):
        lines.append("If no function is needed, answer in plain text.")
    return "\n".join(lines)


def call_schema(tools: list[Tool]) -> dict[str, Any]:
    """JSON schema of one call: a tool's name and arguments that validate against it."""
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t.function.name},
                "arguments": t.function.parameters or NO_ARGUMENTS,
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def tool_grammar(body: ChatCompletionRequest, content: str) -> str:
    """Lark grammar of the answer: calls (with tool_choice `required` or a named function),
    or with `auto` also `content` (a Lark expression: free text, or the response_format's
    JSON). One call, unless `parallel_tool_calls` is true and no function is named."""
    tools = body.tools or []
    choice = body.tool_choice
    named = isinstance(choice, NamedToolChoice)
    if named:
        tools = [t for t in tools if t.function.name == choice.function.name]
    one = f'"{OPEN}" {lark_json(call_schema(tools))} "{CLOSE}"'
    calls = 'call ("\\n" call)*' if body.parallel_tool_calls and not named else "call"
    start = "calls | content" if choice in (None, "auto") else "calls"
    return "\n".join([f"start: {start}", f"calls: {calls}", f"call: {one}", f"content: {content}"])


# Free text for `auto`: anything that does not open with a call's "<" (or with whitespace,
# which could be followed by one); the end of the sequence may follow any character.
FREE_TEXT = r"/[^<\s](.|\n)*/"


class CallSplitter:
    """Separates an answer's text from its calls as the text arrives (streamed or whole).

    Text that could still be the start of a call is held back; once the answer is known to
    be text, `feed` returns it; each complete call is returned as soon as it closes."""

    def __init__(self) -> None:
        self._buffer = ""
        self.mode: str | None = None  # None: undecided; "text"; "calls"
        self.calls: list[ParsedCall] = []

    def feed(self, text: str) -> tuple[str, list[ParsedCall]]:
        if self.mode == "text":
            return text, []
        self._buffer += text
        if self.mode is None:
            head = self._buffer.lstrip()
            if head.startswith(OPEN):
                self.mode = "calls"
            elif OPEN.startswith(head):
                return "", []  # could still become a call
            else:
                self.mode = "text"
                out, self._buffer = self._buffer, ""
                return out, []
        new = []
        while CLOSE in self._buffer:
            piece, _, self._buffer = self._buffer.partition(CLOSE)
            call = _parse_call(piece.partition(OPEN)[2])
            if call is not None:
                new.append(call)
        self.calls += new
        return "", new

    def flush(self) -> str:
        """At the end: text still held back (an answer that never became a call, or an
        unfinished call, cut by max_tokens) is returned as text."""
        out, self._buffer = self._buffer, ""
        if self.mode == "calls" and (self.calls or not out.strip()):
            return ""  # the unfinished last of several calls is dropped, not shown as text
        return out


def _parse_call(text: str) -> ParsedCall | None:
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    return ParsedCall(
        id=f"call_{uuid.uuid4().hex[:24]}",
        name=call["name"],
        arguments=json.dumps(call.get("arguments", {})),
    )
