"""The Docker image and the compose stack, built and run for real with podman (no Docker engine).

1. The image from docker/Dockerfile (local Debian base, CPU torch wheel) runs, reports healthy,
   serves the default model ("The capital of France is" -> "Paris"), exposes /metrics and stops
   cleanly on SIGTERM.
2. docker-compose.yml + docker-compose.cpu.yml + docker-compose.ci.yml, brought up by the Compose
   v2 binary through podman's Docker-compatible API: Prometheus (Debian's package) scrapes the
   server by service name, and a request's realised sparsity is queryable there.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

import httpx
import podman_host
import pytest
from external_tools import hadolint_binary
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [
    pytest.mark.container,
    # one podman session and one torch wheel in docker/wheels/: both tests on one worker
    pytest.mark.xdist_group("containers"),
    # Under CI=true it runs whoever runs it, so a missing privilege fails loudly there.
    pytest.mark.skipif(
        os.geteuid() != 0 and os.environ.get("CI") != "true",
        reason="needs root: installs podman, buildah and runc with apt-get and lets netavark "
        "edit iptables; run the suite as root (or with CI=true) to include it",
    ),
]

PROMETHEUS_DOCKERFILE = Path(__file__).resolve().parents[2] / "docker" / "prometheus.Dockerfile"

PROMPT = "The capital of France is"
MAX_TOKENS = 8
# First start: the default model is converted into the cache volume and loaded on 2 busy cores.
START_TIMEOUT_S = 300
# docker/prometheus.yml scrapes every 5 s; a few scrapes' slack for a loaded machine.
SCRAPE_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30
SPARSITY = "cats_request_mlp_sparsity_ratio"


def wait_healthy(url: str, podman, container: str, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        state = podman("inspect", "--format", "{{.State.Status}}", container).strip()
        if state not in ("created", "running"):
            pytest.fail(f"{container} is {state}:\n{podman.logs(container)}")
        time.sleep(1)
    pytest.fail(f"{url}/health did not answer 200 in {timeout} s:\n{podman.logs(container)}")


def complete(url: str) -> dict:
    """A completion of PROMPT with the server's defaults (greedy) and the served model."""
    [model] = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    body = {"model": model["id"], "prompt": PROMPT, "max_tokens": MAX_TOKENS}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def scraped_samples(url: str, name: str) -> dict[str, float]:
    """{sample name: value summed over label sets} of metric `name` at `url`/metrics."""
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        if family.name == name:
            for sample in family.samples:
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def test_prometheus_dockerfile_is_hadolint_clean():
    """Linted like docker/Dockerfile (tests/docker shows the same call fails on known findings)."""
    out = subprocess.run(
        [str(hadolint_binary()), "--no-color", str(PROMETHEUS_DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_image_serves_the_default_model(podman, images):
    container, port = "cats-serve-ci-run", podman_host.free_port()
    podman(
        "run",
        "--detach",
        "--name",
        container,
        "--publish",
        f"127.0.0.1:{port}:8000",
        "--env",
        "CATS_DEVICE=cpu",
        images["cats-serve"],
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, podman, container)
        # The image's own HEALTHCHECK (kept by the docker format) passes, as a non-root user.
        podman("healthcheck", "run", container)
        assert podman("exec", container, "id", "-u").strip() != "0"

        answer = complete(url)
        assert "Paris" in answer["choices"][0]["text"], answer
        assert answer["usage"]["completion_tokens"] <= MAX_TOKENS

        samples = scraped_samples(url, SPARSITY)
        assert samples[f"{SPARSITY}_count"] == 1, samples
        assert samples[f"{SPARSITY}_sum"] == pytest.approx(answer["sparsity"]["mlp_sparsity"])

        podman("stop", "--time", str(STOP_TIMEOUT_S), container, timeout=STOP_TIMEOUT_S + 30)
        exit_code = podman("inspect", "--format", "{{.State.ExitCode}}", container).strip()
        assert exit_code == "0", f"exit code {exit_code} on SIGTERM:\n{podman.logs(container)}"
    finally:
        podman("rm", "--force", "--volumes", container)


def prometheus_query(url: str, expr: str) -> list[dict]:
    answer = httpx.post(f"{url}/api/v1/query", data={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def wait_for(what: str, probe, timeout: float = SCRAPE_TIMEOUT_S):
    """Poll `probe()` until it returns something truthy; fail with its last value."""
    deadline = time.monotonic() + timeout
    while not (got := probe()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: still {got!r} after {timeout} s")
        time.sleep(1)
    return got


def test_compose_stack_scrapes_realised_sparsity(podman, images, compose, compose_env):
    server = f"http://127.0.0.1:{compose_env['CATS_CI_SERVER_PORT']}"
    prometheus = f"http://127.0.0.1:{compose_env['CATS_CI_PROMETHEUS_PORT']}"
    with podman_host.docker_api(podman) as docker_host:
        compose("up", "--detach", timeout=300, docker_host=docker_host)
        try:
            names = compose("ps", "--format", "{{.Service}} {{.Name}}", docker_host=docker_host)
            containers = dict(line.split() for line in names.splitlines())
            assert set(containers) == set(images), f"compose started {containers}"
            wait_healthy(server, podman, containers["cats-serve"])
            answer = complete(server)
            assert "Paris" in answer["choices"][0]["text"], answer

            def server_target() -> list[dict]:
                response = httpx.get(f"{prometheus}/api/v1/targets", timeout=10)
                targets = response.json()["data"]["activeTargets"]
                return [t for t in targets if t["labels"]["job"] == "cats-serve"]

            [target] = wait_for("the cats-serve target", server_target)
            wait_for("the cats-serve target up", lambda: server_target()[0]["health"] == "up")
            assert target["discoveredLabels"]["__address__"].startswith("cats-serve:")

            level = f"{answer['sparsity']['level']:g}"
            selector = f'{{job="cats-serve",sparsity_level="{level}"}}'
            [count] = wait_for(
                "the request's realised sparsity in Prometheus",
                lambda: prometheus_query(prometheus, f"{SPARSITY}_count{selector} > 0"),
            )
            [total] = prometheus_query(prometheus, f"{SPARSITY}_sum{selector}")
            assert float(count["value"][1]) == 1
            realised = float(total["value"][1])
            assert realised == pytest.approx(answer["sparsity"]["mlp_sparsity"])
            assert realised > 0, "the default model's shipped thresholds skipped no neuron"
        finally:
            compose(
                "down",
                "--volumes",
                "--timeout",
                str(STOP_TIMEOUT_S),
                timeout=120,
                docker_host=docker_host,
            )
