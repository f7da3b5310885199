"""A tiny random Llama checkpoint shaped for calibration, and calibration text, built offline."""

from __future__ import annotations

import pytest
import torch
from tiny_model import build_checkpoint

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
    # Larger-than-init weights: activations spread over many histogram bins.
    return build_checkpoint(
        tmp_path_factory.mktemp("calib-tiny"),
        weight_scale=5.0,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib-text") / "text.txt"
    write_text(path, documents=120)
    return path
