"""Sans-IO ttrpc framing: frames to bytes and bytes (in any split) back to frames.

A frame is a 10-byte big-endian header ``u32 length | u32 stream_id | u8 type | u8 flags``
followed by ``length`` body bytes. Bodies above :data:`MAX_MESSAGE_SIZE` are not buffered: the
decoder skips them and reports :class:`OversizedFrame`, so the peer can answer ResourceExhausted on
that stream and keep the connection, as the Go implementation does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size  # 10
MAX_MESSAGE_SIZE = 4 << 20

TYPE_REQUEST = 1
TYPE_RESPONSE = 2
TYPE_DATA = 3

FLAG_REMOTE_CLOSED = 0x1
FLAG_REMOTE_OPEN = 0x2
FLAG_NO_DATA = 0x4


@dataclass(frozen=True, slots=True)
class Frame:
    stream_id: int
    type: int
    flags: int
    body: bytes


@dataclass(frozen=True, slots=True)
class OversizedFrame:
    """A frame whose body exceeded the limit; its body was discarded."""

    stream_id: int
    type: int
    flags: int
    length: int


class FrameTooLarge(ValueError):
    pass


def encode_frame(stream_id: int, type_: int, body: bytes, flags: int = 0) -> bytes:
    """Header plus body; refuses bodies the peer would reject."""
    if len(body) > MAX_MESSAGE_SIZE:
        raise FrameTooLarge(f"message length {len(body)} exceed maximum message size of {MAX_MESSAGE_SIZE}")
    return HEADER.pack(len(body), stream_id, type_, flags) + body


class FrameDecoder:
    """Incremental decoder: ``feed(data)`` returns the frames completed by ``data``."""

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._skip = 0  # body bytes of an oversized frame still to discard

    @property
    def buffered(self) -> int:
        """Bytes held waiting for the rest of a frame (bounded by header + max_size)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame | OversizedFrame]:
        out: list[Frame | OversizedFrame] = []
        view = memoryview(data)
        if self._skip:
            n = min(self._skip, len(view))
            self._skip -= n
            view = view[n:]
        buf = self._buf
        buf += view
        pos = 0
        end = len(buf)
        while end - pos >= HEADER_SIZE:
            length, stream_id, type_, flags = HEADER.unpack_from(buf, pos)
            if length > self.max_size:
                out.append(OversizedFrame(stream_id, type_, flags, length))
                pos += HEADER_SIZE
                n = min(length, end - pos)
                pos += n
                self._skip = length - n
                continue
            if end - pos - HEADER_SIZE < length:
                break
            start = pos + HEADER_SIZE
            out.append(Frame(stream_id, type_, flags, bytes(buf[start : start + length])))
            pos = start + length
        if pos:
            del buf[:pos]
        return out
