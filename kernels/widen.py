"""Int8 weights widened to float in registers without the GPU's integer-to-float conversion.

`w.to(tl.float32)` on an int8 tile compiles to I2F, which an H100/H200 SM issues at a quarter
of its FMA rate (16 per clock): one conversion per weight byte makes the conversions, not the
memory, bound a batch-1 GEMV that reads int8 at full bandwidth. Instead each byte is placed in
the mantissa of a float whose exponent is fixed: with u = q + 128 (the byte with its sign bit
flipped, 0..255), the float32 with bits 0x4B000000 | u is 2^23 + u exactly, so subtracting
2^23 + 128 leaves q exactly. That is one logic op and one add per weight, both full rate.

`widen` takes a constexpr INT8 so that kernels shared by full-precision and int8 weights call
one function: a full-precision tile is converted as before.
"""

import triton
import triton.language as tl

# constexpr globals: a compiled (not interpreted) kernel may read no other module globals
_MAGIC_BITS = tl.constexpr(0x4B000000)  # float32 2^23: its ulp is 1, so its low bits hold integers
_MAGIC = tl.constexpr(8388736.0)  # 2^23 + 128


@triton.jit
def int8_to_float32(q):
    """An int8 tile as float32, exactly (q in -128..127)."""
    u = q.to(tl.uint8, bitcast=True).to(tl.uint32)
    return ((u ^ 0x80) | _MAGIC_BITS).to(tl.float32, bitcast=True) - _MAGIC


@triton.jit
def int8_to_bfloat16(q):
    """An int8 tile as bfloat16, exactly: the float32 value's top half (|q| <= 128 needs at
    most 8 significant bits, which bfloat16 keeps, so the dropped low half is zero)."""
    bits = int8_to_float32(q).to(tl.uint32, bitcast=True) >> 16
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def widen(w, INT8: tl.constexpr):
    """A weight tile as float32: int8 through the exact bit construction, else a plain cast."""
    if INT8:
        return int8_to_float32(w)
    return w.to(tl.float32)
