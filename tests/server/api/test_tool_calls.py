"""Tool calls: the prompt the tools make, the grammar of a call, the splitting of generated text
into text and calls (whole or streamed), and tool calls through the in-process API."""

from __future__ import annotations

import json

import pytest
from api_support import post_ok, serve_app, sse_payloads

from cats_serve.server.api.app import create_app
from cats_serve.server.api.protocol import ChatCompletionRequest
from cats_serve.server.api.tool_calls import (
    OPEN,
    CallSplitter,
    format_call,
    render_messages,
    tool_grammar,
    tools_prompt,
)
from cats_serve.server.engine.grammar import Grammars, lark_grammar
from cats_serve.server.settings import Settings

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "rain": {"type": "boolean"},
            },
            "required": ["unit", "rain"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "time_now"}}


def chat(**fields) -> ChatCompletionRequest:
    fields.setdefault("messages", [{"role": "user", "content": "weather?"}])
    return ChatCompletionRequest.model_validate({"model": "m", **fields})


# ---- splitting text into calls -------------------------------------------------------------


def test_text_answers_pass_through_at_once():
    splitter = CallSplitter()
    assert splitter.feed("Hello") == ("Hello", [])
    assert splitter.feed(" <tool_call>") == (" <tool_call>", [])  # text stays text
    assert splitter.flush() == "" and splitter.calls == []


def test_a_call_is_held_back_until_it_closes_whatever_the_pieces():
    call = format_call("get_weather", {"unit": "celsius", "rain": False})
    text = call + "\n" + format_call("time_now", {})
    for size in (1, 3, 7, len(text)):
        splitter = CallSplitter()
        seen = []
        for i in range(0, len(text), size):
            out, calls = splitter.feed(text[i : i + size])
            assert out == ""
            seen += calls
        assert splitter.flush() == ""
        assert [(c.name, json.loads(c.arguments)) for c in seen] == [
            ("get_weather", {"unit": "celsius", "rain": False}),
            ("time_now", {}),
        ]
        assert len({c.id for c in seen}) == 2 and all(c.id.startswith("call_") for c in seen)


def test_a_prefix_of_the_marker_waits_then_turns_out_to_be_text():
    splitter = CallSplitter()
    assert splitter.feed("<tool") == ("", [])
    assert splitter.feed("s are great") == ("<tools are great", [])


def test_an_answer_cut_inside_its_only_call_comes_back_as_text():
    splitter = CallSplitter()
    assert splitter.feed(f'{OPEN}{{"name": "get_weather", "argu') == ("", [])
    assert splitter.flush() == f'{OPEN}{{"name": "get_weather", "argu'


def test_an_unfinished_call_after_complete_ones_is_dropped():
    splitter = CallSplitter()
    splitter.feed(format_call("time_now", {}) + "\n" + OPEN + '{"na')
    assert splitter.flush() == "" and [c.name for c in splitter.calls] == ["time_now"]


# ---- the grammar -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grammars(tokenizer):
    return Grammars(tokenizer, vocab_size=len(tokenizer), eos_token_ids={1})


def accepts(grammars, tokenizer, grammar: str, text: str) -> bool:
    state = grammars.state(grammars.compile(lark_grammar(grammar)))
    for token in tokenizer.encode(text):
        state.advance(token)
    return state.error is None and state.matcher.is_accepting()


GOOD = format_call("get_weather", {"unit": "celsius", "rain": True})


@pytest.mark.parametrize(
    ("choice", "parallel", "text", "ok"),
    [
        ("required", None, GOOD, True),
        ("required", None, format_call("time_now", {}), True),
        ("required", None, format_call("get_weather", {"unit": "kelvin", "rain": True}), False),
        ("required", None, format_call("get_weather", {"unit": "celsius"}), False),
        ("required", None, format_call("launch", {}), False),
        ("required", None, "It is sunny.", False),
        ("required", None, GOOD + "\n" + GOOD, False),  # one call unless parallel
        ("required", True, GOOD + "\n" + format_call("time_now", {}), True),
        ("auto", None, "It is sunny.", True),
        ("auto", None, GOOD, True),
        ("auto", None, OPEN + '{"name": "nope"', False),  # a call once begun must be one
        (None, None, "It is sunny.", True),
        ({"type": "function", "function": {"name": "time_now"}}, True, GOOD, False),
        (
            {"type": "function", "function": {"name": "time_now"}},
            None,
            format_call("time_now", {}),
            True,
        ),
    ],
)
def test_the_call_grammar(grammars, tokenizer, choice, parallel, text, ok):
    body = chat(tools=[WEATHER, CLOCK], tool_choice=choice, parallel_tool_calls=parallel)
    from cats_serve.server.api.tool_calls import FREE_TEXT

    assert accepts(grammars, tokenizer, tool_grammar(body, FREE_TEXT), text) is ok


