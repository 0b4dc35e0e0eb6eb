"""A draining worker as the router sees it (real worker servers over tiny engines, no Ray): its load report says
so, the router marks it draining and sends it nothing new; with every worker draining a request is UNAVAILABLE."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from conditions import until
from router_cluster import Cluster, cluster

from radixserve.cluster.base.metrics import scrape, total
from radixserve.v1 import api_pb2, types_pb2, worker_pb2, worker_pb2_grpc
from radixserve.worker.models.checkpoint import Checkpoint
from radixserve.worker.models.loading import open_checkpoint

TIMEOUT_S = 30.0
DRAIN_GRACE_S = 60.0  # the held request keeps the worker draining until the test lets it finish


@pytest.fixture(scope="module")
def checkpoint(tiny_hf_dir: Path) -> Checkpoint:
    return open_checkpoint(tiny_hf_dir)


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 120))


def request(first_token: int = 5) -> api_pb2.GenerateRequest:
    return api_pb2.GenerateRequest(token_ids=api_pb2.TokenIds(ids=list(range(first_token, first_token + 20))),
                                   sampling=types_pb2.SamplingOptions(max_tokens=3, temperature=0))



@contextlib.asynccontextmanager
async def draining(c: Cluster, index: int) -> AsyncIterator[None]:
    """Worker ``index`` draining: a request held in flight on it (its engine's gate closed) while it stops."""
    engine, server = c.engines[index], c.servers[index]
    engine.gate.clear()
    async with grpc.aio.insecure_channel(server.address) as channel:
        held = worker_pb2_grpc.WorkerStub(channel).Generate(worker_pb2.WorkerGenerateRequest(
            request_id=f"held-{index}", token_ids=list(range(300, 320)),
            sampling=types_pb2.SamplingOptions(max_tokens=2, temperature=0)), timeout=TIMEOUT_S)
        await until(lambda: engine.load().num_running + engine.load().num_waiting == 1, "the held request")
        stopping = asyncio.ensure_future(server.stop(grace_s=DRAIN_GRACE_S))
        try:
            yield
        finally:
            engine.gate.set()
            async for _ in held:
                pass
            await stopping


def test_a_draining_worker_gets_nothing_new_and_every_request_goes_to_the_other_one(checkpoint: Checkpoint):
    async def main() -> None:
        async with cluster(checkpoint) as c, draining(c, 0):
            await until(lambda: c.router.workers.clients["w0"].state == "draining",
                        "the router to see w0 draining")
            listed = await c.stub.ListWorkers(api_pb2.ListWorkersRequest(), timeout=TIMEOUT_S)
            assert {w.worker_id: w.state for w in listed.workers} == {"w0": "draining", "w1": "up"}
            assert [w.load.draining for w in listed.workers] == [True, False]
            retried = total(scrape(c.router.metrics_address), "radixserve_router_retries_total")
            replies = await asyncio.gather(*(c.stub.Complete(request(first_token=5 + 40 * i), timeout=TIMEOUT_S)
                                             for i in range(6)))
            assert [r.worker_id for r in replies] == ["w1"] * 6
            metrics = scrape(c.router.metrics_address)
            assert total(metrics, "radixserve_router_retries_total") == retried  # none was sent to w0 first
            assert total(metrics, "radixserve_router_workers", state="draining") == 1
    run(main)


def test_with_every_worker_draining_a_request_is_unavailable_saying_so(checkpoint: Checkpoint):
    async def main() -> None:
        async with cluster(checkpoint) as c, draining(c, 0), draining(c, 1):
            await until(lambda: all(w.state == "draining" for w in c.router.workers.clients.values()),
                        "the router to see both workers draining")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await c.stub.Complete(request(), timeout=TIMEOUT_S)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "draining" in caught.value.details()
    run(main)
