"""Where a decode step's time goes: kernels of one step, grouped, on a random 7B-shaped model.

Runs the decode step eagerly (compiled decode blocks, no CUDA graph) under torch.profiler and
prints each kernel family's count and device time per step, next to the step's weight bytes
over the measured device time. Writes the table as JSON.

    python benchmarks/profile_decode.py --shape llama2-7b --out results/profile_decode.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from bench_decode import SHAPES, build_model, calibrate
from torch.profiler import ProfilerActivity, profile

from cats_serve.server.model.kv_cache import KVCache

STEPS = 5


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama2-7b", choices=list(SHAPES))
    parser.add_argument("--kv-len", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/profile_decode.json"))
    args = parser.parse_args()
    model = build_model(SHAPES[args.shape], "cuda", 0)
    levels = calibrate(model, [0.5], 0)
    model.compile_decode_blocks()
    cfg = model.config
    cache = KVCache.allocate(cfg, 1, args.kv_len, dtype=model.dtype, device=model.device)
    tokens = torch.zeros(1, dtype=torch.long, device="cuda")
    positions = torch.full((1,), args.kv_len // 2, dtype=torch.long, device="cuda")
    counts = torch.zeros(cfg.num_layers, 2, dtype=torch.int32, device="cuda")
    report = {}
    for name, path, thr in [
        ("dense", "dense", torch.zeros(cfg.num_layers, 1, device="cuda")),
        ("cats-0.5", "sparse", torch.tensor(levels[0.5], device="cuda")[:, None]),
    ]:

        def step(path=path, thr=thr):
            return model.decode(
                tokens, positions, thr, cache, counts, kv_len=args.kv_len, mlp_path=path
            )

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(STEPS):
                step()
            torch.cuda.synchronize()
        groups: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        for evt in prof.key_averages():
            if evt.device_time_total <= 0:
                continue
            key = evt.key[:60]
            groups[key][0] += evt.count / STEPS
            groups[key][1] += evt.device_time_total / STEPS
        rows = sorted(groups.items(), key=lambda kv: -kv[1][1])
        total_us = sum(t for _, (_, t) in rows)
        launches = sum(c for _, (c, _) in rows)
        report[name] = {
            "kernels_per_step": launches,
            "device_us_per_step": total_us,
            "top": [{"kernel": k, "count": c, "us": t} for k, (c, t) in rows[:25]],
        }
        print(f"\n{name}: {launches:.0f} kernels, {total_us:.0f} us of device time per step")
        for k, (c, t) in rows[:25]:
            print(f"  {t:9.1f} us {c:6.0f}x  {k}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), **report}, indent=2))


if __name__ == "__main__":
    main()
