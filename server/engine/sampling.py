"""Per-request sampling: logit bias and grammar masks, then greedy, temperature, top-k, top-p,
penalties, seeds, logprobs.

Logprobs describe the distribution a token was drawn from: after the request's logit bias and
grammar mask (a masked token's logprob is -inf), before temperature and the top-k/top-p cuts.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch

from cats_serve.server.engine.grammar import GrammarState, apply_masks, prepare_all


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # how many top alternatives to report per token (0..5)
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


@dataclass
class RowSampler:
    """One sequence's sampling state: its params, generator and generated-token counts."""

    params: SamplingParams
    generator: torch.Generator | None
    counts: Counter = field(default_factory=Counter)
    grammar: GrammarState | None = None
    bias: tuple[torch.Tensor, torch.Tensor] | None = None  # token ids [k], biases [k] fp32

    @classmethod
    def create(
        cls, params: SamplingParams, device: torch.device, grammar: GrammarState | None = None
    ) -> RowSampler:
        generator = None
        if params.seed is not None and not params.greedy:
            generator = torch.Generator(device=device)
            generator.manual_seed(params.seed % 2**64)  # choice j seeds with seed + j
        bias = None
        if params.logit_bias:
            ids, values = zip(*params.logit_bias, strict=True)
            bias = (
                torch.tensor(ids, dtype=torch.long, device=device),
                torch.tensor(values, dtype=torch.float32, device=device),
            )
        return cls(params=params, generator=generator, grammar=grammar, bias=bias)

    @property
    def adjusts_logits(self) -> bool:
        return self.grammar is not None or self.bias is not None


def _logprob_tensors(logits: torch.Tensor, token_ids: torch.Tensor, k: int):
    """On logits' device: the chosen tokens' logprobs [N] and the top-k alternatives [N, k]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, token_ids.view(-1, 1)).squeeze(-1)
    top_vals, top_ids = logp.topk(max(k, 1), dim=-1)
    return chosen, top_vals[:, :k], top_ids[:, :k]


def _logprob_entries(tokens: list[int], chosen, top_vals, top_ids) -> list[TokenLogprob]:
    """TokenLogprob per row from host tensors (see _logprob_tensors)."""
    chosen, top_vals, top_ids = chosen.tolist(), top_vals.tolist(), top_ids.tolist()
    out = []
    for row, tok in enumerate(tokens):
        pairs = zip(top_ids[row], top_vals[row], strict=True)
        top = [(t, v) for t, v in pairs if v != -math.inf]  # a masked token is no alternative
        out.append(TokenLogprob(tok, chosen[row], top))
    return out


def top_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> list[TokenLogprob]:
    """logits [N, V] fp32, token_ids [N] -> the chosen tokens' logprobs and top-k alternatives."""
    found = [t.cpu() for t in _logprob_tensors(logits, token_ids, k)]
    return _logprob_entries(token_ids.tolist(), *found)


@dataclass
class Picks:
    """Tokens picked on the device for a batch of rows, on their way to the host."""

    rows: list[RowSampler]
    tokens: torch.Tensor  # [n] int64 on the device: the rows' next input tokens
    host: list[torch.Tensor]  # tokens, then (chosen, top values, top ids) of every row
    logprob_rows: list[int]
    ready: torch.cuda.Event | None  # recorded after the copies to the host (CUDA only)


