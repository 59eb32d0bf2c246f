"""An asyncio ttrpc server: a thin transport over :mod:`.codec` and :mod:`.wire`.

Unary calls only. Streaming (ttrpc >= 1.2 Data frames, and requests flagged remote-open) is not built:
a Data frame is answered InvalidArgument on its stream and a streaming request Unimplemented, and the
connection keeps serving. containerd's shim APIs are all unary.

Every request runs in its own task, so a long call (the Task service's Wait) never holds up others
on the connection; responses go out in completion order. Writes never block the reader. A peer that
stops reading makes the server stop reading from it, and is dropped if it stays stalled or its
pending replies pass a hard limit, so memory stays bounded whatever a peer does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .codec import (
    FLAG_REMOTE_OPEN,
    TYPE_DATA,
    TYPE_REQUEST,
    TYPE_RESPONSE,
    FrameDecoder,
    OversizedFrame,
    encode_frame,
)
from .errors import Code, TTRPCError
from .metadata import Metadata
from .wire import DecodeError, Request, Response, Status

log = logging.getLogger("ttrpc.server")

Handler = Callable[["ServerContext", Any], Awaitable[Any]]
PeerCheck = Callable[[int, int, int], bool]

_UCRED = struct.Struct("3i")


@dataclass(slots=True)
class Method:
    """A handler and, optionally, the message class its request payload is parsed into."""

    handler: Handler
    request_type: Any = None  # anything with FromString(bytes); None hands the handler raw bytes


@dataclass(slots=True)
class ServerContext:
    service: str
    method: str
    metadata: Metadata
    deadline: float | None  # time.monotonic() seconds, or None
    peer_pid: int
    peer_uid: int


def same_user(pid: int, uid: int, gid: int) -> bool:
    """The Go shim's rule (UnixSocketRequireSameUser), with root also admitted."""
    return uid == 0 or (uid == os.geteuid() and gid == os.getegid())


