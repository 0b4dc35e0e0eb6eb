"""The worker's framed Session (``worker.session_tcp``) spoken by hand over a real TCP connection."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator

import grpc
from conditions import until
from test_service import (GREEDY, LONG, PROMPT, RPC_TIMEOUT_S, checkpoint, direct_run,  # noqa: F401
                          make_engine, pages_released, request, run, stream_tokens)

from radixserve.cluster.base.config import SecurityConfig
from radixserve.cluster.base.framing import frame
from radixserve.v1 import worker_pb2, worker_pb2_grpc
from radixserve.worker.models.checkpoint import Checkpoint
from radixserve.worker.engine import Engine
from radixserve.worker.service import WorkerServer

MAX_BYTES = 4 * 2**20
KEY = "cluster-secret"


class Client:
    """One framed Session connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, authorization: str = "") -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(frame(worker_pb2.WorkerSessionHello(authorization=authorization).SerializeToString()))
        return cls(reader, writer)

    def send(self, message: worker_pb2.WorkerSessionRequest) -> None:
        self.writer.write(frame(message.SerializeToString()))

    async def answer(self) -> worker_pb2.WorkerSessionResponse | None:
        """The next frame's message, read by hand (a 4-byte little-endian length, then the message); None once
        the worker closed the connection."""
        try:
            (size,) = struct.unpack("<I", await asyncio.wait_for(self.reader.readexactly(4), RPC_TIMEOUT_S))
            data = await asyncio.wait_for(self.reader.readexactly(size), RPC_TIMEOUT_S)
        except asyncio.IncompleteReadError as error:
            assert not error.partial, "the connection ended inside a frame"
            return None
        return worker_pb2.WorkerSessionResponse.FromString(data)

    async def tokens(self, request_id: str) -> list[int]:
        answers = []
        while not answers or not (answers[-1].response.finished or answers[-1].error_code):
            answer = await self.answer()
            assert answer is not None and answer.request_id == request_id, answer
            answers.append(answer)
        assert not answers[-1].error_code, answers[-1]
        return stream_tokens([a.response for a in answers])

    def close(self) -> None:
        self.writer.close()


@contextlib.asynccontextmanager
async def serving(engine: Engine, security: SecurityConfig | None = None) -> AsyncIterator[tuple[WorkerServer, str]]:
    """A worker serving ``engine``, started, with its gRPC address and a framed Session port; stopped on the way
    out."""
    server = WorkerServer(engine, "worker-0", security=security)
    address = await server.start()
    try:
        assert server.session_port is not None
        yield server, address
    finally:
        await server.stop(grace_s=5)


@contextlib.asynccontextmanager
async def session_client(engine: Engine) -> AsyncIterator[tuple[worker_pb2_grpc.WorkerStub, Client]]:
    """A worker serving ``engine``: its gRPC stub and a framed Session client; the worker stops on the way out."""
    async with serving(engine) as (server, address), grpc.aio.insecure_channel(address) as channel:
        yield worker_pb2_grpc.WorkerStub(channel), await Client.connect(server.session_port)


def test_a_framed_session_serves_what_a_generate_call_would(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint)

    async def main() -> list[int]:
        async with serving(engine) as (server, address):
            async with grpc.aio.insecure_channel(address) as channel:
                info = await worker_pb2_grpc.WorkerStub(channel).GetInfo(worker_pb2.GetInfoRequest(),
                                                                         timeout=RPC_TIMEOUT_S)
            assert info.session_port == server.session_port
            client = await Client.connect(info.session_port)
            client.send(worker_pb2.WorkerSessionRequest(generate=request(PROMPT, request_id="a")))
            tokens = await client.tokens("a")
            client.close()
            return tokens

    assert run(main) == direct_run(checkpoint, PROMPT, GREEDY).tokens


