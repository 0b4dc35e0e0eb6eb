"""Length-prefixed frames over a byte stream: the framed Session between a router and a worker.

A frame is a 4-byte little-endian length and that many bytes (one serialized protobuf message). Why not gRPC for
this one stream: a gRPC message costs each side a hop through grpcio's completion-queue thread; between two
processes over loopback a round trip took 359 us on a gRPC stream against 80 us as frames on uvloop's transport
(``bench/README.md``, "Where a routed request's time went"), and a routed request pays it once each way.

Both ends read frames in their protocol's ``data_received`` (``FrameDecoder``) rather than through an
``asyncio.StreamReader`` and a task awaiting it: a message is handled in the I/O callback that brought it, a turn
of the event loop sooner (``bench/README.md``, "The framed Session as protocols").
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

_LENGTH = struct.Struct("<I")


class FrameError(Exception):
    """The peer sent a frame longer than the limit, or the stream ended inside a frame."""


def frame(payload: bytes) -> bytes:
    """``payload`` with its length before it."""
    return _LENGTH.pack(len(payload)) + payload


class FrameDecoder:
    """Cuts the bytes of one stream, fed as they arrive, into frames' payloads, each at most ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Takes ``data`` in and yields the payloads of the frames complete so far, in order (a frame's bytes that
        have not all arrived wait for a later call). Raises ``FrameError`` on reaching a frame whose length is over
        ``max_bytes``, before its bytes arrive (the frames before it were yielded); the decoder is then of no
        further use."""
        self._buffer += data
        while (payload := self._next()) is not None:
            yield payload

    def _next(self) -> bytes | None:
        buffer = self._buffer
        if len(buffer) < _LENGTH.size:
            return None
        (size,) = _LENGTH.unpack_from(buffer)
        if size > self._max_bytes:
            raise FrameError(f"a frame of {size} bytes is over the limit of {self._max_bytes}")
        end = _LENGTH.size + size
        if len(buffer) < end:
            return None
        payload = bytes(buffer[_LENGTH.size:end])
        del buffer[:end]
        return payload

    def check_ended(self) -> None:
        """The stream ended: ``FrameError`` when it ended inside a frame."""
        if self._buffer:
            raise FrameError(f"the stream ended inside a frame ({len(self._buffer)} bytes of it)")
