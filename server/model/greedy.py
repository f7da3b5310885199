"""Batched greedy decoding without the engine, for offline evaluation (cats-eval).

The served function: prompts go through `LlamaModel.prefill` and tokens through `decode`, the
same entry points the engine runs, with one (t_up, t_down) pair per layer for every row. No
sampling, no stop handling: every row gets `max_new_tokens` tokens and callers cut at EOS or
stop strings, so two configurations can be compared position by position.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from cats_serve.server.model.decoder import LlamaModel
from cats_serve.server.model.kv_cache import KVCache


def greedy_generate(
    model: LlamaModel,
    prompts: list[list[int]],
    thresholds: torch.Tensor,
    *,
    max_new_tokens: int,
    batch_size: int,
    progress: bool = False,
    desc: str = "generate",
) -> list[list[int]]:
    """`max_new_tokens` greedy tokens after each prompt (token ids), under `thresholds`
    [2, L] (t_up, t_down per layer). Prompts run in batches of similar length; a prompt too
    long for the model's positions keeps its last tokens."""
    c = model.config
    keep = c.max_position_embeddings - max_new_tokens
    if max_new_tokens < 1 or batch_size < 1 or keep < 1:
        raise ValueError("need max_new_tokens >= 1 (and below the model's positions), batch >= 1")
    prompts = [p[-keep:] for p in prompts]
    pair = thresholds.to(device=model.device, dtype=torch.float32)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    with torch.inference_mode():
        for chunk in tqdm(chunks, desc=desc, unit="batch", disable=not progress):
            b = len(chunk)
            ids = [torch.tensor(prompts[i], dtype=torch.long, device=model.device) for i in chunk]
            lengths = [len(prompts[i]) for i in chunk]
            cache = KVCache.allocate(
                c, b, max(lengths) + max_new_tokens, dtype=model.dtype, device=model.device
            )
            last = model.prefill(ids, list(range(b)), pair.expand(b, -1, -1), cache)
            token = torch.stack(last).argmax(dim=-1)
            positions = torch.tensor(lengths, device=model.device)
            row_t = pair[:, :, None].expand(-1, -1, b).contiguous()
            counts = torch.zeros(2, c.num_layers, b + 1, dtype=torch.int32, device=model.device)
            steps = [token]
            for _ in range(max_new_tokens - 1):
                kv_len = max(lengths) + len(steps)
                logits = model.decode(
                    token, positions, row_t, cache, counts, kv_len=kv_len, mlp_path="dense"
                )
                token = logits.argmax(dim=-1)
                positions = positions + 1
                steps.append(token)
            generated = torch.stack(steps, dim=1).tolist()  # [b, max_new_tokens]
            for row, i in enumerate(chunk):
                out[i] = generated[row]
    return out
