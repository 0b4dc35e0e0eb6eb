"""The framed Session's frames (``cluster.base.framing``): however the bytes arrive, the same payloads come out."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from radixserve.cluster.base.framing import FrameDecoder, FrameError, frame

MAX_BYTES = 64


@given(payloads=st.lists(st.binary(max_size=MAX_BYTES), max_size=8), data=st.data())
def test_frames_cut_anywhere_decode_to_the_payloads_sent(payloads: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(frame(payload) for payload in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    decoder = FrameDecoder(MAX_BYTES)
    decoded = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)]):
        decoded += decoder.feed(stream[start:end])
    decoder.check_ended()
    assert decoded == payloads


@given(payload=st.binary(min_size=1, max_size=MAX_BYTES), keep=st.data())
def test_a_stream_that_ends_inside_a_frame_is_an_error(payload: bytes, keep: st.DataObject) -> None:
    encoded = frame(payload)
    decoder = FrameDecoder(MAX_BYTES)
    assert list(decoder.feed(encoded[:keep.draw(st.integers(1, len(encoded) - 1))])) == []
    with pytest.raises(FrameError, match="ended inside a frame"):
        decoder.check_ended()


def test_a_frame_over_the_limit_is_refused_by_its_length_after_the_frames_before_it() -> None:
    decoder = FrameDecoder(MAX_BYTES)
    frames = decoder.feed(frame(b"first") + struct.pack("<I", MAX_BYTES + 1))
    assert next(frames) == b"first"
    with pytest.raises(FrameError, match=f"a frame of {MAX_BYTES + 1} bytes is over the limit of {MAX_BYTES}"):
        next(frames)


def test_a_frame_at_the_limit_is_taken() -> None:
    assert list(FrameDecoder(MAX_BYTES).feed(frame(bytes(MAX_BYTES)))) == [bytes(MAX_BYTES)]
