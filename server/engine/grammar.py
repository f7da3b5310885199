"""Grammar-constrained decoding: a per-request token mask from llguidance, applied before sampling.

Why llguidance (MIT; Rust with an abi3 wheel and no Python dependencies, so one wheel serves the
CPU machine and the GPU one): it computes the mask of a JSON schema or Lark grammar lazily, in
tens to a few hundred microseconds per token on one core with no ahead-of-time index over the
vocabulary, and it drops the GIL while doing so. xgrammar needs torch, triton and transformers
of its own choosing; outlines-core builds a whole index per schema before the first token.

A `Grammars` object belongs to one engine (one tokenizer). `compile()` checks a grammar and
keeps a ready matcher per grammar text (a small LRU), so requests repeating a schema skip the
compilation; each sequence then gets its own `GrammarState`, a copy of that matcher plus its row
of the packed bit mask (32 tokens per int32 word). The engine fills the masks of the next step
while the device runs it (`prepare`), so the mask costs the decode loop only its upload and one
masked fill, and rows without a grammar cost nothing.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

# Compact JSON with the usual single spaces: flexible whitespace lets a small model pad an
# answer with newlines until max_tokens runs out.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 128  # compiled grammars kept (one per distinct schema or tool set)


class GrammarError(ValueError):
    """A schema or grammar that cannot constrain decoding; the message says why."""


def json_schema_grammar(schema: dict) -> str:
    """The llguidance grammar of one JSON schema (compact separators, see JSON_OPTIONS)."""
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)


def lark_json(schema: dict) -> str:
    """A Lark expression for JSON that validates against `schema` (options as JSON_OPTIONS)."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


def lark_grammar(text: str) -> str:
    """The llguidance grammar of a Lark grammar (which may embed `%json {schema}` rules)."""
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_lark(text)


# Text whose tokens must read back byte for byte: JSON punctuation, spaces, a newline and
# multi-byte characters (the bytes a grammar's mask is computed over).
PROBE = '{"key": [1, 2.5, true, null], "text": "a b\\nc"}\n\té€ 🙂'
BYTE_LEVEL_DECODER = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                      "use_regex": True}  # fmt: skip


def checked_tokenizer(hf_tokenizer, vocab_size: int, eos: list[int]):
    """llguidance's view of a fast HF tokenizer, checked: the bytes it gives the tokens of
    PROBE must be PROBE's bytes, or a mask would allow the wrong tokens (GrammarError).

    llguidance tells byte-level vocabularies (GPT-2 style, `Ġ` for a space) from their
    decoder; transformers' GGUF conversion writes some of them with a SentencePiece-style
    decoder chain, which it then reads as literal text. Where the pre-tokenizer is byte-level,
    the decoder is set to plain ByteLevel first."""
    import llguidance

    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GrammarError("constrained decoding needs a fast (Rust) tokenizer")
    backend = copy.copy(backend)
    backend.no_padding()
    backend.no_truncation()
    spec = json.loads(backend.to_str())
    if _byte_level(spec.get("pre_tokenizer")) and not _byte_level(spec.get("decoder"), True):
        spec["decoder"] = BYTE_LEVEL_DECODER
    try:
        tokenizer = llguidance.LLTokenizer(
            json.dumps(spec), n_vocab=vocab_size, eos_token=eos or None
        )
    except ValueError as exc:
        raise GrammarError(f"the grammar library cannot read this tokenizer: {exc}") from exc
    ids = hf_tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    if tokenizer.decode_bytes(ids) != PROBE.encode():
        raise GrammarError(
            "the grammar library reads this tokenizer's vocabulary differently from the "
            "tokenizer itself, so constrained decoding is not available for this model"
        )
    return tokenizer


def _byte_level(part: dict | None, only: bool = False) -> bool:
    """`part` (a pre-tokenizer or decoder spec) is ByteLevel, or with `only` false holds one
    in a sequence."""
    if not part:
        return False
    if part.get("type") == "ByteLevel":
        return True
    inner = part.get("pretokenizers") or part.get("decoders") or []
    return not only and any(_byte_level(p) for p in inner)


