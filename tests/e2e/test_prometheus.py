"""Prometheus (Debian's package) scraping a real cats-serve process; the dashboard's queries.

The server (started by the `launcher` fixture) runs the tiny random model with a thresholds file
at one sparsity level; Prometheus runs on loopback with docker/prometheus.yml, retargeted at the
server and scraping every second. After a mix of requests (two levels, a concurrent batch, a
refused one) every query of the Grafana dashboard must parse and return a number through
Prometheus's HTTP API, and the requests' realised sparsity must match what the API reported.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from api_support import TINY_HALF_THRESHOLD, write_thresholds
from external_tools import prometheus_binaries

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "cats-serve.json"
PROMETHEUS_YML = ROOT / "docker" / "prometheus.yml"
LEVEL = 0.5  # the level of the thresholds file the server loads; 0 (dense) is always there
MODEL = "tiny"
SCRAPE_SECONDS = 1
PROMETHEUS_WAIT_S = 30
MAX_TOKENS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args[0]} exited ({process.returncode}):\n{log.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    pytest.fail(f"{url} did not answer 200 within {timeout} s:\n{log.read_text()[-4000:]}")


@contextlib.contextmanager
def running(cmd: list[str], log: Path, ready_url: str, timeout: float) -> Iterator[None]:
    """Start `cmd`, wait for `ready_url`, and always stop it (SIGTERM, then SIGKILL)."""
    with log.open("w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(ready_url, process, log, timeout)
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Stack:
    server: str  # base URL of cats-serve
    prometheus: str  # base URL of Prometheus
    started: float  # time.time() when Prometheus came up


@pytest.fixture(scope="module")
def stack(launcher, tiny_checkpoint, tmp_path_factory) -> Iterator[Stack]:
    prometheus, _ = prometheus_binaries()
    tmp = tmp_path_factory.mktemp("prometheus-e2e")
    thresholds = write_thresholds(
        tiny_checkpoint, LEVEL, TINY_HALF_THRESHOLD, tmp / "tiny-0.5.json"
    )
    server = launcher(
        "--model", str(tiny_checkpoint),
        "--served-model-name", MODEL,
        "--thresholds", str(thresholds),
        "--default-sparsity", str(LEVEL),
        "--device", "cpu",
        "--max-batch-size", "4",
        "--cache-dir", str(tmp / "cache"),
        "--log-level", "warning",
    )  # fmt: skip
    target = server.url.removeprefix("http://")

    # The shipped config, retargeted at this server and scraping faster.
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"]["scrape_interval"] = f"{SCRAPE_SECONDS}s"
    config["global"]["evaluation_interval"] = f"{SCRAPE_SECONDS}s"
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    config_file = tmp / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    prom_port = free_port()
    prom_cmd = [
        str(prometheus),
        f"--config.file={config_file}",
        f"--storage.tsdb.path={tmp / 'data'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
        "--log.level=warn",
    ]
    prom = f"http://127.0.0.1:{prom_port}"
    with running(prom_cmd, tmp / "prometheus.log", f"{prom}/-/ready", PROMETHEUS_WAIT_S):
        yield Stack(server.url, prom, time.time())


def query(stack: Stack, expr: str) -> dict:
    """An instant query through the HTTP API; returns the whole JSON answer (errors included)."""
    response = httpx.post(f"{stack.prometheus}/api/v1/query", data={"query": expr}, timeout=10)
    return response.json()


def values(answer: dict) -> list[float]:
    return [float(r["value"][1]) for r in answer["data"]["result"]]


def wait_until(stack: Stack, expr: str, predicate, what: str) -> list[float]:
    deadline = time.monotonic() + PROMETHEUS_WAIT_S
    while True:
        answer = query(stack, expr)
        assert answer["status"] == "success", answer
        got = values(answer)
        if got and predicate(got):
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: `{expr}` gave {got} after {PROMETHEUS_WAIT_S} s")
        time.sleep(SCRAPE_SECONDS / 4)


def complete(stack: Stack, prompt: str, **extra) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}
    return httpx.post(f"{stack.server}/v1/completions", json=body, timeout=120)


@dataclass
class Traffic:
    realised: dict[float, list[float]]  # level -> realised sparsity the API reported
    finished: int
    refused: int


@pytest.fixture(scope="module")
def traffic(stack: Stack) -> Traffic:
    # Prometheus holds the zero series from before any request, so rates see the increase.
    wait_until(stack, 'up{job="cats-serve"}', lambda v: v == [1.0], "first scrape")
    wait_until(stack, "cats_model_info", lambda v: v == [1.0], "model info scraped")
    prompts = ["the cat sat on a mat", "one two three four", "hello world", "the dog ran to Paris"]
    realised: dict[float, list[float]] = {LEVEL: [], 0.0: []}
    with ThreadPoolExecutor(len(prompts)) as pool:  # together, so the engine batches them
        answers = list(pool.map(lambda p: complete(stack, p), prompts))
    answers.append(complete(stack, "the cat ran", sparsity=0.0))
    for r in answers:
        assert r.status_code == 200, r.text
        body = r.json()
        realised[body["sparsity"]["level"]].append(body["sparsity"]["mlp_sparsity"])
    refusal = complete(stack, "hello", sparsity=0.3)  # not a loaded level
    assert refusal.status_code == 400, refusal.text
    finished = len(answers)
    # Wait until a scrape has seen all of it.
    wait_until(
        stack, "sum(cats_request_success_total)", lambda v: v[0] >= finished, "requests scraped"
    )
    wait_until(stack, "sum(cats_request_failure_total)", lambda v: v[0] >= 1, "refusal scraped")
    return Traffic(realised, finished, refused=1)


def dashboard_queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    out = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def grafana_to_promql(expr: str, window_s: int) -> str:
    """Replace Grafana's interval variables with a window that covers the whole test."""
    for macro in ("$__rate_interval", "$__interval", "$__range"):
        expr = expr.replace(macro, f"{window_s}s")
    assert "$" not in expr, f"unresolved variable in {expr}"
    return expr