def pick_tokens(logits: torch.Tensor, rows: list[RowSampler]) -> Picks:
    """Pick one token per row on the device and start copying the picks to the host, without
    waiting for the device: steps launched after this (fed by `Picks.tokens`) run while the
    host waits in `read_picks` for this work only. logits: [B, V] fp32 (only the rows listed
    are used, in order); a row's counts and grammar must already hold its earlier tokens."""
    logits = adjust_logits(logits, rows)
    greedy = [i for i, r in enumerate(rows) if r.params.greedy and not _penalised(r)]
    if len(greedy) == len(rows):  # the common case: one argmax, no gathers (few launches)
        tokens = logits.argmax(-1)
    else:
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        if greedy:
            index = torch.tensor(greedy, device=logits.device)
            tokens[index] = logits[index].argmax(-1)
        for i, row in enumerate(rows):
            if i not in greedy:
                tokens[i] = _sample_one(logits[i], row)
    found: tuple[torch.Tensor, ...] = ()
    logprob_rows = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if logprob_rows:  # for every row (no index to upload); read_picks keeps the rows asking
        k = max(rows[i].params.logprobs or 0 for i in logprob_rows)
        found = _logprob_tensors(logits, tokens, k)
    host = [_to_host(t) for t in (tokens, *found)]
    ready = None
    if tokens.is_cuda:
        ready = torch.cuda.Event()
        ready.record()
    return Picks(rows, tokens, host, logprob_rows, ready)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of `t` that arrives without blocking the host (page-locked, async)."""
    if not t.is_cuda:
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t, non_blocking=True)


def read_picks(picks: Picks) -> tuple[list[int], list[TokenLogprob | None]]:
    """Wait for `picks` (only: later work on the device runs on) and return each row's token
    and logprobs; a row's counts and grammar advance by its token."""
    if picks.ready is not None:
        picks.ready.synchronize()
    token_list = picks.host[0].tolist()
    rows = picks.rows
    for row, tok in zip(rows, token_list, strict=True):
        row.counts[tok] += 1
        if row.grammar is not None:
            row.grammar.advance(tok)
    logprobs: list[TokenLogprob | None] = [None] * len(rows)
    if picks.logprob_rows:
        chosen = [token_list[i] for i in picks.logprob_rows]
        entries = _logprob_entries(chosen, *(t[picks.logprob_rows] for t in picks.host[1:]))
        for i, lp in zip(picks.logprob_rows, entries, strict=True):
            lp.top = lp.top[: rows[i].params.logprobs]
            logprobs[i] = lp
    return token_list, logprobs


def adjust_logits(logits: torch.Tensor, rows: list[RowSampler]) -> torch.Tensor:
    """The rows' logits after their logit bias and grammar masks; `logits` itself when no row
    has either (then nothing is copied: unconstrained batches pay nothing)."""
    adjusted = [i for i, r in enumerate(rows) if r.adjusts_logits]
    if not adjusted:
        return logits
    masked = [i for i in adjusted if rows[i].grammar is not None]
    prepare_all([rows[i].grammar for i in masked])
    if len(masked) == len(rows) and all(r.bias is None for r in rows):  # no copy, no gather
        return apply_masks(logits[: len(rows)], torch.stack([r.grammar.mask for r in rows]))
    logits = logits[: len(rows)].clone()
    for i in adjusted:
        if rows[i].bias is not None:
            ids, values = rows[i].bias
            logits[i].index_add_(0, ids, values)
    if masked:
        masks = torch.stack([rows[i].grammar.mask for i in masked])
        index = torch.tensor(masked, device=logits.device)
        logits[index] = apply_masks(logits[index], masks)
    return logits


def _penalised(row: RowSampler) -> bool:
    return bool(row.counts) and (row.params.presence_penalty or row.params.frequency_penalty)


def _sample_one(logits: torch.Tensor, row: RowSampler) -> torch.Tensor:
    # logits: [V] fp32 -> a 0-d token id tensor
    p = row.params
    logits = logits.clone()
    if _penalised(row):
        ids = torch.tensor(list(row.counts), device=logits.device)
        freq = torch.tensor(list(row.counts.values()), device=logits.device, dtype=logits.dtype)
        logits[ids] -= p.frequency_penalty * freq + p.presence_penalty
    best = logits.argmax()
    if p.greedy:
        return best
    # Shift so the best logit is 0 before dividing: a tiny temperature then sends the others to
    # -inf (probability 0), where dividing first would overflow to inf and make NaN.
    logits = (logits - logits[best]) / p.temperature
    if p.top_k > 0 and p.top_k < logits.numel():
        kth = logits.topk(p.top_k).values[-1]
        logits.masked_fill_(logits < kth, -torch.inf)  # no boolean indexing: no device sync
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
        sorted_probs.masked_fill_(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    # Logits that were not finite (a broken row) leave no distribution to draw from: that row
    # takes its best token, decided on the device (no sync), and its neighbours are untouched.
    # In place: no vocabulary-sized tensor is allocated for it on the decode path.
    broken = ~(torch.isfinite(probs).all() & (probs.sum() > 0))
    probs.masked_fill_(broken, 0.0)
    probs[best] += broken.to(probs.dtype)
    return torch.multinomial(probs, 1, generator=row.generator)[0]
