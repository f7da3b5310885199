"""CPU decode MLP: the gather path (`cats_mlp_gather`) against the dense torch path.

What `kernels/dispatch.py`'s CPU rule is based on. Random fp32 weights of a model's MLP shape,
as many layers as it takes to exceed the CPU caches (each call reads a different layer, as a
decode step does); per-row thresholds at the target sparsity, from the rows' own activations,
so the batch union comes out as it would. Median of timed passes over all layers, the two
paths alternating. Then whole decode steps of the default model (real weights, its shipped
thresholds, a filled KV cache) with the MLP forced dense or sparse: tokens/s.

    python benchmarks/bench_mlp_cpu.py --out benchmarks/results/bench_mlp_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cats_serve.calibration.shipped import default_thresholds_files
from cats_serve.kernels import cats_mlp_decode
from cats_serve.server.model.conversion_cache import default_cache_dir
from cats_serve.server.model.kv_cache import KVCache
from cats_serve.server.model.loader import load_levels, load_pretrained
from cats_serve.server.model.sources import DEFAULT_MODEL

SHAPES = {"smollm2-135m": (576, 1536, 30), "llama2-7b": (4096, 11008, 2)}  # hidden, inter, layers


def layer_weights(hidden: int, inter: int, layers: int, gen: torch.Generator):
    def w(fan_in: int) -> torch.Tensor:
        return torch.randn(inter, hidden, generator=gen) / fan_in**0.5

    return [(w(hidden), w(hidden), w(inter)) for _ in range(layers)]


def time_paths(weights, x, thresholds, repeats: int) -> dict[str, float]:
    """Median seconds per layer of each path; the paths alternate pass by pass, so a burst of
    load from elsewhere on the machine hits both alike."""
    counts = torch.zeros(x.shape[0] + 1, dtype=torch.int32)
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    for rep in range(repeats + 1):  # the first round warms up
        for path in times:
            start = time.perf_counter()
            for (wg, wu, wd), t in zip(weights, thresholds, strict=True):
                cats_mlp_decode(x, wg, wu, wd, t, active_count=counts, path=path)
            if rep:
                times[path].append((time.perf_counter() - start) / len(weights))
    return {path: statistics.median(v) for path, v in times.items()}


def decode_steps(batch_sizes: list[int], repeats: int, dtype: torch.dtype) -> list[dict]:
    """tok/s of whole decode steps of the default model, MLP path forced, per shipped level."""
    name = str(dtype).removeprefix("torch.")
    loaded = load_pretrained(DEFAULT_MODEL, cache_dir=default_cache_dir(), device="cpu", dtype=name)
    model, c = loaded.model, loaded.model.config
    levels = {0.0: [[0.0] * c.num_layers] * 2}  # [2][L]: t_up, t_down per layer
    for level, f in load_levels(loaded, default_thresholds_files()).items():
        levels[level] = f.threshold_pairs()
        model.set_neuron_scale(f.neuron_scale)  # the shipped files share one set, as served
    gen = torch.Generator().manual_seed(1)
    rows = []
    for batch in batch_sizes:
        cache = KVCache.allocate(c, batch, 256, dtype=dtype, device=torch.device("cpu"))
        prompts = [torch.randint(c.vocab_size, (64,), generator=gen) for _ in range(batch)]
        for level, values in levels.items():
            t = torch.tensor(values, dtype=torch.float32)
            model.prefill(prompts, list(range(batch)), t.expand(batch, -1, -1), cache)
            tokens = torch.randint(c.vocab_size, (batch,), generator=gen)
            positions = torch.full((batch,), 64)
            counts = torch.zeros(2, c.num_layers, batch + 1, dtype=torch.int32)
            thresholds = t[:, :, None].expand(-1, -1, batch).contiguous()
            times: dict[str, list[float]] = {"dense": [], "sparse": []}
            for rep in range(repeats + 1):
                for path in times:
                    start = time.perf_counter()
                    model.decode(tokens, positions, thresholds, cache, counts, kv_len=65,
                                 mlp_path=path)  # fmt: skip
                    if rep:
                        times[path].append(time.perf_counter() - start)
            dense, sparse = (statistics.median(times[p]) for p in ("dense", "sparse"))
            row = dict(dtype=str(dtype).removeprefix("torch."), batch=batch, level=level,
                       dense_tok_s=batch / dense,
                       sparse_tok_s=batch / sparse, speedup=dense / sparse)  # fmt: skip
            rows.append(row)
            print(
                f"default model {row['dtype']} B={batch} level {level:.1f}: "
                f"dense {row['dense_tok_s']:.1f} "
                f"tok/s, sparse {row['sparse_tok_s']:.1f} tok/s ({row['speedup']:.2f}x)"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--step-batch-sizes", nargs="*", type=int, default=[1, 4],
                        help="whole decode steps of the default model (none: skip)")  # fmt: skip
    parser.add_argument("--step-dtypes", nargs="+", default=["float32"],
                        choices=["float32", "bfloat16"])  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_mlp_cpu.json"))
    args = parser.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)  # plain CPU: torch paths only
    load_at_start = os.getloadavg()[0]
    gen = torch.Generator().manual_seed(0)
    rows = []
    head = f"{'shape':<13} {'B':>2} {'target':>6} {'union':>6} {'dense ms':>9} {'gather ms':>9}"
    print(head + f" {'x':>5}")
    with torch.inference_mode():
        for name in args.shapes:
            hidden, inter, layers = SHAPES[name]
            weights = layer_weights(hidden, inter, layers, gen)
            for batch in args.batch_sizes:
                x = torch.randn(batch, hidden, generator=gen)
                for s in args.sparsities:
                    thresholds, union = [], []
                    for wg, _, _ in weights:
                        g = F.silu(x @ wg.t()).abs()
                        t = torch.quantile(g, s, dim=1).float()
                        thresholds.append(t)
                        union.append(1 - float((g > t[:, None]).any(0).float().mean()))
                    timed = time_paths(weights, x, thresholds, args.repeats)
                    dense, gather = timed["dense"], timed["sparse"]
                    row = dict(shape=name, batch=batch, target=s, union=statistics.mean(union),
                               dense_ms=1e3 * dense, gather_ms=1e3 * gather,
                               speedup=dense / gather)  # fmt: skip
                    rows.append(row)
                    print(
                        f"{name:<13} {batch:>2} {s:>6.2f} {row['union']:>6.3f} "
                        f"{row['dense_ms']:>9.3f} {row['gather_ms']:>9.3f} {row['speedup']:>5.2f}"
                    )
    steps = [
        row
        for dtype in args.step_dtypes
        for row in decode_steps(args.step_batch_sizes, args.repeats, getattr(torch, dtype))
    ]
    report = {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1m_at_start": load_at_start,
        "load_average_1m_at_end": os.getloadavg()[0],
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
        "default_model_decode_steps": steps,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
