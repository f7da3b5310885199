"""Prometheus metrics: a small adapter from the engine's plain stats to prometheus-client.

The engine knows nothing of Prometheus; it calls the observers registered here with
RequestResult and StepStats objects. Every metric lives in the `cats_` namespace, in base units,
with bounded labels (finish reason, failure reason, requested sparsity level, layer index).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cats_serve.server.engine_types import RequestResult, StepStats

# Latency buckets from ~1 ms (a GPU decode step) to minutes (a long request on a CPU).
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0,
)  # fmt: skip
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
RATIO_BUCKETS = tuple(i / 20 for i in range(1, 21))  # 0.05 .. 1.0


def level_label(level: float) -> str:
    return f"{level:g}"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        lvl = ["sparsity_level"]

        def hist(name, doc, buckets, labels=lvl):
            return Histogram(name, doc, labels, buckets=buckets, registry=r)

        self.ttft = hist(
            "cats_time_to_first_token_seconds", "Arrival to first token", LATENCY_BUCKETS
        )
        self.itl = hist("cats_inter_token_latency_seconds", "Between tokens", LATENCY_BUCKETS)
        self.e2e = hist(
            "cats_e2e_request_latency_seconds", "Arrival to last token", LATENCY_BUCKETS
        )
        self.queue = hist(
            "cats_request_queue_time_seconds", "Time waiting for a slot", LATENCY_BUCKETS
        )
        self.prefill = hist(
            "cats_request_prefill_time_seconds", "Prompt processing time", LATENCY_BUCKETS
        )
        self.decode = hist(
            "cats_request_decode_time_seconds", "First to last token", LATENCY_BUCKETS
        )
        self.sparsity = hist(
            "cats_request_mlp_sparsity_ratio",
            "Realised fraction of inactive MLP neurons per request (mean over layers and steps)",
            RATIO_BUCKETS,
        )
        self.prompt_tokens_hist = hist("cats_request_prompt_tokens", "Prompt length", TOKEN_BUCKETS)
        self.gen_tokens_hist = hist(
            "cats_request_generation_tokens", "Generated tokens per request", TOKEN_BUCKETS
        )
        self.prompt_tokens = Counter(
            "cats_prompt_tokens", "Prompt tokens processed", lvl, registry=r
        )
        self.generation_tokens = Counter(
            "cats_generation_tokens", "Tokens generated", lvl, registry=r
        )
        self.success = Counter(
            "cats_request_success",
            "Requests finished",
            ["finished_reason", "sparsity_level"],
            registry=r,
        )
        self.failure = Counter(
            "cats_request_failure",
            "Requests that failed or were refused",
            ["reason"],
            registry=r,
        )
        self.bytes_skipped = Counter(
            "cats_mlp_weight_bytes_skipped",
            "MLP up/down weight bytes the sparse kernels did not read",
            registry=r,
        )
        self.running = Gauge("cats_num_requests_running", "Sequences in the batch", registry=r)
        self.waiting = Gauge("cats_num_requests_waiting", "Requests queued", registry=r)
        self.layer_sparsity = Gauge(
            "cats_layer_mlp_sparsity_ratio",
            "Realised MLP sparsity per layer, last decode step",
            ["layer"],
            registry=r,
        )
        self.union_sparsity = Gauge(
            "cats_batch_union_sparsity_ratio",
            "Fraction of neurons inactive for every sequence of the batch, last decode step",
            registry=r,
        )
        self.model_info = Gauge(
            "cats_model_info",
            "The served model (value 1)",
            ["model", "dtype", "device", "sparsity_levels"],
            registry=r,
        )

    def set_model_info(self, model: str, dtype: str, device: str, levels: list[float]) -> None:
        self.model_info.labels(
            model=model,
            dtype=dtype,
            device=device,
            sparsity_levels=",".join(level_label(lv) for lv in levels),
        ).set(1)

    def observe_result(self, result: RequestResult) -> None:
        level = level_label(result.sparsity_level)
        if result.finish_reason == "error":
            self.failure.labels(reason="engine_error").inc()
        else:
            self.success.labels(finished_reason=result.finish_reason, sparsity_level=level).inc()
        self.queue.labels(level).observe(result.queue_time)
        self.prefill.labels(level).observe(result.prefill_time)
        self.e2e.labels(level).observe(result.e2e_latency)
        self.prompt_tokens.labels(level).inc(result.prompt_tokens)
        self.prompt_tokens_hist.labels(level).observe(result.prompt_tokens)
        self.generation_tokens.labels(level).inc(result.generation_tokens)
        self.gen_tokens_hist.labels(level).observe(result.generation_tokens)
        if result.time_to_first_token is not None:
            self.ttft.labels(level).observe(result.time_to_first_token)
        for gap in result.inter_token_latencies:
            self.itl.labels(level).observe(gap)
        if result.token_times:
            self.decode.labels(level).observe(result.decode_time)
        if result.mlp_sparsity is not None:
            self.sparsity.labels(level).observe(result.mlp_sparsity)

    def observe_step(self, stats: StepStats) -> None:
        self.union_sparsity.set(stats.union_sparsity)
        self.bytes_skipped.inc(stats.weight_bytes_skipped)
        for layer, value in enumerate(stats.layer_sparsity):
            self.layer_sparsity.labels(layer=str(layer)).set(value)

    def observe_refusal(self, reason: str) -> None:
        self.failure.labels(reason=reason).inc()
