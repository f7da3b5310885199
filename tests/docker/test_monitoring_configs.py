"""prometheus.yml, Grafana provisioning and the dashboard JSON, checked without any server."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from external_tools import prometheus_binaries
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cats_serve.server.engine.types import StepStats
from cats_serve.server.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_YML = ROOT / "docker" / "prometheus.yml"
GRAFANA = ROOT / "docker" / "grafana"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD = GRAFANA / "dashboards" / "cats-serve.json"

# Grafana's own interval/range variables; anything else with a `$` would be an import placeholder
# or a template variable Prometheus cannot resolve.
GRAFANA_MACROS = ("$__rate_interval", "$__interval", "$__range")


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict) -> list[dict]:
    out = []
    for panel in board["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return [p for p in out if p["type"] != "row"]


def exprs(board: dict) -> list[str]:
    return [t["expr"] for p in panels(board) for t in p["targets"]]


def datasource() -> dict:
    (ds,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    return ds


def test_promtool_accepts_prometheus_yml():
    _, promtool = prometheus_binaries()
    out = subprocess.run(
        [str(promtool), "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_rejects_a_broken_config(tmp_path):
    _, promtool = prometheus_binaries()
    bad = tmp_path / "prometheus.yml"
    bad.write_text("global:\n  scrape_interval: soon\n")
    out = subprocess.run([str(promtool), "check", "config", str(bad)], capture_output=True)
    assert out.returncode != 0


def test_scrape_interval_equals_the_datasource_time_interval():
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    intervals = {config["global"]["scrape_interval"]}
    intervals |= {j["scrape_interval"] for j in config["scrape_configs"] if "scrape_interval" in j}
    assert intervals == {datasource()["jsonData"]["timeInterval"]}


def test_datasource_is_prometheus_with_a_fixed_uid():
    ds = datasource()
    assert ds["type"] == "prometheus"
    assert ds["uid"]
    assert ds["url"].startswith("http://prometheus:")


def test_every_panel_uses_the_provisioned_datasource():
    uid = datasource()["uid"]
    board = dashboard()
    for panel in panels(board):
        refs = [panel["datasource"], *(t["datasource"] for t in panel["targets"])]
        assert all(r == {"type": "prometheus", "uid": uid} for r in refs), panel["title"]


def test_dashboard_has_no_import_placeholders():
    text = DASHBOARD.read_text()
    assert "__inputs" not in dashboard()
    assert "${" not in text
    for expr in exprs(dashboard()):
        rest = expr
        for macro in GRAFANA_MACROS:
            rest = rest.replace(macro, "")
        assert "$" not in rest, expr


def test_dashboard_identity_is_stable():
    board = dashboard()
    assert board["uid"] and board["title"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(
    "wanted",
    [
        "request rate",
        "time to first token",
        "inter-token latency",
        "end-to-end",
        "tokens per second",
        "running and waiting",
        "sparsity distribution",
        "bytes not read by requested level",
        "per-layer sparsity",
        "bytes skipped",
        "finish reasons",
        "errors",
    ],
)
def test_dashboard_has_the_panels_of_issue_7(wanted):
    titles = [p["title"].lower() for p in panels(dashboard())]
    assert any(wanted in t for t in titles), titles


def test_quantile_panels_show_p50_p90_p99():
    for panel in panels(dashboard()):
        title = panel["title"].lower()
        if any(k in title for k in ("first token", "inter-token", "end-to-end")):
            legends = sorted(t["legendFormat"] for t in panel["targets"])
            assert legends == ["p50", "p90", "p99"], panel["title"]


def test_heatmaps_take_ready_buckets():
    heatmaps = [p for p in panels(dashboard()) if p["type"] == "heatmap"]
    assert len(heatmaps) >= 2
    for panel in heatmaps:
        assert panel["options"]["calculate"] is False, panel["title"]


def exposed_names() -> set[str]:
    """Every sample name cats-serve exposes once it has seen a request and a decode step."""
    metrics = Metrics()
    # Publishing the model creates every per-level series; one step fills the window gauges.
    metrics.set_model_info("m", "float32", "float32", "cpu", [0.0, 0.5])
    step = StepStats(
        batch_size=1,
        bucket=1,
        mlp_path="sparse",
        union_sparsity=0.5,
        weight_bytes_skipped=1,
        weight_bytes_skipped_ratio=0.3,
        layer_sparsity=[0.5],
    )
    metrics.observe_step(step)
    text = generate_latest(metrics.registry).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_dashboard_queries_only_metrics_the_server_exposes():
    names = exposed_names()
    for expr in exprs(dashboard()):
        used = set(re.findall(r"\bcats_[a-z0-9_]+", expr))
        assert used, expr
        assert used <= names, f"{expr}: unknown {used - names}"


def test_level_panel_shows_each_sparsity_quantity():
    (panel,) = [p for p in panels(dashboard()) if "by requested level" in p["title"].lower()]
    exprs = " ".join(t["expr"] for t in panel["targets"])
    for metric in ("mlp_sparsity", "row_sparsity", "weight_bytes_skipped"):
        assert f"cats_request_{metric}_ratio_sum" in exprs, metric
