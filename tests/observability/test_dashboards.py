"""The Grafana dashboard, the alert rules and the Prometheus config: valid for Prometheus, naming only metrics the
router and workers export, and evaluating to series on a real Prometheus scraping real registries."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from radixserve.cluster.control.dashboards import (PanelQuery, dashboard_exprs, legend, metric_names, rule_exprs,
                                           unknown_metrics)
from radixserve.cluster.base.metrics import MetricsEndpoint, sample_names
from radixserve.cluster.control.prometheus import PrometheusServer
from radixserve.router.metrics import RouterMetrics, WorkerGauges
from radixserve.worker.stats import EngineLoad
from radixserve.worker.metrics import EngineMetrics

REPO = Path(__file__).parents[2]
DASHBOARD = REPO / "dashboards" / "radixserve-overview.json"
ALERTS = REPO / "dashboards" / "alerts.yml"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
ALERT_NAMES = {"RadixserveWorkerDown", "RadixserveHitRatioCollapsed", "RadixserveQueueGrowing",
               "RadixserveKvPoolExhausted", "RadixserveErrorRate", "RadixserveRouterIndexStale"}



def _router_registry() -> CollectorRegistry:
    """A router's registry with one observation on every metric, so every labelled series exists."""
    metrics = RouterMetrics(CollectorRegistry(), "prefix")
    metrics.bind(lambda: [WorkerGauges("w0", "up", 0, 0, 3)])
    metrics.requests.labels("Generate", "OK").inc()
    metrics.requests.labels("Complete", "UNAVAILABLE").inc()
    metrics.on_decision("w0", 0.001, 0.5)
    metrics.kv_events.labels("w0").inc()
    metrics.kv_event_lag.observe(0.01)
    metrics.kv_resyncs.labels("w0").inc()
    metrics.kv_malformed.labels("w0").inc()
    metrics.route_hints.labels("applied").inc()
    metrics.retries.labels("UNAVAILABLE").inc()
    metrics.ttft.observe(0.1)
    metrics.e2e.observe(0.5)
    for counter in (metrics.prompt_tokens, metrics.cached_tokens, metrics.completion_tokens):
        counter.labels("w0").inc()
    return metrics.registry


def _worker_registry() -> CollectorRegistry:
    """A worker's registry, bound to an all-zero ``EngineLoad``, with one observation on every histogram."""
    metrics = EngineMetrics(CollectorRegistry(), "w0")
    metrics.bind(lambda: EngineLoad(**{field.name: 0 for field in dataclasses.fields(EngineLoad)}))
    metrics.on_step(1, 16, 0.01)
    metrics.on_scheduled(0.001)
    metrics.on_first_token(0.05, 0.04)
    metrics.on_token(0.01)
    metrics.on_finished(0.2)
    return metrics.registry


def _exported() -> set[str]:
    return sample_names(_router_registry()) | sample_names(_worker_registry()) | {"up"}


# --- promtool ---------------------------------------------------------------------------------------------------

def test_promtool_accepts_the_prometheus_config_with_its_rules_and_targets(tmp_path: Path) -> None:
    config = tmp_path / "deploy" / "prometheus" / "prometheus.yml"
    (config.parent / "targets").mkdir(parents=True)
    shutil.copy(PROMETHEUS_CONFIG, config)
    (tmp_path / "dashboards").mkdir()
    shutil.copy(ALERTS, tmp_path / "dashboards" / "alerts.yml")
    (config.parent / "targets" / "radixserve.json").write_text(json.dumps(
        [{"targets": ["127.0.0.1:9400"], "labels": {"component": "router"}}]))
    result = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True,
                            timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "1 rule files found" in output and "WARNING" not in output, output


def test_promtool_accepts_the_alert_rules() -> None:
    result = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERT_NAMES)} rules found" in result.stdout


