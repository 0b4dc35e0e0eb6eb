"""``radixserve top`` and the metrics reading it relies on, against real /metrics endpoints on loopback."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_calls import closed_port
from prometheus_client import CollectorRegistry

from radixserve.cluster.control.cli import main as cli_main
from radixserve.cluster.control.discovery import read_targets, target_groups, write_targets
from radixserve.cluster.base.bus import WorkerRecord
from radixserve.cluster.base.metrics import MetricsEndpoint, Sample, histogram_quantile
from radixserve.cluster.control.top import format_frame, read_frame, since
from radixserve.router.metrics import RouterMetrics
from radixserve.worker.stats import EngineLoad
from radixserve.worker.metrics import EngineMetrics

IDLE = EngineLoad(num_running=0, num_waiting=0, num_pages_used=0, num_pages_free=100, num_pages_evictable=0,
                  num_steps=0, num_prompt_tokens=0, num_cached_prompt_tokens=0, num_computed_tokens=0,
                  num_generated_tokens=0, num_requests_finished=0, num_evicted_pages=0, num_preemptions=0,
                  num_pending_prefill_tokens=0, num_pending_output_tokens=0)


def bucket(le: str, value: float) -> Sample:
    return Sample("lat_bucket", {"le": le}, value)


def test_histogram_quantile_interpolates_within_a_bucket_as_prometheus_does() -> None:
    samples = [bucket("1.0", 2), bucket("2.0", 6), bucket("+Inf", 8)]
    assert histogram_quantile(samples, "lat", 0.5) == pytest.approx(1.5)  # rank 4 of 8: halfway through (1, 2]
    assert histogram_quantile(samples, "lat", 0.25) == pytest.approx(1.0)
    assert histogram_quantile(samples, "lat", 0.99) == 2.0  # in +Inf: the last finite bound
    assert histogram_quantile([bucket("+Inf", 0)], "lat", 0.5) is None


def test_since_takes_increases_of_counters_and_buckets_and_keeps_gauges() -> None:
    before = [Sample("a_total", {}, 10), Sample("g", {}, 5), bucket("1.0", 3), Sample("b_total", {}, 7)]
    now = [Sample("a_total", {}, 14), Sample("g", {}, 2), bucket("1.0", 4), Sample("b_total", {}, 2)]
    assert [s.value for s in since(now, before)] == [4, 2, 1, 2]  # b was reset: its increase is its value now
    assert since(now, None) == now


@dataclasses.dataclass
class Endpoints:
    router: RouterMetrics
    worker: EngineMetrics
    load: list[EngineLoad]
    targets: Path


@pytest.fixture
def endpoints(tmp_path: Path) -> Iterator[Endpoints]:
    load = [IDLE]
    router, worker = RouterMetrics(CollectorRegistry(), "prefix"), EngineMetrics(CollectorRegistry(), "w0")
    worker.bind(lambda: load[0])
    served = [MetricsEndpoint(router.registry), MetricsEndpoint(worker.registry)]
    targets = tmp_path / "targets.json"
    with closed_port() as silent:
        workers = {"w0": WorkerRecord("w0", "127.0.0.1:1", "m", "i", 8, served[1].address),
                   "w1": WorkerRecord("w1", "127.0.0.1:1", "m", "i", 8, f"127.0.0.1:{silent}")}
        write_targets(targets, target_groups([served[0].address], workers))
        yield Endpoints(router, worker, load, targets)
    for endpoint in served:
        endpoint.stop()


def test_a_frame_shows_rates_and_quantiles_over_the_interval_and_marks_a_silent_worker_down(
        endpoints: Endpoints) -> None:
    endpoints.router.requests.labels("Generate", "OK").inc(10)
    endpoints.router.ttft.observe(5.0)
    first = read_frame(read_targets(endpoints.targets))
    endpoints.router.requests.labels("Generate", "OK").inc(4)
    endpoints.router.requests.labels("Generate", "INVALID_ARGUMENT").inc()
    endpoints.router.prompt_tokens.labels("w0").inc(100)
    endpoints.router.cached_tokens.labels("w0").inc(75)
    for _ in range(4):
        endpoints.router.ttft.observe(0.1)
    endpoints.load[0] = dataclasses.replace(IDLE, num_running=3, num_waiting=2, num_pages_used=25, num_pages_free=75,
                                            num_prompt_tokens=200, num_cached_prompt_tokens=50,
                                            num_generated_tokens=600)
    second = read_frame(read_targets(endpoints.targets))
    text = format_frame(second, first)
    window = second.at - first.at
    router_line, header, *rows = text.splitlines()
    assert f"{4 / window:.2f} req/s ok, 1 failed" in router_line and "hit 75.0%" in router_line
    assert re.search(r"TTFT p50 \d+ ms", router_line)  # the interval's TTFTs only (0.1 s), not the 5 s before
    w0 = next(r for r in rows if r.startswith("w0")).split()
    assert w0[2:6] == ["3", "2", "25.0%", "25.0%"] and w0[6] == f"{600 / window:.1f}"
    assert any(r.startswith("?") and r.split()[2] == "down" for r in rows)
    assert header.split()[:2] == ["WORKER", "ADDRESS"]


def test_radixserve_top_prints_the_requested_number_of_frames(endpoints: Endpoints,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["top", "--targets", str(endpoints.targets), "--iterations", "2", "--interval", "0.05"]) == 0
    out = capsys.readouterr().out
    assert out.count("WORKER  ") == 2 and out.count("router 127.0.0.1:") == 2
    assert out.count("down") == 2  # w1 is listed but not answering


def test_radixserve_top_without_a_targets_file_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["top", "--targets", str(tmp_path / "none.json"), "--iterations", "1"]) == 1
    assert "no targets file" in capsys.readouterr().err