def test_every_dashboard_query_parses_and_returns_data(stack, traffic):
    window = int(time.time() - stack.started) + 10 * SCRAPE_SECONDS
    problems = []
    for title, expr in dashboard_queries():
        answer = query(stack, grafana_to_promql(expr, window))
        if answer["status"] != "success":
            problems.append(f"{title}: {expr}: {answer.get('error')}")
            continue
        got = values(answer)
        if not got or not any(math.isfinite(v) for v in got):
            problems.append(f"{title}: {expr}: no finite value in {answer['data']['result']}")
    assert not problems, "\n".join(problems)


def test_realised_sparsity_is_visible_per_level(stack, traffic):
    for level, reported in traffic.realised.items():
        label = f"{level:g}"
        selector = f'{{sparsity_level="{label}"}}'
        (count,) = values(query(stack, f"cats_request_mlp_sparsity_ratio_count{selector}"))
        (total,) = values(query(stack, f"cats_request_mlp_sparsity_ratio_sum{selector}"))
        assert count == len(reported)
        assert total == pytest.approx(sum(reported), rel=1e-6, abs=1e-9)
    sparse = traffic.realised[LEVEL]
    assert sum(sparse) / len(sparse) > max(traffic.realised[0.0])  # CATS did skip neurons


def test_refusal_is_counted_by_reason(stack, traffic):
    (refused,) = values(query(stack, 'cats_request_failure_total{reason="unknown_sparsity"}'))
    assert refused == traffic.refused


def test_token_counters_match_the_requests(stack, traffic):
    (generated,) = values(query(stack, "sum(cats_generation_tokens_total)"))
    (finished,) = values(query(stack, "sum(cats_request_generation_tokens_count)"))
    assert finished == traffic.finished
    assert 0 < generated <= traffic.finished * MAX_TOKENS


def test_per_layer_sparsity_is_scraped(stack, traffic, tiny_checkpoint):
    from transformers import AutoConfig

    layers = AutoConfig.from_pretrained(tiny_checkpoint).num_hidden_layers
    got = values(query(stack, "cats_layer_mlp_sparsity_ratio"))
    assert len(got) == layers
    assert all(0.0 <= v <= 1.0 for v in got)
