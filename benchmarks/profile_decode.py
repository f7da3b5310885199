"""Where a decode step's time goes: kernels of one step, on a random 7B-shaped model.

For dense and each CATS level (one threshold, or two with --split; --quantize int8 for int8
weights) and each KV length, runs the batch-1 decode step eagerly (compiled decode blocks, no
CUDA graph) under torch.profiler and reports per kernel: launches per step, device time per
step, the bytes it reads where they are known (weights of the matrix products, from the
shapes the profiler records; the CATS kernels' rows, from the step's own neuron counts; the
attention kernel's KV cache) and so its TB/s. Beside them: the sum of kernel time, the same
step replayed as a CUDA graph (replay minus kernel sum = the gaps between kernels), and the
step's byte floor (the weight rows it needs plus the KV cache it reads) over the replay time.

    python benchmarks/profile_decode.py --shape llama2-7b --kv-len 256 2048 \\
        --out benchmarks/results/profile_decode.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
from collections import defaultdict
from pathlib import Path

import torch
from bench_decode import SHAPES, build_model, calibrate
from torch.profiler import ProfilerActivity, profile

from cats_serve.kernels.int8 import Int8Matrix
from cats_serve.server.model.kv_cache import KVCache

STEPS = 5
ITEMSIZE = {"c10::BFloat16": 2, "c10::Half": 2, "float": 4, "signed char": 1}


def nbytes(w) -> int:
    parts = (w.q, w.scale) if isinstance(w, Int8Matrix) else (w,)
    return sum(t.numel() * t.element_size() for t in parts)


def row_bytes(w) -> float:
    """Bytes of one [I, H] matrix's row (int8: with its share of the scales)."""
    return nbytes(w) / w.shape[0]


def matmul_weight_bytes(evt) -> int:
    """Bytes of the largest 2-D operand of a profiled aten op (the weight, at small batch)."""
    sizes = [
        math.prod(shape) * ITEMSIZE.get(dtype, 0)
        for shape, dtype in zip(
            evt.input_shapes, getattr(evt, "input_dtypes", None) or [], strict=False
        )
        if isinstance(shape, list) and len(shape) == 2
    ]
    return max(sizes, default=0)


def kernel_bytes(prof, model, counts: torch.Tensor, kv_bytes: int) -> dict[str, float]:
    """Bytes per step read by each kernel family, where known."""
    out: dict[str, float] = defaultdict(float)
    for evt in prof.events():
        if evt.kernels and evt.name.startswith("aten::"):
            out[evt.kernels[0].name[:60]] += matmul_weight_bytes(evt) / STEPS
    layer = model.layers[0]
    union_up, union_down = (float(counts[k, :, -1].sum()) for k in (0, 1))
    out["_cats_gate_kernel"] = nbytes(layer.w_gate) * len(model.layers)
    up = union_up * row_bytes(layer.w_up)
    down = union_down * row_bytes(layer.w_down_t)
    out["_cats_up_down_kernel"] = up + down
    out["_cats_up_kernel"] = up
    out["_cats_down_kernel"] = down
    out["_decode_attention_split_kernel"] = kv_bytes
    return out


def floor_bytes(model, counts: torch.Tensor, sparse: bool, kv_bytes: int) -> float:
    """Weight bytes the step needs (every matrix in full, the MLP's up and down rows of the
    union only when sparse; the LM head) plus the KV cache it reads."""
    total = nbytes(model.lm_head) + kv_bytes
    for i, layer in enumerate(model.layers):
        total += nbytes(layer.wqkv) + nbytes(layer.wo) + nbytes(layer.w_gate)
        if sparse:
            total += float(counts[0, i, -1]) * row_bytes(layer.w_up)
            total += float(counts[1, i, -1]) * row_bytes(layer.w_down_t)
        else:
            total += nbytes(layer.w_up) + nbytes(layer.w_down_t)
    return total


