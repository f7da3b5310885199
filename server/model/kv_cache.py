"""Static KV cache: one `[max_batch, n_kv_heads, max_seq_len, head_dim]` buffer per layer, and
the decode attention kernel's tickets (one int32 per slot and KV head, shared by the layers)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cats_serve.kernels import attention_tickets
from cats_serve.server.model.config import ModelConfig


@dataclass
class KVCache:
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    tickets: torch.Tensor

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        max_batch: int,
        max_seq_len: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> KVCache:
        shape = (max_batch, config.num_kv_heads, max_seq_len, config.head_dim)
        k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        return cls(k=k, v=v, tickets=attention_tickets(k[0]))

    @property
    def max_batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_seq_len(self) -> int:
        return self.k[0].shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
