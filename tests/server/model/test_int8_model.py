"""The decoder with int8 weights (`quantize="int8"`): on a checkpoint whose weights already lie
on the int8 grid, it computes what the full-precision decoder computes, through score,
prefill and decode (PyTorch path, and the Triton kernels through the interpreter), dense and
sparse, with the LM head in int8 or kept in full precision."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_model import build_checkpoint

from cats_serve.kernels.int8 import Int8Matrix, quantize_int8
from cats_serve.server.model.kv_cache import KVCache
from cats_serve.server.model.loader import load_model

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def on_int8_grid(path):
    """Round every linear layer's weight (and a tied embedding) to its int8 grid in place."""
    file = path / "model.safetensors"
    state = load_file(file)
    for name, w in state.items():
        if any(part in name for part in LINEAR) or name == "model.embed_tokens.weight":
            state[name] = quantize_int8(w).weight(torch.float32).contiguous()
    save_file(state, file, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module", params=["llama", "llama-tied"])
def models(request, tmp_path_factory):
    tied = request.param == "llama-tied"
    path = on_int8_grid(
        build_checkpoint(tmp_path_factory.mktemp(request.param), "llama", seed=2,
                         tie_word_embeddings=tied)
    )  # fmt: skip
    full = load_model(path, dtype=torch.float32, device="cpu").model
    int8 = load_model(path, dtype=torch.float32, device="cpu", quantize="int8").model
    return full, int8, path


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 380, (n,), generator=torch.Generator().manual_seed(seed))


def test_every_linear_layer_is_int8(models):
    _, int8, path = models
    layer = int8.layers[0]
    for w in (layer.wqkv, layer.wo, layer.w_gate, layer.w_up, layer.w_down_t, int8.lm_head):
        assert isinstance(w, Int8Matrix) and w.q.dtype == torch.int8
    assert not layer.w_down_t.transposed  # a CPU without Triton: torch's packed layout
    assert int8.embed.dtype == torch.float32
    kept = load_model(path, dtype=torch.float32, device="cpu", quantize="int8", int8_lm_head=False)
    assert isinstance(kept.model.lm_head, torch.Tensor)


@torch.inference_mode()
def test_score_matches_full_precision(models):
    full, int8, _ = models
    batch = torch.stack([tokens(40, 0), tokens(40, 1)])  # 80 rows: the dequantized GEMM
    real = torch.ones_like(batch, dtype=torch.bool)
    for level in (0.0, 0.3):
        t = torch.full((full.config.num_layers,), level)
        torch.testing.assert_close(int8.score(batch, real, t), full.score(batch, real, t),
                                   atol=1e-4, rtol=1e-4)  # fmt: skip


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("path", ["dense", "sparse"])
@torch.inference_mode()
def test_prefill_and_decode_match_full_precision(models, kernels, path, monkeypatch, tmp_path):
    full, int8, ckpt = models
    if kernels == "triton":
        if torch.cuda.is_available():
            pytest.skip("the kernels were compiled for the GPU; these tensors live on the CPU")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        # Triton reads W_down transposed: the loader stores it so where the kernels run
        int8 = load_model(ckpt, dtype=torch.float32, device="cpu", quantize="int8").model
        assert int8.layers[0].w_down_t.transposed
    # the CPU's packed int8 products take bfloat16 activations (which also moves a neuron
    # near its threshold across it now and then)
    tol = 1e-4 if kernels == "triton" else 1e-1
    c = full.config
    prompts = [tokens(9, 4), tokens(5, 5), tokens(12, 6)]
    thresholds = torch.zeros(2, c.num_layers, 3)
    thresholds[0, :, 1] = 0.2  # rows at different levels, one with a second threshold
    thresholds[0, :, 2], thresholds[1, :, 2] = 0.1, 0.01
    outs = []
    for model in (full, int8):
        cache = KVCache.allocate(c, 3, 32, dtype=torch.float32, device=torch.device("cpu"))
        last = model.prefill([p[:-1] for p in prompts], [0, 1, 2],
                             thresholds.permute(2, 0, 1), cache)  # fmt: skip
        counts = torch.zeros(2, c.num_layers, 4, dtype=torch.int32)
        step = model.decode(
            torch.stack([p[-1] for p in prompts]), torch.tensor([len(p) - 1 for p in prompts]),
            thresholds, cache, counts, kv_len=32, mlp_path=path,
        )  # fmt: skip
        outs.append((torch.stack(last), step, counts))
    (prefill_f, step_f, counts_f), (prefill_8, step_8, counts_8) = outs
    torch.testing.assert_close(prefill_8, prefill_f, atol=tol, rtol=tol)
    torch.testing.assert_close(step_8, step_f, atol=tol, rtol=tol)
    if kernels == "triton":  # the same activations: the same neurons active
        assert torch.equal(counts_8, counts_f)
    assert (step_8.argmax(-1) == step_f.argmax(-1)).all()
