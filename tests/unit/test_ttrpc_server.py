"""Server and client over real unix sockets, and hostile peers speaking raw bytes."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from shim.ttrpc import Client, ClosedError, Code, Server, TTRPCError
from shim.ttrpc.codec import (
    FLAG_REMOTE_OPEN,
    TYPE_DATA,
    TYPE_REQUEST,
    TYPE_RESPONSE,
    FrameDecoder,
    encode_frame,
)
from shim.ttrpc.wire import Request, Response

SVC = "test.v1.Echo"


async def echo(ctx, req: bytes) -> bytes:
    return req


async def sleep_then_echo(ctx, req: bytes) -> bytes:
    await asyncio.sleep(float(req.decode()))
    return req


async def show_metadata(ctx, req: bytes) -> bytes:
    return repr(sorted((k, v) for k, vs in ctx.metadata.items() for v in vs)).encode()


async def not_found(ctx, req):
    raise TTRPCError(Code.NOT_FOUND, 'container "x": not found')


async def crash(ctx, req):
    raise RuntimeError("boom")


async def big_reply(ctx, req: bytes) -> bytes:
    return b"r" * int(req.decode())


class Unparsable:
    @staticmethod
    def FromString(data: bytes):  # noqa: N802 - protobuf's name
        raise ValueError("not the message I expected")


def make_server(**kw) -> Server:
    server = Server(**kw)
    server.register(
        SVC,
        {
            "Echo": echo,
            "Sleep": sleep_then_echo,
            "Metadata": show_metadata,
            "NotFound": not_found,
            "Crash": crash,
            "Big": big_reply,
            "Typed": (echo, Unparsable),
        },
    )
    return server


def run(tmp_path, body: Callable[[Server, str], Awaitable[None]], **kw) -> None:
    async def main() -> None:
        server = make_server(**kw)
        path = str(tmp_path / "ttrpc.sock")
        await server.listen(path)
        try:
            await asyncio.wait_for(body(server, path), 30)
        finally:
            await server.shutdown(timeout=5)

    asyncio.run(main())


class Raw:
    """A hand-driven peer: writes any bytes, reads frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.decoder, self.frames = reader, writer, FrameDecoder(), []

    @classmethod
    async def open(cls, path: str) -> Raw:
        return cls(*await asyncio.open_unix_connection(path))

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def request(self, stream_id: int, method: str, payload: bytes = b"", flags: int = 0, **kw) -> None:
        self.send(encode_frame(stream_id, TYPE_REQUEST, Request(SVC, method, payload, **kw).encode(), flags))

    async def response(self) -> tuple[int, Response]:
        while not self.frames:
            data = await self.reader.read(65536)
            if not data:
                raise EOFError
            self.frames += self.decoder.feed(data)
        frame = self.frames.pop(0)
        assert frame.type == TYPE_RESPONSE
        return frame.stream_id, Response.decode(frame.body)

    async def status(self) -> tuple[int, int]:
        sid, resp = await self.response()
        return sid, (resp.status.code if resp.status else 0)


# -- the basics ------------------------------------------------------------------------------
def test_unary_round_trip_and_empty_payload(tmp_path):
    async def body(server, path):
        async with await Client.connect(path) as c:
            assert await c.call(SVC, "Echo", b"hello") == b"hello"
            assert await c.call(SVC, "Echo", b"") == b""

    run(tmp_path, body)


def test_many_calls_in_flight_answer_in_completion_order(tmp_path):
    async def body(server, path):
        async with await Client.connect(path) as c:
            done = []

            async def one(delay: str):
                await c.call(SVC, "Sleep", delay.encode())
                done.append(delay)

            await asyncio.gather(*(one(d) for d in ["0.3", "0.2", "0.1", "0"]))
            assert done == ["0", "0.1", "0.2", "0.3"]

    run(tmp_path, body)


def test_blocking_call_does_not_hold_up_others(tmp_path):
    async def body(server, path):
        async with await Client.connect(path) as c:
            waiting = asyncio.ensure_future(c.call(SVC, "Sleep", b"5"))
            for _ in range(20):
                assert await c.call(SVC, "Echo", b"x", timeout=2) == b"x"
            assert not waiting.done()
            waiting.cancel()

    run(tmp_path, body)


