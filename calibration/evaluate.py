"""Offline quality of a model under CATS thresholds: perplexity and zero-shot multiple choice.

Multiple choice is scored by log-likelihood: each choice's continuation tokens are scored after
its context; `acc` picks the highest summed log-probability, `acc_norm` the highest divided by
the continuation's length in UTF-8 bytes (length-normalised, as lm-eval's acc_norm).
Sequences are sorted by length and batched by a token budget so little padding is run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from cats_serve.calibration.pairs import threshold_tensor
from cats_serve.calibration.tasks import Example

MAX_SEQ_LEN = 2048


def encode_choice(
    tokenizer, context: str, continuation: str, max_len: int = MAX_SEQ_LEN
) -> tuple[list[int], int]:
    """Token ids of context + continuation (the last `max_len`), and how many trailing ids are
    the continuation."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        ids, n_cont = whole, len(whole) - len(ctx)
    else:  # the tokenizer merged across the boundary: tokenize the parts apart
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        ids, n_cont = ctx + cont, len(cont)
    if not ctx:  # nothing to condition the first token on
        raise ValueError(f"empty context for continuation {continuation!r}")
    return ids[-max_len:], min(n_cont, max_len - 1)


@dataclass(frozen=True)
class EncodedChoices:
    """Every choice of some examples as token ids, planned into length-sorted batches."""

    example: list[int]  # per choice: the index of its example
    ids: list[list[int]]  # per choice: context + continuation ids
    n_cont: list[int]  # per choice: how many trailing ids are the continuation
    batches: list[list[int]]  # choice indices of each forward pass


def encode_examples(
    tokenizer, examples: list[Example], *, batch_tokens: int, max_len: int = MAX_SEQ_LEN
) -> EncodedChoices:
    example, ids, n_cont = [], [], []
    for e, ex in enumerate(examples):
        for ch in ex.choices:
            i, n = encode_choice(tokenizer, ch.context, ch.continuation, max_len)
            example.append(e)
            ids.append(i)
            n_cont.append(n)
    batches, current = [], []
    for k in sorted(range(len(ids)), key=lambda k: len(ids[k])):
        longest = len(ids[k])  # sorted ascending: the newest is the longest
        if current and longest * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(k)
    if current:
        batches.append(current)
    return EncodedChoices(example, ids, n_cont, batches)


def choice_logliks(
    model, encoded: EncodedChoices, thresholds, *, progress: bool = True, desc: str = "choices"
) -> list[float]:
    """Summed log-probability of each choice's continuation after its context."""
    loglik = [0.0] * len(encoded.ids)
    t = threshold_tensor(thresholds, model.config.num_layers, model.device)
    with torch.inference_mode():
        for group in tqdm(encoded.batches, desc=desc, unit="batch", disable=not progress):
            seqs = [encoded.ids[k] for k in group]
            width = max(len(s) for s in seqs)
            tokens = torch.zeros(len(seqs), width, dtype=torch.int64)
            real = torch.zeros(len(seqs), width, dtype=torch.bool)
            for i, s in enumerate(seqs):
                tokens[i, : len(s)] = torch.tensor(s)
                real[i, : len(s)] = True
            logits = model.score(tokens.to(model.device), real.to(model.device), t)  # [B, T, V]
            # every continuation token at once: position p predicts token p + 1
            row, pos, target = [], [], []
            for i, k in enumerate(group):
                n, n_cont = len(encoded.ids[k]), encoded.n_cont[k]
                row += [i] * n_cont
                pos += range(n - n_cont - 1, n - 1)
                target += encoded.ids[k][n - n_cont :]
            row_t, pos_t, target_t = (
                torch.tensor(x, device=logits.device) for x in (row, pos, target)
            )
            logp = torch.log_softmax(logits[row_t, pos_t].float(), dim=-1)  # [N_cont, V]
            logp = logp.gather(-1, target_t[:, None])[:, 0].double()
            sums = torch.zeros(len(group), dtype=torch.float64, device=logits.device)
            for k, v in zip(group, sums.index_add(0, row_t, logp).tolist(), strict=True):
                loglik[k] = v
    return loglik


@dataclass
class TaskScore:
    acc: float
    acc_norm: float
    examples: int
    correct: str = ""  # per example, in order: "1" where acc's choice is the gold one
    correct_norm: str = ""  # the same for acc_norm
    choice: list[int] = field(default_factory=list)  # per example: the choice acc picked
    choice_norm: list[int] = field(default_factory=list)  # the same for acc_norm


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
    encoded = encode_examples(tokenizer, examples, batch_tokens=batch_tokens)
    loglik = choice_logliks(model, encoded, thresholds, progress=progress, desc=desc)
    per_example: dict[int, list[tuple[float, float]]] = {}
    for k, e in enumerate(encoded.example):
        c = len(per_example.setdefault(e, []))
        cont = examples[e].choices[c].continuation
        per_example[e].append((loglik[k], loglik[k] / max(len(cont.encode("utf-8")), 1)))

    def picked(e: int, which: int) -> int:  # which: 0 = summed, 1 = length-normalised
        scores = per_example[e]
        return max(range(len(scores)), key=lambda c: scores[c][which])

    choice = [picked(e, 0) for e in range(len(examples))]
    choice_norm = [picked(e, 1) for e in range(len(examples))]
    hits = [c == ex.label for c, ex in zip(choice, examples, strict=True)]
    hits_norm = [c == ex.label for c, ex in zip(choice_norm, examples, strict=True)]
    n = max(len(examples), 1)
    return TaskScore(
        sum(hits) / n,
        sum(hits_norm) / n,
        len(examples),
        "".join("1" if h else "0" for h in hits),
        "".join("1" if h else "0" for h in hits_norm),
        choice,
        choice_norm,
    )
