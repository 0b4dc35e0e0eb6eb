"""The router's background tasks survive an unexpected error: it is logged, counted in
``radixserve_router_background_task_failures_total{task=...}`` and the task resumes (real workers over tiny
engines, no Ray; the Redis case on a real redis-server)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter
from conditions import until
from router_cluster import cluster

from radixserve.cluster.base.buses import make_bus
from radixserve.cluster.base.config import BusConfig
from radixserve.cluster.base.hashing import namespace_seed, page_hashes
from radixserve.cluster.base.metrics import scrape, total
from radixserve.cluster.control.redis_server import LocalRedisServer
from radixserve.router.routing import WorkerLoad
from radixserve.router.shared_load import SharedLoad
from radixserve.router.supervisor import Supervisor
from radixserve.v1 import api_pb2, types_pb2
from radixserve.worker.models.checkpoint import Checkpoint
from radixserve.worker.models.loading import open_checkpoint

TIMEOUT_S = 30.0
FAILURES = "radixserve_router_background_task_failures_total"


@pytest.fixture(scope="module")
def checkpoint(tiny_hf_dir: Path) -> Checkpoint:
    return open_checkpoint(tiny_hf_dir)


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 120))



def fail_once(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function``, except that its first call raises RuntimeError("injected")."""
    calls = []

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("injected")
        return function(*args, **kwargs)
    return wrapped


def test_a_kv_log_reader_that_fails_once_is_logged_counted_and_the_index_keeps_learning(
        checkpoint: Checkpoint, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)

    async def main() -> None:
        async with cluster(checkpoint, num_workers=1) as c:
            sequencer = c.router.workers.sequencer
            sequencer.apply = fail_once(sequencer.apply)  # type: ignore[method-assign]
            prompts = [list(range(first, first + 20)) for first in (5, 105)]
            for prompt in prompts:
                await c.stub.Complete(api_pb2.GenerateRequest(
                    token_ids=api_pb2.TokenIds(ids=prompt),
                    sampling=types_pb2.SamplingOptions(max_tokens=2, temperature=0)), timeout=TIMEOUT_S)
            hashes = [page_hashes(prompt, 4, namespace_seed("tiny")) for prompt in prompts]
            await until(lambda: all(c.router.index.match(h, ["w0"])["w0"] == 5 for h in hashes),
                        "both prompts' pages in the index")
            metrics = scrape(c.router.metrics_address)
            assert total(metrics, FAILURES, task="kv_log_reader") == 1
            assert total(metrics, FAILURES) == 1
    run(main)
    assert "background task kv_log_reader w0 failed" in caplog.text and "injected" in caplog.text


class Holder:
    """What a router keeps per worker (``router.shared_load.LoadHolder``)."""

    def __init__(self) -> None:
        self.outstanding = WorkerLoad()
        self.peer_load = None
        self.load = types_pb2.LoadReport()
        self.num_log_entries = 0
        self.info = None


def test_shared_load_that_fails_once_resumes_publishing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    failures = Counter("failures", "test", ["task"], registry=CollectorRegistry())

    async def main(url: str) -> None:
        config = BusConfig(backend="redis", url=url)
        bus, peer = make_bus(config), make_bus(config)
        shared = SharedLoad(bus, "router-0", {"w0": Holder()}, interval_s=0.02)
        shared.exchange = fail_once(shared.exchange)  # type: ignore[method-assign]
        task = Supervisor(failures).start("shared_load", shared.run)
        try:
            async def published() -> bool:
                return "router-0" in await peer.loads("router")

            await until(published, "router-0 to publish its load")
        finally:
            shared.stop()
            await task
            await bus.close()
            await peer.close()

    with LocalRedisServer(tmp_path) as redis_server:
        run(lambda: main(redis_server.url))
    assert failures.labels("shared_load")._value.get() == 1
    assert "background task shared_load failed" in caplog.text


def test_the_backoff_is_bounded_and_a_loop_that_returns_is_done() -> None:
    failures = Counter("failures", "test", ["task"], registry=CollectorRegistry())
    runs = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 4:
            raise ValueError("again")

    async def main() -> None:
        await asyncio.wait_for(Supervisor(failures, min_backoff_s=0.01, max_backoff_s=0.02).start("flaky", flaky),
                               TIMEOUT_S)

    run(main)
    assert len(runs) == 4 and failures.labels("flaky")._value.get() == 3
    with pytest.raises(ValueError, match="^min_backoff_s:"):
        Supervisor(failures, min_backoff_s=0)