class Server:
    def __init__(
        self,
        *,
        peer_check: PeerCheck | None = same_user,
        max_inflight: int = 4096,
        write_high_water: int = 1 << 20,
        write_hard_limit: int = 64 << 20,
        stall_timeout: float = 30.0,
    ) -> None:
        self._services: dict[str, dict[str, Method]] = {}
        self.peer_check = peer_check
        self.max_inflight = max_inflight
        self.write_high_water = write_high_water
        self.write_hard_limit = write_hard_limit
        self.stall_timeout = stall_timeout
        self._servers: list[asyncio.AbstractServer] = []
        self._conns: set[_Connection] = set()
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()

    def register(self, service: str, methods: Mapping[str, Handler | Method | tuple[Handler, Any]]) -> None:
        """Add a service: ``{"Create": (handler, CreateTaskRequest), "Ping": raw_bytes_handler}``."""
        table = self._services.setdefault(service, {})
        for name, spec in methods.items():
            if isinstance(spec, Method):
                table[name] = spec
            elif isinstance(spec, tuple):
                table[name] = Method(*spec)
            else:
                table[name] = Method(spec)

    async def start(self, sock: socket.socket) -> None:
        """Serve a listening unix socket (bound here or inherited from the parent)."""
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(lambda: _Connection(self), sock=sock)
        self._servers.append(server)

    async def listen(self, path: str, backlog: int = 128) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(backlog)
        await self.start(sock)
        return sock

    @property
    def inflight(self) -> int:
        return sum(len(c.tasks) for c in self._conns)

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, let in-flight calls finish (up to ``timeout``), then close every connection."""
        self._closing = True
        for server in self._servers:
            server.close()
        self._update_idle()
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            log.warning("ttrpc: shutdown timed out with %d calls in flight", self.inflight)
        for conn in list(self._conns):
            conn.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    def _update_idle(self) -> None:
        if self.inflight:
            self._idle.clear()
        else:
            self._idle.set()


class _Connection(asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self.server = server
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.last_stream_id = 0
        self.peer_pid = self.peer_uid = -1
        self._reading_paused = False
        self._writing_paused = False
        self._stall_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        try:
            pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        except OSError as e:
            log.warning("ttrpc: cannot read peer credentials: %s", e)
            transport.abort()
            return
        self.peer_pid, self.peer_uid = pid, uid
        check = self.server.peer_check
        if check is not None and not check(pid, uid, gid):
            log.warning("ttrpc: refused peer pid=%d uid=%d gid=%d: invalid credentials", pid, uid, gid)
            transport.abort()
            return
        transport.set_write_buffer_limits(high=self.server.write_high_water)
        self.server._conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._conns.discard(self)
        if self._stall_timer:
            self._stall_timer.cancel()
        for task in self.tasks:
            task.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        for frame in self.decoder.feed(data):
            if isinstance(frame, OversizedFrame):
                if frame.type == TYPE_REQUEST:
                    self._send_status(
                        frame.stream_id,
                        Code.RESOURCE_EXHAUSTED,
                        f"message length {frame.length} exceed maximum message size of {self.decoder.max_size}",
                    )
                continue
            if frame.type == TYPE_REQUEST:
                self._on_request(frame.stream_id, frame.flags, frame.body)
            elif frame.type == TYPE_DATA:
                self._send_status(frame.stream_id, Code.INVALID_ARGUMENT, "ttrpc: data frame on unknown stream")
            # Other types (a Response sent to a server, future types) are ignored, as in Go.

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._set_reading()
        loop = asyncio.get_running_loop()
        self._stall_timer = loop.call_later(self.server.stall_timeout, self._stalled)

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._stall_timer:
            self._stall_timer.cancel()
            self._stall_timer = None
        self._set_reading()

    # -- requests -----------------------------------------------------------------------------
    def _on_request(self, stream_id: int, flags: int, body: bytes) -> None:
        if stream_id % 2 == 0:
            self._send_status(stream_id, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams")
            return
        if stream_id <= self.last_stream_id:
            self._send_status(stream_id, Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment")
            return
        self.last_stream_id = stream_id
        try:
            req = Request.decode(body)
        except DecodeError as e:
            self._send_status(stream_id, Code.INVALID_ARGUMENT, f"unmarshal request error: {e}")
            return
        if flags & FLAG_REMOTE_OPEN:
            self._send_status(stream_id, Code.UNIMPLEMENTED, "ttrpc: streaming is not supported by this server")
            return
        methods = self.server._services.get(req.service)
        if methods is None:
            self._send_status(stream_id, Code.UNIMPLEMENTED, f"service {req.service}")
            return
        method = methods.get(req.method)
        if method is None:
            self._send_status(stream_id, Code.UNIMPLEMENTED, f"method {req.method}")
            return
        deadline = time.monotonic() + req.timeout_nano / 1e9 if req.timeout_nano else None
        ctx = ServerContext(req.service, req.method, Metadata(req.metadata), deadline, self.peer_pid, self.peer_uid)
        task = asyncio.get_running_loop().create_task(self._call(stream_id, method, ctx, req.payload))
        self.tasks.add(task)
        self.server._idle.clear()
        self._set_reading()

    async def _call(self, stream_id: int, method: Method, ctx: ServerContext, payload: bytes) -> None:
        try:
            try:
                request = method.request_type.FromString(payload) if method.request_type else payload
            except Exception as e:  # protobuf's DecodeError and friends
                raise TTRPCError(Code.INVALID_ARGUMENT, f"unmarshal request error: {e}") from e
            if ctx.deadline is None:
                result = await method.handler(ctx, request)
            else:
                loop_deadline = asyncio.get_running_loop().time() + (ctx.deadline - time.monotonic())
                try:
                    async with asyncio.timeout_at(loop_deadline):
                        result = await method.handler(ctx, request)
                except TimeoutError as e:
                    raise TTRPCError(Code.DEADLINE_EXCEEDED, "context deadline exceeded") from e
            out = result if isinstance(result, bytes | bytearray) else result.SerializeToString()
            self._send(stream_id, Response(payload=bytes(out)).encode())
        except asyncio.CancelledError:
            raise  # the connection or the server is going away; nobody to answer
        except TTRPCError as e:
            self._send_status(stream_id, e.code, e.message, e.details)
        except Exception as e:
            log.exception("ttrpc: %s/%s failed", ctx.service, ctx.method)
            self._send_status(stream_id, Code.UNKNOWN, str(e) or type(e).__name__)
        finally:
            self.tasks.discard(asyncio.current_task())  # type: ignore[arg-type]
            self._set_reading()
            self.server._update_idle()

    # -- output -------------------------------------------------------------------------------
    def _send_status(self, stream_id: int, code: int, message: str, details: tuple[bytes, ...] = ()) -> None:
        self._send(stream_id, Response(status=Status(int(code), message, list(details))).encode())

    def _send(self, stream_id: int, body: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if len(body) > self.decoder.max_size:
            body = Response(
                status=Status(Code.RESOURCE_EXHAUSTED, f"message length {len(body)} exceed maximum message size")
            ).encode()
        self.transport.write(encode_frame(stream_id, TYPE_RESPONSE, body))
        if self.transport.get_write_buffer_size() > self.server.write_hard_limit:
            log.warning("ttrpc: dropping peer pid=%d: it does not read its replies", self.peer_pid)
            self.transport.abort()

    def _stalled(self) -> None:
        if self.transport is not None and self._writing_paused:
            log.warning("ttrpc: dropping peer pid=%d: stalled for %.1fs", self.peer_pid, self.server.stall_timeout)
            self.transport.abort()

    def _set_reading(self) -> None:
        """Read while the peer drains our replies and calls in flight are under the limit."""
        if self.transport is None:
            return
        pause = self._writing_paused or len(self.tasks) >= self.server.max_inflight
        if pause != self._reading_paused:
            self._reading_paused = pause
            if pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
