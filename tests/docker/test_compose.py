"""docker-compose.yml (+ the CPU override) validated by a real Compose v2 binary, no engine."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from external_tools import compose_binary

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
CPU_OVERRIDE = ROOT / "docker-compose.cpu.yml"
SERVER = "cats-serve"


def compose(*files: Path, args: tuple[str, ...] = ("config",)) -> subprocess.CompletedProcess:
    cmd = [str(compose_binary())]
    for f in files:
        cmd += ["-f", str(f)]
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, cwd=ROOT, timeout=60, check=False
    )


def resolved(*files: Path) -> dict:
    out = compose(*files, args=("config", "--format", "json"))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def gpu() -> dict:
    return resolved(COMPOSE)


@pytest.fixture(scope="module")
def cpu() -> dict:
    return resolved(COMPOSE, CPU_OVERRIDE)


@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, CPU_OVERRIDE)], ids=["gpu", "cpu"])
def test_compose_accepts_the_files(files):
    out = compose(*files, args=("config", "--quiet"))
    assert out.returncode == 0, out.stderr


def test_compose_binary_rejects_an_invalid_file(tmp_path):
    """The binary's exit status is what the test reads, so a broken file must fail it."""
    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  web:\n    image: x\n    ports: 8000\n")
    out = compose(bad, args=("config", "--quiet"))
    assert out.returncode != 0


def test_stack_has_server_prometheus_and_grafana(gpu):
    assert {SERVER, "prometheus", "grafana"} <= set(gpu["services"])


def test_server_reserves_a_gpu(gpu):
    devices = gpu["services"][SERVER]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices)


def test_cpu_override_drops_the_gpu_and_builds_cpu_torch(cpu):
    server = cpu["services"][SERVER]
    assert "deploy" not in server
    assert server["environment"]["CATS_DEVICE"] == "cpu"
    build_args = server["build"]["args"]
    assert "cpu" in build_args["TORCH_INDEX_URL"]
    assert build_args["TORCH_REQUIREMENT"].startswith("torch")
    dockerfile = (ROOT / server["build"]["dockerfile"]).read_text()
    for name in build_args:
        assert f"ARG {name}" in dockerfile, f"build arg {name} is not declared in the Dockerfile"


def test_model_cache_volume_is_mounted_where_the_image_keeps_it(gpu):
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    mounts = gpu["services"][SERVER]["volumes"]
    named = [m for m in mounts if m["type"] == "volume"]
    assert named and all(f"CATS_CACHE_DIR={m['target']}" in dockerfile for m in named)


def _bind_sources(service: dict) -> dict[str, Path]:
    """container path -> host path of a service's bind mounts."""
    return {m["target"]: Path(m["source"]) for m in service["volumes"] if m["type"] == "bind"}


def test_prometheus_scrapes_the_server_by_service_name(gpu):
    binds = _bind_sources(gpu["services"]["prometheus"])
    config_path = binds["/etc/prometheus/prometheus.yml"]
    assert config_path == ROOT / "docker" / "prometheus.yml"
    config = yaml.safe_load(config_path.read_text())
    targets = [
        t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    ]
    server = gpu["services"][SERVER]
    container_ports = {int(p["target"]) for p in server["ports"]}
    assert any(
        host == SERVER and int(port) in container_ports
        for host, port in (t.rsplit(":", 1) for t in targets)
    ), targets


def test_grafana_mounts_provisioning_and_dashboards(gpu):
    grafana = gpu["services"]["grafana"]
    binds = _bind_sources(grafana)
    assert binds["/etc/grafana/provisioning"] == ROOT / "docker" / "grafana" / "provisioning"
    providers = yaml.safe_load(
        (ROOT / "docker/grafana/provisioning/dashboards/cats-serve.yml").read_text()
    )["providers"]
    for provider in providers:
        path = provider["options"]["path"]
        assert path in binds, f"dashboard provider path {path} is not mounted"
        assert list(binds[path].glob("*.json")), f"no dashboard JSON in {binds[path]}"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    host_dir = binds[str(Path(home).parent)]
    assert (host_dir / Path(home).name).is_file()
