"""The import layers of DESIGN.md, checked by import-linter on the real import graph
(`.importlinter` at the root holds the contracts)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Plants files in the source tree for a moment: kept on one test worker with everything else
# that reads the whole tree (tests/test_lint.py, tests/test_packaging.py).
pytestmark = pytest.mark.xdist_group("source-tree")


def lint_imports() -> subprocess.CompletedProcess:
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    tool = shutil.which("lint-imports", path=search)
    assert tool, "lint-imports (import-linter, a test dependency) is not installed"
    return subprocess.run([tool, "--no-cache"], cwd=ROOT, capture_output=True, text=True)


def test_the_tree_keeps_its_import_contracts():
    result = lint_imports()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


PLANTS = {
    # an engine module that imports the HTTP layer and Prometheus
    "server/engine/_planted.py": (
        "import prometheus_client\nfrom cats_serve.server.api import errors\n",
        ["The engine and the model know nothing of HTTP", "Layers:"],
    ),
    # a kernel that imports the model layer
    "kernels/_planted.py": (
        "from cats_serve.server.model import config\n",
        ["Kernels import torch and triton only", "Layers:"],
    ),
    # the API reaching into the decoder instead of going through the loader
    "server/api/_planted.py": (
        "from cats_serve.server.model.decoder import LlamaModel\n",
        ["The API reaches the model only through its loader"],
    ),
}


@pytest.mark.parametrize("path", sorted(PLANTS))
def test_a_planted_violation_breaks_its_contract(path):
    source, contracts = PLANTS[path]
    planted = ROOT / path
    assert not planted.exists()
    planted.write_text(source)
    try:
        result = lint_imports()
    finally:
        planted.unlink()
    assert result.returncode != 0, result.stdout
    broken = [line for line in result.stdout.splitlines() if " BROKEN" in line]
    for name in contracts:
        assert any(line.startswith(name) for line in broken), (name, result.stdout)
