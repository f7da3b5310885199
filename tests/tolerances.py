"""The one per-dtype tolerance table for comparing fast paths with float32 references.

Use as ``torch.testing.assert_close(out, ref, atol=tol.atol, rtol=tol.rtol)`` with
``tol = TOLERANCES[dtype]``, where ``ref`` was computed in float32 from the same inputs.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float


TOLERANCES = {
    # float32 sums in another order (blocked dot products, split-K fp32 atomics): errors of a
    # few ulps times sqrt(length); 1e-4 leaves room for reductions of ~10^4 terms.
    torch.float32: Tol(atol=1e-4, rtol=1e-4),
    # fp16 keeps 11 significant bits (2^-11 ~ 5e-4 relative per rounding); dense paths round
    # two intermediate GEMM outputs and the activation before the last GEMM, so allow ~20x.
    torch.float16: Tol(atol=1e-2, rtol=1e-2),
    # bf16 keeps 8 significant bits (2^-8 ~ 4e-3 relative per rounding); the same three
    # intermediate roundings plus the output's give a few times that.
    torch.bfloat16: Tol(atol=3e-2, rtol=3e-2),
}