def test_unknown_service_and_method_are_unimplemented(tmp_path):
    async def body(server, path):
        async with await Client.connect(path) as c:
            with pytest.raises(TTRPCError) as e:
                await c.call("no.such.Service", "Echo")
            assert (e.value.code, e.value.message) == (Code.UNIMPLEMENTED, "service no.such.Service")
            with pytest.raises(TTRPCError) as e:
                await c.call(SVC, "Nope")
            assert (e.value.code, e.value.message) == (Code.UNIMPLEMENTED, "method Nope")

    run(tmp_path, body)


def test_handler_errors_carry_their_code(tmp_path):
    async def body(server, path):
        async with await Client.connect(path) as c:
            with pytest.raises(TTRPCError) as e:
                await c.call(SVC, "NotFound")
            assert (e.value.code, e.value.message) == (Code.NOT_FOUND, 'container "x": not found')
            with pytest.raises(TTRPCError) as e:
                await c.call(SVC, "Crash")
            assert (e.value.code, e.value.message) == (Code.UNKNOWN, "boom")
            with pytest.raises(TTRPCError) as e:
                await c.call(SVC, "Typed", b"\x01")
            assert e.value.code == Code.INVALID_ARGUMENT
            assert await c.call(SVC, "Echo", b"still serving") == b"still serving"

    run(tmp_path, body)


def test_metadata_keys_lowercased_repeated_and_unknown_tolerated(tmp_path):
    async def body(server, path):
        async with await Client.connect(path, metadata={"containerd-namespace-ttrpc": "ns1"}) as c:
            md = [("TraceParent", "00-abc"), ("x-rep", "1"), ("x-rep", "2")]
            out = await c.call(SVC, "Metadata", metadata=md)
            assert out.decode() == repr(
                [("containerd-namespace-ttrpc", "ns1"), ("traceparent", "00-abc"), ("x-rep", "1"), ("x-rep", "2")]
            )

    run(tmp_path, body)


def test_timeout_nano_becomes_a_server_deadline(tmp_path):
    async def body(server, path):
        raw = await Raw.open(path)
        raw.request(1, "Sleep", b"5", timeout_nano=50_000_000)
        assert await raw.status() == (1, Code.DEADLINE_EXCEEDED)
        raw.request(3, "Sleep", b"5", timeout_nano=-1)  # already expired, as Go's context would be
        assert await asyncio.wait_for(raw.status(), 1) == (3, Code.DEADLINE_EXCEEDED)
        raw.request(5, "Echo", b"x")
        assert await raw.status() == (5, 0)

    run(tmp_path, body)


def test_client_timeout_and_late_answer_ignored(tmp_path):
    async def body(server, path):
        async with await Client.connect(path) as c:
            with pytest.raises(TTRPCError) as e:
                await c.call(SVC, "Sleep", b"0.3", timeout=0.05)
            assert e.value.code == Code.DEADLINE_EXCEEDED
            await asyncio.sleep(0.4)
            assert await c.call(SVC, "Echo", b"after") == b"after"

    run(tmp_path, body)


def test_client_uses_odd_increasing_stream_ids(tmp_path):
    async def main():
        seen = []

        async def handle(reader, writer):
            dec = FrameDecoder()
            while data := await reader.read(65536):
                for f in dec.feed(data):
                    seen.append(f.stream_id)
                    writer.write(encode_frame(f.stream_id, TYPE_RESPONSE, b""))

        path = str(tmp_path / "raw.sock")
        srv = await asyncio.start_unix_server(handle, path)
        async with await Client.connect(path) as c:
            await asyncio.gather(*(c.call(SVC, "Echo") for _ in range(5)))
            await c.call(SVC, "Echo")
        srv.close()
        assert seen == [1, 3, 5, 7, 9, 11]

    asyncio.run(main())


def test_client_refuses_oversized_request(tmp_path):
    async def body(server, path):
        async with await Client.connect(path) as c:
            with pytest.raises(TTRPCError) as e:
                await c.call(SVC, "Echo", b"\0" * (4 << 20))
            assert e.value.code == Code.RESOURCE_EXHAUSTED
            assert await c.call(SVC, "Echo", b"ok") == b"ok"

    run(tmp_path, body)


