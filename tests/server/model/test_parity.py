"""Our decoder against HF transformers: same logits through score, prefill and decode."""

from __future__ import annotations

import pytest
import torch
from tiny_model import build_checkpoint

from cats_serve.server.model.kv_cache import KVCache
from cats_serve.server.model.loader import load_model

# fp32 end to end on CPU; only summation order differs from transformers (fused qkv, SDPA).
ATOL = 2e-4

FAMILIES = {
    "llama": {},
    "llama3-rope": {
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    },
    "llama-linear-rope": {
        "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    },
    "llama-tied": {"tie_word_embeddings": True},
    "mistral": {},
    "qwen2": {},
}


def _model_type(family: str) -> str:
    return family.split("-")[0].removesuffix("3")


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    family = request.param
    path = build_checkpoint(
        tmp_path_factory.mktemp(family), _model_type(family), seed=1, **FAMILIES[family]
    )
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_model(path, dtype=torch.float32, device="cpu").model
    return ref, ours


def _tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 380, (n,), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def test_score_matches_transformers(pair):
    ref, ours = pair
    tokens = torch.stack([_tokens(17, 0), _tokens(17, 1)])
    expected = ref(tokens).logits
    zeros = torch.zeros(ours.config.num_layers)
    got = ours.score(tokens, torch.ones_like(tokens, dtype=torch.bool), zeros)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@torch.inference_mode()
def test_padding_does_not_change_real_positions(pair):
    _, ours = pair
    zeros = torch.zeros(ours.config.num_layers)
    short = _tokens(9, 3)
    alone = ours.score(short[None], torch.ones(1, 9, dtype=torch.bool), zeros)[0]
    padded = torch.cat([short, torch.zeros(5, dtype=torch.long)])[None]
    real = torch.arange(14)[None] < 9
    batched = ours.score(padded, real, zeros)[0, :9]
    torch.testing.assert_close(batched, alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@torch.inference_mode()
def test_prefill_then_decode_matches_transformers(pair, kernels, monkeypatch):
    """Decode through the PyTorch path and through the Triton kernels (attention and MLP; on a
    CPU through Triton's interpreter, which tests/conftest.py defined them for)."""
    if kernels == "triton":
        if torch.cuda.is_available():
            pytest.skip("the kernels were compiled for the GPU; these tensors live on the CPU")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    ref, ours = pair
    n_layers = ours.config.num_layers
    prompts = [_tokens(11, 4), _tokens(6, 5), _tokens(14, 6)]
    cache = KVCache.allocate(ours.config, 3, 64, dtype=torch.float32, device=torch.device("cpu"))
    zeros = torch.zeros(n_layers)
    # one padded batch (prompts of 10, 5 and 13 tokens) into slots 0, 1, 2
    batched = ours.prefill(
        [p[:-1] for p in prompts], [0, 1, 2], zeros.expand(3, -1), cache, all_logits=[True] * 3
    )
    for prompt, logits in zip(prompts, batched, strict=True):
        expected = ref(prompt[None, :-1]).logits[0]
        torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
    _check_one_decode_step(ref, ours, prompts, cache, kv_len=64)


def _check_one_decode_step(ref, ours, prompts, cache, *, kv_len):
    """One batched decode step, every slot b feeding prompts[b]'s last token at its own
    position after a prefill of the rest, against transformers on the whole prompt."""
    n_layers, b = ours.config.num_layers, len(prompts)
    tokens = torch.stack([p[-1] for p in prompts])
    positions = torch.tensor([len(p) - 1 for p in prompts])
    counts = torch.zeros(n_layers, b + 1, dtype=torch.int32)
    logits = ours.decode(tokens, positions, torch.zeros(n_layers, b), cache, counts, kv_len=kv_len)
    for slot, prompt in enumerate(prompts):
        expected = ref(prompt[None]).logits[0, -1]
        torch.testing.assert_close(logits[slot], expected, atol=ATOL, rtol=0)


@torch.inference_mode()
def test_threshold_changes_output_and_counts_active(pair):
    _, ours = pair
    cfg = ours.config
    tokens = _tokens(12, 7)[None]
    real = torch.ones_like(tokens, dtype=torch.bool)
    counts = torch.zeros(cfg.num_layers, 1, dtype=torch.int32)
    dense = ours.score(tokens, real, torch.zeros(cfg.num_layers), active_count=counts)
    assert (counts == 12 * cfg.intermediate_size).all()
    counts.zero_()
    sparse = ours.score(tokens, real, torch.full((cfg.num_layers,), 0.5), active_count=counts)
    assert (counts < 12 * cfg.intermediate_size).all()
    assert not torch.allclose(sparse, dense)
    counts.zero_()
    # an infinite threshold switches every MLP neuron off
    ours.score(tokens, real, torch.full((cfg.num_layers,), torch.inf), active_count=counts)
    assert (counts == 0).all()


@pytest.mark.slow
@torch.inference_mode()
def test_default_model_matches_transformers(default_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_checkpoint)
    ids = torch.tensor(tok("The capital of France is")["input_ids"])[None]
    ref = AutoModelForCausalLM.from_pretrained(default_checkpoint, dtype=torch.float32)
    ours = load_model(default_checkpoint, dtype=torch.float32, device="cpu").model
    expected = ref(ids).logits
    got = ours.score(ids, torch.ones_like(ids, dtype=torch.bool), torch.zeros(30))
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)


@torch.inference_mode()
def test_batched_prefill_matches_one_prompt_at_a_time(pair):
    _, ours = pair
    c = ours.config
    prompts = [_tokens(9, 7), _tokens(3, 8), _tokens(12, 9)]
    levels = torch.stack([torch.full((c.num_layers,), t) for t in (0.0, 0.05, 0.3)])

    def cache():
        return KVCache.allocate(c, 3, 32, dtype=torch.float32, device=torch.device("cpu"))

    solo_cache, batch_cache = cache(), cache()
    solo = [
        ours.prefill([p], [slot], levels[slot : slot + 1], solo_cache)[0]
        for slot, p in enumerate(prompts)
    ]
    slots = [2, 0, 1]  # rows land in other slots than their index
    together = ours.prefill(prompts, slots, levels, batch_cache)
    dense = ours.prefill([prompts[2]], [0], levels[:1], cache())[0]
    assert not torch.allclose(solo[2], dense, atol=1e-3)  # the row's threshold matters
    for row, (prompt, slot) in enumerate(zip(prompts, slots, strict=True)):
        torch.testing.assert_close(together[row], solo[row], atol=1e-5, rtol=0)
        n = len(prompt)
        for i in range(c.num_layers):
            for got, want in ((batch_cache.k, solo_cache.k), (batch_cache.v, solo_cache.v)):
                torch.testing.assert_close(got[i][slot, :, :n], want[i][row, :, :n])


@torch.inference_mode()
def test_neuron_scale_weights_the_criterion_in_every_entry_point(pair):
    """score, prefill and decode apply |SiLU(gate_i)| * s_i > t; counts follow the same rule."""
    import torch.nn.functional as F

    _, ours = pair
    c = ours.config
    gen = torch.Generator().manual_seed(3)
    scales = (0.2 + 4.8 * torch.rand(c.num_layers, c.intermediate_size, generator=gen)).tolist()
    prompt = _tokens(11, 4)
    tokens, real = prompt[None], torch.ones(1, 11, dtype=torch.bool)
    t = torch.full((c.num_layers,), 0.3)
    plain = ours.score(tokens, real, t)
    expected_active = torch.zeros(c.num_layers, dtype=torch.int64)

    def count_by_hand(layer, h):
        g = F.silu(h @ ours.layers[layer].w_gate.t()).abs()
        expected_active[layer] += int((g * torch.tensor(scales[layer]) > 0.3).sum())

    try:
        ours.set_neuron_scale(scales)
        counts = torch.zeros(c.num_layers, 1, dtype=torch.int32)
        scored = ours.score(tokens, real, t, on_mlp_input=count_by_hand, active_count=counts)
        assert torch.equal(counts[:, 0].long(), expected_active)
        assert not torch.allclose(scored, plain, atol=1e-3)  # the weights change the answer
        cache = KVCache.allocate(c, 1, 32, dtype=torch.float32, device=torch.device("cpu"))
        (pre,) = ours.prefill([prompt[:-1]], [0], t[None], cache, all_logits=[True])
        torch.testing.assert_close(pre, scored[0, :-1], atol=1e-4, rtol=0)
        step_counts = torch.zeros(c.num_layers, 2, dtype=torch.int32)
        last = ours.decode(
            prompt[-1:], torch.tensor([10]), t[:, None], cache, step_counts, kv_len=32
        )
        torch.testing.assert_close(last[0], scored[0, -1], atol=1e-4, rtol=0)
        with pytest.raises(ValueError, match="neuron_scale must be"):
            ours.set_neuron_scale(scales[:-1])
    finally:
        ours.set_neuron_scale(None)
    torch.testing.assert_close(ours.score(tokens, real, t), plain, atol=0, rtol=0)


@pytest.mark.parametrize("path", ["sparse", "dense"])
@torch.inference_mode()
def test_single_threshold_decode_fills_the_down_counts(pair, path):
    # the engine's form when no loaded level has a second threshold: [L, B] thresholds with a
    # [2, L, B + 1] counter run the single-threshold kernels and report every active neuron
    # as reading its W_down row, with the logits of t_down = 0
    _, ours = pair
    c = ours.config
    prompts = [_tokens(9, 3), _tokens(6, 4)]
    t = torch.tensor([[0.2, 0.0]]).expand(c.num_layers, 2).contiguous()  # a sparse, a dense row
    results = []
    for thresholds in (t, torch.stack([t, torch.zeros_like(t)])):
        cache = KVCache.allocate(c, 2, 32, dtype=torch.float32, device=torch.device("cpu"))
        ours.prefill([p[:-1] for p in prompts], [0, 1], torch.zeros(2, c.num_layers), cache)
        counts = torch.zeros(2, c.num_layers, 3, dtype=torch.int32)
        logits = ours.decode(
            torch.stack([p[-1] for p in prompts]), torch.tensor([8, 5]), thresholds, cache,
            counts, kv_len=32, mlp_path=path,
        )  # fmt: skip
        results.append((logits, counts))
    (single, single_counts), (pair_form, pair_counts) = results
    assert torch.equal(single_counts[1], single_counts[0])
    assert torch.equal(single_counts, pair_counts)
    assert (single_counts[0, :, 0] < c.intermediate_size).all()  # the sparse row
    assert (single_counts[0, :, 1] == c.intermediate_size).all()  # the dense row
    torch.testing.assert_close(single, pair_form, atol=1e-5, rtol=0)


@torch.inference_mode()
def test_compiled_decode_blocks_match_transformers(tmp_path):
    """The decode path the GPU engine runs: the layers' small ops compiled by torch.compile
    (decode_qkv_block, decode_output_block; here Inductor's CPU code), the projections and the
    attention and MLP kernels outside them."""
    from transformers import AutoModelForCausalLM

    path = build_checkpoint(tmp_path, "llama", seed=2)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_model(path, dtype=torch.float32, device="cpu").model
    ours.compile_decode_blocks()
    n_layers = ours.config.num_layers
    prompts = [_tokens(9, 7), _tokens(12, 8)]
    cache = KVCache.allocate(ours.config, 2, 32, dtype=torch.float32, device=torch.device("cpu"))
    zeros = torch.zeros(n_layers)
    ours.prefill([p[:-1] for p in prompts], [0, 1], zeros.expand(2, -1), cache)
    _check_one_decode_step(ref, ours, prompts, cache, kv_len=32)
