"""Whole-model decode throughput of our engine on a GPU: dense against CATS levels.

Random bf16 weights of a real model's shape (Llama-2-7B, Mistral-7B, SmolLM2-135M), thresholds
calibrated on them from synthetic token sequences, requests driven through the real Engine
(prefill, CUDA-graph decode steps, sampling, detokenization of a stand-in tokenizer). Reports
batch-1 tokens/s and throughput at several batch sizes, realised and union sparsity, the MLP path
the dispatcher chose, and graph-replay time per step (the device-only part; at batch 1 the
median step minus it is the host's share, `host_ms_per_step`), after a
correctness check of the graphed decode against the eager reference path. tok/s = batch /
median time between consecutive tokens of a request. `--criterion up_rms` gives every layer
random per-neuron weights (`random_neuron_scale`) before calibrating, as the shipped files of
the default model do; `--serial-steps` reads each step before launching the next (the engine
pipelines them on a GPU).

    python benchmarks/bench_decode.py --shapes llama2-7b --out benchmarks/results/bench_decode.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import threading
import time
import uuid
from pathlib import Path

import torch
import torch.nn.functional as F
from random_checkpoint import SHAPES, random_neuron_scale, random_state

from cats_serve.kernels.int8 import Int8Matrix, linear
from cats_serve.server.engine.engine import Engine
from cats_serve.server.engine.sampling import SamplingParams
from cats_serve.server.engine.types import GenerationRequest, RequestResult
from cats_serve.server.model.blocks import decode_output_block, decode_qkv_block
from cats_serve.server.model.config import ModelConfig
from cats_serve.server.model.decoder import LlamaModel


class StandInTokenizer:
    """Random weights have no vocabulary: a token decodes to a short word of its id."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" t{i}" for i in ids)


def build_model(shape: dict, device: str, seed: int, quantize: str = "none") -> LlamaModel:
    s = shape
    head_dim = s["hidden"] // s["heads"]
    cfg = ModelConfig(
        model_type="llama", vocab_size=s["vocab"], hidden_size=s["hidden"],
        intermediate_size=s["inter"], num_layers=s["layers"], num_heads=s["heads"],
        num_kv_heads=s["kv"], head_dim=head_dim, rms_norm_eps=1e-5,
        tie_word_embeddings=s["tie"], attention_bias=False, max_position_embeddings=4096,
    )  # fmt: skip
    state = random_state(shape, device, seed)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return LlamaModel(
        cfg, state, inv_freq, 1.0, dtype=torch.bfloat16, device=device, quantize=quantize
    )


