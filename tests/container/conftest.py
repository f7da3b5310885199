"""Session fixtures of the container test: podman confined to a scratch dir, the cached Debian
base, a CPU torch wheel in docker/wheels/, and the images docker-compose.ci.yml describes."""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import podman_host
import pytest
from external_tools import compose_binary

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.cpu.yml", "docker-compose.ci.yml")
WHEELS = ROOT / "docker" / "wheels"
TORCH_PIN = ROOT / "constraints" / "cpu.txt"  # the torch release CI installs, a CPU build
BUILD_TIMEOUT_S = 1500


@pytest.fixture(scope="session")
def podman() -> Iterator[podman_host.Podman]:
    """podman for this session; afterwards every container, image and volume it made is gone,
    the scratch dir removed and netavark's chains deleted if nothing else uses them."""
    podman_host.install_tools()
    forwarding = Path("/proc/sys/net/ipv4/ip_forward")
    forwarding_before = forwarding.read_text()
    scratch = podman_host.scratch_dir()
    session = podman_host.configure(scratch)
    try:
        yield session
    finally:
        podman_host.reset(session)
        shutil.rmtree(scratch)
        if podman_host.remove_idle_netavark_chains() and forwarding_before.strip() == "0":
            forwarding.write_text("0\n")  # netavark turned it on for our containers only


@pytest.fixture(scope="session")
def base_image(podman) -> str:
    return podman_host.base_image(podman)


def _python_tag(podman, image: str) -> str:
    """`311` for the base image's python3 3.11: the tag its torch wheel must carry."""
    out = podman("run", "--rm", image, "python3", "-c", "import sys; print(*sys.version_info[:2])")
    return "".join(out.split())


@pytest.fixture(scope="session")
def torch_requirement(podman, base_image) -> Iterator[str]:
    """The pinned torch as a wheel in docker/wheels/ for the base's Python; `torch==<its version>`.

    pip copies it from the machine's find-links or its cache, else downloads it from the
    configured indexes. A wheel this fixture put there is removed afterwards.
    """
    [pin] = [line for line in TORCH_PIN.read_text().splitlines() if line.startswith("torch")]
    version, python = pin.split("==", 1)[1], _python_tag(podman, base_image)
    download = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    before = set(WHEELS.glob("*.whl"))
    try:
        said = podman_host.run(
            [*download, "--python-version", python, "--dest", str(WHEELS), pin], timeout=900
        )
        # "Saved <path>" or "File was already downloaded <path>": the wheel pip chose
        saved = r"^\s*(?:Saved|File was already downloaded) (\S+\.whl)\s*$"
        names = [Path(p).name for p in re.findall(saved, said, flags=re.M)]
        # torch-<version>[+local]-cp<python>-...; pip's == ignores a local label such as +cpu
        pattern = re.compile(rf"torch-({re.escape(version)}(\+\w+)?)-cp{python}-")
        found = [m for name in names if (m := pattern.match(name))]
        assert len(found) == 1, f"pip download {pin} for cp{python} said:\n{said}"
        assert (WHEELS / found[0].string).is_file(), f"{found[0].string} is not in {WHEELS}"
        yield f"torch=={found[0].group(1)}"  # e.g. torch==2.13.0+cpu
    finally:
        for wheel in set(WHEELS.glob("*.whl")) - before:
            wheel.unlink()


@pytest.fixture(scope="session")
def compose_env(podman, base_image, torch_requirement) -> dict[str, str]:
    """Environment for docker-compose.ci.yml: the local base, the torch wheel, free host ports."""
    return {
        **podman.env,
        "CATS_CI_BASE_IMAGE": base_image,
        "CATS_CI_TORCH_REQUIREMENT": torch_requirement,
        "CATS_CI_SERVER_PORT": str(podman_host.free_port()),
        "CATS_CI_PROMETHEUS_PORT": str(podman_host.free_port()),
    }


def compose_command(*args: str) -> list[str]:
    files = [arg for name in COMPOSE_FILES for arg in ("-f", str(ROOT / name))]
    return [str(compose_binary()), "--project-directory", str(ROOT), *files, *args]


@pytest.fixture(scope="session")
def compose(compose_env) -> Callable[..., str]:
    """`compose(*args, timeout=..., docker_host=...)`: the Compose v2 binary itself (its Python
    wrapper hides the exit status) on the three files; fails the test unless it exits 0."""

    def call(*args: str, timeout: float = 120, docker_host: str | None = None) -> str:
        env = {**compose_env, **({"DOCKER_HOST": docker_host} if docker_host else {})}
        return podman_host.run(compose_command(*args), timeout=timeout, env=env)

    return call


@pytest.fixture(scope="session")
def images(podman, compose, tmp_path_factory) -> dict[str, str]:
    """service -> local image, built with podman from the build sections of the merged compose
    files (so compose later finds them and builds nothing). Removed with the session's storage."""
    config = json.loads(compose("config", "--format", "json"))
    logs = tmp_path_factory.mktemp("builds")
    built = {}
    for name, service in config["services"].items():
        build = service.get("build")
        assert build and service.get("image"), f"{name}: the CI override must build a local image"
        args = [
            arg for k, v in build.get("args", {}).items() for arg in ("--build-arg", f"{k}={v}")
        ]
        dockerfile = Path(build["context"]) / build["dockerfile"]
        podman.logged(
            # docker format: the OCI image format has no HEALTHCHECK
            [
                "build",
                "--format",
                "docker",
                "--file",
                str(dockerfile),
                "--tag",
                service["image"],
                *args,
                build["context"],
            ],
            logs / f"{name}.log",
            timeout=BUILD_TIMEOUT_S,
        )
        built[name] = service["image"]
    return built
