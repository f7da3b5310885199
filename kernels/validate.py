"""Argument checks shared by the launchers; each failure raises ValueError naming the argument."""

import torch

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


def check_threshold(name: str, t: torch.Tensor, rows: int, device: torch.device) -> None:
    """``t`` must be a float32 [rows] tensor on ``device`` (one threshold per row)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != rows:
        raise ValueError(f"{name} must have shape [{rows}], got {list(t.shape)}")
    if t.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def check_neuron_scale(
    name: str, s: torch.Tensor | None, intermediate: int, device: torch.device
) -> None:
    """``s`` (optional) must be a float32 [intermediate] contiguous tensor on ``device``."""
    if s is None:
        return
    if not isinstance(s, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or None, got {type(s).__name__}")
    if s.dim() != 1 or s.shape[0] != intermediate:
        raise ValueError(f"{name} must have shape [{intermediate}], got {list(s.shape)}")
    if s.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {s.dtype}")
    if s.device != device:
        raise ValueError(f"{name} must be on {device}, got {s.device}")
    if not s.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def check_counter(name: str, c: torch.Tensor | None, length: int, device: torch.device) -> None:
    """``c`` (optional) must be an int32 [length] contiguous tensor on ``device``."""
    if c is None:
        return
    if not isinstance(c, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or None, got {type(c).__name__}")
    if c.dim() != 1 or c.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length}], got {list(c.shape)}")
    if c.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {c.dtype}")
    if c.device != device:
        raise ValueError(f"{name} must be on {device}, got {c.device}")
    if not c.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def check_index_range(hidden: int, intermediate: int, rows: int) -> None:
    """The kernels index with int32: every tensor they touch must hold fewer than 2**31 elements."""
    if max(hidden, rows) * intermediate >= 2**31:
        raise ValueError(
            f"shapes too large for int32 indexing: rows={rows}, hidden={hidden}, "
            f"intermediate={intermediate}"
        )
