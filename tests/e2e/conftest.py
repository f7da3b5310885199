"""The `launcher` fixture: start the real `cats-serve` process, wait for /health, stop it."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from api_support import cats_serve_command

HEALTH_TIMEOUT_S = 180  # a cold start imports torch and transformers on a busy 2-core machine
STOP_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: uvicorn's graceful shutdown
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


class Launcher:
    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.servers: list[Server] = []

    def __call__(self, *args: str) -> Server:
        # The port is free when picked, but a server of another test worker may take it
        # before ours binds: then ours exits 2 at once, and a new port is tried.
        for _ in range(3):
            server = self._start(args)
            if self._wait_healthy(server):
                return server
        pytest.fail(f"cats-serve found no free port in 3 tries:\n{server.log_tail()}")

    def _start(self, args: tuple[str, ...]) -> Server:
        port = free_port()
        log = self.log_dir / f"cats-serve-{port}.log"
        # The server reads CATS_* settings from the environment: start from a clean slate.
        env = {k: v for k, v in os.environ.items() if not k.startswith("CATS_")}
        env["PYTHONUNBUFFERED"] = "1"
        command = [*cats_serve_command(), "--host", "127.0.0.1", "--port", str(port), *args]
        with log.open("wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        server = Server(f"http://127.0.0.1:{port}", process, log)
        self.servers.append(server)
        return server

    def _wait_healthy(self, server: Server) -> bool:
        """True once /health is 200; False if the server found its port taken (exit 2)."""
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                if server.process.returncode == 2 and "already in use" in server.log_tail():
                    return False
                pytest.fail(
                    f"cats-serve exited ({server.process.returncode}):\n{server.log_tail()}"
                )
            try:
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    return True
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.2)
        server.stop()
        pytest.fail(f"cats-serve was not healthy after {HEALTH_TIMEOUT_S} s:\n{server.log_tail()}")

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist each module here runs whole on one worker: its module-scoped server
    serves all its tests, and a test that reads what earlier ones left (the metrics after
    schema fuzzing) runs after them. (This hook sees every item of the session.)"""
    here = Path(__file__).resolve().parent
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if here in path.parents:
            item.add_marker(pytest.mark.xdist_group(f"e2e-{path.stem}"))


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    """Call with cats-serve arguments; returns a healthy Server, stopped at module end."""
    launch = Launcher(tmp_path_factory.mktemp("cats-serve-logs"))
    yield launch
    launch.stop_all()
