"""Structured outputs and tool calls from the real `cats-serve` process on the default model,
driven by the real clients: the `openai` SDK (twenty schemas, streamed and not, and a required
tool call) and langchain-openai (`with_structured_output`, `bind_tools`), plus the README's
two examples run as written."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import openai
import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel
from structured_schemas import CASES

from cats_serve.server.settings import DEFAULT_MODEL, default_cache_dir

pytestmark = pytest.mark.slow

README = Path(__file__).parents[2] / "README.md"
README_URL = "http://127.0.0.1:8000/v1"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def server(launcher):
    # all forty schema requests decode in one batch
    return launcher(
        "--cache-dir", str(default_cache_dir()), "--device", "cpu", "--max-batch-size", "40",
        "--max-queue-size", "64",
    )  # fmt: skip


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(api_key="unused", base_url=f"{server.url}/v1", max_retries=0) as c:
        yield c


def answer(client, question: str, schema: dict, stream: bool) -> tuple[str, str]:
    request = dict(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": question}],
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
        temperature=0,
        max_tokens=200,
    )
    if not stream:
        out = client.chat.completions.create(**request)
        return out.choices[0].message.content, out.choices[0].finish_reason
    text, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **request):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


def test_twenty_schemas_streamed_and_not_give_answers_that_validate(client):
    jobs = [(q, schema, stream) for stream in (False, True) for q, schema in CASES]
    assert len(CASES) >= 20
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: answer(client, *job), jobs))
    for (question, schema, stream), (text, finish) in zip(jobs, results, strict=True):
        assert finish == "stop", (question, stream, text)
        jsonschema.validate(json.loads(text), schema)
    # greedy decoding: a streamed answer is the same text as the whole one
    assert results[: len(CASES)] == results[len(CASES) :]


def test_a_required_tool_call_has_arguments_that_validate(client):
    out = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER],
        tool_choice="required",
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    # the result goes back in as a tool message and the model answers in text
    follow = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "21 degrees and sunny"},
        ],
        tools=[WEATHER],
        max_tokens=30,
    )
    assert follow.choices[0].finish_reason in ("stop", "length")
    assert follow.choices[0].message.content


class Sum(BaseModel):
    a: int
    b: int
    total: int


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


@pytest.fixture(scope="module")
def llm(server):
    return ChatOpenAI(
        base_url=f"{server.url}/v1", api_key="unused", model=DEFAULT_MODEL, temperature=0,
        max_retries=0,
    )  # fmt: skip


def test_langchain_with_structured_output_returns_a_pydantic_object(llm):
    out = llm.with_structured_output(Sum).invoke("What is 2 + 3?")
    assert isinstance(out, Sum)
    streamed = list(llm.with_structured_output(Sum).stream("What is 2 + 3?"))
    assert streamed[-1] == out


@pytest.mark.parametrize("tool_choice", ["required", "multiply"])
def test_langchain_bind_tools_yields_a_tool_call(llm, tool_choice):
    message = llm.bind_tools([multiply], tool_choice=tool_choice).invoke("What is 6 times 7?")
    [call] = message.tool_calls
    assert call["name"] == "multiply" and set(call["args"]) == {"a", "b"}
    assert all(isinstance(v, int) for v in call["args"].values())


def readme_example(name: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```", text, re.S)
    assert match, f"README has no example {name!r}"
    assert README_URL in match[1]
    return match[1]


def test_the_readme_langchain_example_runs(server, capsys):
    scope: dict = {}
    exec(readme_example("langchain").replace(README_URL, f"{server.url}/v1"), scope)
    assert isinstance(scope["answer"], scope["Sum"])
    assert capsys.readouterr().out.strip() == str(scope["answer"])


def test_the_readme_tool_example_runs(server, capsys):
    scope: dict = {}
    exec(readme_example("tools").replace(README_URL, f"{server.url}/v1"), scope)
    call = scope["call"]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    printed = capsys.readouterr().out.strip()
    assert printed == f"get_weather {json.loads(call.function.arguments)}"
