"""The `sparsity` object of a response, per loaded level and mode, through httpx against the
ASGI app (tiny model on CPU): activation sparsity, row sparsity and the fraction of MLP weight
bytes really not read."""

from __future__ import annotations

import pytest
from api_support import TINY_HALF_THRESHOLD, post_ok, serve_app, write_thresholds

from cats_serve.server.api.app import create_app
from cats_serve.server.settings import Settings

pytestmark = pytest.mark.anyio

TINY_DOWN_THRESHOLD = 0.34  # about half of the active neurons' |a| on the tiny model


@pytest.fixture(scope="module")
async def mixed(tiny_checkpoint, half_thresholds, tmp_path_factory):
    """The tiny model with a single-threshold level (0.5) and a two-threshold one (0.6)."""
    two = write_thresholds(
        tiny_checkpoint, 0.6, TINY_HALF_THRESHOLD, tmp_path_factory.mktemp("two") / "t.json",
        down_threshold=TINY_DOWN_THRESHOLD,
    )  # fmt: skip
    settings = Settings(model=str(tiny_checkpoint), device="cpu", thresholds=[half_thresholds, two])
    async with serve_app(create_app(settings)) as client:
        yield client


async def report(client, model, level) -> dict:
    body = {"model": model, "prompt": "the cat sat on", "max_tokens": 12, "temperature": 0,
            "ignore_eos": True, "sparsity": level}  # fmt: skip
    return (await post_ok(client, "/v1/completions", body))["sparsity"]


async def test_dense_reports_nothing_skipped(mixed, model):
    r = await report(mixed, model, 0)
    assert r == {"level": 0.0, "mlp_sparsity": 0.0, "row_sparsity": 0.0,
                 "weight_bytes_skipped": 0.0}  # fmt: skip


async def test_single_threshold_rows_are_neurons(mixed, model):
    r = await report(mixed, model, 0.5)
    assert r["mlp_sparsity"] > 0.3
    # one threshold: a neuron needs both its rows or neither
    assert r["row_sparsity"] == pytest.approx(r["mlp_sparsity"], abs=1e-3)
    # batch 1 on a CPU: the gather path reads the union's rows once the previous step showed
    # the union is sparse enough (the first step runs dense); W_gate is always read in full
    assert 0 < r["weight_bytes_skipped"] <= 2 / 3 * r["row_sparsity"] + 1e-9


async def test_two_threshold_rows_skip_more_down_rows(mixed, model):
    single, two = await report(mixed, model, 0.5), await report(mixed, model, 0.6)
    # the same t_up: the same neurons active; the second threshold drops W_down rows on top
    assert two["mlp_sparsity"] == pytest.approx(single["mlp_sparsity"], abs=0.05)
    assert two["row_sparsity"] > two["mlp_sparsity"] + 0.02
    assert 0 < two["weight_bytes_skipped"] <= 2 / 3 * two["row_sparsity"] + 1e-9
    assert two["weight_bytes_skipped"] > single["weight_bytes_skipped"]


async def test_openapi_documents_each_quantity(mixed):
    schema = (await mixed.get("/openapi.json")).json()["components"]["schemas"]
    fields = schema["SparsityReport"]["properties"]
    for name in ("level", "mlp_sparsity", "row_sparsity", "weight_bytes_skipped"):
        assert fields[name]["description"], name
    assert "really did not read" in fields["weight_bytes_skipped"]["description"]
