"""The hand-coded envelope (shim.ttrpc.wire) against the classes generated from protos/ttrpc."""

from hypothesis import given
from hypothesis import strategies as st

from shim.api.google.rpc import status_pb2
from shim.api.ttrpc import ttrpc_pb2
from shim.ttrpc.wire import DecodeError, Request, Response, Status

text = st.text(max_size=40)
int64 = st.integers(-(2**63), 2**63 - 1)
int32 = st.integers(-(2**31), 2**31 - 1)


@given(text, text, st.binary(max_size=100), int64, st.lists(st.tuples(text, text), max_size=5))
def test_request_matches_generated(service, method, payload, timeout, md):
    ours = Request(service, method, payload, timeout, md)
    theirs = ttrpc_pb2.Request(
        service=service, method=method, payload=payload, timeout_nano=timeout,
        metadata=[ttrpc_pb2.KeyValue(key=k, value=v) for k, v in md],
    )
    assert ours.encode() == theirs.SerializeToString(deterministic=True)
    assert Request.decode(theirs.SerializeToString()) == ours


@given(int32, text, st.lists(st.binary(max_size=20), max_size=3), st.binary(max_size=100), st.booleans())
def test_response_matches_generated(code, message, details, payload, with_status):
    theirs = ttrpc_pb2.Response(payload=payload)
    ours = Response(payload=payload)
    if with_status:
        theirs.status.CopyFrom(status_pb2.Status(code=code, message=message))
        ours.status = Status(code, message)
    parsed = Response.decode(theirs.SerializeToString())
    assert parsed == ours
    assert ttrpc_pb2.Response.FromString(ours.encode()) == theirs


@given(st.lists(st.tuples(text, st.binary(max_size=20)), max_size=3))
def test_status_details_are_any_messages(details):
    theirs = status_pb2.Status(code=5, message="not found")
    for url, value in details:
        theirs.details.add(type_url=url, value=value)
    ours = Status.decode(theirs.SerializeToString())
    assert status_pb2.Status.FromString(ours.encode()) == theirs


@given(st.binary(max_size=64))
def test_any_bytes_decode_or_fail_cleanly(data):
    """Garbage from a peer is a DecodeError (answered InvalidArgument), never another exception."""
    for message in (Request, Response, Status):
        try:
            message.decode(data)
        except DecodeError:
            pass