def replay_us(step) -> float:
    """Median device time of the step replayed as one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(5):
        graph.replay()
    times = []
    for _ in range(30):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def annotation(key: str) -> bool:
    """A profiler range recorded around kernels (torch.compile's "## ... ##"), not a kernel."""
    return key.startswith("## ")


def profile_step(model, name: str, path: str, thr: torch.Tensor, kv_len: int) -> dict:
    cfg = model.config
    cache = KVCache.allocate(cfg, 1, kv_len, dtype=model.dtype, device=model.device)
    tokens = torch.zeros(1, dtype=torch.long, device="cuda")
    position = kv_len // 2
    positions = torch.full((1,), position, dtype=torch.long, device="cuda")
    counts = torch.zeros(2, cfg.num_layers, 2, dtype=torch.int32, device="cuda")

    def step():
        counts.zero_()
        return model.decode(tokens, positions, thr, cache, counts, kv_len=kv_len, mlp_path=path)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as p:
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
    step_counts = counts.cpu()
    kv_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * (position + 1) * cfg.head_dim
    kv_bytes *= cache.k[0].element_size()
    known = kernel_bytes(p, model, step_counts, kv_bytes)
    groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for evt in p.key_averages():
        # "## Call CompiledFxGraph ... ##" ranges are torch.compile's annotations around the
        # kernels they contain, not kernels: counting them would count those kernels twice.
        if annotation(evt.key):
            continue
        if evt.device_time_total > 0 and evt.device_type.name == "CUDA":
            groups[evt.key[:60]][0] += evt.count / STEPS
            groups[evt.key[:60]][1] += evt.device_time_total / STEPS
    rows = []
    for kernel, (count, us) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        b = known.get(kernel)
        rows.append(
            dict(kernel=kernel, count=count, us=us, bytes=b, tb_s=b / us / 1e6 if b else None)
        )
    kernel_us = sum(r["us"] for r in rows)
    replay = replay_us(step)
    floor = floor_bytes(model, step_counts, path == "sparse", kv_bytes)
    return dict(
        config=name, kv_len=kv_len, path=path, kernels_per_step=sum(r["count"] for r in rows),
        kernel_us=kernel_us, graph_replay_us=replay, gap_us=replay - kernel_us,
        floor_bytes=floor, floor_tb_s=floor / replay / 1e6,
        floor_us_at_4_tb_s=floor / 4e6, rows=rows,
    )  # fmt: skip


def print_table(results: list[dict]) -> None:
    print(f"\n{'config':<14} {'kv':>5} {'kernels':>7} {'kernel us':>9} {'replay us':>9} "
          f"{'gap us':>7} {'floor MB':>8} {'floor TB/s':>10}")  # fmt: skip
    for r in results:
        print(
            f"{r['config']:<14} {r['kv_len']:>5} {r['kernels_per_step']:>7.0f} "
            f"{r['kernel_us']:>9.0f} {r['graph_replay_us']:>9.0f} {r['gap_us']:>7.0f} "
            f"{r['floor_bytes'] / 1e6:>8.0f} {r['floor_tb_s']:>10.2f}"
        )


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama2-7b", choices=list(SHAPES))
    parser.add_argument("--kv-len", nargs="+", type=int, default=[256])
    parser.add_argument("--levels", nargs="+", type=float, default=[0.5])
    parser.add_argument("--split", type=float, default=0.0, help="as bench_decode.py's")
    parser.add_argument("--quantize", choices=["none", "int8"], default="none")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/profile_decode.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_decode needs a CUDA GPU")
    import triton

    model = build_model(SHAPES[args.shape], "cuda", 0, args.quantize)
    levels = calibrate(model, args.levels, 0, args.split)
    model.compile_decode_blocks()
    n_layers = model.config.num_layers
    configs = [("dense", "dense", torch.zeros(n_layers, 1, device="cuda"))]
    for level, values in levels.items():
        label = f"cats-{level:g}" + (f"-split{args.split:g}" if args.split else "")
        configs.append((label, "sparse", torch.tensor(values, device="cuda")[..., None]))
    results = [
        profile_step(model, name, path, thr, kv_len)
        for kv_len in args.kv_len
        for name, path, thr in configs
    ]
    for r in results:
        print(f"\n{r['config']} kv {r['kv_len']}: kernel, launches, us, bytes, TB/s")
        for row in r["rows"][:16]:
            b = f"{row['bytes'] / 1e6:8.1f} MB {row['tb_s']:5.2f}" if row["bytes"] else ""
            print(f"  {row['kernel']:<60} {row['count']:5.0f} {row['us']:8.1f} {b}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        python=platform.python_version(), quantize=args.quantize, split=args.split,
        shape=args.shape, batch=1, results=results,
    )  # fmt: skip
    args.out.write_text(json.dumps(report, indent=1))
    print_table(results)


if __name__ == "__main__":
    main()
