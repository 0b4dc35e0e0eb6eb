"""A real Prometheus scrapes the running cluster: every dashboard panel and alert rule evaluates on real data.

Prometheus (Debian's package, on a free port) reads the targets file ``up`` keeps, scrapes every process each
second and evaluates ``dashboards/alerts.yml``. The test drives load through the router (including one bad
request, so the error panels have a series), then asks Prometheus for every panel's expression and checks the
rules; the last test stops a worker for good and waits for the worker-down alert to fire.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import ray
from cluster_calls import chat_request, system_prompt

from radixserve.cluster.control.dashboards import dashboard_exprs, rule_exprs
from radixserve.cluster.control.discovery import read_targets
from radixserve.cluster.control.launcher import ClusterRunner
from radixserve.cluster.base.metrics import scrape, total
from radixserve.cluster.control.pool import RAY_NAMESPACE, worker_name
from radixserve.cluster.control.prometheus import PrometheusServer
from radixserve.v1 import api_pb2, api_pb2_grpc, types_pb2

ROOT = Path(__file__).parents[2]
DASHBOARD = ROOT / "dashboards" / "radixserve-overview.json"
ALERTS = ROOT / "dashboards" / "alerts.yml"
SYSTEM = system_prompt("observability", num_rules=20)


def _ask(stub: api_pb2_grpc.GenerationStub, question: str) -> api_pb2.CompleteResponse:
    return stub.Complete(chat_request(SYSTEM, question), timeout=120)


@pytest.fixture(scope="session")
def prometheus(cluster: ClusterRunner, stub: api_pb2_grpc.GenerationStub) -> Iterator[PrometheusServer]:
    with PrometheusServer(cluster.targets_path, [ALERTS], scrape_interval_s=1.0) as server:
        num_targets = sum(len(v) for v in read_targets(cluster.targets_path).values())
        server.wait_for(lambda: len([s for s in server.query("up == 1")]) == num_targets, timeout_s=60)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda i: _ask(stub, f"Question {i}: name a colour."), range(12)))
        assert all(a.choices[0].token_ids for a in answers)
        with pytest.raises(grpc.RpcError) as bad:
            stub.Complete(api_pb2.GenerateRequest(text="hi", sampling=types_pb2.SamplingOptions(temperature=-1.0)))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        router = read_targets(cluster.targets_path)["router"][0]
        server.wait_for(lambda: _value(server, "sum(radixserve_router_requests_total)")
                        == total(scrape(router), "radixserve_router_requests_total"), timeout_s=30)
        # rate() needs two samples of a series: wait for a second scrape of the error series born last
        errors = 'count_over_time(radixserve_router_requests_total{code="INVALID_ARGUMENT"}[1m])'
        server.wait_for(lambda: (_value(server, errors) or 0) >= 2, timeout_s=30)
        yield server


def _value(server: PrometheusServer, expr: str) -> float | None:
    result = server.query(expr)
    return float(result[0]["value"][1]) if result else None


def test_the_targets_file_lists_the_router_and_every_worker(cluster: ClusterRunner) -> None:
    targets = read_targets(cluster.targets_path)
    assert len(targets["router"]) == 1 and len(targets["worker"]) == cluster.config.pool.num_workers
    workers = {s.labels["worker"] for address in targets["worker"] for s in scrape(address) if "worker" in s.labels}
    assert workers == {worker_name(i) for i in range(cluster.config.pool.num_workers)}


@pytest.mark.parametrize("title, expr", dashboard_exprs(DASHBOARD))
def test_every_dashboard_panel_returns_data(prometheus: PrometheusServer, title: str, expr: str) -> None:
    assert prometheus.query(expr), f"panel {title!r}: {expr} returned no series"


def test_every_alert_rule_evaluates_without_error(prometheus: PrometheusServer) -> None:
    names = {name for name, _ in rule_exprs(ALERTS)}

    def evaluated() -> list[dict]:
        rules = [r for r in prometheus.rules() if r["name"] in names]
        return rules if len(rules) == len(names) and all(r["health"] != "unknown" for r in rules) else []

    rules = prometheus.wait_for(evaluated, timeout_s=30)
    assert [(r["name"], r["health"], r.get("lastError", "")) for r in rules] == \
        [(r["name"], "ok", "") for r in rules]
    for name, expr in rule_exprs(ALERTS):
        prometheus.query(expr)  # raises ValueError naming the problem if the expression cannot be evaluated


def test_hit_ratio_and_requests_in_prometheus_match_the_router(cluster: ClusterRunner,
                                                              prometheus: PrometheusServer) -> None:
    router = scrape(read_targets(cluster.targets_path)["router"][0])
    cached, prompt = (total(router, f"radixserve_router_{n}_tokens_total") for n in ("cached", "prompt"))
    assert cached > 0  # the shared system prompt was served from cache
    ratio = _value(prometheus, "sum(radixserve_router_cached_tokens_total) / sum(radixserve_router_prompt_tokens_total)")
    assert ratio == pytest.approx(cached / prompt)
    workers = _value(prometheus, "sum(radixserve_worker_prefix_cache_hit_tokens_total)")
    assert workers is not None and workers >= cached  # workers also count the retried and the test's other traffic


@pytest.mark.stops_worker
def test_the_worker_down_alert_fires_when_a_worker_stops(prometheus: PrometheusServer) -> None:
    ray.kill(ray.get_actor(worker_name(1), namespace=RAY_NAMESPACE), no_restart=True)

    def firing() -> list[dict]:
        return [a for a in prometheus.alerts() if a["labels"]["alertname"] == "RadixserveWorkerDown"
                and a["state"] == "firing"]

    alerts = prometheus.wait_for(firing, timeout_s=90, interval_s=1.0)
    assert len(alerts) == 1 and alerts[0]["labels"]["component"] == "worker"
