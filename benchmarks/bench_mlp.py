"""Benchmark of the CATS MLP decode kernels against a dense F.linear chain (CUDA only).

Never run by pytest. Usage:
    python benchmarks/bench_mlp.py [--out benchmarks/results/bench_mlp.json] [--sweep]

For each shape (Llama-2-7B 4096x11008, Mistral-7B 4096x14336), dtype (bf16, fp16), criterion
(--criteria: silu, the CATS paper's |SiLU(gate)|; up_rms, |SiLU(gate_i)| * s_i with random
per-neuron weights s of the spread the shipped files have), batch size and target sparsity:
thresholds are the target quantile of the criterion's score on random inputs;
the run checks the sparse and dense paths against the float32 reference, then times with CUDA
graphs (triton.testing.do_bench_cudagraph, median):
  dense_chain  F.linear(F.silu(F.linear(x, Wg)) * F.linear(x, Wu), Wd), W_down untransposed
  dense_path   cats_mlp_decode(path="dense"): cuBLAS GEMMs + fused CATS activation + counts
  sparse       cats_mlp_decode(path="sparse"): the gate kernel (with the packed list of active
               neurons), then the fused up + down kernel over that list
  dispatched   the path choose_mlp_path picks given the measured union sparsity
Bytes needed = W_gate in full + W_up rows of the union-active neurons + W_down rows of the
union-down-active ones; the byte limit speedup is dense bytes / needed bytes. --splits adds
two-threshold points: at row sparsity s (fraction of W_up and W_down rows not needed) and
split d, t_up drops s - d of the neurons and t_down (on |SiLU(gate) * up|) s + d of the
W_down rows, so every d reads the bytes of single-threshold s (d = 0). --sweep also times
the previous (v3) sparse step and fused up + down tile configurations; --sweep-pdl the
default one with programmatic dependent launch; --sweep-two the two-threshold forms (fused:
one kernel masking W_down rows; split: an up kernel and a down kernel over a packed list) and
tiles against single-threshold at equal reads. --quantize int8 runs the sparse and dense
paths on int8 weights (kernels/int8.py; quantized from the same random weights, thresholds
from the full-precision ones): bytes count one per weight, and the baseline stays the
--dtypes dense chain, so speedups are against our full-precision dense MLP.
"""

import argparse
import itertools
import json
import math
import platform
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing
from random_checkpoint import random_neuron_scale

from cats_serve.kernels import cats_mlp_decode, cats_mlp_reference, choose_mlp_path
from cats_serve.kernels.baselines.down import down_config, down_workspace, launch_down
from cats_serve.kernels.gate import compact_buffers, gate_config, launch_gate
from cats_serve.kernels.int8 import Int8Matrix, quantize_int8
from cats_serve.kernels.int8_gemv import int8_gemv_config, launch_int8_gemv
from cats_serve.kernels.mlp import _sparse_decode
from cats_serve.kernels.updown import updown_config, updown_workspace

