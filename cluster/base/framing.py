"""Length-prefixed frames over an asyncio stream: the framed Session between a router and a worker.

A frame is a 4-byte little-endian length and that many bytes (one serialized protobuf message). Why not gRPC for
this one stream: a gRPC message costs each side a hop through grpcio's completion-queue thread; between two
processes over loopback a round trip took 359 us on a gRPC stream against 80 us as frames on uvloop's transport
(``bench/README.md``, "Where a routed request's time went"), and a routed request pays it once each way.
"""

from __future__ import annotations

import asyncio
import struct

_LENGTH = struct.Struct("<I")


class FrameError(Exception):
    """The peer sent a frame longer than the limit, or the stream ended inside a frame."""


def frame(payload: bytes) -> bytes:
    """``payload`` with its length before it."""
    return _LENGTH.pack(len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader, max_bytes: int) -> bytes | None:
    """The next frame's payload; None when the stream ended cleanly between frames.

    Raises ``FrameError`` for a frame over ``max_bytes`` (before reading it) or a stream cut inside a frame, and
    ``ConnectionError`` when the connection failed.
    """
    try:
        header = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError as error:
        if not error.partial:
            return None
        raise FrameError("the stream ended inside a frame's length") from None
    (size,) = _LENGTH.unpack(header)
    if size > max_bytes:
        raise FrameError(f"a frame of {size} bytes is over the limit of {max_bytes}")
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise FrameError("the stream ended inside a frame") from None
