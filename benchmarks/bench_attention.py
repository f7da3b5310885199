"""Benchmark of decode attention over a static KV cache (CUDA only; never run by pytest).

    python benchmarks/bench_attention.py [--target-programs 264 1024] [--out PATH]

For each shape (query heads, KV heads, head dim), batch, cache length S and context length
(every row at the same position): the PyTorch path the server used before the Triton kernel
(`decode_attention_reference` in the cache's dtype: matmuls and a masked softmax over all S
cache positions) against `decode_attention`, which reads each row's own positions only, once
per split plan (`--target-programs`: how many programs the split plan aims for). Checks each
against the float32 reference first; times with CUDA graphs (median), as a captured decode
step runs it. Prints a table and writes JSON.
"""

import argparse
import json
import platform
from pathlib import Path

import torch
import triton
import triton.testing

from cats_serve.kernels import attention, decode_attention, decode_attention_reference

SHAPES = {"llama2-7b": (32, 32, 128), "smollm2-135m": (9, 3, 64), "llama3-8b": (32, 8, 128)}


def bench_us(fn) -> float:
    return 1000.0 * triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def run_case(shape: str, batch: int, seq: int, context: int, targets: list[int]) -> dict:
    nh, nkv, d = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(batch * seq + context)
    dt = torch.bfloat16
    k = torch.randn(batch, nkv, seq, d, device="cuda", generator=g).to(dt)
    v = torch.randn(batch, nkv, seq, d, device="cuda", generator=g).to(dt)
    q = torch.randn(batch, nh, d, device="cuda", generator=g).to(dt)
    positions = torch.full((batch,), context - 1, device="cuda")
    ref = decode_attention_reference(q, k, v, positions, seq)
    row = {"shape": shape, "batch": batch, "cache": seq, "context": context}
    row["torch_us"] = bench_us(lambda: decode_attention_reference(q, k, v, positions, seq, dt))
    row["kernel"] = {}
    default = attention.TARGET_PROGRAMS
    for target in targets:
        attention.TARGET_PROGRAMS = target
        out = decode_attention(q, k, v, positions, seq)
        err = float((out.float() - ref.float()).abs().max())
        if err > 3e-2:
            raise AssertionError(f"{shape} B={batch} S={seq} ctx={context}: max error {err}")
        splits = attention.split_plan(batch, nkv, seq)
        us = bench_us(lambda: decode_attention(q, k, v, positions, seq))
        row["kernel"][str(target)] = {"us": us, "splits": splits, "max_abs_err": err}
    attention.TARGET_PROGRAMS = default
    # bytes the kernel must read: K and V of `context` positions per row and KV head
    row["kv_bytes"] = 2 * batch * nkv * context * d * 2
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--caches", nargs="+", type=int, default=[256, 2048, 8192])
    parser.add_argument("--contexts", nargs="+", type=int, default=[64, 1024, 8192])
    parser.add_argument(
        "--target-programs", nargs="+", type=int, default=[attention.TARGET_PROGRAMS]
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_attention.json"))
    args = parser.parse_args()
    rows = [
        run_case(shape, b, seq, ctx, args.target_programs)
        for shape in args.shapes
        for b in args.batches
        for seq in args.caches
        for ctx in args.contexts
        if ctx <= seq
    ]
    targets = [str(t) for t in args.target_programs]
    print(f"\n{'shape':<13} {'B':>3} {'cache':>6} {'ctx':>6} {'torch us':>9} "
          + " ".join(f"{'tp=' + t + ' us':>11} {'TB/s':>5}" for t in targets))  # fmt: skip
    for r in rows:
        cells = " ".join(
            f"{r['kernel'][t]['us']:>11.1f} {r['kv_bytes'] / r['kernel'][t]['us'] / 1e6:>5.2f}"
            for t in targets
        )
        print(f"{r['shape']:<13} {r['batch']:>3} {r['cache']:>6} {r['context']:>6} "
              f"{r['torch_us']:>9.1f} {cells}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "device": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "triton": triton.__version__,
                "python": platform.python_version(),
                "args": {k: str(v) for k, v in vars(args).items()},
                "rows": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