def test_without_the_cluster_key_the_session_is_refused_unauthenticated(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint)

    async def main() -> tuple[worker_pb2.WorkerSessionResponse | None, worker_pb2.WorkerSessionResponse | None,
                              list[int]]:
        async with serving(engine, SecurityConfig(cluster_key=KEY)) as (server, _):
            refusals = []
            for authorization in ("", "Bearer not-the-key"):
                client = await Client.connect(server.session_port, authorization)
                client.send(worker_pb2.WorkerSessionRequest(generate=request(PROMPT, request_id="sneaky")))
                refusals.append(await client.answer())
                assert await client.answer() is None  # then the worker closes the connection
                client.close()
            allowed = await Client.connect(server.session_port, f"Bearer {KEY}")
            allowed.send(worker_pb2.WorkerSessionRequest(generate=request(PROMPT, request_id="a")))
            tokens = await allowed.tokens("a")
            allowed.close()
            return refusals[0], refusals[1], tokens

    missing, wrong, tokens = run(main)
    for refusal in (missing, wrong):
        assert refusal is not None and refusal.request_id == ""
        assert refusal.error_code == grpc.StatusCode.UNAUTHENTICATED.value[0], refusal
    assert engine.stats.num_requests_finished == 1 and tokens == direct_run(checkpoint, PROMPT, GREEDY).tokens


def test_a_frame_that_does_not_parse_or_is_too_long_is_refused_and_the_worker_serves_on(
        checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint)

    async def main() -> list[worker_pb2.WorkerSessionResponse | None]:
        async with serving(engine) as (server, _):
            refusals = []
            for raw in (frame(b"\xff\xff\xff"), struct.pack("<I", MAX_BYTES + 1)):
                client = await Client.connect(server.session_port)
                client.writer.write(raw)
                refusals.append(await client.answer())
                client.close()
            after = await Client.connect(server.session_port)
            after.send(worker_pb2.WorkerSessionRequest(generate=request(PROMPT, request_id="after")))
            assert await after.tokens("after") == direct_run(checkpoint, PROMPT, GREEDY).tokens
            after.close()
            return refusals

    for refusal in run(main):
        assert refusal is not None and refusal.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0], refusal
        assert "WorkerSessionRequest" in refusal.error_details


def test_closing_the_connection_aborts_its_running_request_and_frees_its_pages(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint)

    async def main() -> None:
        async with session_client(engine) as (stub, client):
            client.send(worker_pb2.WorkerSessionRequest(generate=request(PROMPT, LONG, request_id="long")))
            for _ in range(3):
                answer = await client.answer()
                assert answer is not None and answer.request_id == "long"
            assert not await pages_released(stub)  # the request holds pages while it runs
            client.close()
            await until(lambda: pages_released(stub), "the closed connection's request to free its pages")

    run(main)
    assert "long" in engine.abort_requests and not engine.has_unfinished()


def test_a_request_aborted_in_the_write_that_brought_it_is_aborted_in_the_engine_and_the_session_serves_on(
        checkpoint: Checkpoint) -> None:
    """The worker takes a request in as its frame arrives, before the task that forwards its tokens runs: an abort
    read in the same turn cancels that task before it ever ran, and must still end the request in the engine."""
    engine = make_engine(checkpoint)

    async def main() -> list[int]:
        async with session_client(engine) as (stub, client):
            both = [worker_pb2.WorkerSessionRequest(generate=request(PROMPT, LONG, request_id="long")),
                    worker_pb2.WorkerSessionRequest(abort="long")]
            client.writer.write(b"".join(frame(m.SerializeToString()) for m in both))
            await until(lambda: pages_released(stub), "the aborted request's pages to be freed")
            client.send(worker_pb2.WorkerSessionRequest(generate=request(PROMPT, request_id="after")))
            tokens = await client.tokens("after")  # nothing of "long" came first
            client.close()
            return tokens

    assert run(main) == direct_run(checkpoint, PROMPT, GREEDY).tokens
    assert "long" in engine.abort_requests and not engine.has_unfinished()


def test_the_session_listens_on_the_port_asked_for_and_not_at_all_with_none(checkpoint: Checkpoint) -> None:
    with socket.socket() as probe:  # a port free a moment ago, for the worker to take
        probe.bind(("127.0.0.1", 0))
        wanted = probe.getsockname()[1]

    async def info_of(session_port: int | None) -> tuple[int | None, int]:
        server = WorkerServer(make_engine(checkpoint), "worker-0", session_port=session_port)
        address = await server.start()
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                info = await worker_pb2_grpc.WorkerStub(channel).GetInfo(worker_pb2.GetInfoRequest(),
                                                                         timeout=RPC_TIMEOUT_S)
            return server.session_port, info.session_port
        finally:
            await server.stop(grace_s=5)

    assert run(lambda: info_of(wanted)) == (wanted, wanted)
    assert run(lambda: info_of(None)) == (None, 0)  # GetInfo's 0: none offered, routers use the gRPC Session
