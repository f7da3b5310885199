"""The built distribution installs everything under `cats_serve` and nothing generic."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.xdist_group("source-tree")  # tests/test_layers.py plants files in it

CHECK = """
import importlib.util, pathlib, sys
import cats_serve.kernels, cats_serve.server.engine.engine, cats_serve.calibration.fingerprint
site = pathlib.Path(sys.argv[1]).resolve()
for mod in (cats_serve.kernels, cats_serve.server.engine.engine,
            cats_serve.calibration.fingerprint):
    path = pathlib.Path(mod.__file__).resolve()
    assert site in path.parents, f"{mod.__name__} imported from {path}, not the wheel"
# our wheel installs nothing under a generic top-level name (HF's own `kernels` package,
# which transformers >= 5.25 depends on, may well be importable: it is not ours)
from importlib.metadata import distribution
tops = {f.parts[0] for f in distribution("cats-serve").files}
for generic in ("kernels", "server", "calibration"):
    assert generic not in tops, f"the wheel installs a top-level {generic!r}"
    spec = importlib.util.find_spec(generic)
    assert spec is None or "cats_serve" not in str(spec.origin), f"{generic!r} is ours"
print("ok")
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(ROOT)],
        check=True,
    )  # fmt: skip
    (built,) = out.glob("cats_serve-*.whl")
    return built


def test_wheel_holds_only_the_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"cats_serve", wheel.name.split("-py")[0] + ".dist-info"}, tops
    packages = [
        "kernels", "kernels/baselines", "calibration", "calibration/cli",
        "server", "server/model", "server/engine", "server/api", "server/api/routes",
    ]  # fmt: skip
    for sub in packages:
        assert f"cats_serve/{sub}/__init__.py" in names


def test_non_editable_install_imports(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    # System site-packages supply torch & co.; the wheel itself goes into the fresh venv.
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
    )
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    if sys.prefix != sys.base_prefix:
        # Run from a venv, the new venv's "system" packages are the base Python's, which lack
        # torch: append this venv's site-packages after the wheel's (a .pth line only adds the
        # folder to sys.path, so this venv's editable install of cats_serve stays out).
        paths = sysconfig.get_paths()
        Path(site, "parent-venv.pth").write_text(f"{paths['purelib']}\n{paths['platlib']}\n")
    result = subprocess.run(
        [str(python), "-c", CHECK, site], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
