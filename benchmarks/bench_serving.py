"""Serving benchmark: concurrent clients against a running cats-serve (or one it starts).

Each run sends `--num-requests` completions with at most `--concurrency` in flight, arriving
all at once (`--request-rate inf`), at a fixed rate, or as a Poisson process. Prompt and output
lengths are drawn from distributions (`fixed:N`, `uniform:LO:HI`, `normal:MEAN:SD`); outputs run
to their drawn length (`ignore_eos`). A fraction of the requests stream (`--stream-fraction`).
Reports request and token throughput, time to first token, inter-token latency and end-to-end
latency (mean, p50, p90, p99), and errors by type; prints a table and writes JSON with the
device, versions and configuration.

    # against a server that is already up
    python benchmarks/bench_serving.py --url http://127.0.0.1:8000 --concurrency 4 8
    # start `cats-serve` (default model) itself, on CPU, and stop it at the end
    python benchmarks/bench_serving.py --launch --concurrency 4 8 --num-requests 32 \\
        --out benchmarks/results/bench_serving_cpu.json -- --device cpu
    # on a GPU box: a 7B checkpoint with its thresholds, dense and CATS levels
    python benchmarks/bench_serving.py --launch --concurrency 1 8 32 --sparsity 0 0.5 0.7 \\
        --num-requests 256 -- --model /models/llama-2-7b --thresholds t50.json t70.json

TTFT and inter-token latency come from streamed requests only (a JSON answer has no token
times); end-to-end latency and throughput count every request that succeeded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import httpx

WORDS = (
    "time year people way day man thing woman life child world school state family student "
    "group country problem hand part place case week company system program question work "
    "government number night point home water room mother area money story fact month lot "
    "right study book eye job word business issue side kind head house service friend father"
).split()
HEALTH_TIMEOUT_S = 600  # a first start converts the default model's GGUF (tens of seconds)


# ---- workload ----------------------------------------------------------------------------------


def parse_dist(spec: str):
    """`fixed:N`, `uniform:LO:HI` or `normal:MEAN:SD` -> a sampler of positive ints."""
    kind, *args = spec.split(":")
    nums = [float(a) for a in args]
    if kind == "fixed" and len(nums) == 1:
        return lambda rng: int(nums[0])
    if kind == "uniform" and len(nums) == 2:
        return lambda rng: rng.randint(int(nums[0]), int(nums[1]))
    if kind == "normal" and len(nums) == 2:
        return lambda rng: max(1, round(rng.gauss(nums[0], nums[1])))
    raise argparse.ArgumentTypeError(f"bad length distribution {spec!r}")


def make_prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def arrival_gaps(rng: random.Random, n: int, rate: float, process: str) -> list[float]:
    """Seconds to wait before each request: 0 for rate=inf, 1/rate, or exponential gaps."""
    if math.isinf(rate):
        return [0.0] * n
    if process == "fixed":
        return [1.0 / rate] * n
    return [rng.expovariate(rate) for _ in range(n)]


# ---- one request -------------------------------------------------------------------------------


@dataclass
class Result:
    stream: bool
    ok: bool = False
    error: str | None = None  # "http_429", "ReadTimeout", "stream_error", ...
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)


def error_type(status: int, content: bytes) -> str:
    """`http_429:queue_full`: the status and the OpenAI error code when the body has one."""
    try:
        code = json.loads(content)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    return f"http_{status}:{code}" if code else f"http_{status}"


async def send(http: httpx.AsyncClient, body: dict, stream: bool) -> Result:
    res = Result(stream=stream)
    body = {**body, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    start = time.perf_counter()
    try:
        if not stream:
            r = await http.post("/v1/completions", json=body)
            if r.status_code != 200:
                res.error = error_type(r.status_code, r.content)
                return res
            usage = r.json()["usage"]
        else:
            usage, last = None, None
            async with http.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    res.error = error_type(r.status_code, await r.aread())
                    return res
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        res.error = "stream_error"
                        return res
                    if event.get("usage"):
                        usage = event["usage"]
                    if any(c.get("text") for c in event.get("choices", [])):
                        now = time.perf_counter()
                        if last is None:
                            res.ttft = now - start
                        else:
                            res.itl.append(now - last)
                        last = now
            if usage is None:
                res.error = "no_usage"
                return res
    except httpx.HTTPError as exc:
        res.error = type(exc).__name__
        return res
    res.e2e = time.perf_counter() - start
    res.prompt_tokens, res.output_tokens = usage["prompt_tokens"], usage["completion_tokens"]
    res.ok = True
    return res


# ---- one run -----------------------------------------------------------------------------------


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    s = sorted(values)

    def q(p: float) -> float:  # linear interpolation between closest ranks
        x = (len(s) - 1) * p
        lo, hi = math.floor(x), math.ceil(x)
        return s[lo] + (s[hi] - s[lo]) * (x - lo)

    return {"mean": sum(s) / len(s), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99)}


async def run_once(args, model: str, concurrency: int, sparsity: float | None) -> dict:
    rng = random.Random(args.seed)
    prompt_len, output_len = parse_dist(args.prompt_len), parse_dist(args.output_len)
    n = args.num_requests
    gaps = arrival_gaps(rng, n, args.request_rate, args.arrival)
    bodies = []
    for _ in range(n):
        body = {
            "model": model,
            "prompt": make_prompt(rng, prompt_len(rng)),
            "max_tokens": output_len(rng),
            "temperature": args.temperature,
            "ignore_eos": True,
        }
        if sparsity is not None:
            body["sparsity"] = sparsity
        bodies.append((body, rng.random() < args.stream_fraction))
    limit = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(
        base_url=args.url, timeout=args.timeout, limits=limits, headers=args.headers
    ) as http:

        async def one(body: dict, stream: bool) -> Result:
            async with limit:
                return await send(http, body, stream)

        start = time.perf_counter()
        tasks = []
        for gap, (body, stream) in zip(gaps, bodies, strict=True):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(body, stream)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    return {
        "concurrency": concurrency,
        "sparsity": sparsity,
        "requests": n,
        "completed": len(ok),
        "streamed": sum(r.stream for r in ok),
        "duration_s": duration,
        "request_throughput_rps": len(ok) / duration,
        "output_token_throughput_tps": out_tokens / duration,
        "total_token_throughput_tps": (in_tokens + out_tokens) / duration,
        "prompt_tokens": in_tokens,
        "output_tokens": out_tokens,
        "ttft_s": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": percentiles([gap for r in ok for gap in r.itl]),
        "e2e_s": percentiles([r.e2e for r in ok]),
        "errors": dict(Counter(r.error for r in results if not r.ok)),
    }


# ---- server and environment --------------------------------------------------------------------


def launch(server_args: list[str], port: int) -> subprocess.Popen:
    command = ["cats-serve", "--host", "127.0.0.1", "--port", str(port), *server_args]
    print("starting:", " ".join(command), file=sys.stderr)
    return subprocess.Popen(command)


def wait_healthy(url: str, process: subprocess.Popen | None) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            sys.exit(f"cats-serve exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    sys.exit(f"{url} was not healthy after {HEALTH_TIMEOUT_S} s")


def server_info(url: str, headers: dict) -> dict:
    card = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"][0]
    info = {"model": card["id"], "max_model_len": card.get("max_model_len")}
    info["sparsity_levels"] = card.get("sparsity_levels")
    info["default_sparsity"] = card.get("default_sparsity")
    info["version"] = httpx.get(f"{url}/version", timeout=30).json().get("version")
    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    match = re.search(r"^cats_model_info\{(.*)\} 1", metrics, re.MULTILINE)
    if match:  # device and dtype as the server reports them
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match[1]))
        info.update({k: labels[k] for k in ("device", "dtype") if k in labels})
    return info


def client_environment() -> dict:
    env = {"python": platform.python_version(), "platform": platform.platform()}
    if hasattr(os, "getloadavg"):  # other work on a shared machine skews every figure
        env["load_average_1m_at_start"] = os.getloadavg()[0]
    cpu = Path("/proc/cpuinfo")
    if cpu.exists():
        names = re.findall(r"^model name\s*:\s*(.*)$", cpu.read_text(), re.MULTILINE)
        env["cpu"] = names[0] if names else platform.processor()
        env["cpu_count"] = len(names)
    try:
        import torch

        env["torch"] = torch.__version__
        env["transformers"] = version("transformers")
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    except (ImportError, PackageNotFoundError):
        pass
    return env


# ---- main --------------------------------------------------------------------------------------


def fmt(x: float | None, scale: float = 1000.0, digits: int = 1) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


def print_table(runs: list[dict]) -> None:
    head = (
        "| conc | sparsity | ok/sent | req/s | out tok/s | TTFT p50/p90/p99 ms | "
        "ITL p50/p90/p99 ms | e2e p50/p90/p99 s | errors |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in runs:
        t, i, e = r["ttft_s"], r["itl_s"], r["e2e_s"]
        print(
            f"| {r['concurrency']} | {r['sparsity']} "
            f"| {r['completed']}/{r['requests']} | {r['request_throughput_rps']:.2f} "
            f"| {r['output_token_throughput_tps']:.1f} "
            f"| {fmt(t['p50'])} / {fmt(t['p90'])} / {fmt(t['p99'])} "
            f"| {fmt(i['p50'])} / {fmt(i['p90'])} / {fmt(i['p99'])} "
            f"| {fmt(e['p50'], 1, 2)} / {fmt(e['p90'], 1, 2)} / {fmt(e['p99'], 1, 2)} "
            f"| {r['errors'] or 'none'} |"
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", default="http://127.0.0.1:8000", help="a running server")
    where.add_argument(
        "--launch", action="store_true", help="start cats-serve (args after --) and stop it after"
    )
    p.add_argument("--port", type=int, default=8123, help="port for --launch")
    p.add_argument("--api-key", help="sent as Authorization: Bearer KEY")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, nargs="+", default=[4, 8])
    p.add_argument("--sparsity", type=float, nargs="+", help="levels to run (default: server's)")
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (inf: all)")
    p.add_argument("--arrival", choices=["poisson", "fixed"], default="poisson")
    p.add_argument("--prompt-len", default="uniform:16:64", help="prompt words distribution")
    p.add_argument("--output-len", default="fixed:64", help="output tokens distribution")
    p.add_argument("--stream-fraction", type=float, default=0.5, help="share of streamed requests")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=2, help="requests sent before measuring")
    p.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON results file")
    p.add_argument("server_args", nargs="*", help="cats-serve arguments (with --launch)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    for spec in (args.prompt_len, args.output_len):
        parse_dist(spec)  # fail on a bad spec before starting anything
    args.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    client = client_environment()
    process = None
    if args.launch:
        args.url = f"http://127.0.0.1:{args.port}"
        extra = ["--api-key", args.api_key] if args.api_key else []
        process = launch([*args.server_args, *extra], args.port)
    try:
        wait_healthy(args.url, process)
        info = server_info(args.url, args.headers)
        if args.warmup:
            warm = argparse.Namespace(**{**vars(args), "num_requests": args.warmup})
            asyncio.run(run_once(warm, info["model"], args.warmup, None))
        runs = []
        for sparsity in args.sparsity or [None]:
            for concurrency in args.concurrency:
                run = asyncio.run(run_once(args, info["model"], concurrency, sparsity))
                if sparsity is None:  # the server's default level
                    run["sparsity"] = info.get("default_sparsity")
                runs.append(run)
                print_table(runs[-1:])
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    config = {k: v for k, v in vars(args).items() if k not in ("headers", "api_key", "out")}
    config["request_rate"] = str(args.request_rate)
    result = {
        "benchmark": "bench_serving",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "server": info,
        "client": client,
        "config": config,
        "runs": runs,
    }
    print()
    print_table(runs)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
