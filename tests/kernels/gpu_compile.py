"""Compile every Triton kernel for an NVIDIA Hopper GPU (sm_90) on a machine without one.

The kernel tests run the kernels through Triton's interpreter, which runs Python that the
compiler rejects (a kernel reading a plain module global, for one). This script drives the real
launchers with the GPU's tile configurations and compiles what they launch, in two processes,
since Triton makes a kernel interpreted or compiled when its module is imported:

    TRITON_INTERPRET=1 python gpu_compile.py capture LAUNCHES.json   # record, run nothing
    python gpu_compile.py compile LAUNCHES.json                       # compile each record

`capture` replaces the interpreter's launch with a recorder (argument types, constexprs and
launch options of each distinct launch) and tells the launchers they are not interpreted, so
they pick the GPU's configurations; the CPU tensors never reach a kernel. `compile` builds
each recorded launch to a cubin for sm_90 with the Triton on this machine (ptxas comes with
its wheel).
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys

import torch

DTYPES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int8: "i8",
    torch.int32: "i32",
    torch.int64: "i64",
}
OPTIONS = ("num_warps", "num_stages", "num_ctas")


def _type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def capture(out_path: str) -> None:
    import triton.runtime.interpreter as interpreter

    from cats_serve import kernels

    records: dict[str, dict] = {}

    def record(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        params = list(inspect.signature(fn).parameters)
        bound = dict(zip(params, args, strict=False)) | {
            k: v for k, v in kwargs.items() if k in params
        }
        constexprs = {
            name: bound[name]
            for name, p in inspect.signature(fn).parameters.items()
            if p.annotation is not inspect.Parameter.empty and "constexpr" in str(p.annotation)
        }
        signature = {n: "constexpr" if n in constexprs else _type(bound[n]) for n in params}
        options = {k: v for k, v in kwargs.items() if k in OPTIONS}
        entry = dict(
            module=fn.__module__, name=fn.__name__, signature=signature,
            constexprs=constexprs, options=options,
        )  # fmt: skip
        records[json.dumps(entry, sort_keys=True)] = entry

    interpreter.InterpretedFunction.run = record
    for name in ("activation", "gate", "int8_gemv", "updown", "attention", "baselines.down"):
        module = importlib.import_module(f"cats_serve.kernels.{name}")
        if hasattr(module, "interpreter_enabled"):  # the GPU's tile configurations
            module.interpreter_enabled = lambda: False
    _drive(kernels)
    with open(out_path, "w") as f:
        json.dump(list(records.values()), f, indent=1)
    print(f"captured {len(records)} distinct launches")


def _drive(kernels) -> None:
    """Call each launcher on CPU tensors of a Llama-2-7B-sized MLP and attention."""
    from cats_serve.kernels.baselines.down import down_config, down_workspace, launch_down
    from cats_serve.kernels.int8 import int8_linear, quantize_int8

    hidden, inter = 4096, 11008
    for dtype, batches in ((torch.bfloat16, (1, 8, 32)), (torch.float32, (1, 32))):
        weights = [torch.randn(inter, hidden).to(dtype) for _ in range(3)]
        int8 = [quantize_int8(w) for w in weights[:2]]
        int8.append(quantize_int8(weights[2].t(), transposed=True))  # W_down, stored [I, H]
        scale = torch.ones(inter)
        for batch in batches:
            x = torch.randn(batch, hidden).to(dtype)
            thr = torch.full((batch,), 0.5)
            for w, s, path, down in (
                (weights, None, "sparse", None),
                (weights, scale, "sparse", torch.full((batch,), 0.1)),
                (weights, scale, "dense", torch.full((batch,), 0.1)),
                (weights, None, "dense", None),
                (int8, scale, "sparse", None),
                (int8, scale, "sparse", torch.full((batch,), 0.1)),
                (int8, None, "dense", None),
            ):
                counts = torch.zeros(batch + 1, dtype=torch.int32)
                down_count = torch.zeros(batch + 1, dtype=torch.int32) if down is not None else None
                kernels.cats_mlp_decode(
                    x, *w, thr, active_count=counts, path=path, neuron_scale=s,
                    down_threshold=down, down_count=down_count,
                )  # fmt: skip
            int8_linear(x, quantize_int8(torch.randn(3 * hidden, hidden)))
            int8_linear(torch.randn(batch, inter).to(dtype), int8[2])
            cfg = down_config(batch)
            acc, tickets = down_workspace(batch, hidden, inter, x.device, cfg)
            act = torch.randn(batch, inter)
            flags = torch.ones(inter, dtype=torch.int8)
            launch_down(act, flags, weights[2], dtype, acc, tickets, cfg)
            for kv_heads in (32, 8):
                q = torch.randn(batch, 32, 128).to(dtype)
                cache = torch.zeros(batch, kv_heads, 2048, 128).to(dtype)
                positions = torch.full((batch,), 1000)
                kernels.decode_attention(q, cache, cache, positions, 2048)
                qkv = torch.randn(batch, (32 + 2 * kv_heads) * 128).to(dtype)
                cos, sin = torch.randn(batch, 64), torch.randn(batch, 64)
                kernels.decode_attention_rope(qkv, cos, sin, cache, cache, positions, 2048, 32)
        tokens = torch.randn(70, hidden).to(dtype)
        kernels.cats_mlp_prefill(tokens, *weights, torch.full((70,), 0.5))


def compile_all(in_path: str) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    with open(in_path) as f:
        records = json.load(f)
    for r in records:
        kernel = getattr(importlib.import_module(r["module"]), r["name"])
        names = list(r["signature"])
        constexprs = {(names.index(k),): v for k, v in r["constexprs"].items()}
        src = ASTSource(fn=kernel, signature=r["signature"], constexprs=constexprs)
        triton.compile(src, target=target, options=r["options"])
    print(f"compiled {len(records)} launches for sm_90")


if __name__ == "__main__":
    {"capture": capture, "compile": compile_all}[sys.argv[1]](sys.argv[2])