SHAPES = {"llama2-7b": (4096, 11008), "mistral-7b": (4096, 14336)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def save(args, results: dict) -> None:
    args.out.write_text(json.dumps(results, indent=1))


def bench_us(fn, rep_ms: int) -> float:
    """Median time of ``fn`` in microseconds, replayed from a CUDA graph."""
    return 1000.0 * triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")


def make_weights(hidden: int, inter: int, dtype: torch.dtype, seed: int):
    """Random weights scaled so gate/up outputs are ~N(0, 1); W_down in both layouts."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    w_gate = (torch.randn(inter, hidden, device="cuda", generator=g) / hidden**0.5).to(dtype)
    w_up = (torch.randn(inter, hidden, device="cuda", generator=g) / hidden**0.5).to(dtype)
    w_down = (torch.randn(hidden, inter, device="cuda", generator=g) / inter**0.5).to(dtype)
    return w_gate, w_up, w_down, w_down.t().contiguous()


def calibrate(w_gate: torch.Tensor, sparsity: float, seed: int, scale=None) -> float:
    """Threshold = the ``sparsity`` quantile of |SiLU(gate(x))| (times ``scale``) over random
    inputs."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(256, w_gate.shape[1], device="cuda", generator=g).to(w_gate.dtype)
    a = F.silu(F.linear(x, w_gate).float()).abs()
    if scale is not None:
        a = a * scale
    return torch.quantile(a.flatten(), sparsity).item()


def calibrate_pair(w_gate, w_up, sparsity, split, seed, scale=None) -> tuple[float, float]:
    """(t_up, t_down) of row sparsity ``sparsity`` under split ``split`` on random inputs."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(256, w_gate.shape[1], device="cuda", generator=g).to(w_gate.dtype)
    gate = F.silu(F.linear(x, w_gate).float())
    score = gate.abs() if scale is None else gate.abs() * scale
    t_up = torch.quantile(score.flatten(), sparsity - split).item() if sparsity > split else 0.0
    if split == 0:
        return t_up, 0.0
    a = torch.where(score > t_up, (gate * F.linear(x, w_up).float()).abs(), 0.0)
    return t_up, torch.quantile(a.flatten(), sparsity + split).item()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def v3_step(x, w_gate, w_up, w_down_t, thr):
    """The previous sparse step (v3): gate + masked up in one kernel, then the split-K down
    kernel over all rows with per-column-block tickets. Kept for before/after comparisons."""
    d_cfg = down_config(x.shape[0])
    acc, tickets = down_workspace(x.shape[0], x.shape[1], w_gate.shape[0], x.device, d_cfg)
    act, flags = launch_gate(x, w_gate, w_up, thr, None, acc, tickets, gate_config(x.shape[0]))
    return launch_down(act, flags, w_down_t, x.dtype, acc, tickets, d_cfg)


def step_candidates(B):
    """(gate config, fused up + down config) pairs to time at batch size B. Fused up + down:
    (BLOCK_K, columns, stages, warps), BLOCK_H = columns / BLOCK_B; the gate variants change
    only its pipeline depth."""
    base = [
        (16, 512, 4, 4),
        (16, 512, 3, 4),
        (16, 512, 5, 4),
        (32, 256, 4, 4),
        (8, 512, 4, 4),
        (16, 256, 4, 4),
    ]
    g_cfg, out = gate_config(B), []
    bb = updown_config(B)["BLOCK_B"]
    for k, cols, ns, nw in base:
        u_cfg = dict(updown_config(B))
        u_cfg.update(BLOCK_K=k, BLOCK_H=max(32, cols // bb), NUM_STAGES=ns, num_warps=nw)
        out.append((g_cfg, u_cfg))
    for ns in (4, 5):
        out.append((dict(g_cfg, NUM_STAGES=ns), updown_config(B)))
    return out


# (name, N, K, stored transposed) of the int8 matrices of a Llama-2-7B decode step
INT8_GEMVS = [("wqkv", 12288, 4096, False), ("wo", 4096, 4096, False),
              ("gate", 11008, 4096, False), ("down", 4096, 11008, True),
              ("lm_head", 32000, 4096, False)]  # fmt: skip


def gemv_candidates(rows: int, transposed: bool) -> list[dict | None]:
    """The default tiles, a grid of FMA tiles (1 and 4 rows) and None (the tl.dot path)."""
    cands: list[dict | None] = [int8_gemv_config(rows, transposed)]
    bb = triton.next_power_of_2(rows)
    if rows in (1, 4):
        grid = ((64, 128, 256), (16, 32, 64)) if transposed else ((2, 4, 8, 16), (256, 512, 1024))
        for bn, bk, ns, nw in itertools.product(*grid, (3, 4), (4, 8)):
            if bb * bn * bk <= 16384:
                tiles = dict(BLOCK_B=bb, BLOCK_N=bn, BLOCK_K=bk, NUM_STAGES=ns, num_warps=nw)
                cands.append(dict(tiles, USE_DOT=False))
    return [*cands, None]


def run_sweep_int8(args, results):
    """Llama-2-7B shape: the int8 GEMV's tiles per matrix at 1-6 rows (FMA tiles against the
    tl.dot path) against bf16 F.linear, and the int8 sparse step's gate / up+down tiles at
    B = 1, 50%."""
    rows_out = results.setdefault("sweep_int8", [])
    x_gen = torch.Generator(device="cuda").manual_seed(3)
    for name, n, k, transposed in INT8_GEMVS:
        w = torch.randn(n, k, device="cuda", generator=x_gen).bfloat16()
        m = quantize_int8(w, transposed=transposed)
        for rows in (1, 2, 3, 4, 6):
            x = torch.randn(rows, k, device="cuda", generator=x_gen).bfloat16()
            ref = F.linear(x.float(), m.weight(torch.float32))
            t_bf16 = bench_us(lambda x=x, w=w: F.linear(x, w), args.rep_ms)
            for cfg in gemv_candidates(rows, transposed):
                if cfg is None:  # the dot path's default tiles, whatever the row count
                    cfg = dict(int8_gemv_config(16, transposed), USE_DOT=True)
                fn = lambda x=x, m=m, cfg=cfg: launch_int8_gemv(x, m, dict(cfg))
                us = bench_us(fn, args.rep_ms)
                row = dict(kind="gemv", matrix=name, N=n, K=k, rows=rows, transposed=transposed)
                row.update(cfg=cfg, us=us, bf16_us=t_bf16, tb_s=n * k / us / 1e6)
                rows_out.append(dict(row, err=rel_err(fn().float(), ref)))
                print("sweep_int8", rows_out[-1], flush=True)
    hidden, inter = SHAPES["llama2-7b"]
    w_gate, w_up, w_down, _ = make_weights(hidden, inter, torch.bfloat16, 0)
    q = (quantize_int8(w_gate), quantize_int8(w_up), quantize_int8(w_down, transposed=True))
    x = torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16)
    thr = torch.full((1,), calibrate(w_gate, 0.5, 1), device="cuda")
    ref, _, _ = cats_mlp_reference(x, *q, thr)
    for bi in (16, 32, 64):
        for bh in (256, 512, 1024):
            for uh in (256, 512, 1024):
                cfgs = (dict(gate_config(1), BLOCK_I=bi, BLOCK_H=bh),
                        dict(updown_config(1), BLOCK_H=uh))  # fmt: skip
                fn = lambda c=cfgs: _sparse_decode(x, *q, thr, None, configs=c)
                row = dict(kind="sparse", gate_cfg=cfgs[0], cfg=cfgs[1])
                rows_out.append(dict(row, us=bench_us(fn, args.rep_ms), err=rel_err(fn(), ref)))
                print("sweep_int8", rows_out[-1], flush=True)


def run_sweep(args, results, pdl=False):
    """Time the v3 step and fused up + down candidates at Llama-2-7B bf16 for a few
    (batch, sparsity) points; with pdl, only the default config with programmatic dependent
    launch (run last: a failed capture can spoil later CUDA work)."""
    hidden, inter = SHAPES["llama2-7b"]
    w_gate, w_up, _, w_down_t = make_weights(hidden, inter, torch.bfloat16, 0)
    rows = results.setdefault("sweep", [])
    for B, s in args.sweep_points:
        B = int(B)
        x = torch.randn(B, hidden, device="cuda", dtype=torch.bfloat16)
        thr = torch.full((B,), calibrate(w_gate, s, 1), device="cuda")
        ref, _, _ = cats_mlp_reference(x, w_gate, w_up, w_down_t, thr)
        if pdl:
            cands = [(gate_config(B), dict(updown_config(B), USE_PDL=True))]
        else:
            v3 = lambda x=x, thr=thr: v3_step(x, w_gate, w_up, w_down_t, thr)
            row = dict(kind="v3", B=B, sparsity=s, us=bench_us(v3, args.rep_ms))
            rows.append(dict(row, err=rel_err(v3(), ref)))
            print("sweep", rows[-1], flush=True)
            cands = step_candidates(B)
        for cfgs in cands:
            fn = lambda x=x, t=thr, c=cfgs: _sparse_decode(
                x, w_gate, w_up, w_down_t, t, None, configs=c
            )
            try:
                row = dict(kind="updown", B=B, sparsity=s, cfg=cfgs[1], gate_cfg=cfgs[0])
                row["err"] = rel_err(fn(), ref)
                row["us"] = bench_us(fn, args.rep_ms)
            except Exception as e:  # record and go on (e.g. PDL unsupported)
                row = dict(kind="updown", B=B, sparsity=s, cfg=cfgs[1], error=repr(e)[:300])
            rows.append(row)
            print("sweep", rows[-1], flush=True)


def run_sweep_gate(args, results):
    """Llama-2-7B: the gate kernel alone (W_gate read in full, up_rms criterion, the packed
    list), bf16 weights at B = 1 and 4 and int8 at B = 1, over a grid of tiles."""
    hidden, inter = SHAPES["llama2-7b"]
    w_gate, *_ = make_weights(hidden, inter, torch.bfloat16, 0)
    scale = random_neuron_scale(inter, "cuda", 2)
    rows = results.setdefault("sweep_gate", [])
    for weights, B in (("bf16", 1), ("bf16", 4), ("int8", 1)):
        wg = quantize_int8(w_gate) if weights == "int8" else w_gate
        x = torch.randn(B, hidden, device="cuda", dtype=torch.bfloat16)
        thr = torch.full((B,), calibrate(w_gate, 0.5, 1, scale), device="cuda")
        ws = updown_workspace(B, hidden, x.device)
        bb = gate_config(B)["BLOCK_B"]
        widths = (256, 512, 1024) if weights == "int8" else (128, 256, 512)
        for bi, bh, ns, nw in itertools.product((16, 32, 64), widths, (2, 3, 4), (4, 8)):
            if bb * bi * bh > 16384:
                continue
            cfg = dict(BLOCK_B=bb, BLOCK_I=max(1, bi // bb), BLOCK_H=bh, NUM_STAGES=ns,
                       num_warps=nw)  # fmt: skip
            compact = compact_buffers(inter, x.device, cfg)
            fn = lambda c=cfg, cb=compact, x=x, wg=wg, t=thr, ws=ws: launch_gate(
                x, wg, None, t, None, *ws, c, compact=cb, neuron_scale=scale
            )
            us = bench_us(fn, args.rep_ms)
            nbytes = inter * hidden * (1 if weights == "int8" else 2)
            rows.append(dict(weights=weights, B=B, cfg=cfg, us=us, tb_s=nbytes / us / 1e6))
            print("sweep_gate", rows[-1], flush=True)
            save(args, results)  # kept if the run is cut short


TWO_TILES = [  # (BLOCK_K, columns, stages, warps) for the two-threshold sweep
    (16, 512, 4, 4), (16, 512, 3, 4), (16, 512, 2, 4), (8, 512, 4, 4), (32, 256, 4, 4),
    (32, 512, 3, 8), (16, 1024, 3, 8), (16, 256, 4, 4),
]  # fmt: skip


def run_sweep_two(args, results):
    """Llama-2-7B, bf16, up_rms, at each batch of --sweep-two-batches: single threshold (d = 0)
    and two thresholds at the same reads (d = 0.1, 0.2), in both forms, over TWO_TILES."""
    hidden, inter = SHAPES["llama2-7b"]
    w_gate, w_up, w_down, w_down_t = make_weights(hidden, inter, torch.bfloat16, 0)
    scale = random_neuron_scale(inter, "cuda", 2)
    rows = results.setdefault("sweep_two", [])
    for B in args.sweep_two_batches:
        x = torch.randn(B, hidden, device="cuda", dtype=torch.bfloat16)
        chain = lambda x=x: F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)
        t_chain = bench_us(chain, args.rep_ms)
        for s, d in itertools.product((0.5, 0.7), (0.0, 0.1, 0.2)):
            t_up, t_down = calibrate_pair(w_gate, w_up, s, d, 1, scale)
            thr = torch.full((B,), t_up, device="cuda")
            dthr = torch.full((B,), t_down, device="cuda") if d > 0 else None
            ref, _, _ = cats_mlp_reference(
                x, w_gate, w_up, w_down_t, thr, neuron_scale=scale, down_threshold=dthr
            )
            forms = [False] if d == 0 else [False, True]
            for two_kernels, (k, cols, ns, nw) in itertools.product(forms, TWO_TILES):
                bb = updown_config(B)["BLOCK_B"]
                u_cfg = dict(updown_config(B), BLOCK_K=k, BLOCK_H=max(32, cols // bb),
                             NUM_STAGES=ns, num_warps=nw, TWO_KERNELS=two_kernels)  # fmt: skip
                cfgs = (gate_config(B), u_cfg)
                fn = lambda c=cfgs, t=thr, dt=dthr, x=x: _sparse_decode(
                    x, w_gate, w_up, w_down_t, t, None, scale, configs=c, down_t=dt
                )
                row = dict(B=B, sparsity=s, split=d, form="split" if two_kernels else "fused")
                row.update(cfg=u_cfg, err=rel_err(fn(), ref), us=bench_us(fn, args.rep_ms))
                rows.append(dict(row, dense_chain_us=t_chain, speedup=t_chain / row["us"]))
                print("sweep_two", rows[-1], flush=True)
                save(args, results)  # kept if the run is cut short


def run_breakdown(x, w_gate, w_up, w_down_t, thr, scale, rep_ms):
    """Time split of the sparse step: the gate kernel alone (W_gate read, compaction) and,
    for comparison, the previous (v3) step (silu only)."""
    B, hidden = x.shape
    g_cfg = gate_config(B)
    acc, ticket = updown_workspace(B, hidden, x.device)
    compact = compact_buffers(w_gate.shape[0], x.device, g_cfg)
    gate_only = lambda: launch_gate(
        x, w_gate, None, thr, None, acc, ticket, g_cfg, compact=compact, neuron_scale=scale
    )
    out = dict(gate_only_us=bench_us(gate_only, rep_ms))
    if scale is None:
        v3 = lambda: v3_step(x, w_gate, w_up, w_down_t, thr)
        out["v3_sparse_us"] = bench_us(v3, rep_ms)
    return out


def measure_point(ctx, x, s, t_chain, rep_ms, split=0.0):
    """Check and time one (shape, dtype, B, sparsity, split) point; returns the JSON row."""
    w_gate, w_up, w_down_t = ctx["w_gate"], ctx["w_up"], ctx["w_down_t"]
    B, hidden = x.shape
    inter = w_gate.shape[0]
    int8 = isinstance(w_gate, Int8Matrix)
    es = 1 if int8 else w_gate.element_size()
    dense_bytes = 3 * inter * hidden * es
    scale = ctx["scale"]
    t_up, t_down = ctx["thresholds"][s, split]
    thr = torch.full((B,), t_up, device="cuda")
    dthr = torch.full((B,), t_down, device="cuda") if split > 0 else None
    cnt = torch.zeros(B + 1, device="cuda", dtype=torch.int32)
    dcnt = torch.zeros(B + 1, device="cuda", dtype=torch.int32)
    ref, ref_counts, ref_down = cats_mlp_reference(
        x, w_gate, w_up, w_down_t, thr, neuron_scale=scale, down_threshold=dthr
    )
    ref_counts = torch.stack([ref_counts, ref_down]).cpu()
    step = {
        p: (
            lambda p=p: cats_mlp_decode(
                x, w_gate, w_up, w_down_t, thr, active_count=cnt, path=p, neuron_scale=scale,
                down_threshold=dthr, down_count=None if dthr is None else dcnt,
            )
        )
        for p in ("sparse", "dense")
    }  # fmt: skip
    outs, counts = {}, {}
    for p, fn in step.items():
        cnt.zero_()
        dcnt.zero_()
        outs[p] = fn()
        counts[p] = torch.stack([cnt, cnt if dthr is None else dcnt]).cpu()
    union_active = int(counts["sparse"][0, B])
    union_down = int(counts["sparse"][1, B])
    union_sparsity = 1.0 - union_active / inter
    t_sparse = bench_us(step["sparse"], rep_ms)
    t_dense_path = bench_us(step["dense"], rep_ms)
    chosen = choose_mlp_path(B, hidden, inter, x.dtype, x.device, union_sparsity)
    t_disp = t_sparse if chosen == "sparse" else t_dense_path
    needed = (inter + union_active + union_down) * hidden * es
    byte_limit = dense_bytes / needed
    row = dict(
        shape=ctx["shape"], hidden=hidden, intermediate=inter, dtype=ctx["dtype"], B=B,
        weights="int8" if int8 else ctx["dtype"],
        criterion=ctx["criterion"], target_sparsity=s, split=split, threshold=t_up,
        down_threshold=t_down,
        realised_sparsity=1.0 - counts["sparse"][0, :B].double().mean().item() / inter,
        realised_row_sparsity=1.0 - counts["sparse"][:, :B].double().mean().item() / inter,
        union_sparsity=union_sparsity,
        sparse_count_mismatch=int((counts["sparse"] - ref_counts).abs().sum()),
        dense_count_mismatch=int((counts["dense"] - ref_counts).abs().sum()),
        rel_err_sparse=rel_err(outs["sparse"], ref), rel_err_dense=rel_err(outs["dense"], ref),
        dense_chain_us=t_chain, dense_path_us=t_dense_path, sparse_us=t_sparse,
        chosen_path=chosen, dispatched_us=t_disp,
        speedup_sparse=t_chain / t_sparse, speedup_dispatched=t_chain / t_disp,
        bytes_needed=needed, sparse_tb_s=needed / t_sparse / 1e6,
        dense_chain_tb_s=3 * inter * hidden * x.element_size() / t_chain / 1e6,
        byte_limit_speedup=byte_limit, fraction_of_byte_limit=(t_chain / t_sparse) / byte_limit,
    )  # fmt: skip
    if B == 1 and split == 0 and not int8:
        row.update(run_breakdown(x, w_gate, w_up, w_down_t, thr, scale, rep_ms))
        row["updown_us"] = t_sparse - row["gate_only_us"]
    return row


def run_main(args, results):
    rows = []
    for shape_name in args.shapes:
        hidden, inter = SHAPES[shape_name]
        for dtype_name in args.dtypes:
            w_gate, w_up, w_down, w_down_t = make_weights(hidden, inter, DTYPES[dtype_name], 0)
            served = (w_gate, w_up, w_down_t)
            if args.quantize == "int8":
                served = (quantize_int8(w_gate), quantize_int8(w_up),
                          quantize_int8(w_down, transposed=True))  # fmt: skip
            ctxs = []
            for criterion in args.criteria:
                scale = random_neuron_scale(inter, "cuda", 2) if criterion == "up_rms" else None
                ctxs.append(dict(
                    shape=shape_name, dtype=dtype_name, criterion=criterion, scale=scale,
                    w_gate=served[0], w_up=served[1], w_down_t=served[2],
                    thresholds={
                        (s, d): calibrate_pair(w_gate, w_up, s, d, 1, scale)
                        for s in args.sparsities for d in args.splits
                    },
                ))  # fmt: skip
            for B in args.batches:
                x = torch.randn(B, hidden, device="cuda", dtype=w_gate.dtype)
                chain = lambda x=x, wg=w_gate, wu=w_up, wd=w_down: F.linear(
                    F.silu(F.linear(x, wg)) * F.linear(x, wu), wd
                )
                t_chain = bench_us(chain, args.rep_ms)
                for s in args.sparsities:
                    for ctx in ctxs:  # criteria side by side, same inputs and dense chain
                        for d in args.splits:
                            rows.append(measure_point(ctx, x, s, t_chain, args.rep_ms, d))
                            print("row", json.dumps(rows[-1]), flush=True)
    results["rows"] = rows
    results["dispatch_fit"] = fit_dispatch([r for r in rows if r["split"] == 0])


def fit_dispatch(rows):
    """Per batch size: least-squares fit of sparse/dense_path time ratio against the union's
    active fraction, and the union sparsity where the ratio reaches 1 (the break-even)."""
    fit = {}
    for B in sorted({r["B"] for r in rows}):
        pts = [
            (1 - r["union_sparsity"], r["sparse_us"] / r["dense_path_us"])
            for r in rows
            if r["B"] == B
        ]
        n = len(pts)
        mx, my = sum(p[0] for p in pts) / n, sum(p[1] for p in pts) / n
        sxx = sum((p[0] - mx) ** 2 for p in pts)
        slope = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx > 0 else float("nan")
        icpt = my - slope * mx
        f_even = (1 - icpt) / slope if slope and not math.isnan(slope) else float("nan")
        fit[str(B)] = dict(
            intercept=icpt, slope=slope, break_even_union_sparsity=1 - f_even, points=pts
        )
    return fit


def header_width(fmt: str) -> str:
    """The alignment and width part of a format spec: '>7.1f' -> '>7'."""
    return re.match(r"[<>]?\d*", fmt).group()


def print_table(results):
    cols = [
        ("shape", "shape", "10"), ("dtype", "dt", "4"), ("criterion", "crit", "6"),
        ("B", "B", ">2"),
        ("target_sparsity", "s", ">4.2f"), ("split", "d", ">4.2f"),
        ("realised_sparsity", "real", ">5.3f"),
        ("union_sparsity", "union", ">5.3f"), ("dense_chain_us", "chain", ">7.1f"),
        ("dense_path_us", "dense", ">7.1f"), ("sparse_us", "sparse", ">7.1f"),
        ("speedup_sparse", "xsp", ">5.2f"), ("chosen_path", "path", "6"),
        ("speedup_dispatched", "xdisp", ">5.2f"), ("sparse_tb_s", "TB/s", ">5.2f"),
        ("byte_limit_speedup", "limit", ">5.2f"), ("fraction_of_byte_limit", "frac", ">5.2f"),
        ("rel_err_sparse", "err", ">8.1e"),
    ]  # fmt: skip
    print(" ".join(f"{name:{header_width(fmt)}}" for _, name, fmt in cols))
    for r in results.get("rows", []):
        print(" ".join(f"{r[key]:{fmt}}" for key, _, fmt in cols))
    for B, f in results.get("dispatch_fit", {}).items():
        print(
            f"dispatch fit B={B}: sparse/dense = {f['intercept']:.3f} + {f['slope']:.3f} * "
            f"union active fraction; break-even union sparsity {f['break_even_union_sparsity']:.3f}"
        )
    best = {}
    for r in results.get("sweep_two", []):
        key = (r["B"], r["sparsity"], r["split"], r["form"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    for (B, s, d, form), r in sorted(best.items()):
        c = r["cfg"]
        tiles = f"K{c['BLOCK_K']} H{c['BLOCK_H']} st{c['NUM_STAGES']} w{c['num_warps']}"
        head = f"two B={B} s={s} d={d} {form:5}"
        print(f"{head} best {r['us']:.1f} us = {r['speedup']:.2f}x ({tiles})")
    gates: dict = {}
    for r in results.get("sweep_gate", []):
        gates.setdefault((r["weights"], r["B"]), []).append(r)
    for (weights, B), rs in sorted(gates.items()):
        rs.sort(key=lambda r: r["us"])
        for r in rs[:3]:
            c = r["cfg"]
            tiles = f"I{c['BLOCK_I']} H{c['BLOCK_H']} st{c['NUM_STAGES']} w{c['num_warps']}"
            print(f"gate {weights} B={B} {r['us']:.1f} us {r['tb_s']:.2f} TB/s ({tiles})")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).parent / "results" / "bench_mlp.json"
    p.add_argument("--out", type=Path, default=default_out)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.7, 0.9])
    p.add_argument("--criteria", nargs="+", default=["silu"], choices=["silu", "up_rms"])
    p.add_argument(
        "--splits", nargs="+", type=float, default=[0.0],
        help="two-threshold splits d (0 = single threshold); see the module docstring",
    )  # fmt: skip
    p.add_argument("--rep-ms", type=int, default=25, help="graph replay time per measurement")
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: the sparse and dense paths read int8 weights")  # fmt: skip
    p.add_argument("--sweep", action="store_true", help="also time tile configurations")
    p.add_argument("--sweep-pdl", action="store_true", help="also time programmatic launch")
    p.add_argument("--sweep-int8", action="store_true", help="also time int8 tile configurations")
    p.add_argument("--sweep-two", action="store_true", help="also time two-threshold forms")
    p.add_argument("--sweep-gate", action="store_true", help="also time gate kernel tiles")
    p.add_argument("--sweep-two-batches", nargs="+", type=int, default=[1, 4])
    p.add_argument(
        "--sweep-points",
        nargs="+",
        type=lambda v: tuple(float(f) for f in v.split(":")),
        default=[(1, 0.5), (1, 0.7), (1, 0.9), (2, 0.9), (4, 0.9)],
        help="batch:sparsity pairs for --sweep",
    )
    p.add_argument("--skip-main", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_mlp.py needs a CUDA device")
    torch.manual_seed(0)
    start = time.time()
    results = dict(
        benchmark="bench_mlp",
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        python=platform.python_version(),
        timing="triton.testing.do_bench_cudagraph, median, microseconds",
        rep_ms=args.rep_ms,
        configs={str(b): dict(gate=gate_config(b), updown=updown_config(b)) for b in args.batches},
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    parts = [
        (not args.skip_main, run_main), (args.sweep, run_sweep),
        (args.sweep_int8, run_sweep_int8), (args.sweep_two, run_sweep_two),
        (args.sweep_gate, run_sweep_gate),
        (args.sweep_pdl, lambda a, r: run_sweep(a, r, pdl=True)),
    ]  # fmt: skip
    for wanted, run in parts:
        if wanted:
            run(args, results)
            save(args, results)
    results["wall_s"] = time.time() - start
    save(args, results)
    print_table(results)
    print(
        f"device {results['device']}, torch {results['torch']}, "
        f"triton {results['triton']}, {results['wall_s']:.0f} s; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
