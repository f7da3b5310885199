"""Helpers shared by the API tests (in-process and real-process): thresholds files for tiny
models, waiting for /health, reading Prometheus text."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import torch
from asgi_lifespan import LifespanManager

from cats_serve.calibration.thresholds_file import (
    CalibrationInfo,
    HeldoutInfo,
    ModelInfo,
    ThresholdsFile,
    save_thresholds,
)

# Thresholds that leave roughly half of the tiny model's MLP neurons inactive (see test_engine).
TINY_HALF_THRESHOLD = 0.45
HEALTH_TIMEOUT_S = 120
# Context of the e2e tiny model: long enough that a request runs for as long as a test needs.
LONG_CONTEXT = 16384
SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(\{(?P<labels>.*)\})? (?P<value>\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def cats_serve_command() -> list[str]:
    """The installed console script, next to this interpreter if it is there."""
    beside = Path(sys.executable).with_name("cats-serve")
    found = str(beside) if beside.exists() else shutil.which("cats-serve")
    assert found, "the cats-serve console script is not installed (pip install -e .[test])"
    return [found]


def write_thresholds(
    checkpoint: Path,
    level: float,
    threshold: float,
    out: Path,
    neuron_scale: list[list[float]] | None = None,
    down_threshold: float | None = None,
) -> Path:
    """A valid thresholds file for `checkpoint` at `level`, every layer at `threshold`
    (criterion "up_rms" with these per-neuron weights when given, else "silu"; two-threshold
    with this t_down on every layer when `down_threshold` is given)."""
    from cats_serve.server.model.loader import load_model

    loaded = load_model(checkpoint, dtype=torch.float32, device="cpu")
    cfg = loaded.model.config
    layers = cfg.num_layers
    file = ThresholdsFile(
        model=ModelInfo(
            name=checkpoint.name,
            num_layers=layers,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            fingerprint=loaded.fingerprint,
        ),
        target_sparsity=level,
        mode="uniform",
        mean_sparsity=level,
        layer_sparsity=[level] * layers,
        thresholds=[threshold] * layers,
        calibration=CalibrationInfo(
            source="test", documents=1, tokens=1, bins=1, bin_width=1.0, notes="written by a test"
        ),
        heldout=HeldoutInfo(
            source="test", tokens=1, layer_sparsity=[level] * layers, mean_sparsity=level
        ),
        criterion="silu" if neuron_scale is None else "up_rms",
        neuron_scale=neuron_scale,
        down_thresholds=None if down_threshold is None else [down_threshold] * layers,
        layer_up_sparsity=None if down_threshold is None else [level] * layers,
    )
    return save_thresholds(file, out)


async def wait_ready(client: httpx.AsyncClient, timeout: float = HEALTH_TIMEOUT_S) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (await client.get("/health")).status_code != 200:
        assert loop.time() < deadline, "the app did not become healthy"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def serve_app(app) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, through an httpx client, once /health is 200."""
    async with LifespanManager(app, startup_timeout=HEALTH_TIMEOUT_S) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://testserver", timeout=HEALTH_TIMEOUT_S
        ) as client:
            await wait_ready(client)
            yield client


async def post_ok(client: httpx.AsyncClient, path: str, body: dict) -> dict:
    """POST `body` to `path`; the answer must be 200, its JSON is returned."""
    response = await client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format (None when absent)."""
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match and match["name"] == name:
            found = dict(LABEL.findall(match["labels"] or ""))
            if found == labels:
                return float(match["value"])
    return None


def sse_payloads(text: str) -> list:
    """The `data:` payloads of an SSE body, JSON-decoded except the final [DONE]."""
    events = [e for e in text.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events), events
    data = [e.removeprefix("data: ") for e in events]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]
