"""Random-weight checkpoints of real model shapes, for benchmarks on machines without weights.

`random_state` makes the weights (bf16, scaled by fan-in so activations keep a sane size; the
decode benchmark builds its model from it in memory). Run as a script, it writes an HF-format
Llama checkpoint directory that `cats-serve --model DIR` and `cats-calibrate` load, with the
tokenizer files copied from `--tokenizer` (the vocabulary grows to the tokenizer's if larger):

    python benchmarks/random_checkpoint.py --shape llama2-7b \\
        --tokenizer ~/.cache/cats-serve/models/SmolLM2-135M-Instruct.Q4_1-* --out /tmp/llama2-7b
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

SHAPES = {
    "llama2-7b": dict(hidden=4096, inter=11008, layers=32, heads=32, kv=32, vocab=32000, tie=False),
    "mistral-7b": dict(hidden=4096, inter=14336, layers=32, heads=32, kv=8, vocab=32000, tie=False),
    "smollm2-135m": dict(hidden=576, inter=1536, layers=30, heads=9, kv=3, vocab=49152, tie=True),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
SCALE_LOG_STD = 0.21  # std of log(neuron_scale) in the shipped up_rms files of the default model


def random_neuron_scale(inter: int, device: str, seed: int) -> torch.Tensor:
    """Per-neuron weights of the up_rms criterion for random weights: log-normal with the
    spread of the shipped files, mean 1, float32 [I]."""
    gen = torch.Generator(device=device).manual_seed(seed)
    s = (SCALE_LOG_STD * torch.randn(inter, device=device, generator=gen)).exp()
    return (s / s.mean()).float()


def random_state(shape: dict, device: str, seed: int) -> dict[str, torch.Tensor]:
    """HF-named bf16 weights of `shape`: N(0, 1/fan_in) matrices, unit norm weights."""
    s = shape
    gen = torch.Generator(device=device).manual_seed(seed)

    def linear(out_f: int, in_f: int) -> torch.Tensor:
        w = torch.randn(out_f, in_f, device=device, dtype=torch.bfloat16, generator=gen)
        return w.mul_(in_f**-0.5)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, device=device, dtype=torch.bfloat16)

    h, i = s["hidden"], s["inter"]
    kvd = s["kv"] * (h // s["heads"])
    state = {"model.embed_tokens.weight": linear(s["vocab"], h)}
    for n in range(s["layers"]):
        p = f"model.layers.{n}."
        state.update({
            p + "self_attn.q_proj.weight": linear(h, h),
            p + "self_attn.k_proj.weight": linear(kvd, h),
            p + "self_attn.v_proj.weight": linear(kvd, h),
            p + "self_attn.o_proj.weight": linear(h, h),
            p + "mlp.gate_proj.weight": linear(i, h),
            p + "mlp.up_proj.weight": linear(i, h),
            p + "mlp.down_proj.weight": linear(h, i),
            p + "input_layernorm.weight": ones(h),
            p + "post_attention_layernorm.weight": ones(h),
        })  # fmt: skip
    state["model.norm.weight"] = ones(h)
    if not s["tie"]:
        state["lm_head.weight"] = linear(s["vocab"], h)
    return state


def hf_config(shape: dict, eos_token_id: int | None) -> dict:
    s = shape
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": s["vocab"],
        "hidden_size": s["hidden"], "intermediate_size": s["inter"],
        "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv"], "hidden_act": "silu", "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": s["tie"],
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16",
        "bos_token_id": None, "eos_token_id": eos_token_id,
    }  # fmt: skip


def write_checkpoint(shape_name: str, tokenizer_dir: Path, out: Path, seed: int) -> Path:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = dict(SHAPES[shape_name])
    shape["vocab"] = max(shape["vocab"], len(tokenizer))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    state = {k: v.cpu() for k, v in random_state(shape, device, seed).items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(shape, tokenizer.eos_token_id)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="llama2-7b")
    parser.add_argument("--tokenizer", type=Path, required=True, help="dir with tokenizer files")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = write_checkpoint(args.shape, args.tokenizer, args.out, args.seed)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
