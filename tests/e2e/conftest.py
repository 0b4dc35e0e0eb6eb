"""A real cluster for the end-to-end tests: a local Ray, two SmolLM2 workers and the router, in this process.

Tests talk to it only through its public APIs (the generated gRPC stubs, the OpenAI-compatible HTTP API of the
router and of each worker), as a user's client would; they reach Ray only to kill a worker actor.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from radixserve.cluster.base.config import load_cluster_config
from radixserve.cluster.control.launcher import ClusterRunner
from radixserve.v1 import api_pb2, api_pb2_grpc

# Small enough to start fast, big enough that no e2e workload evicts: 4,096 tokens of context, 0.25 GiB of KV.
E2E_SETTINGS = {
    "pool.num_workers": 2,
    "engine.max_model_len": 4096,
    "engine.cache.memory_gib": 0.25,
    "router.health_interval_s": 0.2,
    "router.drain_timeout_s": 5.0,
    "router.http_port": 0,
}


@pytest.fixture(scope="session")
def cluster(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterRunner]:
    targets = tmp_path_factory.mktemp("metrics") / "prometheus_targets.json"
    config = load_cluster_config(None, {**E2E_SETTINGS, "router.port": 0, "metrics.sd_file": str(targets)})
    runner = ClusterRunner(config)
    try:
        runner.start(print)
        yield runner
    finally:
        runner.stop(print)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``stops_worker`` stop a worker of the shared cluster for good, so they run last."""
    items.sort(key=lambda item: item.get_closest_marker("stops_worker") is not None)


@pytest.fixture(scope="session")
def channel(cluster: ClusterRunner) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(cluster.router_address) as chan:
        grpc.channel_ready_future(chan).result(timeout=30)
        yield chan


@pytest.fixture(scope="session")
def stub(channel: grpc.Channel) -> api_pb2_grpc.GenerationStub:
    return api_pb2_grpc.GenerationStub(channel)


@pytest.fixture(scope="session")
def router_url(cluster: ClusterRunner) -> str:
    """The router's OpenAI-compatible HTTP API."""
    return f"http://{cluster.http_address}"


@pytest.fixture(scope="session")
def worker_urls(stub: api_pb2_grpc.GenerationStub) -> list[str]:
    """Each worker's own OpenAI-compatible HTTP API, in worker order."""
    workers = sorted(stub.ListWorkers(api_pb2.ListWorkersRequest(), timeout=30).workers, key=lambda w: w.worker_id)
    return [f"http://{w.http_address}" for w in workers]
