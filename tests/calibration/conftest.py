"""A tiny random Llama checkpoint (config + weights + byte-level BPE tokenizer), built offline."""

from __future__ import annotations

import pytest
import torch

WORDS = "the a cat dog sat ran on to mat park and then it was sunny cold one two three".split()


def write_text(path, documents: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    paragraphs = []
    for _ in range(documents):
        idx = torch.randint(
            len(WORDS), (int(torch.randint(8, 30, (1,), generator=gen)),), generator=gen
        )
        paragraphs.append(" ".join(WORDS[i] for i in idx.tolist()) + ".")
    path.write_text("\n\n".join(paragraphs) + "\n")


@pytest.fixture(scope="session")
def calib_checkpoint(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("calib-tiny")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(out)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger-than-init weights: activations spread over many bins
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib-text") / "text.txt"
    write_text(path, documents=120)
    return path