def test_the_alert_rules_are_the_radixserve_group_each_with_severity_and_annotations() -> None:
    (group,) = yaml.safe_load(ALERTS.read_text())["groups"]
    assert group["name"] == "radixserve"
    rules = {rule["alert"]: rule for rule in group["rules"]}
    assert set(rules) == ALERT_NAMES
    assert rules["RadixserveWorkerDown"]["for"] == "15s"
    assert rules["RadixserveWorkerDown"]["labels"]["severity"] == "critical"
    assert all(rule["labels"]["severity"] and rule["annotations"].keys() >= {"summary", "description"}
               for rule in rules.values())


# --- the dashboard's structure ----------------------------------------------------------------------------------

def test_every_dashboard_panel_queries_the_prometheus_datasource_with_1m_rates() -> None:
    exprs = dashboard_exprs(DASHBOARD)
    assert "KV event lag" in {title for title, _ in exprs}  # a panel inside the collapsed row
    panels = _leaf_panels(json.loads(DASHBOARD.read_text())["panels"])
    assert all(panel["datasource"] == {"type": "prometheus", "uid": "prometheus"} and panel["targets"]
               for panel in panels)
    assert all(window == "1m" for _, expr in exprs for window in re.findall(r"\[([^\]]*)\]", expr))


def _leaf_panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        if panel["type"] == "row":
            yield from _leaf_panels(panel["panels"])
        else:
            yield panel


# --- metric names -----------------------------------------------------------------------------------------------

def test_every_metric_the_dashboard_and_alerts_name_is_exported() -> None:
    exprs = dashboard_exprs(DASHBOARD) + rule_exprs(ALERTS)
    assert len(exprs) > 30
    assert unknown_metrics(exprs, _exported()) == []