@torch.inference_mode()
def calibrate(
    model: LlamaModel, levels: list[float], seed: int, split: float = 0.0
) -> dict[float, list[float] | list[list[float]]]:
    """Per-layer thresholds: the level-quantile of the CATS score |SiLU(gate)| (times the
    layer's neuron_scale where set) over synthetic token sequences. With a split d > 0, two
    thresholds per layer at row sparsity r (what the level names): t_up drops r - d of the
    neurons, t_down (on |a|, a = SiLU(gate) * up, 0 where t_up drops it) r + d of the W_down
    rows, as `cats-calibrate --two-threshold` does."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    tokens = torch.randint(model.config.vocab_size, (4, 128), device=model.device, generator=gen)
    samples: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(layer: int, h: torch.Tensor) -> None:
        w = model.layers[layer]
        g = F.silu(linear(h, w.w_gate)).float()
        score = g.abs() if w.neuron_scale is None else g.abs() * w.neuron_scale
        a = (g * linear(h, w.w_up).float()).abs()
        pick = torch.randint(g.numel(), (1 << 20,), device=g.device, generator=gen)
        samples[layer] = score.flatten()[pick], a.flatten()[pick]

    zeros = torch.zeros(model.config.num_layers, device=model.device)
    model.score(tokens, torch.ones_like(tokens, dtype=torch.bool), zeros, on_mlp_input=hook)

    def pair(layer: int, level: float) -> list[float]:
        score, a = samples[layer]
        t_up = float(torch.quantile(score, level - split)) if level > split else 0.0
        kept_a = torch.where(score > t_up, a, 0.0)
        return [t_up, float(torch.quantile(kept_a, min(level + split, 1.0)))]

    layers = range(model.config.num_layers)
    if split == 0:
        return {lv: [float(torch.quantile(samples[n][0], lv)) for n in layers] for lv in levels}
    return {
        lv: [list(t) for t in zip(*(pair(n, lv) for n in layers), strict=True)] for lv in levels
    }


@torch.inference_mode()
def check_graphs(engine: Engine, levels: dict[float, list[float]], seed: int) -> dict:
    """Correctness of the graphed decode step, for each level and the path it runs on.

    `graph_vs_eager` compares the replayed graph with the same step run eagerly and uncompiled:
    bf16 rounding only (torch.compile keeps some intermediates in fp32), 1.6% over 32 random
    layers dense on the H200, and more when sparse, since a rounding difference can move a
    neuron across its threshold (6% at level 0.5). `eager_vs_score` compares it with the
    reference forward (model.score, dense matmuls with the mask applied): in bf16 a few neurons
    near the threshold can flip between the two, and a 32-layer random model amplifies that, so
    it is reported, and only gross disagreement fails.
    """
    model, runner = engine.model, engine.runner
    gen = torch.Generator(device=model.device).manual_seed(seed)
    prompt = torch.randint(model.config.vocab_size, (24,), device=model.device, generator=gen)
    real = torch.ones(1, len(prompt), dtype=torch.bool, device=model.device)
    n_layers = model.config.num_layers
    report = {}
    for level, path in [(0.0, "dense"), *[(lv, "sparse") for lv in levels]]:
        thresholds = engine.levels[level]
        model.prefill([prompt[:-1]], [0], thresholds[None], runner.cache)
        runner.tokens[0] = prompt[-1]
        runner.positions[0] = len(prompt) - 1
        runner.thresholds[:, :, 0] = thresholds
        graphed = runner.step(1, path, kv_len=len(prompt))[0][0].float().clone()
        compiled = model.decode_qkv, model.decode_output
        model.decode_qkv, model.decode_output = decode_qkv_block, decode_output_block
        counts = torch.zeros(n_layers, 2, dtype=torch.int32, device=model.device)
        eager = model.decode(
            runner.tokens[:1], runner.positions[:1],
            runner.thresholds[:, :, :1] if runner.two_threshold else runner.thresholds[0, :, :1],
            runner.cache,
            counts, kv_len=runner.cache.max_seq_len, mlp_path=path,
        )[0].float()  # fmt: skip
        model.decode_qkv, model.decode_output = compiled
        want = model.score(prompt[None], real, thresholds)[0, -1].float()
        runner.thresholds[:, :, 0] = torch.inf
        key = f"{level:g}/{path}"
        report[key] = {
            "graph_vs_eager": float((graphed - eager).norm() / eager.norm()),
            "eager_vs_score": float((eager - want).norm() / want.norm()),
            "same_argmax": bool(eager.argmax() == want.argmax()),
        }
        if not (report[key]["graph_vs_eager"] < 0.15 and report[key]["eager_vs_score"] < 0.25):
            raise AssertionError(f"decode check failed at {key}: {report[key]}")
    return report


def replay_ms(engine: Engine, bucket: int, path: str, thresholds: torch.Tensor) -> float:
    runner = engine.runner
    runner.thresholds[:, :, :bucket] = thresholds[:, :, None]
    runner.positions[:bucket] = 32
    for _ in range(5):
        runner.step(bucket, path, kv_len=runner.cache.max_seq_len)
    torch.cuda.synchronize()
    times = []
    for _ in range(30):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        runner.step(bucket, path, kv_len=runner.cache.max_seq_len)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    runner.thresholds[:, :, :bucket] = torch.inf
    return statistics.median(times)


def run_batch(engine: Engine, batch: int, level: float, max_tokens: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    steps: list = []
    observer = steps.append
    engine.step_observers.append(observer)
    done = threading.Semaphore(0)
    results: list[RequestResult] = []

    def sink(event):
        if isinstance(event, RequestResult):
            results.append(event)
            done.release()

    for _ in range(batch):
        prompt = torch.randint(engine.model.config.vocab_size, (32,), generator=gen).tolist()
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        engine.submit(GenerationRequest(uuid.uuid4().hex, prompt, params, level), sink)
    for _ in range(batch):
        done.acquire()
    engine.step_observers.remove(observer)
    full = [s for s in steps if s.batch_size == batch]
    # the step period as the requests saw it: time between consecutive tokens of a request
    step_s = statistics.median(
        b - a for r in results for a, b in itertools.pairwise(r.token_times[1:])
    )
    paths = {p: sum(s.mlp_path == p for s in full) for p in ("sparse", "dense")}
    one = results[0]
    return {
        "batch": batch,
        "level": level,
        "steps_at_full_batch": len(full),
        "step_ms_median": step_s * 1e3,
        "tokens_per_s": batch / step_s,
        "request_decode_tokens_per_s": (one.generation_tokens - 1) / one.decode_time,
        "realised_sparsity": statistics.mean(r.mlp_sparsity for r in results),
        "union_sparsity": statistics.mean(s.union_sparsity for s in full),
        "paths": paths,
    }


def bench_shape(name: str, args) -> dict:
    shape = SHAPES[name]
    model = build_model(shape, "cuda", args.seed, args.quantize)
    if args.criterion == "up_rms":
        model.set_neuron_scale(
            [
                random_neuron_scale(shape["inter"], "cuda", args.seed + 1 + i).tolist()
                for i in range(shape["layers"])
            ]
        )
    levels = calibrate(model, args.levels, args.seed, args.split)
    t0 = time.perf_counter()
    engine = Engine(
        model, StandInTokenizer(), levels=levels, max_batch=max(args.batch_sizes),
        max_seq_len=args.max_seq_len, max_queue=256, eos_token_ids=set(), use_cuda_graphs=True,
        max_prefill_tokens=4096, pipeline=not args.serial_steps,
    )  # fmt: skip
    capture_s = time.perf_counter() - t0
    check = check_graphs(engine, levels, args.seed)
    engine.start()
    rows = []
    for batch in args.batch_sizes:
        for level in [0.0, *args.levels]:
            rows.append(run_batch(engine, batch, level, args.max_tokens, args.seed))
    replay = {
        f"{lv:g}/{path}": replay_ms(engine, 1, path, engine.levels[lv])
        for lv, path in [(0.0, "dense"), *[(lv, "sparse") for lv in args.levels]]
    }
    engine.shutdown(timeout=5)
    for row in rows:  # batch 1: what the host adds to the device's step (issue 24)
        key = "0/dense" if row["level"] == 0.0 else f"{row['level']:g}/sparse"
        if row["batch"] == 1 and row["paths"].get(key.split("/")[1]):
            row["host_ms_per_step"] = row["step_ms_median"] - replay[key]
    weights = sum(
        t.numel() * t.element_size()
        for w in _weights(model)
        for t in ((w.q, w.scale) if isinstance(w, Int8Matrix) else (w,))
    )
    del engine, model
    torch._dynamo.reset()  # the next shape compiles the decode blocks afresh
    torch.cuda.empty_cache()
    return {
        "shape": name, **shape, "criterion": args.criterion, "quantize": args.quantize,
        "split": args.split,
        "weight_bytes": weights,
        "compile_and_capture_s": capture_s,
        "thresholds": {f"{k:g}": v for k, v in levels.items()}, "graph_check_rel_err": check,
        "graph_replay_ms_batch1": replay, "rows": rows,
    }  # fmt: skip


def _weights(model: LlamaModel):
    yield model.embed
    if model.lm_head is not model.embed:
        yield model.lm_head
    for layer in model.layers:
        yield from (layer.wqkv, layer.wo, layer.w_gate, layer.w_up, layer.w_down_t)


def print_table(results: list[dict]) -> None:
    print(f"\n{'shape':<13} {'B':>3} {'level':>5} {'tok/s':>9} {'x dense':>8} "
          f"{'real.sp':>7} {'union':>6} {'path':>12} {'host ms':>7}")  # fmt: skip
    for res in results:
        dense = {r["batch"]: r["tokens_per_s"] for r in res["rows"] if r["level"] == 0.0}
        for r in res["rows"]:
            path = "/".join(f"{k[0]}{v}" for k, v in r["paths"].items() if v)
            host = r.get("host_ms_per_step", float("nan"))
            print(
                f"{res['shape']:<13} {r['batch']:>3} {r['level']:>5.2f} {r['tokens_per_s']:>9.1f} "
                f"{r['tokens_per_s'] / dense[r['batch']]:>8.3f} {r['realised_sparsity']:>7.3f} "
                f"{r['union_sparsity']:>6.3f} {path:>12} {host:>7.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--levels", nargs="+", type=float, default=[0.5, 0.7])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--criterion",
        choices=["silu", "up_rms"],
        default="silu",
        help="CATS criterion: silu (the paper's), or up_rms with random per-neuron weights",
    )
    parser.add_argument(
        "--serial-steps",
        action="store_true",
        help="read each step before launching the next (the engine pipelines them on a GPU)",
    )
    parser.add_argument(
        "--quantize", choices=["none", "int8"], default="none",
        help="int8: int8 weights for every linear layer (kernels/int8.py)",
    )  # fmt: skip
    parser.add_argument(
        "--split", type=float, default=0.0,
        help="two-threshold levels: t_up drops level - split of the neurons, t_down level + "
        "split of the W_down rows (0: one threshold)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_decode.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode needs a CUDA GPU")
    import triton

    results = []
    for name in args.shapes:
        results.append(bench_shape(name, args))
        print_table(results[-1:])
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print_table(results)


if __name__ == "__main__":
    main()
