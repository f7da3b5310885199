"""Decode speed with and without a json_schema constraint, through the engine (no HTTP).

B requests of one prompt decode `--tokens` tokens each (the schema, an array of at least 64
small objects, is never complete that soon, so both arms decode the same tokens), free or under
the grammar, at the server's default settings for the device (CUDA graphs and pipelined steps
on a GPU). Decode tok/s = tokens after each request's first / time from the batch's first
token to its last; the median of `--repeats` runs. Prints a table and writes JSON.

    python benchmarks/bench_structured.py --device cpu \\
        --out benchmarks/results/bench_structured_cpu.json
    python benchmarks/bench_structured.py --device cuda \\
        --out benchmarks/results/bench_structured_h200.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import uuid
from pathlib import Path

import torch

from cats_serve.calibration.shipped import DEFAULT_SPARSITY, default_thresholds_files
from cats_serve.server.engine.engine import Engine
from cats_serve.server.engine.grammar import json_schema_grammar
from cats_serve.server.engine.sampling import SamplingParams
from cats_serve.server.engine.types import GenerationRequest, RequestResult
from cats_serve.server.model.conversion_cache import default_cache_dir
from cats_serve.server.model.loader import load_levels, load_pretrained
from cats_serve.server.model.sources import DEFAULT_MODEL

SCHEMA = {
    "type": "array",
    "minItems": 64,
    "items": {
        "type": "object",
        "properties": {"word": {"type": "string", "maxLength": 12}, "n": {"type": "integer"}},
        "required": ["word", "n"],
        "additionalProperties": False,
    },
}
LEVEL = DEFAULT_SPARSITY
PROMPT = "List words with their lengths as JSON:"


class Done:
    def __init__(self):
        self.result: RequestResult | None = None
        self.event = threading.Event()

    def __call__(self, event):
        if isinstance(event, RequestResult):
            self.result = event
            self.event.set()


def run(engine: Engine, prompt: list[int], batch: int, tokens: int, grammar) -> dict:
    sinks = [Done() for _ in range(batch)]
    for sink in sinks:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        request = GenerationRequest(uuid.uuid4().hex, list(prompt), params, LEVEL)
        request.grammar = grammar
        engine.submit(request, sink)
    for sink in sinks:
        assert sink.event.wait(600), "request did not finish"
    results = [s.result for s in sinks]
    assert all(r.finish_reason == "length" and r.generation_tokens == tokens for r in results), [
        (r.finish_reason, r.generation_tokens, r.text[-80:]) for r in results
    ]
    first = min(r.token_times[0] for r in results)
    last = max(r.token_times[-1] for r in results)
    masks = [r.grammar_mask_seconds for r in results if r.grammar_mask_seconds is not None]
    return {
        "tok_s": batch * (tokens - 1) / (last - first),
        "mask_us": statistics.mean(masks) * 1e6 if masks else None,
        "sample_text": results[0].text[:120],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    loaded = load_pretrained(
        DEFAULT_MODEL, cache_dir=default_cache_dir(), device=args.device, dtype="auto"
    )
    files = load_levels(loaded, default_thresholds_files())
    loaded.model.set_neuron_scale(next(iter(files.values())).neuron_scale)
    cuda = loaded.model.device.type == "cuda"
    engine = Engine(
        loaded.model,
        loaded.tokenizer,
        levels={level: tf.threshold_pairs() for level, tf in files.items()},
        max_batch=max(args.batches),
        max_seq_len=512,
        max_queue=64,
        max_prefill_tokens=4096,
        eos_token_ids=loaded.eos_token_ids(),
        use_cuda_graphs=cuda,
    )
    engine.start()
    prompt = loaded.tokenizer(PROMPT)["input_ids"]
    grammar = engine.grammars.compile(json_schema_grammar(SCHEMA))
    run(engine, prompt, max(args.batches), 8, None)  # warm-up (lazy init, first shapes)
    run(engine, prompt, 1, 8, grammar)
    rows = []
    for batch in args.batches:
        for constrained in (False, True):
            runs = [
                run(engine, prompt, batch, args.tokens, grammar if constrained else None)
                for _ in range(args.repeats)
            ]
            rows.append(
                {
                    "batch": batch,
                    "constrained": constrained,
                    "tok_s": statistics.median(r["tok_s"] for r in runs),
                    "tok_s_runs": [r["tok_s"] for r in runs],
                    "mask_us": runs[-1]["mask_us"],
                    "sample_text": runs[-1]["sample_text"],
                }
            )
    engine.shutdown(timeout=5)
    for row in rows:
        free = next(r for r in rows if r["batch"] == row["batch"] and not r["constrained"])
        row["cost"] = 1.0 - row["tok_s"] / free["tok_s"]
    device = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    report = {
        "device": device,
        "torch": torch.__version__,
        "llguidance": __import__("llguidance").__version__
        if hasattr(__import__("llguidance"), "__version__")
        else None,
        "model": DEFAULT_MODEL,
        "dtype": str(loaded.model.dtype),
        "sparsity_level": DEFAULT_SPARSITY,
        "cuda_graphs": cuda,
        "pipelined": engine.pipeline,
        "tokens": args.tokens,
        "schema": SCHEMA,
        "cpu_threads": torch.get_num_threads(),
        "rows": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{device}, {DEFAULT_MODEL} {loaded.model.dtype}, level {DEFAULT_SPARSITY}")
    print("| B | constrained | decode tok/s | cost | mask us/token |")
    print("|---|---|---|---|---|")
    for r in rows:
        mask = f"{r['mask_us']:.0f}" if r["mask_us"] is not None else "-"
        print(
            f"| {r['batch']} | {'json_schema' if r['constrained'] else 'no'} | "
            f"{r['tok_s']:.1f} | {r['cost'] * 100:+.1f}% | {mask} |"
        )


if __name__ == "__main__":
    main()
