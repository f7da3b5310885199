"""The thresholds shipped for the default model: one file per level, valid, on target."""

from __future__ import annotations

import json

import pytest
import torch

from cats_serve.calibration.shipped import DEFAULT_SPARSITY, default_thresholds_files
from cats_serve.calibration.thresholds_file import load_thresholds


def shipped(fingerprint=None, sizes=None):
    files = []
    for path in default_thresholds_files():
        if sizes is None:  # validate against the model the first file names
            m = json.loads(path.read_text())["model"]
            sizes = {k: m[k] for k in ("num_layers", "hidden_size", "intermediate_size")}
        files.append(load_thresholds(path, **sizes, fingerprint=fingerprint))
    return files


def test_one_file_per_level_and_default_is_loaded():
    files = shipped()
    levels = [f.target_sparsity for f in files]
    assert len(levels) == len(set(levels)) >= 2
    assert DEFAULT_SPARSITY == 0.0 or DEFAULT_SPARSITY in levels
    assert {f.model_name for f in files} == {"SmolLM2-135M-Instruct"}
    assert len({f.model.fingerprint for f in files}) == 1
    # the server serves them together: one criterion, one set of per-neuron weights
    assert {f.criterion for f in files} == {"up_rms"}
    assert all(f.neuron_scale == files[0].neuron_scale for f in files)


def test_shipped_files_hit_their_target_on_heldout_text():
    for f in shipped():
        assert f.mean_sparsity == pytest.approx(f.target_sparsity, abs=1e-6)
        assert abs(f.heldout.mean_sparsity - f.target_sparsity) <= 0.03, f.path
        assert f.heldout.tokens > 0 and f.calibration.tokens > 0


@pytest.mark.slow
def test_shipped_thresholds_on_the_real_default_model(default_checkpoint):
    from transformers import AutoTokenizer

    from cats_serve.calibration.scoring import score_text
    from cats_serve.calibration.text_data import load_documents, pack_documents, pad_batches
    from cats_serve.server.model.loader import load_model

    loaded = load_model(default_checkpoint, dtype=torch.float32, device="cpu")
    c = loaded.model.config
    sizes = dict(
        num_layers=c.num_layers, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size
    )
    files = shipped(fingerprint=loaded.fingerprint, sizes=sizes)  # the weights match
    tokenizer = AutoTokenizer.from_pretrained(default_checkpoint)
    docs = load_documents("lambada", "heldout").texts
    windows, _ = pack_documents(tokenizer, docs, seq_len=512, max_tokens=1024)
    batches = list(pad_batches(windows, 2048))
    dense = score_text(loaded.model, batches, None, progress=False)
    for f in files:
        loaded.model.set_neuron_scale(f.neuron_scale)
        sparse = score_text(loaded.model, batches, f.layer_thresholds(), progress=False)
        assert abs(sparse.mean_row_sparsity - f.target_sparsity) <= 0.03, f.path
        assert dense.perplexity < sparse.perplexity < 2 * dense.perplexity
