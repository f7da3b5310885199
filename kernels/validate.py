"""Argument checks shared by the launchers; each failure raises ValueError naming the argument."""

import torch

from .int8 import Int8Matrix

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_matrix(name: str, t: torch.Tensor, rows: int, cols: int, like: torch.Tensor) -> None:
    """``t`` must be a contiguous [rows, cols] tensor with ``like``'s dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2 or tuple(t.shape) != (rows, cols):
        raise ValueError(f"{name} must have shape [{rows}, {cols}], got {list(t.shape)}")
    if t.dtype != like.dtype:
        raise ValueError(f"{name} must have dtype {like.dtype}, got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} must be on {like.device}, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (row-major)")


def check_input(name: str, x: torch.Tensor) -> None:
    """``x`` must be a contiguous 2-D activation tensor of a supported dtype with >= 1 row."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, hidden], got shape {list(x.shape)}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} must have at least one row and one column, got {list(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} dtype must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_vector(
    name: str, t, length: int, dtype: torch.dtype, device: torch.device, *, optional: bool
) -> None:
    """``t`` must be a contiguous 1-D [length] tensor of ``dtype`` on ``device``."""
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        allowed = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise ValueError(f"{name} must be {allowed}, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length}], got {list(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {str(dtype).removeprefix('torch.')}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def check_threshold(
    name: str, t: torch.Tensor | None, rows: int, device: torch.device, *, optional: bool = False
) -> None:
    """``t`` must be a float32 [rows] tensor on ``device`` (one threshold per row)."""
    _check_vector(name, t, rows, torch.float32, device, optional=optional)


def check_neuron_scale(
    name: str, s: torch.Tensor | None, intermediate: int, device: torch.device
) -> None:
    """``s`` (optional) must be a float32 [intermediate] contiguous tensor on ``device``."""
    _check_vector(name, s, intermediate, torch.float32, device, optional=True)


def check_counter(name: str, c: torch.Tensor | None, length: int, device: torch.device) -> None:
    """``c`` (optional) must be an int32 [length] contiguous tensor on ``device``."""
    _check_vector(name, c, length, torch.int32, device, optional=True)


def check_index_range(hidden: int, intermediate: int, rows: int) -> None:
    """The kernels index with int32: every tensor they touch must hold fewer than 2**31 elements."""
    if max(hidden, rows) * intermediate >= 2**31:
        raise ValueError(
            f"shapes too large for int32 indexing: rows={rows}, hidden={hidden}, "
            f"intermediate={intermediate}"
        )


def check_int8_matrix(
    name: str, m: Int8Matrix, out_features: int, in_features: int, like: torch.Tensor,
    *, transposed: bool | None = None,
) -> None:  # fmt: skip
    """``m`` must be an int8 matrix of the logical shape [out_features, in_features] on
    ``like``'s device, stored contiguously; ``transposed`` (when not None) fixes its layout."""
    stored = (in_features, out_features) if m.transposed else (out_features, in_features)
    if m.q.dtype != torch.int8 or tuple(m.q.shape) != stored or not m.q.is_contiguous():
        raise ValueError(
            f"{name} must hold contiguous int8 values of shape {list(stored)}, got "
            f"{m.q.dtype} {list(m.q.shape)}"
        )
    scale_name = f"{name}.scale"
    _check_vector(scale_name, m.scale, out_features, torch.float32, like.device, optional=False)
    if m.q.device != like.device:
        raise ValueError(f"{name} must be on {like.device}, got {m.q.device}")
    if transposed is not None and m.transposed != transposed:
        layout = "transposed ([in, out])" if transposed else "untransposed ([out, in])"
        raise ValueError(f"{name} must be stored {layout} here")


def check_mlp_weights(w_gate, w_up, w_down_t, intermediate: int, hidden: int, like) -> None:
    """Full precision: w_gate, w_up, w_down_t contiguous [I, H] of ``like``'s dtype. Int8: all
    three `Int8Matrix` (W_gate, W_up untransposed; W_down, logical [H, I], either layout)."""
    if isinstance(w_gate, Int8Matrix):
        for name, w in (("w_up", w_up), ("w_down_t", w_down_t)):
            if not isinstance(w, Int8Matrix):
                raise ValueError(f"{name} must be int8 like w_gate, got {type(w).__name__}")
        check_int8_matrix("w_gate", w_gate, intermediate, hidden, like, transposed=False)
        check_int8_matrix("w_up", w_up, intermediate, hidden, like, transposed=False)
        check_int8_matrix("w_down_t", w_down_t, hidden, intermediate, like)
        return
    check_matrix("w_gate", w_gate, intermediate, hidden, like)
    check_matrix("w_up", w_up, intermediate, hidden, like)
    check_matrix("w_down_t", w_down_t, intermediate, hidden, like)
