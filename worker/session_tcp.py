"""The worker's framed Session: ``Worker.Session``'s messages over plain TCP (``cluster.base.framing``).

A routed request crosses the Session twice (the request in, its tokens out); over gRPC each message costs both
sides a hop through grpcio's completion-queue thread, over a framed stream one write and one read on the event loop
(``cluster.base.framing`` gives the figures). The messages and their meaning are the gRPC Session's
(``worker.session.SessionServer``):

- the client's first frame is a ``WorkerSessionHello`` carrying what gRPC metadata would (``authorization``); a
  worker with a cluster key answers a wrong or missing one with a ``WorkerSessionResponse`` whose ``request_id``
  is empty and whose ``error_code`` is UNAUTHENTICATED, and closes the connection;
- then each frame is a ``WorkerSessionRequest`` and each frame back a ``WorkerSessionResponse``; a frame that does
  not parse, or is over ``max_message_bytes``, is answered like the hello's refusal (INVALID_ARGUMENT) and ends the
  connection;
- the connection's end, however it ends, aborts every request still running on it (which frees their pages).

It serves plain TCP only: a worker configured for TLS offers none (``WorkerInfo.session_port`` 0) and its routers
use the gRPC Session.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from google.protobuf.message import DecodeError

from radixserve.cluster.base.framing import FrameError, frame, read_frame
from radixserve.cluster.base.generation import Status
from radixserve.cluster.base.security import ApiKeys
from radixserve.cluster.base.wire import Undecodable, grpc_code
from radixserve.v1 import worker_pb2
from radixserve.worker.session import Admit, SessionServer


class SessionListener:
    """Serves framed Sessions on ``host`` (``start``: port 0 takes a free port), taking requests in with
    ``admit`` (the worker's ``WorkerService.admit``), to clients with one of ``keys`` (any client when none is
    required), with frames up to ``max_message_bytes``. Runs once: ``start``, then ``stop``."""

    def __init__(self, admit: Admit, keys: ApiKeys, max_message_bytes: int) -> None:
        self._admit = admit
        self._keys = keys
        self._max_bytes = max_message_bytes
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int = 0) -> int:
        """Listen and return the bound port; OSError when it cannot be bound."""
        self._server = await asyncio.start_server(self._connection, host, port)
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and end every connection (aborting what still runs on them)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if await self._admitted(reader, writer):
                await self._serve(reader, writer)
        except (ConnectionError, FrameError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _admitted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Read the hello; refuse (and say why) a client without an accepted key."""
        data = await read_frame(reader, self._max_bytes)
        if data is None:
            return False
        try:
            hello = worker_pb2.WorkerSessionHello.FromString(data)
        except DecodeError:
            await _refuse(writer, Status.INVALID_ARGUMENT, "WorkerSessionHello: cannot be parsed")
            return False
        if not self._keys.check(hello.authorization or None):
            await _refuse(writer, Status.UNAUTHENTICATED, "missing or invalid cluster key")
            return False
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Hand each frame to a ``SessionServer`` whose requests write their answers on ``writer``, until the
        connection ends or a frame is refused.

        Answers are written without waiting for the transport to drain: each is a few tokens, the requests on a
        connection are bounded by the worker's queue, so what the transport may buffer is too."""
        def send(answer: worker_pb2.WorkerSessionResponse) -> None:
            if not writer.is_closing():
                writer.write(frame(answer.SerializeToString()))

        server = SessionServer(self._admit, send)
        try:
            while (data := await read_frame(reader, self._max_bytes)) is not None:
                message = _parse(data)
                if isinstance(message, Undecodable):
                    await _refuse(writer, Status.INVALID_ARGUMENT, message.details)
                    return
                server.receive(message)
        except FrameError as error:
            await _refuse(writer, Status.INVALID_ARGUMENT, f"WorkerSessionRequest: {error}")
        finally:
            await server.close()  # aborts every request still running on the connection


def _parse(data: bytes) -> worker_pb2.WorkerSessionRequest | Undecodable:
    try:
        return worker_pb2.WorkerSessionRequest.FromString(data)
    except DecodeError as error:
        return Undecodable(f"WorkerSessionRequest: cannot be parsed: {error}")


async def _refuse(writer: asyncio.StreamWriter, status: Status, details: str) -> None:
    """The connection-wide refusal: an answer naming no request."""
    refusal = worker_pb2.WorkerSessionResponse(error_code=grpc_code(status).value[0], error_details=details)
    writer.write(frame(refusal.SerializeToString()))
    with contextlib.suppress(ConnectionError):
        await writer.drain()
