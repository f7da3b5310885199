"""Prometheus metrics: a small adapter from the engine's plain stats to prometheus-client.

The engine knows nothing of Prometheus; it calls `observe_result` with every RequestResult and
`observe_step` with every StepStats, on its own thread. Every metric lives in the `cats_`
namespace, in base units (seconds, bytes, ratios in 0..1), with bounded labels only: the
requested sparsity level (one of the loaded thresholds files), the finish or failure reason (a
fixed set defined in code), the MLP path (sparse or dense) and the layer index.
docs/observability.md lists every metric; tests/server/test_metrics.py keeps that table and this
file in step.

Per-step figures (per-layer and batch-union sparsity) are not written to gauges on every step:
the engine thread only appends the step to a bounded window, and the gauges are computed from
that window when Prometheus scrapes, so the decode loop pays one lock and one append per step.

Longer than the house's ~300 lines on purpose: every metric's name, help text, buckets and
labels are defined here and nowhere else, so this file and docs/observability.md map one to one.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cats_serve.server.engine.types import EngineError, RequestResult, StepStats


def log_buckets(lowest: float, highest: float, mantissas: Sequence[float]) -> tuple[float, ...]:
    """Bucket bounds m * 10**k for every mantissa m in [1, 10), from `lowest` to `highest`.

    Evenly spaced on a log scale, so a quantile interpolated inside a bucket is off by at most
    one step's ratio whether the latency is a 2 ms GPU decode step or a 2 s CPU prompt.
    """
    if not 0 < lowest < highest:
        raise ValueError(f"need 0 < lowest < highest, got {lowest}, {highest}")
    bounds = []
    exponent = 0
    while 10.0**exponent > lowest:
        exponent -= 1
    while True:
        for m in mantissas:
            bound = float(f"{m * 10.0**exponent:.6g}")  # 0.30000000000000004 -> 0.3
            if bound > highest * (1 + 1e-9):
                return tuple(bounds)
            if bound >= lowest * (1 - 1e-9):
                bounds.append(bound)
        exponent += 1


# Five steps per decade (ratio <= 1.67 between neighbours).
_STEPS = (1, 1.5, 2.5, 4, 6)
# Between two tokens of one sequence: ~1 ms (small model, GPU, CUDA graphs) to seconds (a 7B
# model on a CPU).
INTER_TOKEN_BUCKETS = log_buckets(0.0004, 10.0, _STEPS)
# Time to first token, queue and prefill: a GPU prefill of a short prompt takes milliseconds; a
# long prompt on a CPU, or a full queue, takes minutes.
FIRST_TOKEN_BUCKETS = log_buckets(0.001, 600.0, _STEPS)
# Whole requests and their decode phase: tens of milliseconds up to a long generation on a CPU.
REQUEST_BUCKETS = log_buckets(0.01, 1500.0, _STEPS)
# Token counts: powers of two up to the longest context we expect to serve.
TOKEN_BUCKETS = tuple(float(2**i) for i in range(18))  # 1 .. 131072
# Sparsity ratios in steps of 0.05; the 0 bucket holds dense requests exactly.
RATIO_BUCKETS = tuple(i / 20 for i in range(21))

# Steps in the window behind the per-layer and batch-union gauges; at 5-50 ms per step this is
# about the last 0.3-3 s of decoding, and the gauges hold their last value while idle.
DEFAULT_WINDOW_STEPS = 64

FINISH_REASONS = ("stop", "length")  # a request that ended normally (OpenAI finish_reason)
# Reasons outside EngineError: the engine failed mid-request, or the request was aborted
# (client disconnect, or shutdown after the drain timeout).
ENGINE_FAILURE = "engine_error"
ABORTED = "abort"
# Refusals the HTTP layer reports through observe_refusal besides EngineError's (errors.py,
# auth.py, guard.py, state.py); tests/server/test_metrics.py checks the server code names no others.
HTTP_REFUSALS = (
    "internal_error",
    "loading",
    "model_not_found",
    "request_too_large",
    "unauthorized",
)
MLP_PATHS = ("sparse", "dense")
# What a constrained request's grammar is for (api/constraints.py sets one of these)
CONSTRAINTS = ("json_object", "json_schema", "tool_calls")
# One token's grammar mask: microseconds for a simple schema, milliseconds for a hard one.
MASK_BUCKETS = log_buckets(1e-6, 0.1, _STEPS)


def level_label(level: float) -> str:
    """The `sparsity_level` label of a requested level: "0" (dense), "0.5", "0.7"."""
    return f"{float(level):g}"


def failure_reasons() -> tuple[str, ...]:
    """Every `reason` the failure counter can carry: refusals, engine failures, aborts."""
    reasons: list[str] = []
    todo: list[type[EngineError]] = [EngineError]
    while todo:
        cls = todo.pop()
        if cls.reason not in reasons:
            reasons.append(cls.reason)
        todo.extend(cls.__subclasses__())
    return (*sorted({*reasons, *HTTP_REFUSALS}), ENGINE_FAILURE, ABORTED)


@dataclass
class _LevelSeries:
    """The labelled children of one sparsity level, resolved once (labels() takes a lock)."""

    ttft: Histogram
    itl: Histogram
    e2e: Histogram
    queue: Histogram
    prefill: Histogram
    decode: Histogram
    sparsity: Histogram
    row_sparsity: Histogram
    bytes_skipped_ratio: Histogram
    prompt_hist: Histogram
    generation_hist: Histogram
    prompt_tokens: Counter
    generation_tokens: Counter


class StepWindow(Collector):
    """Per-layer and batch-union sparsity over the last `size` decode steps, computed at scrape.

    Per-layer values are weighted by the step's batch size, so they are the mean realised
    sparsity per sequence-step; union sparsity is the plain mean over steps.
    """

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"window size must be >= 1, got {size}")
        self._steps: deque[StepStats] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, stats: StepStats) -> None:
        with self._lock:
            self._steps.append(stats)

    def snapshot(self) -> tuple[list[float], float | None]:
        """(per-layer sparsity, union sparsity) over the window; ([], None) before any step."""
        with self._lock:
            steps = list(self._steps)
        if not steps:
            return [], None
        num_layers = max(len(s.layer_sparsity) for s in steps)
        sums = [0.0] * num_layers
        weights = [0] * num_layers
        for s in steps:
            for i, value in enumerate(s.layer_sparsity):
                sums[i] += value * s.batch_size
                weights[i] += s.batch_size
        layers = [total / w if w else 0.0 for total, w in zip(sums, weights, strict=True)]
        union = sum(s.union_sparsity for s in steps) / len(steps)
        return layers, union

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return self._families([], None)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        return self._families(*self.snapshot())

    @staticmethod
    def _families(layers: list[float], union: float | None) -> Iterator[GaugeMetricFamily]:
        per_layer = GaugeMetricFamily(
            "cats_layer_mlp_sparsity_ratio",
            "Realised MLP sparsity per layer (inactive fraction of neurons), mean over the "
            "sequences of the recent decode steps",
            labels=["layer"],
        )
        width = len(str(len(layers) - 1)) if layers else 1
        for i, value in enumerate(layers):
            # Zero-padded so that layers sort in order as text (Grafana rows, legends).
            per_layer.add_metric([str(i).zfill(width)], value)
        yield per_layer
        union_family = GaugeMetricFamily(
            "cats_batch_union_sparsity_ratio",
            "Fraction of MLP neurons inactive for every sequence of the batch (the rows the "
            "sparse kernels skip), mean over layers and the recent decode steps",
        )
        if union is not None:
            union_family.add_metric([], union)
        yield union_family


class Metrics:
    """Every cats-serve metric in one registry, fed by engine observers and the HTTP layer."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        window_steps: int = DEFAULT_WINDOW_STEPS,
    ):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        lvl = ["sparsity_level"]

        def hist(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(name, doc, lvl, buckets=buckets, registry=r)

        self.ttft = hist(
            "cats_time_to_first_token_seconds",
            "Time from arrival to the first generated token (queue + prefill)",
            FIRST_TOKEN_BUCKETS,
        )
        self.itl = hist(
            "cats_inter_token_latency_seconds",
            "Time between consecutive tokens of one request",
            INTER_TOKEN_BUCKETS,
        )
        self.e2e = hist(
            "cats_e2e_request_latency_seconds",
            "Time from arrival to the last token of a request that finished",
            REQUEST_BUCKETS,
        )
        self.queue = hist(
            "cats_request_queue_time_seconds",
            "Time a request waited for a batch slot",
            FIRST_TOKEN_BUCKETS,
        )
        self.prefill = hist(
            "cats_request_prefill_time_seconds",
            "Prompt processing time, up to the first token",
            FIRST_TOKEN_BUCKETS,
        )
        self.decode = hist(
            "cats_request_decode_time_seconds",
            "Time from the first to the last token of a request",
            REQUEST_BUCKETS,
        )
        self.sparsity = hist(
            "cats_request_mlp_sparsity_ratio",
            "Activation sparsity: realised fraction of inactive MLP neurons per request, mean "
            "over layers and its decode steps",
            RATIO_BUCKETS,
        )
        self.row_sparsity = hist(
            "cats_request_row_sparsity_ratio",
            "Realised fraction of MLP W_up and W_down rows a request's tokens did not need, "
            "mean over layers and its decode steps (what a level is calibrated for)",
            RATIO_BUCKETS,
        )
        self.bytes_skipped_ratio = hist(
            "cats_request_weight_bytes_skipped_ratio",
            "Fraction of MLP weight bytes (W_gate, W_up, W_down) the decode steps of a request "
            "really did not read, mean over its steps (0 for steps on the dense path)",
            RATIO_BUCKETS,
        )
        self.prompt_tokens_hist = hist(
            "cats_request_prompt_tokens", "Prompt tokens per request", TOKEN_BUCKETS
        )
        self.gen_tokens_hist = hist(
            "cats_request_generation_tokens", "Generated tokens per request", TOKEN_BUCKETS
        )
        # prometheus-client appends `_total` to counter names on exposition.
        self.prompt_tokens = Counter(
            "cats_prompt_tokens", "Prompt tokens prefilled", lvl, registry=r
        )
        self.generation_tokens = Counter(
            "cats_generation_tokens",
            "Tokens generated (aborted requests included)",
            lvl,
            registry=r,
        )
        self.success = Counter(
            "cats_request_success",
            "Requests that finished, by OpenAI finish reason",
            ["finished_reason", "sparsity_level"],
            registry=r,
        )
        self.failure = Counter(
            "cats_request_failure",
            "Requests refused, failed in the engine, or aborted, by reason",
            ["reason"],
            registry=r,
        )
        self.bytes_skipped = Counter(
            "cats_mlp_weight_bytes_skipped",
            "MLP W_up/W_down weight bytes the sparse decode kernels did not read (rows no row "
            "of the batch needed; the dense path reads every byte)",
            registry=r,
        )
        self.decode_steps = Counter(
            "cats_decode_steps",
            "Decode steps of the whole batch, by MLP path (dense = fallback when the batch's "
            "union of active neurons is too dense to pay off)",
            ["mlp_path"],
            registry=r,
        )
        self.constrained = Counter(
            "cats_constrained_requests",
            "Requests decoded under a grammar, by what it is for (response_format json_object "
            "or json_schema, or tool calls), counted when they end",
            ["constraint"],
            registry=r,
        )
        self.mask_time = Histogram(
            "cats_grammar_mask_seconds",
            "Mean time to compute one token's grammar mask, per constrained request (on the "
            "GPU it overlaps the next decode step)",
            ["constraint"],
            buckets=MASK_BUCKETS,
            registry=r,
        )
        for name in CONSTRAINTS:
            self.constrained.labels(constraint=name)
            self.mask_time.labels(constraint=name)
        self.running = Gauge(
            "cats_num_requests_running", "Sequences in the decode batch", registry=r
        )
        self.waiting = Gauge(
            "cats_num_requests_waiting", "Requests queued for a batch slot", registry=r
        )
        self.model_info = Gauge(
            "cats_model_info",
            "The served model (value 1); weights: the linear layers' weights (the dtype, or "
            "int8); sparsity_levels lists the loaded levels",
            ["model", "dtype", "weights", "device", "sparsity_levels"],
            registry=r,
        )
        self.window = StepWindow(window_steps)
        r.register(self.window)

        self._levels: dict[str, _LevelSeries] = {}
        self._steps_by_path = {p: self.decode_steps.labels(mlp_path=p) for p in MLP_PATHS}
        # Zero series for every reason, so rate() and "errors" panels read 0, not "no data".
        for reason in failure_reasons():
            self.failure.labels(reason=reason)

    # ---- wiring (HTTP layer) ------------------------------------------------------------------

    def set_model_info(
        self, model: str, dtype: str, weights: str, device: str, levels: list[float]
    ) -> None:
        """Publish the served model and create every per-level series at zero."""
        self.model_info.clear()
        self.model_info.labels(
            model=model,
            dtype=dtype,
            weights=weights,
            device=device,
            sparsity_levels=",".join(level_label(lv) for lv in levels),
        ).set(1)
        for level in levels:
            self._series(level_label(level))
            for reason in FINISH_REASONS:
                self.success.labels(finished_reason=reason, sparsity_level=level_label(level))

    def observe_refusal(self, reason: str) -> None:
        """A request refused before it reached the engine; `reason` is EngineError.reason."""
        self.failure.labels(reason=reason).inc()

    # ---- engine observers (engine thread) -----------------------------------------------------

    def observe_result(self, result: RequestResult) -> None:
        label = level_label(result.sparsity_level)
        s = self._series(label)
        # Work done counts whatever the outcome; latency only describes requests that finished.
        s.prompt_tokens.inc(result.prompt_tokens)
        s.generation_tokens.inc(result.generation_tokens)
        if result.constraint in CONSTRAINTS:
            self.constrained.labels(constraint=result.constraint).inc()
            if result.grammar_mask_seconds is not None:
                self.mask_time.labels(constraint=result.constraint).observe(
                    result.grammar_mask_seconds
                )
        if result.mlp_sparsity is not None:
            s.sparsity.observe(result.mlp_sparsity)
            s.row_sparsity.observe(result.row_sparsity)
            s.bytes_skipped_ratio.observe(result.weight_bytes_skipped)
        if result.finish_reason == "error":
            self.failure.labels(reason=ENGINE_FAILURE).inc()
            return
        if result.finish_reason == "abort":
            self.failure.labels(reason=ABORTED).inc()
            return
        self.success.labels(finished_reason=result.finish_reason, sparsity_level=label).inc()
        s.queue.observe(result.queue_time)
        s.prefill.observe(result.prefill_time)
        s.e2e.observe(result.e2e_latency)
        s.prompt_hist.observe(result.prompt_tokens)
        s.generation_hist.observe(result.generation_tokens)
        if result.time_to_first_token is not None:
            s.ttft.observe(result.time_to_first_token)
        for gap in result.inter_token_latencies:
            s.itl.observe(gap)
        if result.token_times:
            s.decode.observe(result.decode_time)

    def observe_step(self, stats: StepStats) -> None:
        self.window.add(stats)
        if stats.weight_bytes_skipped:
            self.bytes_skipped.inc(stats.weight_bytes_skipped)
        step = self._steps_by_path.get(stats.mlp_path)
        if step is None:  # a path this file does not know yet: still bounded by the engine
            step = self._steps_by_path[stats.mlp_path] = self.decode_steps.labels(stats.mlp_path)
        step.inc()

    # ---- internals ----------------------------------------------------------------------------

    def _series(self, label: str) -> _LevelSeries:
        series = self._levels.get(label)
        if series is None:
            series = self._levels[label] = _LevelSeries(
                ttft=self.ttft.labels(label),
                itl=self.itl.labels(label),
                e2e=self.e2e.labels(label),
                queue=self.queue.labels(label),
                prefill=self.prefill.labels(label),
                decode=self.decode.labels(label),
                sparsity=self.sparsity.labels(label),
                row_sparsity=self.row_sparsity.labels(label),
                bytes_skipped_ratio=self.bytes_skipped_ratio.labels(label),
                prompt_hist=self.prompt_tokens_hist.labels(label),
                generation_hist=self.gen_tokens_hist.labels(label),
                prompt_tokens=self.prompt_tokens.labels(label),
                generation_tokens=self.generation_tokens.labels(label),
            )
        return series
