"""SSE events survive clients that split lines like str.splitlines (httpx's aiter_lines)."""

from __future__ import annotations

import json

from cats_serve.server.api.sse import sse_event


def test_event_is_one_line_whatever_the_text():
    text = "a\u2028b\u2029c\x85d\ne\rf\x0bg\x1ch é 東京"
    event = sse_event({"choices": [{"text": text}]})
    lines = [line for line in event.splitlines() if line]
    assert len(lines) == 1
    assert lines[0].startswith("data: ")
    assert json.loads(lines[0].removeprefix("data: "))["choices"][0]["text"] == text