def test_oversized_reply_becomes_resource_exhausted(tmp_path):
    async def body(server, path):
        async with await Client.connect(path) as c:
            with pytest.raises(TTRPCError) as e:
                await c.call(SVC, "Big", str(5 << 20).encode())
            assert e.value.code == Code.RESOURCE_EXHAUSTED
            assert len(await c.call(SVC, "Big", str(1 << 20).encode())) == 1 << 20

    run(tmp_path, body)


def test_pending_calls_fail_when_connection_closes(tmp_path):
    async def body(server, path):
        c = await Client.connect(path)
        pending = [asyncio.ensure_future(c.call(SVC, "Sleep", b"10")) for _ in range(3)]
        await asyncio.sleep(0.1)
        for conn in list(server._conns):
            conn.transport.abort()
        for p in pending:
            with pytest.raises(ClosedError):
                await p
        with pytest.raises(ClosedError):
            await c.call(SVC, "Echo")

    run(tmp_path, body)


def test_shutdown_lets_in_flight_calls_finish_and_stops_accepting(tmp_path):
    async def main():
        server = make_server()
        path = str(tmp_path / "s.sock")
        await server.listen(path)
        c = await Client.connect(path)
        call = asyncio.ensure_future(c.call(SVC, "Sleep", b"0.2"))
        await asyncio.sleep(0.05)
        await server.shutdown(timeout=5)
        assert await call == b"0.2"
        with pytest.raises(OSError):
            await Client.connect(path)
        await c.wait_closed()

    asyncio.run(main())


def test_peer_check_refusal_closes_the_connection(tmp_path):
    async def body(server, path):
        c = await Client.connect(path)
        with pytest.raises(ClosedError):
            await c.call(SVC, "Echo", b"x", timeout=5)

    run(tmp_path, body, peer_check=lambda pid, uid, gid: False)


# -- hostile peers ---------------------------------------------------------------------------
def test_stream_id_rules(tmp_path):
    async def body(server, path):
        raw = await Raw.open(path)
        raw.request(2, "Echo")
        assert await raw.status() == (2, Code.INVALID_ARGUMENT)
        raw.request(5, "Echo")
        assert await raw.status() == (5, 0)
        raw.request(5, "Echo")
        assert await raw.status() == (5, Code.INVALID_ARGUMENT)
        raw.request(3, "Echo")
        assert await raw.status() == (3, Code.INVALID_ARGUMENT)
        raw.request(7, "Echo")
        assert await raw.status() == (7, 0)

    run(tmp_path, body)


def test_body_that_is_not_protobuf_is_invalid_argument_and_connection_kept(tmp_path):
    async def body(server, path):
        raw = await Raw.open(path)
        raw.send(encode_frame(1, TYPE_REQUEST, b"\xff\xff\xff\xff garbage"))
        assert await raw.status() == (1, Code.INVALID_ARGUMENT)
        raw.request(3, "Echo")
        assert await raw.status() == (3, 0)

    run(tmp_path, body)


