"""Overlapping refreshes of one worker (the router's load poll and a ListWorkers call, each polling the worker):
the router still follows the worker's KV events once both have ended (real worker servers over tiny engines, no
Ray; the workers' GetInfo answers are held back to make the overlap happen every time)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import pytest
from conditions import until
from router_cluster import cluster

from radixserve.router import workers
from radixserve.v1 import api_pb2, types_pb2, worker_pb2_grpc
from radixserve.worker.models.checkpoint import Checkpoint
from radixserve.worker.models.loading import open_checkpoint

Hold = Callable[["HeldStub", int], Awaitable[None]]


class HeldStub(worker_pb2_grpc.WorkerStub):
    """A worker stub whose ``GetInfo`` answers (the worker's real answer) only after ``HeldStub.hold(stub, n)``
    returns for its ``n``-th call."""

    hold: Hold | None = None
    made: list[HeldStub] = []

    def __init__(self, channel: object) -> None:
        super().__init__(channel)
        self.calls = 0
        self.answered = 0
        self.called = asyncio.Event()
        real = self.GetInfo

        async def held(*args: object, **kwargs: object) -> object:
            self.calls += 1
            number = self.calls
            self.called.set()
            info = await real(*args, **kwargs)
            self.answered += 1
            if HeldStub.hold is not None:
                await HeldStub.hold(self, number)
            return info

        self.GetInfo = held
        HeldStub.made.append(self)


@pytest.fixture
def held_stubs(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[HeldStub]]:
    monkeypatch.setattr(workers.worker_pb2_grpc, "WorkerStub", HeldStub)
    HeldStub.made.clear()
    yield HeldStub
    HeldStub.hold = None


@pytest.fixture(scope="module")
def checkpoint(tiny_hf_dir: Path) -> Checkpoint:
    return open_checkpoint(tiny_hf_dir)


async def _new_client(c, record_change: int) -> workers.WorkerClient:
    """A new client of worker w0 (its registry record changed): returns it once the router made it."""
    old = c.router.workers.clients["w0"]
    record = dataclasses.replace(old.record, max_running_requests=old.record.max_running_requests + record_change)
    await c.bus.announce(record)
    await until(lambda: c.router.workers.clients["w0"] is not old, "the router to make a new client")
    return c.router.workers.clients["w0"]


def test_a_refresh_learning_the_incarnation_a_second_time_keeps_the_events_live(
        checkpoint: Checkpoint, held_stubs: type[HeldStub]) -> None:
    async def main() -> None:
        async with cluster(checkpoint, num_workers=1) as c:
            async def hold(stub: HeldStub, number: int) -> None:
                if stub is not HeldStub.made[-1]:
                    return
                if number == 1:  # the poll's: until the status request's refresh asks too
                    await until(lambda: stub.calls >= 2, "the second refresh to ask GetInfo")
                else:  # the status request's: until the poll's learned the worker and its snapshot applied
                    await until(lambda: c.router.workers.clients["w0"].events_live, "the first snapshot")
            HeldStub.hold = hold
            client = await _new_client(c, 1)
            await HeldStub.made[-1].called.wait()
            await c.router.workers.refresh()  # what ListWorkers does, while the poll's GetInfo is held
            await until(lambda: client.events_live and client.info is not None, "the events to be live")
    asyncio.run(asyncio.wait_for(main(), 120))


def test_a_refresh_ending_after_its_client_was_replaced_leaves_the_new_client_live(
        checkpoint: Checkpoint, held_stubs: type[HeldStub]) -> None:
    async def main() -> None:
        async with cluster(checkpoint, num_workers=1) as c:
            released = asyncio.Event()

            async def hold(stub: HeldStub, number: int) -> None:
                if stub is HeldStub.made[1]:  # the first replacement's: until the second replaced it
                    await released.wait()
            HeldStub.hold = hold
            first = await _new_client(c, 1)
            await HeldStub.made[1].called.wait()
            refreshing = asyncio.create_task(c.router.workers.refresh())  # its GetInfo held too
            await until(lambda: HeldStub.made[1].answered >= 2, "the status request's GetInfo answered")
            second = await _new_client(c, 2)
            await until(lambda: second.events_live, "the second client's events to be live")
            released.set()
            await refreshing
            assert first is not c.router.workers.clients["w0"]
            await until(lambda: second.events_live and second.state == workers.WorkerState.UP,
                        "the second client to stay live")
    asyncio.run(asyncio.wait_for(main(), 120))


class MissingStub(worker_pb2_grpc.WorkerStub):
    """A worker stub whose ``GetLoad`` fails DEADLINE_EXCEEDED while ``MissingStub.misses`` is above 0, each
    failure taking one: what a poll sees when the router's own process stalled past the poll's deadline."""

    misses = 0

    def __init__(self, channel: object) -> None:
        super().__init__(channel)
        real = self.GetLoad

        async def get_load(*args: object, **kwargs: object) -> object:
            if MissingStub.misses > 0:
                MissingStub.misses -= 1
                raise grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(),
                                           grpc.aio.Metadata(), "Deadline Exceeded")
            return await real(*args, **kwargs)

        self.GetLoad = get_load


def test_one_load_poll_past_its_deadline_leaves_the_worker_up_and_polls_that_keep_missing_mark_it_down(
        checkpoint: Checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the fix a single poll past its deadline marked the worker down: a two-second stall of the test
    process made both workers' polls miss at once, and a request found no worker up (UNAVAILABLE)."""
    monkeypatch.setattr(workers.worker_pb2_grpc, "WorkerStub", MissingStub)
    monkeypatch.setattr(MissingStub, "misses", 0)

    async def main() -> None:
        async with cluster(checkpoint, num_workers=1) as c:
            client = c.router.workers.clients["w0"]
            await until(lambda: client.state == workers.WorkerState.UP, "the worker to be up")
            MissingStub.misses = 1
            await client.refresh()  # this poll, or the poller's, misses; the failure is handled before it returns
            assert MissingStub.misses == 0
            assert client.state == workers.WorkerState.UP
            reply = await c.stub.Complete(api_pb2.GenerateRequest(
                token_ids=api_pb2.TokenIds(ids=list(range(5, 25))),
                sampling=types_pb2.SamplingOptions(max_tokens=2, temperature=0)), timeout=30)
            assert reply.worker_id == "w0"
            MissingStub.misses = 10**9  # the worker stops answering in time
            await until(lambda: client.state == workers.WorkerState.DOWN, "the worker to be marked down")
            MissingStub.misses = 0
            await until(lambda: client.state == workers.WorkerState.UP, "the worker to be up again")
    asyncio.run(asyncio.wait_for(main(), 120))
