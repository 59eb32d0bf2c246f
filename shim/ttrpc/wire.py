"""The ttrpc envelope messages, encoded by hand.

``ttrpc.Request``, ``ttrpc.Response``, ``ttrpc.KeyValue`` and ``google.rpc.Status`` are tiny; coding
them here keeps this package free of generated code and of the protobuf runtime (whose import is
costly on the shim's start path). Wire-compatibility with the .proto definitions is tested against
the generated classes. Unknown fields are skipped, as protobuf requires.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_WT_VARINT, _WT_I64, _WT_LEN, _WT_I32 = 0, 1, 2, 5


class DecodeError(ValueError):
    pass


_ONE_BYTE = [bytes((i,)) for i in range(0x80)]  # most keys, lengths and codes: no loop, no allocation


def _varint(value: int) -> bytes:
    if 0 <= value < 0x80:
        return _ONE_BYTE[value]
    if value < 0:
        value += 1 << 64  # negative int32/int64 use ten bytes of two's complement
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise DecodeError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise DecodeError("varint too long")


def _signed64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _signed32(value: int) -> int:
    value &= (1 << 32) - 1
    return value - (1 << 32) if value >= 1 << 31 else value


def _len_field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | _WT_LEN) + _varint(len(data)) + data


def _fields(buf: bytes):
    """Yield (number, wire_type, value) with value an int or bytes; skips nothing silently wrong."""
    pos, end = 0, len(buf)
    while pos < end:
        key = buf[pos]
        if key < 0x80:  # one-byte keys (fields 1-15): every field of these messages
            pos += 1
        else:
            key, pos = _read_varint(buf, pos)
        number, wt = key >> 3, key & 7
        if number == 0:
            raise DecodeError("field number 0")
        if wt == _WT_VARINT:
            value, pos = _read_varint(buf, pos)
        elif wt == _WT_LEN:
            if pos < end and buf[pos] < 0x80:
                n, pos = buf[pos], pos + 1
            else:
                n, pos = _read_varint(buf, pos)
            if pos + n > end:
                raise DecodeError("truncated length-delimited field")
            value, pos = bytes(buf[pos : pos + n]), pos + n
        elif wt == _WT_I64:
            if pos + 8 > end:
                raise DecodeError("truncated fixed64")
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wt == _WT_I32:
            if pos + 4 > end:
                raise DecodeError("truncated fixed32")
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise DecodeError(f"unsupported wire type {wt}")
        yield number, wt, value


def _expect(wt: int, want: int, what: str) -> None:
    if wt != want:
        raise DecodeError(f"{what}: wrong wire type {wt}")


def _text(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DecodeError(f"{what}: invalid UTF-8") from e


@dataclass(slots=True)
class Request:
    service: str = ""
    method: str = ""
    payload: bytes = b""
    timeout_nano: int = 0
    metadata: list[tuple[str, str]] = field(default_factory=list)

    def encode(self) -> bytes:
        parts = []
        if self.service:
            parts.append(_len_field(1, self.service.encode()))
        if self.method:
            parts.append(_len_field(2, self.method.encode()))
        if self.payload:
            parts.append(_len_field(3, self.payload))
        if self.timeout_nano:
            parts.append(b"\x20" + _varint(self.timeout_nano))
        for key, value in self.metadata:
            kv = (_len_field(1, key.encode()) if key else b"") + (_len_field(2, value.encode()) if value else b"")
            parts.append(_len_field(5, kv))
        return b"".join(parts)

    @classmethod
    def decode(cls, buf: bytes) -> Request:
        req = cls()
        for number, wt, value in _fields(buf):
            if number == 1:
                _expect(wt, _WT_LEN, "service")
                req.service = _text(value, "service")
            elif number == 2:
                _expect(wt, _WT_LEN, "method")
                req.method = _text(value, "method")
            elif number == 3:
                _expect(wt, _WT_LEN, "payload")
                req.payload = value
            elif number == 4:
                _expect(wt, _WT_VARINT, "timeout_nano")
                req.timeout_nano = _signed64(value)
            elif number == 5:
                _expect(wt, _WT_LEN, "metadata")
                req.metadata.append(_decode_kv(value))
        return req


def _decode_kv(buf: bytes) -> tuple[str, str]:
    key = value = ""
    for number, wt, v in _fields(buf):
        if number == 1:
            _expect(wt, _WT_LEN, "metadata key")
            key = _text(v, "metadata key")
        elif number == 2:
            _expect(wt, _WT_LEN, "metadata value")
            value = _text(v, "metadata value")
    return key, value


@dataclass(slots=True)
class Status:
    """google.rpc.Status; ``details`` are serialized google.protobuf.Any messages."""

    code: int = 0
    message: str = ""
    details: list[bytes] = field(default_factory=list)

    def encode(self) -> bytes:
        out = b""
        if self.code:
            out += b"\x08" + _varint(self.code)
        if self.message:
            out += _len_field(2, self.message.encode())
        for d in self.details:
            out += _len_field(3, d)
        return out

    @classmethod
    def decode(cls, buf: bytes) -> Status:
        st = cls()
        for number, wt, value in _fields(buf):
            if number == 1:
                _expect(wt, _WT_VARINT, "code")
                st.code = _signed32(value)
            elif number == 2:
                _expect(wt, _WT_LEN, "message")
                st.message = _text(value, "message")
            elif number == 3:
                _expect(wt, _WT_LEN, "details")
                st.details.append(value)
        return st


@dataclass(slots=True)
class Response:
    status: Status | None = None
    payload: bytes = b""

    def encode(self) -> bytes:
        out = b""
        if self.status is not None:
            out += _len_field(1, self.status.encode())
        if self.payload:
            out += _len_field(2, self.payload)
        return out

    @classmethod
    def decode(cls, buf: bytes) -> Response:
        resp = cls()
        for number, wt, value in _fields(buf):
            if number == 1:
                _expect(wt, _WT_LEN, "status")
                resp.status = Status.decode(value)
            elif number == 2:
                _expect(wt, _WT_LEN, "payload")
                resp.payload = value
        return resp
