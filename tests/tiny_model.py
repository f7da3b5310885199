"""Tiny random Llama-family checkpoints built locally (no hub): config, weights, tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WORDS = (
    "the cat sat on a mat while the dog ran to Paris and back again because it was sunny "
    "one two three four five six seven eight nine ten hello world capital of France is"
).split()


def build_tokenizer(out: Path):
    """A small byte-level BPE tokenizer trained on generated text, saved in HF format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    gen = torch.Generator().manual_seed(0)
    lines = [
        " ".join(WORDS[i] for i in torch.randint(len(WORDS), (12,), generator=gen).tolist())
        for _ in range(200)
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<eos>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def tiny_config(model_type: str = "llama", **overrides):
    from transformers import AutoConfig

    fields = dict(
        vocab_size=400,
        hidden_size=72,
        intermediate_size=200,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        eos_token_id=1,
        bos_token_id=None,
        pad_token_id=None,
    )
    fields.update(overrides)
    return AutoConfig.for_model(model_type, **fields)


def build_checkpoint(
    out: Path, model_type: str = "llama", seed: int = 0, weight_scale: float = 4.0, **overrides
) -> Path:
    """Save a random model of `model_type` plus the tokenizer to `out`; returns `out`."""
    from transformers import AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    # Larger-than-init weights so activations are not all tiny (sparsity levels differ).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(weight_scale)
    model.save_pretrained(out)
    build_tokenizer(out)
    return out