def test_oversized_and_four_gib_frames_are_resource_exhausted_and_connection_kept(tmp_path):
    async def body(server, path):
        raw = await Raw.open(path)
        n = (4 << 20) + 1
        raw.send(struct.pack(">IIBB", n, 1, TYPE_REQUEST, 0))
        for _ in range(n // 65536 + 1):
            raw.send(b"\0" * min(65536, n))
            n -= 65536
            if n <= 0:
                break
        await raw.writer.drain()
        assert await raw.status() == (1, Code.RESOURCE_EXHAUSTED)
        raw.request(3, "Echo")
        assert await raw.status() == (3, 0)
        raw.send(struct.pack(">IIBB", 0xFFFFFFFF, 5, TYPE_REQUEST, 0))
        assert await raw.status() == (5, Code.RESOURCE_EXHAUSTED)
        # The server now discards the next 4 GiB; a new connection is served meanwhile.
        async with await Client.connect(path) as c:
            assert await c.call(SVC, "Echo", b"other") == b"other"

    run(tmp_path, body)


def test_data_frames_unknown_types_and_streaming_requests(tmp_path):
    async def body(server, path):
        raw = await Raw.open(path)
        raw.send(encode_frame(1, TYPE_DATA, b"data"))
        assert await raw.status() == (1, Code.INVALID_ARGUMENT)
        raw.send(encode_frame(9, 77, b"future frame type"))
        raw.send(encode_frame(9, TYPE_RESPONSE, b""))
        raw.request(3, "Echo", flags=FLAG_REMOTE_OPEN)
        assert await raw.status() == (3, Code.UNIMPLEMENTED)
        raw.request(5, "Echo", b"fine")
        sid, resp = await raw.response()
        assert (sid, resp.payload) == (5, b"fine")

    run(tmp_path, body)


def test_truncated_header_then_close_leaves_server_serving(tmp_path):
    async def body(server, path):
        for junk in (b"\x00\x00", b"\x00\x00\x00\x05\x00\x00\x00\x01\x01\x00ab", b"\xde\xad\xbe\xef" * 1000):
            raw = await Raw.open(path)
            raw.send(junk)
            await raw.writer.drain()
            raw.writer.close()
        async with await Client.connect(path) as c:
            assert await c.call(SVC, "Echo", b"alive") == b"alive"

    run(tmp_path, body)


def test_huge_metadata(tmp_path):
    async def body(server, path):
        async with await Client.connect(path) as c:
            md = [(f"k{i}", "v" * 100) for i in range(30000)]  # ~3.5 MiB of metadata
            out = await c.call(SVC, "Metadata", metadata=md[:10])
            assert b"k9" in out
            assert await c.call(SVC, "Echo", b"x", metadata=md) == b"x"
            with pytest.raises(TTRPCError) as e:
                await c.call(SVC, "Echo", b"x", metadata=md + md)
            assert e.value.code == Code.RESOURCE_EXHAUSTED

    run(tmp_path, body)


def test_thousands_of_concurrent_streams(tmp_path):
    async def body(server, path):
        async with await Client.connect(path) as c:
            replies = await asyncio.gather(*(c.call(SVC, "Sleep", f"0.{i % 10}".encode()) for i in range(5000)))
            assert replies == [f"0.{i % 10}".encode() for i in range(5000)]

    run(tmp_path, body, max_inflight=1000)


def test_client_that_never_reads_is_dropped_and_memory_stays_bounded(tmp_path):
    async def body(server, path):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(path)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        req = Request(SVC, "Big", b"200000").encode()
        peak = 0
        sent = 0
        try:
            for i in range(200):
                await asyncio.wait_for(loop.sock_sendall(sock, encode_frame(2 * i + 1, TYPE_REQUEST, req)), 5)
                sent += 1
                await asyncio.sleep(0.005)
                peak = max([peak, *(cn.transport.get_write_buffer_size() for cn in server._conns if cn.transport)])
        except (TimeoutError, OSError):
            pass  # the server stopped reading from us, or dropped us: both are the point
        await asyncio.sleep(1.0)  # past stall_timeout
        assert peak <= (2 << 20) + 300_000
        assert len(server._conns) == 0, "the stalled peer should have been dropped"
        async with await Client.connect(path) as c:
            assert await c.call(SVC, "Echo", b"others still served") == b"others still served"
        sock.close()

    run(tmp_path, body, write_high_water=256 << 10, write_hard_limit=2 << 20, stall_timeout=0.5)


def test_peer_with_another_uid_is_refused_by_default(tmp_path):
    """SO_PEERCRED: a client running as another user (setuid in a child) is disconnected."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("needs root to run the client as another uid")
    public = tempfile.mkdtemp(dir="/tmp")  # pytest's tmp_path sits under a root-only dir
    os.chmod(public, 0o755)
    client = (
        "import os, socket, struct, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        "try:\n"
        f"    s.sendall(bytes.fromhex('{encode_frame(1, TYPE_REQUEST, Request(SVC, 'Echo', b'x').encode()).hex()}'))\n"
        "    print(repr(s.recv(100)))\n"
        "except (ConnectionResetError, BrokenPipeError):  # the server hung up first\n"
        "    print(repr(b''))\n"
    )

    async def body(server, path):
        os.chmod(path, 0o777)
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", client, path, stdout=subprocess.PIPE)
        out, _ = await proc.communicate()
        assert proc.returncode == 0
        assert out.strip() == b"b''", "the server must close the connection without answering"
        async with await Client.connect(path) as c:  # same user: served
            assert await c.call(SVC, "Echo", b"me") == b"me"

    try:
        run(Path(public), body)
    finally:
        shutil.rmtree(public)