@dataclass(frozen=True)
class CompiledGrammar:
    """A checked grammar; `start()` gives a fresh matcher for one sequence."""

    text: str
    _template: object  # llguidance.LLMatcher in its initial state

    def start(self) -> object:
        return self._template.deep_copy()


class Grammars:
    """Compiles grammars for one tokenizer and caches them (thread-safe: API threads compile)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: set[int]):
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self._eos = sorted(eos_token_ids)
        self._tokenizer = None  # built on first use (~0.5 s for a 49k vocabulary)
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def _lltokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = checked_tokenizer(self._hf_tokenizer, self.vocab_size, self._eos)
        return self._tokenizer

    def compile(self, grammar: str) -> CompiledGrammar:
        """A checked, cached grammar; GrammarError with llguidance's reason when it is bad."""
        from llguidance import LLMatcher

        with self._lock:
            found = self._cache.get(grammar)
            if found is not None:
                self._cache.move_to_end(grammar)
                return found
            tokenizer = self._lltokenizer()
        # Compiling drops the GIL and may take a while for a large schema: outside the lock.
        failed, messages = LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if failed:
            raise GrammarError("; ".join(messages) or "the grammar is not valid")
        matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        compiled = CompiledGrammar(grammar, matcher)
        with self._lock:
            self._cache[grammar] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def state(self, compiled: CompiledGrammar) -> GrammarState:
        return GrammarState(compiled.start(), self.words)


class GrammarState:
    """One sequence's grammar: where it is, and the mask of the tokens allowed next."""

    def __init__(self, matcher, words: int):
        self.matcher = matcher
        self.mask = torch.empty(words, dtype=torch.int32)  # packed bits, CPU
        self._ready = False
        self.mask_seconds = 0.0
        self.masks = 0
        self.error: str | None = None

    def prepare(self) -> None:
        """Fill the mask of the next token if it is not filled yet."""
        if self._ready or self.error is not None:
            return
        start = time.perf_counter()
        self.matcher.unsafe_compute_mask_ptr(self.mask.data_ptr(), self.mask.numel() * 4)
        self.mask_seconds += time.perf_counter() - start
        self.masks += 1
        self._ready = True

    def advance(self, token: int) -> None:
        """Consume the sampled token; a token the grammar refuses sets `error`."""
        self._ready = False
        if self.error is None and not self.matcher.consume_token(token):
            self.error = self.matcher.get_error() or f"token {token} does not fit the grammar"

    @property
    def finished(self) -> bool:
        """The grammar is complete: nothing but the end of the sequence may follow."""
        return self.error is None and self.matcher.is_stopped()

    @property
    def mean_mask_seconds(self) -> float | None:
        return self.mask_seconds / self.masks if self.masks else None


def prepare_all(states: list[GrammarState]) -> None:
    """`prepare()` every state, in turn. (llguidance's LLExecutor computes several masks in
    parallel, but on the H200 host 8 masks that way made a step slower than 8 in turn:
    benchmarks/results/bench_structured_h200_executor.json.)"""
    for state in states:
        state.prepare()


_BITS: dict[torch.device, torch.Tensor] = {}


def apply_masks(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """logits [n, V] with every token whose bit is 0 in `masks` [n, W] (int32, CPU) set to
    -inf; returns a new tensor. Tokens past 32 * W are never allowed."""
    device = logits.device
    bits = _BITS.get(device)
    if bits is None:
        bits = _BITS[device] = torch.arange(32, dtype=torch.int32, device=device)
    packed = masks.to(device, non_blocking=True)
    allowed = ((packed.unsqueeze(-1) >> bits) & 1).view(packed.shape[0], -1).bool()
    n_vocab = logits.shape[-1]
    if allowed.shape[-1] < n_vocab:
        pad = torch.zeros(allowed.shape[0], n_vocab - allowed.shape[-1], dtype=torch.bool)
        allowed = torch.cat([allowed, pad.to(device)], dim=-1)
    return logits.masked_fill(~allowed[:, :n_vocab], -torch.inf)
