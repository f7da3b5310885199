"""Grammar-constrained sampling and logit bias: the masks llguidance computes, their packing and
application on odd vocabulary sizes, sampled tokens that always fit, a cache of compiled
grammars, and rows without a constraint left untouched."""

from __future__ import annotations

import json

import pytest
import torch

from cats_serve.server.engine.grammar import (
    CACHE_SIZE,
    GrammarError,
    Grammars,
    apply_masks,
    json_schema_grammar,
    lark_grammar,
)
from cats_serve.server.engine.sampling import (
    RowSampler,
    SamplingParams,
    pick_tokens,
    read_picks,
)

CPU = torch.device("cpu")
EOS = 1


def sample_rows(logits: torch.Tensor, rows: list[RowSampler]):
    """Pick on the device, then read: what the engine does for a step's rows."""
    return read_picks(pick_tokens(logits, rows))


SCHEMA = {
    "type": "object",
    "properties": {"pet": {"enum": ["cat", "dog"]}, "ok": {"type": "boolean"}},
    "required": ["pet", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def grammars(tokenizer) -> Grammars:
    return Grammars(tokenizer, vocab_size=len(tokenizer), eos_token_ids={EOS})


def unpacked(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Reference unpacking: bit j of word w allows token 32 w + j."""
    bits = [(int(mask[t // 32]) >> (t % 32)) & 1 for t in range(n)]
    return torch.tensor(bits, dtype=torch.bool)


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 400, 1000])
def test_apply_masks_matches_the_bitwise_reference(vocab):
    gen = torch.Generator().manual_seed(vocab)
    words = (vocab + 31) // 32
    masks = torch.randint(-(2**31), 2**31 - 1, (3, words), generator=gen, dtype=torch.int64)
    masks = masks.to(torch.int32)
    logits = torch.randn(3, vocab, generator=gen)
    out = apply_masks(logits, masks)
    for row in range(3):
        allowed = unpacked(masks[row], vocab)
        assert torch.equal(out[row][allowed], logits[row][allowed])
        assert torch.all(out[row][~allowed] == -torch.inf)


def test_tokens_past_the_mask_are_never_allowed():
    logits = torch.zeros(1, 40)
    out = apply_masks(logits, torch.full((1, 1), -1, dtype=torch.int32))  # 32 tokens allowed
    assert torch.all(out[0, :32] == 0) and torch.all(out[0, 32:] == -torch.inf)


def test_the_mask_allows_exactly_what_the_grammar_accepts(grammars, tokenizer):
    state = grammars.state(grammars.compile(json_schema_grammar(SCHEMA)))
    text = '{"pet": "dog", "ok": true}'
    for token in tokenizer.encode(text):
        state.prepare()
        allowed = unpacked(state.mask, len(tokenizer))
        assert allowed[token], tokenizer.decode([token])
        assert 0 < int(allowed.sum()) < len(tokenizer)
        state.advance(token)
        assert state.error is None
    assert state.finished
    state.prepare()
    assert unpacked(state.mask, len(tokenizer)).nonzero().flatten().tolist() == [EOS]
    assert state.masks == len(tokenizer.encode(text)) + 1 and state.mean_mask_seconds > 0


@pytest.mark.parametrize("seed", range(4))
def test_sampling_under_a_schema_always_gives_valid_json(grammars, tokenizer, seed):
    """Random logits (and a random sampler) decode only answers that validate."""
    row = RowSampler.create(
        SamplingParams(temperature=1.0, seed=seed),
        CPU,
        grammars.state(grammars.compile(json_schema_grammar(SCHEMA))),
    )
    gen = torch.Generator().manual_seed(seed)
    tokens = []
    while not row.grammar.finished and len(tokens) < 200:
        [token], _ = sample_rows(torch.randn(1, len(tokenizer), generator=gen) * 5, [row])
        tokens.append(token)
    answer = json.loads(tokenizer.decode(tokens))
    assert answer["pet"] in ("cat", "dog") and isinstance(answer["ok"], bool)
    assert set(answer) == {"pet", "ok"}


def test_constrained_and_free_rows_share_a_batch(grammars, tokenizer):
    logits = torch.randn(3, len(tokenizer), generator=torch.Generator().manual_seed(1))
    free = RowSampler.create(SamplingParams(temperature=0.0), CPU)
    bound = RowSampler.create(
        SamplingParams(temperature=0.0),
        CPU,
        grammars.state(grammars.compile(lark_grammar('start: "the cat"'))),
    )
    tokens, _ = sample_rows(logits, [free, bound, free])
    assert tokens[0] == int(logits[0].argmax()) and tokens[2] == int(logits[2].argmax())
    piece = tokenizer.decode([tokens[1]])
    assert piece and "the cat".startswith(piece)


def test_logprobs_describe_the_masked_distribution(grammars):
    logits = torch.randn(1, grammars.vocab_size, generator=torch.Generator().manual_seed(2))
    row = RowSampler.create(
        SamplingParams(temperature=0.0, logprobs=5),
        CPU,
        grammars.state(grammars.compile(lark_grammar('start: "cat" | "dog"'))),
    )
    _, [lp] = sample_rows(logits, [row])
    assert 1 <= len(lp.top) <= 5  # only allowed tokens are alternatives, none at -inf
    assert sum(torch.tensor([v for _, v in lp.top]).exp()) <= 1.0 + 1e-5
    assert lp.logprob == lp.top[0][1] and lp.logprob > -5.0


def test_logit_bias_moves_the_greedy_choice():
    logits = torch.zeros(1, 10)
    logits[0, 3] = 2.0
    assert sample_rows(logits, [RowSampler.create(SamplingParams(temperature=0.0), CPU)])[0] == [3]
    pushed = RowSampler.create(SamplingParams(temperature=0.0, logit_bias=((7, 5.0),)), CPU)
    assert sample_rows(logits, [pushed])[0] == [7]
    banned = RowSampler.create(SamplingParams(temperature=0.0, logit_bias=((3, -100.0),)), CPU)
    assert sample_rows(logits, [banned])[0] != [3]


def test_rows_without_constraints_are_not_copied(monkeypatch):
    from cats_serve.server.engine import sampling

    calls = []
    monkeypatch.setattr(sampling, "apply_masks", lambda *a: calls.append(a))
    logits = torch.randn(2, 10)
    rows = [RowSampler.create(SamplingParams(temperature=0.0), CPU) for _ in range(2)]
    assert sampling.adjust_logits(logits, rows) is logits
    assert calls == []


def test_compiled_grammars_are_cached_and_bounded(tokenizer):
    grammars = Grammars(tokenizer, vocab_size=len(tokenizer), eos_token_ids={EOS})
    text = json_schema_grammar(SCHEMA)
    first = grammars.compile(text)
    assert grammars.compile(text) is first
    for i in range(CACHE_SIZE):
        grammars.compile(lark_grammar(f'start: "{i}"'))
    assert grammars.compile(text) is not first  # evicted, compiled again


@pytest.mark.parametrize(
    "grammar",
    [
        json_schema_grammar({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}),
        json_schema_grammar({"type": "wizard"}),
        lark_grammar("start: ("),
    ],
)
def test_bad_grammars_raise_with_the_reason(grammars, grammar):
    with pytest.raises(GrammarError) as info:
        grammars.compile(grammar)
    assert str(info.value)


def with_parts(tokenizer, **parts):
    """A copy of `tokenizer` with other backend parts (decoder, pre_tokenizer)."""
    import copy

    other = copy.deepcopy(tokenizer)
    for name, value in parts.items():
        setattr(other.backend_tokenizer, name, value)
    return other


def test_a_byte_level_vocabulary_behind_a_sentencepiece_decoder_is_read_as_bytes(tokenizer):
    """transformers' GGUF conversion writes some GPT-2-style vocabularies with a decoder chain
    that llguidance reads as literal text (`Ġ` for a space): the mask must still be right."""
    from tokenizers import decoders

    chain = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("▁", " "), decoders.ByteLevel()]
    )
    converted = with_parts(tokenizer, decoder=chain)
    grammars = Grammars(converted, vocab_size=len(tokenizer), eos_token_ids={EOS})
    state = grammars.state(grammars.compile(lark_grammar('start: "the cat sat"')))
    state.advance(tokenizer.encode("the")[0])
    state.prepare()
    allowed = unpacked(state.mask, len(tokenizer)).nonzero().flatten().tolist()
    assert allowed and all(" cat sat".startswith(tokenizer.decode([t])) for t in allowed)


def test_a_vocabulary_the_grammar_library_misreads_is_refused(tokenizer):
    from tokenizers import decoders, pre_tokenizers

    misread = with_parts(
        tokenizer,
        decoder=decoders.Sequence([decoders.Replace("▁", " ")]),
        pre_tokenizer=pre_tokenizers.Whitespace(),
    )
    grammars = Grammars(misread, vocab_size=len(tokenizer), eos_token_ids={EOS})
    with pytest.raises(GrammarError, match="grammar library"):
        grammars.compile(lark_grammar('start: "x"'))
