"""The router's end of a worker's Session stream (``router.worker_session``) against a real worker server, over
each transport: the framed Session (plain TCP) and the gRPC call (what a TLS cluster uses)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
import uvloop
from conditions import until
from gated_engine import GatedEngine

from radixserve.cluster.base.config import CacheConfig, EngineConfig
from radixserve.cluster.base.generation import Status
from radixserve.cluster.base.sampling_params import SamplingParams
from radixserve.cluster.base.wire import sampling_options_to_proto
from radixserve.router.core import RETRYABLE
from radixserve.router.worker_session import WorkerCallFailed, WorkerSession
from radixserve.v1 import worker_pb2, worker_pb2_grpc
from radixserve.worker.models.loading import open_checkpoint
from radixserve.worker.service import WorkerServer

T = TypeVar("T")
PROMPT = [(7 * i + 3) % 300 + 5 for i in range(30)]
SHORT = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
LONG = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)


def make_engine(tiny_hf_dir: Path) -> GatedEngine:
    return GatedEngine(EngineConfig(model="tiny", cache=CacheConfig(page_size=4, num_pages=256)),
                       open_checkpoint(tiny_hf_dir))


def request(request_id: str, params: SamplingParams = SHORT) -> worker_pb2.WorkerGenerateRequest:
    return worker_pb2.WorkerGenerateRequest(request_id=request_id, token_ids=PROMPT,
                                            sampling=sampling_options_to_proto(params))


async def tokens(session: WorkerSession, request_id: str, timeout_s: float | None = 30.0) -> list[int]:
    return [t async for part in session.generate(request(request_id), timeout_s) for c in part.choices
            for t in c.token_ids]


def run(main: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(main(), 120)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # the loop every serving process runs
        return runner.run(bounded())


@pytest.fixture(params=["framed", "grpc"])
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


def session_to(channel: grpc.aio.Channel, servers: list[WorkerServer], transport: str) -> WorkerSession:
    """A session to the last of ``servers`` (looked up at each opening) over ``transport``."""
    def framed() -> tuple[str, int] | None:
        port = servers[-1].session_port
        assert port is not None
        return ("127.0.0.1", port) if transport == "framed" else None
    return WorkerSession(worker_pb2_grpc.WorkerStub(channel), (), framed)


def idle(engine: GatedEngine) -> bool:
    return not engine.has_unfinished() and engine.load().num_pages_used == engine.load().num_pages_evictable


def test_requests_share_one_stream_and_closing_one_early_aborts_it_on_the_worker(tiny_hf_dir: Path,
                                                                                 transport: str) -> None:
    engine = make_engine(tiny_hf_dir)

    async def main() -> tuple[list[int], list[int]]:
        server = WorkerServer(engine, "w0")
        address = await server.start()
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                session = session_to(channel, [server], transport)
                first = await tokens(session, "a")
                parts = session.generate(request("long", LONG), 30.0)
                await anext(parts)
                await parts.aclose()  # the consumer went away after one part
                await until(lambda: "long" in engine.abort_requests and idle(engine), "the abort of 'long'")
                second = await tokens(session, "b")
                await session.close()
                return first, second
        finally:
            await server.stop(grace_s=2)

    first, second = run(main)
    assert first == second and len(first) == SHORT.max_tokens
    assert engine.stats.num_requests_finished == 3 and engine.stats.num_generated_tokens < LONG.max_tokens + 12


def test_a_passed_deadline_is_deadline_exceeded_and_aborts_the_request_on_the_worker(tiny_hf_dir: Path,
                                                                                   transport: str) -> None:
    engine = make_engine(tiny_hf_dir)
    engine.gate.clear()

    async def main() -> WorkerCallFailed:
        server = WorkerServer(engine, "w0")
        address = await server.start()
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                session = session_to(channel, [server], transport)
                with pytest.raises(WorkerCallFailed) as expired:
                    await tokens(session, "held", timeout_s=0.2)
                await until(lambda: "held" in engine.abort_requests, "the abort of 'held'")
                engine.gate.set()
                await until(lambda: idle(engine), "the engine to free the aborted request's pages")
                await session.close()
                return expired.value
        finally:
            engine.gate.set()
            await server.stop(grace_s=2)

    assert run(main).status == Status.DEADLINE_EXCEEDED


def test_a_failed_stream_fails_its_requests_and_the_next_request_opens_a_new_one(tiny_hf_dir: Path,
                                                                                 transport: str) -> None:
    held_engine, fresh_engine = make_engine(tiny_hf_dir), make_engine(tiny_hf_dir)
    held_engine.gate.clear()

    async def main() -> tuple[WorkerCallFailed, list[int]]:
        first = WorkerServer(held_engine, "w0")
        address = await first.start()
        async with grpc.aio.insecure_channel(address) as channel:
            servers = [first]
            session = session_to(channel, servers, transport)
            held = asyncio.create_task(tokens(session, "held"))
            await until(held_engine.has_unfinished, "the request to reach the worker")
            await first.stop(grace_s=0)  # the worker goes away with the request in flight
            held_engine.gate.set()
            with pytest.raises(WorkerCallFailed) as failed:
                await held
            second = WorkerServer(fresh_engine, "w0", port=int(address.rpartition(":")[2]))
            await second.start()
            servers.append(second)
            try:
                after = await tokens(session, "after")
            finally:
                await session.close()
                await second.stop(grace_s=2)
            return failed.value, after

    failure, after = run(main)
    assert failure.status in RETRYABLE  # nothing reached the client: the router may try another worker
    assert len(after) == SHORT.max_tokens
