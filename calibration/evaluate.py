"""Offline quality of a model under CATS thresholds: perplexity and zero-shot multiple choice.

Multiple choice is scored by log-likelihood: each choice's continuation tokens are scored after
its context; `acc` picks the highest summed log-probability, `acc_norm` the highest divided by
the continuation's length in UTF-8 bytes (length-normalised, as lm-eval's acc_norm).
Sequences are sorted by length and batched by a token budget so little padding is run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from cats_serve.calibration.tasks import Example

MAX_SEQ_LEN = 2048


def encode_choice(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """Token ids of context + continuation, and how many trailing ids are the continuation."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        ids, n_cont = whole, len(whole) - len(ctx)
    else:  # the tokenizer merged across the boundary: tokenize the parts apart
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        ids, n_cont = ctx + cont, len(cont)
    if not ctx:  # nothing to condition the first token on
        raise ValueError(f"empty context for continuation {continuation!r}")
    return ids[-MAX_SEQ_LEN:], min(n_cont, MAX_SEQ_LEN - 1)


@dataclass
class TaskScore:
    acc: float
    acc_norm: float
    examples: int
    correct: str = ""  # per example, in order: "1" where acc's choice is the gold one
    correct_norm: str = ""  # the same for acc_norm


def score_choices(
    model,
    tokenizer,
    examples: list[Example],
    thresholds,
    *,
    batch_tokens: int = 4096,
    progress: bool = True,
    desc: str = "choices",
) -> TaskScore:
    encoded = []  # (example index, choice index, ids, n_cont)
    for e, ex in enumerate(examples):
        for c, ch in enumerate(ex.choices):
            ids, n_cont = encode_choice(tokenizer, ch.context, ch.continuation)
            encoded.append((e, c, ids, n_cont))
    order = sorted(range(len(encoded)), key=lambda k: len(encoded[k][2]))
    loglik = {}
    t = torch.as_tensor(thresholds, dtype=torch.float32).to(model.device)
    batches, current = [], []
    for k in order:
        longest = len(encoded[k][2])  # sorted ascending: the newest is the longest
        if current and longest * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(k)
    if current:
        batches.append(current)
    with torch.inference_mode():
        for group in tqdm(batches, desc=desc, unit="batch", disable=not progress):
            seqs = [encoded[k][2] for k in group]
            width = max(len(s) for s in seqs)
            tokens = torch.zeros(len(seqs), width, dtype=torch.int64)
            real = torch.zeros(len(seqs), width, dtype=torch.bool)
            for i, s in enumerate(seqs):
                tokens[i, : len(s)] = torch.tensor(s)
                real[i, : len(s)] = True
            logits = model.score(tokens.to(model.device), real.to(model.device), t)  # [B, T, V]
            for i, k in enumerate(group):
                ids, n_cont = encoded[k][2], encoded[k][3]
                n = len(ids)
                target = torch.tensor(ids[n - n_cont :], device=logits.device)
                # position p predicts token p + 1
                pred = torch.log_softmax(logits[i, n - n_cont - 1 : n - 1].float(), dim=-1)
                loglik[k] = float(pred.gather(-1, target.unsqueeze(-1)).sum())
    per_example: dict[int, list[tuple[float, float]]] = {}
    for k, (e, c, _, _) in enumerate(encoded):
        cont = examples[e].choices[c].continuation
        per_example.setdefault(e, []).append(
            (loglik[k], loglik[k] / max(len(cont.encode("utf-8")), 1))
        )
    hits, hits_norm = [], []
    for e, ex in enumerate(examples):
        scores = per_example[e]
        hits.append(max(range(len(scores)), key=lambda c: scores[c][0]) == ex.label)
        hits_norm.append(max(range(len(scores)), key=lambda c: scores[c][1]) == ex.label)
    n = max(len(examples), 1)
    return TaskScore(
        sum(hits) / n,
        sum(hits_norm) / n,
        len(examples),
        "".join("1" if h else "0" for h in hits),
        "".join("1" if h else "0" for h in hits_norm),
    )
