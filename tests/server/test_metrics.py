"""The metrics adapter: engine results and steps in, Prometheus samples out."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cats_serve.server.engine.types import RequestResult, StepStats
from cats_serve.server.metrics import (
    FIRST_TOKEN_BUCKETS,
    INTER_TOKEN_BUCKETS,
    RATIO_BUCKETS,
    REQUEST_BUCKETS,
    TOKEN_BUCKETS,
    Metrics,
    failure_reasons,
    level_label,
    log_buckets,
)

ROOT = Path(__file__).resolve().parents[2]
METRICS_DOC = ROOT / "docs" / "observability.md"

# DESIGN.md's metrics section: exposition name -> type.
DESIGN_METRICS = {
    "cats_time_to_first_token_seconds": "histogram",
    "cats_inter_token_latency_seconds": "histogram",
    "cats_e2e_request_latency_seconds": "histogram",
    "cats_request_queue_time_seconds": "histogram",
    "cats_request_prefill_time_seconds": "histogram",
    "cats_request_decode_time_seconds": "histogram",
    "cats_request_mlp_sparsity_ratio": "histogram",
    "cats_request_row_sparsity_ratio": "histogram",
    "cats_request_weight_bytes_skipped_ratio": "histogram",
    "cats_request_prompt_tokens": "histogram",
    "cats_request_generation_tokens": "histogram",
    "cats_prompt_tokens_total": "counter",
    "cats_generation_tokens_total": "counter",
    "cats_request_success_total": "counter",
    "cats_request_failure_total": "counter",
    "cats_mlp_weight_bytes_skipped_total": "counter",
    "cats_num_requests_running": "gauge",
    "cats_num_requests_waiting": "gauge",
    "cats_layer_mlp_sparsity_ratio": "gauge",
    "cats_batch_union_sparsity_ratio": "gauge",
    "cats_model_info": "gauge",
}
LEVELS = [0.0, 0.5, 0.7]


def make_result(**overrides) -> RequestResult:
    fields = dict(
        request_id="r1",
        finish_reason="stop",
        text="hello",
        token_ids=[5, 6, 7, 8],
        prompt_tokens=11,
        sparsity_level=0.5,
        mlp_sparsity=0.55,
        row_sparsity=0.6,
        weight_bytes_skipped=0.4,
        layer_sparsity=[0.5, 0.6],
        arrival_time=100.0,
        queue_time=0.25,
        prefill_time=0.5,
        token_times=[101.0, 101.125, 101.375, 101.5],
    )
    fields.update(overrides)
    return RequestResult(**fields)


def make_step(**overrides) -> StepStats:
    fields = dict(
        batch_size=2,
        bucket=2,
        mlp_path="sparse",
        union_sparsity=0.25,
        weight_bytes_skipped=4096,
        weight_bytes_skipped_ratio=0.3,
        layer_sparsity=[0.5, 0.75],
    )
    fields.update(overrides)
    return StepStats(**fields)


@pytest.fixture
def metrics() -> Metrics:
    m = Metrics()
    m.set_model_info("tiny", "float32", "float32", "cpu", LEVELS)
    return m


def sample(m: Metrics, name: str, **labels) -> float | None:
    return m.registry.get_sample_value(name, labels)


def families(m: Metrics) -> dict:
    text = generate_latest(m.registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def exposed(m: Metrics) -> dict[str, tuple[str, set[str]]]:
    """Exposition name -> (type, label names) of every family, as Prometheus sees it."""
    out = {}
    for fam in m.registry.collect():
        labels = {k for s in fam.samples for k in s.labels} - {"le"}
        shown = f"{fam.name}_total" if fam.type == "counter" else fam.name
        out[shown] = (fam.type, labels)
    return out


# ---- the metric set -----------------------------------------------------------------------


def test_every_design_metric_is_exposed_with_its_type(metrics):
    metrics.observe_result(make_result())
    metrics.observe_step(make_step())
    seen = exposed(metrics)
    for name, kind in DESIGN_METRICS.items():
        assert name in seen, name
        assert seen[name][0] == kind, name


def test_labels_are_the_bounded_ones(metrics):
    metrics.observe_result(make_result())
    metrics.observe_step(make_step())
    allowed = {"sparsity_level", "finished_reason", "reason", "layer", "mlp_path", "constraint"}
    allowed |= {"model", "dtype", "weights", "device", "sparsity_levels"}  # cats_model_info only
    for name, (_, labels) in exposed(metrics).items():
        assert labels <= allowed, name
        if name != "cats_model_info":
            assert not labels & {"model", "dtype", "weights", "device", "sparsity_levels"}, name


def test_metrics_doc_table_matches_the_registry(metrics):
    """docs/observability.md lists every metric with its type and labels, and nothing else."""
    metrics.observe_result(make_result())
    metrics.observe_step(make_step())
    rows = {}
    for line in METRICS_DOC.read_text().splitlines():
        m = re.match(r"\|\s*`(cats_\w+)`\s*\|\s*(\w+)\s*\|([^|]*)\|\s*(.+?)\s*\|$", line)
        if m:
            name, kind, labels, meaning = m.groups()
            rows[name] = (kind, set(re.findall(r"`(\w+)`", labels)), meaning)
    seen = exposed(metrics)
    assert set(rows) == set(seen)
    for name, (kind, labels, meaning) in rows.items():
        assert (kind, labels) == seen[name], name
        assert meaning, name


def test_model_info_names_the_levels(metrics):
    value = sample(
        metrics,
        "cats_model_info",
        model="tiny",
        dtype="float32",
        weights="float32",
        device="cpu",
        sparsity_levels=",".join(level_label(lv) for lv in LEVELS),
    )
    assert value == 1


def test_series_exist_at_zero_before_traffic(metrics):
    """rate() panels read 0 rather than 'no data' on a fresh server."""
    for reason in failure_reasons():
        assert sample(metrics, "cats_request_failure_total", reason=reason) == 0
    for level in LEVELS:
        lvl = level_label(level)
        for reason in ("stop", "length"):
            assert (
                sample(
                    metrics,
                    "cats_request_success_total",
                    finished_reason=reason,
                    sparsity_level=lvl,
                )
                == 0
            )
        assert sample(metrics, "cats_generation_tokens_total", sparsity_level=lvl) == 0
        assert sample(metrics, "cats_time_to_first_token_seconds_count", sparsity_level=lvl) == 0


# ---- requests -----------------------------------------------------------------------------


def test_finished_request_fills_every_per_request_metric(metrics):
    r = make_result()
    metrics.observe_result(r)
    lvl = level_label(r.sparsity_level)

    def value(name):
        return sample(metrics, name, sparsity_level=lvl)

    assert (
        sample(metrics, "cats_request_success_total", finished_reason="stop", sparsity_level=lvl)
        == 1
    )
    assert value("cats_prompt_tokens_total") == r.prompt_tokens
    assert value("cats_generation_tokens_total") == r.generation_tokens
    assert value("cats_request_prompt_tokens_sum") == r.prompt_tokens
    assert value("cats_request_generation_tokens_sum") == r.generation_tokens
    assert value("cats_request_queue_time_seconds_sum") == pytest.approx(r.queue_time)
    assert value("cats_request_prefill_time_seconds_sum") == pytest.approx(r.prefill_time)
    assert value("cats_time_to_first_token_seconds_sum") == pytest.approx(
        r.token_times[0] - r.arrival_time
    )
    assert value("cats_e2e_request_latency_seconds_sum") == pytest.approx(
        r.token_times[-1] - r.arrival_time
    )
    assert value("cats_request_decode_time_seconds_sum") == pytest.approx(
        r.token_times[-1] - r.token_times[0]
    )
    assert value("cats_inter_token_latency_seconds_count") == len(r.token_times) - 1
    assert value("cats_inter_token_latency_seconds_sum") == pytest.approx(
        r.token_times[-1] - r.token_times[0]
    )
    assert value("cats_request_mlp_sparsity_ratio_sum") == pytest.approx(r.mlp_sparsity)
    assert value("cats_request_mlp_sparsity_ratio_count") == 1
    assert value("cats_request_row_sparsity_ratio_sum") == pytest.approx(r.row_sparsity)
    assert value("cats_request_weight_bytes_skipped_ratio_sum") == pytest.approx(
        r.weight_bytes_skipped
    )


def test_sparsity_lands_in_the_right_bucket(metrics):
    r = make_result(mlp_sparsity=0.62)
    metrics.observe_result(r)
    lvl = level_label(r.sparsity_level)
    for bound in RATIO_BUCKETS:
        count = sample(
            metrics, "cats_request_mlp_sparsity_ratio_bucket", sparsity_level=lvl, le=str(bound)
        )
        assert count == (1 if r.mlp_sparsity <= bound else 0), bound


def test_dense_request_is_counted_in_the_zero_bucket(metrics):
    r = make_result(sparsity_level=0.0, mlp_sparsity=0.0)
    metrics.observe_result(r)
    assert (
        sample(metrics, "cats_request_mlp_sparsity_ratio_bucket", sparsity_level="0", le="0.0") == 1
    )


@pytest.mark.parametrize("finish, reason", [("error", "engine_error"), ("abort", "abort")])
def test_failed_and_aborted_requests_count_as_failures_not_latency(metrics, finish, reason):
    r = make_result(finish_reason=finish)
    before = sample(metrics, "cats_request_failure_total", reason=reason)
    metrics.observe_result(r)
    lvl = level_label(r.sparsity_level)
    assert sample(metrics, "cats_request_failure_total", reason=reason) == before + 1
    assert sample(metrics, "cats_e2e_request_latency_seconds_count", sparsity_level=lvl) == 0
    assert sample(metrics, "cats_time_to_first_token_seconds_count", sparsity_level=lvl) == 0
    # The tokens it did generate were real work.
    assert sample(metrics, "cats_generation_tokens_total", sparsity_level=lvl) == len(r.token_ids)
    for finished in ("stop", "length"):
        assert (
            sample(
                metrics,
                "cats_request_success_total",
                finished_reason=finished,
                sparsity_level=lvl,
            )
            == 0
        )


def test_request_without_tokens_records_no_token_timings(metrics):
    r = make_result(token_ids=[], token_times=[], mlp_sparsity=None, finish_reason="length")
    metrics.observe_result(r)
    lvl = level_label(r.sparsity_level)
    assert sample(metrics, "cats_time_to_first_token_seconds_count", sparsity_level=lvl) == 0
    assert sample(metrics, "cats_request_decode_time_seconds_count", sparsity_level=lvl) == 0
    assert sample(metrics, "cats_request_mlp_sparsity_ratio_count", sparsity_level=lvl) == 0
    assert sample(metrics, "cats_e2e_request_latency_seconds_count", sparsity_level=lvl) == 1


def test_refusal_counts_under_its_reason(metrics):
    metrics.observe_refusal("queue_full")
    metrics.observe_refusal("queue_full")
    assert sample(metrics, "cats_request_failure_total", reason="queue_full") == 2


def test_failure_reasons_cover_every_reason_the_server_reports():
    """Any `reason="..."` the server code passes on is pre-created and documented."""
    reasons = set(failure_reasons())
    named = set()
    for path in (ROOT / "server").rglob("*.py"):
        named |= set(re.findall(r'\breason\s*=\s*"(\w+)"', path.read_text()))
    assert named, "no reasons found: the pattern no longer matches the server code"
    assert named <= reasons
    doc = METRICS_DOC.read_text()
    for reason in reasons:
        assert f"`{reason}`" in doc, reason


def test_failure_reasons_cover_every_engine_error():
    from cats_serve.server.engine import types as engine_types

    reasons = set(failure_reasons())
    for obj in vars(engine_types).values():
        if isinstance(obj, type) and issubclass(obj, engine_types.EngineError):
            assert obj.reason in reasons, obj


# ---- decode steps -------------------------------------------------------------------------


def test_step_counters(metrics):
    steps = [make_step(), make_step(mlp_path="dense", weight_bytes_skipped=0), make_step()]
    for s in steps:
        metrics.observe_step(s)
    assert sample(metrics, "cats_mlp_weight_bytes_skipped_total") == sum(
        s.weight_bytes_skipped for s in steps
    )
    for path in ("sparse", "dense"):
        expected = sum(s.mlp_path == path for s in steps)
        assert sample(metrics, "cats_decode_steps_total", mlp_path=path) == expected


def test_layer_gauges_are_a_batch_weighted_window_mean():
    m = Metrics(window_steps=2)
    old = make_step(batch_size=1, layer_sparsity=[0.0, 0.0], union_sparsity=0.0)
    a = make_step(batch_size=1, layer_sparsity=[0.2, 0.4], union_sparsity=0.1)
    b = make_step(batch_size=3, layer_sparsity=[0.6, 0.8], union_sparsity=0.3)
    for s in (old, a, b):  # `old` falls out of the 2-step window
        m.observe_step(s)
    for i in range(2):
        expected = (a.layer_sparsity[i] * a.batch_size + b.layer_sparsity[i] * b.batch_size) / (
            a.batch_size + b.batch_size
        )
        assert sample(m, "cats_layer_mlp_sparsity_ratio", layer=str(i)) == pytest.approx(expected)
    assert sample(m, "cats_batch_union_sparsity_ratio") == pytest.approx(
        (a.union_sparsity + b.union_sparsity) / 2
    )


def test_layer_labels_sort_in_layer_order():
    m = Metrics()
    num_layers = 12
    m.observe_step(make_step(layer_sparsity=[i / num_layers for i in range(num_layers)]))
    fam = families(m)["cats_layer_mlp_sparsity_ratio"]
    by_label = {s.labels["layer"]: s.value for s in fam.samples}
    assert len(by_label) == num_layers
    ordered = sorted(by_label)  # as text, the way legends and heatmap rows sort
    assert [by_label[k] for k in ordered] == sorted(by_label.values())
    assert [int(k) for k in ordered] == list(range(num_layers))


def test_window_gauges_are_absent_before_any_step():
    m = Metrics()
    assert sample(m, "cats_batch_union_sparsity_ratio") is None
    assert not families(m)["cats_layer_mlp_sparsity_ratio"].samples


def test_running_and_waiting_follow_their_source(metrics):
    queue = [1, 2, 3]
    metrics.waiting.set_function(lambda: len(queue))
    assert sample(metrics, "cats_num_requests_waiting") == len(queue)
    queue.pop()
    assert sample(metrics, "cats_num_requests_waiting") == len(queue)


# ---- buckets ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "buckets",
    [INTER_TOKEN_BUCKETS, FIRST_TOKEN_BUCKETS, REQUEST_BUCKETS, TOKEN_BUCKETS, RATIO_BUCKETS],
    ids=["itl", "first-token", "request", "tokens", "ratio"],
)
def test_buckets_increase(buckets):
    assert all(b < c for b, c in itertools.pairwise(buckets))


@pytest.mark.parametrize(
    "buckets", [INTER_TOKEN_BUCKETS, FIRST_TOKEN_BUCKETS, REQUEST_BUCKETS], ids=str
)
def test_latency_buckets_resolve_gpu_and_cpu_alike(buckets):
    """Even log spacing: the relative error of an interpolated quantile is the same everywhere."""
    ratios = [c / b for b, c in itertools.pairwise(buckets)]
    assert max(ratios) / min(ratios) < 2
    assert buckets[-1] / buckets[0] >= 1e4  # four decades: GPU milliseconds to CPU seconds


def test_inter_token_buckets_start_below_request_buckets():
    assert INTER_TOKEN_BUCKETS[0] < FIRST_TOKEN_BUCKETS[0] < REQUEST_BUCKETS[0]
    assert INTER_TOKEN_BUCKETS[-1] < FIRST_TOKEN_BUCKETS[-1] < REQUEST_BUCKETS[-1]


def test_ratio_buckets_span_zero_to_one():
    assert RATIO_BUCKETS[0] == 0 and RATIO_BUCKETS[-1] == 1


def test_log_buckets():
    mantissas = (1, 2, 5)
    got = log_buckets(0.01, 1.0, mantissas)
    assert got[0] == 0.01 and got[-1] == 1.0
    assert len(got) == 2 * len(mantissas) + 1
    assert all(
        math.isclose(c / b, 2) or math.isclose(c / b, 2.5) for b, c in itertools.pairwise(got)
    )
    with pytest.raises(ValueError, match="lowest"):
        log_buckets(1.0, 0.5, mantissas)
