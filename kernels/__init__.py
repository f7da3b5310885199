"""CATS MLP kernels (Triton) and their PyTorch references.

Public API:
    cats_mlp_decode, cats_mlp_prefill, choose_mlp_path   entry points and the dispatch rule
    cats_gate                                            the fused gate kernel alone
    *_reference, cats_mlp_torch, cats_activation_torch   PyTorch oracles and CPU fallback
    cats_mlp_gather                                      the CPU sparse decode path (torch ops)
    decode_attention, decode_attention_reference         decode attention over the KV cache
    decode_attention_rope, apply_rope                    the same from the QKV output (RoPE and
                                                         the cache write in the kernel)
    attention_tickets                                    their per-cache workspace

Names are resolved on first access (PEP 562): importing the references (calibration does)
does not import Triton, and Triton is imported only when a kernel module is first needed.
That matters because Triton fixes compiled vs interpreted mode (TRITON_INTERPRET) at import.
Benchmark-only baselines live in `cats_serve.kernels.baselines`, outside this API.
"""

import importlib

_EXPORTS = {
    "choose_mlp_path": "dispatch",
    "apply_rope": "reference",
    "attention_tickets": "attention",
    "decode_attention": "attention",
    "decode_attention_rope": "attention",
    "decode_attention_reference": "reference",
    "cats_gate": "gate",
    "cats_mlp_gather": "gather",
    "cats_mlp_decode": "mlp",
    "cats_mlp_prefill": "mlp",
    "active_counts_reference": "reference",
    "cats_activation_torch": "reference",
    "cats_mask": "reference",
    "cats_mlp_reference": "reference",
    "cats_mlp_torch": "reference",
    "down_reference": "reference",
    "gate_reference": "reference",
    "gate_up_reference": "reference",
    "interpreter_enabled": "runtime",
    "triton_available_for": "runtime",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
