"""Int8 weights: symmetric per-output-channel quantization and the products that read them.

A weight W [N, K] (N output channels, K inputs) is stored as q = round(W / s) in int8 with one
float32 scale per output channel, s_n = max_k |W[n, k]| / 127, so W ~= q * s[:, None] and the
product x @ W^T = (x @ q^T) * s: the scale is applied once per output, after the sum, in
registers. `Int8Matrix.transposed` says whether q is stored as [N, K] (each output channel a
row: q/k/v/o, gate, up, the LM head) or as [K, N] (W^T: the down projection, whose neuron rows
the sparse kernels read whole).

`int8_linear` picks the implementation from the device and the number of rows: the Triton
GEMV (int8_gemv.py) on CUDA and under the interpreter, torch's packed int8 kernel
(`_weight_int8pack_mm`, bfloat16 activations) on a CPU, and for many rows (prefill) the
dequantized weight through a dense GEMM, where the weight read is not what bounds the time.
Inside torch.compile'd code it is one opaque op (`torch.ops.cats_serve.int8_linear`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .runtime import triton_available_for

# Rows from which the weight is dequantized and multiplied densely (compute-bound products)
GEMV_MAX_ROWS = 64
# CPU: `_weight_int8pack_mm` beat fp32 F.linear up to this many rows on the 2-core machine
CPU_PACKED_MAX_ROWS = 16
# Input widths torch's packed int8 kernel is given (other widths are dequantized)
PACKED_WIDTH_MULTIPLE = 64
# ... and the alignment of the weight's first byte it needs
PACKED_ALIGNMENT = 64


@dataclass(frozen=True)
class Int8Matrix:
    q: torch.Tensor  # int8 [N, K], or [K, N] when transposed
    scale: torch.Tensor  # float32 [N], one per output channel
    transposed: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        """The logical weight's shape [N, K], whatever the layout."""
        return (self.out_features, self.in_features)

    @property
    def out_features(self) -> int:
        return self.q.shape[1] if self.transposed else self.q.shape[0]

    @property
    def in_features(self) -> int:
        return self.q.shape[0] if self.transposed else self.q.shape[1]

    @property
    def device(self) -> torch.device:
        return self.q.device

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in the stored layout ([N, K], or [K, N] when transposed) in `dtype`."""
        scale = self.scale[None, :] if self.transposed else self.scale[:, None]
        return (self.q.float() * scale).to(dtype)

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The logical weight W [N, K] in `dtype` (a transposed view when stored transposed)."""
        w = self.dequantize(dtype)
        return w.t() if self.transposed else w

    def select_rows(self, ids: torch.Tensor) -> Int8Matrix:
        """The output channels `ids` only (an [len(ids), K] matrix, stored untransposed)."""
        if self.transposed:
            raise ValueError("select_rows needs an untransposed matrix")
        return Int8Matrix(self.q.index_select(0, ids), self.scale.index_select(0, ids))

    def select_inputs(self, ids: torch.Tensor) -> Int8Matrix:
        """The input columns `ids` only (an [N, len(ids)] matrix in the same layout)."""
        dim = 0 if self.transposed else 1
        return Int8Matrix(self.q.index_select(dim, ids).contiguous(), self.scale, self.transposed)


def quantize_int8(w: torch.Tensor, *, transposed: bool = False) -> Int8Matrix:
    """Quantize the weight `w` [N, K] (any float dtype; computed in float32) per output channel.
    With `transposed`, q is stored as [K, N] (contiguous). An all-zero channel gets scale 1."""
    wf = w.float()
    amax = wf.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(wf / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    q = q.t() if transposed else q
    return Int8Matrix(q.contiguous(), scale.contiguous(), transposed)


def int8_linear_reference(
    x: torch.Tensor, m: Int8Matrix, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [R, K] @ W^T (+ bias) computed in float32 from the dequantized weight, in x.dtype."""
    out = x.float() @ m.weight(torch.float32).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


@functools.cache
def _bf16_ones(n: int) -> torch.Tensor:
    return torch.ones(n, dtype=torch.bfloat16)


def _cpu_packed(x: torch.Tensor, m: Int8Matrix) -> torch.Tensor:
    # torch's kernel takes bfloat16 activations and scales; the fp32 scale is applied after
    # it (a bfloat16 scale would round each channel's scale by up to 0.4%): the bfloat16
    # product times the float32 scales promotes to float32 in one op.
    out = torch._weight_int8pack_mm(x.to(torch.bfloat16), m.q, _bf16_ones(m.out_features))
    return torch.mul(out, m.scale).to(x.dtype)


def _int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, transposed: bool):
    m = Int8Matrix(q, scale, transposed)
    rows = x.shape[0]
    if rows <= GEMV_MAX_ROWS and triton_available_for(x.device):
        from .int8_gemv import launch_int8_gemv

        return launch_int8_gemv(x, m)
    # torch's packed kernel (2.13) reads past the end of a row whose width is not a multiple
    # of its vector block: on an AVX-512 CPU a width that is not a multiple of 16 gave wrong
    # sums or a segfault. The default model's widths (576, 1536) are multiples of 64. It also
    # segfaults on a weight that does not start on a 64-byte boundary (a tensor viewing a
    # file or a buffer at an offset; torch's own allocations are aligned).
    packable = (
        not transposed
        and m.in_features % PACKED_WIDTH_MULTIPLE == 0
        and q.data_ptr() % PACKED_ALIGNMENT == 0
    )
    if x.device.type == "cpu" and rows <= CPU_PACKED_MAX_ROWS and packable:
        return _cpu_packed(x, m)
    return F.linear(x, m.weight(x.dtype))


@torch.library.custom_op("cats_serve::int8_linear", mutates_args=())
def _int8_linear_op(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, transposed: bool
) -> torch.Tensor:
    return _int8_matmul(x, q, scale, transposed)


@_int8_linear_op.register_fake
def _(x, q, scale, transposed):
    return x.new_empty(x.shape[0], q.shape[1] if transposed else q.shape[0])


def int8_linear(x: torch.Tensor, m: Int8Matrix, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) -> [..., N] in x.dtype, W the int8 matrix `m`."""
    flat = x.dim() == 2
    x2 = x if flat else x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if torch.compiler.is_compiling():
        out = torch.ops.cats_serve.int8_linear(x2, m.q, m.scale, m.transposed)
    else:
        out = _int8_matmul(x2, m.q, m.scale, m.transposed)
    if not flat:
        out = out.view(*x.shape[:-1], out.shape[-1])
    return out if bias is None else out + bias


Weight = torch.Tensor | Int8Matrix


def linear(x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for a full-precision weight [N, K] or an int8 one."""
    if isinstance(w, Int8Matrix):
        return int8_linear(x, w, bias)
    return F.linear(x, w, bias)


def down_projection(act: torch.Tensor, w_down_t: Weight) -> torch.Tensor:
    """act [R, I] through the down projection: `w_down_t` is W_down^T [I, H] in full
    precision, or the int8 W_down (logical [H, I], stored either way)."""
    if isinstance(w_down_t, Int8Matrix):
        return int8_linear(act, w_down_t)
    return act @ w_down_t


def dequantized(w: Weight, dtype: torch.dtype, *, down: bool = False) -> torch.Tensor:
    """A weight as a full-precision tensor in `dtype`, in the layout the fp32 references take:
    [N, K], or for the down projection (`down`) W_down^T [I, H]."""
    if not isinstance(w, Int8Matrix):
        return w.to(dtype)
    full = w.weight(dtype)
    return full.t() if down else full
