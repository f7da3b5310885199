"""Sparsity levels as names: a request, `--default-sparsity` and a thresholds file name a level
by a float, and floats that differ only by rounding (0.1 + 0.2 against 0.3) name the same one."""

from __future__ import annotations

from collections.abc import Iterable

LEVEL_TOLERANCE = 1e-6


def match_level(level: float, loaded: Iterable[float]) -> float | None:
    """The loaded level within LEVEL_TOLERANCE of `level`, or None."""
    return next((lv for lv in loaded if abs(lv - level) <= LEVEL_TOLERANCE), None)


def format_level(level: float) -> str:
    """A level at the precision that tells levels apart (10 significant digits)."""
    return f"{level:.10g}"


def format_levels(levels: Iterable[float]) -> str:
    return ", ".join(format_level(lv) for lv in sorted(levels)) or "none"
