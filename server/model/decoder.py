"""A compact Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) with CATS MLPs.

Weights are plain tensors (no nn.Module tree, see weights.py). Three entry points share one
layer loop (`_layers`), each with its own attention and MLP step:
- `decode`:  one token for each of the first B cache slots (continuous batching);
- `prefill`: one prompt into one cache slot, dense matmuls with the CATS threshold applied;
- `score`:   a padded batch without a cache (calibration and evaluation).
Thresholds come in pairs per layer and per row (`[2, num_layers, B]`: the CATS threshold t_up,
then the two-threshold mode's t_down on |a_i|, 0 for a single-threshold level), so rows at
different levels and of either mode share a step; thresholds of 0 keep every neuron (dense).
A layer may also carry per-neuron weights of the criterion (`neuron_scale`, from a thresholds
file of the up-weighted criterion; see `set_neuron_scale`): neuron i is then active when
|SiLU(gate)_i| * s_i > t.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cats_serve.kernels import (
    apply_rope,
    cats_mlp_decode,
    cats_mlp_prefill,
    decode_attention_rope,
)
from cats_serve.kernels.int8 import linear
from cats_serve.server.model.blocks import decode_output_block, decode_qkv_block, rms_norm
from cats_serve.server.model.config import ModelConfig
from cats_serve.server.model.kv_cache import KVCache
from cats_serve.server.model.weights import LayerWeights, ModelWeights

MlpInputHook = Callable[[int, torch.Tensor], None]
# (layer index, layer, residual x, last MLP output) -> (x, normed MLP input h)
AttentionStep = Callable[..., tuple[torch.Tensor, torch.Tensor]]
MlpStep = Callable[..., torch.Tensor]  # (layer index, layer, h) -> the layer's MLP output


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
        quantize: str = "none",
        int8_lm_head: bool = True,
        quantized: dict | None = None,
    ):
        self.config = config
        self.dtype = dtype
        self.quantize = quantize
        self.decode_qkv, self.decode_output = decode_qkv_block, decode_output_block
        self.device = torch.device(device)

        weights = ModelWeights.from_state(
            config, state, dtype=dtype, device=self.device, quantize=quantize,
            int8_lm_head=int8_lm_head, quantized=quantized,
        )  # fmt: skip
        self.embed, self.layers = weights.embed, weights.layers
        self.final_norm, self.lm_head = weights.final_norm, weights.lm_head
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
        qkv = linear(h, layer.wqkv, layer.bqkv)
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
        return linear(self._rms_norm(x, self.final_norm), self.lm_head).float()

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
        thresholds: [2, L, B] fp32 (t_up, t_down); active_count: [2, L, B + 1] int32,
        incremented on the device (per layer, the per-row and union counts of active neurons,
        which read their W_up rows, then of down-active ones, which read their W_down rows);
        kv_len: the cache positions attention may touch (static under CUDA graphs; each row
        reads only up to its own position).
        Single-threshold forms are accepted too: thresholds [L, B] (the MLP kernels then run
        without a second threshold, and with a [2, L, B + 1] counter the down-active counts
        are set to the active ones) and active_count [L, B + 1] (active neurons only).
        Returns logits [B, V] fp32.
        """
        c = self.config
        two = thresholds.dim() == 3
        up_t, down_t = (thresholds[0], thresholds[1]) if two else (thresholds, None)
        up_count, down_count = split_counts(active_count, pair_dims=3)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # [B, D/2]

        def attend(i: int, layer: LayerWeights, x: torch.Tensor, mlp_out: torch.Tensor):
            x, qkv = self.decode_qkv(
                x, mlp_out, layer.attn_norm, layer.wqkv, layer.bqkv, c.rms_norm_eps
            )
            attn = decode_attention_rope(
                qkv, cos, sin, cache.k[i], cache.v[i], positions, kv_len, c.num_heads,
                cache.tickets,
            )  # fmt: skip
            return self.decode_output(x, linear(attn, layer.wo), layer.mlp_norm, c.rms_norm_eps)

        def mlp(i: int, layer: LayerWeights, h: torch.Tensor) -> torch.Tensor:
            return cats_mlp_decode(
                h,
                layer.w_gate,
                layer.w_up,
                layer.w_down_t,
                up_t[i],
                active_count=up_count[i],
                path=mlp_path,
                neuron_scale=layer.neuron_scale,
                down_threshold=None if down_t is None else down_t[i],
                down_count=None if down_count is None or down_t is None else down_count[i],
            )

        x = self._layers(self.embed[tokens], attend, mlp)  # [B, H]
        if down_t is None and down_count is not None:
            down_count.copy_(up_count)  # one threshold: every active neuron reads its W_down row
        return self._logits(x)

    def compile_decode_blocks(self) -> None:
        """Fuse each layer's small ops (residual adds and norms) with
        torch.compile: one compiled function before attention and one after serve all layers;
        the attention, the output projection and the MLP kernels stay outside them."""
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
        per prompt, on the prompts right-padded into [B, heads, T_max, D]. thresholds:
        [B, 2, L] fp32, one (t_up, t_down) row per prompt ([B, L]: single-threshold).
        Returns, per prompt, logits [T_b, V] where all_logits[b], else [V] for its last
        position.
        """
        b = len(prompts)
        thresholds = with_down_thresholds(thresholds, dim=1, single_dims=2)
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

        spans = list(zip(slots, starts, ends, strict=True))

        def attend(i: int, layer: LayerWeights, x: torch.Tensor, mlp_out: torch.Tensor):
            x = x + mlp_out  # [1, N, H]
            q, k, v = self._qkv(layer, self._rms_norm(x, layer.attn_norm), positions[None])
            for slot, lo, hi in spans:
                cache.k[i][slot, :, : hi - lo] = k[0, :, lo:hi]
                cache.v[i][slot, :, : hi - lo] = v[0, :, lo:hi]
            attn = self._attention(padded(q), padded(k), padded(v), mask)  # [B, T_max, nh*D]
            x = x + linear(attn[segment, positions], layer.wo).unsqueeze(0)
            return x, self._rms_norm(x, layer.mlp_norm)[0]  # h: [N, H]

        def mlp(i: int, layer: LayerWeights, h: torch.Tensor) -> torch.Tensor:
            row_t = thresholds[segment, :, i].t()  # [2, N]
            return self._mlp_dense(layer, h, row_t, None, None).unsqueeze(0)

        x = self._layers(self.embed[torch.cat(prompts)].unsqueeze(0), attend, mlp)  # [1, N, H]
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

        tokens: [B, T] int64; real: [B, T] bool (False at padding); thresholds: [2, L] fp32
        (t_up, t_down per layer); on_mlp_input(layer, h) sees each layer's normed MLP input at
        real positions, [N, H]; active_count: [2, L, 1] int32 or None, counting active and
        down-active neurons at real positions only. Single-threshold forms are accepted too:
        thresholds [L], active_count [L, 1].
        """
        b, t = tokens.shape
        thresholds = with_down_thresholds(thresholds, dim=0, single_dims=1)
        up_count, down_count = split_counts(active_count, pair_dims=3)
        positions = torch.arange(t, device=self.device).expand(b, t)
        mask = self._padded_causal_mask(real)
        flat_real = real.reshape(-1)

        def attend(i: int, layer: LayerWeights, x: torch.Tensor, mlp_out: torch.Tensor):
            x = x + mlp_out  # [B, T, H]
            q, k, v = self._qkv(layer, self._rms_norm(x, layer.attn_norm), positions)
            x = x + linear(self._attention(q, k, v, mask), layer.wo)
            h = self._rms_norm(x, layer.mlp_norm).reshape(b * t, -1)
            if on_mlp_input is not None:
                on_mlp_input(i, h[flat_real])
            return x, h  # h: [B * T, H]

        def mlp(i: int, layer: LayerWeights, h: torch.Tensor) -> torch.Tensor:
            # Padding rows get an infinite threshold: they never count as active.
            row_t = torch.where(flat_real, thresholds[:, i, None], torch.inf)  # [2, N]
            counts = None if up_count is None else up_count[i]
            down = None if down_count is None else down_count[i]
            return self._mlp_dense(layer, h, row_t, counts, down).view(b, t, -1)

        return self._logits(self._layers(self.embed[tokens], attend, mlp))

    def _layers(self, x: torch.Tensor, attend: AttentionStep, mlp: MlpStep) -> torch.Tensor:
        """The layer loop every entry point shares. `attend(i, layer, x, mlp_out)` adds the
        previous layer's MLP output and this layer's attention to the residual stream `x` and
        returns it with the normed MLP input `h`; `mlp(i, layer, h)` is the layer's MLP output.
        Returns the final residual stream (before the last norm)."""
        mlp_out = torch.zeros_like(x)
        for i, layer in enumerate(self.layers):
            x, h = attend(i, layer, x, mlp_out)
            mlp_out = mlp(i, layer, h)
        return x + mlp_out

    def _mlp_dense(self, layer: LayerWeights, h, row_thresholds, up_count, down_count):
        # h: [N, H]; row_thresholds: [2, N] (t_up, t_down); counts: None or [1] each
        # -> [N, H]; dense matmuls with both thresholds applied
        t = row_thresholds.float()
        return cats_mlp_prefill(
            h,
            layer.w_gate,
            layer.w_up,
            layer.w_down_t,
            t[0].contiguous(),
            active_count=up_count,
            neuron_scale=layer.neuron_scale,
            down_threshold=t[1].contiguous(),
            down_count=down_count,
        )


def with_down_thresholds(thresholds: torch.Tensor, *, dim: int, single_dims: int) -> torch.Tensor:
    """Thresholds with the (t_up, t_down) axis at `dim`. A single-threshold tensor (one with
    `single_dims` dimensions, that axis missing) gets t_down = 0, which keeps the W_down row of
    every active neuron."""
    if thresholds.dim() != single_dims:
        return thresholds
    return torch.stack([thresholds, torch.zeros_like(thresholds)], dim=dim)


def split_counts(counts: torch.Tensor | None, *, pair_dims: int):
    """(active counts, down-active counts or None) of a counter with the pair axis first (when
    it has `pair_dims` dimensions) or of an active-only one."""
    if counts is None:
        return None, None
    if counts.dim() == pair_dims:
        return counts[0], counts[1]
    return counts, None