def test_the_check_reports_a_metric_nobody_exports(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    bogus = {"title": "Bogus", "targets": [{"expr": "sum(rate(radixserve_worker_bogus_total[1m]))"}]}
    known = {"title": "Known", "targets": [{"expr": "sum(radixserve_worker_kv_free_pages)"}]}
    path.write_text(json.dumps({"panels": [known, {"type": "row", "collapsed": True, "panels": [bogus]}]}))
    assert unknown_metrics(dashboard_exprs(path), _exported()) == [("Bogus", "radixserve_worker_bogus_total")]


@pytest.mark.parametrize("expr, names", [
    ("histogram_quantile(0.9, sum by (le) (rate(radixserve_worker_time_to_first_token_seconds_bucket[1m])))",
     {"radixserve_worker_time_to_first_token_seconds_bucket"}),
    ('sum by (worker) (rate(radixserve_router_requests_total{code!="OK",method=~"radixserve_x|up"}[5m]))',
     {"radixserve_router_requests_total"}),
    ('up{job="radixserve",component="worker"} == 0', {"up"}),
    ("sum(rate(radixserve_router_routing_decisions_total[1m])) / ignoring (worker) group_left "
     "sum(radixserve_worker_kv_free_pages)",
     {"radixserve_router_routing_decisions_total", "radixserve_worker_kv_free_pages"}),
    ("count by (instance) (up) # radixserve_worker_in_a_comment", {"up"}),
    ('label_replace(radixserve_worker_steps_total, "up", "$1", \'worker\', `radixserve_(.*)`)',
     {"radixserve_worker_steps_total"}),
    ('{__name__="radixserve_worker_steps_total"} or vector(0)', set()),
    ("radixserve_worker_waiting_requests > bool 0 unless on (worker) radixserve_worker_running_requests",
     {"radixserve_worker_waiting_requests", "radixserve_worker_running_requests"}),
])
def test_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


# --- a real Prometheus ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """Prometheus scraping a router's and a worker's registries every second, with the alert rules plus one rule
    that always fires."""
    tmp_path = tmp_path_factory.mktemp("prometheus")
    router, worker = MetricsEndpoint(_router_registry()), MetricsEndpoint(_worker_registry())
    sd_file = tmp_path / "targets.json"
    sd_file.write_text(json.dumps([{"targets": [router.address], "labels": {"component": "router"}},
                                   {"targets": [worker.address], "labels": {"component": "worker"}}]))
    always = tmp_path / "always.yml"
    always.write_text(yaml.safe_dump({"groups": [{"name": "test", "rules": [
        {"alert": "RouterScraped", "expr": 'up{component="router"} == 1'}]}]}))
    try:
        with PrometheusServer(sd_file, [ALERTS, always], scrape_interval_s=1.0, evaluation_interval_s=1.0) as server:
            yield server
    finally:
        router.stop()
        worker.stop()


def test_prometheus_scrapes_the_targets_of_the_sd_file(prometheus: PrometheusServer) -> None:
    up = prometheus.wait_for(lambda: _all_or_none(prometheus.query("up == 1"), 2), 10)
    assert {row["metric"]["component"] for row in up} == {"router", "worker"}
    (row,) = prometheus.query('radixserve_router_requests_total{code="UNAVAILABLE"}')
    assert row["metric"]["job"] == "radixserve" and row["metric"]["method"] == "Complete"
    assert float(row["value"][1]) == 1.0


def _all_or_none(rows: list[dict], count: int) -> list[dict]:
    """``rows`` once there are ``count`` of them, else []."""
    return rows if len(rows) == count else []


def _evaluated(rules: list[dict]) -> list[dict]:
    """``rules`` once every one has been evaluated, else []."""
    return rules if all(rule["health"] != "unknown" for rule in rules) else []


def test_a_bad_expression_raises_value_error_naming_the_problem(prometheus: PrometheusServer) -> None:
    with pytest.raises(ValueError, match="parse error"):
        prometheus.query("sum(rate(radixserve_router_requests_total[1m])")


def test_every_dashboard_expression_evaluates_to_series(prometheus: PrometheusServer) -> None:
    # Rates need two scrapes of each target within their window.
    prometheus.wait_for(lambda: prometheus.query("count(rate(radixserve_worker_steps_total[1m]))"), 10)
    prometheus.wait_for(lambda: prometheus.query("count(rate(radixserve_router_requests_total[1m]))"), 10)
    empty = [(title, expr) for title, expr in dashboard_exprs(DASHBOARD) if not prometheus.query(expr)]
    assert empty == []


def test_the_alert_rules_evaluate_and_none_fires_on_an_idle_cluster(prometheus: PrometheusServer) -> None:
    rules = prometheus.wait_for(lambda: _evaluated(prometheus.rules()), 10)
    assert {rule["name"] for rule in rules} == ALERT_NAMES | {"RouterScraped"}
    assert [(rule["name"], rule["health"], rule["lastError"]) for rule in rules if rule["health"] != "ok"] == []
    alerts = prometheus.wait_for(prometheus.alerts, 10)
    assert [(alert["labels"]["alertname"], alert["state"]) for alert in alerts] == [("RouterScraped", "firing")]


def test_start_fails_with_the_end_of_the_log_when_prometheus_exits(tmp_path: Path) -> None:
    rules = tmp_path / "bad.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "bad", "rules": [{"alert": "Bad", "expr": "sum("}]}]}))
    server = PrometheusServer(tmp_path / "targets.json", [rules])
    with pytest.raises(RuntimeError, match="(?s)prometheus exited.*bad.yml"):
        server.start()
    with pytest.raises(RuntimeError, match="not started"):
        server.url


def test_a_legend_fills_its_labels_and_falls_back_to_the_expression() -> None:
    query = PanelQuery("Queue depth", "sum by (worker) (radixserve_worker_waiting_requests)", "{{worker}} waiting")
    assert legend(query, {"worker": "w1"}) == "w1 waiting"
    assert legend(query._replace(legend=""), {"worker": "w1"}) == query.expr
