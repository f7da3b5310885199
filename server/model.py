"""A compact Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) with CATS MLPs.

Weights are plain tensors (no nn.Module tree): q/k/v fused into one matrix, `W_down` stored
transposed once (`[intermediate, hidden]`, each neuron a contiguous row, the layout the sparse
kernels read) and the original dropped. Three entry points share the layer code:
- `decode`:  one token for each of the first B cache slots (continuous batching);
- `prefill`: one prompt into one cache slot, dense matmuls with the CATS threshold applied;
- `score`:   a padded batch without a cache (calibration and evaluation).
Thresholds are per layer and per row (`[num_layers, B]`), so rows at different sparsity levels
share a step; a threshold of 0 keeps every neuron (dense). A layer may also carry per-neuron
weights of the criterion (`neuron_scale`, from a thresholds file of the up-weighted criterion;
see `set_neuron_scale`): neuron i is then active when |SiLU(gate)_i| * s_i > t.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cats_serve.calibration.fingerprint import weights_fingerprint
from cats_serve.kernels import cats_mlp_decode, cats_mlp_prefill, decode_attention
from cats_serve.server.kv_cache import KVCache
from cats_serve.server.layers import (
    apply_rope,
    decode_output_block,
    decode_qkv_block,
    rms_norm,
)
from cats_serve.server.model_config import ModelConfig, rope_inv_freq

MlpInputHook = Callable[[int, torch.Tensor], None]


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [H]
    wqkv: torch.Tensor  # [(nh + 2 nkv) * D, H]
    bqkv: torch.Tensor | None  # [(nh + 2 nkv) * D]
    wo: torch.Tensor  # [H, nh * D]
    mlp_norm: torch.Tensor  # [H]
    w_gate: torch.Tensor  # [I, H]
    w_up: torch.Tensor  # [I, H]
    w_down_t: torch.Tensor  # [I, H]  (W_down transposed)
    neuron_scale: torch.Tensor | None = None  # [I] fp32: weights of the CATS criterion


class LlamaModel:
    def __init__(
        self,
        config: ModelConfig,
        state: dict[str, torch.Tensor],
        inv_freq: torch.Tensor,
        rope_scaling: float,
        *,
        dtype: torch.dtype,
        device: str | torch.device,
    ):
        self.config = config
        self.dtype = dtype
        self.decode_qkv, self.decode_output = decode_qkv_block, decode_output_block
        self.device = torch.device(device)

        def take(name: str) -> torch.Tensor:
            if name not in state:
                raise ValueError(f"checkpoint has no tensor {name!r}")
            return state.pop(name).to(device=self.device, dtype=dtype)

        self.embed = take("model.embed_tokens.weight")
        self.layers: list[LayerWeights] = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            qkv = [take(p + f"self_attn.{n}_proj.weight") for n in "qkv"]
            bias = (
                torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
                if config.attention_bias
                else None
            )
            self.layers.append(
                LayerWeights(
                    attn_norm=take(p + "input_layernorm.weight"),
                    wqkv=torch.cat(qkv).contiguous(),
                    bqkv=bias,
                    wo=take(p + "self_attn.o_proj.weight"),
                    mlp_norm=take(p + "post_attention_layernorm.weight"),
                    w_gate=take(p + "mlp.gate_proj.weight"),
                    w_up=take(p + "mlp.up_proj.weight"),
                    w_down_t=take(p + "mlp.down_proj.weight").t().contiguous(),
                )
            )
        self.final_norm = take("model.norm.weight")
        if config.tie_word_embeddings or "lm_head.weight" not in state:
            state.pop("lm_head.weight", None)
            self.lm_head = self.embed
        else:
            self.lm_head = take("lm_head.weight")
        # rope tables [max_positions, D/2], fp32 for accuracy at long positions
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        angles = torch.outer(positions, inv_freq)
        self.rope_cos = (angles.cos() * rope_scaling).to(self.device)
        self.rope_sin = (angles.sin() * rope_scaling).to(self.device)

    def set_neuron_scale(self, scales: list[list[float]] | None) -> None:
        """Per-layer, per-neuron weights of the CATS criterion ([L][I]), or None for the plain
        |SiLU(gate)| > t of the CATS paper. Set before CUDA graphs are captured: the kernels
        read these tensors in place."""
        c = self.config
        if scales is not None and (
            len(scales) != c.num_layers or any(len(s) != c.intermediate_size for s in scales)
        ):
            raise ValueError(
                f"neuron_scale must be [{c.num_layers}][{c.intermediate_size}] "
                f"(layers x intermediate size)"
            )
        for i, layer in enumerate(self.layers):
            layer.neuron_scale = (
                None
                if scales is None
                else torch.tensor(scales[i], dtype=torch.float32, device=self.device)
            )

    # ---- building blocks -------------------------------------------------------------------

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, weight, self.config.rms_norm_eps)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [..., T, n, D]; positions: [..., T]
        cos = self.rope_cos[positions].unsqueeze(-2)  # [..., T, 1, D/2]
        sin = self.rope_sin[positions].unsqueeze(-2)
        return apply_rope(x, cos, sin)

    def _qkv(self, layer: LayerWeights, h: torch.Tensor, positions: torch.Tensor):
        # h: [B, T, H] -> q [B, nh, T, D], k/v [B, nkv, T, D]
        c = self.config
        b, t, _ = h.shape
        qkv = F.linear(h, layer.wqkv, layer.bqkv)
        q, k, v = qkv.split(
            [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim],
            dim=-1,
        )
        q = self._rope(q.view(b, t, c.num_heads, c.head_dim), positions).transpose(1, 2)
        k = self._rope(k.view(b, t, c.num_kv_heads, c.head_dim), positions).transpose(1, 2)
        v = v.view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        return q, k, v

    def _attention(self, q, k, v, mask) -> torch.Tensor:
        # q [B, nh, T, D]; k/v [B, nkv, S, D]; mask [B, 1, T, S] bool -> [B, T, nh * D]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return out.transpose(1, 2).flatten(2)

    def _padded_causal_mask(self, real: torch.Tensor) -> torch.Tensor:
        """[B, T] real-token flags of right-padded rows -> attention mask [B, 1, T, T]."""
        t = real.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=self.device).tril()
        # A padded query row would see no key at all (NaN): let it see itself.
        mask = (causal & real[:, None, :]) | torch.eye(t, dtype=torch.bool, device=self.device)
        return mask.unsqueeze(1)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._rms_norm(x, self.final_norm), self.lm_head).float()

    # ---- entry points ----------------------------------------------------------------------

    def decode(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        thresholds: torch.Tensor,
        cache: KVCache,
        active_count: torch.Tensor,
        *,
        kv_len: int,
        mlp_path: str = "auto",
    ) -> torch.Tensor:
        """One decode step for cache slots 0..B-1.

        tokens, positions: [B] int64 (position = index the new token is written at);
        thresholds: [L, B] fp32; active_count: [L, B + 1] int32, incremented on the device
        (per-row and union active neurons per layer); kv_len: the cache positions attention may
        touch (static under CUDA graphs; each row reads only up to its own position).
        Returns logits [B, V] fp32.
        """
        c = self.config
        x = self.embed[tokens]  # [B, H]
        mlp_out = torch.zeros_like(x)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # [B, D/2]
        for i, layer in enumerate(self.layers):
            x, q = self.decode_qkv(
                x, mlp_out, layer.attn_norm, layer.wqkv, layer.bqkv, cache.k[i], cache.v[i],
                positions, cos, sin, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
                head_dim=c.head_dim, eps=c.rms_norm_eps,
            )  # fmt: skip
            attn = decode_attention(q, cache.k[i], cache.v[i], positions, kv_len)
            x, h = self.decode_output(x, attn, layer.wo, layer.mlp_norm, c.rms_norm_eps)
            mlp_out = cats_mlp_decode(
                h,
                layer.w_gate,
                layer.w_up,
                layer.w_down_t,
                thresholds[i],
                active_count=active_count[i],
                path=mlp_path,
                neuron_scale=layer.neuron_scale,
            )
        return self._logits(x + mlp_out)

    def compile_decode_blocks(self) -> None:
        """Fuse each layer's small ops (norms, RoPE, cache write, residual adds) with
        torch.compile: one compiled function before attention and one after serve all layers;
        the attention and MLP kernels stay outside them."""
        import torch._dynamo

        # One specialisation per batch-size bucket (static shapes keep the fused kernels simple);
        # dynamo's default limit of 8 would be hit by large max_batch settings.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.decode_qkv, self.decode_output = (
            torch.compile(f, fullgraph=True, dynamic=False)
            for f in (decode_qkv_block, decode_output_block)
        )

    def prefill(
        self,
        prompts: list[torch.Tensor],
        slots: list[int],
        thresholds: torch.Tensor,
        cache: KVCache,
        *,
        all_logits: list[bool] | None = None,
    ) -> list[torch.Tensor]:
        """Run prompts into their cache slots (positions 0..T_b-1 each), B at once.

        The matrix products run on the prompts packed end to end (no padding); attention runs
        per prompt, on the prompts right-padded into [B, heads, T_max, D]. thresholds: [B, L]
        fp32, one row per prompt. Returns, per prompt, logits [T_b, V] where all_logits[b],
        else [V] for its last position.
        """
        b = len(prompts)
        lengths = [int(p.shape[0]) for p in prompts]
        ends = list(itertools.accumulate(lengths))
        starts = [end - n for end, n in zip(ends, lengths, strict=True)]
        t_max = max(lengths)
        # Offsets built on the host and sent once: no device-to-host read in this pass.
        length_t, start_t, end_t = (
            torch.tensor(v, device=self.device) for v in (lengths, starts, ends)
        )
        segment = torch.repeat_interleave(
            torch.arange(b, device=self.device), length_t, output_size=ends[-1]
        )  # [N]: which prompt each packed token belongs to
        positions = torch.arange(ends[-1], device=self.device) - start_t[segment]
        real = torch.arange(t_max, device=self.device)[None, :] < length_t[:, None]  # [B, T_max]
        mask = self._padded_causal_mask(real)

        def padded(t: torch.Tensor) -> torch.Tensor:  # [1, n, N, D] -> [B, n, T_max, D]
            out = t.new_zeros(b, t_max, t.shape[1], t.shape[3])
            out[segment, positions] = t[0].transpose(0, 1)
            return out.transpose(1, 2)

        x = self.embed[torch.cat(prompts)].unsqueeze(0)  # [1, N, H]
        spans = list(zip(slots, starts, ends, strict=True))
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, self._rms_norm(x, layer.attn_norm), positions[None])
            for slot, lo, hi in spans:
                cache.k[i][slot, :, : hi - lo] = k[0, :, lo:hi]
                cache.v[i][slot, :, : hi - lo] = v[0, :, lo:hi]
            attn = self._attention(padded(q), padded(k), padded(v), mask)  # [B, T_max, nh*D]
            x = x + F.linear(attn[segment, positions], layer.wo).unsqueeze(0)
            h = self._rms_norm(x, layer.mlp_norm)[0]  # [N, H]
            x = x + self._mlp_dense(i, h, thresholds[segment, i], None).unsqueeze(0)
        wanted = all_logits or [False] * b
        last = self._logits(x[0, end_t - 1])  # [B, V]
        return [
            self._logits(x[0, lo:hi]) if wanted[row] else last[row]
            for row, (_, lo, hi) in enumerate(spans)
        ]

    def score(
        self,
        tokens: torch.Tensor,
        real: torch.Tensor,
        thresholds: torch.Tensor,
        *,
        on_mlp_input: MlpInputHook | None = None,
        active_count: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits `[B, T, V]` (fp32) for right-padded sequences, no cache.

        tokens: [B, T] int64; real: [B, T] bool (False at padding); thresholds: [L] fp32;
        on_mlp_input(layer, h) sees each layer's normed MLP input at real positions, [N, H];
        active_count: [L, 1] int32 or None, counting active neurons at real positions only.
        """
        b, t = tokens.shape
        positions = torch.arange(t, device=self.device).expand(b, t)
        mask = self._padded_causal_mask(real)
        x = self.embed[tokens]
        flat_real = real.reshape(-1)
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, self._rms_norm(x, layer.attn_norm), positions)
            x = x + F.linear(self._attention(q, k, v, mask), layer.wo)
            h = self._rms_norm(x, layer.mlp_norm).reshape(b * t, -1)
            if on_mlp_input is not None:
                on_mlp_input(i, h[flat_real])
            # Padding rows get an infinite threshold: they never count as active.
            row_t = torch.where(flat_real, thresholds[i], torch.inf)
            x = x + self._mlp_dense(i, h, row_t, active_count).view(b, t, -1)
        return self._logits(x)

    def _mlp_dense(self, i: int, h, row_thresholds, active_count) -> torch.Tensor:
        # h: [N, H]; row_thresholds: [N] -> [N, H]; dense matmuls with the threshold applied
        layer = self.layers[i]
        return cats_mlp_prefill(
            h,
            layer.w_gate,
            layer.w_up,
            layer.w_down_t,
            row_thresholds.float().contiguous(),
            active_count=None if active_count is None else active_count[i],
            neuron_scale=layer.neuron_scale,
        )


@dataclass
class LoadedModel:
    model: LlamaModel
    hf_config: object  # the transformers config the model was built from
    fingerprint: str  # of the checkpoint's weights (calibration.fingerprint)


def load_model(checkpoint: Path, *, dtype: torch.dtype, device: str) -> LoadedModel:
    """Load our decoder from a local HF checkpoint directory."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(checkpoint)
    config = ModelConfig.from_hf(hf)
    inv_freq, scaling = rope_inv_freq(hf, config.head_dim)
    state = read_state_dict(checkpoint)
    fingerprint = weights_fingerprint(state)
    model = LlamaModel(config, state, inv_freq, scaling, dtype=dtype, device=device)
    return LoadedModel(model, hf, fingerprint)


def read_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (safetensors shards, else transformers' loader)."""
    from safetensors.torch import load_file

    files = sorted(checkpoint.glob("*.safetensors"))
    if files:
        state: dict[str, torch.Tensor] = {}
        for file in files:
            state.update(load_file(file))
        return state
    from transformers import AutoModelForCausalLM

    return dict(AutoModelForCausalLM.from_pretrained(checkpoint).state_dict())
