"""An asyncio ttrpc client: unary calls multiplexed on one unix-socket connection.

Stream ids are odd and increasing. Each call waits on its own future, so any number of calls may be
in flight and answers may arrive in any order. When the connection closes every pending call fails
with :class:`ClosedError`; reconnecting is the caller's business.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from .codec import TYPE_REQUEST, TYPE_RESPONSE, FrameDecoder, FrameTooLarge, OversizedFrame, encode_frame
from .errors import ClosedError, Code, TTRPCError
from .metadata import Metadata
from .wire import DecodeError, Request, Response

log = logging.getLogger("ttrpc.client")

MetadataLike = Mapping[str, str | list[str]] | Iterable[tuple[str, str]] | None


class Client(asyncio.Protocol):
    """Use :meth:`connect`; then ``await client.call(service, method, request, ResponseType)``."""

    def __init__(self, metadata: MetadataLike = None) -> None:
        self.metadata = Metadata.of(metadata)  # sent with every call
        self._decoder = FrameDecoder()
        self._transport: asyncio.Transport | None = None
        self._pending: dict[int, asyncio.Future[Response]] = {}
        self._next_id = 1
        self._closed = asyncio.Event()
        self._close_reason: Exception | None = None

    @classmethod
    async def connect(cls, path: str, metadata: MetadataLike = None) -> Client:
        """Connect to a unix socket path (a ``unix://`` prefix is accepted)."""
        if path.startswith("unix://"):
            path = path[len("unix://") :]
        loop = asyncio.get_running_loop()
        _, client = await loop.create_unix_connection(lambda: cls(metadata), path)
        return client

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._fail_all(ClosedError() if exc is None else ClosedError(f"ttrpc: closed: {exc}"))
        self._closed.set()

    def data_received(self, data: bytes) -> None:
        for frame in self._decoder.feed(data):
            if frame.type != TYPE_RESPONSE:
                continue  # a unary client expects nothing else; ignore like Go does
            fut = self._pending.pop(frame.stream_id, None)
            if fut is None or fut.done():
                continue  # a late answer to a call that timed out
            if isinstance(frame, OversizedFrame):
                fut.set_exception(TTRPCError(Code.RESOURCE_EXHAUSTED, f"response of {frame.length} bytes too large"))
                continue
            try:
                fut.set_result(Response.decode(frame.body))
            except DecodeError as e:
                fut.set_exception(TTRPCError(Code.INTERNAL, f"ttrpc: bad response: {e}"))

    # -- calls --------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    async def call(
        self,
        service: str,
        method: str,
        request: Any = b"",
        response_type: Any = None,
        *,
        timeout: float | None = None,
        metadata: MetadataLike = None,
    ) -> Any:
        """One unary call. ``request`` is bytes or a message; the reply is parsed with ``response_type``
        (anything with ``FromString``) or returned as bytes. Failures raise :class:`TTRPCError`."""
        if self.closed:
            raise ClosedError()
        payload = request if isinstance(request, bytes | bytearray) else request.SerializeToString()
        md = self.metadata.pairs()
        if metadata is not None:
            md = md + Metadata.of(metadata).pairs()
        timeout_nano = int(timeout * 1e9) if timeout is not None else 0
        body = Request(service, method, bytes(payload), timeout_nano, md).encode()
        stream_id = self._next_id
        self._next_id += 2
        try:
            frame = encode_frame(stream_id, TYPE_REQUEST, body)
        except FrameTooLarge as e:
            raise TTRPCError(Code.RESOURCE_EXHAUSTED, str(e)) from None
        fut: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = fut
        assert self._transport is not None
        self._transport.write(frame)
        try:
            async with asyncio.timeout(timeout):
                resp = await fut
        except TimeoutError:
            raise TTRPCError(Code.DEADLINE_EXCEEDED, "context deadline exceeded") from None
        finally:
            self._pending.pop(stream_id, None)
        status = resp.status
        if status is not None and status.code != 0:
            raise TTRPCError(status.code, status.message, tuple(status.details))
        return response_type.FromString(resp.payload) if response_type is not None else resp.payload

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def aclose(self) -> None:
        self.close()
        await self.wait_closed()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _fail_all(self, error: Exception) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(error)
