"""The sans-IO codec and the hand-coded envelope messages."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shim.ttrpc.codec import (
    HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    TYPE_REQUEST,
    TYPE_RESPONSE,
    Frame,
    FrameDecoder,
    FrameTooLarge,
    OversizedFrame,
    encode_frame,
)
from shim.ttrpc.wire import DecodeError, Request, Response, Status


def test_header_is_ten_bytes_big_endian():
    data = encode_frame(0x01020304, TYPE_REQUEST, b"abc", flags=0x05)
    assert HEADER_SIZE == 10
    assert data == b"\x00\x00\x00\x03\x01\x02\x03\x04\x01\x05abc"


def test_zero_length_body_is_a_frame():
    dec = FrameDecoder()
    assert dec.feed(encode_frame(1, TYPE_RESPONSE, b"")) == [Frame(1, TYPE_RESPONSE, 0, b"")]
    assert dec.buffered == 0


def test_partial_header_and_body_wait_for_more():
    data = encode_frame(3, TYPE_REQUEST, b"x" * 100)
    dec = FrameDecoder()
    assert dec.feed(data[:4]) == []
    assert dec.feed(data[4:50]) == []
    assert dec.feed(data[50:]) == [Frame(3, TYPE_REQUEST, 0, b"x" * 100)]


def test_refuses_to_encode_oversized_body():
    encode_frame(1, TYPE_REQUEST, b"\0" * MAX_MESSAGE_SIZE)  # the limit itself is allowed
    with pytest.raises(FrameTooLarge):
        encode_frame(1, TYPE_REQUEST, b"\0" * (MAX_MESSAGE_SIZE + 1))


def test_oversized_frame_is_skipped_without_buffering_and_stream_continues():
    dec = FrameDecoder(max_size=16)
    big = struct.pack(">IIBB", 1000, 5, TYPE_REQUEST, 0)
    out = dec.feed(big + b"y" * 10)
    assert out == [OversizedFrame(5, TYPE_REQUEST, 0, 1000)]
    assert dec.buffered == 0
    for _ in range(99):
        assert dec.feed(b"y" * 10) == []
    assert dec.buffered == 0
    assert dec.feed(encode_frame(7, TYPE_REQUEST, b"ok")) == [Frame(7, TYPE_REQUEST, 0, b"ok")]


def test_four_gib_length_is_reported_not_allocated():
    dec = FrameDecoder()
    out = dec.feed(struct.pack(">IIBB", 0xFFFFFFFF, 1, TYPE_REQUEST, 0) + b"z" * 1000)
    assert out == [OversizedFrame(1, TYPE_REQUEST, 0, 0xFFFFFFFF)]
    assert dec.buffered == 0


frames_strategy = st.lists(
    st.tuples(
        st.integers(0, 2**32 - 1),
        st.integers(0, 255),
        st.integers(0, 255),
        st.binary(max_size=300),
    ),
    max_size=12,
)


@given(frames=frames_strategy, cuts=st.lists(st.integers(0, 5000), max_size=20))
def test_any_split_decodes_to_the_same_frames(frames, cuts):
    stream = b"".join(encode_frame(sid, t, body, flags) for sid, t, flags, body in frames)
    expected = [Frame(sid, t, flags, body) for sid, t, flags, body in frames]
    points = sorted({c % (len(stream) + 1) for c in cuts})
    dec = FrameDecoder()
    got = []
    prev = 0
    for p in [*points, len(stream)]:
        got += dec.feed(stream[prev:p])
        prev = p
    assert got == expected
    assert dec.buffered == 0


@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 2000), max_size=10))
def test_garbage_never_crashes_and_split_does_not_matter(data, cuts):
    whole = FrameDecoder(max_size=64).feed(data)
    dec = FrameDecoder(max_size=64)
    got, prev = [], 0
    for p in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
        got += dec.feed(data[prev:p])
        prev = p
    assert got == whole
    assert dec.buffered <= HEADER_SIZE + 64


def test_request_round_trip_with_negative_timeout_and_repeated_metadata():
    req = Request("containerd.task.v2.Task", "Create", b"\x01\x02", -5, [("a", "1"), ("a", "2"), ("", "")])
    assert Request.decode(req.encode()) == req


def test_status_negative_code_and_details_round_trip():
    st_ = Status(-1, "m\u00e9", [b"\x0a\x01x"])
    assert Status.decode(st_.encode()) == st_


def test_empty_response_is_success_with_empty_payload():
    assert Response.decode(b"") == Response(None, b"")


def test_unknown_fields_are_skipped():
    # field 9 varint, field 10 fixed64, field 11 fixed32, field 12 bytes, then service
    body = b"\x48\x01" + b"\x51" + b"\0" * 8 + b"\x5d" + b"\0" * 4 + b"\x62\x01z" + b"\x0a\x01s"
    assert Request.decode(body).service == "s"


@pytest.mark.parametrize(
    "body",
    [b"\x0a\x05ab", b"\x20", b"\x20\xff", b"\x0b", b"\x00\x01", b"\x0a\x02\xff\xfe", b"\x20" + b"\xff" * 11],
)
def test_malformed_messages_raise_decode_error(body):
    with pytest.raises(DecodeError):
        Request.decode(body)


@given(st.binary(max_size=200))
def test_decoders_raise_only_decode_error(data):
    for cls in (Request, Response, Status):
        try:
            cls.decode(data)
        except DecodeError:
            pass