# ---- the prompt ------------------------------------------------------------------------------


def test_templates_without_tools_get_our_system_text_and_written_out_calls():
    body = chat(
        tools=[WEATHER],
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"unit": "celsius"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"},
        ],
    )
    system, user, assistant, tool = render_messages(body, native=False)
    assert system["content"].startswith("Be brief.\n\n") and "get_weather" in system["content"]
    assert system["content"].endswith(tools_prompt(body.tools, None))
    assert user == {"role": "user", "content": "weather?"}
    assert assistant["content"] == format_call("get_weather", {"unit": "celsius"})
    assert tool == {"role": "user", "content": "<tool_response>\n21 degrees\n</tool_response>"}


def test_templates_with_tools_get_them_in_transformers_shape():
    body = chat(
        tools=[WEATHER],
        messages=[
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "c",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": "{}"},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c", "content": "sunny"},
        ],
    )
    user, assistant, tool = render_messages(body, native=True)
    assert user == {"role": "user", "content": "weather?"}
    assert assistant["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {}}
    assert tool == {"role": "tool", "content": "sunny", "tool_call_id": "c"}


def test_tool_choice_none_leaves_the_tools_out_of_the_prompt():
    body = chat(tools=[WEATHER], tool_choice="none")
    assert render_messages(body, native=False) == [{"role": "user", "content": "weather?"}]


# ---- through the API ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def long_client(long_checkpoint):
    """The tiny model with room for the tools prompt (its byte-level tokens make it long)."""
    settings = Settings(model=str(long_checkpoint), device="cpu", max_seq_len=2048)
    async with serve_app(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="module")
def long_model(long_checkpoint) -> str:
    return long_checkpoint.name


@pytest.mark.anyio
@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
async def test_a_required_call_comes_back_as_tool_calls(long_client, long_model, choice):
    body = {
        "model": long_model,
        "messages": [{"role": "user", "content": "the weather in Paris"}],
        "tools": [WEATHER, CLOCK],
        "tool_choice": choice,
        "max_tokens": 120,
        "temperature": 0,
    }
    answer = await post_ok(long_client, "/v1/chat/completions", body)
    [out] = answer["choices"]
    assert out["finish_reason"] == "tool_calls", out
    assert out["message"]["content"] is None
    [call] = out["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    arguments = json.loads(call["function"]["arguments"])
    if call["function"]["name"] == "get_weather":
        assert arguments["unit"] in ("celsius", "fahrenheit") and isinstance(
            arguments["rain"], bool
        )
    else:
        assert choice == "required" and call["function"]["name"] == "time_now"


@pytest.mark.anyio
async def test_a_streamed_call_arrives_as_one_tool_calls_delta(long_client, long_model):
    body = {
        "model": long_model,
        "messages": [{"role": "user", "content": "the weather in Paris"}],
        "tools": [WEATHER],
        "tool_choice": "required",
        "max_tokens": 120,
        "temperature": 0,
        "stream": True,
    }
    response = await long_client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    chunks = [c for c in sse_payloads(response.text) if c.get("choices")]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    calls = [d["tool_calls"] for d in deltas if d.get("tool_calls")]
    assert len(calls) == 1 and calls[0][0]["index"] == 0
    assert calls[0][0]["function"]["name"] == "get_weather"
    assert set(json.loads(calls[0][0]["function"]["arguments"])) == {"unit", "rain"}
    assert all(not d.get("content") for d in deltas)  # the call's text is not also content
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name"}}]},
            "tools.0.function.name",
        ),
        ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "wizard"}},
                    }
                ]
            },
            "tools",
        ),
    ],
)
async def test_bad_tools_are_400_naming_the_field(client, model, fields, param):
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.json()
