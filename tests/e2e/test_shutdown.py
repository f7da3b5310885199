"""Graceful shutdown of the real `cats-serve` process on SIGTERM.

With requests in flight (one too long to ever finish, one short running, one waiting in the
queue) the server gets SIGTERM. It must stop admitting (new connections are refused), let the
short ones finish, end the long one cleanly within a bound (an error event then [DONE], never
a stream cut mid-event), and exit 0 with no traceback in its log.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import httpx
import pytest
from api_support import LONG_CONTEXT, metric

pytestmark = pytest.mark.slow

EXIT_TIMEOUT_S = 90  # bound on SIGTERM -> exit: uvicorn's 15 s grace plus the engine's drain
POLL_S = 60
LONG = 12000  # tokens: minutes on a CPU, so only the shutdown ends it
SHORT = 100  # tokens: seconds, often still running when the signal comes


@pytest.fixture
def server(launcher, long_checkpoint):
    return launcher(
        "--model", str(long_checkpoint),
        "--device", "cpu",
        "--max-batch-size", "2",
        "--max-queue-size", "4",
        "--max-seq-len", str(LONG_CONTEXT),
        "--log-level", "info",
    )  # fmt: skip


class Stream(threading.Thread):
    """A streaming completion read to its end in a thread; keeps every `data:` payload."""

    def __init__(self, url: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.status: int | None = None
        self.payloads: list[str] = []
        self.error: Exception | None = None
        self.first = threading.Event()

    def run(self) -> None:
        try:
            with httpx.stream(
                "POST", f"{self.url}/v1/completions", json=self.body, timeout=120
            ) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.payloads.append(line.removeprefix("data: "))
                        self.first.set()
        except httpx.HTTPError as exc:
            self.error = exc
        finally:
            self.first.set()

    @property
    def done(self) -> bool:
        return bool(self.payloads) and self.payloads[-1] == "[DONE]"

    def events(self) -> list[dict]:
        return [json.loads(p) for p in self.payloads if p != "[DONE]"]


class Post(threading.Thread):
    def __init__(self, url: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.response: httpx.Response | None = None
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self.response = httpx.post(f"{self.url}/v1/completions", json=self.body, timeout=120)
        except httpx.HTTPError as exc:
            self.error = exc


def wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + POLL_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def refused(url: str, model: str) -> bool:
    """True once the server no longer takes connections (new work is not admitted). A reset
    with no response is a refusal too: the probe sat in the listening socket's backlog when the
    server closed it."""
    try:
        r = httpx.post(
            f"{url}/v1/completions",
            json={"model": model, "prompt": "the", "max_tokens": 1},
            timeout=30,
        )
    except (httpx.ConnectError, httpx.ReadError):
        return True
    assert r.status_code in (200, 503), f"during shutdown: {r.status_code} {r.text[:200]}"
    return False


def test_sigterm_drains_and_exits_zero(server, long_checkpoint):
    model = long_checkpoint.resolve().name
    base = {"model": model, "prompt": "the cat sat on", "temperature": 0, "ignore_eos": True}
    long = Stream(server.url, {**base, "max_tokens": LONG, "stream": True})
    short = Stream(server.url, {**base, "max_tokens": SHORT, "stream": True})
    long.start()
    short.start()
    assert long.first.wait(POLL_S) and short.first.wait(POLL_S), server.log_tail()
    queued = Post(server.url, {**base, "max_tokens": 8})
    queued.start()

    def third_arrived() -> bool:
        text = httpx.get(f"{server.url}/metrics").text
        in_engine = sum(metric(text, f"cats_num_requests_{g}") for g in ("running", "waiting"))
        return in_engine == 3 or queued.response is not None or (short.done and in_engine == 2)

    wait_for(third_arrived, "the third request to reach the engine")

    server.process.send_signal(signal.SIGTERM)
    wait_for(lambda: refused(server.url, model), "new connections to be refused")
    try:
        code = server.process.wait(EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no exit {EXIT_TIMEOUT_S} s after SIGTERM:\n{server.log_tail()}")
    for t in (long, short, queued):
        t.join(POLL_S)
        assert not t.is_alive(), "a client was still waiting after the server exited"

    assert code == 0, server.log_tail()
    assert "Traceback" not in server.log.read_text(), server.log_tail(80)
    # the short requests finished normally
    assert short.status == 200 and short.done and short.error is None, short.payloads[-3:]
    reasons = [c["finish_reason"] for e in short.events() for c in e.get("choices", [])]
    assert reasons[-1] == "length"
    assert queued.error is None and queued.response.status_code == 200, queued.response
    assert queued.response.json()["choices"][0]["finish_reason"] == "length"
    # the long one was ended cleanly: an error event saying why, then [DONE]
    assert long.error is None and long.done, (long.error, long.payloads[-3:])
    last = long.events()[-1]
    assert last["error"]["type"] == "server_error", last
    assert "shutting down" in last["error"]["message"], last


def test_a_second_ctrl_c_aborts_at_once_and_still_ends_streams_cleanly(launcher, long_checkpoint):
    """The first SIGINT drains (here for up to 300 s); the second aborts the running requests
    at once: the process exits 0 long before the drain would end, with no traceback, and each
    stream still ends with an error event and [DONE]."""
    server = launcher(
        "--model", str(long_checkpoint),
        "--device", "cpu",
        "--max-seq-len", str(LONG_CONTEXT),
        "--shutdown-drain-seconds", "300",
    )  # fmt: skip
    model = long_checkpoint.resolve().name
    body = {"model": model, "prompt": "the cat", "max_tokens": LONG, "ignore_eos": True}
    streams = [Stream(server.url, {**body, "stream": True}) for _ in range(2)]
    for s in streams:
        s.start()
    assert all(s.first.wait(POLL_S) for s in streams), server.log_tail()

    server.process.send_signal(signal.SIGINT)
    wait_for(lambda: "draining for up to 300 s" in server.log.read_text(), "the drain to start")
    server.process.send_signal(signal.SIGINT)
    try:
        code = server.process.wait(EXIT_TIMEOUT_S)  # far inside the 300 s drain
    except subprocess.TimeoutExpired:
        pytest.fail(f"the second SIGINT did not end the drain:\n{server.log_tail()}")
    assert code == 0, server.log_tail()
    log = server.log.read_text()
    assert "Traceback" not in log and "aborting 2 running request(s)" in log, server.log_tail(80)
    for s in streams:
        s.join(POLL_S)
        assert s.error is None and s.done, (s.error, s.payloads[-3:])
        assert "shutting down" in s.events()[-1]["error"]["message"]
